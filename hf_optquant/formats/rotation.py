"""Randomised Hadamard rotation along the input dimension.

W is rotated as W R with R = diag(signs) H_b / sqrt(b) applied to blocks of b columns
(H_b the Sylvester Hadamard matrix, b a power of two).  R is orthogonal, so
y = x W^T = (x R)(W R)^T: a kernel may rotate activations instead of un-rotating
weights.  The signs come from ``seed``, so nothing is stored.  If K is not a multiple
of ``block_size`` the largest power of two dividing K (and <= block_size) is used.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .spec import Spec, check_int, register_spec

__all__ = ["Rotation", "hadamard_transform"]


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform over the last dim (a power of two)."""
    b = x.shape[-1]
    lead = x.shape[:-1]
    y = x
    h = 1
    while h < b:
        y = y.reshape(*lead, b // (2 * h), 2, h)
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return y.reshape(x.shape) / math.sqrt(b)


@register_spec("hadamard")
@dataclasses.dataclass(frozen=True)
class Rotation(Spec):
    block_size: int = 128
    seed: int = 0

    def validate(self) -> None:
        check_int("Rotation", "block_size", self.block_size, 2, 1 << 15)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"Rotation.block_size must be a power of two, got {self.block_size}")
        check_int("Rotation", "seed", self.seed, 0, 2**63 - 1)

    def effective_block(self, cols: int) -> int:
        largest_power_of_two = cols & -cols
        return min(self.block_size, largest_power_of_two)

    def _signs(self, b: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, 2, (b,), generator=generator).float() * 2 - 1

    def rotate(self, w2d: torch.Tensor) -> torch.Tensor:
        rows, cols = w2d.shape
        b = self.effective_block(cols)
        if b == 1:
            return w2d
        blocks = w2d.reshape(rows, cols // b, b) * self._signs(b).to(device=w2d.device, dtype=w2d.dtype)
        return hadamard_transform(blocks).reshape(rows, cols)

    def unrotate(self, w2d: torch.Tensor) -> torch.Tensor:
        rows, cols = w2d.shape
        b = self.effective_block(cols)
        if b == 1:
            return w2d
        blocks = hadamard_transform(w2d.reshape(rows, cols // b, b))
        return (blocks * self._signs(b).to(device=w2d.device, dtype=w2d.dtype)).reshape(rows, cols)
