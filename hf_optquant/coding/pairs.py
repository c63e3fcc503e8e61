"""Pair-code lanes: a GPU layout of grid indices in which every table lookup decodes exactly two weights.

Why a third coder.  The prefix lanes (prefix.py) decode up to three symbols per lookup, but a lane's
column then depends on every code before it: activations are gathered per lane and the multiply-adds
stay on the CUDA cores (~14 instructions per weight, measured 0.76-1.09x bf16; RESULTS.md section 6).
Here a codeword stands for a *pair* of neighbouring weights ``(W[n, 2p], W[n, 2p + 1])``, so every lane
of a warp decodes the same number of weights per step and the pairs land where a tensor-core ``mma``
wants them: one lookup is one bf16x2 register of the A fragment (the order of
:mod:`hf_optquant.kernels.lut_mma`). Rate (``benchmarks/pair_rate.py``): codes limited to 12 bits over the
most frequent pairs plus an escape codeword cost H + 0.03-0.05 b/sym on Gaussian-like indices at 3-3.5
b/sym, more on heavy tails (the escaped pairs are stored out of band).

Layout (:class:`PairLanes`)
---------------------------
Rows in tiles of 16, K in groups of 64 (zero-padded), groups in chunks of ``chunk`` groups.  Lane
``l = 4 g + c`` of (tile ``t``, chunk ``h``) codes, for each group ``q`` of the chunk, k16 step ``j < 4``
and register ``r < 4``, the pair at row ``16 t + g + 8 (r & 1)`` and columns
``k = 64 q + 16 c + 4 j + 2 (r >> 1) + {0, 1}`` -- ``16`` pairs per group.  Its codes are concatenated
MSB-first into 32-bit words; the lanes' words are stored one lane after the other, lanes in (tile, chunk,
lane) order, with ``chunk_base[t, h]`` the first word of lane 0 and ``counts[t, h, l]`` (uint8) each
lane's word count.  Four zero words pad the end (decoders read ahead).

Table (int32, 4096 entries, indexed by the next 12 bits): ``len | b0 << 8 | b1 << 16`` with
``b = index + 64`` (both values in ``[-64, 63]``) and ``len`` the code length (1-12).  The escape
codeword decodes to ``b0 = b1 = 64`` (value 0); escaped pairs -- pairs outside the table or with a value
outside ``[-64, 63]`` -- are listed with their row, first column and values (``esc_*``), per (tile, chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .huffman import canonical_codes, huffman_lengths

WINDOW_BITS = 12
VALUE_BIAS = 64
"""Table value bytes are ``index + VALUE_BIAS``; indices outside ``[-64, 63]`` are escaped."""
TILE_ROWS, GROUP_K, PAIRS_PER_GROUP = 16, 64, 16
MAX_CHUNK = 40
"""Groups per chunk at most: a lane's words (<= 6 per group) must fit its uint8 count."""
PAD_WORDS = 4
ESCAPE_BITS = 64
"""What one escaped pair costs in GPU memory (row, column and two values as int32)."""
_SIDE = 2 * VALUE_BIAS
_CANDIDATES = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4095)


@dataclass(frozen=True)
class PairCode:
    """The coded pairs (``pairs[s] = (i0, i1)``) and code lengths; symbol ``len(pairs)`` is the escape."""

    pairs: np.ndarray  # int64 [T, 2]
    lengths: np.ndarray  # int64 [T + 1]

    @property
    def escape(self) -> int:
        return len(self.pairs)

    def symbol_map(self, device) -> torch.Tensor:
        """int64 [128 * 128]: symbol of the pair ``(i0 + 64) * 128 + (i1 + 64)`` (escape where uncoded)."""
        m = torch.full((_SIDE * _SIDE,), self.escape, dtype=torch.int64)
        key = (self.pairs[:, 0] + VALUE_BIAS) * _SIDE + self.pairs[:, 1] + VALUE_BIAS
        m[torch.from_numpy(key)] = torch.arange(len(self.pairs))
        return m.to(device)

    def table(self) -> np.ndarray:
        """int32 [4096] decode table (module docstring)."""
        codes = canonical_codes(self.lengths)
        b = np.concatenate([self.pairs + VALUE_BIAS, np.full((1, 2), VALUE_BIAS)]).astype(np.int64)
        entry = self.lengths | (b[:, 0] << 8) | (b[:, 1] << 16)
        out = np.zeros(1 << WINDOW_BITS, dtype=np.int64)
        for s in np.flatnonzero(self.lengths):
            shift = WINDOW_BITS - int(self.lengths[s])
            start = int(codes[s]) << shift
            out[start : start + (1 << shift)] = entry[s]
        return out.astype(np.int32)


def pair_keys(i0: torch.Tensor, i1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(key, in_range)`` of the pairs ``(i0, i1)``: key ``(i0 + 64) * 128 + (i1 + 64)`` where both indices are in
    ``[-64, 63]`` (0 elsewhere)."""
    i0, i1 = i0.to(torch.int64), i1.to(torch.int64)
    ok = (i0 >= -VALUE_BIAS) & (i0 < VALUE_BIAS) & (i1 >= -VALUE_BIAS) & (i1 < VALUE_BIAS)
    return torch.where(ok, (i0 + VALUE_BIAS) * _SIDE + i1 + VALUE_BIAS, 0), ok


def build_pair_code(index: torch.Tensor) -> PairCode:
    """The pair code of an ``[N, K]`` grid index (K padded to even with zeros): the number of coded pairs that
    minimises codeword bits plus :data:`ESCAPE_BITS` per escaped pair, lengths limited to 12 bits."""
    if index.shape[1] % 2:
        index = torch.nn.functional.pad(index, (0, 1))
    key, ok = pair_keys(index[:, 0::2], index[:, 1::2])
    counts = torch.bincount(key[ok], minlength=_SIDE * _SIDE).cpu().numpy().astype(np.float64)
    out_of_range = float((~ok).sum())
    order = np.argsort(-counts, kind="stable")
    used = int((counts > 0).sum())
    best = None
    for t in sorted({min(c, used) for c in _CANDIDATES}):
        esc = counts[order[t:]].sum() + out_of_range
        w = np.append(counts[order[:t]], max(esc, 0.5))  # the escape always has a code
        lengths = huffman_lengths(w, WINDOW_BITS) if len(w) > 1 else np.ones(1, dtype=np.int64)
        lengths[lengths == 0] = WINDOW_BITS  # (a zero-count pair never happens: t <= used)
        bits = float((w[:-1] * lengths[:-1]).sum() + esc * (lengths[-1] + ESCAPE_BITS))
        if best is None or bits < best[0]:
            best = (bits, t, lengths)
    _, t, lengths = best
    keys = order[:t]
    pairs = np.stack([keys // _SIDE - VALUE_BIAS, keys % _SIDE - VALUE_BIAS], axis=1).astype(np.int64)
    return PairCode(pairs, lengths.astype(np.int64))


@dataclass(frozen=True)
class PairLanes:
    """Encoded lanes (module docstring) and the escaped pairs."""

    words: torch.Tensor  # int32 [W + PAD_WORDS]
    chunk_base: torch.Tensor  # int32 [n_tiles * n_chunks + 1]
    counts: torch.Tensor  # uint8 [n_tiles * n_chunks * 32]
    esc_off: torch.Tensor  # int32 [n_tiles * n_chunks + 1]
    esc_row: torch.Tensor  # int32 [E]
    esc_col: torch.Tensor  # int32 [E] (even)
    esc_v0: torch.Tensor  # int32 [E]
    esc_v1: torch.Tensor  # int32 [E]


def lane_pairs(index: torch.Tensor, chunk: int) -> tuple[torch.Tensor, int, int, int]:
    """``(lanes [units, 32, 16 * chunk, 2], n_tiles, n_groups, n_chunks)``: the pairs in lane order (padded with 0)."""
    n, k = index.shape
    nt, ng = -(-n // TILE_ROWS), -(-k // GROUP_K)
    nch = -(-ng // chunk)
    x = torch.nn.functional.pad(index.to(torch.int64), (0, nch * chunk * GROUP_K - k, 0, nt * TILE_ROWS - n))
    # [t, h8, g, H, Q, c, j, e, i]: row = 16 t + 8 h8 + g, k = 64 (chunk H + Q) + 16 c + 4 j + 2 e + i
    x = x.view(nt, 2, 8, nch, chunk, 4, 4, 2, 2)
    x = x.permute(0, 3, 2, 5, 4, 6, 7, 1, 8)  # [t, H, g, c, Q, j, e, h8, i]: register r = 2 e + h8
    return x.reshape(nt * nch, 32, chunk * PAIRS_PER_GROUP, 2), nt, ng, nch


def lane_positions(n_tiles: int, n_chunks: int, chunk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row, col)`` int64 ``[units, 32, 16 * chunk]`` of every lane pair's first weight (inverse of the order)."""
    t = torch.arange(n_tiles, device=device).view(-1, 1, 1, 1, 1, 1, 1, 1)
    h = torch.arange(n_chunks, device=device).view(1, -1, 1, 1, 1, 1, 1, 1)
    g = torch.arange(8, device=device).view(1, 1, -1, 1, 1, 1, 1, 1)
    c = torch.arange(4, device=device).view(1, 1, 1, -1, 1, 1, 1, 1)
    q = torch.arange(chunk, device=device).view(1, 1, 1, 1, -1, 1, 1, 1)
    j = torch.arange(4, device=device).view(1, 1, 1, 1, 1, -1, 1, 1)
    e = torch.arange(2, device=device).view(1, 1, 1, 1, 1, 1, -1, 1)
    h8 = torch.arange(2, device=device).view(1, 1, 1, 1, 1, 1, 1, -1)
    row = 16 * t + 8 * h8 + g + 0 * (h + c + q + j + e)
    col = 64 * (h * chunk + q) + 16 * c + 4 * j + 2 * e + 0 * (t + g + h8)
    shape = (n_tiles * n_chunks, 32, chunk * PAIRS_PER_GROUP)
    return row.reshape(shape), col.reshape(shape)


def encode_pair_lanes(index: torch.Tensor, code: PairCode, chunk: int) -> PairLanes:
    """Encode an ``[N, K]`` grid index (on its device) in the layout of the module docstring."""
    if not 1 <= chunk <= MAX_CHUNK:
        raise ValueError(f"chunk must be in [1, {MAX_CHUNK}] groups, got {chunk}")
    dev = index.device
    n, k = index.shape
    lanes, nt, ng, nch = lane_pairs(index, chunk)
    pairs = lanes.reshape(-1, 2)
    key, ok = pair_keys(pairs[:, 0], pairs[:, 1])
    sym = torch.where(ok, code.symbol_map(dev)[key], code.escape).view(lanes.shape[:3])
    row, col = lane_positions(nt, nch, chunk, dev)
    real = col < 64 * ng  # pairs of padding groups (last chunk) are not coded
    lengths = torch.as_tensor(code.lengths, device=dev)[sym] * real
    cw = torch.as_tensor(canonical_codes(code.lengths), device=dev)[sym] * real
    lane_bits = lengths.sum(-1)  # [units, 32]
    lane_words = (lane_bits + 31) // 32
    if lane_words.numel() and int(lane_words.max()) > 255:
        raise ValueError("a lane holds more than 255 words; use a smaller chunk")
    flat_words = lane_words.reshape(-1)
    lane_start = torch.cumsum(flat_words, 0) - flat_words  # first word of each lane
    bit = (lane_start.view(lanes.shape[:2] + (1,)) * 32 + torch.cumsum(lengths, -1) - lengths).reshape(-1)
    ln, cw = lengths.reshape(-1), cw.reshape(-1)
    total = int(flat_words.sum())
    words = torch.zeros(total + 2, dtype=torch.int64, device=dev)
    w, s = bit >> 5, bit & 31
    end = s + ln  # code bits [s, end) of word w (end <= 44)
    first = torch.where(end <= 32, cw << (32 - end).clamp_min(0), cw >> (end - 32).clamp_min(0))
    second = torch.where(end > 32, (cw << (64 - end).clamp(0, 63)) & 0xFFFFFFFF, 0)
    words.scatter_add_(0, w, torch.where(ln > 0, first, 0))
    words.scatter_add_(0, w + 1, second)
    words = words[:total]
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    words = torch.cat([words, torch.zeros(PAD_WORDS, dtype=torch.int32, device=dev)])
    unit_words = lane_words.sum(-1)
    chunk_base = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), torch.cumsum(unit_words, 0)])
    esc = (sym == code.escape) & real
    unit = torch.arange(nt * nch, device=dev).view(-1, 1, 1).expand_as(esc)
    sel = esc.reshape(-1)
    esc_unit, er, ec = unit.reshape(-1)[sel], row.reshape(-1)[sel], col.reshape(-1)[sel]
    order = torch.argsort(esc_unit * (1 << 40) + er * (1 << 20) + ec)  # (already sorted by unit: stable order)
    ev = pairs[sel][order]
    esc_off = torch.searchsorted(esc_unit[order], torch.arange(nt * nch + 1, device=dev))
    i32 = torch.int32
    return PairLanes(words, chunk_base.to(i32), lane_words.reshape(-1).to(torch.uint8), esc_off.to(i32),
                     er[order].to(i32), ec[order].to(i32), ev[:, 0].to(i32), ev[:, 1].to(i32))  # fmt: skip


def decode_pair_lanes(lanes: PairLanes, table: torch.Tensor, n_units: int, chunk: int) -> torch.Tensor:
    """The table entries of every lane pair, ``int64 [units, 32, 16 * chunk]``, read by bit position (a decoder
    independent of the kernels' bit buffer). Pairs of padding groups decode whatever bits follow."""
    dev = lanes.words.device
    words = lanes.words.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros(2, dtype=torch.int64, device=dev)])
    counts = lanes.counts.to(torch.int64).view(n_units, 32)
    start = lanes.chunk_base[:-1].to(torch.int64).view(-1, 1) + torch.cumsum(counts, 1) - counts
    pos = (start * 32).reshape(-1)
    limit = words.numel() - 2
    tab = table.to(dev).to(torch.int64)
    out = torch.empty((pos.numel(), chunk * PAIRS_PER_GROUP), dtype=torch.int64, device=dev)
    for step in range(chunk * PAIRS_PER_GROUP):
        w = (pos >> 5).clamp(max=limit)
        window = (words[w] << 32) | words[w + 1]
        e = tab[(window >> (52 - (pos & 31))) & 0xFFF]
        out[:, step] = e
        pos = pos + (e & 15)
    return out.view(n_units, 32, -1)


def entry_values(entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two grid indices of table entries (escapes give 0, 0)."""
    return ((entries >> 8) & 255) - VALUE_BIAS, ((entries >> 16) & 255) - VALUE_BIAS
