"""Publishing quantised models: a model card that states what was stored and measured, and an upload.

``model.push_to_hub(repo)`` (transformers) already uploads an optquant checkpoint that
``from_pretrained(repo)`` reloads, but writes a generic card.  :func:`push_to_hub` uploads the
same files through :class:`huggingface_hub.HfApi` together with a card built from the model
itself: the formats in use, the stored bits per parameter (over the quantised tensors and over
the whole model, everything counted) and, when given, the measured KL divergence and perplexity
against the unquantised model.  ``endpoint`` lets it target any Hub-compatible server (the tests
run one locally).
"""

from __future__ import annotations

import collections
import dataclasses
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, HfApi, ModelCard, ModelCardData
from torch import nn

from .nn.quant_linear import QuantLinear
from .serialization import canonicalise_checkpoint

__all__ = ["StorageSummary", "storage_summary", "model_card", "push_to_hub"]

CARD_TEMPLATE = """---
{card_data}
---

# {title}

Weights of every linear layer listed below are stored by
[hf-optquant](https://github.com/hf-optquant/hf-optquant), which implements the formats of
*Optimal Formats for Weight Quantisation* (Orr, Ribar & Luschi, arXiv 2505.12988).

## Storage

| | value |
|---|---|
| formats | {formats} |
| quantised tensors | {modules} ({quantised_params:,} parameters) |
| bits / parameter, quantised tensors | {bits_per_param:.3f} |
| bits / parameter, whole model | {model_bits_per_param:.3f} |
| checkpoint size of all parameters | {total_mb:.1f} MB |

Bits are all-inclusive: codes (packed or entropy-coded), scales, tables, outliers and stream offsets.

## Quality

{quality}

## Usage

```python
import hf_optquant  # registers the "optquant" quantization method with transformers
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{repo_id}")
```
{extra}"""


@dataclasses.dataclass(frozen=True)
class StorageSummary:
    """What a model stores: measured from its modules, not from the config."""

    formats: dict[str, int]  # element family -> number of quantised tensors
    modules: int
    quantised_params: int
    quantised_bits: int
    other_params: int
    other_bits: int

    @property
    def bits_per_param(self) -> float:
        return self.quantised_bits / max(1, self.quantised_params)

    @property
    def model_bits_per_param(self) -> float:
        return (self.quantised_bits + self.other_bits) / max(1, self.quantised_params + self.other_params)

    @property
    def total_bytes(self) -> int:
        return (self.quantised_bits + self.other_bits) // 8


def storage_summary(model: nn.Module) -> StorageSummary:
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not quant:
        raise ValueError("the model has no QuantLinear modules: quantise it first (OptQuantConfig in from_pretrained)")
    formats = collections.Counter(_family(m) for m in quant)
    # the encoded weights are buffers; every parameter (biases, norms, embeddings) is stored as is
    params = list(model.parameters())
    return StorageSummary(
        formats=dict(sorted(formats.items())),
        modules=len(quant),
        quantised_params=sum(m.out_features * m.in_features for m in quant),
        quantised_bits=sum(m.nbits for m in quant),
        other_params=sum(p.numel() for p in params),
        other_bits=sum(8 * p.numel() * p.element_size() for p in params),
    )


def _family(module: QuantLinear) -> str:
    fmt = module.format
    name = fmt.element.kind
    if fmt.scaling.granularity == "block":
        name += f" block-{fmt.scaling.block_size}"
    else:
        name += f" per-{fmt.scaling.granularity}"
    return name


def _quality_text(evaluation: Any | None) -> str:
    if evaluation is None:
        return ("Not measured for this upload. Measure it with `hf-optquant eval` or "
                "`hf_optquant.eval.evaluate_against_reference` and pass `evaluation=` to `push_to_hub`.")
    k = "all tokens" if evaluation.k is None else f"top-{evaluation.k} + tail"
    return ("| metric | value |\n|---|---|\n"
            f"| KL(reference ‖ quantised), nats/token | {evaluation.kl:.4f} ± {evaluation.kl_stderr:.4f} |\n"
            f"| perplexity (reference) | {evaluation.perplexity:.3f} ({evaluation.reference_perplexity:.3f}) |\n"
            f"| evaluation tokens | {evaluation.tokens:,} ({k}) |")


def model_card(model: nn.Module, repo_id: str, evaluation: Any | None = None, report: Any | None = None) -> ModelCard:
    """The card for ``model`` (quantised): storage measured from its modules, quality from ``evaluation``
    (an :class:`~hf_optquant.eval.EvalResult`), and the quantisation report's summary when given."""
    summary = storage_summary(model)
    base = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         tags=["hf-optquant", "optquant", "quantized"],
                         base_model=base if _looks_like_repo_id(base) else None)
    extra = ""
    if report is not None:
        try:
            from .report import model_card_summary
        except ImportError:
            model_card_summary = None
        if model_card_summary is not None:
            extra = "\n## Quantisation report\n\n" + model_card_summary(report)
    text = CARD_TEMPLATE.format(
        card_data=data.to_yaml(), title=f"{repo_id} (hf-optquant, {summary.bits_per_param:.2f} bits/parameter)",
        formats=", ".join(f"{name} ({n})" for name, n in summary.formats.items()),
        modules=summary.modules, quantised_params=summary.quantised_params,
        bits_per_param=summary.bits_per_param, model_bits_per_param=summary.model_bits_per_param,
        total_mb=summary.total_bytes / 1e6, quality=_quality_text(evaluation), repo_id=repo_id, extra=extra)
    return ModelCard(text)


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists()


def push_to_hub(model: nn.Module, repo_id: str, *, tokenizer: Any | None = None, evaluation: Any | None = None,
                report: Any | None = None, private: bool | None = None, token: str | None = None,
                endpoint: str | None = None, revision: str | None = None,
                extra_files: Mapping[str, str | Path] | None = None,
                commit_message: str = "Upload hf-optquant model") -> CommitInfo:
    """Create ``repo_id`` if needed and upload the quantised checkpoint (``save_pretrained``), the
    tokenizer if given, a model card (:func:`model_card`) and ``extra_files`` (``{path in the repo:
    local file}``, e.g. the quantisation report and its figures) in one commit."""
    card = model_card(model, repo_id, evaluation=evaluation, report=report)  # fails early if not quantised
    extra = {str(k): Path(v) for k, v in (extra_files or {}).items()}
    for name, local in extra.items():
        if not local.is_file():
            raise ValueError(f"push_to_hub extra_files[{name!r}] = {str(local)!r} is not a file")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"push_to_hub extra_files key {name!r} must be a relative path inside the repository")
    api = HfApi(endpoint=endpoint, token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        canonicalise_checkpoint(tmp)  # the same model uploads the same bytes (Hub dedup, reproducible repos)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        card.save(str(Path(tmp) / "README.md"))
        for name, local in extra.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, Path(tmp) / name)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision)
