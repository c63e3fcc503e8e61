"""Tests for the grid (entropy-coded) kernels: Triton in its interpreter (CPU, TRITON_INTERPRET=1).

References are independent of the kernels: the stored stream's own CPU decoder
(``hf_optquant.coding.decode_symbols``, bit-exact indices), the format's torch decode
(``TensorFormat.decode``, bit-exact weights) and float64 matmuls. Inputs are random, seeded per
test from the test id; shapes are small and odd (rows not a multiple of 32, 3 lanes per row, a
short last lane) so every masked path runs.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch

from hf_optquant.coding import CorruptStreamError, decode_symbols, encode_symbols
from hf_optquant.formats import TensorFormat
from hf_optquant.formats.block import Scaling
from hf_optquant.formats.grid import GridElement
from hf_optquant.formats.sparse import SparseOutliers
from hf_optquant.kernels import grid_linear as G
from hf_optquant.kernels.grid_reference import decode_reference

pytestmark = pytest.mark.skipif(not G.HAS_TRITON, reason="needs triton (its interpreter)")


@pytest.fixture
def rng(request) -> np.random.Generator:
    base = int(os.environ.get("HF_OPTQUANT_TEST_SEED", "0"))
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()) ^ base)


def _indices(rng: np.random.Generator, n: int, k: int, scale: float = 2.5) -> np.ndarray:
    q = np.round(rng.standard_t(5, (n, k)) * scale).astype(np.int64)
    q.reshape(-1)[rng.choice(n * k, 3, replace=False)] = [300, -1000, 90]  # escapes and a rare value
    return q


def _packed(rng, n: int, k: int, seg: int, scales: torch.Tensor | None = None, scale: float = 2.5):
    q = _indices(rng, n, k, scale)
    stream = encode_symbols(torch.from_numpy(q), chunk_size=seg, row_length=k)
    if scales is None:
        scales = torch.from_numpy(rng.uniform(0.5, 2.0, n)).float()
    step = float(rng.uniform(0.01, 0.05))
    return q, stream, G.pack_grid_stream(stream.tensors, scales, step, (n, k), torch.float32)


def _weights(q: np.ndarray, scales: torch.Tensor, step: float) -> torch.Tensor:
    """The format's dequantisation, written out: float32(float32(q * step) * scale)."""
    vals = (torch.from_numpy(q).double() * step).float()
    return vals * (scales.reshape(-1, 1) if scales.numel() > 1 else scales)


@pytest.mark.parametrize(("n", "k", "seg"), [(40, 72, 24), (33, 96, 32), (7, 50, 50)])
def test_index_and_dense_decode_are_bit_exact(rng, n: int, k: int, seg: int) -> None:
    q, stream, packed = _packed(rng, n, k, seg)
    assert packed.segments == -(-k // seg) and packed.num_escapes >= 2
    assert torch.equal(decode_symbols(stream).reshape(n, k), torch.from_numpy(q))  # the CPU reference
    h = stream.header
    alpha = G._decode(packed, G.MODE_INDEX, torch.int16).long()
    direct = (torch.from_numpy(q) >= h.lo) & (torch.from_numpy(q) < h.lo + h.num_direct)
    assert torch.equal(alpha[direct], torch.from_numpy(q)[direct] - h.lo)
    assert bool((alpha[~direct] >= h.num_direct).all())
    assert packed.esc_val.tolist() == torch.from_numpy(q)[~direct].tolist()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = G.decode_grid_weight(packed, dtype)
        assert w.dtype == dtype and torch.equal(w, _weights(q, packed.scales, packed.step).to(dtype))


def test_format_round_trip_through_the_kernel(rng) -> None:
    """TensorFormat.encode -> pack_grid_weight -> dense decode equals TensorFormat.decode bit for bit."""
    w = torch.from_numpy(rng.standard_t(5, (45, 128))).float() * 0.02
    w[3, 7] = 4.0  # far outlier: index ~ 11 rms / step beyond 127, an escape
    fmt = TensorFormat(GridElement(0.05), Scaling("channel", 64, "rms", "bf16"))
    encoded = fmt.encode(w.to(torch.bfloat16))
    packed = G.pack_grid_weight(encoded)
    assert packed.dtype == torch.bfloat16 and packed.num_escapes >= 1
    assert torch.equal(G.decode_grid_weight(packed), fmt.decode(encoded))
    as_f32 = fmt.dequantise_parts(fmt.decode_parts(encoded), (45, 128), torch.float32)
    assert torch.equal(G.decode_grid_weight(packed, torch.float32), as_f32)
    tensor_fmt = TensorFormat(GridElement(0.3), Scaling("tensor", 64, "rms", "fp32"))
    enc_t = tensor_fmt.encode(w)
    assert torch.equal(G.decode_grid_weight(G.pack_grid_weight(enc_t)), tensor_fmt.decode(enc_t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 6])
def test_fused_gemv_matches_float64_reference(rng, dtype: torch.dtype, m: int) -> None:
    q, _, packed = _packed(rng, 37, 96, 32)
    x = torch.from_numpy(rng.standard_normal((m, 96))).to(dtype)
    ref = x.double() @ _weights(q, packed.scales, packed.step).double().T
    y = G.grid_linear(x, packed, path="gemv")
    assert y.dtype == dtype and y.shape == (m, 37)
    # fp32: the kernel accumulates (value + 128) * x and removes 128 * sum(x) at the end (one
    # instruction less per weight), which costs ~1e-4 of relative precision; bf16/fp16 outputs round at ~4e-3
    tol = 3e-4 if dtype == torch.float32 else 1e-2
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol
    y3 = G.grid_linear(x.reshape(m, 1, 96), packed)  # leading dimensions, default path
    assert y3.shape == (m, 1, 37) and ((y3.reshape(m, 37).double() - ref).norm() / ref.norm()).item() < tol


def test_dense_and_torch_paths_agree(rng) -> None:
    q, _, packed = _packed(rng, 40, 72, 24, scales=torch.tensor([0.7]))
    x = torch.from_numpy(rng.standard_normal((5, 72))).float()
    ref = x.double() @ _weights(q, packed.scales, packed.step).double().T
    for path in ("dense", "torch", "gemv"):
        y = G.grid_linear(x, packed, path=path)
        assert ((y.double() - ref).norm() / ref.norm()).item() < 3e-4, path


def test_low_entropy_lanes_and_constant_weights(rng) -> None:
    """Lanes that read late (tail_ext entries) or never, and an all-zero weight."""
    q = np.round(rng.standard_t(5, (40, 64)) * 0.6).astype(np.int64)
    stream = encode_symbols(torch.from_numpy(q), chunk_size=64, row_length=64)
    assert stream.header.num_tail_ext > 0
    packed = G.pack_grid_stream(stream.tensors, torch.ones(40), 0.5, (40, 64), torch.float32)
    assert bool((packed.last[: 40] >= 0).all()) and bool((packed.last[40:64] == -1).all())  # padding rows
    assert torch.equal(G.decode_grid_weight(packed), _weights(q, packed.scales, 0.5))
    x = torch.from_numpy(rng.standard_normal((2, 64))).float()
    ref = x.double() @ torch.from_numpy(q).double().T * 0.5
    assert ((G.grid_linear(x, packed).double() - ref).norm() / ref.norm()).item() < 3e-4
    zero = torch.zeros((33, 40), dtype=torch.int64)
    zs = encode_symbols(zero, chunk_size=16, row_length=40)
    zp = G.pack_grid_stream(zs.tensors, torch.ones(1), 0.1, (33, 40), torch.float32)
    assert torch.equal(G.decode_grid_weight(zp), torch.zeros(33, 40))
    assert torch.equal(G.grid_linear(torch.ones(1, 40), zp), torch.zeros(1, 33))


def test_torch_reference_decoder_matches(rng) -> None:
    q, stream, packed = _packed(rng, 40, 72, 24)
    index, w = decode_reference(packed)
    h = stream.header
    qt = torch.from_numpy(q)
    direct = (qt >= h.lo) & (qt < h.lo + h.num_direct)
    assert torch.equal(index[direct], qt[direct] - h.lo) and bool((index[~direct] >= h.num_direct).all())
    assert torch.equal(w[direct], _weights(q, packed.scales, packed.step)[direct])
    assert bool((w[~direct] == 0).all())  # escaped weights come from the correction list


def test_packed_size_stays_close_to_the_encoded_size(rng) -> None:
    """The rANS GPU form: the stored stream re-coded with more, shorter lanes, plus fixed tables."""
    w = torch.from_numpy(rng.standard_t(5, (256, 512))).float()
    fmt = TensorFormat(GridElement(0.4), Scaling("channel", 64, "rms", "bf16"))
    encoded = fmt.encode(w)
    packed = G.pack_grid_weight(encoded, layout="rans")
    stored = encoded.nbits // 8
    lanes = packed.states.numel()
    fixed = 4096 * 4 + 4096 * 2 + 256 * 4  # slot table, slot symbols, value table
    # per lane: the stored 32-bit state and ~16 more bits of rANS flush/start-up, plus a 32-bit last-read step
    assert packed.nbytes <= stored + fixed + 10 * lanes + 16 * packed.num_escapes + 256
    assert packed.to("cpu").nbytes == packed.nbytes
    assert packed.seg == 256 and packed.segments == 2  # gpu_segment: small tensor, short lanes


def test_transcoding_keeps_a_row_coded_stream(rng) -> None:
    q = _indices(rng, 40, 72)
    row_coded = encode_symbols(torch.from_numpy(q), chunk_size=24, row_length=72)
    fmt = TensorFormat(GridElement(0.02), Scaling("tensor", 64, "rms", "fp32"))
    enc = type(fmt.encode(torch.ones(40, 72)))(fmt, (40, 72), torch.float32, {
        "scales": torch.tensor([[1.5]]), **{f"codes.{k}": v for k, v in row_coded.tensors.items()}})
    packed = G.pack_grid_weight(enc, layout="rans")
    assert packed.seg == 24 and torch.equal(packed.payload[: row_coded.tensors["payload"].numel()],
                                           row_coded.tensors["payload"])
    assert torch.equal(G.decode_grid_weight(packed), fmt.decode(enc))
    other = G.pack_grid_weight(enc, chunk_size=36, layout="rans")  # asked for another lane length: transcoded
    assert other.seg == 36 and torch.equal(G.decode_grid_weight(other), fmt.decode(enc))


def test_kernel_decodes_the_stored_layout_for_transcoding(rng) -> None:
    """On a GPU, transcoding decodes the stored stream (rows of one lane) with the kernel itself."""
    q = _indices(rng, 40, 96)
    stored = encode_symbols(torch.from_numpy(q), chunk_size=64)  # the stored layout: 60 lanes of 64
    h = stored.header
    got = G._stream_indices(stored.tensors, h, torch.device("cpu"), kernel=True)
    assert torch.equal(got.long(), torch.from_numpy(q).reshape(-1))


def test_rejects_what_it_cannot_run(rng) -> None:
    w = torch.from_numpy(rng.standard_normal((64, 64))).float()
    block = TensorFormat(GridElement(0.3), Scaling("block", 32, "rms", "bf16"))
    sparse = TensorFormat(GridElement(0.3), Scaling("channel", 64, "rms", "bf16"), sparse=SparseOutliers(0.01))
    assert not G.grid_supported(block) and not G.grid_supported(sparse)
    with pytest.raises(ValueError, match="grid kernels need"):
        G.pack_grid_weight(block.encode(w))
    flat = encode_symbols(torch.zeros(64 * 64, dtype=torch.int64))  # 1-D coded: no row structure
    with pytest.raises(ValueError, match="rows"):
        G.pack_grid_stream(flat.tensors, torch.ones(64), 0.1, (64, 64))
    wide = encode_symbols(torch.zeros((4, 4096), dtype=torch.int64), chunk_size=64, row_length=4096)  # 64 lanes
    with pytest.raises(ValueError, match="lanes per row"):
        G.pack_grid_stream(wide.tensors, torch.ones(4), 0.1, (4, 4096))
    fmt = TensorFormat(GridElement(0.3), Scaling("channel", 64, "rms", "bf16"))
    encoded = fmt.encode(w)
    bad = dict(encoded.tensors)
    bad["codes.payload"] = bad["codes.payload"].clone()
    bad["codes.payload"][0] ^= 1
    with pytest.raises(CorruptStreamError, match="CRC32"):
        G.pack_grid_weight(type(encoded)(fmt, encoded.shape, encoded.dtype, bad))
    packed = G.pack_grid_weight(encoded)
    with pytest.raises(ValueError, match="features"):
        G.grid_linear(torch.ones(2, 63), packed)
    with pytest.raises(TypeError, match="bf16"):
        G.grid_linear(torch.ones(2, 64, dtype=torch.int32), packed)
    with pytest.raises(ValueError, match="path"):
        G.grid_linear(torch.ones(2, 64), packed, path="fast")


_COMPILE_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
import hf_optquant.kernels.grid_linear as G
fn = triton.runtime.jit.JITFunction(G._grid_kernel)
meta = dict(W=4, MODE=0, BM=1, XPACK=True, OPACK=False, ROW_SCALE=True, ASM=True, FULL=True, HAS_ESC=True,
            OBF16=False)
ptrs = dict(x_ptr="*bf16", out_ptr="*bf16", table_ptr="*i32", sym_ptr="*i16", vals_ptr="*fp32",
            states_ptr="*i32", last_ptr="*i32", gstart_ptr="*i32", payload_ptr="*i16", scale_ptr="*fp32",
            esc_off_ptr="*i32", esc_row_ptr="*i32", esc_col_ptr="*i32", esc_val_ptr="*i64")
sig = {**ptrs, **dict.fromkeys(["M", "N", "K", "S", "P", "last_word", "stride_xm", "stride_om"], "i32"),
       "step": "fp32", **dict.fromkeys(meta, "constexpr")}
try:
    k = triton.compile(triton.compiler.ASTSource(fn, sig, constexprs=meta), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=4, num_stages=1))
except Exception as exc:
    print(json.dumps({"error": str(exc)[-500:]}))
    sys.exit(0)
ttgir = k.asm["ttgir"]
layouts = dict(re.findall(r"^(#\w+) = (#ttg\.\w+<\{[^}]*\}>)", ttgir, re.M))
votes = re.findall(r'elementwise_inline_asm "[^"]*vote\.sync[^"]*".*?-> \(?tensor<(\d+)xi32, (#\w+)>', ttgir)
print(json.dumps({"votes": [[n, layouts.get(l, "")] for n, l in votes], "ptx_has_ballot":
                  "vote.sync.ballot.b32" in k.asm["ptx"], "ptx_has_table": "hfoq_grid_tbl" in k.asm["ptx"]}))
"""


def test_compiles_for_sm90_with_one_lane_per_thread() -> None:
    """Compile (no GPU needed; in a subprocess, outside Triton's interpreter) the GEMV for Hopper:
    ptxas accepts the inline PTX, and every warp ballot sees one rANS lane per thread -- the
    layout the encoder's word order assumes."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                         cwd=root, timeout=300)  # fmt: skip
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("{")]
    assert lines, run.stderr[-2000:]
    out = json.loads(lines[-1])
    if "error" in out:
        pytest.skip(f"cannot compile for sm_90 here: {out['error'][:200]}")
    assert out["votes"] and out["ptx_has_ballot"] and out["ptx_has_table"]
    for size, layout in out["votes"]:
        assert size == "128"
        assert "sizePerThread = [1], threadsPerWarp = [32], warpsPerCTA = [4]" in layout, layout
