"""The stored stream: building it, validating it, and decoding it."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np
import torch

from .alphabet import Alphabet, map_values, unmap_escapes
from .errors import CorruptStreamError
from .layout import (
    CHUNK_WORDS,
    DEFAULT_CHUNK_SIZE,
    FREQS,
    HEADER,
    HEADER_LEN,
    INT64_MAX,
    MAGIC,
    MAX_BUCKETS,
    MAX_CHUNK_SIZE,
    MAX_DIRECT,
    MAX_STEPS_PER_SYMBOL,
    PAYLOAD,
    PROB_BITS,
    PROB_SCALE,
    STATE_WORDS,
    TENSOR_NAMES,
    VERSION,
    Header,
)
from .rans import LaneGeometry, decode_lanes, encode_lanes
from .table import build_code_table

_DTYPES = {HEADER: torch.int64, FREQS: torch.int16, CHUNK_WORDS: torch.int16, PAYLOAD: torch.int16}
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True)
class CodedStream:
    """An entropy-coded symbol stream; ``tensors`` is *all* of its storage.

    ``freqs``, ``chunk_words`` and ``payload`` are int16 tensors holding uint16 bit patterns
    (int16 because it round-trips through every serialiser); ``header`` is int64.
    """

    tensors: dict[str, torch.Tensor]

    @property
    def nbits(self) -> int:
        """All-inclusive stored size in bits (payload, offsets, table, header)."""
        return 8 * sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def header(self) -> Header:
        return Header.from_array(self.tensors[HEADER].numpy())

    @property
    def num_symbols(self) -> int:
        return self.header.num_symbols

    @property
    def chunk_size(self) -> int:
        return self.header.chunk_size

    @property
    def num_chunks(self) -> int:
        return self.header.num_chunks


def _u16(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint16)


def _crc(header: Header, freqs: np.ndarray, chunk_words: np.ndarray, payload: np.ndarray) -> int:
    crc = zlib.crc32(header.to_array()[: HEADER_LEN - 1].tobytes())
    for arr in (freqs, chunk_words, payload):
        crc = zlib.crc32(np.ascontiguousarray(arr).tobytes(), crc)
    return crc


def _as_values(symbols: torch.Tensor) -> np.ndarray:
    if not isinstance(symbols, torch.Tensor):
        raise TypeError(f"symbols must be a torch.Tensor, got {type(symbols).__name__}")
    if symbols.dtype not in _INT_DTYPES:
        raise TypeError(f"symbols must have an integer dtype {_INT_DTYPES}, got {symbols.dtype}")
    return symbols.detach().to("cpu", torch.int64).reshape(-1).numpy()


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be an int in [1, {MAX_CHUNK_SIZE}], got {chunk_size!r}")


def encode_symbols(symbols: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> CodedStream:
    """Entropy-code integer symbols (any shape, flattened row-major) into a CodedStream."""
    _check_chunk_size(chunk_size)
    values = _as_values(symbols)
    table = build_code_table(values)
    alphabet = table.alphabet
    geometry = LaneGeometry(values.size, chunk_size)
    mapped = map_values(values, alphabet)
    lanes = encode_lanes(
        mapped.index,
        table.freqs,
        alphabet.num_direct,
        mapped.escape_pos,
        mapped.escape_raw,
        mapped.escape_bits,
        geometry,
    )
    assert lanes.chunk_words.max(initial=0) <= 0xFFFF  # guaranteed by MAX_CHUNK_SIZE
    freqs = table.freqs.astype(np.uint16)
    chunk_words = lanes.chunk_words.astype(np.uint16)
    header = Header(
        magic=MAGIC,
        version=VERSION,
        num_symbols=values.size,
        chunk_size=chunk_size,
        prob_bits=PROB_BITS,
        lo=alphabet.lo,
        num_direct=alphabet.num_direct,
        num_hi_buckets=alphabet.num_hi_buckets,
        num_lo_buckets=alphabet.num_lo_buckets,
        num_chunks=geometry.num_chunks,
        payload_words=lanes.payload.size,
        crc32=0,
    )
    header = replace(header, crc32=_crc(header, freqs, chunk_words, lanes.payload))
    tensors = {
        HEADER: torch.from_numpy(header.to_array()),
        FREQS: torch.from_numpy(freqs.view(np.int16)),
        CHUNK_WORDS: torch.from_numpy(chunk_words.view(np.int16)),
        PAYLOAD: torch.from_numpy(lanes.payload.view(np.int16)),
    }
    return CodedStream(tensors)


# --- validation -------------------------------------------------------------------------------


def _check_tensors(tensors: dict[str, torch.Tensor]) -> None:
    if not isinstance(tensors, dict):
        raise CorruptStreamError(f"expected a dict of tensors, got {type(tensors).__name__}")
    if set(tensors) != set(TENSOR_NAMES):
        raise CorruptStreamError(
            f"tensor names {sorted(map(str, tensors))} != expected {sorted(TENSOR_NAMES)}"
        )
    for name in TENSOR_NAMES:
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise CorruptStreamError(f"{name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype != _DTYPES[name]:
            raise CorruptStreamError(f"{name!r} has dtype {t.dtype}, expected {_DTYPES[name]}")
        if t.dim() != 1:
            raise CorruptStreamError(f"{name!r} must be 1-D, got shape {tuple(t.shape)}")
        if t.device.type != "cpu" or not t.is_contiguous():
            raise CorruptStreamError(f"{name!r} must be a contiguous CPU tensor")
    if tensors[HEADER].numel() != HEADER_LEN:
        raise CorruptStreamError(
            f"header has {tensors[HEADER].numel()} fields, expected {HEADER_LEN}"
        )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise CorruptStreamError(message)


def _check_header(h: Header, tensors: dict[str, torch.Tensor]) -> None:
    _require(h.magic == MAGIC, f"bad magic {h.magic:#x} (not an hf-optquant rANS stream)")
    _require(h.version == VERSION, f"unsupported format version {h.version}")
    _require(h.prob_bits == PROB_BITS, f"prob_bits {h.prob_bits} != {PROB_BITS}")
    _require(1 <= h.chunk_size <= MAX_CHUNK_SIZE, f"chunk_size {h.chunk_size} out of range")
    _require(h.num_symbols >= 0, f"negative num_symbols {h.num_symbols}")
    geometry = LaneGeometry(h.num_symbols, h.chunk_size)
    _require(h.num_chunks == geometry.num_chunks, f"num_chunks {h.num_chunks} inconsistent with "
             f"{h.num_symbols} symbols in chunks of {h.chunk_size}")
    _require(0 <= h.num_direct <= MAX_DIRECT, f"num_direct {h.num_direct} out of range")
    for side, nb in (("hi", h.num_hi_buckets), ("lo", h.num_lo_buckets)):
        _require(0 <= nb <= MAX_BUCKETS, f"num_{side}_buckets {nb} out of range")
    _require(h.lo + h.num_direct - 1 <= INT64_MAX, "direct range overflows int64")
    _require(h.num_symbols == 0 or h.alphabet_size >= 1, "empty alphabet for a non-empty stream")
    _require(h.num_symbols > 0 or h.alphabet_size == 0, "non-empty table for an empty stream")
    for name, expected in ((FREQS, h.alphabet_size), (CHUNK_WORDS, h.num_chunks),
                           (PAYLOAD, h.payload_words)):
        got = tensors[name].numel()
        _require(got == expected, f"{name!r} has {got} entries, header says {expected}")


def _check_table(freqs: np.ndarray, h: Header) -> None:
    if h.num_symbols == 0:
        return
    total = int(freqs.astype(np.int64).sum())
    _require(total == PROB_SCALE, f"frequencies sum to {total}, expected {PROB_SCALE}")


def _check_chunks(chunk_words: np.ndarray, h: Header) -> None:
    if h.num_chunks == 0:
        return
    sizes = chunk_words.astype(np.int64)
    geometry = LaneGeometry(h.num_symbols, h.chunk_size)
    lens = np.full(h.num_chunks, h.chunk_size, dtype=np.int64)
    lens[-1] = geometry.last_len
    most = STATE_WORDS + MAX_STEPS_PER_SYMBOL * lens
    bad = np.flatnonzero((sizes < STATE_WORDS) | (sizes > most))
    _require(bad.size == 0, f"chunk {bad[0] if bad.size else -1} has an impossible word count")
    _require(int(sizes.sum()) == h.payload_words,
             f"chunk word counts sum to {int(sizes.sum())}, payload has {h.payload_words}")


def stream_from_tensors(tensors: dict[str, torch.Tensor]) -> CodedStream:
    """Validate stored tensors (e.g. loaded from safetensors) and wrap them as a CodedStream.

    Checks names, dtypes, shapes, header fields, table validity (frequency sum), chunk word
    counts and the CRC32 over all stored bytes; raises CorruptStreamError on any mismatch.
    """
    _check_tensors(tensors)
    h = Header.from_array(tensors[HEADER].numpy())
    _check_header(h, tensors)
    freqs, chunk_words = _u16(tensors[FREQS]), _u16(tensors[CHUNK_WORDS])
    payload = _u16(tensors[PAYLOAD])
    crc = _crc(h, freqs, chunk_words, payload)
    _require(crc == h.crc32, f"CRC32 mismatch: stored {h.crc32:#010x}, computed {crc:#010x}")
    _check_table(freqs, h)
    _check_chunks(chunk_words, h)
    return CodedStream(dict(tensors))


def decode_symbols(stream: CodedStream) -> torch.Tensor:
    """Decode a stream back to a 1-D int64 tensor of the original symbols (bit-exact).

    Re-validates the stream first (cheap next to decoding), so a CodedStream built by hand
    or mutated after loading cannot slip through.
    """
    stream = stream_from_tensors(stream.tensors)
    h = stream.header
    t = stream.tensors
    alphabet = Alphabet(h.lo, h.num_direct, h.num_hi_buckets, h.num_lo_buckets)
    return torch.from_numpy(
        decode_unchecked(h, _u16(t[FREQS]), _u16(t[CHUNK_WORDS]), _u16(t[PAYLOAD]), alphabet)
    )


def decode_unchecked(
    h: Header, freqs: np.ndarray, chunk_words: np.ndarray, payload: np.ndarray, alphabet: Alphabet
) -> np.ndarray:
    """Decode without the up-front validation; still bounded and still self-checking.

    Used by ``decode_symbols`` after validation, and directly by tests to show that even
    unvalidated garbage cannot hang or crash the decoder: it raises CorruptStreamError when
    a chunk does not end cleanly or an escape leaves int64.
    """
    geometry = LaneGeometry(h.num_symbols, h.chunk_size)
    decoded = decode_lanes(
        payload, chunk_words, freqs, alphabet.num_direct, alphabet.bucket_bits(), geometry
    )
    if decoded.bad_chunks.size:
        raise CorruptStreamError(
            f"{decoded.bad_chunks.size} chunk(s) did not decode cleanly (first: chunk "
            f"{decoded.bad_chunks[0]}): final rANS state or word count mismatch"
        )
    out = decoded.index.astype(np.int64) + np.int64(alphabet.lo)
    if decoded.escape_pos.size:
        vals, ok = unmap_escapes(alphabet, decoded.index[decoded.escape_pos], decoded.escape_raw)
        _require(bool(ok.all()), "escaped value outside the int64 range")
        out[decoded.escape_pos] = vals
    return out
