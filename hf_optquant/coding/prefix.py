"""Prefix-code lanes: the GPU layout of entropy-coded grid indices, several symbols per lookup.

Why a second coder. rANS (rans.py) stores grid indices within ~0.01 b/sym of their entropy, which
is what a checkpoint wants, but a GPU decodes it one symbol per table lookup with a ~60-cycle
dependent chain and ~24 instructions per symbol: slower than reading bf16 weights (measured:
benchmarks/RESULTS.md, section 6). A canonical prefix (Huffman) code with lengths limited to
``WINDOW_BITS = 12`` costs a little more (+0.03-0.06 b/sym over the entropy on Student-t grid
indices at 2.5-4 b/sym) but decodes *up to three symbols per lookup*: the next 12 bits of a lane
index a 4096-entry table whose entry lists every whole code in those bits (at most three) and
their total length. At 3.5 b/sym a lookup yields ~2.8 symbols.

Layout. Lanes and groups as in :class:`~hf_optquant.coding.layout.Geometry` (a lane is one row
segment; a group is 32 lanes = one warp). A lane's codes are concatenated MSB-first and cut into
32-bit words. Its decoder keeps a 64-bit bit buffer ``B`` (the next ``nb`` bits, left-aligned)
and a queue of two loaded words ``q0, q1``; it runs *checks* ``c = -1, 0, 1, ...`` and, after
every check ``c >= 0``, two lookups::

    init:     q0 = the lane's word 0 (if any), then q1 = its word 1 (if any)
    check c:  if nb <= 32 and c <= last:  B |= q0 << (32 - nb); nb += 32; q0 = q1
                                          if c <= last_load: q1 = the lane's next unloaded word
    lookup:   e = table[B >> 52]; B <<= len(e); nb -= len(e); emit the n(e) symbols of e

``last`` is the check of the lane's last read and ``last_load`` that of its third-to-last (the
last read that still loads a word). After a check the buffer holds >= 33 bits (or all of the
lane's remaining bits), so both lookups see whole codes. A group's words are stored in the
order its lanes load them -- the two initial loads in lane order, then, check by check, the
loads of that check in lane order -- so a warp finds every loading lane's word at
``base + rank`` (one ballot and one popcount), with coalesced loads. A word is loaded two reads
before it is used (~3 checks at 3.5 b/sym), which hides HBM latency; with a one-word queue
the decoder stalled on it (measured: benchmarks/RESULTS.md, section 6).

The lanes of a 32-row block (one GPU program) run ``iters`` loop iterations (the most lookups of
any of its lanes, halved, rounded up); a lane that has decoded its symbols keeps stepping on
zeros and its extra symbols fall beyond its columns, where the decoders ignore them.

Table entry (int32): ``b0 | b1 << 8 | b2 << 16 | len << 24 | n << 30`` where ``b_j`` is symbol
``j``'s *value byte*, given by the caller (the GPU kernels use ``value + 128``, 0 for escapes;
absent symbols have byte 128, value 0), ``len`` the bits the lookup consumes (1..12) and ``n`` its
number of symbols (1..3): a GPU shifts its bit buffer by ``e >> 24`` with wrap-around (mod 32)
funnel shifts and advances its column by ``e >> 30``, one instruction each. A window that starts
no valid code (only possible for corrupt data or a one-symbol code) decodes as one symbol 0 of
length 12.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .huffman import canonical_codes, huffman_lengths
from .layout import GROUP_LANES, Geometry
from .rans import from_lanes, to_lanes

WINDOW_BITS = 12
"""Bits a lookup sees; also the longest code (a 4096-entry, 16 KB table)."""
PER_LOOKUP = 3
"""Most symbols one lookup emits (three value bytes fit an int32 entry with len and n)."""
WORD_BITS = 32
LOOKUPS_PER_CHECK = 2
"""A check leaves >= 33 bits in the 64-bit buffer: room for two lookups of <= 12 bits."""
ABSENT_BYTE = 128
NO_READ = -2
"""``last`` of a lane without words (and ``last_load`` of a lane with fewer than three)."""
QUEUE = 2
"""Words a lane holds loaded ahead of its reads."""

_TABLE_SIZE = 1 << WINDOW_BITS
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class PrefixCode:
    """Code lengths (0 = symbol never occurs) and canonical MSB-first codewords, per alphabet index."""

    lengths: np.ndarray
    codes: np.ndarray

    @classmethod
    def from_counts(cls, counts: np.ndarray) -> PrefixCode:
        lengths = huffman_lengths(np.asarray(counts, dtype=np.float64), WINDOW_BITS)
        return cls(lengths, canonical_codes(lengths))

    def coded_bits(self, counts: np.ndarray) -> int:
        return int((np.asarray(counts, dtype=np.int64) * self.lengths).sum())


@dataclass(frozen=True)
class LookupTable:
    """The 4096-entry decode table: kernel entries and, for reference decoders, symbol indices."""

    entries: np.ndarray
    """int32 [4096] (see the module docstring)."""
    symbols: np.ndarray
    """int64 [4096, 3] alphabet index of each emitted symbol (0 where absent)."""
    counts: np.ndarray
    """int64 [4096] symbols emitted (n)."""
    lengths: np.ndarray
    """int64 [4096] bits consumed."""


def lookup_table(code: PrefixCode, value_bytes: np.ndarray) -> LookupTable:
    """Greedy multi-symbol decode of every 12-bit window; ``value_bytes[i]`` is symbol i's byte."""
    first_sym, first_len = _first_code(code)
    w = np.arange(_TABLE_SIZE, dtype=np.int64)
    syms = np.zeros((_TABLE_SIZE, PER_LOOKUP), dtype=np.int64)
    used = np.zeros(_TABLE_SIZE, dtype=np.int64)
    total = np.zeros(_TABLE_SIZE, dtype=np.int64)
    alive = np.ones(_TABLE_SIZE, dtype=bool)
    for j in range(PER_LOOKUP):
        window = (w << total) & (_TABLE_SIZE - 1)
        s, length = first_sym[window], first_len[window]
        ok = alive & (length > 0) & (total + length <= WINDOW_BITS)
        syms[:, j] = np.where(ok, s, 0)
        total += np.where(ok, length, 0)
        used += ok
        alive = ok
    bad = used == 0  # no code starts this window
    total[bad], used[bad] = WINDOW_BITS, 1
    bytes_ = np.asarray(value_bytes, dtype=np.int64) & 255
    b = np.where(np.arange(PER_LOOKUP)[None, :] < used[:, None], bytes_[syms] if bytes_.size else 0, ABSENT_BYTE)
    entry = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (total << 24) | (used << 30)
    entry = np.where(entry >= 1 << 31, entry - (1 << 32), entry).astype(np.int32)
    return LookupTable(entry, syms, used, total)


def _first_code(code: PrefixCode) -> tuple[np.ndarray, np.ndarray]:
    """Symbol and length of the code that starts each 12-bit window (length 0: none)."""
    sym = np.zeros(_TABLE_SIZE, dtype=np.int64)
    length = np.zeros(_TABLE_SIZE, dtype=np.int64)
    for s in np.flatnonzero(code.lengths):
        shift = WINDOW_BITS - int(code.lengths[s])
        lo = int(code.codes[s]) << shift
        sym[lo : lo + (1 << shift)] = s
        length[lo : lo + (1 << shift)] = code.lengths[s]
    return sym, length


@dataclass(frozen=True)
class PrefixLanes:
    """Encoder output (int64 tensors on the encoding device)."""

    words: torch.Tensor
    """[total] 32-bit words (as non-negative int64) in load order, group after group."""
    group_words: torch.Tensor
    """[num_groups] words per group."""
    last: torch.Tensor
    """[num_lanes] check of the lane's last read, ``NO_READ`` if it has no words."""
    last_load: torch.Tensor
    """[num_lanes] check of the lane's last read that loads a word (its third-to-last read)."""
    lookups: torch.Tensor
    """[num_lanes] lookups that decode the lane."""

    def block_iters(self, geometry: Geometry) -> torch.Tensor:
        """[row_blocks] loop iterations of each 32-row block (its lanes' most lookups, halved)."""
        per = self.lookups.view(geometry.row_blocks, -1).amax(1)
        return (per + LOOKUPS_PER_CHECK - 1) // LOOKUPS_PER_CHECK


def encode_prefix_lanes(index: torch.Tensor, code: PrefixCode, geometry: Geometry) -> PrefixLanes:
    """Prefix-code alphabet indices (flat, row-major; any device) into lanes of 32-bit words."""
    dev = index.device
    lens_of = torch.as_tensor(code.lengths, device=dev)
    codes_of = torch.as_tensor(code.codes, device=dev)
    cols = to_lanes(index.to(torch.int64), geometry)  # [S, L]
    lane_len = torch.as_tensor(geometry.lane_lengths(), device=dev)
    inside = torch.arange(cols.shape[0], device=dev)[:, None] < lane_len[None, :]
    if bool((inside & (lens_of[cols] == 0)).any()):
        raise ValueError("a symbol without a code occurs in the data")
    lens = torch.where(inside, lens_of[cols], 0)
    csum = torch.cat([torch.zeros_like(lens[:1]), torch.cumsum(lens, 0)])  # [S + 1, L] bit offsets
    consumed, lookups = _lookups(csum, lane_len)
    last, last_load, read_at = _reads(consumed, csum[-1])
    words, lane_of_word = _pack_words(cols, lens, csum, codes_of, geometry)
    order, group_words = _load_order(lane_of_word, read_at, geometry)
    return PrefixLanes(words[order], group_words, last, last_load, lookups)


def _lookups(csum: torch.Tensor, lane_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bits consumed by each greedy lookup ``[J, L]`` and lookups per lane ``[L]``."""
    n_lanes, size = csum.shape[1], csum.shape[0] - 1
    pos = torch.zeros(n_lanes, dtype=torch.int64, device=csum.device)
    lookups = torch.zeros_like(pos)
    steps = []
    while bool((pos < lane_len).any()):
        act = pos < lane_len
        start = csum.gather(0, pos[None].clamp_max(size))[0]
        k = torch.ones_like(pos)
        for extra in range(1, PER_LOOKUP):
            end = csum.gather(0, (pos + extra + 1).clamp_max(size)[None])[0]
            k += (pos + extra < lane_len) & (end - start <= WINDOW_BITS)
        new = torch.minimum(pos + k, lane_len)
        steps.append(torch.where(act, csum.gather(0, new[None])[0] - start, 0))
        lookups += act
        pos = torch.where(act, new, pos)
    if not steps:
        return torch.zeros((0, n_lanes), dtype=torch.int64, device=csum.device), lookups
    return torch.stack(steps), lookups


def _reads(consumed: torch.Tensor, lane_bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoder's checks replayed: ``last`` and ``last_load`` checks per lane, and
    ``read_at [C, L]`` (True where lane l reads at check ``c - 1``)."""
    n_lanes = lane_bits.numel()
    total_words = (lane_bits + WORD_BITS - 1) // WORD_BITS
    j = consumed.shape[0]
    checks = (j + LOOKUPS_PER_CHECK - 1) // LOOKUPS_PER_CHECK
    pad = torch.zeros((checks * LOOKUPS_PER_CHECK - j, n_lanes), dtype=consumed.dtype, device=consumed.device)
    per_check = torch.cat([consumed, pad]).view(checks, LOOKUPS_PER_CHECK, n_lanes).sum(1)
    nb = torch.zeros_like(lane_bits)
    reads = torch.zeros_like(lane_bits)
    last = torch.full_like(lane_bits, NO_READ)
    last_load = torch.full_like(lane_bits, NO_READ)
    read_at = torch.zeros((checks + 1, n_lanes), dtype=torch.bool, device=consumed.device)
    for c in range(-1, checks):
        need = (nb <= 32) & (reads < total_words)
        read_at[c + 1] = need
        nb = nb + WORD_BITS * need
        reads = reads + need
        last = torch.where(need, torch.full_like(last, c), last)
        last_load = torch.where(need & (reads + QUEUE <= total_words), torch.full_like(last, c), last_load)
        if c >= 0:
            nb = nb - per_check[c]
    if not bool((reads == total_words).all()):  # pragma: no cover - the invariant of the schedule
        raise AssertionError("prefix lane schedule left words unread")
    return last, last_load, read_at


def _pack_words(
    cols: torch.Tensor, lens: torch.Tensor, csum: torch.Tensor, codes_of: torch.Tensor, geometry: Geometry
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every lane's codes as 32-bit words: ``(words [sum W], lane of each word)``, lane-major."""
    n_lanes = cols.shape[1]
    lane_words = (csum[-1] + WORD_BITS - 1) // WORD_BITS
    width = int(lane_words.max()) + 1 if n_lanes else 1
    buf = torch.zeros(n_lanes * width, dtype=torch.int64, device=cols.device)
    t, lane = torch.nonzero(lens, as_tuple=True)
    length, off = lens[t, lane], csum[t, lane]
    code = codes_of[cols[t, lane]]
    word, end = off // WORD_BITS, off % WORD_BITS + length
    spill = (end - WORD_BITS).clamp_min(0)
    head = torch.where(end <= WORD_BITS, code << (WORD_BITS - end).clamp_min(0), code >> spill)
    tail = (code << (2 * WORD_BITS - end)) & _MASK32
    buf.scatter_add_(0, lane * width + word, head)
    buf.scatter_add_(0, lane * width + word + 1, torch.where(spill > 0, tail, 0))
    keep = torch.arange(width, device=cols.device)[None, :] < lane_words[:, None]
    lane_of_word = torch.arange(n_lanes, device=cols.device)[:, None].expand(n_lanes, width)[keep]
    return buf.view(n_lanes, width)[keep], lane_of_word


def _load_order(lane_of_word: torch.Tensor, read_at: torch.Tensor, geometry: Geometry):
    """Permutation of the lane-major words into load order, and words per group."""
    dev = lane_of_word.device
    n_words = lane_of_word.numel()
    # word j < QUEUE of a lane is loaded at init stage j (event j); word j >= QUEUE at the check c
    # that reads word j - QUEUE (event c + 1 + QUEUE)
    _, read_c = torch.nonzero(read_at.t(), as_tuple=True)  # lane-major, checks ascending (c + 1)
    start = torch.ones(n_words, dtype=torch.bool, device=dev)
    if n_words:
        start[1:] = lane_of_word[1:] != lane_of_word[:-1]
    first_of_lane = torch.cummax(torch.where(start, torch.arange(n_words, device=dev), 0), 0).values
    j = torch.arange(n_words, device=dev) - first_of_lane  # word index within its lane
    event = torch.zeros(n_words, dtype=torch.int64, device=dev)
    if n_words:  # the reads are exactly the words, in the same lane-major order
        earlier = read_c[(torch.arange(n_words, device=dev) - QUEUE).clamp_min(0)]
        event = torch.where(j < QUEUE, j, earlier + QUEUE)
    group = lane_of_word // GROUP_LANES
    key = (group * (read_at.shape[0] + QUEUE + 1) + event) * GROUP_LANES + lane_of_word % GROUP_LANES
    order = torch.argsort(key)
    return order, torch.bincount(group, minlength=geometry.num_groups)


@dataclass(frozen=True)
class DecodedPrefix:
    index: torch.Tensor
    """int64 alphabet index per symbol (flat, row-major)."""
    bad_groups: torch.Tensor
    """Groups that did not load exactly their words."""


def decode_prefix_lanes(
    words: torch.Tensor,
    group_words: torch.Tensor,
    last: torch.Tensor,
    last_load: torch.Tensor,
    block_iters: torch.Tensor,
    table: LookupTable,
    geometry: Geometry,
) -> DecodedPrefix:
    """Decode every lane in lockstep, exactly as the GPU kernel does (torch ops, any device).

    Bounded for any inputs of the right dtypes: loop counts come from ``block_iters`` clamped to
    the geometry, gathers are clamped, so corrupt data yields wrong symbols, never a hang.
    """
    g = geometry
    dev = words.device
    n_lanes, size = g.num_lanes, g.chunk_size
    if n_lanes == 0:
        return DecodedPrefix(torch.zeros(0, dtype=torch.int64, device=dev), torch.zeros(0, dtype=torch.int64))
    words = words.to(torch.int64) & _MASK32
    if words.numel() == 0:
        words = torch.zeros(1, dtype=torch.int64, device=dev)
    sizes = group_words.to(torch.int64).clamp_min(0)
    end = torch.cumsum(sizes, 0)
    base = (end - sizes).repeat_interleave(GROUP_LANES)
    lens = torch.as_tensor(g.lane_lengths(), device=dev)
    iters = block_iters.to(torch.int64).clamp(0, size).to(dev).repeat_interleave(GROUP_LANES * g.segments)
    last = last.to(torch.int64).to(dev)
    last_load = last_load.to(torch.int64).to(dev)
    ent_len = torch.as_tensor(table.lengths, device=dev)
    ent_n = torch.as_tensor(table.counts, device=dev)
    ent_sym = torch.as_tensor(table.symbols, device=dev)
    loads = torch.zeros(n_lanes, dtype=torch.int64, device=dev)
    last_word = words.numel() - 1

    def load(req: torch.Tensor, pf: torch.Tensor) -> torch.Tensor:
        nonlocal loads
        r = req.view(-1, GROUP_LANES).to(torch.int64)
        rank = (r.cumsum(1) - r).view(-1)
        group_base = base.view(-1, GROUP_LANES)[:, 0] + loads.view(-1, GROUP_LANES)[:, 0]
        idx = (group_base.repeat_interleave(GROUP_LANES) + rank).clamp(0, last_word)
        loads = loads + r.sum(1).repeat_interleave(GROUP_LANES)
        return torch.where(req, words[idx], pf)

    buf = torch.zeros(n_lanes, dtype=torch.int64, device=dev)  # 64-bit buffer as a non-negative int64 of 64 bits
    nb = torch.zeros(n_lanes, dtype=torch.int64, device=dev)
    q0 = load(last >= -1, torch.zeros_like(buf))
    q1 = load(last >= 0, torch.zeros_like(buf))
    out = torch.zeros((size + PER_LOOKUP, n_lanes), dtype=torch.int64, device=dev)
    pos = torch.zeros(n_lanes, dtype=torch.int64, device=dev)
    max_iters = int(iters.max()) if iters.numel() else 0
    for c in range(-1, max_iters):
        running = c < iters
        need = (nb <= 32) & (c <= last) & running
        shift = (32 - nb).clamp(0, 32)
        buf = torch.where(need, buf | _shl64(q0, shift), buf)
        nb = nb + WORD_BITS * need
        q0 = torch.where(need, q1, q0)
        q1 = load(need & (c <= last_load), q1)
        if c < 0:
            continue
        for _ in range(LOOKUPS_PER_CHECK):
            w = _shr64(buf, 64 - WINDOW_BITS)
            n, length = ent_n[w], ent_len[w]
            for j in range(PER_LOOKUP):
                at = (pos + j).clamp_max(size + PER_LOOKUP - 1)
                put = running & (j < n) & (pos + j < lens)
                out[at, torch.arange(n_lanes, device=dev)] = torch.where(
                    put, ent_sym[w, j], out[at, torch.arange(n_lanes, device=dev)])
            pos = torch.where(running, (pos + n).clamp_max(size), pos)
            buf = torch.where(running, _shl64(buf, length), buf)
            nb = torch.where(running, nb - length, nb)
    group_loads = loads.view(-1, GROUP_LANES)[:, 0]
    bad_groups = torch.nonzero(group_loads != sizes).reshape(-1)
    return DecodedPrefix(from_lanes(out[:size], g), bad_groups)


def _shl64(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``(v << s) mod 2**64`` for 0 <= s <= 64 on int64 tensors holding 64-bit patterns."""
    s = torch.as_tensor(s, device=v.device)
    out = torch.bitwise_left_shift(v, s.clamp_max(63))
    return torch.where(s >= 64, 0, out)


def _shr64(v: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of 64-bit patterns held in int64 (0 < s < 64)."""
    return (v >> s) & ((1 << (64 - s)) - 1)
