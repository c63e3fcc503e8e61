"""The coded alphabet: a contiguous range of direct values plus logarithmic escape buckets.

Why this shape: uniform-grid indices are unimodal with a dense core, so the core is coded
directly (one table entry per value), while rare tail values and outliers (up to the full
int64 range) go through *escape buckets*. A value at distance ``e >= 1`` beyond the direct
range falls in bucket ``b = floor(log2 e)``: the rANS stream codes the bucket's symbol, and the
``b`` low bits of ``e`` ("raw bits") are stored out of band, in flat symbol order, in one
little-endian bit string. This costs roughly ``-log2 p(bucket) + b`` bits, close to the ideal
for smoothly decaying tails, and keeps the table at most ``2 * 64`` escape entries no matter
how large the outliers are. Keeping raw bits out of the rANS stream means a decoder never takes
an extra step for a tail value: a GPU warp decodes its 32 lanes in lockstep (an in-band escape
would stall all of them), and a GEMV adds the escaped weights afterwards.

Alphabet index layout (also the ``freqs`` table layout):
``[0, D)`` direct values ``lo + i``; ``[D, D + H)`` buckets above ``hi = lo + D - 1``;
``[D + H, D + H + B)`` buckets below ``lo``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

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
        return np.concatenate([
            np.zeros(self.num_direct, np.int64),
            np.arange(self.num_hi_buckets, dtype=np.int64),
            np.arange(self.num_lo_buckets, dtype=np.int64),
        ])


@dataclass(frozen=True)
class MappedSymbols:
    """Values rewritten as alphabet indices; escapes listed in flat order (they are rare)."""

    index: torch.Tensor
    """int32 alphabet index per symbol (on the values' device)."""
    escape_raw: np.ndarray
    """uint64 raw bits (``e - 2**b``) per escaped symbol."""
    escape_bits: np.ndarray
    """int64 bucket number ``b`` (= number of raw bits) per escaped symbol."""


def _distances(esc: np.ndarray, alphabet: Alphabet) -> tuple[np.ndarray, np.ndarray]:
    """``above`` mask and exact uint64 distances beyond the direct range (no int64 overflow)."""
    above = esc >= alphabet.lo if alphabet.num_direct == 0 else esc > alphabet.hi
    anchor_hi = np.uint64(alphabet.hi % (1 << 64))
    anchor_lo = np.uint64(alphabet.lo % (1 << 64))
    with np.errstate(over="ignore"):
        e = np.where(above, esc.view(np.uint64) - anchor_hi, anchor_lo - esc.view(np.uint64))
    return above, e


def map_values(values: torch.Tensor, alphabet: Alphabet) -> MappedSymbols:
    """Rewrite int64 values into alphabet indices plus escape raw bits.

    Raises ValueError if a value needs a bucket the alphabet does not have.
    """
    offset = values - alphabet.lo  # wraps like uint64 for far values, never into [0, D)
    direct = (offset >= 0) & (offset < alphabet.num_direct)
    index = offset.clamp(0, max(alphabet.num_direct - 1, 0)).to(torch.int32)
    pos = torch.nonzero(~direct).reshape(-1)
    esc = values[pos].cpu().numpy().astype(np.int64)
    above, e = _distances(esc, alphabet)
    bits = bit_length_u64(e) - 1
    limit = np.where(above, alphabet.num_hi_buckets, alphabet.num_lo_buckets)
    if (bits >= limit).any():
        raise ValueError("value outside the alphabet's escape buckets")
    first_hi, first_lo = alphabet.num_direct, alphabet.num_direct + alphabet.num_hi_buckets
    if pos.numel():
        bucket = np.where(above, first_hi, first_lo) + bits
        index[pos] = torch.from_numpy(bucket.astype(np.int32)).to(index.device)
    return MappedSymbols(index, e ^ (np.uint64(1) << bits.astype(np.uint64)), bits)


def unmap_escapes(alphabet: Alphabet, index: np.ndarray, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values of escaped symbols from bucket index and raw bits.

    Returns ``(values, ok)`` where ``ok`` is False for results that would leave the int64 range
    (impossible for streams written by our encoder, so a sign of corruption).
    """
    index = np.asarray(index, dtype=np.int64)
    is_hi = index < alphabet.num_direct + alphabet.num_hi_buckets
    first_hi, first_lo = alphabet.num_direct, alphabet.num_direct + alphabet.num_hi_buckets
    b = np.where(is_hi, index - first_hi, index - first_lo)
    e = (np.uint64(1) << b.astype(np.uint64)) | np.asarray(raw, dtype=np.uint64)
    room_hi = np.uint64(max(0, INT64_MAX - alphabet.hi))
    room_lo = np.uint64(max(0, alphabet.lo - INT64_MIN))
    ok = np.where(is_hi, e <= room_hi, e <= room_lo)
    anchor_hi = np.uint64(alphabet.hi % (1 << 64))
    anchor_lo = np.uint64(alphabet.lo % (1 << 64))
    with np.errstate(over="ignore"):
        vals = np.where(is_hi, anchor_hi + e, anchor_lo - e).view(np.int64)
    return vals, ok


def pack_raw_bits(raw: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Concatenate the low ``bits[i]`` bits of each ``raw[i]`` into little-endian bytes."""
    total = int(bits.sum())
    if total == 0:
        return np.zeros(0, dtype=np.uint8)
    cols = np.arange(64, dtype=np.uint64)
    all_bits = ((raw.astype(np.uint64)[:, None] >> cols[None, :]) & np.uint64(1)).astype(np.uint8)
    keep = np.arange(64)[None, :] < bits[:, None]
    return np.packbits(all_bits[keep], bitorder="little")


def unpack_raw_bits(packed: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_raw_bits` (``bits`` must sum to at most ``8 * len(packed)``)."""
    if bits.size == 0:
        return np.zeros(0, dtype=np.uint64)
    stream = np.unpackbits(packed.astype(np.uint8), bitorder="little").astype(np.uint64)
    start = np.concatenate([[0], np.cumsum(bits)[:-1]])
    cols = np.arange(64, dtype=np.int64)
    keep = cols[None, :] < bits[:, None]
    pos = np.where(keep, start[:, None] + cols[None, :], 0)
    vals = np.where(keep, stream[np.minimum(pos, max(stream.size - 1, 0))], np.uint64(0)) if stream.size else \
        np.zeros(keep.shape, dtype=np.uint64)
    return (vals << cols.astype(np.uint64)[None, :]).sum(axis=1, dtype=np.uint64)
