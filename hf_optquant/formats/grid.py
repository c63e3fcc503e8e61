"""The uniform grid: the element format of the variable-length (entropy-coded) optimum.

A normalised value u is coded as the integer ``round(u / step)``; the integers are
then entropy coded (:mod:`hf_optquant.coding`), so the storage cost follows the
entropy of the indices rather than a fixed width.  At high rate a uniform grid with
an ideal entropy code is within (1/2) log2(pi e / 6) ~= 0.254 bits of the
rate-distortion bound for any smooth density (Gish & Pierce 1968), which is the
paper's central observation.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from .scalar import ElementFormat
from .spec import check_range, register_spec

__all__ = ["GridElement", "MAX_GRID_INDEX"]

MAX_GRID_INDEX = 1 << 30


@register_spec("grid")
@dataclasses.dataclass(frozen=True)
class GridElement(ElementFormat):
    variable_length: ClassVar[bool] = True
    step: float = 0.5

    def validate(self) -> None:
        check_range("GridElement", "step", self.step, 1e-8, 1e8)

    def indices(self, u: torch.Tensor) -> torch.Tensor:
        index = torch.round(u.double() / self.step)
        if index.numel() and float(index.abs().max()) > MAX_GRID_INDEX:
            raise ValueError(
                f"GridElement.step={self.step} is too fine for these values: |index| exceeds "
                f"{MAX_GRID_INDEX}; use a larger step"
            )
        return index.long()

    def values(self, index: torch.Tensor) -> torch.Tensor:
        return index.double() * self.step
