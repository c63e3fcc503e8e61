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
* ``grid``: the step, by bisection in log(step) on the index entropy of a row sample, a few
  Newton steps on the coder's size estimate of the whole tensor, then a check of the exact
  encoded size (the step grows until the result fits, so it never exceeds the budget).

Searches run on a seeded subsample of whole rows (``SEARCH_ELEMENTS`` values on the CPU,
``DEVICE_SEARCH_ELEMENTS`` on an accelerator) so the cost stays bounded on large tensors;
the returned error is measured on the full tensor.

Where the work runs: the grid's normalisation, step search, codes and error run on the
tensor's own device (torch ops, no host round trips except scalars), in row chunks of
``CHUNK_ELEMENTS`` so the transient memory stays a few bytes per element.  Only the lossless
coding runs on the CPU.  :func:`start_fit` splits a fit into that device part and an
:class:`EncodeJob` (plain numpy arrays, cheap to pickle), which :func:`run_encode_job` runs,
here or in a worker process; :class:`PendingFit.accept` takes the outcome back (and asks for
another job in the rare case the coded size overshoots).  :func:`fit_format` chains the three.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np
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
from .tensor import EncodedTensor, QuantisedParts, TensorFormat

__all__ = ["FitResult", "fit_format", "FAMILIES", "DEFAULT_SCALING", "relative_error", "SEARCH_ELEMENTS",
           "DEVICE_SEARCH_ELEMENTS", "CHUNK_ELEMENTS", "EncodeJob", "EncodeOutcome", "PendingFit", "start_fit",
           "run_encode_job", "drive_fit"]

SEARCH_ELEMENTS = 1 << 16
DEVICE_SEARCH_ELEMENTS = 1 << 22  # an accelerator scans 4M values per entropy evaluation in ~1 ms
CHUNK_ELEMENTS = 1 << 20  # values per full-tensor pass: transient memory ~30 bytes x this, beyond 8 per element
MAX_GRID_ATTEMPTS = 8
ESTIMATE_ELEMENTS = 1 << 20  # up to this size the coder's fixed costs matter for allocation floors
GRID_CODE_MARGIN = 0.03  # first guess of the coder's cost above the entropy, b/sym (row-lane layout: 0.026-0.038
# measured on 0.25M-4M Student-t indices); the step is then set on the coder's own estimate
ESTIMATE_SLACK = 0.001  # b/sym kept free for the estimate's error (an overshoot costs one more encode)
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
        sample, weight = _row_subsample(self.w, self.weight)
        self.sample = sample.float().cpu()  # TensorFormat quantises on the CPU: move the sample once
        self.sample_weight = None if weight is None else weight.float().cpu()
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


def _sample_rows(rows: int, cols: int, elements: int) -> torch.Tensor | None:
    """Seeded sorted subset of row indices holding about ``elements`` values; None: all rows."""
    keep = max(1, min(rows, elements // max(cols, 1)))
    if keep >= rows:
        return None
    return torch.randperm(rows, generator=torch.Generator().manual_seed(0))[:keep].sort().values


def _row_subsample(w: torch.Tensor, weight: torch.Tensor | None):
    cols = w.shape[-1]
    w2d = w.reshape(-1, cols)
    pick = _sample_rows(w2d.shape[0], cols, SEARCH_ELEMENTS)
    if pick is None:
        return w2d, None if weight is None else weight.reshape(-1, cols)
    return w2d[pick.to(w.device)], None if weight is None else weight.reshape(-1, cols)[pick.to(weight.device)]


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
    return _entropy_of_counts(torch.bincount((codes - codes.min()).reshape(-1)), codes.numel())


def _entropy_of_counts(counts: torch.Tensor, total: int) -> float:
    p = counts[counts > 0].double() / total
    return float(-(p * p.log2()).sum())


# ---- wire format: what crosses a process boundary ---------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Wire:
    """A CPU tensor as (dtype name, shape, raw bytes): numpy pickles by value, with no
    shared-memory segments or file descriptors (small /dev/shm on some hosts)."""

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray  # uint8

    @classmethod
    def of(cls, t: torch.Tensor) -> _Wire:
        t = t.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        return cls(str(t.dtype).removeprefix("torch."), tuple(t.shape), raw.numpy())

    def tensor(self) -> torch.Tensor:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"_Wire.dtype must name a torch dtype, got {self.dtype!r}")
        if self.data.size == 0:
            return torch.empty(self.shape, dtype=dtype)
        data = self.data if self.data.flags.writeable else self.data.copy()
        return torch.from_numpy(data).view(dtype).reshape(self.shape)


@dataclasses.dataclass(frozen=True)
class EncodeJob:
    """The last step of a fit (lossless coding), picklable so a worker process can run it.

    ``symbols``: grid codes to entropy-code (the rest of the tensor is already known), as
    wire bytes or, for a job run in this process, a tensor left on its device (the coder
    runs where its input is); ``weights`` (+ ``element_weight``): a fixed-length ``format``
    to encode in full."""

    format: TensorFormat
    symbols: _Wire | torch.Tensor | None = None
    weights: _Wire | None = None
    element_weight: _Wire | None = None


@dataclasses.dataclass(frozen=True)
class EncodeOutcome:
    tensors: dict[str, _Wire]
    error: float | None  # measured by the worker (fixed-length jobs only)
    seconds: float  # CPU time the job took

    def torch_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.tensor() for k, v in self.tensors.items()}


def run_encode_job(job: EncodeJob) -> EncodeOutcome:
    """Run an :class:`EncodeJob` (in this process or a worker)."""
    start = time.process_time()
    if job.symbols is not None:
        from ..coding import encode_symbols

        symbols = job.symbols if isinstance(job.symbols, torch.Tensor) else job.symbols.tensor()
        stream = encode_symbols(_coder_input(symbols))
        tensors, error = {f"codes.{k}": _Wire.of(v) for k, v in stream.tensors.items()}, None
    else:
        w = job.weights.tensor()
        weight = None if job.element_weight is None else job.element_weight.tensor()
        encoded = job.format.encode(w, weight)
        error = relative_error(w, job.format.decode(encoded), weight)
        tensors = {k: _Wire.of(v) for k, v in encoded.tensors.items()}
    return EncodeOutcome(tensors, error, time.process_time() - start)


def _coder_input(codes: torch.Tensor) -> torch.Tensor:
    """The codes exactly as :meth:`TensorFormat.encode` hands them to the coder, [rows, cols] (the
    coder's lane layout follows its input's shape), so a fit's bytes equal ``fit.format.encode(w)``'s
    (tests/test_scale.py checks it)."""
    return codes.reshape(-1, codes.shape[-1])


class PendingFit:
    """A fit whose encoding is still to run: ``job(w)`` -> run it -> ``accept(outcome)``.

    Holds no reference to ``w`` between calls (callers pass it again), so a caller that
    streams weights keeps only the ones it is working on alive.  ``local=True`` promises the
    job runs in this process: grid codes then stay on their device for the coder."""

    def job(self, w: torch.Tensor, weight: torch.Tensor | None = None, local: bool = False) -> EncodeJob:
        raise NotImplementedError

    def accept(self, outcome: EncodeOutcome) -> FitResult | None:
        """The result, or None when the coded size overshot and another ``job(w)`` is needed."""
        raise NotImplementedError


class _FixedFit(PendingFit):
    """Fixed-length families: the search ran on a sample; the job encodes the whole tensor."""

    def __init__(self, fmt: TensorFormat, shape: tuple[int, ...], dtype: torch.dtype):
        self.format, self.shape, self.dtype = fmt, shape, dtype

    def job(self, w: torch.Tensor, weight: torch.Tensor | None = None, local: bool = False) -> EncodeJob:
        return EncodeJob(self.format, weights=_Wire.of(w),
                         element_weight=None if weight is None else _Wire.of(weight))

    def accept(self, outcome: EncodeOutcome) -> FitResult:
        encoded = EncodedTensor(self.format, self.shape, self.dtype, outcome.torch_tensors())
        return FitResult(self.format, encoded.nbits, encoded.bits_per_element, outcome.error, encoded)


@dataclasses.dataclass
class _Normalised:
    """The grid's view of a tensor: ``u`` (float32, on the tensor's device) and what decoding needs."""

    u: torch.Tensor
    scales: torch.Tensor  # as stored, on u's device
    stored: dict[str, torch.Tensor]  # scale (and outlier) tensors as stored, on the CPU
    outliers: object | None


class _GridFit(PendingFit):
    """Uniform grid + entropy code, searched on the tensor's device."""

    def __init__(self, bits: float, scaling: Scaling, sparse: SparseOutliers | None, rotation: Rotation | None,
                 shape: tuple[int, ...], dtype: torch.dtype):
        self.bits, self.shape, self.dtype = bits, shape, dtype
        self.base = TensorFormat(GridElement(), scaling, sparse, rotation)
        self.numel = math.prod(shape)
        self.limit = bits * self.numel
        self.step: float | None = None
        self.attempts = 0

    # -- normalisation: rotation, outliers, scales ------------------------------------------
    def _normalise(self, w: torch.Tensor) -> _Normalised:
        if self.base.sparse is not None or self.base.rotation is not None:
            norm = self.base.normalise(w)  # global top-k / rotation: TensorFormat's CPU path
            stored = dict(norm.scale_tensors)
            if norm.outliers is not None:
                stored.update(self.base.sparse.encode(norm.outliers, *norm.u.shape))
            return _Normalised(norm.u, norm.scales, stored, norm.outliers)
        cols = self.shape[-1]
        w2d = w.detach().reshape(-1, cols)
        if not bool(torch.isfinite(w2d).all()):
            raise ValueError("weights contain NaN or Inf; refusing to quantise them")
        scaling = self.base.scaling
        if scaling.granularity == "tensor":
            raw = scaling.raw_scales(w2d, 1.0)
        else:  # per-row statistics: chunk over rows to bound the float64 temporaries
            raw = torch.cat([scaling.raw_scales(w2d[a:b], 1.0) for a, b in _chunks(w2d.shape[0], cols)])
        stored = scaling.encode_scales(raw.cpu())  # tiny; rounding to the scale format happens on the CPU
        scales = scaling.decode_scales(stored).to(w2d.device)
        u = torch.empty(w2d.shape, dtype=torch.float32, device=w2d.device)
        for a, b in _chunks(*w2d.shape):
            full = self._scales_rows(scales, a, b)
            u[a:b] = torch.where(full != 0, w2d[a:b].float() / full, torch.zeros((), device=u.device))
        return _Normalised(u, scales, stored, None)

    def _scales_rows(self, scales: torch.Tensor, a: int, b: int) -> torch.Tensor:
        scaling = self.base.scaling
        rows_scales = scales if scaling.granularity == "tensor" else scales[a:b]
        return scaling.broadcast(rows_scales, b - a, self.shape[-1])

    # -- the step ------------------------------------------------------------------------------
    def _target(self, norm: _Normalised) -> float:
        overhead = 8 * sum(t.numel() * t.element_size() for t in norm.stored.values())
        if self.limit - overhead <= 0:
            raise ValueError(f"bits={self.bits} leaves nothing for the codes after scales and outliers")
        return (self.limit - overhead) / self.numel - GRID_CODE_MARGIN

    def _search(self, norm: _Normalised, target: float) -> float:
        """First guess: bisection in log(step) on a row sample's index entropy."""
        u = norm.u
        budget = SEARCH_ELEMENTS if u.device.type == "cpu" else DEVICE_SEARCH_ELEMENTS
        pick = _sample_rows(u.shape[0], u.shape[1], budget)
        sample = u if pick is None else u[pick.to(u.device)]
        lo, hi = 1e-6, 1e3  # the entropy falls as the step grows
        while hi / lo > 1 + 1e-7:
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if _empirical_entropy(GridElement(mid).indices(sample)) > target else (lo, mid)
        return hi

    def _fit_estimate(self, norm: _Normalised, step: float) -> tuple[float, torch.Tensor]:
        """Newton steps in log2(step) (slope ~ -1 bit per element per doubling, both ways) on the
        coder's own size estimate of the whole tensor, which knows its header, table and per-lane
        costs (they depend on the coder's layout; the entropy alone does not); the estimate's
        histogram runs on the codes' device.  Returns the fullest step estimated to fit."""
        from ..coding import estimate_bits

        fixed = 8 * sum(t.numel() * t.element_size() for t in norm.stored.values())
        target = self.limit - ESTIMATE_SLACK * self.numel - 64  # the estimate is close, not exact
        best = None  # (estimated bits, step, codes)
        for _ in range(6):
            codes = self._codes(norm.u, step)
            bits = fixed + float(estimate_bits(_coder_input(codes)))
            if bits <= target and (best is None or bits > best[0]):
                best = (bits, step, codes)
            if target - 0.001 * self.numel <= bits <= target:
                break
            new = min(1e3, max(1e-6, step * 2.0 ** ((bits - target) / self.numel + (0.0005 if bits > target else 0))))
            if new == step:  # e.g. an all-zero tensor: nothing moves
                break
            step = new
        return (best[1], best[2]) if best is not None else (step, codes)

    def _codes(self, u: torch.Tensor, step: float) -> torch.Tensor:
        element = GridElement(step)
        codes = torch.empty(u.shape, dtype=torch.int32, device=u.device)
        for a, b in _chunks(*u.shape):
            codes[a:b] = element.indices(u[a:b])
        return codes

    def _error(self, w: torch.Tensor, weight: torch.Tensor | None, norm: _Normalised, codes: torch.Tensor,
               step: float) -> float:
        """The relative error of exactly what ``decode`` will return (same ops, same rounding)."""
        fmt = self.base.replace(element=GridElement(step))
        if norm.outliers is not None or self.base.rotation is not None:
            parts = QuantisedParts(codes.long().cpu(), norm.scales.cpu(), {}, None, norm.outliers)
            q = fmt.dequantise_parts(parts, self.shape, self.dtype)
            return relative_error(w.detach().cpu(), q, None if weight is None else weight.detach().cpu())
        cols = self.shape[-1]
        w2d = w.detach().reshape(-1, cols)
        weight2d = None if weight is None else weight.detach().reshape(-1, cols).to(w2d.device)
        tensor_scale = self.base.scaling.granularity == "tensor"
        num = den = torch.zeros((), dtype=torch.float64, device=w2d.device)
        for a, b in _chunks(*w2d.shape):
            parts = QuantisedParts(codes[a:b], norm.scales if tensor_scale else norm.scales[a:b], {}, None, None)
            q = fmt.dequantise_parts(parts, (b - a, cols), self.dtype)  # decode's own arithmetic, row by row
            ref = w2d[a:b].double()
            diff, sq = (ref - q.double()).square(), ref.square()
            if weight2d is not None:
                diff, sq = diff * weight2d[a:b].double(), sq * weight2d[a:b].double()
            num, den = num + diff.sum(), den + sq.sum()
        num, den = float(num), float(den)
        return num / den if den > 0 else num

    # -- PendingFit ------------------------------------------------------------------------------
    def job(self, w: torch.Tensor, weight: torch.Tensor | None = None, local: bool = False) -> EncodeJob:
        self.attempts += 1
        if self.attempts > MAX_GRID_ATTEMPTS:
            raise ValueError(f"could not fit the grid within bits={self.bits} (coded size keeps exceeding the budget; "
                             f"for a tensor of {self.numel} values the scales and the coder's fixed costs may "
                             "leave too little: raise bits or min_bits)")
        norm = self._normalise(w)
        if self.step is None:
            self.step, codes = self._fit_estimate(norm, self._search(norm, self._target(norm)))
        else:  # a retry after an overshoot, at the step accept() chose
            codes = self._codes(norm.u, self.step)
        self.format = self.base.replace(element=GridElement(self.step))
        self.stored = norm.stored
        self.error = self._error(w, weight, norm, codes, self.step)
        codes = _compact(codes)
        return EncodeJob(self.format, symbols=codes if local else _Wire.of(codes))

    def accept(self, outcome: EncodeOutcome) -> FitResult | None:
        tensors = dict(self.stored)
        coded = outcome.torch_tensors()
        tensors = {**{k: v for k, v in tensors.items() if k.startswith("scales")}, **coded,
                   **{k: v for k, v in tensors.items() if not k.startswith("scales")}}  # TensorFormat.encode's order
        encoded = EncodedTensor(self.format, self.shape, self.dtype, tensors)
        if encoded.nbits > self.limit:  # d bits / d log2(step) ~ -1 per element at high rate
            self.step *= 2 ** max((encoded.nbits - self.limit) / self.numel, 0.002)
            return None
        return FitResult(self.format, encoded.nbits, encoded.bits_per_element, self.error, encoded)


def _chunks(rows: int, cols: int):
    """Row ranges holding about CHUNK_ELEMENTS values each."""
    per = max(1, CHUNK_ELEMENTS // max(cols, 1))
    return [(a, min(rows, a + per)) for a in range(0, rows, per)]


def _compact(codes: torch.Tensor) -> torch.Tensor:
    """Codes in the narrowest integer type that holds them (less to copy to the CPU and to a worker)."""
    lo, hi = int(codes.min()), int(codes.max())
    for dtype in (torch.int8, torch.int16):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return codes.to(dtype)
    return codes


@_family("grid")
def _fit_grid(p: _Problem) -> TensorFormat:
    """The grid through the family interface (``fit_format`` calls :class:`_GridFit` directly)."""
    result = drive_fit(_GridFit(p.bits, p.scaling, p.sparse, p.rotation, tuple(p.w.shape), p.w.dtype), p.w, p.weight)
    p.encoded = result.encoded
    return result.format


def drive_fit(pending: PendingFit, w: torch.Tensor, weight: torch.Tensor | None = None,
              times: dict[str, float] | None = None) -> FitResult:
    """Run ``pending``'s encode jobs in this process until one is accepted.  ``times``, when
    given, accumulates ``fit_s`` (job set-up and acceptance), ``encode_s`` and ``retries``."""
    times = {} if times is None else times
    while True:
        start = time.perf_counter()
        job = pending.job(w, weight, local=True)
        mark = time.perf_counter()
        outcome = run_encode_job(job)
        del job
        encoded = time.perf_counter()
        result = pending.accept(outcome)
        times["fit_s"] = times.get("fit_s", 0.0) + (mark - start) + (time.perf_counter() - encoded)
        times["encode_s"] = times.get("encode_s", 0.0) + (encoded - mark)
        if result is not None:
            return result
        times["retries"] = times.get("retries", 0.0) + 1


def start_fit(
    w: torch.Tensor,
    family: str,
    bits: float,
    *,
    scaling: Scaling | None = None,
    sparse: SparseOutliers | None = None,
    rotation: Rotation | None = None,
    weight: torch.Tensor | None = None,
    distribution: str = "auto",
) -> PendingFit:
    """Validate and search (fixed-length families search a sample here; the grid searches in
    its first ``job``); see :func:`fit_format` for the arguments."""
    check_choice("fit_format", "family", family, sorted(FAMILIES))
    check_range("fit_format", "bits", bits, 0.05, 32.0)
    check_choice("fit_format", "distribution", distribution, ("auto", "normal", "laplace", "student_t"))
    if weight is not None and weight.shape != w.shape:
        raise ValueError(f"fit_format: weight must have w's shape {tuple(w.shape)}, got {tuple(weight.shape)}")
    if w.ndim == 0:
        raise ValueError("cannot quantise a 0-d tensor")
    scaling = scaling or DEFAULT_SCALING[family]
    if family == "grid":
        return _GridFit(bits, scaling, sparse, rotation, tuple(w.shape), w.dtype)
    problem = _Problem(w.detach(), None if weight is None else weight.detach(), bits, scaling, sparse, rotation,
                       distribution)
    return _FixedFit(FAMILIES[family](problem), tuple(w.shape), w.dtype)


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
    pending = start_fit(w, family, bits, scaling=scaling, sparse=sparse, rotation=rotation, weight=weight,
                        distribution=distribution)
    return drive_fit(pending, w, weight)


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
