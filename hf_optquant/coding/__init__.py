"""Lossless variable-length coding of uniform-grid indices: chunked rANS.

Orr, Ribar & Luschi (2025) show that a uniform grid followed by an entropy code is the best
weight format, and count its cost as the entropy of the indices. This package ships the
real coder, together with a stored layout that a GPU decodes in parallel.

Public API
----------
``encode_symbols(symbols, *, chunk_size=4096) -> CodedStream``
    Takes any-shape int8/uint8/int16/int32/int64 tensor (flattened row-major). Values may
    span the full int64 range.
``decode_symbols(stream) -> torch.Tensor``
    Returns a 1-D int64 tensor that matches the input bit for bit. It validates the stream first.
``stream_from_tensors(tensors) -> CodedStream``
    Validates loaded tensors (names, dtypes, shapes, header, table, chunk sizes, CRC32).
``estimate_bits(symbols, *, chunk_size=4096) -> float``
    Predicts ``nbits`` without coding. Measured accuracy is better than 0.01 % on
    tensors of 1M symbols or more and within 0.5 % from 64k symbols (tested). In all
    cases it is within about 24 bits per chunk.
    Cost: one histogram plus a table search, about 0.1 s for 16.7M symbols.
``CodedStream.nbits``
    Equals ``8 * sum(t.nbytes)`` over all four tensors: the all-inclusive cost.
``CorruptStreamError``
    Raised for every detected corruption. It is a subclass of ValueError.

Why rANS, and why 4096-symbol chunks (measured: benchmarks/RESULTS.md, section 4)
------------------------------------------------------------------------------
Test data: round(x / delta) indices of Normal, Laplace and Student-t(5) samples at
empirical entropies H = 2..6 bits.

* A 12-bit length-limited canonical Huffman code over the same alphabet and chunk layout
  wastes 0.034-0.11 b/sym over H. The loss comes from prefix-code redundancy and is worst
  at low entropy. This misses the 0.02 b/sym target everywhere.
* rANS with 12-bit frequencies and the same 4096-entry decode table stores everything in
  H + 0.009-0.011 b/sym at 1024x1024 and H + 0.0083-0.0096 b/sym at 4096x4096.
  constriction's single-stream ANS (ideal model, payload only) lands within 5e-5 of H.
  So the remaining gap is the price of independent chunks and the table.
* Each chunk costs about 32 bits: a 16-bit size entry, about 8 bits of average waste in
  the flushed 32-bit state, and about 8 bits of precision loss. For H = 2..6 at
  4096x4096 the total overhead is 0.058-0.063 b/sym at chunk_size 512, 0.030-0.032 at 1024,
  0.016-0.018 at 2048, 0.008-0.010 at 4096 and 0.004-0.006 at 8192.
  We chose 4096. It meets the target with margin on 1M-symbol tensors, where table
  costs matter more, and still gives a 4096x4096 tensor 4096 independent lanes.
  ``chunk_size`` is stored per stream, so callers can pick 2048 when they need more
  parallelism.
* Two more choices: frequencies come from an exactly rate-optimal quantiser
  (frequencies.py), and tail values use logarithmic escape buckets (alphabet.py).
  Together they keep the loss from 12-bit frequencies at about 0.002 b/sym, even for
  Student-t tails. Plain rounding with a full table costs up to 0.07.

Stored layout (format version 1), for a GPU decoder
----------------------------------------------------
All four tensors are 1-D and contiguous, on the CPU. The int16 tensors hold uint16 bit
patterns: read them with ``& 0xFFFF``.

``header`` int64[12]
    Fields in order: magic (0x4F51414E5331), version (1), num_symbols, chunk_size,
    prob_bits (12), lo, num_direct (D), num_hi_buckets (H), num_lo_buckets (B),
    num_chunks, payload_words, crc32. See ``layout.Header``.
``freqs`` int16[D + H + B]
    The code table, one frequency per alphabet entry, summing to ``M = 4096``.
    Entry ``i < D`` codes the value ``lo + i``.
    Entry ``D + b`` is escape bucket ``b`` above ``hi = lo + D - 1``: values
    ``hi + e`` with ``e`` in ``[2**b, 2**(b+1))``.
    Entry ``D + H + b`` is the same bucket below: values ``lo - e``.
    ``b <= 63``.
``chunk_words`` int16[num_chunks]
    The number of 16-bit words in each chunk, including its 2 state words (at most
    ``2 + 7 * chunk_size``). A chunk's offset is the exclusive cumsum, so run one
    ``cumsum`` before launching the kernel.
``payload`` int16[payload_words]
    The chunks back to back. Each chunk is ``[x >> 16, x & 0xFFFF, words...]``, where
    ``x`` is the 32-bit starting state, followed by the words in read order.

Chunk ``j`` holds symbols ``j * chunk_size ..`` (the last chunk may be short). Every
chunk decodes independently, one lane (thread) per chunk, sequentially::

    build lut[4096] from freqs:  slot s in [cum[i], cum[i] + f[i]) -> symbol i
        (packed form in frequencies.packed_decode_table: i | (s - cum[i]) << 20 | f[i] << 32)
    x = (w[p] << 16) | w[p + 1];  p += 2;  end = offset + chunk_words[j]
    repeat len_j times:
        slot = x & 4095;  i = lut[slot]
        x = f[i] * (x >> 12) + slot - cum[i]
        if x < 65536 and p < end:  x = (x << 16) | w[p];  p += 1     # at most one read
        if i < D: emit lo + i
        else: b = bucket(i); raw = 0
              for k in 0 .. ceil(b / 12) - 1:                         # <= 6 digit steps
                  wk = min(12, b - 12 * k)
                  digit = slot' >> (12 - wk) where slot' = x & 4095
                  x = (x >> 12 << (12 - wk)) + (slot' & ((1 << (12 - wk)) - 1))
                  renormalise as above;  raw |= digit << (12 * k)
              emit hi + (2**b + raw)  or  lo - (2**b + raw)
    a clean chunk ends with x == 1 and p == end

The state is 32 bits, with ``L = 2**16`` and 16-bit renormalisation, so a step does at
most one conditional read. Everything fits in uint32 arithmetic. The decode table has
4096 entries (8 KiB as uint16 symbol indices plus frequency and start tables).
The encoder starts at state 1, not at L, which saves 16 bits per chunk; that is why
reads are gated on ``p < end``. The CPU reference (rans.py) runs exactly this schedule
with numpy: a loop over position within the chunk, vectorised across all chunks.

Robustness
----------
``stream_from_tensors`` (and therefore ``decode_symbols``) checks:

* tensor names, dtypes, rank, device and contiguity;
* every header field range and the consistency between fields and tensor sizes;
* that the frequencies sum to 4096;
* the chunk word bounds and their sum;
* a zlib CRC32 over the header and every stored byte.

After decoding, each chunk must end at state 1 with all of its words consumed. The
decoder itself is bounded for any contents: fixed iteration counts, clamped gathers,
and a decode table that is always 4096 valid entries. tests/test_coding_fuzz.py fuzzes
all of this.

Known limits
------------
* A value that repeats far outside the direct range (for example int64 extremes at 0.1 %
  frequency) pays its raw bucket bits on every occurrence, because there is no literal
  table.
* Tensors under about 64k symbols are dominated by the fixed 768-bit header and the
  table.
* The symbol count lives only in the header, which the CRC protects: a chunk can end
  with a free run of its first alphabet symbol.
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
