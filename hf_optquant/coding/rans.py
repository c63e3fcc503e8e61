"""Interleaved rANS over lanes and 32-lane groups: the reference encoder and decoder.

Both directions loop over the position within a lane and process every lane at once with torch
ops, on whatever device the symbols live on (the CPU for the stored format's reference, a GPU to
encode large models quickly). The decoder runs exactly the schedule of the Triton kernels in
:mod:`hf_optquant.kernels.grid_linear`: one thread per lane, a warp per group, lockstep steps.

Coding step (symbol with frequency ``f`` and cumulative start ``c``, ``M = 2**12``):

* encode: ``if x >= f << 20: emit(x & 0xFFFF); x >>= 16`` then
  ``x = (x // f) * M + c + x % f``
* decode: ``slot = x & (M - 1); s = lut[slot]; x = f[s] * (x >> 12) + slot - c[s]``; then
  ``if x < 2**16 and t <= last: x = (x << 16) | next_word``.

Word order. Each lane keeps one prefetched word: it starts by fetching its first word, and a
step that consumes a word fetches the lane's next one (unless it was the lane's last read). A
group's words are stored in fetch order: the initial fetches in lane order, then, step by step,
the fetches of that step in lane order. So a warp finds the word of every fetching lane at
``base + rank`` (rank = number of lower lanes fetching: one ballot and one popcount), and the
fetched word is not needed before the lane's next read, which keeps memory latency out of the
decode chain.

Tails. Encoders start at state 1 and decoders read "only while ``t <= last``", where ``last``
is the lane's last read step: once the encoder's state has reached 2**16 it never falls back,
and it cannot emit before, so these two rules mirror each other exactly and the first ~16 bits
of each lane cost nothing extra. ``last`` is stored as the number of trailing steps without a
read (a 4-bit count, with an extension list for the rare lanes that need more).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .frequencies import SYMBOL_FIELD_BITS, cumulative, packed_decode_table
from .layout import ENCODE_LIMIT_SHIFT, GROUP_LANES, INITIAL_STATE, PROB_BITS, STATE_LOWER, WORD_BITS, Geometry

_SLOT_MASK = (1 << PROB_BITS) - 1
_WORD_MASK = (1 << WORD_BITS) - 1
_SYMBOL_MASK = (1 << SYMBOL_FIELD_BITS) - 1


def to_lanes(flat: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Flat row-major symbols -> ``[chunk_size, num_lanes]`` (row t = position t in each lane)."""
    g = geometry
    rows_pad, cols_pad = g.row_blocks * GROUP_LANES, g.segments * g.chunk_size
    grid = torch.zeros(rows_pad * g.row_length, dtype=flat.dtype, device=flat.device)
    grid[: g.num_symbols] = flat
    grid = grid.view(rows_pad, g.row_length)
    if cols_pad > g.row_length:
        grid = torch.nn.functional.pad(grid, (0, cols_pad - g.row_length))
    lanes = grid.view(g.row_blocks, GROUP_LANES, g.segments, g.chunk_size).permute(0, 2, 1, 3)
    return lanes.reshape(g.num_lanes, g.chunk_size).t().contiguous()


def from_lanes(cols: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Inverse of :func:`to_lanes` (drops the padding)."""
    g = geometry
    lanes = cols.t().reshape(g.row_blocks, g.segments, GROUP_LANES, g.chunk_size).permute(0, 2, 1, 3)
    grid = lanes.reshape(g.row_blocks * GROUP_LANES, g.segments * g.chunk_size)[:, : g.row_length]
    return grid.reshape(-1)[: g.num_symbols]


@dataclass(frozen=True)
class CodedLanes:
    """Encoder output (int64 tensors on the encoding device)."""

    states: torch.Tensor
    """[num_lanes] the decoder's initial state per lane (the encoder's final state)."""
    last: torch.Tensor
    """[num_lanes] last step at which the lane reads a word, -1 if it never does."""
    group_words: torch.Tensor
    """[num_groups] words per group."""
    payload: torch.Tensor
    """[payload_words] 16-bit words in fetch order, group after group."""


def encode_lanes(index: torch.Tensor, freqs: np.ndarray, geometry: Geometry) -> CodedLanes:
    """rANS-encode alphabet indices (flat, row-major; any device) into interleaved groups."""
    dev = index.device
    n_lanes, size = geometry.num_lanes, geometry.chunk_size
    x = torch.full((n_lanes,), INITIAL_STATE, dtype=torch.int64, device=dev)
    if n_lanes == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return CodedLanes(x, empty, empty, empty)
    cols = to_lanes(index, geometry)
    freq_t = torch.as_tensor(np.asarray(freqs, dtype=np.int64), device=dev)
    cum_t = torch.as_tensor(cumulative(freqs), device=dev)
    lens = torch.as_tensor(geometry.lane_lengths(), device=dev)
    full_until = int(lens.min())  # positions below this are active in every lane
    emit = torch.zeros((size, n_lanes), dtype=torch.bool, device=dev)
    words = torch.zeros((size, n_lanes), dtype=torch.int32, device=dev)
    for t in range(size - 1, -1, -1):
        a = cols[t].long()
        f, c = freq_t[a].clamp_min(1), cum_t[a]
        act = None if t < full_until else lens > t
        e = x >= (f << ENCODE_LIMIT_SHIFT)
        if act is not None:
            e &= act
        emit[t] = e
        words[t] = (x & _WORD_MASK).to(torch.int32)
        x = torch.where(e, x >> WORD_BITS, x)
        q = torch.div(x, f, rounding_mode="floor")
        new = (q << PROB_BITS) + c + (x - q * f)
        x = new if act is None else torch.where(act, new, x)
    return _layout(x, emit, words, geometry)


def _layout(states: torch.Tensor, emit: torch.Tensor, words: torch.Tensor, geometry: Geometry) -> CodedLanes:
    """Per-lane last read step, and every group's words in fetch order (see module docstring)."""
    size = geometry.chunk_size
    any_read = emit.any(0)
    first_in_flipped = emit.flip(0).to(torch.uint8).argmax(0)
    last = torch.where(any_read, size - 1 - first_in_flipped, torch.full_like(first_in_flipped, -1))
    events = emit.t().nonzero()  # (lane, step), sorted by lane then step
    lane, step = events[:, 0], events[:, 1]
    prev = torch.empty_like(step)
    if step.numel():
        prev[0] = -1
        prev[1:] = torch.where(lane[1:] == lane[:-1], step[:-1], torch.full_like(step[1:], -1))
    group = lane // GROUP_LANES
    key = (group * (size + 1) + prev + 1) * GROUP_LANES + lane % GROUP_LANES
    order = torch.argsort(key)
    payload = words[step, lane].to(torch.int64)[order]
    group_words = torch.bincount(group, minlength=geometry.num_groups)
    return CodedLanes(states, last.to(torch.int64), group_words, payload)


@dataclass(frozen=True)
class DecodedLanes:
    index: torch.Tensor
    """int32 alphabet index per symbol (flat, row-major)."""
    bad_lanes: torch.Tensor
    """Lanes whose final state is not INITIAL_STATE."""
    bad_groups: torch.Tensor
    """Groups that did not consume exactly their words."""


def decode_lanes(
    payload: torch.Tensor,
    group_words: torch.Tensor,
    states: torch.Tensor,
    last: torch.Tensor,
    freqs: np.ndarray,
    geometry: Geometry,
    table: torch.Tensor | None = None,
) -> DecodedLanes:
    """Decode every lane in lockstep. Bounded for *any* inputs of the right dtypes.

    Iteration counts depend only on ``geometry``, every gather index is clamped and the state
    stays below 2**32, so corrupt data can produce wrong symbols but never a hang or an
    out-of-range access; ``bad_lanes`` / ``bad_groups`` then report the inconsistency.
    ``table`` (int64 [4096], ``symbol | bias << 20 | freq << 32``) replaces ``freqs`` if given.
    """
    dev = states.device
    n_lanes, size, n_groups = geometry.num_lanes, geometry.chunk_size, geometry.num_groups
    empty = torch.zeros(0, dtype=torch.int64, device=dev)
    if n_lanes == 0:
        return DecodedLanes(torch.zeros(0, dtype=torch.int32, device=dev), empty, empty)
    payload = payload.to(torch.int64) & _WORD_MASK
    if payload.numel() == 0:
        payload = torch.zeros(1, dtype=torch.int64, device=dev)
    sizes = group_words.to(torch.int64).clamp_min(0)
    end = torch.cumsum(sizes, 0)
    base = end - sizes
    table = torch.as_tensor(packed_decode_table(freqs), device=dev) if table is None else table.to(dev)
    lens = torch.as_tensor(geometry.lane_lengths(), device=dev)
    last = last.to(torch.int64)
    x = states.to(torch.int64) & 0xFFFFFFFF
    fetch = _Fetcher(payload, base, n_groups)
    pf = torch.zeros(n_lanes, dtype=torch.int64, device=dev)
    pf = fetch(last >= 0, pf)
    full_until = int(lens.min())
    real = lens > 0
    gate_from = int(last[real].min()) if bool(real.any()) else 0
    cols = torch.empty((size, n_lanes), dtype=torch.int32, device=dev)
    for t in range(size):
        entry = table[x & _SLOT_MASK]
        cols[t] = (entry & _SYMBOL_MASK).to(torch.int32)
        new = (entry >> 32) * (x >> PROB_BITS) + ((entry >> SYMBOL_FIELD_BITS) & _SLOT_MASK)
        need = new < STATE_LOWER
        if t >= full_until:
            act = lens > t
            new = torch.where(act, new, x)
            need &= act
        if t >= gate_from:
            need &= t <= last
        x = torch.where(need, (new << WORD_BITS) | pf, new)
        pf = fetch(need & (t < last) if t >= gate_from else need, pf)
    bad_lanes = torch.nonzero(x != INITIAL_STATE).reshape(-1)
    bad_groups = torch.nonzero(fetch.base != end).reshape(-1)
    return DecodedLanes(from_lanes(cols, geometry), bad_lanes, bad_groups)


class _Fetcher:
    """The warp's word fetch: rank among fetching lanes of the group, then advance the base."""

    def __init__(self, payload: torch.Tensor, base: torch.Tensor, n_groups: int):
        self.payload, self.base, self.n_groups = payload, base.clone(), n_groups
        self.last_word = payload.numel() - 1

    def __call__(self, req: torch.Tensor, pf: torch.Tensor) -> torch.Tensor:
        r = req.view(self.n_groups, GROUP_LANES).to(torch.int64)
        rank = (r.cumsum(1) - r).view(-1)
        idx = (self.base.repeat_interleave(GROUP_LANES) + rank).clamp(0, self.last_word)
        self.base = self.base + r.sum(1)
        return torch.where(req, self.payload[idx], pf)
