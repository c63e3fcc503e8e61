"""Constants of the stored format, the typed view of its header, and the lane geometry.

Everything a decoder (CPU reference or GPU kernel) must agree on lives here, so that the
encoder, the validator, the size estimator and the Triton kernels read one source of truth.
"""

from __future__ import annotations

import os
from dataclasses import astuple, dataclass, fields

import numpy as np

# --- rANS parameters ------------------------------------------------------------------------
PROB_BITS = 12
"""Frequencies sum to ``2**PROB_BITS``; the slot -> symbol lookup table has that many entries."""
PROB_SCALE = 1 << PROB_BITS
MAX_FREQ = PROB_SCALE - 1
"""Every frequency fits 12 bits (a GPU table entry packs it with a 12-bit bias and an 8-bit value);
a one-symbol alphabet therefore gets a dummy second symbol of frequency 1."""
WORD_BITS = 16
"""The payload is a sequence of 16-bit words; a lane consumes at most one word per decode step."""
STATE_LOWER = 1 << 16
"""Normalised states live in ``[STATE_LOWER, 2**32)``: 32-bit state, 16-bit renormalisation."""
ENCODE_LIMIT_SHIFT = 32 - PROB_BITS
"""The encoder emits a word before coding a symbol of frequency f iff ``x >= f << 20``."""
INITIAL_STATE = 1
"""Encoders start at state 1 (not STATE_LOWER), so the first symbols are paid for by the
flushed final state rather than by 16 wasted bits; a clean decode must end at this state."""

# --- lanes and groups -----------------------------------------------------------------------
GROUP_LANES = 32
"""Lanes per group: one GPU warp. The group's words are interleaved in consumption order."""
TAIL_BITS = 4
"""Per-lane tail count stored as a nibble; 15 means "the next ``tail_ext`` entry holds it"."""
TAIL_EXT = (1 << TAIL_BITS) - 1
DEFAULT_CHUNK_SIZE = 4096
"""Lane length for 1-D input (rows of this many symbols): size first, few lanes."""
MAX_CHUNK_SIZE = 8192
"""Longest lane: bounds the decoder's sequential work per lane."""
SEGMENT_TARGET = int(os.environ.get("HF_OPTQUANT_SEGMENT", "512"))
"""Default lane length of the GPU row layout; see :func:`auto_segment` and :func:`gpu_segment`."""
MAX_SEGMENTS = 32
"""At most this many lanes per row, so a GPU program (<= 32 warps) covers whole rows."""
MAX_DIRECT = 1 << 16
"""Most directly coded values (table entries before the escape buckets)."""
MAX_BUCKETS = 64
"""Escape buckets per side. Bucket b holds distances e in [2**b, 2**(b+1)), b <= 63."""
GPU_WINDOW = (-127, 127)
"""Directly coded values of row-structured input stay in this range: the GPU decode table holds
8-bit values, and -128 is the placeholder it decodes for every escape bucket."""

# --- tensor names and dtypes ----------------------------------------------------------------
HEADER = "header"
FREQS = "freqs"
STATES = "states"
TAILS = "tails"
TAIL_EXT_NAME = "tail_ext"
GROUP_WORDS = "group_words"
PAYLOAD = "payload"
ESCAPES = "escapes"
TENSOR_NAMES = (HEADER, FREQS, STATES, TAILS, TAIL_EXT_NAME, GROUP_WORDS, PAYLOAD, ESCAPES)
"""Fixed order, also the order in which bytes enter the CRC32."""

MAGIC = 0x4F51414E5332  # "OQANS2"
VERSION = 2
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class Header:
    """The int64 ``header`` tensor, field by field (this order is the storage order)."""

    magic: int
    version: int
    num_symbols: int
    row_length: int
    """Symbols per row (the last dimension of >= 2-D input; ``chunk_size`` for 1-D input)."""
    chunk_size: int
    """Lane (segment) length: a row is cut into ``ceil(row_length / chunk_size)`` lanes."""
    prob_bits: int
    lo: int
    """Smallest directly coded value; direct values are ``lo .. lo + num_direct - 1``."""
    num_direct: int
    num_hi_buckets: int
    """Escape buckets for values above the direct range (table entries after the direct)."""
    num_lo_buckets: int
    """Escape buckets for values below the direct range (the last table entries)."""
    num_escapes: int
    escape_bits: int
    """Raw bits of all escaped values (bucket b carries b bits), stored in ``escapes``."""
    num_groups: int
    num_tail_ext: int
    payload_words: int
    crc32: int
    """zlib.crc32 over header fields 0..14 then every other tensor's raw bytes, in TENSOR_NAMES order."""

    @property
    def alphabet_size(self) -> int:
        return self.num_direct + self.num_hi_buckets + self.num_lo_buckets

    @property
    def num_lanes(self) -> int:
        return GROUP_LANES * self.num_groups

    def geometry(self) -> Geometry:
        return Geometry(self.num_symbols, self.row_length, self.chunk_size)

    def to_array(self) -> np.ndarray:
        return np.array(astuple(self), dtype=np.int64)

    @classmethod
    def from_array(cls, arr: np.ndarray) -> Header:
        return cls(*(int(v) for v in arr))


HEADER_LEN = len(fields(Header))


@dataclass(frozen=True)
class Geometry:
    """How symbols map to lanes and groups.

    Symbols are rows of ``row_length`` (the last row may be short). Each row is cut into
    ``segments`` lanes of ``chunk_size`` symbols (the last lane of a row may be short). Group
    ``g = row_block * segments + p`` holds the lanes of rows ``32 * row_block + l`` (``l < 32``)
    at segment ``p``: on a GPU one warp, with one row per thread and the same columns in every
    lane, so the activations a GEMV needs are the same for the whole warp. Lane ``32 g + l``.
    Rows past the end pad the last row block with empty lanes.
    """

    num_symbols: int
    row_length: int
    chunk_size: int

    @property
    def rows(self) -> int:
        return -(-self.num_symbols // self.row_length)

    @property
    def segments(self) -> int:
        return -(-self.row_length // self.chunk_size)

    @property
    def row_blocks(self) -> int:
        return -(-self.rows // GROUP_LANES)

    @property
    def num_groups(self) -> int:
        return self.row_blocks * self.segments

    @property
    def num_lanes(self) -> int:
        return GROUP_LANES * self.num_groups

    def lane_lengths(self) -> np.ndarray:
        """int64 [num_lanes]: symbols in each lane (0 for padding lanes)."""
        g = np.arange(self.num_groups, dtype=np.int64)
        rb, p = np.divmod(g, self.segments)
        row = rb[:, None] * GROUP_LANES + np.arange(GROUP_LANES, dtype=np.int64)[None, :]
        row_len = np.where(row < self.rows - 1, self.row_length, 0)
        row_len = np.where(row == self.rows - 1, self.num_symbols - (self.rows - 1) * self.row_length, row_len)
        start = (p * self.chunk_size)[:, None]
        return np.clip(row_len - start, 0, self.chunk_size).reshape(-1)


def auto_segment(row_length: int, target: int | None = None) -> int:
    """Lane length for rows of ``row_length``: the row cut into a power of two (<= 32) of
    lanes of about ``target`` symbols, rounded up to a multiple of 4 (aligned GPU loads).

    Shorter lanes give a GPU more independent decoders but cost ~13 stored bits each (the
    flushed 32-bit state is ~8 bits longer than its information, plus a 4-bit tail count):
    about 0.02 b/sym at 1024, 0.04 at 512 (measured: benchmarks/RESULTS.md, section 4).
    """
    target = SEGMENT_TARGET if target is None else target
    if row_length <= 0:
        return 1
    p = int(2 ** round(np.log2(max(row_length / max(target, 1), 1.0))))
    p = max(1, min(p, MAX_SEGMENTS))
    seg = -(-row_length // p)
    seg = -(-seg // 4) * 4
    return max(1, min(seg, MAX_CHUNK_SIZE, -(-row_length // 4) * 4))


GPU_LANES = 1 << 16
"""Lanes a GPU needs in flight to hide the ~60-cycle dependent chain of a decode step (Little's
law at ~5 decoded symbols per SM-cycle on 132 SMs); see benchmarks/entropy_kernels_notes.md."""


def gpu_segment(rows: int, row_length: int) -> int:
    """Lane length for the GPU layout of a ``rows x row_length`` weight: about ``GPU_LANES``
    lanes, lanes of 256..1024 symbols (short lanes cost bits; long ones leave a GPU idle)."""
    want = rows * row_length / GPU_LANES
    target = max(256, min(1024, 1 << max(0, int(round(np.log2(max(want, 1.0)))))))
    return auto_segment(row_length, target)
