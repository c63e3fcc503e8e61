"""Tests for the tensor-core 4-bit layout (hf_optquant.kernels.lut_mma), its kernels in Triton's interpreter
(inline PTX replaced by a lane-by-lane emulation of ``mma.m16n8k16``) and its use by QuantLinear.

References are independent of the code under test: the PTX ISA's definition of the m16n8k16 A/B fragments,
written out here, applied to the stored words and the activations; float64 matmuls of the dequantised weight;
the plain dequantisation formula.  Inputs are random and shapes odd (rows not a multiple of 16, K not a
multiple of 64).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_optquant.formats import Scaling
from hf_optquant.formats.fit import fit_format
from hf_optquant.kernels import lut_mma as LM
from hf_optquant.kernels.lut_linear import PackedLutWeight
from hf_optquant.kernels.reference import dequantize_reference
from hf_optquant.nn import QuantLinear

needs_triton = pytest.mark.skipif(not LM.HAS_TRITON, reason="needs triton (its interpreter)")
#: Kernel tests run compiled on a GPU where there is one, else in Triton's interpreter (which a GPU machine's
#: Triton may not offer once it was imported without TRITON_INTERPRET).
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _kernels_here(monkeypatch) -> None:
    if DEV == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _weight(n: int, k: int, block: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    lut = torch.sort(torch.randn(16, generator=g)).values
    signs = torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0)
    scales = (torch.rand(n, -(-k // block), generator=g) + 0.5) * signs
    return codes, lut, scales


def _fragment_product(p: LM.MmaLutWeight, x: torch.Tensor) -> torch.Tensor:
    """``x @ lut[codes].T`` computed the way the tensor cores see the stored words (no scales).

    PTX ISA, mma.m16n8k16 with .bf16: lane l = 4 g + c holds A registers a0..a3, register r covering row
    g + 8 (r % 2) and columns 2c + 8 (r // 2) + {0, 1} (low half first); B registers b0, b1 cover rows
    2c + 8 r + {0, 1} of column g.  Our layout hands word j of a group to the j-th k16 step (a register is
    the table entry of byte r), and lane (g, c) feeds B with x[g, 64 q + 16 c + 4 j + {0, 1, 2, 3}].
    """
    lut = p.lut.double()
    words = p.words.long() & 0xFFFFFFFF
    m = x.shape[0]
    y = torch.zeros(m, p.n_tiles * 16, dtype=torch.float64)
    xp = torch.nn.functional.pad(x.double(), (0, p.n_groups * 64 - x.shape[1]))
    for tile in range(p.n_tiles):
        for q in range(p.n_groups):
            for j in range(4):
                a = torch.zeros(16, 16, dtype=torch.float64)
                b = torch.zeros(16, m, dtype=torch.float64)
                for lane in range(32):
                    g, c = divmod(lane, 4)
                    w = int(words[tile, q, lane, j])
                    for r in range(4):
                        byte = (w >> (8 * r)) & 255
                        row, col = g + 8 * (r % 2), 2 * c + 8 * (r // 2)
                        a[row, col], a[row, col + 1] = lut[byte & 15], lut[byte >> 4]
                    k0 = 64 * q + 16 * c + 4 * j
                    b[2 * c : 2 * c + 2, :] = xp[:, k0 : k0 + 2].T
                    b[2 * c + 8 : 2 * c + 10, :] = xp[:, k0 + 2 : k0 + 4].T
                y[:, 16 * tile : 16 * tile + 16] += (a @ b).T
    return y[:, : p.out_features]


def test_stored_words_are_mma_fragments_of_the_weight():
    n, k = 21, 80  # two row tiles (one partial), two groups (one partial)
    codes, lut, _ = _weight(n, k, k, seed=1)
    p = LM.pack_mma_weight(codes, lut, torch.ones(n, 1), k)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(2))
    ref = x.double() @ lut.double()[codes.long()].T
    torch.testing.assert_close(_fragment_product(p, x), ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(LM.mma_reference_codes(p), codes)


@pytest.mark.parametrize(("n", "k"), [(1, 16), (17, 48), (40, 272), (130, 64)])
def test_codes_round_trip(n, k):
    codes, lut, scales = _weight(n, k, k, seed=n * k)
    p = LM.pack_mma_weight(codes, lut, scales, k)
    assert p.words.shape == (-(-n // 16), -(-k // 64), 32, 4)
    assert torch.equal(LM.mma_reference_codes(p), codes)
    assert torch.equal(LM.dequantize_mma(p), dequantize_reference(codes, lut, scales, k))


@needs_triton
@pytest.mark.parametrize(("n", "k", "block", "m", "split", "config"), [
    (40, 128, 64, 1, None, {"NW": 2}), (33, 208, 64, 3, 2, {"NW": 2, "KW": 1}), (48, 256, 128, 11, 2, {"NW": 2}),
    (20, 160, 160, 5, None, {"NW": 2}), (70, 192, 64, 16, 3, {"NW": 2, "KW": 1}), (24, 128, 128, 23, None, {"NW": 2}),
    (40, 448, 128, 2, None, {"NW": 4, "KW": 4}), (50, 320, 64, 9, 2, {"NW": 8, "KW": 2}),
])  # fmt: skip
def test_kernel_matches_float64(monkeypatch, n, k, block, m, split, config):
    _kernels_here(monkeypatch)
    codes, lut, scales = _weight(n, k, block, seed=n + k + m)
    p = LM.pack_mma_weight(codes, lut, scales, block, device=DEV)
    w = dequantize_reference(codes, lut, scales, block, dtype=torch.float64)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float16, 2e-3)):
        xd = x.to(dtype)
        ref = xd.double() @ w.T
        y = LM.mma_linear(xd.to(DEV), p, path="mma", split_k=split, config=config).cpu()
        assert y.dtype == dtype and y.shape == (m, n)
        assert float((y.double() - ref).norm() / ref.norm()) < tol
    # a wrong scale block, a swapped row half or a misplaced k would cost O(1) relative error
    y32 = LM.mma_linear(x.to(DEV), p).cpu()  # fp32 activations: dequantise + matmul
    tf32 = DEV == "cuda" and torch.backends.cuda.matmul.allow_tf32
    torch.testing.assert_close(y32.double(), x.double() @ w.T, rtol=1e-2 if tf32 else 1e-5, atol=1e-4)


def _gemm_weight_reference(codes, lut, scales, block, dtype):
    """The weight the fused GEMM multiplies: table value rounded to x's dtype, times the scale, rounded again."""
    v = lut.to(dtype).float()[codes.long()]
    s = scales.repeat_interleave(block, dim=1)[:, : codes.shape[1]]
    return (v * s).to(dtype).double()


@needs_triton
@pytest.mark.parametrize(("n", "k", "block", "m", "config"), [
    (40, 128, 64, 5, {"BM": 16}), (333, 1008, 128, 19, {"BM": 16}), (150, 320, 320, 70, {"BM": 64, "STAGES": 2}),
    (24, 192, 64, 33, {"BM": 32, "BT": 16}), (40, 448, 128, 9, {"BM": 16, "SPLIT": 3}),
    # operands through tensor descriptors (out-of-range blocks read as zeros)
    (333, 1008, 128, 19, {"BM": 16, "TMA": True}), (40, 448, 128, 9, {"BM": 16, "SPLIT": 3, "TMA": True, "BT": 2}),
    (150, 320, 320, 70, {"BM": 64, "STAGES": 2, "TMA": True}), (70, 208, 208, 3, {"BM": 16, "TMA": True}),
    (300, 512, 128, 130, {"BM": 128, "BT": 4, "TMA": True, "SPLIT": 2}),
])  # fmt: skip
def test_gemm_matches_its_rounding_and_float64(monkeypatch, n, k, block, m, config):
    _kernels_here(monkeypatch)
    codes, lut, scales = _weight(n, k, block, seed=n + m)
    scales = scales.bfloat16().float()  # stored losslessly in bf16 (and exactly representable in fp16)
    p = LM.pack_mma_weight(codes, lut, scales, block, device=DEV)
    w = dequantize_reference(codes, lut, scales, block, dtype=torch.float64)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    for dtype, tol, tol_own in ((torch.bfloat16, 1e-2, 5e-3), (torch.float16, 2e-3, 1e-3)):
        xd = x.to(dtype)
        y = LM.mma_linear(xd.to(DEV), p, path="gemm", config=config).cpu().double()
        assert y.shape == (m, n)
        ref = xd.double() @ w.T
        own = xd.double() @ _gemm_weight_reference(codes, lut, scales, block, dtype).T
        assert float((y - ref).norm() / ref.norm()) < tol
        assert float((y - own).norm() / own.norm()) < tol_own  # only accumulation and output rounding left


@needs_triton
def test_16bit_dequant_kernel_is_the_gemm_weight_bit_for_bit(monkeypatch):
    _kernels_here(monkeypatch)
    for n, k, block in ((37, 192, 64), (150, 320, 320), (20, 576, 128)):
        codes, lut, scales = _weight(n, k, block, seed=n)
        scales = scales.bfloat16().float()
        p = LM.pack_mma_weight(codes, lut, scales, block, device=DEV)
        for dtype in (torch.bfloat16, torch.float16):
            out = LM.decode_mma_weight(p, dtype).cpu()
            ref = _gemm_weight_reference(codes, lut, scales, block, dtype)
            assert out.dtype == dtype and torch.equal(out.double(), ref)


def test_gemm_refuses_what_it_cannot_compute(monkeypatch):
    codes, lut, scales = _weight(16, 64, 64, seed=5)
    p32 = LM.pack_mma_weight(codes, lut, scales + 1e-4, 64)  # not bf16-representable: stored in fp32
    assert p32.scales.dtype == torch.float32 and "scales" in LM.gemm_unsupported(torch.bfloat16, p32)
    with pytest.raises(ValueError, match="gemm.*scales"):
        LM.mma_linear(torch.randn(2, 64).bfloat16(), p32, path="gemm")
    p = LM.pack_mma_weight(codes, lut, scales.bfloat16().float(), 64)
    assert LM.gemm_unsupported(torch.bfloat16, p) is None and "x is" in LM.gemm_unsupported(torch.float32, p)
    if LM.HAS_TRITON:
        _kernels_here(monkeypatch)
        for bad, field in (({"BM": 48}, "BM"), ({"BT": 3}, "BT"), ({"STAGES": 0}, "STAGES"), ({"SPLIT": 0}, "SPLIT"),
                           ({"TMA": "yes"}, "TMA")):
            with pytest.raises(ValueError, match=field):
                LM.mma_linear(torch.randn(2, 64).bfloat16().to(DEV), p.to(DEV), path="gemm", config=bad)


@needs_triton
def test_dequant_kernel_is_bit_exact(monkeypatch):
    _kernels_here(monkeypatch)
    for n, k, block in ((37, 192, 64), (16, 80, 80)):
        codes, lut, scales = _weight(n, k, block, seed=k)
        p = LM.pack_mma_weight(codes, lut, scales, block, device=DEV)
        out = LM.decode_mma_weight(p, torch.float32).cpu()
        assert torch.equal(out, dequantize_reference(codes, lut, scales, block))


def test_gemm_split_fills_the_gpu_with_long_enough_slices():
    assert LM.gemm_split(896, 64, 132) == 1  # enough programs already
    assert LM.gemm_split(224, 64, 132) == 1
    assert LM.gemm_split(128, 224, 132) == 2  # 4096 x 14336 at BM = 64: 2 slices of 112 groups
    assert LM.gemm_split(64, 64, 132) == 3  # 4096 x 4096 at M = 256, BM = 128
    assert LM.gemm_split(8, 64, 132) == 4  # K = 4096: slices stay >= 16 groups
    assert LM.gemm_split(8, 10, 132) == 1


def test_tiles_per_program_keeps_enough_programs():
    assert LM.tiles_per_program(8016, 8, 396) == 8  # LM head: one warp per 16-row tile
    assert LM.tiles_per_program(896, 8, 396) == 2
    assert LM.tiles_per_program(256, 8, 396) == 1  # all warps of a program split one tile's K
    assert LM.tiles_per_program(3, 4, 396) == 1


def test_l2_prefetch_follows_the_programs_per_sm_rule(monkeypatch):
    codes, lut, scales = _weight(64, 256, 64, seed=5)
    p = LM.pack_mma_weight(codes, lut, scales, 64)
    x = torch.randn(1, 256)
    monkeypatch.setattr(LM, "_sm90_or_later", lambda index: True)
    monkeypatch.setattr(LM, "_device_index", lambda t: 0)
    monkeypatch.setattr(LM, "_sm_count", lambda x2, interpret: 132)
    limit = LM.PREFETCH_MAX_PROGRAMS_PER_SM * 132
    auto = dict(LM.MMA_DEFAULT)
    assert LM._prefetch_plan(auto, p, limit, x, False) == (LM.PREFETCH_GROUPS, True)  # few warps per SM
    assert LM._prefetch_plan(auto, p, limit + 1, x, False) == (0, False)
    assert LM._prefetch_plan(dict(auto, L2PF=4, SPF=False), p, limit, x, False) == (4, False)  # explicit wins
    assert LM._prefetch_plan(dict(auto, L2PF=3, SPF=True), p, limit + 1, x, False) == (3, True)
    assert LM._prefetch_plan(auto, p, 1, x, True) == (0, False)  # interpreter: no PTX
    odd = dataclasses.replace(p, scales=torch.empty(p.scales.numel() + 1, dtype=p.scales.dtype)[1:].view_as(p.scales))
    assert odd.scales.data_ptr() % 16 and LM._prefetch_plan(auto, odd, 1, x, False) == (0, False)  # misaligned
    monkeypatch.setattr(LM, "_sm90_or_later", lambda index: False)
    assert LM._prefetch_plan(dict(auto, L2PF=4, SPF=True), p, 1, x, False) == (0, False)  # before sm_90


def test_pdl_follows_torch_compile_when_not_set():
    import torch._inductor.config as inductor_config

    for flag in (True, False):
        with inductor_config.patch({"triton.enable_pdl": flag}):
            assert LM._inductor_pdl() is flag


def test_invalid_inputs_are_rejected(monkeypatch):
    codes, lut, scales = _weight(16, 64, 64, seed=3)
    assert LM.mma_unsupported(3, 64, 64) and LM.mma_unsupported(4, 64, 72) and LM.mma_unsupported(4, 32, 128)
    assert LM.mma_unsupported(4, 64, 128) is None and LM.mma_unsupported(4, 128, 128) is None
    with pytest.raises(ValueError, match="block_size"):
        LM.pack_mma_weight(torch.zeros(4, 128, dtype=torch.uint8), lut, torch.ones(4, 4), 32)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        LM.pack_mma_weight(codes.int() + 9, lut, scales, 64)
    with pytest.raises(ValueError, match="scales"):
        LM.pack_mma_weight(codes, lut, scales[:, :0], 64)
    with pytest.raises(ValueError, match="16 entries"):
        LM.pack_mma_weight(codes, lut[:8], scales, 64)
    p = LM.pack_mma_weight(codes, lut, scales, 64)
    with pytest.raises(ValueError, match="features"):
        LM.mma_linear(torch.randn(2, 63), p)
    with pytest.raises(ValueError, match="path"):
        LM.mma_linear(torch.randn(2, 64), p, path="gemv")
    with pytest.raises(TypeError, match="bf16"):
        LM.mma_linear(torch.randn(2, 64).double(), p)
    if LM.HAS_TRITON:
        _kernels_here(monkeypatch)
        for bad, field in (({"NW": 4, "KW": 3}, "KW"), ({"AHEAD": 3}, "AHEAD"), ({"COPIES": 16}, "COPIES"),
                           ({"NW": 6}, "NW"), ({"PDL": 1}, "PDL"), ({"SPF": "yes"}, "SPF"), ({"L2PF": 65}, "L2PF"),
                           ({"L2PF": -1}, "L2PF"), ({"L2PF": True}, "L2PF"), ({"L2PF": 2.0}, "L2PF")):  # fmt: skip
            with pytest.raises(ValueError, match=field):
                LM.mma_linear(torch.randn(2, 64).bfloat16().to(DEV), p.to(DEV), path="mma", config=bad)


@needs_triton
def test_quant_linear_uses_the_fragment_layout_for_4bit_codes(monkeypatch):
    _kernels_here(monkeypatch)
    w = torch.distributions.StudentT(5.0).sample((36, 192)) * 0.02
    for scaling, layout in ((Scaling("block", 64, "absmax"), LM.MmaLutWeight),
                            (Scaling("channel", 1, "rms"), LM.MmaLutWeight),
                            (Scaling("block", 32, "absmax"), PackedLutWeight)):  # fmt: skip
        fit = fit_format(w, "nf4", 4.5, scaling=scaling)
        layer = QuantLinear.from_encoded(fit.encoded)
        layer.kernels = True
        x = torch.randn(3, 192).bfloat16()
        ref = x.double() @ layer.format.decode(layer.encoded).double().T  # (the format decodes on the CPU)
        y = layer.to(DEV)(x.to(DEV)).cpu()
        assert isinstance(layer.runtime_weight(torch.device(DEV)).packed, layout)
        assert float((y.double() - ref).norm() / ref.norm()) < 1e-2


@needs_triton
def test_gemm_falls_back_to_pointer_loads_for_unaligned_x(monkeypatch):
    """Tensor descriptors need 16-byte aligned bases: an x that starts 2 bytes in is served by the pointer-load
    kernel, with the same result as asking for it."""
    _kernels_here(monkeypatch)
    codes, lut, scales = _weight(48, 192, 64, seed=11)
    p = LM.pack_mma_weight(codes, lut, scales.bfloat16().float(), 64, device=DEV)
    flat = torch.randn(40 * 192 + 1, generator=torch.Generator().manual_seed(3)).bfloat16().to(DEV)
    x = flat[1:].view(40, 192)  # contiguous, base 2 bytes past an allocation
    assert x.data_ptr() % 16 and not LM._use_tma({"TMA": True}, x, p.words, interpret=True)
    assert LM._use_tma({"TMA": True}, x.clone(), p.words, interpret=True)
    y = LM.mma_linear(x, p, path="gemm", config={"BM": 64, "TMA": True})
    assert torch.equal(y, LM.mma_linear(x, p, path="gemm", config={"BM": 64, "TMA": False}))
    ref = x.double().cpu() @ dequantize_reference(codes, lut, scales.bfloat16().float(), 64, dtype=torch.float64).T
    assert float((y.cpu().double() - ref).norm() / ref.norm()) < 1e-2
