"""The composite tensor format: rotation -> sparse outliers -> scaling -> element code.

:class:`TensorFormat` is the one object the rest of the library talks to.  It can

* ``quantise(w)``: fake-quantise (returns a tensor of w's shape and dtype);
* ``encode(w)``: produce an :class:`EncodedTensor`, whose ``tensors`` are the real
  stored bytes (packed or entropy-coded codes, scales, tables, outliers);
* ``decode(encoded)``: rebuild the weights (bit-identical to ``quantise(w)``);
* ``count_bits(w)``: the exact storage cost, equal to ``encode(w).nbits``; for
  fixed-length formats ``storage_bits(shape)`` gives it without any data.

Bits counted are everything in ``EncodedTensor.tensors``.  The JSON spec and the
shape (a few dozen bytes per tensor, like a safetensors header) are not counted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch

from . import packing
from .block import Scaling, table_reference
from .grid import GridElement
from .rotation import Rotation
from .scalar import ElementFormat, LutElement, nearest_index
from .sparse import Outliers, SparseOutliers
from .spec import Spec, register_spec, spec_from_dict

__all__ = ["TensorFormat", "EncodedTensor", "QuantisedParts"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}


class QuantisedParts(NamedTuple):
    """Everything decoding needs, before it is packed into bytes."""

    codes: torch.Tensor  # int64 [rows, cols]: LUT indices or grid integers
    scales: torch.Tensor  # float32 [R, nb], as stored (already rounded to the scale format)
    scale_tensors: dict[str, torch.Tensor]
    table: torch.Tensor | None  # float64 LUT, None for the grid
    outliers: Outliers | None


class Normalised(NamedTuple):
    """A tensor after rotation, outlier removal and scaling, before element coding."""

    u: torch.Tensor  # float32 [rows, cols]
    scales: torch.Tensor  # float32 [R, nb], as stored
    full_scales: torch.Tensor  # float32 [rows, cols]
    scale_tensors: dict[str, torch.Tensor]
    outliers: Outliers | None


@dataclasses.dataclass(frozen=True)
class EncodedTensor:
    """A quantised tensor as stored: the format, the original shape/dtype and the bytes."""

    format: TensorFormat
    shape: tuple[int, ...]
    dtype: torch.dtype
    tensors: dict[str, torch.Tensor]

    @property
    def nbits(self) -> int:
        return 8 * sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def bits_per_element(self) -> float:
        numel = max(1, _numel(self.shape))
        return self.nbits / numel

    def metadata(self) -> dict[str, Any]:
        dtype = next(k for k, v in _DTYPES.items() if v == self.dtype)
        return {"format": self.format.to_dict(), "shape": list(self.shape), "dtype": dtype}

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> EncodedTensor:
        fmt = spec_from_dict(meta["format"])
        if not isinstance(fmt, TensorFormat):
            raise ValueError(f"expected a tensor_format spec, got kind {fmt.kind!r}")
        if meta.get("dtype") not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {meta.get('dtype')!r}")
        shape = meta.get("shape")
        if not (isinstance(shape, list) and shape
                and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise ValueError(f"shape must be a non-empty list of non-negative ints, got {shape!r}")
        return cls(fmt, tuple(shape), _DTYPES[meta["dtype"]], dict(tensors))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _as_2d_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    cols = shape[-1] if shape else 1
    return (_numel(shape) // cols if cols else 0), cols


@register_spec("tensor_format")
@dataclasses.dataclass(frozen=True)
class TensorFormat(Spec):
    element: ElementFormat = dataclasses.field(default_factory=GridElement)
    scaling: Scaling = dataclasses.field(default_factory=Scaling)
    sparse: SparseOutliers | None = None
    rotation: Rotation | None = None

    def validate(self) -> None:
        for field, cls in (("element", ElementFormat), ("scaling", Scaling)):
            if not isinstance(getattr(self, field), cls):
                raise ValueError(f"TensorFormat.{field} must be a {cls.__name__} spec, got {getattr(self, field)!r}")
        if self.sparse is not None and not isinstance(self.sparse, SparseOutliers):
            raise ValueError(f"TensorFormat.sparse must be SparseOutliers or None, got {self.sparse!r}")
        if self.rotation is not None and not isinstance(self.rotation, Rotation):
            raise ValueError(f"TensorFormat.rotation must be Rotation or None, got {self.rotation!r}")

    @property
    def variable_length(self) -> bool:
        return self.element.variable_length

    # ---- quantisation ----------------------------------------------------------------
    def normalise(self, w: torch.Tensor) -> Normalised:
        """Rotate, split off outliers and scale: the values the element format will code."""
        w2d = self._to_2d(w)
        rows, cols = w2d.shape
        outliers = None
        if self.sparse is not None:
            w2d, outliers = self.sparse.split(w2d)
        scale_tensors = self.scaling.encode_scales(self.scaling.raw_scales(w2d, self._reference(rows, cols)))
        scales = self.scaling.decode_scales(scale_tensors)
        full_scales = self.scaling.broadcast(scales, rows, cols)
        u = torch.where(full_scales != 0, w2d / full_scales, torch.zeros_like(w2d))
        return Normalised(u, scales, full_scales, scale_tensors, outliers)

    def quantise_parts(self, w: torch.Tensor, weight: torch.Tensor | None = None) -> QuantisedParts:
        """Split ``w`` into codes, scales, table and outliers; ``weight`` (e.g. diagonal
        Fisher, same shape as w) weights the squared error for fitted tables."""
        norm = self.normalise(w)
        rows, cols = norm.u.shape
        if isinstance(self.element, LutElement):
            fit_weight = None
            if weight is not None:
                fit_weight = self._weight_2d(weight, rows, cols) * norm.full_scales.double().square()
            table = self.element.fit_table(norm.u, fit_weight, self.scaling.statistic,
                                           self.scaling.block_elements(rows, cols))
            codes = nearest_index(norm.u, table.float())
        else:
            table, codes = None, self.element.indices(norm.u)
        return QuantisedParts(codes, norm.scales, norm.scale_tensors, table, norm.outliers)

    def dequantise_parts(self, parts: QuantisedParts, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        rows, cols = _as_2d_shape(shape)
        if parts.table is not None:
            values = parts.table.float()[parts.codes]
        else:
            values = self.element.values(parts.codes).float()
        w2d = values.reshape(rows, cols) * self.scaling.broadcast(parts.scales, rows, cols)
        if parts.outliers is not None:
            w2d = SparseOutliers.restore(w2d, parts.outliers)
        if self.rotation is not None:
            w2d = self.rotation.unrotate(w2d)
        if not bool(torch.isfinite(w2d).all()):
            raise ValueError("decoded weights are not finite: the stored scales, table or outliers are corrupt, or "
                             "the weights lie so close to the float32 limit that a rounded-up scale overflows")
        return _saturating_cast(w2d.reshape(shape), dtype)

    def quantise(self, w: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Fake quantisation: the tensor ``decode(encode(w))`` would give."""
        return self.dequantise_parts(self.quantise_parts(w, weight), tuple(w.shape), w.dtype)

    # ---- storage ---------------------------------------------------------------------
    def encode(self, w: torch.Tensor, weight: torch.Tensor | None = None) -> EncodedTensor:
        parts = self.quantise_parts(w, weight)
        rows, cols = _as_2d_shape(tuple(w.shape))
        tensors = dict(parts.scale_tensors)
        if self.variable_length:
            from ..coding import encode_symbols

            stream = encode_symbols(parts.codes.reshape(-1))
            tensors.update({f"codes.{k}": v for k, v in stream.tensors.items()})
        else:
            tensors["codes"] = packing.pack_codes(parts.codes, parts.table.numel())
        if isinstance(self.element, LutElement) and self.element.stores_table:
            tensors["lut"] = parts.table.float()
        if parts.outliers is not None:
            tensors.update(self.sparse.encode(parts.outliers, rows, cols))
        return EncodedTensor(self, tuple(w.shape), w.dtype, tensors)

    def decode(self, encoded: EncodedTensor) -> torch.Tensor:
        """Rebuild the weights; malformed tensors raise ValueError (never garbage)."""
        return self.dequantise_parts(self.decode_parts(encoded), encoded.shape, encoded.dtype)

    def decode_parts(self, encoded: EncodedTensor) -> QuantisedParts:
        """Unpack (or entropy-decode) the stored tensors into codes, scales, table and outliers,
        validating them; kernels start from here instead of from the decoded weights."""
        rows, cols = _as_2d_shape(encoded.shape)
        tensors = encoded.tensors
        scales = self._checked_scales(tensors, rows, cols)
        if self.variable_length:
            from ..coding import decode_symbols, stream_from_tensors

            coded = {k[len("codes."):]: v for k, v in tensors.items() if k.startswith("codes.")}
            codes = decode_symbols(stream_from_tensors(coded))
            if codes.numel() != rows * cols:
                raise ValueError(f"entropy-coded stream holds {codes.numel()} symbols, expected {rows * cols}")
            table = None
        else:
            table = self._stored_table(tensors, rows, cols)
            _require(tensors, ["codes"])
            codes = packing.unpack_codes(tensors["codes"], table.numel(), rows * cols)
        outliers = None
        if self.sparse is not None:
            _require(tensors, ["outliers.row_ptr", "outliers.col", "outliers.val"])
            outliers = self.sparse.decode(tensors, rows, cols)
        return QuantisedParts(codes.reshape(rows, cols), scales, {}, table, outliers)

    def validate_tensors(self, shape: tuple[int, ...], tensors: dict[str, torch.Tensor]) -> None:
        """Cheap structural check of stored tensors against this format, without decoding: the
        expected keys and no others, scale shape and finiteness, packed code size and table,
        the entropy-coded stream's header, table and CRC, and the outlier index structure.
        Run on load, so a checkpoint whose spec and tensors disagree fails there, not in forward."""
        rows, cols = _as_2d_shape(tuple(shape))
        expected = {"scales"} | ({"scales.outer"} if self.scaling.scale_format == "fp8_e4m3" else set())
        if self.sparse is not None:
            expected |= {"outliers.row_ptr", "outliers.col", "outliers.val"}
        if not self.variable_length:
            expected |= {"codes"} | ({"lut"} if self.element.stores_table else set())
        coded = {k for k in tensors if self.variable_length and k.startswith("codes.")}
        unknown = sorted(k for k in tensors if k not in expected and k not in coded)
        if unknown:
            raise ValueError(f"unexpected encoded tensors {unknown} for a {self.element.kind} format")
        _require(tensors, sorted(expected))
        self._checked_scales(tensors, rows, cols)
        if self.variable_length:
            from ..coding import stream_from_tensors

            stream = stream_from_tensors({k[len("codes."):]: v for k, v in tensors.items() if k.startswith("codes.")})
            if stream.num_symbols != rows * cols:
                raise ValueError(f"entropy-coded stream holds {stream.num_symbols} symbols, expected {rows * cols}")
        else:
            levels = self._stored_table(tensors, rows, cols).numel()
            codes = tensors["codes"]
            if codes.dtype != torch.uint8 or codes.numel() != packing.packed_nbytes(rows * cols, levels):
                raise ValueError(f"packed codes must be {packing.packed_nbytes(rows * cols, levels)} uint8 bytes, "
                                 f"got {codes.numel()} x {codes.dtype}")
        if self.sparse is not None:
            self.sparse.decode(tensors, rows, cols)

    def _checked_scales(self, tensors: dict[str, torch.Tensor], rows: int, cols: int) -> torch.Tensor:
        _require(tensors, ["scales"] + (["scales.outer"] if self.scaling.scale_format == "fp8_e4m3" else []))
        outer = tensors.get("scales.outer")
        if outer is not None and outer.numel() != 1:
            raise ValueError(f"scales.outer must hold one value, got shape {tuple(outer.shape)}")
        scales = self.scaling.decode_scales(tensors)
        if tuple(scales.shape) != self.scaling.grid_shape(rows, cols):
            raise ValueError(f"scales have shape {tuple(scales.shape)}, expected {self.scaling.grid_shape(rows, cols)}")
        if not bool(torch.isfinite(scales).all()):
            raise ValueError("stored scales contain NaN or Inf (corrupt data)")
        return scales

    def storage_bits(self, shape: tuple[int, ...]) -> int | None:
        """Exact stored bits for a tensor of ``shape``; None if it depends on the data."""
        if self.variable_length:
            return None
        rows, cols = _as_2d_shape(tuple(shape))
        levels = self._levels(rows, cols)
        bits = 8 * packing.packed_nbytes(rows * cols, levels) + self.scaling.scale_bits(rows, cols)
        if self.element.stores_table:
            bits += 32 * levels
        if self.sparse is not None:
            bits += self.sparse.storage_bits(rows, cols)
        return bits

    def count_bits(self, w: torch.Tensor) -> int:
        fixed = self.storage_bits(tuple(w.shape))
        return fixed if fixed is not None else self.encode(w).nbits

    # ---- helpers ---------------------------------------------------------------------
    def _to_2d(self, w: torch.Tensor) -> torch.Tensor:
        if w.ndim == 0:
            raise ValueError("cannot quantise a 0-d tensor")
        w2d = w.detach().reshape(_as_2d_shape(tuple(w.shape))).float().cpu()
        finite = torch.isfinite(w2d)
        if not bool(finite.all()):
            first = divmod(int(torch.nonzero(~finite.reshape(-1))[0]), w2d.shape[1])
            raise ValueError(f"weights contain {int((~finite).sum())} NaN/Inf values (first at row, column {first}); "
                             "refusing to quantise them (keep such a module in full precision with "
                             "modules_to_not_convert)")
        return self.rotation.rotate(w2d) if self.rotation is not None else w2d

    def _weight_2d(self, weight: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        weight2d = weight.detach().reshape(rows, cols).double().cpu()
        if self.rotation is not None:  # rotation mixes elements: use each block's mean weight
            b = self.rotation.effective_block(cols)
            weight2d = weight2d.reshape(rows, cols // b, b).mean(-1, keepdim=True).expand(-1, -1, b)
            weight2d = weight2d.reshape(rows, cols)
        return weight2d

    def _reference(self, rows: int, cols: int) -> float:
        element = self.element
        if not isinstance(element, LutElement) or element.stores_table:
            return 1.0
        table = element.table(self.scaling.statistic, self.scaling.block_elements(rows, cols))
        return table_reference(table, self.scaling.statistic)

    def _levels(self, rows: int, cols: int) -> int:
        element = self.element
        if element.stores_table:
            return element.num_levels
        return element.table(self.scaling.statistic, self.scaling.block_elements(rows, cols)).numel()

    def _stored_table(self, tensors: dict[str, torch.Tensor], rows: int, cols: int) -> torch.Tensor:
        if not self.element.stores_table:
            return self.element.table(self.scaling.statistic, self.scaling.block_elements(rows, cols))
        _require(tensors, ["lut"])
        lut = tensors["lut"]
        if (lut.dtype != torch.float32 or lut.ndim != 1 or lut.numel() != self.element.num_levels
                or not torch.isfinite(lut).all()):
            raise ValueError(f"stored lut must be 1-D: {self.element.num_levels} finite float32 values")
        return lut.double()


def _saturating_cast(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast float32 weights to ``dtype``, saturating at its largest finite value: a float16 weight
    near 65504 whose block scale rounded up must decode to +-65504, not to inf."""
    if dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(w.dtype).max:
        limit = torch.finfo(dtype).max
        w = w.clamp(-limit, limit)
    return w.to(dtype)


def _require(tensors: dict[str, torch.Tensor], names: list[str]) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"encoded tensor is missing {missing}; present: {sorted(tensors)}")
