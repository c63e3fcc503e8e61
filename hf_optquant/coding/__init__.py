"""Lossless variable-length coding of uniform-grid indices: interleaved rANS (format version 2).

Orr, Ribar & Luschi (2025) show that a uniform grid followed by an entropy code is the best
weight format, and count its cost as the entropy of the indices. This package ships the real
coder, together with a stored layout that a GPU decodes in parallel, one warp per 32 lanes.

Public API
----------
``encode_symbols(symbols, *, chunk_size=None, row_length=None) -> CodedStream``
    Any-shape int8/uint8/int16/int32/int64 tensor, flattened row-major; values may span the
    full int64 range. ``row_length=None`` (default): the stored, size-first layout (rows of
    ``chunk_size`` = 4096 symbols, one lane each). ``row_length=K``: the GPU layout of a weight
    with rows of ``K`` (each row cut into lanes of ``chunk_size``, default ~512; direct values
    kept within [-127, 127]). Encoding runs with torch ops on the symbols' device.
``decode_symbols(stream) -> torch.Tensor``
    A 1-D int64 tensor equal to the input, bit for bit. It validates the stream first.
``stream_from_tensors(tensors) -> CodedStream``
    Validates loaded tensors (names, dtypes, shapes, header, table, lane tails, word counts, CRC32).
``estimate_bits(symbols, *, chunk_size=None, row_length=None) -> float``
    Predicts ``nbits`` without coding (within 0.5 % from 64k symbols; tested).
``CodedStream.nbits``
    Equals ``8 * sum(t.nbytes)`` over all its tensors: the all-inclusive cost.
``CorruptStreamError``
    Raised for every detected corruption. It is a subclass of ValueError.

Why rANS, lanes and groups (measured: benchmarks/RESULTS.md, section 4)
-----------------------------------------------------------------------
* A 12-bit length-limited Huffman code over the same alphabet wastes 0.035-0.11 b/sym over H
  (prefix-code redundancy). rANS with 12-bit frequencies stores everything in H + 0.006-0.009
  b/sym in the stored layout (1M and 16.8M symbols, H = 2..6).
* A lane is one rANS state decoded sequentially; it costs ~20 bits (its flushed 32-bit state
  holds ~24 bits of information, the first symbols coded from state 1 waste ~7, a 4-bit tail
  count, 1 bit of its group's word count). A GPU needs ~64k lanes in flight to hide the latency
  of a decode step, i.e. lanes of ~256-1024 symbols on 8B-model layers (+0.02-0.08 b/sym), so
  the stored layout stays size-first and ``hf_optquant.kernels.grid_linear.pack_grid_weight``
  re-encodes a weight for the GPU when it loads it: by default into the prefix-code lanes of
  ``prefix.py`` (a 12-bit-limited canonical Huffman code, up to three weights per table lookup,
  2-3x faster to decode than rANS on an H100 for ~0.15 b/sym more GPU memory), or into the rANS
  GPU row layout.
* Frequencies come from an exactly rate-optimal quantiser (frequencies.py) and tail values use
  logarithmic escape buckets whose raw bits are stored out of band (alphabet.py): a warp never
  takes an extra step for an escape.

Stored layout (format version 2)
--------------------------------
All tensors are 1-D, contiguous and on the CPU. int16 tensors hold uint16 bit patterns, int32
``states`` uint32 patterns.

``header`` int64[16]
    magic (0x4F51414E5332), version (2), num_symbols, row_length, chunk_size, prob_bits (12),
    lo, num_direct (D), num_hi_buckets (H), num_lo_buckets (B), num_escapes, escape_bits,
    num_groups, num_tail_ext, payload_words, crc32. See ``layout.Header``.
``freqs`` int16[D + H + B]
    One frequency per alphabet entry, summing to ``M = 4096``, each at most 4095. Entry
    ``i < D`` codes the value ``lo + i``; entry ``D + b`` is escape bucket ``b`` above
    ``hi = lo + D - 1`` (values ``hi + e``, ``e`` in ``[2**b, 2**(b+1))``); entry ``D + H + b``
    the same bucket below ``lo`` (values ``lo - e``).
``states`` int32[32 * num_groups]
    Each lane's initial decoder state (the encoder's final state).
``tails`` int8[16 * num_groups]
    Two 4-bit counts per byte (lane ``2i`` in the low nibble): the number of steps at the end
    of the lane that read no word. 15 means "the next ``tail_ext`` entry holds the count".
``tail_ext`` int16[num_tail_ext]
``group_words`` int32[num_groups]
    Words of each group; a group's offset is the exclusive cumsum.
``payload`` int16[payload_words]
    The groups back to back, each group's words in fetch order (below).
``escapes`` int8[ceil(escape_bits / 8)]
    The raw bits of the escaped values, in flat symbol order, little-endian bit string.

Geometry: symbols are rows of ``row_length`` (the last row may be short); a row is cut into
``P = ceil(row_length / chunk_size)`` lanes; group ``g = row_block * P + p`` holds the lanes of
rows ``32 * row_block + l`` (``l < 32``) at segment ``p``, lane index ``32 g + l``; rows past
the end are empty lanes (state 1, tail 0). Decoding one group (a GPU warp, one lane per thread)::

    lut[4096] from freqs: slot s in [cum[i], cum[i] + f[i]) -> symbol i
    x[l] = states[l];  last[l] = len[l] - 1 - tail[l];  p = offset of the group
    for l with last[l] >= 0, in lane order: pf[l] = payload[p++]            # first fetch
    for t in 0 .. chunk_size - 1, for every lane with t < len[l] (in lockstep):
        slot = x & 4095;  i = lut[slot];  emit i
        x = f[i] * (x >> 12) + slot - cum[i]
        if x < 2**16 and t <= last[l]:  x = (x << 16) | pf[l]               # renormalise
            if t < last[l]:  fetch pf[l] = payload[p++], lanes in order    # ballot rank
    a clean group ends with every x == 1 and p == the group's end

The state is 32 bits with ``L = 2**16`` and 16-bit renormalisation, so a step reads at most one
word, and a word is fetched one read ahead, keeping memory latency out of the decode chain.
Escaped symbols take their values from ``escapes`` in flat order (bucket ``b`` carries ``b``
raw bits). The CPU reference (rans.py) runs exactly this schedule with torch ops; the Triton
kernels (``hf_optquant.kernels.grid_linear``) run it with a warp ballot.

Robustness
----------
``stream_from_tensors`` (and therefore ``decode_symbols``) checks tensor names, dtypes, ranks,
devices and contiguity; every header field and its consistency with the geometry and tensor
sizes; that the frequencies sum to 4096; the tail counts and group word counts; a zlib CRC32
over the header and every stored byte. After decoding, every lane must end at state 1, every
group must consume exactly its words, and the escapes must match their buckets and raw bits.
The decoder is bounded for any contents: fixed iteration counts, clamped gathers, a state that
stays below 2**32. tests/test_coding_fuzz.py fuzzes all of this.

Known limits
------------
* A value that repeats far outside the direct range pays its raw bucket bits on every
  occurrence, because there is no literal table.
* Tensors under about 64k symbols are dominated by the fixed 1024-bit header and the table.
* Format version 1 streams (flat chunks, in-band escape digits) are no longer read.
"""

from .errors import CorruptStreamError
from .estimate import estimate_bits
from .layout import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, PROB_BITS
from .stream import CodedStream, decode_symbols, encode_symbols, stream_from_tensors

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "PROB_BITS",
    "CodedStream",
    "CorruptStreamError",
    "decode_symbols",
    "encode_symbols",
    "estimate_bits",
    "stream_from_tensors",
]
