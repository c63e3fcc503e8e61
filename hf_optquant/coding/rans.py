"""Vectorised rANS over independent lanes (one lane = one chunk), CPU reference.

Both directions loop over the position within a chunk and process all chunks at once with
numpy, exactly the schedule a GPU decoder uses (one thread per chunk, lockstep over
positions). Python work is therefore O(chunk_size) steps whatever the tensor size.

Coding step (symbol with frequency ``f`` and cumulative start ``c``, ``M = 2**12``):

* encode: ``if x >= f << 20: emit(x & 0xFFFF); x >>= 16`` then
  ``x = (x // f) * M + c + x % f``
* decode: ``slot = x & (M - 1); s = lut[slot]; x = f[s] * (x >> 12) + slot - c[s]``; then
  ``if x < 2**16 and words remain in this chunk: x = (x << 16) | next_word``.

An escape symbol is followed (in decode order) by ``ceil(b / 12)`` digit steps; a digit of
``w`` bits is an ordinary step with ``f = 2**(12 - w)``, ``c = digit * f``, so the
decoder needs no second code path beyond ``digit = slot >> (12 - w)``. Digit 0 carries the
lowest 12 raw bits.

Encoders start at state 1 and decoders read "only while words remain": once the encoder's
state has reached 2**16 it never falls back, and it cannot emit before, so these two rules
mirror each other exactly and the first ~16 bits of each chunk cost nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .frequencies import SYMBOL_FIELD_BITS, cumulative, packed_decode_table
from .layout import (
    DIGIT_BITS,
    ENCODE_LIMIT_SHIFT,
    INITIAL_STATE,
    MAX_DIGITS,
    PROB_BITS,
    STATE_LOWER,
    STATE_WORDS,
    WORD_BITS,
)

_SLOT_MASK = (1 << PROB_BITS) - 1
_WORD_MASK = (1 << WORD_BITS) - 1
_SYMBOL_MASK = (1 << SYMBOL_FIELD_BITS) - 1


@dataclass(frozen=True)
class LaneGeometry:
    """How ``num_symbols`` symbols split into lanes of ``chunk_size`` (last may be short)."""

    num_symbols: int
    chunk_size: int

    @property
    def num_chunks(self) -> int:
        return -(-self.num_symbols // self.chunk_size)

    @property
    def last_len(self) -> int:
        return self.num_symbols - (self.num_chunks - 1) * self.chunk_size

    def active(self, t: int) -> int:
        """Number of lanes (a prefix) that have a symbol at position ``t``."""
        return self.num_chunks - (1 if t >= self.last_len else 0)

    def to_columns(self, flat: np.ndarray) -> np.ndarray:
        """Flat row-major symbols -> ``[chunk_size, num_chunks]`` (row t = position t)."""
        padded = np.zeros(self.num_chunks * self.chunk_size, dtype=flat.dtype)
        padded[: self.num_symbols] = flat
        return np.ascontiguousarray(padded.reshape(self.num_chunks, self.chunk_size).T)

    def from_columns(self, cols: np.ndarray) -> np.ndarray:
        return cols.T.reshape(-1)[: self.num_symbols]


@dataclass(frozen=True)
class CodedLanes:
    """Encoder output: per-chunk word counts and the concatenated chunk streams."""

    chunk_words: np.ndarray
    """int64 words per chunk, including the two state words."""
    payload: np.ndarray
    """uint16 words: per chunk ``[state >> 16, state & 0xFFFF, words in decode order...]``."""


class _Emitter:
    """Collects emitted words; ranks let us place them without sorting."""

    def __init__(self, num_lanes: int) -> None:
        self.count = np.zeros(num_lanes, dtype=np.int64)
        self.lanes: list[np.ndarray] = []
        self.ranks: list[np.ndarray] = []
        self.words: list[np.ndarray] = []

    def emit(self, lanes: np.ndarray, words: np.ndarray) -> None:
        self.lanes.append(lanes)
        self.ranks.append(self.count[lanes])
        self.words.append(words)
        self.count[lanes] += 1

    def layout(self, final_state: np.ndarray) -> CodedLanes:
        sizes = self.count + STATE_WORDS
        starts = np.zeros(sizes.size, dtype=np.int64)
        np.cumsum(sizes[:-1], out=starts[1:])
        payload = np.zeros(int(sizes.sum()), dtype=np.uint16)
        payload[starts] = (final_state >> WORD_BITS).astype(np.uint16)
        payload[starts + 1] = (final_state & _WORD_MASK).astype(np.uint16)
        if self.lanes:
            lanes = np.concatenate(self.lanes)
            ranks = np.concatenate(self.ranks)
            # Encoding runs backwards, so a lane's last emitted word is the first one read.
            pos = starts[lanes] + STATE_WORDS + (self.count[lanes] - 1 - ranks)
            payload[pos] = np.concatenate(self.words)
        return CodedLanes(sizes, payload)


def _encode_step(
    x: np.ndarray, lanes: np.ndarray | None, f: np.ndarray, c: np.ndarray, out: _Emitter
) -> None:
    """One rANS encode step on ``x[lanes]`` (all of ``x`` when ``lanes`` is None)."""
    xs = x if lanes is None else x[lanes]
    emit = xs >= (f << ENCODE_LIMIT_SHIFT)
    if emit.any():
        idx = np.flatnonzero(emit)
        out.emit(idx if lanes is None else lanes[idx], (xs[idx] & _WORD_MASK).astype(np.uint16))
        xs[idx] >>= WORD_BITS
    q, r = np.divmod(xs, f)
    xs = (q << PROB_BITS) + c + r
    if lanes is None:
        x[:] = xs
    else:
        x[lanes] = xs


def _digit_params(bits_left: np.ndarray, raw: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """Frequency and start of raw digit ``k`` (``w <= 12`` bits) as a uniform rANS symbol."""
    w = np.minimum(DIGIT_BITS, bits_left - DIGIT_BITS * k)
    mask = (np.uint64(1) << w.astype(np.uint64)) - np.uint64(1)
    digit = (raw >> np.uint64(DIGIT_BITS * k)) & mask
    f = np.left_shift(1, PROB_BITS - w)
    return f, digit.astype(np.int64) * f


def encode_lanes(
    index: np.ndarray,
    freqs: np.ndarray,
    num_direct: int,
    escape_pos: np.ndarray,
    escape_raw: np.ndarray,
    escape_bits: np.ndarray,
    geometry: LaneGeometry,
) -> CodedLanes:
    """rANS-encode alphabet indices (flat, row-major) into independent chunk streams."""
    n_lanes, size = geometry.num_chunks, geometry.chunk_size
    out = _Emitter(n_lanes)
    x = np.full(n_lanes, INITIAL_STATE, dtype=np.int64)
    if n_lanes == 0:
        return out.layout(x)
    cols = geometry.to_columns(index.astype(np.int32))
    freqs = np.asarray(freqs, dtype=np.int64)
    cum = cumulative(freqs)
    has_escapes = escape_pos.size > 0
    for t in range(size - 1, -1, -1):
        n_act = geometry.active(t)
        a = cols[t, :n_act]
        if has_escapes:
            esc = np.flatnonzero(a >= num_direct)
            if esc.size:
                k = np.searchsorted(escape_pos, esc * size + t)
                _encode_digits(x, esc, escape_bits[k], escape_raw[k], out)
        # x[:n_act] is a view of the active prefix, so lane numbers stay absolute.
        _encode_step(x[:n_act], None, freqs[a], cum[a], out)
    return out.layout(x)


def _encode_digits(
    x: np.ndarray, lanes: np.ndarray, bits: np.ndarray, raw: np.ndarray, out: _Emitter
) -> None:
    """Encode raw digits last-to-first so that the decoder reads digit 0 first."""
    for k in range(MAX_DIGITS - 1, -1, -1):
        sel = bits > DIGIT_BITS * k
        if sel.any():
            f, c = _digit_params(bits[sel], raw[sel], k)
            _encode_step(x, lanes[sel], f, c, out)


@dataclass(frozen=True)
class DecodedLanes:
    """Decoder output before values are reconstructed from alphabet indices."""

    index: np.ndarray
    """int32 alphabet index per symbol (flat, row-major)."""
    escape_pos: np.ndarray
    escape_raw: np.ndarray
    bad_chunks: np.ndarray
    """Chunks whose final state is not INITIAL_STATE or that did not use all their words."""


def _renormalise(
    x: np.ndarray, xs: np.ndarray, ptr: np.ndarray, end: np.ndarray, payload: np.ndarray
) -> None:
    """Store ``xs`` into ``x``, pulling one word where the state fell below STATE_LOWER."""
    need = (xs < STATE_LOWER) & (ptr < end)
    np.copyto(xs, (xs << WORD_BITS) | payload.take(np.minimum(ptr, payload.size - 1)), where=need)
    x[:] = xs
    ptr += need


def decode_lanes(
    payload: np.ndarray,
    chunk_words: np.ndarray,
    freqs: np.ndarray,
    num_direct: int,
    bucket_bits: np.ndarray,
    geometry: LaneGeometry,
) -> DecodedLanes:
    """Decode every chunk in lockstep. Bounded for *any* inputs of the right dtypes.

    Iteration counts depend only on ``geometry`` (at most ``chunk_size * (1 + 6)`` lane-steps),
    every gather index is clamped, so corrupt data can produce wrong symbols but never a hang
    or an out-of-range access; ``bad_chunks`` then reports the inconsistency.
    """
    n_lanes, size = geometry.num_chunks, geometry.chunk_size
    empty = np.zeros(0, dtype=np.int64)
    if n_lanes == 0:
        return DecodedLanes(np.zeros(0, np.int32), empty, empty.astype(np.uint64), empty)
    payload = np.asarray(payload, dtype=np.int64)
    if payload.size == 0:
        payload = np.zeros(1, dtype=np.int64)
    sizes = np.clip(np.asarray(chunk_words, dtype=np.int64), 0, None)
    end = np.minimum(np.cumsum(sizes), payload.size)
    start = np.minimum(end - sizes, payload.size - 1).clip(0)
    x = (payload[start] << WORD_BITS) | payload[np.minimum(start + 1, payload.size - 1)]
    ptr = start + STATE_WORDS
    table = packed_decode_table(freqs)
    bucket_bits = np.asarray(bucket_bits, dtype=np.int64)
    has_escapes = np.asarray(freqs).size > num_direct
    cols = np.empty((size, n_lanes), dtype=np.int32)
    esc_pos: list[np.ndarray] = []
    esc_raw: list[np.ndarray] = []
    for t in range(size):
        n_act = geometry.active(t)
        xs = x[:n_act]
        entry = table.take(xs & _SLOT_MASK)
        new = (entry >> 32) * (xs >> PROB_BITS) + ((entry >> SYMBOL_FIELD_BITS) & _SLOT_MASK)
        _renormalise(xs, new, ptr[:n_act], end[:n_act], payload)
        a = entry & _SYMBOL_MASK
        cols[t, :n_act] = a
        if has_escapes:
            esc = np.flatnonzero(a >= num_direct)
            if esc.size:
                bits = bucket_bits[np.minimum(a[esc], bucket_bits.size - 1)]
                esc_raw.append(_decode_digits(x, ptr, end, payload, esc, bits))
                esc_pos.append(esc * size + t)
    bad = np.flatnonzero((x != INITIAL_STATE) | (ptr != end) | (sizes < STATE_WORDS))
    pos = np.concatenate(esc_pos) if esc_pos else empty
    raw = np.concatenate(esc_raw) if esc_raw else empty.astype(np.uint64)
    order = np.argsort(pos, kind="stable")
    return DecodedLanes(geometry.from_columns(cols), pos[order], raw[order], bad)


def _decode_digits(
    x: np.ndarray,
    ptr: np.ndarray,
    end: np.ndarray,
    payload: np.ndarray,
    lanes: np.ndarray,
    bits: np.ndarray,
) -> np.ndarray:
    """Decode the raw digits following escape symbols on ``lanes``; returns uint64 raws."""
    raw = np.zeros(lanes.size, dtype=np.uint64)
    for k in range(MAX_DIGITS):
        sel = np.flatnonzero(bits > DIGIT_BITS * k)
        if sel.size == 0:
            break
        ln = lanes[sel]
        w = np.minimum(DIGIT_BITS, bits[sel] - DIGIT_BITS * k)
        xs, ps = x[ln], ptr[ln]
        slot = xs & _SLOT_MASK
        shift = PROB_BITS - w
        digit = slot >> shift
        new = (xs >> PROB_BITS << shift) + (slot & ((1 << shift) - 1))
        _renormalise(xs, new, ps, end[ln], payload)
        x[ln], ptr[ln] = xs, ps
        raw[sel] |= digit.astype(np.uint64) << np.uint64(DIGIT_BITS * k)
    return raw
