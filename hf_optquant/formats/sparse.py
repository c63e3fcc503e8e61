"""Sparse outliers: the largest-magnitude fraction of a tensor kept in higher precision.

The outliers are removed before scaling (so they no longer inflate the scales), their
positions in the dense part are coded as zeros, and on decoding the stored values
overwrite those positions.  Positions are stored row-compressed (CSR): an int32 row
pointer per row plus a column index per outlier (int16 when K <= 32768, else int32).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from .spec import Spec, check_choice, check_range, register_spec

__all__ = ["SparseOutliers", "Outliers"]

_VALUE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Outliers(NamedTuple):
    rows: torch.Tensor  # int64 [k]
    cols: torch.Tensor  # int64 [k]
    values: torch.Tensor  # float32 [k], already rounded to the value format


@register_spec("sparse")
@dataclasses.dataclass(frozen=True)
class SparseOutliers(Spec):
    fraction: float = 0.001
    value_format: str = "bf16"

    def validate(self) -> None:
        check_range("SparseOutliers", "fraction", self.fraction, 0.0, 0.5)
        check_choice("SparseOutliers", "value_format", self.value_format, sorted(_VALUE_DTYPES))

    def count(self, numel: int) -> int:
        return int(round(self.fraction * numel))

    def index_dtype(self, cols: int) -> torch.dtype:
        return torch.int16 if cols <= (1 << 15) else torch.int32

    def storage_bits(self, rows: int, cols: int) -> int:
        k = self.count(rows * cols)
        index_bits = torch.iinfo(self.index_dtype(cols)).bits
        value_bits = torch.finfo(_VALUE_DTYPES[self.value_format]).bits
        return 32 * (rows + 1) + k * (index_bits + value_bits)

    def split(self, w2d: torch.Tensor) -> tuple[torch.Tensor, Outliers]:
        """Returns (dense part with outliers zeroed, outliers in row-major order)."""
        rows, cols = w2d.shape
        k = self.count(rows * cols)
        flat = w2d.reshape(-1)
        # argsort of -|w| with a stable sort makes ties deterministic (lowest index first)
        picked = torch.sort(torch.argsort(-flat.abs(), stable=True)[:k]).values
        values = flat[picked].to(_VALUE_DTYPES[self.value_format]).float()
        dense = flat.clone()
        dense[picked] = 0
        return dense.reshape(rows, cols), Outliers(picked // cols, picked % cols, values)

    def encode(self, outliers: Outliers, rows: int, cols: int) -> dict[str, torch.Tensor]:
        counts = torch.bincount(outliers.rows, minlength=rows)
        row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
        return {
            "outliers.row_ptr": row_ptr,
            "outliers.col": outliers.cols.to(self.index_dtype(cols)),
            "outliers.val": outliers.values.to(_VALUE_DTYPES[self.value_format]),
        }

    def decode(self, tensors: dict[str, torch.Tensor], rows: int, cols: int) -> Outliers:
        if any(tensors[k].ndim != 1 for k in ("outliers.row_ptr", "outliers.col", "outliers.val")):
            raise ValueError("sparse outlier tensors must be 1-D")
        row_ptr = tensors["outliers.row_ptr"].long()
        cols_idx = tensors["outliers.col"].long()
        values = tensors["outliers.val"].float()
        k = cols_idx.numel()
        ok = (row_ptr.numel() == rows + 1 and int(row_ptr[0]) == 0 and int(row_ptr[-1]) == k
              and bool((row_ptr[1:] >= row_ptr[:-1]).all()) and values.numel() == k
              and (k == 0 or (int(cols_idx.min()) >= 0 and int(cols_idx.max()) < cols))
              and bool(torch.isfinite(values).all()))
        if not ok:
            raise ValueError("sparse outlier tensors are inconsistent (row pointer, column bounds, counts or "
                             "non-finite values)")
        row_of = torch.repeat_interleave(torch.arange(rows), row_ptr[1:] - row_ptr[:-1])
        return Outliers(row_of, cols_idx, values)

    @staticmethod
    def restore(w2d: torch.Tensor, outliers: Outliers) -> torch.Tensor:
        out = w2d.clone()
        out[outliers.rows, outliers.cols] = outliers.values.to(out.dtype)
        return out
