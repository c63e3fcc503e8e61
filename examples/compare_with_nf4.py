"""Compare the paper's format (uniform grid + entropy code, Fisher allocation) with NF4.

    python examples/compare_with_nf4.py [--model smollm2-135m-instruct] [--grid-bits 3.5 4.0 4.25]

NF4 (the 4-bit NormalFloat table of bitsandbytes/QLoRA) with block-64 absmax scales in bf16
stores 4.25 bits/parameter.  On the same evaluation text and reference this script measures
NF4 at 4.25 b/p and the grid at each ``--grid-bits`` budget, then estimates how many bits the
grid needs to match NF4's KL (log-KL interpolated linearly in bits between the two grid points
that bracket it).  Fisher information is estimated once and shared by every configuration.
The equivalent command line: ``hf-optquant compare MODEL --formats grid nf4 --bits ...``.

Caveat: the embedded models' weights were de-quantised from GGUF files, so they already sit on
4-6-bit grids (benchmarks/MODELS.md); Gemma-3-270M (``--model gemma-3-270m``) is the fairer
model for format comparisons.  For bitsandbytes' own NF4 kernels see benchmarks/peers.py.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import torch

from hf_optquant.cli import evaluate_configs, load_model, resolve_model
from hf_optquant.config import OptQuantConfig
from hf_optquant.data.text import load_text
from hf_optquant.eval import reference_outputs, text_to_sequences
from hf_optquant.fisher import estimate_fisher, linear_weights
from hf_optquant.quantize import calibration_sequences


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded name, local directory or Hub id")
    parser.add_argument("--grid-bits", type=float, nargs="+", default=[3.5, 4.0, 4.25])
    parser.add_argument("--allocation", default="fisher", help="allocation for the grid (NF4 has a single width)")
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-layers", type=int, default=None, help="keep the first N decoder layers (smoke runs)")
    return parser.parse_args(argv)


def bits_at_kl(points: Sequence[tuple[float, float]], kl: float) -> float | None:
    """Bits at which the (bits, KL) curve reaches ``kl``: log-linear interpolation, None outside."""
    points = sorted(p for p in points if p[1] > 0)
    for (b0, k0), (b1, k1) in zip(points, points[1:]):
        if min(k0, k1) <= kl <= max(k0, k1) and k0 != k1:
            return b0 + (b1 - b0) * (math.log(kl) - math.log(k0)) / (math.log(k1) - math.log(k0))
    return None


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_model(resolve_model(args.model), max_layers=args.max_layers)
    common = dict(calibration_tokens=args.calibration_tokens, calibration_seq_len=args.seq_len)
    configs = [OptQuantConfig(bits=4.25, format="nf4", allocation="uniform", **common)]
    configs += [OptQuantConfig(bits=b, format="grid", allocation=args.allocation, **common) for b in args.grid_bits]

    reference = reference_outputs(model, text_to_sequences(tokenizer, load_text("evaluation"), args.seq_len,
                                                           args.eval_tokens), k=128)
    fisher = None
    if any(c.needs_fisher for c in configs):
        fisher = estimate_fisher(model, calibration_sequences(tokenizer, configs[-1]),
                                 linear_weights(model, skip=tuple(configs[-1].modules_to_not_convert)))
    results = evaluate_configs(model, configs, reference, fisher=fisher)

    print(f"\n{args.model}: {reference.tokens} evaluation tokens, reference perplexity {math.exp(reference.nll):.3f}")
    print(f"{'format':6s} {'allocation':10s} {'stored b/p':>10s} {'KL':>16s} {'perplexity':>10s}")
    for r in results:
        e = r.evaluation
        if e is None:
            print(f"{r.config.format:6s} {r.config.allocation:10s} not realisable: {r.error}")
            continue
        print(f"{r.config.format:6s} {r.config.allocation:10s} {e.bits_per_param:10.3f} "
              f"{e.kl:8.4f} ± {e.kl_stderr:.4f} {e.perplexity:10.3f}")
    nf4 = results[0].evaluation
    grid = [(r.evaluation.bits_per_param, r.evaluation.kl) for r in results[1:] if r.evaluation is not None]
    needed = bits_at_kl(grid, nf4.kl)
    if needed is None:
        print(f"\nNF4's KL {nf4.kl:.4f} lies outside the grid points measured; add --grid-bits to bracket it")
    else:
        print(f"\nthe grid matches NF4's KL ({nf4.kl:.4f}) at {needed:.3f} b/p: "
              f"{nf4.bits_per_param - needed:+.3f} b/p saved against NF4's {nf4.bits_per_param:.3f}")
    return {"results": results, "grid_bits_at_nf4_kl": needed}


if __name__ == "__main__":
    main()
