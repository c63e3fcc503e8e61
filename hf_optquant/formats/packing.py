"""Fixed-length packing of LUT codes into bytes.

Two layouts, chosen by the number of levels L:

* **bitstream** (L a power of two, or when radix gains nothing): each code takes
  ``ceil(log2 L)`` bits, least significant bit first, codes back to back; the stream
  is padded to a whole byte.
* **radix** (L not a power of two): ``k = floor(32 / log2 L)`` codes form one
  little-endian 32-bit word ``sum_j c_j L^j``.  This realises fractional bit widths:
  5 levels cost 32/13 = 2.46 bits instead of 3, 7 levels 32/11 = 2.91 bits.

``packed_nbytes`` gives the exact size without packing, so bit counts and written
bytes agree by construction (and the tests check it).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["PackingLayout", "packing_layout", "pack_codes", "unpack_codes", "packed_nbytes"]


class PackingLayout(NamedTuple):
    kind: str  # "bitstream" or "radix"
    bits: int  # bits per code (bitstream) or per word (radix: 32)
    codes_per_word: int  # 1 for bitstream

    @property
    def bits_per_code(self) -> float:
        return self.bits / self.codes_per_word


def packing_layout(levels: int) -> PackingLayout:
    if levels < 2 or levels > 256:
        raise ValueError(f"packing supports 2..256 levels, got {levels}")
    width = math.ceil(math.log2(levels))
    per_word = int(32 // math.log2(levels))
    while levels**per_word >= 2**32:  # guard float rounding in the floor above
        per_word -= 1
    if levels & (levels - 1) == 0 or 32 / per_word >= width:
        return PackingLayout("bitstream", width, 1)
    return PackingLayout("radix", 32, per_word)


def packed_nbytes(count: int, levels: int) -> int:
    layout = packing_layout(levels)
    if layout.kind == "bitstream":
        return -(-count * layout.bits // 8)
    return 4 * -(-count // layout.codes_per_word)


def pack_codes(codes: torch.Tensor, levels: int) -> torch.Tensor:
    """Pack integer codes in [0, levels) (any shape, row-major) into a uint8 tensor."""
    flat = codes.reshape(-1).to(torch.int64).numpy()
    if flat.size and (flat.min() < 0 or flat.max() >= levels):
        raise ValueError(f"codes must lie in [0, {levels}), got range [{flat.min()}, {flat.max()}]")
    layout = packing_layout(levels)
    if layout.kind == "bitstream":
        small = flat.astype(np.uint8)[:, None]
        bits = (small >> np.arange(layout.bits, dtype=np.uint8)) & 1
        out = np.packbits(bits.reshape(-1), bitorder="little")
    else:
        k = layout.codes_per_word
        padded = np.zeros(-(-flat.size // k) * k, dtype=np.int64)
        padded[: flat.size] = flat
        powers = levels ** np.arange(k, dtype=np.int64)
        words = (padded.reshape(-1, k) * powers).sum(axis=1).astype("<u4")
        out = words.view(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(out))


def unpack_codes(packed: torch.Tensor, levels: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: returns ``count`` int64 codes (1-D).

    Raises ValueError if the byte count does not match, or a radix word decodes to a
    value outside the alphabet (a corrupt word).
    """
    expected = packed_nbytes(count, levels)
    if packed.dtype != torch.uint8 or packed.numel() != expected:
        raise ValueError(
            f"packed codes must be {expected} uint8 bytes for {count} codes of {levels} levels, "
            f"got {packed.numel()} x {packed.dtype}"
        )
    data = packed.contiguous().reshape(-1).numpy()  # bytes are bytes: any shape with the right count
    layout = packing_layout(levels)
    if layout.kind == "bitstream":
        bits = np.unpackbits(data, bitorder="little")[: count * layout.bits].reshape(-1, layout.bits)
        codes = np.packbits(bits, axis=1, bitorder="little")[:, 0].astype(np.int64)
        if levels & (levels - 1) and codes.size and codes.max() >= levels:
            raise ValueError(f"packed codes hold a code >= {levels} levels (corrupt stream)")
        return torch.from_numpy(codes)
    k = layout.codes_per_word
    words = data.view("<u4").astype(np.int64)
    if words.size and words.max() >= levels**k:
        raise ValueError(f"a radix word exceeds {levels}**{k} (corrupt stream)")
    digits = (words[:, None] // levels ** np.arange(k, dtype=np.int64)) % levels
    return torch.from_numpy(digits.reshape(-1)[:count].copy())
