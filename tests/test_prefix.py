"""Tests for the prefix-code GPU layout (hf_optquant.coding.prefix) and its Triton kernel
(hf_optquant.kernels.prefix_linear) in Triton's interpreter.

References are independent of the code under test: the input indices themselves (bit-exact round
trip), a canonical-Huffman decoder written here bit by bit, Kraft's equality, the format's
dequantisation written out, and float64 matmuls. Inputs are random, seeded per test; shapes are
small and odd (rows not a multiple of 32, several lanes per row, a short last lane).
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch
from canonical_bits import decode_bits

from hf_optquant.coding.huffman import kraft_sum
from hf_optquant.coding.layout import Geometry
from hf_optquant.coding.prefix import (
    PER_LOOKUP,
    WINDOW_BITS,
    PrefixCode,
    decode_prefix_lanes,
    encode_prefix_lanes,
    lookup_table,
)
from hf_optquant.formats import TensorFormat
from hf_optquant.formats.block import Scaling
from hf_optquant.formats.grid import GridElement
from hf_optquant.kernels import grid_linear as G
from hf_optquant.kernels import prefix_linear as PL


@pytest.fixture
def rng(request) -> np.random.Generator:
    base = int(os.environ.get("HF_OPTQUANT_TEST_SEED", "0"))
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()) ^ base)


def _symbols(rng, n: int, k: int, alphabet: int = 20) -> torch.Tensor:
    p = rng.dirichlet(np.full(alphabet, 0.7))
    return torch.from_numpy(rng.choice(alphabet, (n, k), p=p)).long()


def test_code_is_complete_and_length_limited(rng) -> None:
    counts = rng.integers(0, 10_000, 300) * (rng.random(300) < 0.7)
    counts[:3] = [1, 1, 1]
    code = PrefixCode.from_counts(counts)
    used = counts > 0
    assert np.all(code.lengths[used] >= 1) and np.all(code.lengths[used] <= WINDOW_BITS)
    assert np.all(code.lengths[~used] == 0)
    assert kraft_sum(code.lengths) == pytest.approx(1.0)
    # optimal among prefix codes: within 1 bit/symbol of the entropy (length limit is loose here)
    p = counts[used] / counts.sum()
    mean = float((p * code.lengths[used]).sum())
    assert -(p * np.log2(p)).sum() <= mean < -(p * np.log2(p)).sum() + 1


def test_lookup_table_matches_a_bitwise_decoder(rng) -> None:
    counts = rng.integers(1, 1000, 17)
    code = PrefixCode.from_counts(counts)
    table = lookup_table(code, np.arange(17) + 100)
    for w in rng.integers(0, 1 << WINDOW_BITS, 300):
        bits = format(int(w), f"0{WINDOW_BITS}b")
        ref = decode_bits(bits, code.lengths, code.codes, PER_LOOKUP)
        # the lookup keeps only codes that end inside the window
        used, ends = 0, 0
        for s in ref:
            if ends + code.lengths[s] > WINDOW_BITS:
                break
            ends += int(code.lengths[s])
            used += 1
        assert table.counts[w] == used and table.lengths[w] == ends
        assert list(table.symbols[w, :used]) == ref[:used]
        entry = int(table.entries[w]) & 0xFFFFFFFF
        assert entry >> 30 == used and (entry >> 24) & 31 == ends
        assert [(entry >> (8 * j)) & 255 for j in range(3)] == [100 + s for s in ref[:used]] + [128] * (3 - used)


@pytest.mark.parametrize(("n", "k", "seg"), [(40, 72, 24), (33, 96, 32), (7, 50, 50), (64, 130, 64)])
def test_lanes_round_trip_bit_exact(rng, n: int, k: int, seg: int) -> None:
    sym = _symbols(rng, n, k)
    counts = np.bincount(sym.reshape(-1).numpy(), minlength=20)
    code = PrefixCode.from_counts(counts)
    geometry = Geometry(n * k, k, seg)
    lanes = encode_prefix_lanes(sym.reshape(-1), code, geometry)
    table = lookup_table(code, np.zeros(20, np.int64))
    dec = decode_prefix_lanes(lanes.words, lanes.group_words, lanes.last, lanes.last_load,
                              lanes.block_iters(geometry), table, geometry)  # fmt: skip
    assert torch.equal(dec.index, sym.reshape(-1)) and dec.bad_groups.numel() == 0
    # the payload is exactly the codes: sum of code lengths, padded to whole 32-bit words per lane
    assert 32 * lanes.words.numel() >= code.coded_bits(counts)
    assert 32 * lanes.words.numel() < code.coded_bits(counts) + 32 * geometry.num_lanes


def test_first_lane_holds_its_codes_msb_first(rng) -> None:
    sym = _symbols(rng, 1, 40, alphabet=6)
    code = PrefixCode.from_counts(np.bincount(sym.reshape(-1).numpy(), minlength=6) + 1)
    lanes = encode_prefix_lanes(sym.reshape(-1), code, Geometry(40, 40, 40))
    bits = "".join(format(int(w), "032b") for w in lanes.words)  # one lane: load order == lane order
    assert decode_bits(bits, code.lengths, code.codes, 40) == sym.reshape(-1).tolist()


def test_corrupt_words_stay_bounded(rng) -> None:
    sym = _symbols(rng, 32, 64)
    code = PrefixCode.from_counts(np.bincount(sym.reshape(-1).numpy(), minlength=20))
    geometry = Geometry(32 * 64, 64, 32)
    lanes = encode_prefix_lanes(sym.reshape(-1), code, geometry)
    table = lookup_table(code, np.zeros(20, np.int64))
    bad_counts = lanes.group_words.clone()
    bad_counts[0] += 5
    dec = decode_prefix_lanes(torch.from_numpy(rng.integers(0, 2**32, lanes.words.numel())), bad_counts,
                              lanes.last, lanes.last_load, lanes.block_iters(geometry), table, geometry)  # fmt: skip
    assert dec.index.shape == sym.reshape(-1).shape and int(dec.index.max()) < 20
    assert dec.bad_groups.tolist() == [0]


def _weights(q: torch.Tensor, scales: torch.Tensor, step: float) -> torch.Tensor:
    """The format's dequantisation, written out: float32(float32(q * step) * scale)."""
    return (q.double() * step).float() * scales.reshape(-1, 1)


def _grid_indices(rng, n: int, k: int) -> torch.Tensor:
    q = torch.from_numpy(np.round(rng.standard_t(4, (n, k)) * 3)).long()
    q.view(-1)[torch.from_numpy(rng.choice(n * k, 3, replace=False))] = torch.tensor([300, -1000, 90])  # escapes
    return q


@pytest.mark.skipif(not PL.HAS_TRITON, reason="needs triton (its interpreter)")
@pytest.mark.parametrize(("n", "k", "seg", "m"), [(40, 72, 24, 1), (33, 100, 32, 3), (70, 64, 64, 5)])
def test_kernel_gemv_and_dense_match_references(rng, monkeypatch, n: int, k: int, seg: int, m: int) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = _grid_indices(rng, n, k)
    scales = torch.from_numpy(rng.uniform(0.5, 2.0, n)).float()
    step = float(rng.uniform(0.01, 0.05))
    packed = PL.pack_prefix_weight(q, scales, step, torch.float32, chunk_size=seg)
    assert packed.num_escapes >= 2
    w = _weights(q, scales, step)
    assert torch.equal(PL.decode_prefix_weight(packed, torch.float32), w)  # the kernel's dense mode
    index, _ = PL.decode_prefix_reference(packed)  # the torch lane decoder: alphabet indices
    assert index.shape == (n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
    ref = x.double() @ w.double().T
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        y = PL.prefix_linear(x.to(dtype), packed, path="gemv")
        ref_d = x.to(dtype).double() @ w.double().T
        assert y.dtype == dtype
        assert float((y.double() - ref_d).norm() / ref.norm()) < tol


@pytest.mark.skipif(not PL.HAS_TRITON, reason="needs triton (its interpreter)")
def test_runtime_default_is_the_prefix_layout(rng, monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    w = torch.from_numpy(rng.standard_t(5, (48, 96))).float()
    fmt = TensorFormat(GridElement(0.3), Scaling("channel", 64, "rms", "bf16"))
    encoded = fmt.encode(w)
    packed = G.pack_grid_weight(encoded)
    assert isinstance(packed, PL.PackedPrefixWeight)
    ref = fmt.decode(encoded)
    assert torch.equal(G.decode_grid_weight(packed, torch.float32), ref.float())
    x = torch.randn(2, 96)
    y = G.grid_linear(x, packed)
    assert torch.allclose(y.double(), x.double() @ ref.double().T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layout"):
        G.pack_grid_weight(encoded, layout="huffman")
