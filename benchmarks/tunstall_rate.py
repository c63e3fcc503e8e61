"""Would a variable-to-fixed (Tunstall) code make entropy-coded weights fast to decode on the GPU?  Its rate.

A Tunstall code parses the symbol stream into dictionary strings, each stored as one fixed-length word: a GPU lane
could then find every word at a fixed bit offset (no parse chain, unlike the prefix code of
``hf_optquant/coding/prefix.py`` whose next code starts where the previous one ended).  The price is rate: this
script computes it exactly (expected string length from the leaf probabilities of the Tunstall tree) for grid
indices of a Student-t(5) weight on a uniform grid whose entropy is 3.0 or 3.5 bits, with dictionaries of 2^12 to
2^16 words, optionally a bounded string length, and optionally the rarest symbols sent out of band (the top K
symbols plus an escape symbol whose value costs ``--escape-bits`` raw bits elsewhere, as the prefix layout does).

Run (CPU, seconds): ``python benchmarks/tunstall_rate.py``.
"""

from __future__ import annotations

import argparse
import heapq
import math

import numpy as np
from scipy import stats


def grid_probabilities(entropy: float, df: float = 5.0) -> np.ndarray:
    """Probabilities of the grid cells of a unit Student-t(df) on the uniform grid whose entropy is ``entropy``."""

    def probs(step: float) -> np.ndarray:
        m = int(60 / step) + 1
        p = np.diff(stats.t.cdf((np.arange(-m, m + 2) - 0.5) * step, df))
        p = p[p > 1e-12]
        return p / p.sum()

    lo, hi = 1e-3, 10.0
    for _ in range(80):  # (entropy falls as the step grows: bisect in log step)
        mid = math.sqrt(lo * hi)
        p = probs(mid)
        lo, hi = (mid, hi) if -(p * np.log2(p)).sum() > entropy else (lo, mid)
    return probs(math.sqrt(lo * hi))


def tunstall_expected_length(p: np.ndarray, words: int, max_len: int = 1 << 30) -> float:
    """Expected symbols per word of the Tunstall dictionary of at most ``words`` entries (strings <= max_len)."""
    p = np.sort(p)[::-1]
    leaves = [(-float(pi), 1) for pi in p]
    heapq.heapify(leaves)
    size, capped = len(p), []
    while leaves:
        neg, length = leaves[0]
        if length >= max_len:
            capped.append(heapq.heappop(leaves))
            continue
        if size + len(p) - 1 > words:
            break
        heapq.heappop(leaves)  # expand the most probable leaf into all its one-symbol extensions
        size += len(p) - 1
        for pi in p:
            heapq.heappush(leaves, (neg * float(pi), length + 1))
    return sum(-neg * length for neg, length in leaves + capped)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entropies", nargs="+", type=float, default=[3.0, 3.5])
    ap.add_argument("--word-bits", nargs="+", type=int, default=[12, 14, 16])
    ap.add_argument("--escape-bits", type=int, default=9)
    args = ap.parse_args()
    print("| grid entropy H | alphabet | symbols kept (rest escaped) | P(escape) | word bits | max string | "
          "symbols per word | rate b/sym | over H |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for h in args.entropies:
        p = np.sort(grid_probabilities(h))[::-1]
        h_true = float(-(p * np.log2(p)).sum())
        for keep in (len(p), 15, 31):
            p_esc = float(p[keep:].sum())
            q = np.append(p[:keep], p_esc) if keep < len(p) else p
            for bits in args.word_bits:
                for max_len in ((4, 1 << 30) if keep == len(p) else (1 << 30,)):
                    el = tunstall_expected_length(q, 1 << bits, max_len)
                    rate = bits / el + p_esc * args.escape_bits
                    cap = "-" if max_len > 64 else str(max_len)
                    print(f"| {h_true:.3f} | {len(p)} | {'all' if keep == len(p) else keep} | {p_esc:.4f} | {bits} | "
                          f"{cap} | {el:.3f} | {rate:.3f} | +{rate - h_true:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
