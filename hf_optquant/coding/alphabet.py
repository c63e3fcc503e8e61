"""The coded alphabet: a contiguous range of direct values plus logarithmic escape buckets.

Why this shape: uniform-grid indices are unimodal with a dense core, so the core is coded
directly (one table entry per value), while rare tail values and outliers (up to the full
int64 range) go through *escape buckets*. A value at distance ``e >= 1`` beyond the direct
range falls in bucket ``b = floor(log2 e)`` and is sent as that bucket's symbol followed by the
``b`` low bits of ``e`` as raw digits. This costs roughly ``-log2 p(bucket) + b`` bits, close to
the ideal for smoothly decaying tails, and keeps the table at most ``2 * 64`` escape entries no
matter how large the outliers are (a lone 10**6 costs ~ 20 raw bits plus a 16-bit table entry
per bucket up to its own).

Alphabet index layout (also the ``freqs`` table layout):
``[0, D)`` direct values ``lo + i``; ``[D, D + H)`` buckets above ``hi = lo + D - 1``;
``[D + H, D + H + B)`` buckets below ``lo``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layout import INT64_MAX, INT64_MIN


def bit_length_u64(e: np.ndarray) -> np.ndarray:
    """Exact ``int.bit_length`` of uint64 values (0 for 0), as int64, without float rounding."""
    e = np.asarray(e, dtype=np.uint64)
    out = np.zeros(e.shape, dtype=np.int64)
    rest = e.copy()
    for shift in (32, 16, 8, 4, 2, 1):
        big = rest >= np.uint64(1 << shift)
        out[big] += shift
        rest[big] >>= np.uint64(shift)
    out[rest > 0] += 1
    return out


@dataclass(frozen=True)
class Alphabet:
    """Which values are coded directly and how many escape buckets each side has."""

    lo: int
    num_direct: int
    num_hi_buckets: int = 0
    num_lo_buckets: int = 0

    @property
    def hi(self) -> int:
        """Largest directly coded value (``lo - 1`` when there are no direct values)."""
        return self.lo + self.num_direct - 1

    @property
    def size(self) -> int:
        return self.num_direct + self.num_hi_buckets + self.num_lo_buckets

    def bucket_bits(self) -> np.ndarray:
        """Raw bits carried by each alphabet entry (0 for direct values)."""
        return np.concatenate(
            [
                np.zeros(self.num_direct, np.int64),
                np.arange(self.num_hi_buckets, dtype=np.int64),
                np.arange(self.num_lo_buckets, dtype=np.int64),
            ]
        )


@dataclass(frozen=True)
class MappedSymbols:
    """Values rewritten as alphabet indices; escapes listed sparsely (they are rare)."""

    index: np.ndarray
    """int32 alphabet index per symbol."""
    escape_pos: np.ndarray
    """int64 sorted positions of escaped symbols."""
    escape_raw: np.ndarray
    """uint64 raw bits (``e - 2**b``) per escaped symbol."""
    escape_bits: np.ndarray
    """int64 bucket number ``b`` (= number of raw bits) per escaped symbol."""


def escape_distances(values: np.ndarray, alphabet: Alphabet) -> tuple[np.ndarray, np.ndarray]:
    """Masks ``above`` / ``below`` the direct range; computed without int64 overflow."""
    if alphabet.num_direct == 0:
        above = values >= alphabet.lo
        return above, ~above
    return values > alphabet.hi, values < alphabet.lo


def map_values(values: np.ndarray, alphabet: Alphabet) -> MappedSymbols:
    """Rewrite int64 values into alphabet indices plus escape raw bits.

    Raises ValueError if a value needs a bucket the alphabet does not have.
    """
    values = np.asarray(values, dtype=np.int64)
    # One wrapping subtraction: as uint64, v - lo < num_direct exactly for direct values.
    with np.errstate(over="ignore"):
        offset = (values - np.int64(alphabet.lo)).view(np.uint64)
    pos = np.flatnonzero(offset >= np.uint64(alphabet.num_direct))
    index = offset.astype(np.int32)  # garbage at escape positions, overwritten below
    esc = values[pos]
    above, _ = escape_distances(esc, alphabet)
    anchor_hi = np.uint64((alphabet.lo + alphabet.num_direct - 1) % (1 << 64))
    anchor_lo = np.uint64(alphabet.lo % (1 << 64))
    # uint64 wrap-around arithmetic gives the exact distance (always in [1, 2**64 - 1]).
    e = np.where(above, esc.view(np.uint64) - anchor_hi, anchor_lo - esc.view(np.uint64))
    bits = bit_length_u64(e) - 1
    limit = np.where(above, alphabet.num_hi_buckets, alphabet.num_lo_buckets)
    if (bits >= limit).any():
        raise ValueError("value outside the alphabet's escape buckets")
    first_hi, first_lo = alphabet.num_direct, alphabet.num_direct + alphabet.num_hi_buckets
    index[pos] = np.where(above, first_hi, first_lo) + bits
    return MappedSymbols(index, pos, e ^ _pow2(bits), bits)


def _pow2(b: np.ndarray) -> np.ndarray:
    return np.left_shift(np.uint64(1), b.astype(np.uint64))


def unmap_escapes(
    alphabet: Alphabet, index: np.ndarray, raw: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Values of escaped symbols from bucket index and raw bits.

    Returns ``(values, ok)`` where ``ok`` is False for results that would leave the int64
    range (impossible for streams written by our encoder, so a sign of corruption).
    """
    index = np.asarray(index, dtype=np.int64)
    is_hi = index < alphabet.num_direct + alphabet.num_hi_buckets
    first_hi, first_lo = alphabet.num_direct, alphabet.num_direct + alphabet.num_hi_buckets
    b = np.where(is_hi, index - first_hi, index - first_lo)
    e = _pow2(b) | np.asarray(raw, dtype=np.uint64)
    room_hi = np.uint64(max(0, INT64_MAX - alphabet.hi))
    room_lo = np.uint64(max(0, alphabet.lo - INT64_MIN))
    ok = np.where(is_hi, e <= room_hi, e <= room_lo)
    anchor_hi = np.uint64(alphabet.hi % (1 << 64))
    anchor_lo = np.uint64(alphabet.lo % (1 << 64))
    vals = np.where(is_hi, anchor_hi + e, anchor_lo - e).view(np.int64)
    return vals, ok
