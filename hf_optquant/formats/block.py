"""Scaling: per-tensor, per-channel or block scales, and the formats scales are stored in.

A tensor of shape [..., K] is viewed as rows of length K.  ``granularity`` picks the
groups that share one scale: the whole tensor, one row ("channel", i.e. one output
feature of a linear layer), or 1 x ``block_size`` blocks along K (the last block of
a row may be shorter).  The scale is ``statistic(group) / reference * multiplier``,
where ``reference`` is the table value the statistic should land on (see
:func:`table_reference`) and ``multiplier`` is fitted (values < 1 clip).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from .spec import Spec, check_choice, check_int, check_range, register_spec

__all__ = ["Scaling", "BlockView", "GRANULARITIES", "STATISTICS", "SCALE_FORMATS", "table_reference"]

GRANULARITIES = ("tensor", "channel", "block")
STATISTICS = ("absmax", "signmax", "rms")
SCALE_FORMATS = ("fp32", "bf16", "fp16", "fp8_e4m3", "e8m0")
_SCALE_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8_e4m3": 8, "e8m0": 8}
_FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_FP8_MAX = 448.0
_SCALE_RANGES = ("'fp32'/'bf16': about 1e-38..3e38, 'e8m0': 2**-126..2**127, 'fp16': about 6e-8..65504, "
                 "'fp8_e4m3': 2**-9..448 times its fp32 outer scale")


class BlockView(NamedTuple):
    """A [rows, K] tensor regrouped as [groups_per_row_rows, blocks, block] (zero padded)."""

    blocks: torch.Tensor  # [R, nb, B]
    counts: torch.Tensor  # [nb] valid elements per block (identical for every row)


def table_reference(table: torch.Tensor | None, statistic: str) -> float:
    """The table value a group's statistic maps to (1 for rms and for table-free grids)."""
    if table is None or statistic == "rms":
        return 1.0
    low, high = float(table[0]), float(table[-1])
    if statistic == "absmax":
        both_sides = min(-low, high)  # the largest magnitude representable with either sign
        return both_sides if both_sides > 0 else max(-low, high)  # one-sided tables, e.g. int {-1, 0}
    return low if abs(low) > abs(high) else high  # signmax: the wider end, with its sign


@register_spec("scaling")
@dataclasses.dataclass(frozen=True)
class Scaling(Spec):
    granularity: str = "block"
    block_size: int = 64
    statistic: str = "absmax"
    scale_format: str = "bf16"
    multiplier: float = 1.0

    def validate(self) -> None:
        check_choice("Scaling", "granularity", self.granularity, GRANULARITIES)
        check_int("Scaling", "block_size", self.block_size, 1, 1 << 20)
        check_choice("Scaling", "statistic", self.statistic, STATISTICS)
        check_choice("Scaling", "scale_format", self.scale_format, SCALE_FORMATS)
        check_range("Scaling", "multiplier", self.multiplier, 1e-3, 1e3)
        if self.statistic == "signmax" and self.scale_format == "e8m0":
            raise ValueError(
                "Scaling.scale_format 'e8m0' stores no sign, so statistic 'signmax' needs one of "
                "['fp32', 'bf16', 'fp16', 'fp8_e4m3']"
            )

    # ---- geometry -------------------------------------------------------------------
    def grid_shape(self, rows: int, cols: int) -> tuple[int, int]:
        """Number of scales as [rows, blocks per row]."""
        if self.granularity == "tensor":
            return 1, 1
        if self.granularity == "channel":
            return rows, 1
        return rows, -(-cols // self.block_size)

    def block_elements(self, rows: int, cols: int) -> int:
        """Values per group (for tables whose shape depends on it)."""
        return {"tensor": rows * cols, "channel": cols, "block": min(self.block_size, cols)}[
            self.granularity
        ]

    def view(self, w2d: torch.Tensor) -> BlockView:
        rows, cols = w2d.shape
        if self.granularity == "tensor":
            flat = w2d.reshape(1, 1, -1)
            return BlockView(flat, torch.tensor([flat.shape[-1]]))
        if self.granularity == "channel":
            return BlockView(w2d.reshape(rows, 1, cols), torch.tensor([cols]))
        nb = -(-cols // self.block_size)
        padded = torch.nn.functional.pad(w2d, (0, nb * self.block_size - cols))
        counts = torch.full((nb,), self.block_size)
        counts[-1] = cols - (nb - 1) * self.block_size
        return BlockView(padded.reshape(rows, nb, self.block_size), counts)

    def broadcast(self, scales: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """Expand [R, nb] scales to a [rows, cols] tensor."""
        if self.granularity == "tensor":
            return scales.reshape(1, 1).expand(rows, cols)
        if self.granularity == "channel":
            return scales.reshape(rows, 1).expand(rows, cols)
        return scales.repeat_interleave(self.block_size, dim=1)[:, :cols]

    # ---- statistics -----------------------------------------------------------------
    def raw_scales(self, w2d: torch.Tensor, reference: float) -> torch.Tensor:
        """Unquantised float32 scales, shape [R, nb]."""
        view = self.view(w2d.float())
        x = view.blocks
        if self.statistic == "absmax":
            stat = x.abs().amax(dim=-1)
        elif self.statistic == "signmax":
            pick = x.abs().argmax(dim=-1, keepdim=True)
            stat = x.gather(-1, pick).squeeze(-1)
        else:
            stat = (x.double().square().sum(-1) / view.counts.to(x.device).double()).sqrt().float()
        return stat * (self.multiplier / reference)

    # ---- storage --------------------------------------------------------------------
    def scale_bits(self, rows: int, cols: int) -> int:
        r, nb = self.grid_shape(rows, cols)
        extra = 32 if self.scale_format == "fp8_e4m3" else 0  # fp32 second-level scale
        return r * nb * _SCALE_BITS[self.scale_format] + extra

    def encode_scales(self, scales: torch.Tensor) -> dict[str, torch.Tensor]:
        """Round scales to the scale format; returns the tensors to store.

        Range policy (a scale the format cannot hold is an error, never a silent inf/NaN or a
        whole block decoding to zero): ``fp32``/``bf16``/``fp16``/``e8m0`` raise ValueError if a
        scale overflows, or if a non-zero scale rounds to zero (fp16 below ~6e-8, bf16/fp32 only
        for float32-subnormal weights).  ``fp8_e4m3`` is relative to its fp32 outer scale: blocks
        more than ~2**17 below the tensor's largest block flush to zero, as in MX-style formats.
        """
        fmt = self.scale_format
        if not bool(torch.isfinite(scales).all()):
            raise ValueError(f"Scaling: scales overflow float32 (weights near the float32 limit with "
                             f"multiplier={self.multiplier}); cannot quantise this tensor")
        if fmt in _FLOAT_DTYPES:
            stored = scales.to(_FLOAT_DTYPES[fmt]).contiguous()
            _check_scale_range(fmt, scales, stored.float())
            return {"scales": stored}
        if fmt == "fp8_e4m3":
            peak = float(scales.abs().max()) if scales.numel() else 0.0
            outer = torch.tensor([peak / _FP8_MAX if peak > 0 else 1.0], dtype=torch.float32)
            if outer[0] == 0:  # peak below 448 * 2**-149: float32 cannot hold the outer scale
                _check_scale_range(fmt, scales, torch.zeros_like(scales))
            inner = (scales / outer).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
            return {"scales": inner.contiguous(), "scales.outer": outer}
        stored = _encode_e8m0(scales, round_up=self.statistic != "rms")
        _check_scale_range(fmt, scales, _decode_e8m0(stored))
        return {"scales": stored}

    def decode_scales(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        stored = tensors["scales"]
        if self.scale_format in _FLOAT_DTYPES:
            return stored.float()
        if self.scale_format == "fp8_e4m3":
            return stored.float() * tensors["scales.outer"].float()
        return _decode_e8m0(stored)


def _check_scale_range(fmt: str, scales: torch.Tensor, stored: torch.Tensor) -> None:
    """Raise if rounding to ``fmt`` moved a scale by more than a factor of two: inf/NaN, a
    clamped exponent, or a non-zero scale flushed to zero (or, for e8m0, raised to 2**-126)."""
    magnitude, kept = scales.abs().double(), stored.abs().double()
    nonzero = magnitude > 0
    bad = ~torch.isfinite(kept) | (nonzero & ((kept < magnitude / 2) | (kept > magnitude * 2)))
    if bool(bad.any()):
        index = int(torch.nonzero(bad.reshape(-1))[0])
        span = magnitude[nonzero]
        raise ValueError(
            f"Scaling.scale_format {fmt!r} cannot represent the scale {float(magnitude.reshape(-1)[index]):.3g} "
            f"(it would be stored as {float(stored.reshape(-1)[index]):.3g}); this tensor's non-zero scales span "
            f"[{float(span.min()):.3g}, {float(span.max()):.3g}]; use a scale_format whose range covers them "
            f"({_SCALE_RANGES})")


def _encode_e8m0(scales: torch.Tensor, round_up: bool) -> torch.Tensor:
    """Power-of-two scales as biased exponents (uint8); code 0 is reserved for a zero scale.

    Absmax-type scales round up so that no value clips; rms scales round to nearest in log2.
    """
    magnitude = scales.abs().double()
    log2 = torch.log2(magnitude.clamp_min(2.0**-126))
    exponent = torch.ceil(log2) if round_up else torch.round(log2)
    code = (exponent.clamp(-126, 127) + 127).to(torch.uint8)
    return torch.where(magnitude > 0, code, torch.zeros_like(code)).contiguous()


def _decode_e8m0(code: torch.Tensor) -> torch.Tensor:
    value = torch.pow(2.0, code.double() - 127).float()
    return torch.where(code == 0, torch.zeros_like(value), value)
