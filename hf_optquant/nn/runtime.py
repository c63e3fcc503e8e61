"""Runtime forms of an encoded weight: what ``QuantLinear.forward`` computes with on a device.

The stored form (:class:`~hf_optquant.formats.EncodedTensor`) is laid out for size and
validation; each kernel wants its own layout.  :func:`build_runtime` turns the stored tensors
into one of these, once per device (``QuantLinear`` caches it):

* :class:`LutKernelWeight` -- fixed-length lookup-table codes with block/channel/tensor scales,
  repacked for the Triton kernels: 4-bit codes in tensor-core fragment order
  (:mod:`hf_optquant.kernels.lut_mma`), other widths (and shapes that layout cannot take) for the LUT
  GEMV/GEMM (:mod:`hf_optquant.kernels.lut_linear`);
* :class:`GridKernelWeight` -- uniform-grid indices kept entropy-coded, decoded inside the
  Triton kernels (:mod:`hf_optquant.kernels.grid_linear`);
* :class:`DeviceParts` -- anything else (sparse outliers, rotations, unusual block sizes): the
  codes, scales and table on the device, dequantised by torch ops at each call.

All three hold only codes/scales/tables (a few bits per weight), never a full-precision copy.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Protocol

import torch
import torch.nn.functional as F

from ..formats import EncodedTensor, TensorFormat
from ..formats.scalar import LutElement
from ..formats.tensor import QuantisedParts

__all__ = ["RuntimeWeight", "LutKernelWeight", "GridKernelWeight", "DeviceParts", "build_runtime",
           "lut_kernel_unsupported"]

LUT_KERNEL_BITS = (2, 3, 4, 5, 6, 8)
#: 4-bit codes: "mma" = tensor-core fragment layout (:mod:`hf_optquant.kernels.lut_mma`, where the shape
#: allows it), "planes" = the bit-plane layout of :mod:`hf_optquant.kernels.lut_linear`.
LUT4_LAYOUT = os.environ.get("HF_OPTQUANT_LUT4_LAYOUT", "mma")


class RuntimeWeight(Protocol):
    kind: str

    def linear(self, x: torch.Tensor) -> torch.Tensor: ...

    @property
    def nbytes(self) -> int: ...


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclasses.dataclass
class LutKernelWeight:
    packed: object  # hf_optquant.kernels.PackedLutWeight
    kind: str = "lut-kernel"

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels import lut_linear
        from ..kernels.lut_mma import MmaLutWeight, mma_linear

        if isinstance(self.packed, MmaLutWeight):
            return mma_linear(x, self.packed)
        return lut_linear(x, self.packed)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes


@dataclasses.dataclass
class GridKernelWeight:
    packed: object  # hf_optquant.kernels.grid_linear.PackedGridWeight
    kind: str = "grid-kernel"

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.grid_linear import grid_linear

        return grid_linear(x, self.packed)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes


@dataclasses.dataclass
class DeviceParts:
    """Codes (narrowest integer dtype), scales, table and outliers on the device."""

    format: TensorFormat
    parts: QuantisedParts
    shape: tuple[int, int]
    dtype: torch.dtype
    kind: str = "torch"

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.parts._replace(codes=self.parts.codes.long())  # stored narrow; widened per call
        w = self.format.dequantise_parts(parts, self.shape, torch.float32)
        return F.linear(x, w.to(x.dtype))

    @property
    def nbytes(self) -> int:
        extra = () if self.parts.outliers is None else tuple(self.parts.outliers)
        return _nbytes(self.parts.codes, self.parts.scales, self.parts.table, *extra)


def lut_kernel_unsupported(fmt: TensorFormat) -> str | None:
    """Why the LUT kernels cannot run ``fmt`` (None when they can)."""
    if fmt.variable_length or not isinstance(fmt.element, LutElement):
        return "not a lookup-table format"
    if fmt.sparse is not None:
        return "sparse outliers"
    if fmt.rotation is not None:
        return "rotation"
    return None


def _narrow(codes: torch.Tensor) -> torch.Tensor:
    if codes.numel() == 0:
        return codes
    lo, hi = int(codes.min()), int(codes.max())
    for dtype in (torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return codes.to(dtype)
    return codes


def _move_parts(parts: QuantisedParts, device: torch.device) -> QuantisedParts:
    outliers = parts.outliers
    if outliers is not None:
        outliers = type(outliers)(*(t.to(device) for t in outliers))
    table = None if parts.table is None else parts.table.float().to(device)
    return QuantisedParts(_narrow(parts.codes).to(device), parts.scales.to(device), {}, table, outliers)


def _lut_kernel(fmt: TensorFormat, parts: QuantisedParts, device: torch.device) -> LutKernelWeight:
    from ..kernels import pack_lut_weight
    from ..kernels.lut_mma import mma_unsupported, pack_mma_weight

    rows, cols = parts.codes.shape
    levels = parts.table.numel()
    bits = next(b for b in LUT_KERNEL_BITS if (1 << b) >= max(levels, 4))
    lut = torch.zeros(1 << bits, dtype=torch.float32)
    lut[:levels] = parts.table.float()
    scales = parts.scales
    if fmt.scaling.granularity == "block":
        block = fmt.scaling.block_size
    else:  # channel: one scale per row; tensor: one scale for all rows
        block = cols
        scales = scales.expand(rows, 1)
    if bits == 4 and LUT4_LAYOUT == "mma" and mma_unsupported(4, block, cols) is None:
        return LutKernelWeight(pack_mma_weight(parts.codes, lut, scales.contiguous(), block, device))
    packed = pack_lut_weight(parts.codes, lut, scales.contiguous(), bits, block, device)
    return LutKernelWeight(packed)


def build_runtime(encoded: EncodedTensor, device: torch.device | str, kernels: bool) -> RuntimeWeight:
    """The form ``forward`` uses on ``device``: a kernel layout when ``kernels`` and the format allow,
    else :class:`DeviceParts`.  Validation happens here (corrupt tensors raise ValueError)."""
    device = torch.device(device)
    fmt = encoded.format
    cpu = EncodedTensor(fmt, encoded.shape, encoded.dtype, {k: t.cpu() for k, t in encoded.tensors.items()})
    if kernels and fmt.variable_length:
        from ..kernels.grid_linear import grid_supported, pack_grid_weight

        if grid_supported(fmt):
            return GridKernelWeight(pack_grid_weight(cpu, device))
    parts = fmt.decode_parts(cpu)
    if kernels and lut_kernel_unsupported(fmt) is None:
        try:
            return _lut_kernel(fmt, parts, device)
        except ValueError:  # e.g. a block size the kernel layout cannot express: torch path below
            pass
    rows, cols = parts.codes.shape
    return DeviceParts(fmt, _move_parts(parts, device), (rows, cols), encoded.dtype)
