"""Small helpers for walking transformers models."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["conv1d_to_linear", "set_submodule", "is_conv1d", "is_skipped"]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family: weight stored [in, out]), matched by name so that
    transformers' pytorch_utils need not be imported here."""
    return type(module).__name__ == "Conv1D"


def is_skipped(name: str, skip: tuple[str, ...] | list[str]) -> bool:
    """The ``modules_to_not_convert`` rule: a module is left alone if its name contains any entry."""
    return any(s in name for s in skip)


def conv1d_to_linear(model: nn.Module, skip: tuple[str, ...] | list[str] = ()) -> int:
    """Replace transformers' ``Conv1D`` (GPT-2 family, weight stored [in, out]) by the
    equivalent ``nn.Linear`` (weight [out, in]) so every projection is an nn.Linear; those
    whose names match ``skip`` (see :func:`is_skipped`) stay Conv1D, so that a saved model
    keeps the layout its class loads.  Returns how many were replaced."""
    targets = [(n, m) for n, m in model.named_modules() if is_conv1d(m) and not is_skipped(n, skip)]
    for name, conv in targets:
        in_features, out_features = conv.weight.shape
        linear = nn.Linear(in_features, out_features, bias=conv.bias is not None,
                           device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        set_submodule(model, name, linear)
    return len(targets)
