"""Quantise every linear weight of a model: Fisher -> allocation -> fit -> encode.

:func:`quantize_model` is the whole pipeline for any ``PreTrainedModel`` (or any module
whose forward accepts ``input_ids`` and returns ``.logits``).  It returns the encoded
tensors and a :class:`QuantizationReport`; with ``apply="fake"`` the model's weights are
replaced by their quantised values (for evaluation), with ``apply="modules"`` the
nn.Linear modules are swapped for :class:`~hf_optquant.nn.QuantLinear` holding only the
encoded tensors, and ``apply="none"`` leaves the model untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocate import RatePoint, TensorStats, fisher_allocation, global_allocation, round_allocation
from .config import OptQuantConfig
from .fisher import FisherEstimate, estimate_fisher, linear_weights
from .formats import EncodedTensor
from .formats.fit import fit_format, realisable_bits
from .model_utils import conv1d_to_linear

__all__ = ["TensorReport", "QuantizationReport", "quantize_model", "calibration_sequences", "plan_bits"]


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
                "model_bits_per_param": self.model_bits_per_param, "fisher": self.fisher,
                "tensors": [dataclasses.asdict(t) | {"numel": t.numel} for t in self.tensors]}


def calibration_sequences(tokenizer, config: OptQuantConfig) -> torch.Tensor:
    from .data.text import load_text
    from .eval import text_to_sequences

    text = config.calibration_text if config.calibration_text is not None else load_text("calibration")
    return text_to_sequences(tokenizer, text, config.calibration_seq_len, config.calibration_tokens)


def plan_bits(weights: Mapping[str, torch.Tensor], config: OptQuantConfig,
              fisher: FisherEstimate | None, progress: bool = True) -> dict[str, float]:
    """Per-tensor bit budgets following ``config.allocation``."""
    if config.allocation == "uniform":
        return dict.fromkeys(weights, float(config.bits))
    stats = {n: TensorStats(w.numel(), float(w.float().square().mean().sqrt()), fisher.mean(n))
             for n, w in weights.items()}
    numels = {n: s.numel for n, s in stats.items()}
    if config.allocation == "fisher":
        targets = fisher_allocation(stats, config.bits, config.min_bits, config.max_bits)
        options = {n: realisable_bits(config.format, tuple(w.shape), config.scaling(), config.sparse())
                   for n, w in weights.items()}
        if any(o is None for o in options.values()):  # variable-length: any target is realisable
            return targets
        return round_allocation(targets, options, numels, config.bits)
    curves = {}
    for name, w in tqdm(weights.items(), desc="rate-distortion curves", disable=not progress):
        curves[name] = _rate_curve(w, config)
    return global_allocation(curves, stats, config.bits)


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


def quantize_model(
    model: nn.Module,
    config: OptQuantConfig,
    *,
    tokenizer=None,
    calibration: torch.Tensor | None = None,
    fisher: FisherEstimate | None = None,
    apply: str = "fake",
    progress: bool = True,
) -> tuple[dict[str, EncodedTensor], QuantizationReport]:
    """Quantise ``model``'s linear weights per ``config``; see the module docstring for ``apply``.

    ``fisher``: a precomputed estimate to reuse (e.g. across several configs of one model);
    otherwise it is estimated on ``calibration`` ids or on ``tokenizer``-encoded calibration text.
    """
    if apply not in ("fake", "modules", "none"):
        raise ValueError(f"quantize_model: apply must be one of ['fake', 'modules', 'none'], got {apply!r}")
    conv1d_to_linear(model)
    params = linear_weights(model, skip=tuple(config.modules_to_not_convert))
    if not params:
        raise ValueError("quantize_model: no nn.Linear weights to quantise (check modules_to_not_convert)")
    if fisher is not None and config.weighted_fit and fisher.per_element is None:
        raise ValueError("quantize_model: weighted_fit needs a Fisher estimate with per_element=True")
    if fisher is None and config.needs_fisher:
        if calibration is None:
            if tokenizer is None:
                raise ValueError("quantize_model: Fisher allocation needs `tokenizer` or `calibration` token ids")
            calibration = calibration_sequences(tokenizer, config)
        fisher = estimate_fisher(model, calibration, params, mode=config.fisher_mode,
                                 per_element=config.weighted_fit, seed=config.seed, progress=progress)
    weights = {n: p.detach() for n, p in params.items()}
    budgets = plan_bits(weights, config, fisher, progress)
    encoded, reports = {}, []
    for name, w in tqdm(weights.items(), desc=f"fit + encode ({config.format})", disable=not progress):
        element_weight = fisher.per_element[name] if (fisher and fisher.per_element) else None
        fit = _fit(w, config, budgets[name] + 1e-9, element_weight)
        encoded[name] = fit.encoded
        reports.append(TensorReport(name, tuple(w.shape), budgets[name], encoded[name].nbits,
                                    encoded[name].bits_per_element, fit.error,
                                    float(w.float().square().mean().sqrt()),
                                    fisher.mean(name) if fisher else None, fit.format.to_dict()))
    _apply(model, encoded, apply)
    other = [p for p in _unique_params(model) if all(p is not q for q in params.values())]
    report = QuantizationReport(config.to_dict(), reports, sum(p.numel() * p.element_size() * 8 for p in other),
                                sum(p.numel() for p in other), fisher.to_json() if fisher else None)
    return encoded, report


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _apply(model: nn.Module, encoded: Mapping[str, EncodedTensor], apply: str) -> None:
    if apply == "none":
        return
    for name, enc in encoded.items():
        module = model.get_submodule(name)
        if apply == "fake":
            with torch.no_grad():
                module.weight.copy_(enc.format.decode(enc).to(module.weight.device))
        else:
            from .model_utils import set_submodule
            from .nn import QuantLinear

            set_submodule(model, name, QuantLinear.from_linear(module, enc))
