"""Fitting a format family to one tensor at a target bit width.

``fit_format(w, family, bits)`` returns the best :class:`TensorFormat` of a family
whose **all-inclusive** storage (codes, scales, tables, outliers) fits in ``bits``
per element, together with its measured error.  What is searched:

* element width: the largest width (or, for ``int``, the largest level count, which
  gives fractional bits) that fits the budget after scales and outliers;
* the scale multiplier (clipping for absmax/signmax, step size for rms), on a log grid
  then refined, minimising the (optionally Fisher-weighted) squared error;
* ``fp``: the exponent/mantissa split; ``cube_root``: the distribution and the
  Student-t degrees of freedom;
* ``grid``: the step, by bisection in log(step) on the entropy-coded size, then
  corrected on the exact encoded size so the result never exceeds the budget.

Searches run on a seeded subsample of whole rows (at least ``SEARCH_ELEMENTS`` values) so the
cost stays bounded on large tensors; the returned error is measured on the full tensor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from .block import Scaling
from .grid import GridElement
from .optimal import CubeRootElement
from .rotation import Rotation
from .scalar import (
    MAX_LUT_BITS,
    ElementFormat,
    FPElement,
    IntElement,
    LloydMaxElement,
    LookupElement,
)
from .sparse import SparseOutliers
from .spec import check_choice, check_range
from .tensor import EncodedTensor, TensorFormat

__all__ = ["FitResult", "fit_format", "FAMILIES", "DEFAULT_SCALING", "relative_error", "SEARCH_ELEMENTS"]

SEARCH_ELEMENTS = 1 << 16
GRID_CODE_MARGIN = 0.01  # bits/symbol kept free for the coder's overhead above the entropy
STUDENT_T_DFS = (3.0, 4.0, 5.0, 7.0, 10.0, 20.0)


@dataclasses.dataclass(frozen=True)
class FitResult:
    format: TensorFormat
    bits: int  # exact stored bits for this tensor
    bits_per_element: float
    error: float  # (weighted) relative squared error  sum F (w - q)^2 / sum F w^2
    encoded: EncodedTensor  # the tensor, encoded in the fitted format


def relative_error(w: torch.Tensor, q: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    diff = (w.double() - q.double()).square()
    ref = w.double().square()
    if weight is not None:
        diff, ref = diff * weight.double(), ref * weight.double()
    total = float(ref.sum())
    return float(diff.sum()) / total if total > 0 else float(diff.sum())


# ---- the families ------------------------------------------------------------------------
Fitter = Callable[["_Problem"], TensorFormat]
FAMILIES: dict[str, Fitter] = {}


def _family(name: str):
    def wrap(fn: Fitter) -> Fitter:
        FAMILIES[name] = fn
        return fn

    return wrap


DEFAULT_SCALING = {
    "int": Scaling("block", 64, "absmax"),
    "fp": Scaling("block", 64, "absmax"),
    "nf4": Scaling("block", 64, "absmax"),
    "sf4": Scaling("block", 64, "absmax"),
    "cube_root": Scaling("block", 64, "absmax"),
    "lloyd_max": Scaling("channel", 1, "rms"),
    "grid": Scaling("channel", 1, "rms"),
}


@dataclasses.dataclass
class _Problem:
    w: torch.Tensor
    weight: torch.Tensor | None
    bits: float
    scaling: Scaling
    sparse: SparseOutliers | None
    rotation: Rotation | None
    distribution: str

    def __post_init__(self) -> None:
        self.sample, self.sample_weight = _row_subsample(self.w, self.weight)
        self.numel = self.w.numel()
        self.encoded: EncodedTensor | None = None  # set by fitters that had to encode anyway

    def make(self, element: ElementFormat, multiplier: float | None = None) -> TensorFormat:
        scaling = self.scaling if multiplier is None else self.scaling.replace(multiplier=multiplier)
        return TensorFormat(element, scaling, self.sparse, self.rotation)

    def fits(self, element: ElementFormat) -> bool:
        return self.make(element).storage_bits(tuple(self.w.shape)) <= self.bits * self.numel

    def error(self, fmt: TensorFormat) -> float:
        return relative_error(self.sample, fmt.quantise(self.sample, self.sample_weight), self.sample_weight)

    def widest(self, make_element: Callable[[int], ElementFormat], low: int = 1) -> ElementFormat:
        """The widest integer-width element of a family that fits the budget."""
        for width in range(MAX_LUT_BITS, low - 1, -1):
            element = make_element(width)
            if self.fits(element):
                return element
        raise ValueError(
            f"bits={self.bits} is too small for this family with {self.scaling.granularity} "
            f"scaling: even {low} bit(s) per element plus scales exceed it"
        )

    def best_multiplier(self, element: ElementFormat, refine: bool = True) -> TensorFormat:
        """Scale multiplier minimising the error: a coarse log grid, then a finer one around the best."""
        lo, hi = _multiplier_bracket(element, self.scaling.statistic)
        best = self._best_on_grid(element, lo, hi, 13)
        if refine:
            ratio = (hi / lo) ** (1 / 12)
            best = self._best_on_grid(element, best / ratio, best * ratio, 7)
        return self.make(element, best)

    def _best_on_grid(self, element: ElementFormat, lo: float, hi: float, points: int) -> float:
        grid = torch.logspace(math.log10(lo), math.log10(hi), points, dtype=torch.float64).tolist()
        return min(grid, key=lambda m: self.error(self.make(element, m)))


def _multiplier_bracket(element: ElementFormat, statistic: str) -> tuple[float, float]:
    """Search range for the scale multiplier.

    absmax/signmax: from heavy clipping (0.1: heavy-tailed data over a whole tensor) to none.
    rms: wide enough for tables in rms units (cube-root, multiplier ~1) and for integer
    tables, whose extreme level should land a few sigma out (multiplier ~ 1/span .. 8/span)."""
    if statistic != "rms":
        return 0.1, 1.0
    span = float(element.table("rms", 64).abs().max())
    return min(0.25, 1.0 / span), max(2.0, 8.0 / span)


def _row_subsample(w: torch.Tensor, weight: torch.Tensor | None):
    cols = w.shape[-1]
    w2d = w.reshape(-1, cols)
    rows = w2d.shape[0]
    keep = max(1, min(rows, SEARCH_ELEMENTS // max(cols, 1)))
    if keep >= rows:
        return w2d, None if weight is None else weight.reshape(-1, cols)
    pick = torch.randperm(rows, generator=torch.Generator().manual_seed(0))[:keep].sort().values
    return w2d[pick], None if weight is None else weight.reshape(-1, cols)[pick]


@_family("int")
def _fit_int(p: _Problem) -> TensorFormat:
    levels = max(
        (n for n in range(2, 257) if p.fits(IntElement(math.log2(n)))),
        default=None,
    )
    if levels is None:
        raise ValueError(f"bits={p.bits} is too small for an int format with this scaling")
    return p.best_multiplier(IntElement(math.log2(levels)))


@_family("fp")
def _fit_fp(p: _Problem) -> TensorFormat:
    width = p.widest(lambda b: FPElement(1, b - 2) if b >= 2 else FPElement(1, 0), low=2)
    width_bits = width.bits
    candidates = [FPElement(e, width_bits - 1 - e) for e in range(1, min(width_bits - 1, 6) + 1)]
    coarse = min((p.best_multiplier(c, refine=False) for c in candidates), key=p.error)
    return p.best_multiplier(coarse.element)


def _lookup_family(name: str) -> Fitter:
    def fit(p: _Problem) -> TensorFormat:
        element = LookupElement(name)
        if not p.fits(element):
            raise ValueError(f"bits={p.bits} is below what {name} with this scaling stores")
        return p.best_multiplier(element)

    return fit


FAMILIES["nf4"] = _lookup_family("nf4")
FAMILIES["sf4"] = _lookup_family("sf4")


@_family("cube_root")
def _fit_cube_root(p: _Problem) -> TensorFormat:
    width = p.widest(lambda b: CubeRootElement("normal", b)).bits
    if p.distribution == "auto":
        candidates = [CubeRootElement("normal", width), CubeRootElement("laplace", width)]
        candidates += [CubeRootElement("student_t", width, df) for df in STUDENT_T_DFS]
    elif p.distribution == "student_t":
        candidates = [CubeRootElement("student_t", width, df) for df in STUDENT_T_DFS]
    else:
        candidates = [CubeRootElement(p.distribution, width)]
    best = min(candidates, key=lambda c: p.error(p.make(c)))
    return p.best_multiplier(best)


@_family("lloyd_max")
def _fit_lloyd_max(p: _Problem) -> TensorFormat:
    return p.make(p.widest(lambda b: LloydMaxElement(b)))


def _empirical_entropy(codes: torch.Tensor) -> float:
    """Bits per symbol of the empirical distribution of integer codes."""
    counts = torch.bincount((codes - codes.min()).reshape(-1)).double()
    p = counts[counts > 0] / codes.numel()
    return float(-(p * p.log2()).sum())


@_family("grid")
def _fit_grid(p: _Problem) -> TensorFormat:
    """Bisection in log(step) on the sample's index entropy, then exact correction.

    The entropy of the indices is a cheap, accurate proxy for the coded size per symbol
    (the coder stays within a few hundredths of a bit of it); the final step is checked
    against the real encoded size of the whole tensor and nudged until it fits."""
    shape = tuple(p.w.shape)
    overhead = TensorFormat(IntElement(1), p.scaling, p.sparse, p.rotation).storage_bits(shape)
    overhead -= 8 * (-(-p.numel // 8))  # keep scales and outliers, drop the 1-bit codes
    limit = p.bits * p.numel
    if limit - overhead <= 0:
        raise ValueError(f"bits={p.bits} leaves nothing for the codes after scales and outliers")
    target = (limit - overhead) / p.numel - GRID_CODE_MARGIN

    u = p.make(GridElement()).normalise(p.sample).u  # the grid's scales do not depend on the step

    def entropy(step: float) -> float:
        return _empirical_entropy(GridElement(step).indices(u))

    lo, hi = 1e-6, 1e3  # the entropy falls as the step grows
    for _ in range(45):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if entropy(mid) > target else (lo, mid)
    step = hi
    for _ in range(8):  # exact: d bits / d log2(step) ~ -1 per element at high rate
        fmt = p.make(GridElement(step))
        encoded = fmt.encode(p.w, p.weight)
        if encoded.nbits <= limit:
            p.encoded = encoded
            return fmt
        step *= 2 ** max((encoded.nbits - limit) / p.numel, 0.002)
    raise ValueError(f"could not fit the grid within bits={p.bits} (coded size keeps exceeding the budget)")


def fit_format(
    w: torch.Tensor,
    family: str,
    bits: float,
    *,
    scaling: Scaling | None = None,
    sparse: SparseOutliers | None = None,
    rotation: Rotation | None = None,
    weight: torch.Tensor | None = None,
    distribution: str = "auto",
) -> FitResult:
    """Fit ``family`` to ``w`` within ``bits`` per element (all-inclusive)."""
    check_choice("fit_format", "family", family, sorted(FAMILIES))
    check_range("fit_format", "bits", bits, 0.05, 32.0)
    check_choice("fit_format", "distribution", distribution, ("auto", "normal", "laplace", "student_t"))
    if weight is not None and weight.shape != w.shape:
        raise ValueError(f"fit_format: weight must have w's shape {tuple(w.shape)}, got {tuple(weight.shape)}")
    problem = _Problem(w.detach().float(), None if weight is None else weight.detach().float(), bits,
                       scaling or DEFAULT_SCALING[family], sparse, rotation, distribution)
    fmt = FAMILIES[family](problem)
    encoded = problem.encoded if problem.encoded is not None and problem.encoded.format == fmt else None
    encoded = encoded or fmt.encode(w, weight)
    error = relative_error(w, fmt.decode(encoded), weight)
    return FitResult(fmt, encoded.nbits, encoded.nbits / w.numel(), error, encoded)


def realisable_bits(family: str, shape: tuple[int, ...], scaling: Scaling | None = None,
                    sparse: SparseOutliers | None = None) -> list[float] | None:
    """The all-inclusive bits per element a fixed-length family can realise for ``shape``
    (one value per element width / level count); None for the variable-length grid."""
    check_choice("realisable_bits", "family", family, sorted(FAMILIES))
    if family == "grid":
        return None
    scaling = scaling or DEFAULT_SCALING[family]
    numel = math.prod(shape)
    elements: list[ElementFormat]
    if family == "int":
        elements = [IntElement(math.log2(n)) for n in range(2, 257)]
    elif family == "fp":
        elements = [FPElement(1, b - 2) for b in range(2, MAX_LUT_BITS + 1)]
    elif family in ("nf4", "sf4"):
        elements = [LookupElement(family)]
    elif family == "cube_root":
        elements = [CubeRootElement("normal", b) for b in range(1, MAX_LUT_BITS + 1)]
    else:
        elements = [LloydMaxElement(b) for b in range(1, MAX_LUT_BITS + 1)]
    bits = {TensorFormat(e, scaling, sparse).storage_bits(shape) / numel for e in elements}
    return sorted(bits)
