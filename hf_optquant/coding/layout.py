"""Constants of the stored format and the typed view of its header tensor.

Everything a decoder (CPU or GPU) must agree on lives here, so that the encoder, the
validator, the size estimator and a future Triton kernel read one source of truth.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields

import numpy as np

# --- rANS parameters ------------------------------------------------------------------------
PROB_BITS = 12
"""Frequencies sum to ``2**PROB_BITS``; the slot -> symbol lookup table has that many entries."""
PROB_SCALE = 1 << PROB_BITS
WORD_BITS = 16
"""The payload is a sequence of 16-bit words; a lane reads at most one word per decode step."""
STATE_LOWER = 1 << 16
"""Normalised states live in ``[STATE_LOWER, 2**32)``: 32-bit state, 16-bit renormalisation."""
ENCODE_LIMIT_SHIFT = 32 - PROB_BITS
"""The encoder emits a word before coding a symbol of frequency f iff ``x >= f << 20``."""
INITIAL_STATE = 1
"""Encoders start at state 1 (not STATE_LOWER), so the first symbols are paid for by the
flushed final state rather than by 16 wasted bits; a clean decode must end at this state."""

# --- escape mechanism -----------------------------------------------------------------------
MAX_BUCKETS = 64
"""Escape buckets per side. Bucket b holds distances e in [2**b, 2**(b+1)), b <= 63."""
DIGIT_BITS = 12
"""Escape raw bits are coded as uniform rANS digits of up to 12 bits (one step each)."""
MAX_DIGITS = 6
"""ceil(63 / 12): the most digit steps any escaped symbol needs."""
MAX_STEPS_PER_SYMBOL = 1 + MAX_DIGITS
"""Each step emits at most one word, which bounds a chunk's word count."""

# --- layout limits --------------------------------------------------------------------------
DEFAULT_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 8192
"""So that a chunk's word count (<= 2 + 7 * chunk_size) always fits its uint16 size entry."""
MAX_DIRECT = 1 << 16
"""Most directly coded values (table entries before the escape buckets)."""
STATE_WORDS = 2
"""Each chunk starts with its final encoder state, high word first."""

# --- tensor names and dtypes ----------------------------------------------------------------
HEADER = "header"
FREQS = "freqs"
CHUNK_WORDS = "chunk_words"
PAYLOAD = "payload"
TENSOR_NAMES = (HEADER, FREQS, CHUNK_WORDS, PAYLOAD)
"""Fixed order, also the order in which bytes enter the CRC32."""

MAGIC = 0x4F51_414E_5331  # "OQANS1"
VERSION = 1
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class Header:
    """The int64 ``header`` tensor, field by field (this order is the storage order)."""

    magic: int
    version: int
    num_symbols: int
    chunk_size: int
    prob_bits: int
    lo: int
    """Smallest directly coded value; direct values are ``lo .. lo + num_direct - 1``."""
    num_direct: int
    num_hi_buckets: int
    """Escape buckets for values above the direct range (table entries after the direct)."""
    num_lo_buckets: int
    """Escape buckets for values below the direct range (the last table entries)."""
    num_chunks: int
    payload_words: int
    crc32: int
    """zlib.crc32 over header fields 0..10 then freqs, chunk_words, payload (raw bytes)."""

    @property
    def alphabet_size(self) -> int:
        return self.num_direct + self.num_hi_buckets + self.num_lo_buckets

    def to_array(self) -> np.ndarray:
        return np.array(astuple(self), dtype=np.int64)

    @classmethod
    def from_array(cls, arr: np.ndarray) -> Header:
        return cls(*(int(v) for v in arr))


HEADER_LEN = len(fields(Header))
