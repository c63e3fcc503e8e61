"""The stored stream: building it, validating it, and decoding it."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np
import torch

from .alphabet import Alphabet, map_values, pack_raw_bits, unmap_escapes, unpack_raw_bits
from .errors import CorruptStreamError
from .layout import (
    DEFAULT_CHUNK_SIZE,
    ESCAPES,
    FREQS,
    GPU_WINDOW,
    GROUP_LANES,
    GROUP_WORDS,
    HEADER,
    HEADER_LEN,
    INITIAL_STATE,
    INT64_MAX,
    MAGIC,
    MAX_BUCKETS,
    MAX_CHUNK_SIZE,
    MAX_DIRECT,
    MAX_FREQ,
    PAYLOAD,
    PROB_BITS,
    PROB_SCALE,
    STATES,
    TAIL_EXT,
    TAIL_EXT_NAME,
    TAILS,
    TENSOR_NAMES,
    VERSION,
    Geometry,
    Header,
    auto_segment,
)
from .rans import CodedLanes, decode_lanes, encode_lanes
from .table import build_code_table

_DTYPES = {
    HEADER: torch.int64, FREQS: torch.int16, STATES: torch.int32, TAILS: torch.int8,
    TAIL_EXT_NAME: torch.int16, GROUP_WORDS: torch.int32, PAYLOAD: torch.int16, ESCAPES: torch.int8,
}  # fmt: skip
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
_MAX_ROW_LENGTH = 1 << 40


@dataclass(frozen=True)
class CodedStream:
    """An entropy-coded symbol stream; ``tensors`` is *all* of its storage.

    ``freqs`` and ``payload`` hold uint16 bit patterns in int16, ``states`` uint32 patterns in
    int32, ``tails`` two 4-bit counts per byte (int8, because signed types round-trip through
    every serialiser); ``header`` is int64.
    """

    tensors: dict[str, torch.Tensor]

    @property
    def nbits(self) -> int:
        """All-inclusive stored size in bits (payload, states, tails, table, escapes, header)."""
        return 8 * sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def header(self) -> Header:
        return Header.from_array(self.tensors[HEADER].cpu().numpy())

    @property
    def num_symbols(self) -> int:
        return self.header.num_symbols

    @property
    def chunk_size(self) -> int:
        return self.header.chunk_size

    @property
    def num_lanes(self) -> int:
        return self.header.num_lanes

    @property
    def num_groups(self) -> int:
        return self.header.num_groups


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().numpy().tobytes()


def _crc(header: Header, tensors: dict[str, torch.Tensor]) -> int:
    crc = zlib.crc32(header.to_array()[: HEADER_LEN - 1].tobytes())
    for name in TENSOR_NAMES[1:]:
        crc = zlib.crc32(_raw(tensors[name]), crc)
    return crc


def _as_values(symbols: torch.Tensor) -> torch.Tensor:
    if not isinstance(symbols, torch.Tensor):
        raise TypeError(f"symbols must be a torch.Tensor, got {type(symbols).__name__}")
    if symbols.dtype not in _INT_DTYPES:
        raise TypeError(f"symbols must have an integer dtype {_INT_DTYPES}, got {symbols.dtype}")
    return symbols.detach().to(torch.int64).reshape(-1)


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be an int in [1, {MAX_CHUNK_SIZE}], got {chunk_size!r}")


def stream_geometry(
    numel: int, chunk_size: int | None, row_length: int | None
) -> tuple[Geometry, tuple[int, int] | None]:
    """Geometry and direct-value window of a stream of ``numel`` symbols.

    ``row_length=None`` (the default, size first): rows of ``chunk_size`` symbols (default 4096),
    one lane each, no window. ``row_length=K`` (the GPU layout of a weight with rows of K): each
    row cut into lanes of ``chunk_size`` (default :func:`~hf_optquant.coding.layout.auto_segment`),
    direct values kept inside ``GPU_WINDOW``.
    """
    if chunk_size is not None:
        _check_chunk_size(chunk_size)
    if row_length is None:
        seg = chunk_size if chunk_size is not None else DEFAULT_CHUNK_SIZE
        return Geometry(numel, seg, seg), None
    if not isinstance(row_length, int) or isinstance(row_length, bool) or not 1 <= row_length <= _MAX_ROW_LENGTH:
        raise ValueError(f"row_length must be None or an int in [1, {_MAX_ROW_LENGTH}], got {row_length!r}")
    seg = chunk_size if chunk_size is not None else auto_segment(row_length)
    return Geometry(numel, row_length, seg), GPU_WINDOW


def encode_symbols(
    symbols: torch.Tensor, *, chunk_size: int | None = None, row_length: int | None = None
) -> CodedStream:
    """Entropy-code integer symbols into a CodedStream (CPU tensors, CRC32 included).

    Symbols are flattened row-major (any shape); ``row_length`` selects the GPU's row layout
    (see :func:`stream_geometry`). Encoding runs on the symbols' device.
    """
    tensors = encode_tensors(symbols, chunk_size=chunk_size, row_length=row_length)
    return CodedStream({k: v.cpu() for k, v in tensors.items()})


def encode_tensors(
    symbols: torch.Tensor, *, chunk_size: int | None = None, row_length: int | None = None, crc: bool = True
) -> dict:
    """:func:`encode_symbols` without the move to the CPU (``crc=False`` stores 0 as the CRC:
    such tensors only serve a trusted in-process consumer, e.g. a GPU repacking a weight)."""
    values = _as_values(symbols)
    geometry, window = stream_geometry(values.numel(), chunk_size, row_length)
    dev = values.device
    table = build_code_table(values, window)
    alphabet = table.alphabet
    mapped = map_values(values, alphabet)
    lanes = encode_lanes(mapped.index, table.freqs, geometry)
    header = Header(
        magic=MAGIC, version=VERSION, num_symbols=geometry.num_symbols, row_length=geometry.row_length,
        chunk_size=geometry.chunk_size, prob_bits=PROB_BITS, lo=alphabet.lo, num_direct=alphabet.num_direct,
        num_hi_buckets=alphabet.num_hi_buckets, num_lo_buckets=alphabet.num_lo_buckets,
        num_escapes=mapped.escape_bits.size, escape_bits=int(mapped.escape_bits.sum()),
        num_groups=geometry.num_groups, num_tail_ext=0, payload_words=lanes.payload.numel(), crc32=0,
    )  # fmt: skip
    tensors = _lane_tensors(lanes, geometry, dev)
    header = replace(header, num_tail_ext=tensors[TAIL_EXT_NAME].numel())
    tensors[FREQS] = torch.from_numpy(table.freqs.astype(np.uint16).view(np.int16)).to(dev)
    raw = pack_raw_bits(mapped.escape_raw, mapped.escape_bits)
    tensors[ESCAPES] = torch.from_numpy(raw.view(np.int8).copy()).to(dev)
    if crc:
        header = replace(header, crc32=_crc(header, tensors))
    tensors[HEADER] = torch.from_numpy(header.to_array()).to(dev)
    return {name: tensors[name] for name in TENSOR_NAMES}


def _lane_tensors(lanes: CodedLanes, geometry: Geometry, dev: torch.device) -> dict[str, torch.Tensor]:
    lens = torch.as_tensor(geometry.lane_lengths(), device=dev)
    tail = lens - 1 - lanes.last  # trailing steps without a read, in [0, len]
    nib = tail.clamp_max(TAIL_EXT)
    ext = tail[tail >= TAIL_EXT].to(torch.int16)  # the full counts of the lanes marked 15, in lane order
    packed = (nib[0::2] | (nib[1::2] << 4)).to(torch.uint8).view(torch.int8)
    states = lanes.states.to(torch.int64)
    states = torch.where(states >= 1 << 31, states - (1 << 32), states).to(torch.int32)
    payload = lanes.payload.to(torch.int32)
    payload = torch.where(payload >= 1 << 15, payload - (1 << 16), payload).to(torch.int16)
    return {
        STATES: states.contiguous(), TAILS: packed.contiguous(), TAIL_EXT_NAME: ext.contiguous(),
        GROUP_WORDS: lanes.group_words.to(torch.int32).contiguous(), PAYLOAD: payload.contiguous(),
    }  # fmt: skip


# --- validation -------------------------------------------------------------------------------


def _check_tensors(tensors: dict[str, torch.Tensor]) -> None:
    if not isinstance(tensors, dict):
        raise CorruptStreamError(f"expected a dict of tensors, got {type(tensors).__name__}")
    if set(tensors) != set(TENSOR_NAMES):
        raise CorruptStreamError(f"tensor names {sorted(map(str, tensors))} != expected {sorted(TENSOR_NAMES)}")
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
        raise CorruptStreamError(f"header has {tensors[HEADER].numel()} fields, expected {HEADER_LEN}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise CorruptStreamError(message)


def _check_header(h: Header, tensors: dict[str, torch.Tensor]) -> None:
    _require(h.magic == MAGIC, f"bad magic {h.magic:#x} (not an hf-optquant rANS v2 stream)")
    _require(h.version == VERSION, f"unsupported format version {h.version} (this reader: {VERSION})")
    _require(h.prob_bits == PROB_BITS, f"prob_bits {h.prob_bits} != {PROB_BITS}")
    _require(1 <= h.chunk_size <= MAX_CHUNK_SIZE, f"chunk_size {h.chunk_size} out of range")
    _require(1 <= h.row_length <= _MAX_ROW_LENGTH, f"row_length {h.row_length} out of range")
    _require(0 <= h.num_symbols <= 1 << 48, f"num_symbols {h.num_symbols} out of range")
    geometry = h.geometry()
    _require(h.num_groups == geometry.num_groups, f"num_groups {h.num_groups} inconsistent with "
             f"{h.num_symbols} symbols in rows of {h.row_length} and lanes of {h.chunk_size}")
    _require(0 <= h.num_direct <= MAX_DIRECT, f"num_direct {h.num_direct} out of range")
    for side, nb in (("hi", h.num_hi_buckets), ("lo", h.num_lo_buckets)):
        _require(0 <= nb <= MAX_BUCKETS, f"num_{side}_buckets {nb} out of range")
    _require(h.lo + h.num_direct - 1 <= INT64_MAX, "direct range overflows int64")
    _require(h.num_symbols == 0 or h.alphabet_size >= 2, "a non-empty stream needs two alphabet entries")
    _require(h.num_symbols > 0 or h.alphabet_size == 0, "non-empty table for an empty stream")
    _require(0 <= h.num_escapes <= h.num_symbols, f"num_escapes {h.num_escapes} out of range")
    _require(0 <= h.escape_bits <= 63 * h.num_escapes, f"escape_bits {h.escape_bits} out of range")
    _require(0 <= h.num_tail_ext <= h.num_lanes, f"num_tail_ext {h.num_tail_ext} out of range")
    expected = {FREQS: h.alphabet_size, STATES: h.num_lanes, TAILS: h.num_lanes // 2,
                TAIL_EXT_NAME: h.num_tail_ext, GROUP_WORDS: h.num_groups, PAYLOAD: h.payload_words,
                ESCAPES: -(-h.escape_bits // 8)}  # fmt: skip
    for name, count in expected.items():
        got = tensors[name].numel()
        _require(got == count, f"{name!r} has {got} entries, header says {count}")


def _u16(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint16).astype(np.int64)


def _check_table(freqs: np.ndarray, h: Header) -> None:
    if h.num_symbols == 0:
        return
    total = int(freqs.sum())
    _require(total == PROB_SCALE, f"frequencies sum to {total}, expected {PROB_SCALE}")
    _require(int(freqs.max()) <= MAX_FREQ, f"a frequency exceeds {MAX_FREQ}")


def lane_last_reads(tails: torch.Tensor, tail_ext: torch.Tensor, geometry: Geometry) -> np.ndarray:
    """int64 [num_lanes]: each lane's last read step (-1: none) from the stored tail counts.

    Raises CorruptStreamError if the counts are inconsistent with the lane lengths.
    """
    raw = tails.numpy().view(np.uint8).astype(np.int64)
    nib = np.stack([raw & 0xF, raw >> 4], 1).reshape(-1)
    ext = tail_ext.numpy().astype(np.int64)
    lens = geometry.lane_lengths()
    marked = np.flatnonzero(nib == TAIL_EXT)
    _require(marked.size == ext.size, f"{marked.size} lanes have tail count 15 but tail_ext has {ext.size} entries")
    tail = nib.copy()
    tail[marked] = ext
    _require(bool((ext >= TAIL_EXT).all()), "a tail_ext entry is below 15")
    _require(bool((tail <= lens).all()), "a lane's tail count exceeds its length")
    empty = lens == 0
    return np.where(empty, -1, lens - 1 - tail)


def _check_lanes(tensors: dict[str, torch.Tensor], h: Header) -> np.ndarray:
    geometry = h.geometry()
    last = lane_last_reads(tensors[TAILS], tensors[TAIL_EXT_NAME], geometry)
    states = tensors[STATES].numpy().astype(np.int64) & 0xFFFFFFFF
    empty = geometry.lane_lengths() == 0
    _require(bool((states[empty] == INITIAL_STATE).all()), "an empty lane has a non-initial state")
    words = tensors[GROUP_WORDS].numpy().astype(np.int64)
    most = GROUP_LANES * h.chunk_size
    bad = np.flatnonzero((words < 0) | (words > most))
    _require(bad.size == 0, f"group {bad[0] if bad.size else -1} has an impossible word count")
    _require(int(words.sum()) == h.payload_words,
             f"group word counts sum to {int(words.sum())}, payload has {h.payload_words}")
    return last


def stream_from_tensors(tensors: dict[str, torch.Tensor]) -> CodedStream:
    """Validate stored tensors (e.g. loaded from safetensors) and wrap them as a CodedStream.

    Checks names, dtypes, shapes, header fields, table validity, lane tail counts, group word
    counts and the CRC32 over all stored bytes; raises CorruptStreamError on any mismatch.
    """
    _check_tensors(tensors)
    h = Header.from_array(tensors[HEADER].numpy())
    _check_header(h, tensors)
    crc = _crc(h, tensors)
    _require(crc == h.crc32, f"CRC32 mismatch: stored {h.crc32:#010x}, computed {crc:#010x}")
    _check_table(_u16(tensors[FREQS]), h)
    _check_lanes(tensors, h)
    return CodedStream(dict(tensors))


def decode_symbols(stream: CodedStream) -> torch.Tensor:
    """Decode a stream back to a 1-D int64 tensor of the original symbols (bit-exact).

    Re-validates the stream first (cheap next to decoding), so a CodedStream built by hand or
    mutated after loading cannot slip through.
    """
    stream = stream_from_tensors(stream.tensors)
    return decode_unchecked(stream.tensors)


def decode_unchecked(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Decode structurally valid tensors without the CRC; still bounded and self-checking.

    Used by ``decode_symbols`` after validation, and by tests to show that even garbage with a
    forged checksum cannot hang or crash the decoder: it raises CorruptStreamError when a lane
    does not end at the initial state, a group does not consume exactly its words, or the
    escape symbols do not match the stored escaped values.
    """
    h = Header.from_array(tensors[HEADER].numpy())
    geometry = h.geometry()
    last = _check_lanes(tensors, h)
    freqs = _u16(tensors[FREQS])
    decoded = decode_lanes(
        tensors[PAYLOAD].to(torch.int64), tensors[GROUP_WORDS].to(torch.int64),
        tensors[STATES].to(torch.int64), torch.from_numpy(last), freqs, geometry,
    )  # fmt: skip
    if decoded.bad_lanes.numel() or decoded.bad_groups.numel():
        raise CorruptStreamError(
            f"{decoded.bad_lanes.numel()} lane(s) and {decoded.bad_groups.numel()} group(s) did not decode "
            "cleanly: final rANS state or word count mismatch"
        )
    alphabet = Alphabet(h.lo, h.num_direct, h.num_hi_buckets, h.num_lo_buckets)
    index = decoded.index.to(torch.int64)
    out = index + h.lo
    esc_pos = torch.nonzero(index >= h.num_direct).reshape(-1)
    _require(esc_pos.numel() == h.num_escapes,
             f"{esc_pos.numel()} escape symbols decoded, {h.num_escapes} escaped values stored")
    if esc_pos.numel():
        esc_index = index[esc_pos].numpy()
        bits = alphabet.bucket_bits()[esc_index]
        _require(int(bits.sum()) == h.escape_bits, "escape buckets do not match the stored raw bits")
        raw = unpack_raw_bits(tensors[ESCAPES].numpy().view(np.uint8), bits)
        values, ok = unmap_escapes(alphabet, esc_index, raw)
        _require(bool(ok.all()), "escaped value outside the int64 range")
        out[esc_pos] = torch.from_numpy(values)
    return out
