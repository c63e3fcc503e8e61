"""Choosing the code table (alphabet + frequencies) for a tensor of grid indices.

The direct range trades table size and 12-bit frequency granularity against escape cost:
every direct entry costs 16 table bits and every occurring one at least 1/4096 of the
probability mass, which is expensive for tail values rarer than ~1/4096. We evaluate the exact
coded size (payload + raw escape bits + table) of a few dozen candidate ranges, namely the
ranges spanned by all values whose count is at least a threshold (thresholds on a sqrt(2)
grid), and keep the cheapest. Counting uses one ``bincount`` over a window of at most ``2**20``
values around the median (on the symbols' device); values outside the window are always
escaped. ``window`` restricts the direct range further (row-structured input keeps it inside
``layout.GPU_WINDOW``, the values a GPU decode table holds) and charges every escaped symbol
``GPU_ESCAPE_BITS`` more: a GPU keeps escaped weights in a correction list (8 bytes each), so
for such input a slightly wider direct range is the smaller layout overall (measured on
Student-t(5) indices at 3.5 b/sym: +0.005 b/sym stored, 35x fewer escapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .alphabet import Alphabet, bit_length_u64
from .frequencies import coded_bits, quantise_counts
from .layout import INT64_MAX, MAX_BUCKETS, MAX_DIRECT, PROB_SCALE

WINDOW = 1 << 20
TABLE_ENTRY_BITS = 16
GPU_ESCAPE_BITS = 48


@dataclass(frozen=True)
class CodeTable:
    """An alphabet, its exact symbol counts for the data, and the chosen frequencies."""

    alphabet: Alphabet
    counts: np.ndarray
    freqs: np.ndarray
    raw_bits: int
    """Total raw escape bits the data needs under this alphabet."""

    @property
    def payload_bits(self) -> float:
        """Ideal rANS payload plus the raw escape bits."""
        return coded_bits(self.counts, self.freqs) + self.raw_bits

    @property
    def table_bits(self) -> int:
        return TABLE_ENTRY_BITS * self.alphabet.size


@dataclass(frozen=True)
class _Histogram:
    """Counts of values ``base + i`` for ``i < len(counts)``, plus the values outside."""

    base: int
    counts: np.ndarray
    prefix: np.ndarray
    outliers: np.ndarray


def _histogram(values: torch.Tensor) -> _Histogram:
    vmin, vmax = int(values.min()), int(values.max())
    if vmax - vmin < WINDOW:
        base = vmin
        counts = torch.bincount(values - vmin).cpu().numpy()
        outliers = np.zeros(0, dtype=np.int64)
    else:
        centre = int(values.kthvalue(values.numel() // 2 + 1).values)
        base = min(max(vmin, centre - WINDOW // 2), INT64_MAX - WINDOW + 1)
        mask = (values >= base) & (values < base + WINDOW)
        counts = torch.bincount(values[mask] - base, minlength=1).cpu().numpy()
        outliers = values[~mask].cpu().numpy()
    counts = counts.astype(np.int64)
    return _Histogram(base, counts, np.concatenate([[0], np.cumsum(counts)]), outliers.astype(np.int64))


def _side_buckets(prefix: np.ndarray, start: int, step: int, out_e: np.ndarray) -> np.ndarray:
    """Bucket counts for histogram bins at distance >= 1 from ``start`` going ``step``.

    ``prefix`` is the cumulative histogram; ``out_e`` are distances of outliers (uint64).
    """
    n_bins = prefix.size - 1
    room = (n_bins - 1 - start) if step > 0 else start
    counts = np.zeros(MAX_BUCKETS, dtype=np.int64)
    b = 0
    while b < MAX_BUCKETS and (1 << b) <= room:
        d0, d1 = 1 << b, min(1 << (b + 1), room + 1)
        if step > 0:
            counts[b] = prefix[start + d1] - prefix[start + d0]
        else:
            counts[b] = prefix[start - d0 + 1] - prefix[start - d1 + 1]
        b += 1
    if out_e.size:
        counts += np.bincount(bit_length_u64(out_e) - 1, minlength=MAX_BUCKETS)
    return counts


def _trim(counts: np.ndarray) -> np.ndarray:
    nz = np.flatnonzero(counts)
    return counts[: nz[-1] + 1] if nz.size else counts[:0]


def _candidate(hist: _Histogram, i: int, j: int) -> CodeTable | None:
    """Exact table for the direct range ``base + i .. base + j`` (``j = i - 1``: none)."""
    lo = hist.base + i
    hi = lo + (j - i)
    out = hist.outliers
    above = out >= lo if j < i else out > hi
    with np.errstate(over="ignore"):
        out_hi = out[above].view(np.uint64) - np.uint64(hi % (1 << 64))
        out_lo = np.uint64(lo % (1 << 64)) - out[~above].view(np.uint64)
    hi_b = _trim(_side_buckets(hist.prefix, j, +1, out_hi))
    lo_b = _trim(_side_buckets(hist.prefix, i, -1, out_lo))
    counts = np.concatenate([hist.counts[i : j + 1], hi_b, lo_b])
    if np.count_nonzero(counts) > PROB_SCALE:
        return None
    alphabet = Alphabet(lo, j - i + 1, hi_b.size, lo_b.size)
    if alphabet.size < 2:  # every frequency must stay below 4096: add an unused bucket
        alphabet = Alphabet(lo, alphabet.num_direct, alphabet.num_hi_buckets + 1, alphabet.num_lo_buckets)
        counts = np.concatenate([counts[: alphabet.num_direct + alphabet.num_hi_buckets - 1], [0],
                                 counts[alphabet.num_direct + alphabet.num_hi_buckets - 1 :]])
    raw = int((hi_b * np.arange(hi_b.size)).sum() + (lo_b * np.arange(lo_b.size)).sum())
    return CodeTable(alphabet, counts, _quantise(counts), raw)


def _quantise(counts: np.ndarray) -> np.ndarray:
    """Rate-optimal frequencies; if one entry holds all the mass, another gets frequency 1."""
    pseudo = counts.astype(np.float64)
    if np.count_nonzero(pseudo) == 1:
        pseudo[int(np.flatnonzero(pseudo == 0)[0])] = 1e-9
    return quantise_counts(pseudo)


def _total_bits(table: CodeTable, escape_penalty: float = 0.0) -> float:
    escapes = int(table.counts[table.alphabet.num_direct :].sum())
    return table.payload_bits + table.table_bits + escape_penalty * escapes


def candidate_ranges(counts: np.ndarray, allowed: tuple[int, int]) -> list[tuple[int, int]]:
    """Direct ranges ``(i, j)`` spanned by bins with count >= t (t on a sqrt(2) grid) among the
    allowed bins ``a..b``; ``[(i, i - 1)]`` (no direct values) if none of them is occupied."""
    a, b = allowed
    if a > b or counts[a : b + 1].max() == 0:
        mid = min(max(a, 0), counts.size)
        return [(mid, mid - 1)]
    window = counts[a : b + 1]
    peak = a + int(window.argmax())
    ranges = {(peak, peak)}
    t = 1.0
    while t <= window.max():
        idx = a + np.flatnonzero(window >= t)
        if idx[-1] - idx[0] < MAX_DIRECT:
            ranges.add((int(idx[0]), int(idx[-1])))
        t *= np.sqrt(2.0)
    return sorted(ranges)


def build_code_table(values: torch.Tensor, window: tuple[int, int] | None = None) -> CodeTable:
    """The cheapest candidate code table for int64 ``values`` (see module docstring)."""
    values = values.reshape(-1).to(torch.int64)
    if values.numel() == 0:
        return CodeTable(Alphabet(0, 0), np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
    hist = _histogram(values)
    allowed = (0, hist.counts.size - 1)
    if window is not None:
        allowed = (max(0, window[0] - hist.base), min(hist.counts.size - 1, window[1] - hist.base))
    penalty = 0.0 if window is None else GPU_ESCAPE_BITS
    best: CodeTable | None = None
    for i, j in candidate_ranges(hist.counts, allowed):
        table = _candidate(hist, i, j)
        if table is not None and (best is None or _total_bits(table, penalty) < _total_bits(best, penalty)):
            best = table
    assert best is not None  # the single-peak range is always feasible (<= 257 symbols)
    return best
