"""Kernels for LUT-quantised (fixed-length code) linear layers.

* :mod:`.reference` -- pure-torch reference (dequantise in float32, then matmul);
* :mod:`.lut_linear` -- Triton GEMV/GEMM kernels and the bit-plane weight layout (2-8 bit codes);
* :mod:`.lut_mma` -- 4-bit codes stored in ``mma.m16n8k16`` fragment order: a tensor-core decode GEMV for
  batches up to 32 and a fused decode + ``tl.dot`` GEMM up to 256 (the runtime's default layout for 4-bit
  tables where the shape allows it);
* :mod:`.grid_linear` -- entropy-coded grid weights decoded on the GPU (fused decode-GEMV), with
  :mod:`.grid_reference` beside it (import the submodule: its main function shares its name);
  ``pack_grid_weight`` re-codes a stored (rANS) weight for the GPU: by default (``layout="auto"``) into the
  pair code of :mod:`.pair_mma` (one tensor-core register per lookup) on a GPU for rows of up to 4096
  in-features, else into the prefix code of :mod:`.prefix_linear` (several weights per lookup); or keeps the
  rANS lanes.
"""

from .lut_linear import (
    DEQUANT_MIN_M,
    GEMV_MAX_M,
    HAS_TRITON,
    PackedLutWeight,
    dequantize_packed,
    lut_linear,
    pack_lut_weight,
    unpack_lut_weight,
)
from .reference import dequantize_reference, lut_linear_reference

__all__ = [
    "DEQUANT_MIN_M",
    "GEMV_MAX_M",
    "HAS_TRITON",
    "PackedLutWeight",
    "dequantize_packed",
    "dequantize_reference",
    "lut_linear",
    "lut_linear_reference",
    "pack_lut_weight",
    "unpack_lut_weight",
]
