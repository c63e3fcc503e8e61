"""Evaluate a quantised checkpoint with lm-evaluation-harness, offline.

    python examples/lm_eval_offline.py --out DIR [--model smollm2-135m-instruct] [--bits 4 --format grid] [--limit 20]

lm-eval builds models by name and never imports third-party packages, so the quantised
checkpoint goes through ``hf_optquant.eval.harness``, which registers the ``optquant``
method first and then runs lm-eval unchanged.  The shell equivalent of what this script runs::

    hf-optquant quantize MODEL --out DIR ...
    python -m hf_optquant.eval.harness --model hf --model_args pretrained=DIR \\
        --tasks optquant_holmes --include_path DIR/lm_eval_task --device cpu --limit 20

The task is a local one (no download): rolling log-likelihood, i.e. word/byte perplexity and
bits per byte, over paragraphs of the bundled evaluation text (*The Adventures of Sherlock
Holmes*).  The unquantised model is scored on the same documents for comparison.  Any lm-eval
task works the same way where its dataset can be downloaded.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

TASK = "optquant_holmes"
METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
SKIP_LM_EVAL = "skipped: lm-eval is not installed (pip install lm-eval); nothing was evaluated"
SKIP_HARNESS = "skipped: hf_optquant.eval.harness is not available in this version of hf-optquant"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded name, local directory or Hub id")
    parser.add_argument("--out", required=True, help="directory for the quantised checkpoint and the task files")
    parser.add_argument("--bits", default="4.0")
    parser.add_argument("--format", default="grid")
    parser.add_argument("--allocation", default="fisher")
    parser.add_argument("--calibration-tokens", default="2048")
    parser.add_argument("--max-layers", default=None, help="keep the first N decoder layers (smoke runs)")
    parser.add_argument("--limit", type=int, default=20, help="documents (paragraphs) to score")
    parser.add_argument("--min-words", type=int, default=40, help="shortest paragraph used as a document")
    return parser.parse_args(argv)


def write_task(directory: Path, min_words: int) -> Path:
    """A local lm-eval task: one JSON line per paragraph of the bundled evaluation text."""
    from hf_optquant.data.text import load_text

    directory.mkdir(parents=True, exist_ok=True)
    paragraphs = [" ".join(p.split()) for p in load_text("evaluation").split("\n\n")]
    data = directory / "holmes.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs if len(p.split()) >= min_words))
    (directory / f"{TASK}.yaml").write_text("\n".join([
        f"task: {TASK}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {json.dumps(str(data))}",
        f"  cache_dir: {json.dumps(str(directory / 'datasets-cache'))}", "test_split: test",
        "output_type: loglikelihood_rolling", 'doc_to_text: ""', 'doc_to_target: "{{text}}"', "metric_list:",
        *[f"  - metric: {m}" for m in METRICS], ""]))
    return directory


def quantize(args: argparse.Namespace) -> None:
    from hf_optquant.cli import main as cli

    argv = ["quantize", args.model, "--out", args.out, "--overwrite", "--bits", args.bits, "--format", args.format,
            "--allocation", args.allocation, "--calibration-tokens", args.calibration_tokens]
    if args.max_layers:
        argv += ["--max-layers", args.max_layers]
    if cli(argv) != 0:
        raise SystemExit("quantisation failed (see the message above)")


def scores(results: dict) -> dict[str, float]:
    row = results["results"][TASK]
    return {m: float(row[f"{m},none"]) for m in METRICS}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("lm_eval") is None:
        print(SKIP_LM_EVAL)
        return 0
    try:
        harness = importlib.import_module("hf_optquant.eval.harness")
    except ImportError:
        print(SKIP_HARNESS)
        return 0
    quantize(args)
    task_dir = write_task(Path(args.out) / "lm_eval_task", args.min_words)
    print("shell equivalent: python -m hf_optquant.eval.harness --model hf --model_args "
          f"pretrained={args.out} --tasks {TASK} --include_path {task_dir} --device cpu --limit {args.limit}")
    common = dict(include_path=str(task_dir), include_defaults=False, limit=args.limit, device="cpu")
    quantised = scores(harness.simple_evaluate(args.out, [TASK], **common))

    from hf_optquant.cli import load_model, resolve_model

    max_layers = int(args.max_layers) if args.max_layers else None
    reference, tokenizer = load_model(resolve_model(args.model), max_layers=max_layers)
    original = scores(harness.simple_evaluate(reference, [TASK], tokenizer=tokenizer, **common))
    print(f"\n{TASK}, first {args.limit} documents")
    print(f"{'metric':16s} {'original':>14s} {'quantised':>14s}")
    for metric in METRICS:
        print(f"{metric:16s} {original[metric]:14.4f} {quantised[metric]:14.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
