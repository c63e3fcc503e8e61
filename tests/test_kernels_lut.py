"""CPU tests of the LUT-linear Triton kernels (Triton's interpreter) and of the packing.

TRITON_INTERPRET=1 is set before anything imports Triton; the kernels pick interpreter or
compiler when called (see ``hf_optquant.kernels.lut_linear._kernels``), so the order in
which test modules import Triton does not matter.  The GPU-only pieces (inline-PTX table
reads, the shared-memory tables) are exercised by ``benchmarks/kernels.py`` on a GPU; here
every kernel runs its ``LMODE 0`` twin, which computes the same table offsets (pair bytes
included) and reads them with ``tl.load``; the activations staged in shared memory (``XS``)
are GPU-only too and read from global memory here.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

# Triton reads TRITON_INTERPRET when it builds its own jitted helpers (at import): if some
# earlier test module imported Triton without it, run this file again in a subprocess.
_TRITON_PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_optquant.kernels import (  # noqa: E402
    HAS_TRITON,
    PackedLutWeight,
    dequantize_packed,
    lut_linear,
    lut_linear_reference,
    pack_lut_weight,
    unpack_lut_weight,
)

LL = importlib.import_module("hf_optquant.kernels.lut_linear")
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or _TRITON_PREIMPORTED,
    reason="triton not installed" if not HAS_TRITON else "run in a subprocess (see below)",
)


@pytest.mark.skipif(not (HAS_TRITON and _TRITON_PREIMPORTED), reason="interpreter active here")
def test_kernels_in_fresh_interpreter_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


ALL_BITS = (2, 3, 4, 5, 6, 8)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_weight(n, k, bits, block, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    lut = torch.sort(torch.randn(2**bits, generator=g)).values  # arbitrary sorted table
    scales = torch.randn(n, -(-k // block), generator=g)  # about half negative
    return codes, lut, scales


def rel_err(y, ref):
    assert torch.isfinite(y).all(), "non-finite output (unwritten element?)"
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def check(n, k, bits, block, m, dtype, *, path=None, split_k=None, seed=0, x_shape=None, config=None):
    codes, lut, scales = make_weight(n, k, bits, block, seed)
    p = pack_lut_weight(codes, lut, scales, bits, block)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*(x_shape or (m,)), k, generator=g).to(dtype)
    y = lut_linear(x, p, path=path, split_k=split_k, config=config)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], n)
    ref64 = lut_linear_reference(x.double(), codes, lut.double(), scales.double(), block)
    ref = lut_linear_reference(x, codes, lut, scales, block)
    err64, err = rel_err(y, ref64), rel_err(y, ref)
    ctx = (n, k, bits, block, m, dtype, path, split_k, config)
    assert err64 < TOL[dtype], (err64, ctx)
    assert err < 2 * TOL[dtype], (err, ctx)
    return err64


# ------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", (1, *ALL_BITS))
@pytest.mark.parametrize("n,k,block", [(37, 200, 64), (5, 1100, 32), (3, 512, 512), (4, 700, 700), (2, 1, 1)])
def test_pack_roundtrip(bits, n, k, block):
    codes, lut, scales = make_weight(n, k, bits, block, seed=bits)
    p = pack_lut_weight(codes, lut, scales, bits, block)
    assert isinstance(p, PackedLutWeight)
    assert p.qweight.dtype == torch.int32
    assert p.qweight.shape == (n, p.n_groups * bits * p.sub_k)
    assert p.lut.data_ptr() % (4 * 2**bits) == 0  # aligned to its size (LMODE 1 lookups)
    c2, l2, s2 = unpack_lut_weight(p)
    assert torch.equal(c2, codes) and c2.dtype == torch.uint8
    assert torch.equal(l2, lut)
    assert torch.equal(s2, scales)  # fp32 scales kept exactly ('auto')
    expect = p.qweight.numel() * 4 + p.lut.numel() * 4 + p.scales.numel() * p.scales.element_size()
    assert p.nbytes == expect
    w = dequantize_packed(p)
    ref = lut[codes.long()] * scales[:, torch.arange(k) // block]
    assert torch.equal(w, ref)


def test_pack_layout_contract():
    """Pin the documented bit layout: chunk q, word t, field j of plane b holds k=(q*32/b+j)*C+t."""
    n, k, bits = 2, 1024, 4
    codes, lut, scales = make_weight(n, k, bits, 64, seed=3)
    p = pack_lut_weight(codes, lut, scales, bits, 64)
    c, w = p.sub_k, p.qweight.long() & 0xFFFFFFFF
    for row, g, q, t, j in [(0, 0, 0, 0, 0), (1, 1, 3, 15, 7), (0, 1, 2, 5, 3), (1, 0, 1, 9, 6)]:
        word = w[row, g * bits * c + q * c + t].item()
        kk = g * 32 * c + (q * (32 // bits) + j) * c + t
        assert (word >> (j * bits)) & 15 == codes[row, kk].item()
    # 4 bits: byte u of a word = the codes of sub-slots 2u (low nibble) and 2u + 1 (pair table)
    word = w[1, 2 * c + 7].item()  # row 1, chunk 2, word 7
    for u in range(4):
        byte = (word >> (8 * u)) & 255
        assert byte & 15 == codes[1, (16 + 2 * u) * c + 7].item()
        assert byte >> 4 == codes[1, (16 + 2 * u + 1) * c + 7].item()
    # 3 bits = 2-bit plane (2 chunks) then 1-bit plane (1 chunk)
    codes3, lut3, scales3 = make_weight(1, 512, 3, 64, seed=4)
    p3 = pack_lut_weight(codes3, lut3, scales3, 3, 64)
    w3 = p3.qweight.long() & 0xFFFFFFFF
    for kk in (0, 17, 255, 256, 511):
        s_, t = divmod(kk, c)
        lo = (w3[0, (s_ // 16) * c + t].item() >> ((s_ % 16) * 2)) & 3
        hi = (w3[0, 2 * c + t].item() >> s_) & 1
        assert lo | hi << 2 == codes3[0, kk].item()


def test_pack_scale_dtypes_and_blocks():
    codes, lut, scales = make_weight(8, 300, 4, 96, seed=5)  # non power-of-two block
    p = pack_lut_weight(codes, lut, scales, 4, 96)
    assert p.scale_block == 32
    assert torch.equal(unpack_lut_weight(p)[2], scales)
    exact = scales.to(torch.bfloat16).float()
    assert pack_lut_weight(codes, lut, exact, 4, 96).scales.dtype == torch.bfloat16
    lossy = pack_lut_weight(codes, lut, scales, 4, 96, scale_dtype=torch.bfloat16)
    assert lossy.scales.dtype == torch.bfloat16 and lossy.nbytes < p.nbytes


def test_pack_errors():
    codes, lut, scales = make_weight(4, 64, 4, 32)
    with pytest.raises(ValueError, match="bits"):
        pack_lut_weight(codes, lut, scales, 7, 32)
    with pytest.raises(ValueError, match="scales"):
        pack_lut_weight(codes, lut, scales[:, :1], 4, 32)
    with pytest.raises(ValueError, match="lut"):
        pack_lut_weight(codes, lut[:8], scales, 4, 32)
    with pytest.raises(ValueError, match="codes"):
        pack_lut_weight(codes | 16, lut, scales, 4, 32)
    with pytest.raises(ValueError, match="block_size"):
        pack_lut_weight(codes, lut, torch.randn(4, 8), 4, 8)  # block < 16 (and < K)
    with pytest.raises(ValueError, match="scale_dtype"):
        pack_lut_weight(codes, lut, scales, 4, 32, scale_dtype=torch.int8)
    p = pack_lut_weight(codes, lut, scales, 4, 32)
    with pytest.raises(ValueError, match="features"):
        lut_linear(torch.randn(2, 63), p)
    with pytest.raises(TypeError):
        lut_linear(torch.randn(2, 64).double(), p)
    with pytest.raises(ValueError, match="path"):
        lut_linear(torch.randn(2, 64), p, path="gemmv")


def test_packed_to_drops_launch_cache():
    codes, lut, scales = make_weight(4, 64, 4, 32)
    p = pack_lut_weight(codes, lut, scales, 4, 32)
    p._launch_cache["k"] = "v"
    q = p.to("cpu")
    assert q._launch_cache == {} and p._launch_cache == {"k": "v"}
    assert torch.equal(q.qweight, p.qweight) and q.lut.data_ptr() % 64 == 0


# ------------------------------------------------------------------------- kernels


@needs_triton
@pytest.mark.parametrize("bits", ALL_BITS)
def test_every_bits_gemv_gemm_dequant(bits):
    check(37, 200, bits, 64, 1, torch.bfloat16)  # GEMV, K and N off every tile
    check(37, 200, bits, 64, 17, torch.float32, path="gemm")  # tl.dot path, fp32 exact
    check(37, 600, bits, 32, 2, torch.float32, path="dequant", seed=bits)  # scratch + matmul


@needs_triton
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64])
def test_batches_bf16(m):
    check(37, 200, 4, 64, m, torch.bfloat16)


@needs_triton
@pytest.mark.parametrize("m", [2, 3, 6])
def test_gemv_rows(m):
    """Multi-row GEMV programs (BM = 2 / 4): partial last tile and several row tiles."""
    check(29, 600, 4, 128, m, torch.float32, path="gemv", seed=m)
    check(29, 600, 5, 64, m, torch.float32, path="gemv", seed=m + 20)


@needs_triton
@pytest.mark.parametrize("m,path", [(1, "gemv"), (2, "gemv"), (3, "gemm"), (5, "gemm")])
def test_fp32_matches_reference_tightly(m, path):
    check(29, 700, 4, 128, m, torch.float32, path=path, seed=7)


@needs_triton
@pytest.mark.parametrize(
    "m,path,split", [(1, "gemv", 2), (1, "gemv", 3), (3, "gemv", 2), (5, "gemm", 3), (20, "gemm", 7)]
)
def test_split_k(m, path, split):
    # 3 groups of 512 (K padded); the slices reduce through the workspace + counters
    check(40, 1100, 4, 32, m, torch.float32, path=path, split_k=split, seed=11)
    check(40, 1100, 3, 128, m, torch.bfloat16, path=path, split_k=split, seed=12)


@needs_triton
@pytest.mark.parametrize("block", [16, 32, 128, 256, 96, "K"])
def test_block_sizes(block):
    k = 600
    bs = k if block == "K" else block
    check(21, k, 4, bs, 1, torch.float32, seed=13)
    check(21, k, 4, bs, 18, torch.float32, seed=14)


@needs_triton
def test_fp16_and_leading_dims():
    check(37, 200, 4, 64, 0, torch.float16, x_shape=(2, 3))
    check(37, 200, 6, 64, 0, torch.float16, x_shape=(3, 7), path="gemm")


GEMV_CONFIGS = [
    {"BN": 16, "AHEAD": 2, "num_warps": 4},  # 3 N tiles, prefetch 2 chunks ahead (crosses groups)
    {"BN": 32, "AHEAD": 1, "num_warps": 4},
    {"BN": 64, "AHEAD": 1, "num_warps": 4, "PAIR": False, "COPIES": 1, "SH0": 2, "BIG": False},
    {"BN": 64, "AHEAD": 2, "num_warps": 4, "PAIR": True, "COPIES": 4, "SH0": 4, "BIG": True},  # lane copies
]


@needs_triton
@pytest.mark.parametrize("cfg", GEMV_CONFIGS)
def test_gemv_variants(cfg):
    """Tile sizes, chunk prefetch distance and table variants (pair / single, copies).

    The pair table holds fp16 values, so it is checked with bf16 activations."""
    dtype = torch.bfloat16 if cfg.get("PAIR") else torch.float32
    check(37, 600, 4, 32, 1, dtype, path="gemv", config=dict(cfg), seed=17)
    if cfg.get("PAIR") is not True:
        check(21, 600, 3, 64, 3, torch.float32, path="gemv", config=dict(cfg), seed=18)


def test_pair_table_only_for_16bit_activations():
    """The fp16 pair table serves bf16/fp16 activations of 4-bit weights whose table fits fp16."""
    codes, lut, scales = make_weight(8, 512, 4, 64, seed=5)
    p = pack_lut_weight(codes, lut, scales, 4, 64)
    meta = {dt: LL._table_meta(p, "gemv", False, dt) for dt in (torch.bfloat16, torch.float16, torch.float32)}
    assert meta[torch.bfloat16]["PAIR"] and meta[torch.float16]["PAIR"] and not meta[torch.float32]["PAIR"]
    assert meta[torch.bfloat16]["COPIES"] * 4 == 1 << meta[torch.bfloat16]["SH0"]  # one 32-bit word per copy
    for factor in (1e5, 1e-6):  # beyond fp16's largest / below its smallest normal value
        far = pack_lut_weight(codes, lut * factor, scales, 4, 64)
        assert not LL._table_meta(far, "gemv", False, torch.bfloat16)["PAIR"]
    assert not LL._table_meta(p, "gemm", False, torch.bfloat16)["PAIR"]


@needs_triton
def test_pair_table_rounds_values_to_fp16():
    """bf16 activations on the pair path compute with the fp16-rounded table: bitwise the single
    fp32-table path on a table rounded to fp16 beforehand, and within bf16 tolerance of float64."""
    n, k, block = 40, 1024, 64
    codes, lut, scales = make_weight(n, k, 4, block, seed=41)
    lut = lut + 1e-3 * torch.rand(16, generator=torch.Generator().manual_seed(3))  # not fp16-exact
    p = pack_lut_weight(codes, lut, scales, 4, block)
    p16 = pack_lut_weight(codes, lut.half().float(), scales, 4, block)
    assert LL._table_meta(p, "gemv", False, torch.bfloat16)["PAIR"]
    single = {**LL.GEMV_DEFAULT, "PAIR": False, "COPIES": 1, "SH0": 2, "BIG": False}
    for seed in range(3):
        x = torch.randn(2, k, generator=torch.Generator().manual_seed(42 + seed)).bfloat16()[:1]
        y = lut_linear(x, p, path="gemv")
        assert torch.equal(y, lut_linear(x, p16, path="gemv", config=dict(single)))
        ref = lut_linear_reference(x.double(), codes, lut.double(), scales.double(), block)
        assert rel_err(y, ref) < TOL[torch.bfloat16]
        # one group per program (split-K 2): the pair table's set-up would not pay off, so the
        # fp32 single table serves it, bitwise
        y2 = lut_linear(x, p, path="gemv", split_k=2)
        assert torch.equal(y2, lut_linear(x, p, path="gemv", split_k=2, config=dict(single)))


def test_activations_in_shared_memory_only_where_they_fit():
    """XS (bf16 activations staged in a fixed 8 KB shared array) is chosen for compiled launches
    of one row of bf16 activations whose K range per program fits; everything else reads x from
    global memory (XS itself runs only on a GPU: benchmarks/kernels.py checks it there)."""
    if not HAS_TRITON:
        pytest.skip("triton not installed")

    def xs(k, dtype=torch.bfloat16, m=1, split_k=None):
        codes, lut, scales = make_weight(4, k, 4, 64, seed=9)
        p = pack_lut_weight(codes, lut, scales, 4, 64)
        x = torch.zeros(m, k, dtype=dtype)
        return LL._prepare("gemv", x, p, split_k, None, False)[5]["XS"]

    assert LL.GEMV_X_SMEM and xs(LL.X_SMEM_VALUES) and xs(1000)
    assert not xs(LL.X_SMEM_VALUES + 512)  # one program would cover more than the array holds
    assert xs(LL.X_SMEM_VALUES + 512, split_k=2)  # two K slices do fit
    assert not xs(1000, torch.float16) and not xs(1000, torch.float32) and not xs(1000, m=2)


GEMM_CONFIGS = [
    {"BM": 16, "BN": 32, "J": 1, "num_warps": 4},  # K step 16 < scale block
    {"BM": 16, "BN": 32, "J": 4, "num_warps": 4},
    {"BM": 16, "BN": 32, "J": 8, "num_warps": 4},  # one whole 4-bit chunk per step
    {"BM": 32, "BN": 64, "J": 2, "num_warps": 4, "SUBDOT": False},  # one dot per step
]


@needs_triton
@pytest.mark.parametrize("cfg", GEMM_CONFIGS)
def test_gemm_variants(cfg):
    check(37, 600, 4, 32, 9, torch.float32, path="gemm", config=dict(cfg), seed=19)
    check(37, 600, 4, 16, 9, torch.float32, path="gemm", config=dict(cfg), seed=20)  # several scales/step
    if cfg["J"] <= 4:
        check(37, 600, 8, 64, 9, torch.float32, path="gemm", config=dict(cfg), seed=21)


@needs_triton
@pytest.mark.parametrize("bits", ALL_BITS)
def test_gemm_default_configs_every_width(bits):
    """The fixed default GEMM configs (no autotuner to prune them) hold for every code width:
    an 8-bit chunk has 4 sub-slots, fewer than the default K step of 8 (found on the H100)."""
    check(33, 1100, bits, 128, 16, torch.bfloat16, path="gemm", seed=60 + bits)
    check(33, 1100, bits, 64, 40, torch.bfloat16, path="gemm", seed=70 + bits)


@needs_triton
def test_dequant_scratch_reuse():
    """The scratch buffer grows to the largest layer and is shared; results stay exact."""
    LL._SCRATCH.clear()
    small = check(11, 100, 4, 32, 3, torch.float32, path="dequant", seed=31)
    large = check(50, 1300, 4, 64, 3, torch.float32, path="dequant", seed=32)
    again = check(11, 100, 4, 32, 3, torch.float32, path="dequant", seed=31)
    assert small == again and large < TOL[torch.float32]
    assert len(LL._SCRATCH) == 1 and next(iter(LL._SCRATCH.values())).numel() == 50 * 1300


class _FakeCompiled:
    """Stands in for Triton's CompiledKernel: its launcher runs the interpreted kernel."""

    function, packed_metadata = 0, None

    def __init__(self, interp, names):
        self.interp, self.names, self.launches = interp, names, 0

    def run(self, g0, g1, g2, stream, function, packed_metadata, launch_metadata, enter, exit_, *args):
        assert len(args) == len(self.names)
        self.launches += 1
        kw = dict(zip(self.names, args))
        kw.pop("num_warps", None)
        self.interp[(g0, g1, g2)](**kw)


class _FakeKernel:
    """Stands in for a jitted kernel: normal launches run the interpreted kernel."""

    def __init__(self, interp, path):
        self.interp, self.path, self.compiled = interp, path, None

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.interp[grid](*args, **kwargs)
            self.compiled = self.compiled or _FakeCompiled(self.interp, LL._param_names(self.path))
            return self.compiled

        return call


@needs_triton
@pytest.mark.parametrize("path,m,split", [("gemv", 1, None), ("gemv", 3, 2), ("gemm", 5, 2)])
def test_direct_launch_record(monkeypatch, path, m, split):
    """Eager calls replay a cached launch record through the launcher: its argument order
    must match the kernel signature (checked by running it and comparing)."""
    interp, _ = LL._kernels(True)
    fake = {name: _FakeKernel(k, name) for name, k in interp.items()}
    monkeypatch.setattr(LL, "_kernels", lambda interpret, tune=True: (fake, False))
    monkeypatch.setattr(LL, "_ASM_LUT_MODE", 0)  # table reads the interpreter can run
    monkeypatch.setattr(LL, "_current_stream", lambda device: 0)
    monkeypatch.setattr(LL, "_FAST_CHECKED", {})
    codes, lut, scales = make_weight(40, 600, 4, 64, seed=41)
    p = pack_lut_weight(codes, lut, scales, 4, 64)
    for i in range(3):
        x = torch.randn(m, 600, generator=torch.Generator().manual_seed(50 + i))
        y = LL._run_fused(path, x, p, split, None, False)  # as on a GPU: compiled, not interpreted
        ref = lut_linear_reference(x.double(), codes, lut.double(), scales.double(), 64)
        assert rel_err(y, ref) < 1e-5
    assert {path: True} == LL._FAST_CHECKED
    assert len(p._launch_cache) == 1
    assert fake[path].compiled.launches == 3  # the check after call 1, then calls 2 and 3


@needs_triton
def test_gemm_smem_table_fallback(monkeypatch):
    """A launch failure of the GEMM with its table in shared memory switches to global."""
    seen = []

    class Failing:
        def __getitem__(self, grid):
            def call(*args, **kwargs):
                seen.append(kwargs["LMODE"])
                if kwargs["LMODE"] == 2:
                    raise RuntimeError("Triton Error [CUDA]: invalid argument")
                return None

            return call

    monkeypatch.setattr(LL, "_kernels", lambda interpret, tune=True: ({"gemm": Failing()}, False))
    monkeypatch.setattr(LL, "_GEMM_SMEM_LUT", True)
    monkeypatch.setattr(LL, "_ASM_LUT_MODE", 2)
    codes, lut, scales = make_weight(8, 64, 4, 32)
    p = pack_lut_weight(codes, lut, scales, 4, 32)
    LL._run_fused("gemm", torch.randn(5, 64), p, None, None, False)
    assert seen == [2, 1] and LL._GEMM_SMEM_LUT is False


def test_torch_fallback_without_interpreter(monkeypatch):
    codes, lut, scales = make_weight(11, 90, 4, 32, seed=21)
    p = pack_lut_weight(codes, lut, scales, 4, 32)
    x = torch.randn(3, 90)
    ref = lut_linear_reference(x, codes, lut, scales, 32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors, no interpreter: torch path
    y = lut_linear(x, p)
    assert rel_err(y, ref) < 1e-6
    assert rel_err(lut_linear(x, p, path="torch"), ref) < 1e-6
    assert lut_linear(torch.randn(0, 90), p).shape == (0, 11)


@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_forced_config_bypasses_the_autotuner(monkeypatch, path):
    """With autotuning on, a forced config must go to the plain kernel: Triton's autotuner
    refuses tuned names passed as arguments (found on the H100, invisible in the interpreter)."""
    from triton.runtime.autotuner import Autotuner

    monkeypatch.setenv("HF_OPTQUANT_AUTOTUNE", "1")
    packed = pack_lut_weight(*make_weight(64, 512, 4, 64), 4, 64)
    x = torch.randn(1 if path == "gemv" else 16, 512)
    cfg = {"BN": 64, "AHEAD": 1, "num_warps": 4} if path == "gemv" else {"BM": 16, "BN": 64, "J": 2, "num_warps": 4}
    kern, tuned, *_ = LL._prepare(path, x, packed, None, dict(cfg), False)
    assert not tuned and not isinstance(kern, Autotuner)
    kern, tuned, *_ = LL._prepare(path, x, packed, None, None, False)
    assert tuned and isinstance(kern, Autotuner)
