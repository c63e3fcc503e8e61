"""Tests for the pair-code GPU layout (hf_optquant.coding.pairs) and its tensor-core GEMV
(hf_optquant.kernels.pair_mma) in Triton's interpreter.

References are independent of the code under test: the input indices themselves (bit-exact round trip),
a canonical-code decoder written here bit by bit, Kraft's inequality, the format's dequantisation and
float64 matmuls. Inputs are random, seeded per test; shapes are small and odd (rows not a multiple of 16,
columns not a multiple of 64, a partial last chunk), with escapes (values beyond +-64 and rare pairs).
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch
from canonical_bits import decode_bits

from hf_optquant.coding.huffman import canonical_codes, kraft_sum
from hf_optquant.coding.pairs import (
    PAIRS_PER_GROUP,
    WINDOW_BITS,
    build_pair_code,
    decode_pair_lanes,
    encode_pair_lanes,
    entry_values,
    lane_pairs,
)
from hf_optquant.formats import TensorFormat
from hf_optquant.formats.block import Scaling
from hf_optquant.formats.grid import GridElement
from hf_optquant.kernels import grid_linear as G
from hf_optquant.kernels import pair_mma as PM
from hf_optquant.kernels import prefix_linear as PL

needs_triton = pytest.mark.skipif(not PM.HAS_TRITON, reason="needs triton (its interpreter)")


@pytest.fixture
def rng(request) -> np.random.Generator:
    base = int(os.environ.get("HF_OPTQUANT_TEST_SEED", "0"))
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()) ^ base)


def _indices(rng, n: int, k: int, step: float = 0.35, df: float = 4.0) -> torch.Tensor:
    idx = torch.from_numpy(np.round(rng.standard_t(df, (n, k)) / step)).long()
    idx[rng.integers(n), rng.integers(k)] = int(rng.integers(65, 30000))  # escaped: beyond the table's values
    idx[rng.integers(n), rng.integers(k)] = -int(rng.integers(65, 30000))
    return idx


def test_code_is_a_prefix_code_within_the_window(rng) -> None:
    code = build_pair_code(_indices(rng, 64, 512))
    assert 1 <= code.lengths.max() <= WINDOW_BITS and (code.lengths > 0).all()
    assert kraft_sum(code.lengths) <= 1.0 + 1e-12
    assert code.lengths[code.escape] > 0  # the escape always has a codeword
    assert (np.abs(code.pairs) <= 64).all() and len({tuple(p) for p in code.pairs}) == len(code.pairs)
    table, codes = code.table(), canonical_codes(code.lengths)
    for s in rng.choice(len(code.lengths), 20):  # the window starting with a codeword decodes to its symbol
        ln = int(code.lengths[s])
        e = int(table[int(codes[s]) << (WINDOW_BITS - ln)])
        assert e & 15 == ln
        want = code.pairs[s] if s < code.escape else (0, 0)
        assert ((e >> 8) & 255) - 64 == want[0] and ((e >> 16) & 255) - 64 == want[1]


@pytest.mark.parametrize("n,k,chunk", [(37, 208, 2), (16, 64, 1), (48, 400, 3)])
def test_lanes_round_trip_and_bitwise_decoding(rng, n, k, chunk) -> None:
    idx = _indices(rng, n, k)
    code = build_pair_code(idx)
    lanes = encode_pair_lanes(idx, code, chunk)
    n_chunks = -(-((k + 63) // 64) // chunk)
    units = -(-n // 16) * n_chunks
    # one lane decoded bit by bit with the canonical codes (independent of the table and decode_pair_lanes)
    u, lane = int(rng.integers(units)), int(rng.integers(32))
    counts = lanes.counts.long().view(units, 32)
    start = int(lanes.chunk_base[u]) + int(counts[u, :lane].sum())
    words = lanes.words[start : start + int(counts[u, lane])].long() & 0xFFFFFFFF
    bits = "".join(f"{int(w):032b}" for w in words)
    syms = decode_bits(bits, code.lengths, canonical_codes(code.lengths))
    pairs, _, ng, nch = lane_pairs(idx, chunk)
    pairs = pairs[u, lane]
    n_real = PAIRS_PER_GROUP * min(chunk, ng - (u % nch) * chunk)  # pairs of the real groups; then padding bits
    assert n_real <= len(syms) <= n_real + 31
    syms = syms[:n_real]
    for s, (a, b) in zip(syms, pairs[:n_real].tolist()):
        assert s == code.escape or tuple(code.pairs[s]) == (a, b)
    # the whole weight back through the kernels' reference path
    ent = decode_pair_lanes(lanes, torch.from_numpy(code.table()), units, chunk)
    assert ent.shape == (units, 32, chunk * PAIRS_PER_GROUP)
    assert (entry_values(ent)[0].abs() <= 64).all()
    p = PM.pack_pair_weight(idx, torch.ones(n), 1.0, chunk=chunk)
    assert torch.equal(PM.pair_reference_index(p), idx)
    assert p.num_escapes >= 2


def test_gpu_bits_close_to_the_entropy(rng) -> None:
    idx = torch.from_numpy(np.round(rng.standard_normal((256, 1024)) / 0.4)).long()
    p = PM.pack_pair_weight(idx, torch.ones(256), 1.0)
    counts = torch.bincount((idx - idx.min()).reshape(-1)).double()
    prob = counts[counts > 0] / idx.numel()
    entropy = float(-(prob * prob.log2()).sum())
    bpp = 8 * (p.nbytes - p.table.numel() * 4) / idx.numel()
    assert entropy < bpp < entropy + 0.25, (entropy, bpp)


@needs_triton
@pytest.mark.parametrize("n,k,m,chunk,config", [(37, 208, 1, 2, None), (64, 256, 3, None, {"NW": 2}),
                                                (40, 128, 9, 1, {"NW": 2, "KW": 1}), (32, 512, 2, 2, {"NW": 4}),
                                                (40, 640, 2, 2, {"NW": 2, "KW": 1}), (37, 208, 12, 1, {"NW": 2})])
def test_gemv_matches_float64(rng, monkeypatch, n, k, m, chunk, config) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    idx = _indices(rng, n, k)
    idx = idx.clamp(-20000, 20000)
    scales = torch.from_numpy(rng.uniform(0.5, 1.5, n)).float() if n != 64 else torch.tensor([0.7])
    step = float(rng.uniform(0.005, 0.02))
    p = PM.pack_pair_weight(idx, scales, step, chunk=chunk)
    w = idx.double() * step * (scales.double().reshape(-1, 1) if scales.numel() > 1 else scales.double())
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.from_numpy(rng.standard_normal((m, k))).to(dtype)
        ref = x.double() @ w.T
        y = PM.pair_linear(x, p, path="gemv", config=config)
        assert y.dtype == dtype and y.shape == (m, n)
        assert float((y.double() - ref).norm() / ref.norm()) < 1e-2
    y2 = PM.pair_linear(x, p, path="gemv", split_k=2, config=config)  # split-K partials summed in order
    assert float((y2.double() - ref).norm() / ref.norm()) < 1e-2


@needs_triton
@pytest.mark.parametrize("m,config", [(3, None), (9, {"NW": 2, "KW": 1})])
def test_gemv_with_many_escapes(rng, monkeypatch, m, config) -> None:
    """Escaped pairs summed by slot: > 32 per warp (several batches) and several in one row and batch row."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    n, k = 40, 256
    idx = torch.from_numpy(rng.integers(-3, 4, (n, k))).long()
    wild = torch.from_numpy(rng.random((n, k)) < 0.08)
    idx[wild] = torch.from_numpy(rng.integers(65, 900, int(wild.sum())) * rng.choice([-1, 1], int(wild.sum())))
    p = PM.pack_pair_weight(idx, torch.ones(n), 0.01, chunk=2)
    per_tile = (p.esc_off[1:] - p.esc_off[:-1]).view(-1, p.n_chunks).sum(1)
    assert p.esc_tile_max == int(per_tile.max()) > 32  # the kernel needs more than one batch of 32
    w = idx.double() * 0.01
    x = torch.from_numpy(rng.standard_normal((m, k))).to(torch.bfloat16)
    ref = x.double() @ w.T
    y = PM.pair_linear(x, p, path="gemv", config=config)
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2


@needs_triton
@pytest.mark.parametrize("n,k,chunk,channel", [(37, 208, 2, True), (40, 256, 1, False)])
def test_dense_decode_kernel_is_bit_exact(rng, monkeypatch, n, k, chunk, channel) -> None:
    """The decode kernel (interpreted) writes float32(index * step) * scale bit for bit, escapes included."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    idx = _indices(rng, n, k)
    wild = torch.from_numpy(rng.random((n, k)) < 0.03)
    idx[wild] = torch.from_numpy(rng.integers(65, 900, int(wild.sum())))
    scales = torch.from_numpy(rng.uniform(0.5, 1.5, n if channel else 1)).float()
    step = float(rng.uniform(0.005, 0.02))
    p = PM.pack_pair_weight(idx, scales, step, chunk=chunk)
    want = (idx.double() * step).float() * (scales.reshape(-1, 1) if channel else scales)
    for dtype in (torch.float32, torch.bfloat16):
        got = PM.decode_pair_weight(p, dtype)
        assert got.dtype == dtype and torch.equal(got, want.to(dtype))


@needs_triton
def test_grid_weight_in_the_pair_layout(rng, monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    w = torch.from_numpy(rng.standard_t(5, (40, 192))).float()
    fmt = TensorFormat(GridElement(0.3), Scaling("channel", 64, "rms", "bf16"))
    encoded = fmt.encode(w)
    packed = G.pack_grid_weight(encoded, layout="pairs")
    assert isinstance(packed, PM.PackedPairWeight)
    ref = fmt.decode(encoded).float()
    assert torch.equal(G.decode_grid_weight(packed, torch.float32), ref)
    x = torch.randn(2, 192).to(torch.bfloat16)
    y = G.grid_linear(x, packed)
    assert float((y.double() - x.double() @ ref.double().T).norm() / (x.double() @ ref.double().T).norm()) < 1e-2


def test_auto_layout_rule() -> None:
    """``layout="auto"``: pairs on a GPU for rows up to 4096 in-features (multiples of 16), else the prefix code."""
    assert G.layout_for(4096, "cuda") == "pairs" and G.layout_for(1024, torch.device("cuda", 0)) == "pairs"
    assert G.layout_for(14336, "cuda") == "prefix" and G.layout_for(4104, "cuda") == "prefix"
    assert G.layout_for(4088, "cuda") == "prefix"  # not a multiple of 16
    assert G.layout_for(4096, "cpu") == "prefix"
    fmt = TensorFormat(GridElement(0.3), Scaling("channel", 64, "rms", "bf16"))
    assert isinstance(G.pack_grid_weight(fmt.encode(torch.randn(16, 64)), layout="auto"), PL.PackedPrefixWeight)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        PM.pack_pair_weight(torch.zeros(4, 24, dtype=torch.long), torch.ones(4), 1.0)
    with pytest.raises(ValueError, match="integer"):
        PM.pack_pair_weight(torch.zeros(4, 32), torch.ones(4), 1.0)
    with pytest.raises(ValueError, match="int16"):
        PM.pack_pair_weight(torch.full((4, 32), 1 << 15, dtype=torch.long), torch.ones(4), 1.0)
    with pytest.raises(ValueError, match="scales"):
        PM.pack_pair_weight(torch.zeros(4, 32, dtype=torch.long), torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="chunk"):
        zeros = torch.zeros(4, 64, dtype=torch.long)
        encode_pair_lanes(zeros, build_pair_code(zeros), 0)
    p = PM.pack_pair_weight(torch.zeros(16, 64, dtype=torch.long), torch.ones(16), 1.0)
    with pytest.raises(ValueError, match="NW"):
        PM._plan(torch.zeros(1, 64, dtype=torch.bfloat16), p, torch.zeros(1, 16), True, None, {"NW": 3})
