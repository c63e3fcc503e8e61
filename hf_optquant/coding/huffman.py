"""Length-limited Huffman code lengths and the exact stored size of a Huffman layout.

This is measurement tooling, not a shipped codec: the coder is rANS because a prefix code
pays ``>= 0.03`` b/sym of redundancy on uniform-grid indices (see benchmarks/coding.py).
To make that comparison fair we compute, exactly, what the equivalent Huffman format would
store: the same alphabet and stored escaped values, canonical code lengths limited to 12 bits
(a 4096-entry decode table, like rANS), 4 bits per table entry, chunks padded to 16-bit words
and a 16-bit word count per chunk. Sizes follow from the code lengths alone, so no
bitstream is needed to know them.
"""

from __future__ import annotations

import numpy as np
import torch

from .alphabet import map_values
from .layout import HEADER_LEN
from .table import build_code_table

MAX_CODE_LEN = 12
LENGTH_ENTRY_BITS = 4


def huffman_lengths(weights: np.ndarray, max_len: int = MAX_CODE_LEN) -> np.ndarray:
    """Optimal prefix-code lengths with every length <= ``max_len`` (package-merge).

    Zero weights get length 0. A single used symbol gets length 1.
    Package-merge: build ``max_len`` lists, each the sorted merge of the leaves with the
    pairwise "packages" of the previous list; the first ``2n - 2`` items of the last list,
    expanded down to leaves, give each symbol's length as its number of occurrences.
    """
    weights = np.asarray(weights, dtype=np.float64)
    lengths = np.zeros(weights.size, dtype=np.int64)
    used = np.flatnonzero(weights > 0)
    n = used.size
    if n == 0:
        return lengths
    if n == 1:
        lengths[used] = 1
        return lengths
    if n > (1 << max_len):
        raise ValueError(f"{n} symbols cannot have codes of at most {max_len} bits")
    order = used[np.argsort(weights[used], kind="stable")]
    leaves = [(float(weights[s]), -1, int(s)) for s in order]  # (weight, child_index, symbol)
    levels = [leaves]
    for _ in range(max_len - 1):
        prev = levels[-1]
        packages = [(prev[2 * k][0] + prev[2 * k + 1][0], 2 * k, -1) for k in range(len(prev) // 2)]
        levels.append(_merge(leaves, packages))
    take = np.zeros(len(levels[-1]), dtype=np.int64)
    take[: 2 * n - 2] = 1
    for level in range(len(levels) - 1, -1, -1):
        below = np.zeros(len(levels[level - 1]), dtype=np.int64) if level else None
        for (_, child, symbol), count in zip(levels[level], take):
            if count == 0:
                continue
            if child < 0:
                lengths[symbol] += count
            else:
                below[child] += count
                below[child + 1] += count
        take = below
    return lengths


def _merge(a: list, b: list) -> list:
    """Stable merge by weight, leaves (``a``) first on ties."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i][0] <= b[j][0]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    return out + a[i:] + b[j:]


def kraft_sum(lengths: np.ndarray) -> float:
    """``sum 2**-l`` over used symbols; a complete prefix code has exactly 1."""
    lengths = np.asarray(lengths)
    used = lengths[lengths > 0]
    return float(np.ldexp(1.0, -used).sum())


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codewords (as integers, MSB-first) for the given lengths; 0 where unused."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.int64)
    order = sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s))
    code, prev_len = 0, 0
    for s in order:
        code <<= int(lengths[s]) - prev_len
        codes[s] = code
        code += 1
        prev_len = int(lengths[s])
    return codes


def huffman_stored_bits(values: np.ndarray, chunk_size: int) -> int:
    """Exact stored size of the 12-bit-limited canonical Huffman layout described above."""
    values = np.asarray(values, dtype=np.int64).reshape(-1)
    num_chunks = -(-values.size // chunk_size)
    fixed = 64 * HEADER_LEN + 16 * num_chunks
    if values.size == 0:
        return fixed
    table = build_code_table(torch.from_numpy(values))
    lengths = huffman_lengths(table.counts)
    mapped = map_values(torch.from_numpy(values), table.alphabet)
    bits = lengths[mapped.index.numpy()]
    per_chunk = np.bincount(np.arange(values.size) // chunk_size, weights=bits)
    padded = 16 * np.ceil(per_chunk / 16.0)
    return int(fixed + LENGTH_ENTRY_BITS * table.alphabet.size + table.raw_bits + padded.sum())
