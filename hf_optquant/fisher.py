"""Diagonal Fisher information of linear weights, estimated on calibration text.

For a model p(y | x; theta) the KL divergence to a perturbed copy is, to second order,
KL ~= 1/2 sum_i F_ii delta_i^2 with F the Fisher information, which is why the paper's
Fisher-weighted squared error is the right target for weight quantisation.

Estimator: one backward pass per sequence; the squared gradient of the sequence's
summed log-likelihood is accumulated and divided by the number of predicted tokens.

* ``mode="sampled"`` (default, the true Fisher): targets are sampled from the model's own
  next-token distribution.  Given the inputs, each token's score has zero mean, so
  cross-token terms vanish in expectation and the estimate is unbiased per token.
* ``mode="empirical"``: targets are the text's next tokens (the "empirical Fisher").

Per-tensor sums are always kept (float64 scalars, accumulated on the weights' devices so
the backward pass never waits for the host); per-element values (float32, the
size of the weights) only when ``per_element=True``.  Gradients are consumed by a hook
as soon as each weight's gradient is ready, so at most one weight gradient lives at a
time beyond what autograd itself holds; ``gradient_checkpointing`` trades compute for
activation memory on transformers models (dropout stays off either way).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .formats.spec import check_choice
from .model_utils import is_skipped

__all__ = ["FisherEstimate", "estimate_fisher", "linear_weights"]


@dataclasses.dataclass
class FisherEstimate:
    """Fisher information per linear weight, normalised per predicted token."""

    sums: dict[str, float]  # sum over a tensor's elements of F_ii
    numels: dict[str, int]
    tokens: int
    sequences: int
    mode: str
    per_element: dict[str, torch.Tensor] | None = None

    def mean(self, name: str) -> float:
        return self.sums[name] / max(1, self.numels[name])

    def to_json(self) -> dict:
        return {"sums": self.sums, "numels": self.numels, "tokens": self.tokens,
                "sequences": self.sequences, "mode": self.mode}


def linear_weights(model: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, nn.Parameter]:
    """``{module_name: weight}`` for every nn.Linear whose name contains none of ``skip``."""
    return {
        name: module.weight
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not is_skipped(name, skip)
    }


def estimate_fisher(
    model: nn.Module,
    sequences: torch.Tensor,
    weights: Mapping[str, nn.Parameter] | None = None,
    *,
    mode: str = "sampled",
    per_element: bool = False,
    gradient_checkpointing: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> FisherEstimate:
    """Estimate the diagonal Fisher of ``weights`` (default: every nn.Linear weight).

    ``sequences``: int64 token ids [num_sequences, seq_len]; each row is one backward pass.
    """
    check_choice("estimate_fisher", "mode", mode, ("sampled", "empirical"))
    if sequences.ndim != 2 or sequences.shape[1] < 2:
        raise ValueError(f"sequences must be [num_sequences, seq_len >= 2] token ids, got {tuple(sequences.shape)}")
    weights = dict(weights if weights is not None else linear_weights(model))
    if not weights:
        raise ValueError("estimate_fisher: no weights to estimate (the model has no nn.Linear?)")
    sums = {n: torch.zeros((), dtype=torch.float64, device=p.device) for n, p in weights.items()}
    dense = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in weights.items()} if per_element else None
    device = next(iter(weights.values())).device
    generators: dict[torch.device, torch.Generator] = {}  # per logits device (a model split over GPUs)

    with _only_these_require_grad(model, weights.values()), \
            _deterministic_forward(model, gradient_checkpointing):
        handles = [_accumulate_on_ready(p, name, sums, dense) for name, p in weights.items()]
        try:
            for row in tqdm(sequences, desc=f"Fisher ({mode})", disable=not progress, unit="seq"):
                _backward_one(model, row.to(device)[None], mode, generators, seed)
        finally:
            for handle in handles:
                handle.remove()
    tokens = sequences.shape[0] * (sequences.shape[1] - 1)
    sums = {n: float(s) / tokens for n, s in sums.items()}
    if dense is not None:
        dense = {n: t.div_(tokens) for n, t in dense.items()}
    return FisherEstimate(sums, {n: p.numel() for n, p in weights.items()}, tokens,
                          sequences.shape[0], mode, dense)


def _backward_one(model: nn.Module, ids: torch.Tensor, mode: str, generators: dict, seed: int) -> None:
    logits = model(input_ids=ids).logits[:, :-1].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    if mode == "sampled":
        dev = log_probs.device
        if dev not in generators:
            generators[dev] = torch.Generator(device=dev).manual_seed(seed)
        with torch.no_grad():
            targets = torch.multinomial(log_probs.exp().reshape(-1, log_probs.shape[-1]), 1,
                                        generator=generators[dev]).reshape(ids.shape[0], -1)
    else:
        targets = ids[:, 1:].to(log_probs.device)
    log_likelihood = log_probs.gather(-1, targets[..., None]).sum()
    log_likelihood.backward()


def _accumulate_on_ready(param: nn.Parameter, name: str, sums: dict[str, torch.Tensor],
                         dense: dict[str, torch.Tensor] | None):
    def hook(p: torch.Tensor) -> None:
        g2 = p.grad.detach().float().square()
        sums[name] += g2.sum(dtype=torch.float64)  # stays on the device: no sync inside backward
        if dense is not None:
            dense[name].add_(g2)
        p.grad = None

    return param.register_post_accumulate_grad_hook(hook)


class _only_these_require_grad:
    def __init__(self, model: nn.Module, params):
        self.model, self.params = model, list(params)

    def __enter__(self):
        self.saved = {p: p.requires_grad for p in self.model.parameters()}
        for p in self.saved:
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)

    def __exit__(self, *exc):
        for p, flag in self.saved.items():
            p.requires_grad_(flag)
            p.grad = None


class _deterministic_forward:
    """Dropout off, optionally with activation checkpointing; everything is restored on exit.

    transformers only checkpoints in training mode, so with checkpointing the model is put
    in training mode and every dropout probability (nn.Dropout modules and the float
    ``dropout`` / ``attention_dropout`` attributes attention layers read) is set to zero.
    """

    _DROPOUT_ATTRS = ("dropout", "attention_dropout", "attn_dropout", "resid_dropout")

    def __init__(self, model: nn.Module, checkpointing: bool):
        self.model = model
        self.checkpointing = checkpointing and hasattr(model, "gradient_checkpointing_enable")

    def __enter__(self):
        self.was_training = self.model.training
        self.saved: list[tuple[object, str, float]] = []
        if not self.checkpointing:
            self.model.eval()
            return
        for module in self.model.modules():
            if isinstance(module, nn.Dropout):
                self.saved.append((module, "p", module.p))
                module.p = 0.0
            for attr in self._DROPOUT_ATTRS:
                value = getattr(module, attr, None)
                if isinstance(value, float):
                    self.saved.append((module, attr, value))
                    setattr(module, attr, 0.0)
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            self.model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()

    def __exit__(self, *exc):
        if self.checkpointing:
            disable = getattr(self.model, "activation_checkpointing_disable", None)
            (disable or self.model.gradient_checkpointing_disable)()
        for obj, attr, value in self.saved:
            setattr(obj, attr, value)
        self.model.train(self.was_training)
