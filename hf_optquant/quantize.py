"""Quantise every linear weight of a model: Fisher -> allocation -> fit -> encode.

:func:`quantize_model` is the whole pipeline for any ``PreTrainedModel`` (or any module
whose forward accepts ``input_ids`` and returns ``.logits``).  It returns the encoded
tensors and a :class:`QuantizationReport`; with ``apply="fake"`` the model's weights are
replaced by their quantised values (for evaluation), with ``apply="modules"`` the
nn.Linear modules are swapped for :class:`~hf_optquant.nn.QuantLinear` holding only the
encoded tensors, and ``apply="none"`` leaves the model untouched.

Layer by layer, bounded memory
    Tensors are fitted one at a time in module order and each is applied (module swapped,
    or fake-quantised weight written) as soon as its encoding is back, so with
    ``apply="modules"`` the full-precision weights are released progressively and nothing
    here keeps a reference to them.  With ``weights=`` a callable that returns a linear
    weight by module name (read from a checkpoint, say), the model's linear weights may stay
    on the ``meta`` device and only the tensors being fitted exist in full precision: the
    peak is one weight, its work arrays (8 bytes per element: float32 normalised values and
    int32 codes, plus ~30 MB of row-chunk temporaries), the coder's own working memory and
    the packed model, plus up to ``max_in_flight`` tensors' codes (1-2 bytes per element, on
    the CPU) waiting for an encoder.  Fisher estimation needs the whole model
    (forward + backward), so streaming needs ``config.needs_fisher`` to be false or a
    precomputed ``fisher``; with Fisher the peak is the full model plus its activations.
    :func:`quantize_tensor` is the per-tensor step on its own (same fit, same bytes), which
    ``from_pretrained`` uses to quantise each weight as it is read when no Fisher is needed.

Devices and CPU cores
    Each tensor is fitted on the device it lives on (the grid's search is all torch ops).
    Lossless coding runs either in ``workers`` spawned CPU processes (default: all cores but
    one for models of 64M+ weights on machines with 4+ cores), overlapped with fitting the
    next tensors, or with ``workers=0`` in this process, on the device that holds the codes
    (the coder runs where its input is).  ``report.timings`` gives each stage's wall time
    (``fisher_s``, ``allocation_s``, ``fetch_s``, ``fit_s``, ``encode_wait_s``, ``apply_s``,
    ``fit_encode_s``, ``total_s``), the encoders' CPU seconds and the number of re-encodes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocate import RatePoint, TensorStats, fisher_allocation, global_allocation, round_allocation
from .config import OptQuantConfig
from .fisher import FisherEstimate, estimate_fisher, linear_weights
from .formats import EncodedTensor
from .formats.fit import (
    ESTIMATE_ELEMENTS,
    EncodeJob,
    EncodeOutcome,
    FitResult,
    PendingFit,
    drive_fit,
    fit_format,
    realisable_bits,
    run_encode_job,
    start_fit,
)
from .model_utils import conv1d_to_linear, is_conv1d, is_skipped

__all__ = ["TensorReport", "QuantizationReport", "quantize_model", "calibration_sequences", "plan_bits",
           "WeightSource", "checkpoint_source", "default_workers", "quantisable_modules", "quantize_tensor",
           "check_finite", "build_report", "unquantised_size"]

WeightSource = Callable[[str], torch.Tensor]
AUTO_WORKERS_MIN_ELEMENTS = 1 << 26  # below ~64M weights, starting processes costs more than it saves


@dataclasses.dataclass(frozen=True)
class TensorReport:
    name: str
    shape: tuple[int, ...]
    target_bits: float
    bits: int  # stored bits, all-inclusive
    bits_per_element: float
    relative_error: float  # (weighted) relative squared error
    rms: float
    fisher_mean: float | None
    format: dict

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def kl_proxy(self) -> float | None:
        """1/2 Fbar * SSE: the second-order KL contribution (nats/token), if Fisher is known."""
        if self.fisher_mean is None:
            return None
        return 0.5 * self.fisher_mean * self.relative_error * self.rms**2 * self.numel


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
    config: dict
    tensors: list[TensorReport]
    other_bits: int  # parameters left unquantised, at their stored width
    other_params: int
    fisher: dict | None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per stage (see quantize_model)

    @property
    def quantised_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def bits_per_param(self) -> float:
        """Over the quantised tensors only."""
        return sum(t.bits for t in self.tensors) / max(1, self.quantised_params)

    @property
    def model_bits_per_param(self) -> float:
        """Over every parameter of the model (unquantised ones at their dtype width)."""
        total = self.quantised_params + self.other_params
        return (sum(t.bits for t in self.tensors) + self.other_bits) / max(1, total)

    def to_dict(self) -> dict:
        return {"config": self.config, "bits_per_param": self.bits_per_param,
                "model_bits_per_param": self.model_bits_per_param, "fisher": self.fisher, "timings": self.timings,
                "tensors": [dataclasses.asdict(t) | {"numel": t.numel} for t in self.tensors]}


def calibration_sequences(tokenizer, config: OptQuantConfig) -> torch.Tensor:
    from .data.text import load_text
    from .eval import text_to_sequences

    text = config.calibration_text if config.calibration_text is not None else load_text("calibration")
    return text_to_sequences(tokenizer, text, config.calibration_seq_len, config.calibration_tokens)


def _rms(w: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(w.detach(), dtype=torch.float64)) / math.sqrt(max(1, w.numel()))


def plan_bits(weights: Mapping[str, torch.Tensor], config: OptQuantConfig,
              fisher: FisherEstimate | None, progress: bool = True) -> dict[str, float]:
    """Per-tensor bit budgets following ``config.allocation``; ``weights`` is read once, in order."""
    if config.allocation == "uniform":
        return dict.fromkeys(weights, float(config.bits))
    if config.allocation == "fisher":
        stats, shapes = {}, {}
        for n in weights:  # fetch, measure, drop: a streamed source keeps one weight alive
            w = weights[n]
            stats[n], shapes[n] = TensorStats(w.numel(), _rms(w), fisher.mean(n)), tuple(w.shape)
            del w
        options = {n: realisable_bits(config.format, shape, config.scaling(), config.sparse())
                   for n, shape in shapes.items()}
        floors = {n: _grid_floor(shape, config) for n, shape in shapes.items() if options[n] is None}
        targets = fisher_allocation(stats, config.bits, config.min_bits, config.max_bits, floors)
        if any(o is None for o in options.values()):  # variable-length: any target above the floor is realisable
            return targets
        numels = {n: s.numel for n, s in stats.items()}
        rounded = round_allocation(targets, options, numels, config.bits)
        mean = sum(rounded[n] * numels[n] for n in rounded) / sum(numels.values())
        if mean > config.bits + 1e-9:  # a fixed-length family whose narrowest width is over the budget
            raise ValueError(f"OptQuantConfig.bits={config.bits} is below what format={config.format!r} can store "
                             f"with this scaling ({mean:.4g} bits/parameter at its narrowest); raise bits or "
                             "choose another format")
        return rounded
    curves, stats = {}, {}
    for name in tqdm(weights, desc="rate-distortion curves", disable=not progress):
        w = weights[name]
        curves[name] = _rate_curve(w, config)
        stats[name] = TensorStats(w.numel(), _rms(w), fisher.mean(name))
        del w
    return global_allocation(curves, stats, config.bits)


GRID_FLOOR_CODE_BITS = 0.25  # bits per element left for the codes above a small tensor's fixed costs


def _grid_floor(shape: tuple[int, ...], config: OptQuantConfig) -> float:
    """The least budget worth giving an entropy-coded tensor: its scales, outliers and the coder's
    fixed costs (header, table, per-lane state), plus GRID_FLOOR_CODE_BITS for the codes themselves.
    Only small tensors (the estimate runs on an all-zero stream of the same shape) get a floor."""
    numel = math.prod(shape)
    if numel > ESTIMATE_ELEMENTS:
        return config.min_bits  # fixed costs are a few hundredths of a bit per element or less
    from .coding import estimate_bits
    from .formats import IntElement, TensorFormat

    rows, cols = numel // shape[-1], shape[-1]
    overhead = TensorFormat(IntElement(1), config.scaling(), config.sparse()).storage_bits((rows, cols))
    overhead -= 8 * (-(-numel // 8))  # scales and outliers only, not the 1-bit codes
    overhead += estimate_bits(torch.zeros((rows, cols), dtype=torch.int8))
    return overhead / numel + GRID_FLOOR_CODE_BITS


def _rate_curve(w: torch.Tensor, config: OptQuantConfig) -> list[RatePoint]:
    candidates = realisable_bits(config.format, tuple(w.shape), config.scaling(), config.sparse())
    if candidates is None:
        steps = int(round((config.max_bits - config.min_bits) / 0.25))
        candidates = [config.min_bits + 0.25 * i for i in range(steps + 1)]
    candidates = [b for b in candidates if config.min_bits <= b <= config.max_bits]
    points = []
    ref = float(w.double().square().sum())
    for bits in candidates:
        try:
            fit = _fit(w, config, bits + 1e-9, None)
        except ValueError:
            continue
        points.append(RatePoint(fit.bits_per_element, fit.error * ref))
    if not points:
        raise ValueError(f"no {config.format} format fits within [{config.min_bits}, {config.max_bits}] bits")
    return points


def _fit(w: torch.Tensor, config: OptQuantConfig, bits: float, weight: torch.Tensor | None):
    return fit_format(w, config.format, bits, scaling=config.scaling(), sparse=config.sparse(),
                      rotation=config.rotation(), weight=weight, distribution=config.distribution)


def _start(w: torch.Tensor, config: OptQuantConfig, bits: float, weight: torch.Tensor | None) -> PendingFit:
    return start_fit(w, config.format, bits, scaling=config.scaling(), sparse=config.sparse(),
                     rotation=config.rotation(), weight=weight, distribution=config.distribution)


def _tensor_report(name: str, result: FitResult, target_bits: float, rms: float,
                   fisher_mean: float | None) -> TensorReport:
    enc = result.encoded
    return TensorReport(name, tuple(enc.shape), target_bits, enc.nbits, enc.bits_per_element, result.error, rms,
                        fisher_mean, result.format.to_dict())


def quantisable_modules(model: nn.Module, skip: tuple[str, ...] | list[str]) -> dict[str, nn.Module]:
    """``{name: module}`` of the linears :func:`quantize_model` quantises: every nn.Linear and GPT-2
    ``Conv1D`` (which quantize_model first converts to nn.Linear, in place, keeping the module
    order) whose name contains none of ``skip`` (``config.modules_to_not_convert``)."""
    return {name: module for name, module in model.named_modules()
            if (isinstance(module, nn.Linear) or is_conv1d(module)) and not is_skipped(name, skip)}


def quantize_tensor(name: str, w: torch.Tensor, config: OptQuantConfig, bits: float,
                    times: dict[str, float] | None = None) -> tuple[EncodedTensor, TensorReport]:
    """Fit and encode one weight ([out, in], on any device) in this process, without Fisher
    information: exactly what :func:`quantize_model` does to each tensor of a ``bits`` budget
    (same fit, same bytes as with ``workers=0``), for callers that see the weights one at a
    time (quantise-while-loading in ``from_pretrained``).  ``times`` accumulates ``fit_s``,
    ``encode_s`` and ``retries``."""
    times = {} if times is None else times
    start = time.perf_counter()
    pending = _start(w, config, bits + 1e-9, None)
    rms = _rms(w)
    times["fit_s"] = times.get("fit_s", 0.0) + time.perf_counter() - start
    result = drive_fit(pending, w, None, times)
    return result.encoded, _tensor_report(name, result, bits, rms, None)


def build_report(config: OptQuantConfig, names: list[str], reports: list[TensorReport], other_bits: int,
                 other_params: int, fisher: FisherEstimate | None, timings: dict[str, float]) -> QuantizationReport:
    """The report, tensors in ``names`` (module) order whatever order they were quantised in."""
    order = {n: i for i, n in enumerate(names)}
    reports = sorted(reports, key=lambda r: order[r.name])
    return QuantizationReport(config.to_dict(), reports, other_bits, other_params,
                              fisher.to_json() if fisher else None, timings)


def unquantised_size(model: nn.Module) -> tuple[int, int]:
    """(stored bits, element count) of every parameter of ``model`` (tied ones once): after every
    quantised linear became a QuantLinear (encoded buffers, not parameters), the unquantised rest."""
    return _size_of(_unique_params(model))


class _LazyWeights(Mapping):
    """``{name: weight}`` whose values come from a source on each access (nothing is cached)."""

    def __init__(self, names: list[str], source: WeightSource):
        self.names, self.source = names, source

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.source(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def checkpoint_source(path: str | os.PathLike, device: str | torch.device = "cpu", prefix: str = "") -> WeightSource:
    """A :data:`WeightSource` reading ``{prefix}{module}.weight`` from safetensors files (one file, or
    every ``*.safetensors`` shard in a directory) one tensor per call, so only that tensor is loaded."""
    from safetensors import safe_open

    root = Path(path)
    files = sorted(root.glob("*.safetensors")) if root.is_dir() else [root]
    if not files or not all(f.is_file() for f in files):
        raise ValueError(f"checkpoint_source: no safetensors file at {str(root)!r}")
    where = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), file))

    def source(name: str) -> torch.Tensor:
        key = f"{prefix}{name}.weight"
        if key not in where:
            raise ValueError(f"checkpoint_source: {key!r} is not in the checkpoint at {str(root)!r}")
        with safe_open(where[key], framework="pt", device=str(device)) as handle:
            return handle.get_tensor(key)

    return source


def default_workers(total_elements: int) -> int:
    """Encoder processes for ``total_elements`` weights: all cores but one (at most 32) for large
    models, none (encode in this process) for small ones or machines with fewer than 4 cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores < 4 or total_elements < AUTO_WORKERS_MIN_ELEMENTS:
        return 0
    return min(cores - 1, 32)


def _init_worker() -> None:
    torch.set_num_threads(1)  # one job per process: the pool provides the parallelism


def _ready() -> bool:
    return True


@contextlib.contextmanager
def _main_module_hidden():
    """Spawned children re-import the parent's ``__main__`` (re-running an unguarded script, or
    pytest) unless it has no ``__spec__``/``__file__``; encoder jobs only need hf_optquant."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if main is not None and k in main.__dict__}
    try:
        for key in saved:
            if key == "__spec__":
                main.__spec__ = None
            else:
                del main.__dict__[key]
        yield
    finally:
        for key, value in saved.items():
            main.__dict__[key] = value


class _Encoders:
    """Runs EncodeJobs in this process (``workers == 0``) or in spawned worker processes.

    Spawned, not forked: the parent may hold CUDA state and threads.  Jobs and outcomes are
    plain numpy arrays, so nothing goes through shared-memory segments."""

    def __init__(self, workers: int):
        self.pool = None
        if workers > 0:
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker)
            with _main_module_hidden():  # start them all now (imports take seconds: overlap them with Fisher)
                for _ in range(workers):
                    self.pool.submit(_ready)

    @property
    def local(self) -> bool:
        """Jobs run in this process (so grid codes may stay on the GPU, where the coder then runs)."""
        return self.pool is None

    def submit(self, job: EncodeJob) -> Future:
        if self.pool is not None:
            return self.pool.submit(run_encode_job, job)
        future: Future = Future()
        try:
            future.set_result(run_encode_job(job))
        except Exception as err:  # noqa: BLE001 - surfaced by future.result(), as a pool would
            future.set_exception(err)
        return future

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


@dataclasses.dataclass
class _InFlight:
    name: str
    pending: PendingFit
    future: Future
    rms: float
    device: torch.device


@dataclasses.dataclass
class _Pipeline:
    """Fit tensors in order, keep up to ``max_in_flight`` encodings running, apply each result."""

    model: nn.Module
    config: OptQuantConfig
    source: WeightSource
    budgets: dict[str, float]
    fisher: FisherEstimate | None
    apply: str
    encoders: _Encoders
    max_in_flight: int
    encoded: dict[str, EncodedTensor] = dataclasses.field(default_factory=dict)
    reports: list[TensorReport] = dataclasses.field(default_factory=list)
    times: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(
        ("fetch_s", "fit_s", "encode_wait_s", "encode_cpu_s", "apply_s"), 0.0))
    retries: int = 0

    def element_weight(self, name: str) -> torch.Tensor | None:
        return self.fisher.per_element[name] if (self.fisher and self.fisher.per_element) else None

    def run(self, names: list[str], progress: bool) -> None:
        queue: deque[_InFlight] = deque()
        for name in tqdm(names, desc=f"fit + encode ({self.config.format})", disable=not progress):
            start = time.perf_counter()
            w = self._fetch(name)
            self.times["fetch_s"] += time.perf_counter() - start
            start = time.perf_counter()
            pending = _start(w, self.config, self.budgets[name] + 1e-9, self.element_weight(name))
            job = pending.job(w, self.element_weight(name), local=self.encoders.local)
            rms, device = _rms(w), w.device
            del w  # nothing keeps the full-precision weight alive past this point
            self.times["fit_s"] += time.perf_counter() - start
            start = time.perf_counter()  # inline encoders run here; a pool only queues the job
            item = _InFlight(name, pending, self.encoders.submit(job), rms, device)
            del job
            self.times["encode_wait_s"] += time.perf_counter() - start
            queue.append(item)
            while len(queue) > self.max_in_flight:
                self._finish(queue.popleft())
        while queue:
            self._finish(queue.popleft())

    def _fetch(self, name: str) -> torch.Tensor:
        w = self.source(name)
        expected = tuple(self.model.get_submodule(name).weight.shape)
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != expected or w.device.type == "meta":
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"quantize_model: weights({name!r}) must return a materialised tensor of shape "
                             f"{expected}, got {got}")
        return w

    def _outcome(self, future: Future) -> EncodeOutcome:
        start = time.perf_counter()
        outcome = future.result()
        self.times["encode_wait_s"] += time.perf_counter() - start
        self.times["encode_cpu_s"] += outcome.seconds
        return outcome

    def _finish(self, item: _InFlight) -> None:
        while (result := item.pending.accept(self._outcome(item.future))) is None:
            start = time.perf_counter()  # the coded size overshot: re-derive codes at a larger step
            self.retries += 1
            w = self._fetch(item.name)
            job = item.pending.job(w, self.element_weight(item.name), local=self.encoders.local)
            del w
            self.times["fit_s"] += time.perf_counter() - start
            start = time.perf_counter()
            item.future = self.encoders.submit(job)
            self.times["encode_wait_s"] += time.perf_counter() - start
        self.encoded[item.name] = result.encoded
        self.reports.append(_tensor_report(item.name, result, self.budgets[item.name], item.rms,
                                           self.fisher.mean(item.name) if self.fisher else None))
        start = time.perf_counter()
        _apply_one(self.model, item.name, result.encoded, self.apply, item.device)
        self.times["apply_s"] += time.perf_counter() - start


def quantize_model(
    model: nn.Module,
    config: OptQuantConfig,
    *,
    tokenizer=None,
    calibration: torch.Tensor | None = None,
    fisher: FisherEstimate | None = None,
    apply: str = "fake",
    progress: bool = True,
    weights: WeightSource | None = None,
    workers: int | None = None,
    max_in_flight: int | None = None,
) -> tuple[dict[str, EncodedTensor], QuantizationReport]:
    """Quantise ``model``'s linear weights per ``config``; see the module docstring.

    ``fisher``: a precomputed estimate to reuse (e.g. across several configs of one model);
    otherwise it is estimated on ``calibration`` ids or on ``tokenizer``-encoded calibration text.
    ``weights``: stream the linear weights from this callable (module name -> tensor) instead of
    reading them from the model, whose linear weights may then be on the ``meta`` device.
    ``workers``: encoder processes (None: :func:`default_workers`; 0: encode in this process).
    ``max_in_flight``: encodings queued or running at once (default ``2 * workers``, at least 1).
    """
    started = time.perf_counter()
    if apply not in ("fake", "modules", "none"):
        raise ValueError(f"quantize_model: apply must be one of ['fake', 'modules', 'none'], got {apply!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise ValueError(f"quantize_model: workers must be None (automatic) or an int >= 0, got {workers!r}")
    if max_in_flight is not None and (not isinstance(max_in_flight, int) or max_in_flight < 1):
        raise ValueError(f"quantize_model: max_in_flight must be None or an int >= 1, got {max_in_flight!r}")
    conv1d_to_linear(model, skip=config.modules_to_not_convert)  # skipped ones keep the layout their class loads
    params = linear_weights(model, skip=tuple(config.modules_to_not_convert))
    if not params:
        raise ValueError("quantize_model: no nn.Linear weights to quantise (check modules_to_not_convert)")
    _check_sources(params, weights, fisher, config)
    names = list(params)
    workers = default_workers(sum(p.numel() for p in params.values())) if workers is None else workers
    encoders = _Encoders(workers)
    try:
        timings = {"workers": float(workers)}
        if fisher is None and config.needs_fisher:
            fisher = _estimate(model, params, config, tokenizer, calibration, progress)
            timings["fisher_s"] = time.perf_counter() - started
        quantised = {id(p) for p in params.values()}
        other_bits, other_params = _size_of(p for p in _unique_params(model) if id(p) not in quantised)
        del params  # hold no reference to the weights from here on
        source = weights or _model_weight_source(model)
        mark = time.perf_counter()
        budgets = plan_bits(_LazyWeights(names, source), config, fisher, progress)
        timings["allocation_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        pipeline = _Pipeline(model, config, source, budgets, fisher, apply, encoders,
                             max_in_flight or max(1, 2 * workers))
        pipeline.run(names, progress)
        timings.update(pipeline.times, fit_encode_s=time.perf_counter() - mark, retries=float(pipeline.retries))
    finally:
        encoders.close()
    timings["total_s"] = time.perf_counter() - started
    report = build_report(config, names, pipeline.reports, other_bits, other_params, fisher, timings)
    return {n: pipeline.encoded[n] for n in names}, report


def _check_sources(params: Mapping[str, nn.Parameter], weights: WeightSource | None,
                   fisher: FisherEstimate | None, config: OptQuantConfig) -> None:
    if weights is not None and not callable(weights):
        raise ValueError(f"quantize_model: weights must be a callable (module name -> tensor), got {type(weights)}")
    if weights is None and any(p.device.type == "meta" for p in params.values()):
        raise ValueError("quantize_model: some linear weights are on the meta device; pass weights= to stream them")
    for name, p in params.items():  # before Fisher estimation, which NaN/Inf would poison silently
        if p.device.type != "meta":
            check_finite(name, p)
    if weights is not None and fisher is None and config.needs_fisher:
        raise ValueError(f"quantize_model: streaming weights with allocation={config.allocation!r} "
                         f"(weighted_fit={config.weighted_fit}) needs a precomputed `fisher` (Fisher estimation "
                         "runs the whole model); use allocation='uniform' or pass fisher=")
    if fisher is not None and config.weighted_fit and fisher.per_element is None:
        raise ValueError("quantize_model: weighted_fit needs a Fisher estimate with per_element=True")


def check_finite(name: str, w: torch.Tensor) -> None:
    """Refuse a weight holding NaN or Inf (a fit would turn it into garbage codes silently)."""
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"quantize_model: the weight of {name} contains NaN or Inf; fix the checkpoint or "
                         f"list {name!r} in modules_to_not_convert to keep it in full precision")


def _estimate(model, params, config, tokenizer, calibration, progress) -> FisherEstimate:
    if calibration is None:
        if tokenizer is None:
            raise ValueError("quantize_model: Fisher allocation needs `tokenizer` or `calibration` token ids")
        calibration = calibration_sequences(tokenizer, config)
    return estimate_fisher(model, calibration, params, mode=config.fisher_mode,
                           per_element=config.weighted_fit, seed=config.seed, progress=progress)


def _model_weight_source(model: nn.Module) -> WeightSource:
    def source(name: str) -> torch.Tensor:
        return model.get_submodule(name).weight.detach()

    return source


def _size_of(params) -> tuple[int, int]:
    """(stored bits, element count) of parameters kept unquantised, at their dtype's width."""
    bits = count = 0
    for p in params:
        bits, count = bits + p.numel() * p.element_size() * 8, count + p.numel()
    return bits, count


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _apply_one(model: nn.Module, name: str, enc: EncodedTensor, apply: str, device: torch.device) -> None:
    """Apply one tensor's result; ``device`` is where its full-precision weight was (used when the
    model's own weight is on ``meta``, i.e. streamed)."""
    if apply == "none":
        return
    module = model.get_submodule(name)
    streamed = module.weight.device.type == "meta"
    if apply == "fake":
        decoded = enc.format.decode(enc)
        with torch.no_grad():
            if streamed:
                module.weight = nn.Parameter(decoded.to(device), requires_grad=False)
            else:
                module.weight.copy_(decoded.to(module.weight.device))
        return
    from .model_utils import set_submodule
    from .nn import QuantLinear

    if streamed:
        new = QuantLinear.from_encoded(enc, getattr(module, "bias", None), device=device)
    else:
        new = QuantLinear.from_linear(module, enc)
    set_submodule(model, name, new)
