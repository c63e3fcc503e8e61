"""The paper's comparison on known distributions: error against bits per element.

For Normal, Laplace and Student-t(nu=5) samples (unit variance) this fits each format
family at a range of bit widths and measures the signal-to-noise ratio of the
quantised tensor, SNR = -10 log10(MSE / variance), against the **real stored** bits
per element (codes, scales, tables and, for the grid, the entropy-coded stream with
its tables and offsets).  The rate-distortion bound (Normal) or Shannon lower bound
(others) is shown for reference: SNR_bound(R) = 6.02 R - 10 log10(2^(2h) / (2 pi e)).

Usage:  python benchmarks/known_distributions.py [--elements N] [--out DIR]
Prints a markdown table; writes known_distributions.json and .png to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from hf_optquant.formats import Scaling
from hf_optquant.formats.fit import fit_format
from hf_optquant.formats.optimal import unit_variance_distribution

DISTRIBUTIONS = {"normal": ("normal", 5.0), "laplace": ("laplace", 5.0), "student_t5": ("student_t", 5.0)}
TENSOR_ABSMAX = Scaling("tensor", 1, "absmax", "fp32")
TENSOR_RMS = Scaling("tensor", 1, "rms", "fp32")
BLOCK64 = Scaling("block", 64, "absmax", "bf16")


def methods(dist_name: str):
    """(label, family, scaling, fit kwargs, bit widths) for every curve."""
    fixed = [2, 3, 4, 5, 6, 7, 8]
    return [
        ("int (tensor absmax)", "int", TENSOR_ABSMAX, {}, fixed),
        ("fp best ExMy (tensor absmax)", "fp", TENSOR_ABSMAX, {}, fixed[1:]),
        ("NF4 (block 64 absmax)", "nf4", BLOCK64, {}, [4.25]),
        ("int (block 64 absmax)", "int", BLOCK64, {}, [b + 0.25 for b in fixed[:5]]),
        ("cube-root (tensor rms)", "cube_root", TENSOR_RMS, {"distribution": dist_name}, fixed),
        ("cube-root (block 64 absmax)", "cube_root", BLOCK64, {"distribution": dist_name},
         [b + 0.25 for b in fixed[:5]]),
        ("Lloyd-Max (tensor rms)", "lloyd_max", TENSOR_RMS, {}, fixed[:6]),
        ("grid + entropy code (tensor rms)", "grid", TENSOR_RMS, {}, [2, 2.5, 3, 3.5, 4, 5, 6, 7, 8]),
    ]


def bound_snr(dist, bits: float) -> float:
    entropy_bits = float(dist.entropy()) / math.log(2)
    distortion = 2 ** (2 * entropy_bits) / (2 * math.pi * math.e) * 2 ** (-2 * bits)
    return -10 * math.log10(distortion)


def run(elements: int, seed: int) -> list[dict]:
    rows = []
    for label, (name, df) in DISTRIBUTIONS.items():
        dist = unit_variance_distribution(name, df)
        torch.manual_seed(seed)
        data = torch.from_numpy(dist.rvs(size=elements, random_state=seed)).float().reshape(-1, 1024)
        for method, family, scaling, kwargs, widths in methods(name):
            for bits in widths:
                start = time.perf_counter()
                fit = fit_format(data, family, bits + 0.01, scaling=scaling, **kwargs)
                mse = fit.error * float(data.double().square().mean())
                rows.append({
                    "distribution": label, "method": method, "target_bits": bits,
                    "bits": fit.bits_per_element, "snr_db": -10 * math.log10(mse),
                    "bound_snr_db": bound_snr(dist, fit.bits_per_element),
                    "format": fit.format.to_dict(), "seconds": time.perf_counter() - start,
                })
                r = rows[-1]
                print(f"{label:10s} {method:34s} {r['bits']:6.3f} b  SNR {r['snr_db']:6.2f} dB  "
                      f"gap {(r['bound_snr_db'] - r['snr_db']) / 6.0206:5.3f} b  ({r['seconds']:.1f}s)",
                      flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| distribution | method | bits/elem (stored) | SNR dB | bound SNR dB | gap to bound (bits) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        gap = (r["bound_snr_db"] - r["snr_db"]) / (20 * math.log10(2))
        lines.append(f"| {r['distribution']} | {r['method']} | {r['bits']:.3f} | {r['snr_db']:.2f} | "
                     f"{r['bound_snr_db']:.2f} | {gap:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(DISTRIBUTIONS)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.8), sharey=True)
    for ax, name in zip(axes, names):
        sel = [r for r in rows if r["distribution"] == name]
        for method in dict.fromkeys(r["method"] for r in sel):
            pts = sorted((r["bits"], r["snr_db"]) for r in sel if r["method"] == method)
            ax.plot(*zip(*pts), marker="o", ms=3, label=method)
        xs = [1.5, 8.5]
        dist = unit_variance_distribution(*DISTRIBUTIONS[name])
        ax.plot(xs, [bound_snr(dist, x) for x in xs], "k--", lw=1, label="rate-distortion bound")
        ax.set_title(name)
        ax.set_xlabel("stored bits per element")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("SNR (dB)")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=1 << 20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 avoids stalls on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run(args.elements, args.seed)
    table = markdown(rows)
    print(f"\n# known distributions: {args.elements} elements, seed {args.seed}, "
          f"{platform.machine()} {platform.python_version()} torch {torch.__version__}\n")
    print(table)
    (args.out / "known_distributions.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "known_distributions.png")
    print(f"\nwrote {args.out / 'known_distributions.json'} and {args.out / 'known_distributions.png'}")


if __name__ == "__main__":
    main()
