"""Lossless coding (placeholder docstring, rewritten below)."""

from .errors import CorruptStreamError
from .estimate import estimate_bits
from .stream import CodedStream, decode_symbols, encode_symbols, stream_from_tensors

__all__ = [
    "CodedStream",
    "CorruptStreamError",
    "decode_symbols",
    "encode_symbols",
    "estimate_bits",
    "stream_from_tensors",
]
