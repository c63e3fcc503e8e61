"""lm-evaluation-harness entry points for optquant checkpoints.

Why this module exists: lm-eval builds its models by name (``--model hf``) and never imports
third-party packages, and 0.4.x has no plugin hook for them either.  A saved optquant checkpoint
has ``quant_method: "optquant"`` in its config.json, which transformers can only resolve after
``import hf_optquant`` has registered the method.  So both entry points below import
hf_optquant first and then hand over to lm-eval unchanged:

* the command line ``python -m hf_optquant.eval.harness <lm_eval arguments>`` takes exactly
  the arguments of the ``lm_eval`` command (``--model hf --model_args pretrained=DIR ...``);
* :func:`simple_evaluate` is lm-eval's ``simple_evaluate`` for a saved directory *or* an
  already-loaded model (wrapped in lm-eval's ``HFLM``, which accepts model objects).

lm-eval is an optional dependency: ``pip install "hf-optquant[eval]"``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import hf_optquant  # noqa: F401  (registers the "optquant" quantization method with transformers)

INSTALL_HINT = 'lm-eval is not installed: pip install "hf-optquant[eval]" (or pip install lm-eval)'


def _import_lm_eval():
    """Import lm_eval lazily so that hf_optquant itself never depends on it."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(INSTALL_HINT) from exc
    return lm_eval, TaskManager


def _check_tasks(tasks: Any) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    if not isinstance(tasks, Sequence) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of lm-eval task names (or a comma-separated string), "
                         f"got {tasks!r}")
    return list(tasks)


def _model_for_lm_eval(model: Any, tokenizer: Any, model_args: dict[str, Any] | None,
                       batch_size: int | str, device: str | None) -> tuple[Any, dict[str, Any] | None]:
    """Return ``(model, model_args)`` as lm-eval's simple_evaluate takes them.

    A path goes through lm-eval's own loading (``--model hf`` semantics: dtype, device and
    batch handling exactly as on the command line); a loaded ``PreTrainedModel`` is wrapped in
    ``HFLM`` directly, so a model quantised in this process is evaluated without saving it.
    """
    import transformers

    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isdir(path):
            raise ValueError(f"model must be a saved model directory or a loaded PreTrainedModel; "
                             f"{path!r} is not a directory")
        args = {"pretrained": path, **(model_args or {})}
        if tokenizer is not None:
            args.setdefault("tokenizer", tokenizer)
        return "hf", args
    if isinstance(model, transformers.PreTrainedModel):
        if model_args:
            raise ValueError("model_args only applies when model is a directory; for a loaded model, pass the "
                             "options to its from_pretrained instead")
        if tokenizer is None:
            raise ValueError("tokenizer is required when model is a loaded PreTrainedModel (lm-eval would "
                             "otherwise fetch one by model.name_or_path)")
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device), None
    raise ValueError(f"model must be a saved model directory (str or os.PathLike) or a transformers "
                     f"PreTrainedModel, got {type(model).__name__}")


def _default_device() -> str:
    """HFLM's own default is "cuda" even on a machine without one; pick what is there."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def simple_evaluate(model: Any, tasks: Sequence[str] | str, *, tokenizer: Any = None,
                    model_args: dict[str, Any] | None = None, include_path: str | os.PathLike | None = None,
                    include_defaults: bool = True, batch_size: int | str = 1, device: str | None = None,
                    **kwargs: Any) -> dict[str, Any] | None:
    """Evaluate an optquant model (saved directory or loaded model) with lm-eval.

    ``tokenizer`` is required for a loaded model (a directory uses its own tokenizer unless
    one is given).  ``include_path`` adds a folder of custom task YAMLs; ``include_defaults=False``
    skips indexing lm-eval's ~14k built-in task files (about 15 s on 2 cores), which is much faster when only custom
    tasks are wanted.  Other keyword arguments go to ``lm_eval.simple_evaluate`` unchanged
    (``limit``, ``num_fewshot``, ``log_samples``, ``bootstrap_iters``, ...).
    """
    lm_eval, task_manager_cls = _import_lm_eval()
    names = _check_tasks(tasks)
    if include_path is not None and not os.path.isdir(include_path):
        raise ValueError(f"include_path must be a directory of lm-eval task YAML files, got {include_path!r}")
    lm, args = _model_for_lm_eval(model, tokenizer, model_args, batch_size, device)
    manager = task_manager_cls(include_path=None if include_path is None else os.fspath(include_path),
                               include_defaults=include_defaults)
    if lm == "hf":
        kwargs.setdefault("batch_size", batch_size)
        kwargs.setdefault("device", device or _default_device())
    return lm_eval.simple_evaluate(model=lm, model_args=args, tasks=names, task_manager=manager, **kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    """Run lm-eval's command line with the optquant method registered (same arguments as ``lm_eval``)."""
    _import_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:  # lm-eval's parser reads sys.argv itself
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
