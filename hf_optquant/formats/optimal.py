"""Squared-error-optimal fixed-length tables for known distributions.

At high rate the optimal point density of a scalar quantiser for a density p is
proportional to p(x)^(1/3) (Panter & Dite 1951).  For the families used here the
cube-root density is again a member of a named family, so the levels have closed
forms through scipy's quantile functions:

* Normal(0, s^2)          -> Normal(0, 3 s^2)
* Laplace(0, b)           -> Laplace(0, 3 b)
* Student-t(nu, s), nu > 2 -> Student-t(nu', s') with nu' = (nu - 2) / 3, s' = s sqrt(nu / nu')

The source distributions are standardised to unit variance.  The table depends on
the scaling statistic, because scaling changes the distribution being quantised:

* ``rms``: values are ~ p with unit variance; ``n`` levels at the quantiles
  (i + 1/2) / n of the cube-root density.
* ``absmax`` over a block of B values: values lie in [-1, 1] and the block's largest
  magnitude maps exactly onto +-1, so +-1 are levels and the other ``n - 2`` levels
  follow the cube-root density truncated to [-m, m] and divided by m, where m is the
  median of the block maximum of B samples.
* ``signmax``: the block's largest magnitude maps exactly onto +1 (the scale carries
  the sign), so +1 is a level and ``n - 1`` levels follow the truncated density.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from scipy import stats

from .scalar import MAX_LUT_BITS, LutElement
from .spec import check_choice, check_int, check_range, register_spec

__all__ = ["CubeRootElement", "DISTRIBUTIONS", "unit_variance_distribution", "cube_root_distribution"]

DISTRIBUTIONS = ("normal", "laplace", "student_t")
_ONE = torch.ones(1, dtype=torch.float64)


def unit_variance_distribution(name: str, df: float = 5.0):
    """A frozen scipy distribution of the named family with zero mean and unit variance."""
    if name == "normal":
        return stats.norm()
    if name == "laplace":
        return stats.laplace(scale=1 / math.sqrt(2))
    return stats.t(df, scale=math.sqrt((df - 2) / df))


def cube_root_distribution(name: str, df: float = 5.0):
    """The normalised density proportional to p^(1/3) for the unit-variance source p."""
    if name == "normal":
        return stats.norm(scale=math.sqrt(3))
    if name == "laplace":
        return stats.laplace(scale=3 / math.sqrt(2))
    scale = math.sqrt((df - 2) / df)
    df_cube = (df - 2) / 3
    return stats.t(df_cube, scale=scale * math.sqrt(df / df_cube))


@register_spec("cube_root")
@dataclasses.dataclass(frozen=True)
class CubeRootElement(LutElement):
    """Cube-root-density table with ``2**bits`` levels for a known distribution."""

    distribution: str = "normal"
    bits: int = 4
    df: float = 5.0

    def validate(self) -> None:
        check_choice("CubeRootElement", "distribution", self.distribution, DISTRIBUTIONS)
        check_int("CubeRootElement", "bits", self.bits, 1, MAX_LUT_BITS)
        check_range("CubeRootElement", "df", self.df, 2.05, 1e6)

    @property
    def num_levels(self) -> int:
        return 2**self.bits

    def build_table(self, statistic: str, block_elements: int) -> torch.Tensor:
        check_choice("CubeRootElement", "statistic", statistic, ("absmax", "signmax", "rms"))
        density = cube_root_distribution(self.distribution, self.df)
        n = self.num_levels
        if statistic == "rms" or n < 3:
            return _quantiles(density, n, None)
        m = _median_block_max(unit_variance_distribution(self.distribution, self.df), block_elements)
        if statistic == "absmax":
            inner = _quantiles(density, n - 2, m) / m
            return torch.cat([-_ONE, inner, _ONE])
        inner = _quantiles(density, n - 1, m) / m
        return torch.cat([inner, _ONE])


def _quantiles(density, n: int, bound: float | None) -> torch.Tensor:
    """The (i + 1/2)/n quantiles of ``density``, truncated to [-bound, bound] if given."""
    p = (np.arange(n, dtype=np.float64) + 0.5) / n
    if bound is not None:
        low, high = density.cdf(-bound), density.cdf(bound)
        p = low + p * (high - low)
    return torch.from_numpy(np.asarray(density.ppf(p), dtype=np.float64))


def _median_block_max(source, block_elements: int) -> float:
    """Median of max |x| over ``block_elements`` iid samples: solves (2F(m) - 1)^B = 1/2."""
    block_elements = max(1, int(block_elements))
    return float(source.ppf((1 + 0.5 ** (1 / block_elements)) / 2))
