"""Choosing the code table (alphabet + frequencies) for a tensor of grid indices.

The direct range trades table size and 12-bit frequency granularity against escape cost:
every direct entry costs 16 table bits and every occurring one at least 1/4096 of the
probability mass, which is expensive for tail values rarer than ~1/4096. We evaluate the exact
coded size (payload + raw escape bits + table) of a few dozen candidate ranges, namely the
ranges spanned by all values whose count is at least a threshold (thresholds on a sqrt(2)
grid), and keep the cheapest. Counting uses one ``bincount`` over a window of at most
``2**20`` values around the median; values outside the window are always escaped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .alphabet import Alphabet, bit_length_u64
from .frequencies import coded_bits, quantise_counts
from .layout import INT64_MAX, MAX_BUCKETS, MAX_DIRECT, PROB_SCALE

WINDOW = 1 << 20
TABLE_ENTRY_BITS = 16


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
        """Ideal rANS payload: coded symbols plus raw escape bits."""
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


def _histogram(values: np.ndarray) -> _Histogram:
    vmin, vmax = int(values.min()), int(values.max())
    if vmax - vmin < WINDOW:
        base, inside, outliers = vmin, values, values[:0]
    else:
        centre = int(np.partition(values, values.size // 2)[values.size // 2])
        base = min(max(vmin, centre - WINDOW // 2), INT64_MAX - WINDOW + 1)
        mask = (values >= base) & (values < base + WINDOW)
        inside, outliers = values[mask], values[~mask]
    counts = np.bincount((inside - np.int64(base)).astype(np.int64))
    prefix = np.concatenate([[0], np.cumsum(counts)])
    return _Histogram(base, counts, prefix, outliers)


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
    """Exact table for the direct range ``base + i .. base + j`` (None if infeasible)."""
    lo, hi = hist.base + i, hist.base + j
    out = hist.outliers
    out_hi = out[out > hi].view(np.uint64) - np.uint64(hi % (1 << 64))
    out_lo = np.uint64(lo % (1 << 64)) - out[out < lo].view(np.uint64)
    hi_b = _trim(_side_buckets(hist.prefix, j, +1, out_hi))
    lo_b = _trim(_side_buckets(hist.prefix, i, -1, out_lo))
    counts = np.concatenate([hist.counts[i : j + 1], hi_b, lo_b])
    if np.count_nonzero(counts) > PROB_SCALE:
        return None
    alphabet = Alphabet(lo, j - i + 1, hi_b.size, lo_b.size)
    raw = int((hi_b * np.arange(hi_b.size)).sum() + (lo_b * np.arange(lo_b.size)).sum())
    return CodeTable(alphabet, counts, quantise_counts(counts), raw)


def _total_bits(table: CodeTable) -> float:
    return table.payload_bits + table.table_bits


def candidate_ranges(counts: np.ndarray) -> list[tuple[int, int]]:
    """Direct ranges ``(i, j)`` spanned by bins with count >= t, t on a sqrt(2) grid."""
    peak = int(counts.argmax())
    ranges = {(peak, peak)}
    t = 1.0
    while t <= counts.max():
        idx = np.flatnonzero(counts >= t)
        if idx[-1] - idx[0] < MAX_DIRECT:
            ranges.add((int(idx[0]), int(idx[-1])))
        t *= np.sqrt(2.0)
    return sorted(ranges)


def build_code_table(values: np.ndarray) -> CodeTable:
    """The cheapest candidate code table for int64 ``values`` (see module docstring)."""
    values = np.asarray(values, dtype=np.int64).reshape(-1)
    if values.size == 0:
        return CodeTable(Alphabet(0, 0), np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
    hist = _histogram(values)
    best: CodeTable | None = None
    for i, j in candidate_ranges(hist.counts):
        table = _candidate(hist, i, j)
        if table is not None and (best is None or _total_bits(table) < _total_bits(best)):
            best = table
    assert best is not None  # the single-peak range is always feasible (<= 129 symbols)
    return best
