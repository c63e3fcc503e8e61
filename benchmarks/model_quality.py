"""KL divergence and perplexity of quantised real models against all-inclusive bits/parameter.

For each format family, bit budget and allocation mode the model's linear weights are
quantised (``quantize_model``; embeddings and lm_head stay unquantised), then evaluated
against the unquantised model on the held-out evaluation text: mean per-token
KL(p_ref || p_quant) over the reference's top-k tokens plus a tail bin (k = 128), and
perplexity.  Bits per parameter are the **stored** bits of the quantised tensors (codes,
scales, tables, outliers, stream offsets) over their parameter count.  Fisher is
estimated once per model (sampled mode) on the calibration text and shared by all configs.

Usage:
  python benchmarks/model_quality.py --model gemma-3-270m --bits 2.5 3 3.5 4 \\
      --formats int cube_root grid --allocations uniform fisher --out benchmarks/out
Prints one line per config and a markdown table; writes JSON and a KL-vs-bits PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from hf_optquant.config import OptQuantConfig
from hf_optquant.eval import evaluate_against_reference, reference_outputs, text_to_sequences
from hf_optquant.fisher import estimate_fisher, linear_weights
from hf_optquant.model_utils import conv1d_to_linear
from hf_optquant.quantize import calibration_sequences, quantize_model

# label -> OptQuantConfig overrides
FORMATS = {
    "int": {"format": "int"},  # block 64 absmax, bf16 scales, searched clipping
    "nf4": {"format": "nf4"},  # block 64 absmax, bf16 scales (bitsandbytes' NF4 layout)
    "cube_root": {"format": "cube_root", "statistic": "signmax"},
    "int+sparse": {"format": "int", "sparse_fraction": 0.002, "granularity": "channel", "statistic": "absmax"},
    "lloyd_max": {"format": "lloyd_max"},
    "grid": {"format": "grid"},  # channel rms, entropy coded
}


def load(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_optquant.data.models import materialize

    source = materialize(name)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    conv1d_to_linear(model)
    return model, tokenizer


def grid_flattery(model) -> float:
    """Relative error of 4-bit asymmetric round-to-nearest in blocks of 32 (min-max): ~0 when
    the checkpoint already sits on that grid (e.g. a Q4_1 GGUF), which flatters 4-bit formats."""
    num = den = 0.0
    for w in linear_weights(model, skip=("lm_head",)).values():
        x = w.detach().float().reshape(-1, 32) if w.numel() % 32 == 0 else None
        if x is None:
            continue
        lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
        step = ((hi - lo) / 15).clamp_min(1e-12)
        q = torch.round((x - lo) / step) * step + lo
        num += float((q - x).double().square().sum())
        den += float(x.double().square().sum())
    return num / den


def bits_saved_at_equal_kl(rows, fmt: str) -> list[dict]:
    """For each uniform point, the bits the Fisher curve needs for the same KL (log-linear interp.)."""
    def curve(alloc):
        return sorted((r["bits"], math.log(r["kl"])) for r in rows
                      if r["format"] == fmt and r["allocation"] == alloc and r["kl"] > 0)

    out = []
    uniform, fisher = curve("uniform"), curve("fisher")
    for bits, log_kl in uniform:
        for (b0, k0), (b1, k1) in zip(fisher, fisher[1:]):
            if min(k0, k1) <= log_kl <= max(k0, k1) and k0 != k1:
                needed = b0 + (log_kl - k0) * (b1 - b0) / (k1 - k0)
                out.append({"format": fmt, "uniform_bits": bits, "kl": math.exp(log_kl),
                            "fisher_bits": needed, "saved": bits - needed})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--bits", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0])
    parser.add_argument("--formats", nargs="+", default=["int", "cube_root", "grid"], choices=sorted(FORMATS))
    parser.add_argument("--allocations", nargs="+", default=["uniform", "fisher"])
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 avoids stalls on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    from hf_optquant.data.text import load_text

    model, tokenizer = load(args.model)
    original = {n: p.detach().clone() for n, p in linear_weights(model).items()}
    eval_ids = text_to_sequences(tokenizer, load_text("evaluation"), args.seq_len, args.eval_tokens)
    start = time.perf_counter()
    reference = reference_outputs(model, eval_ids, k=args.top_k)
    print(f"reference: {reference.tokens} tokens, ppl {math.exp(reference.nll):.3f} "
          f"({time.perf_counter() - start:.0f}s); 4-bit/32 RTN relative MSE {grid_flattery(model):.4%}")
    base = OptQuantConfig(calibration_tokens=args.calibration_tokens, calibration_seq_len=args.seq_len)
    calib = calibration_sequences(tokenizer, base)
    start = time.perf_counter()
    fisher = estimate_fisher(model, calib, linear_weights(model, skip=tuple(base.modules_to_not_convert)))
    print(f"Fisher: {fisher.tokens} tokens in {time.perf_counter() - start:.0f}s")

    rows = []
    for fmt in args.formats:
        for allocation in args.allocations:
            for bits in args.bits:
                with torch.no_grad():
                    for n, p in linear_weights(model).items():
                        p.copy_(original[n])
                config = OptQuantConfig(bits=bits, allocation=allocation, calibration_seq_len=args.seq_len,
                                        **FORMATS[fmt])
                start = time.perf_counter()
                try:
                    _, report = quantize_model(model, config, fisher=fisher, progress=False)
                except ValueError as err:
                    print(f"skip {fmt} {allocation} {bits}: {err}")
                    continue
                seconds = time.perf_counter() - start
                result = evaluate_against_reference(model, reference, progress=False)
                rows.append({"model": args.model, "format": fmt, "allocation": allocation, "target_bits": bits,
                             "bits": report.bits_per_param, "model_bits": report.model_bits_per_param,
                             "kl": result.kl, "kl_stderr": result.kl_stderr, "ppl": result.perplexity,
                             "ref_ppl": result.reference_perplexity, "quantise_seconds": seconds,
                             "tensor_bits": {t.name: t.bits_per_element for t in report.tensors}})
                r = rows[-1]
                print(f"{fmt:10s} {allocation:8s} target {bits:4.2f}  stored {r['bits']:.3f} b/p  "
                      f"KL {r['kl']:.4f}±{r['kl_stderr']:.4f}  ppl {r['ppl']:.3f} (ref {r['ref_ppl']:.3f})  "
                      f"[{seconds:.0f}s]", flush=True)
    with torch.no_grad():
        for n, p in linear_weights(model).items():
            p.copy_(original[n])

    saved = [s for fmt in args.formats for s in bits_saved_at_equal_kl(rows, fmt)]
    print(f"\n# model quality: {args.model}, eval {reference.tokens} tokens (k={args.top_k}), "
          f"{platform.machine()} torch {torch.__version__}\n")
    print("| format | allocation | target b/p | stored b/p (quantised) | b/p (whole model) | KL (nats/token) "
          "| ppl | Δppl |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['format']} | {r['allocation']} | {r['target_bits']:.2f} | {r['bits']:.3f} | "
              f"{r['model_bits']:.3f} | {r['kl']:.4f} ± {r['kl_stderr']:.4f} | {r['ppl']:.3f} | "
              f"{r['ppl'] - r['ref_ppl']:+.3f} |")
    if saved:
        print("\n| format | uniform b/p | KL | Fisher-allocated b/p at equal KL | saved b/p |\n"
              "|---|---:|---:|---:|---:|")
        for s in saved:
            print(f"| {s['format']} | {s['uniform_bits']:.3f} | {s['kl']:.4f} | {s['fisher_bits']:.3f} | "
                  f"{s['saved']:+.3f} |")
    out = {"rows": rows, "saved": saved}
    (args.out / f"model_quality_{args.model}.json").write_text(json.dumps(out, indent=1))
    plot(rows, args.out / f"model_quality_{args.model}.png", args.model)


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for key in dict.fromkeys((r["format"], r["allocation"]) for r in rows):
        pts = sorted((r["bits"], r["kl"]) for r in rows if (r["format"], r["allocation"]) == key)
        ax.plot(*zip(*pts), marker="o", ls="-" if key[1] == "uniform" else "--", label=f"{key[0]} ({key[1]})")
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per parameter (quantised tensors)")
    ax.set_ylabel("KL(ref || quantised), nats/token")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
