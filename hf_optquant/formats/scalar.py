"""Element formats: how one normalised value becomes one code.

Fixed-length element formats are lookup tables (LUTs): a sorted table of
``num_levels`` values, and a value is coded as the index of its nearest entry.
Integer grids, floating-point ExMy, NF4/SF4 and Lloyd-Max tables are all LUTs; so
are the cube-root-density tables in :mod:`hf_optquant.formats.optimal`.  The
variable-length uniform grid lives in :mod:`hf_optquant.formats.grid`.

A table may depend on how the values were normalised (``statistic`` = absmax,
signmax or rms, over ``block_elements`` values); only the cube-root tables use it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import torch
from scipy import stats

from .spec import Spec, check_choice, check_int, check_range, register_spec

__all__ = [
    "ElementFormat",
    "LutElement",
    "IntElement",
    "FPElement",
    "LookupElement",
    "LloydMaxElement",
    "nearest_index",
    "NAMED_TABLES",
]

MAX_LUT_BITS = 8


class ElementFormat(Spec):
    """Base of element formats.  ``variable_length`` selects fixed-length packing or an entropy code."""

    variable_length: ClassVar[bool] = False


class LutElement(ElementFormat):
    """A fixed-length lookup-table format.

    ``stores_table`` is True when the table is fitted to the data and so must be
    stored (and counted) alongside the codes.
    """

    stores_table: ClassVar[bool] = False

    def table(self, statistic: str = "absmax", block_elements: int = 64) -> torch.Tensor:
        """The sorted float64 table of representable values (cached: specs are immutable)."""
        return _cached_table(self, statistic, int(block_elements)).clone()

    def build_table(self, statistic: str, block_elements: int) -> torch.Tensor:
        raise NotImplementedError

    def fit_table(self, u: torch.Tensor, weight: torch.Tensor | None, statistic: str,
                  block_elements: int) -> torch.Tensor:
        """The table to use for normalised values ``u``; data-independent tables ignore ``u``."""
        return self.table(statistic, block_elements)


@functools.lru_cache(maxsize=512)
def _cached_table(element: LutElement, statistic: str, block_elements: int) -> torch.Tensor:
    return element.build_table(statistic, block_elements)


def nearest_index(u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table entry for each value (ties go to the lower entry)."""
    table = table.to(u.dtype)
    midpoints = (table[1:] + table[:-1]) / 2
    return torch.bucketize(u, midpoints)


@register_spec("int")
@dataclasses.dataclass(frozen=True)
class IntElement(LutElement):
    """Signed integer grid with ``round(2**bits)`` levels; ``bits`` may be fractional.

    Asymmetric (default): ``-floor(L/2) .. ceil(L/2) - 1`` (e.g. -8..7 for 4 bits).
    Symmetric: ``-(L-1)/2 .. (L-1)/2`` in unit steps (half-integers when L is even,
    i.e. no zero level; odd L such as 2**log2(15) keeps zero).
    """

    bits: float = 4.0
    symmetric: bool = False

    def validate(self) -> None:
        check_range("IntElement", "bits", self.bits, 1.0, MAX_LUT_BITS)
        check_choice("IntElement", "symmetric", self.symmetric, (True, False))

    @property
    def num_levels(self) -> int:
        return max(2, int(round(2.0**self.bits)))

    def build_table(self, statistic: str, block_elements: int) -> torch.Tensor:
        n = self.num_levels
        steps = torch.arange(n, dtype=torch.float64)
        return steps - (n - 1) / 2 if self.symmetric else steps - n // 2


@register_spec("fp")
@dataclasses.dataclass(frozen=True)
class FPElement(LutElement):
    """Floating point ExMy with sign, subnormals and no reserved specials (no inf/NaN).

    ``1 + exponent_bits + mantissa_bits`` bits; +0 and -0 are one level, so the table
    has ``2**bits - 1`` entries.
    """

    exponent_bits: int = 2
    mantissa_bits: int = 1

    def validate(self) -> None:
        check_int("FPElement", "exponent_bits", self.exponent_bits, 1, 6)
        check_int("FPElement", "mantissa_bits", self.mantissa_bits, 0, 6)
        if self.bits > MAX_LUT_BITS:
            raise ValueError(
                f"FPElement: 1 + exponent_bits + mantissa_bits must be <= {MAX_LUT_BITS}, "
                f"got {self.bits}"
            )

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    def build_table(self, statistic: str, block_elements: int) -> torch.Tensor:
        e, m = self.exponent_bits, self.mantissa_bits
        bias = 2 ** (e - 1) - 1
        exponent = torch.arange(2**e, dtype=torch.float64)[:, None]
        mantissa = torch.arange(2**m, dtype=torch.float64)[None, :] / 2**m
        normal = (1 + mantissa) * torch.pow(2.0, exponent - bias)
        subnormal = mantissa * 2.0 ** (1 - bias)
        magnitudes = torch.where(exponent == 0, subnormal, normal).flatten()
        return torch.unique(torch.cat([-magnitudes, magnitudes]))  # sorted, one zero


def _quantile_table(ppf, offset: float) -> torch.Tensor:
    """NF4-style 16-level table: 8 positive and 7 negative quantiles plus zero, max-normalised."""
    positive = ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1].numpy())
    negative = -ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1].numpy())
    values = torch.tensor([*positive, 0.0, *negative], dtype=torch.float64)
    values = values / values.abs().max()
    return torch.sort(values).values


# QLoRA's construction: quantiles of N(0,1) between 1-offset and 0.5 on each side.
_NF4_OFFSET = 0.9677083
NAMED_TABLES = {
    "nf4": lambda: _quantile_table(stats.norm.ppf, _NF4_OFFSET),
    # Student Float (Dotzel et al. 2023): the same construction with Student-t, nu = 5.
    "sf4": lambda: _quantile_table(lambda p: stats.t.ppf(p, 5.0), _NF4_OFFSET),
}


@register_spec("lookup")
@dataclasses.dataclass(frozen=True)
class LookupElement(LutElement):
    """A named, published lookup table (``nf4``, ``sf4``); values lie in [-1, 1]."""

    name: str = "nf4"

    def validate(self) -> None:
        check_choice("LookupElement", "name", self.name, sorted(NAMED_TABLES))

    def build_table(self, statistic: str, block_elements: int) -> torch.Tensor:
        return NAMED_TABLES[self.name]()


@register_spec("lloyd_max")
@dataclasses.dataclass(frozen=True)
class LloydMaxElement(LutElement):
    """A table fitted to the data by (optionally weighted) Lloyd-Max iterations.

    The fitted table is stored as float32 next to the codes and counted in the bits.
    Fitting uses at most ``max_fit_samples`` values (a seeded subsample) for speed.
    """

    stores_table: ClassVar[bool] = True
    bits: int = 4
    iterations: int = 60
    max_fit_samples: int = 1 << 20

    def validate(self) -> None:
        check_int("LloydMaxElement", "bits", self.bits, 1, MAX_LUT_BITS)
        check_int("LloydMaxElement", "iterations", self.iterations, 0, 10_000)
        check_int("LloydMaxElement", "max_fit_samples", self.max_fit_samples, 16)

    @property
    def num_levels(self) -> int:
        return 2**self.bits

    def fit_table(self, u: torch.Tensor, weight: torch.Tensor | None, statistic: str,
                  block_elements: int) -> torch.Tensor:
        u, weight = _subsample(u.flatten().double(), weight, self.max_fit_samples)
        table = _initial_table(u, weight, self.num_levels)
        table = lloyd_max(u, weight, table, self.iterations)
        return table.float().double()  # stored as float32: quantise with what is stored


def _subsample(u: torch.Tensor, weight: torch.Tensor | None, limit: int):
    if weight is not None:
        weight = weight.flatten().double()
    if u.numel() <= limit:
        return u, weight
    generator = torch.Generator().manual_seed(0)
    pick = torch.randperm(u.numel(), generator=generator)[:limit]
    return u[pick], None if weight is None else weight[pick]


def _initial_table(u: torch.Tensor, weight: torch.Tensor | None, levels: int) -> torch.Tensor:
    """Start for Lloyd-Max: the cube-root-density table of the data's own histogram.

    At high rate the optimal level density is proportional to p^(1/3) (weighted: (w p)^(1/3)),
    so starting there leaves Lloyd-Max only a local correction; plain data quantiles
    (density p) converge very slowly at 5+ bits."""
    if u.numel() == 0:
        return torch.linspace(-1, 1, levels, dtype=torch.float64)
    low, high = float(u.min()), float(u.max())
    if high <= low:
        return _spread_duplicates(torch.full((levels,), low, dtype=torch.float64))
    bins = 4096
    mass = torch.ones_like(u) if weight is None else weight.clamp_min(0)
    index = ((u - low) / (high - low) * bins).long().clamp_(0, bins - 1)
    density = torch.bincount(index, weights=mass, minlength=bins).clamp_min(0)
    cumulative = torch.cumsum(density.pow(1 / 3), 0)
    cumulative = cumulative / cumulative[-1]
    probs = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    position = torch.searchsorted(cumulative, probs).clamp_max(bins - 1).double()
    return _spread_duplicates(low + (position + 0.5) / bins * (high - low))


def _spread_duplicates(table: torch.Tensor) -> torch.Tensor:
    """Make a sorted table strictly increasing so that every level stays usable."""
    span = float(table[-1] - table[0]) or 1.0
    eps = span * 1e-9
    for i in range(1, table.numel()):
        if table[i] <= table[i - 1]:
            table[i] = table[i - 1] + eps
    return table


def lloyd_max(u: torch.Tensor, weight: torch.Tensor | None, table: torch.Tensor,
              iterations: int, tol: float = 1e-10) -> torch.Tensor:
    """Weighted Lloyd-Max: alternate nearest-level cells and (weighted) centroids."""
    w = torch.ones_like(u) if weight is None else weight
    table = table.clone()
    for _ in range(iterations):
        index = nearest_index(u, table)
        mass = torch.bincount(index, weights=w, minlength=table.numel())
        moment = torch.bincount(index, weights=w * u, minlength=table.numel())
        updated = torch.where(mass > 0, moment / mass.clamp_min(1e-300), table)
        updated = torch.sort(updated).values
        done = float((updated - table).abs().max()) <= tol * max(1.0, float(table.abs().max()))
        table = updated
        if done:
            break
    return table


