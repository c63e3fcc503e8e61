"""Benchmark of the lossless coding module (hf_optquant.coding).

Measures, on uniform-grid indices round(x / delta) of Normal, Laplace and Student-t(5) samples
with delta chosen for empirical entropies 2..6 bits:

* stored size (``nbits / num_symbols``, everything included) vs the empirical entropy,
* the same data under an exact 12-bit length-limited canonical Huffman layout (size computed
  from code lengths, see hf_optquant/coding/huffman.py) -- the alternative we rejected,
* an independent coder: constriction's ANS (one stream, 24-bit probabilities, ideal
  per-tensor probabilities, payload only -- no table or chunking), as a check that our
  payload is near the entropy and the gap is the price of chunking/tables,
* ``estimate_bits`` relative error, CPU encode/decode throughput,
* the GPU row layout (``row_length``): rate overhead vs lane length (= decode parallelism),
  with the overhead broken down,
* edge cases (outliers, one or two distinct symbols).

Run: ``/work/venv/bin/python benchmarks/coding.py [--quick]`` (~3 min on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from hf_optquant.coding import decode_symbols, encode_symbols, estimate_bits
from hf_optquant.coding.huffman import huffman_stored_bits
from hf_optquant.coding.layout import DEFAULT_CHUNK_SIZE, gpu_segment
from hf_optquant.coding.table import build_code_table

DISTS = {
    "normal": lambda rng, n: rng.standard_normal(n),
    "laplace": lambda rng, n: rng.laplace(size=n),
    "student-t5": lambda rng, n: rng.standard_t(5, n),
}


def symbol_counts(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dense index per symbol, count per distinct value), independent of the module's code."""
    lo, hi = int(q.min()), int(q.max())
    if hi - lo < 1 << 24:
        counts = np.bincount(q - lo)
        rank = np.cumsum(counts > 0) - 1
        return rank[q - lo], counts[counts > 0]
    _, inverse, counts = np.unique(q, return_inverse=True, return_counts=True)
    return inverse, counts


def entropy_bits(q: np.ndarray) -> float:
    """Empirical entropy in bits/symbol."""
    if q.size == 0:
        return 0.0
    p = symbol_counts(q)[1] / q.size
    return float(-(p * np.log2(p)).sum()) + 0.0


def delta_for_entropy(x: np.ndarray, target: float) -> float:
    """Grid step giving ``target`` bits of empirical entropy (bisection on a subsample)."""
    sample = x[: 1 << 18]
    lo, hi = 1e-4, 1e2
    for _ in range(40):
        mid = float(np.sqrt(lo * hi))
        if entropy_bits(np.round(sample / mid).astype(np.int64)) > target:
            lo = mid
        else:
            hi = mid
    return float(np.sqrt(lo * hi))


def constriction_bits(q: np.ndarray) -> int:
    """Compressed payload bits from constriction's AnsCoder with the empirical model."""
    import constriction

    inverse, counts = symbol_counts(q)
    model = constriction.stream.model.Categorical(counts / q.size, perfect=False)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(inverse.astype(np.int32), model)
    return 32 * coder.get_compressed().size


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def rate_table(sizes: list[tuple[int, int]], entropies: list[float], seed: int) -> dict:
    print("\n## Stored size vs empirical entropy (default chunk_size = "
          f"{DEFAULT_CHUNK_SIZE})\n")
    print("Overheads in bits/symbol over the empirical entropy H. rANS = this module, all "
          "storage included. Huffman-12 = exact size of the equivalent length-limited "
          "canonical Huffman layout. constriction = payload only (no table, no chunks).\n")
    print("| tensor | dist | H | rANS b/sym | rANS over | Huffman-12 over | constriction over "
          "| estimate err | encode Msym/s | decode Msym/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(seed)
    stats: dict[str, list[float]] = {"rans": [], "huffman": [], "enc": [], "dec": [], "est": []}
    for rows, cols in sizes:
        n = rows * cols
        for name, gen in DISTS.items():
            x = gen(rng, n)
            for target in entropies:
                q = np.round(x / delta_for_entropy(x, target)).astype(np.int64)
                h = entropy_bits(q)
                sym = torch.from_numpy(q).reshape(rows, cols)  # flattened: the stored layout
                stream, t_enc = timed(encode_symbols, sym)
                out, t_dec = timed(decode_symbols, stream)
                assert torch.equal(out, sym.reshape(-1)), "round trip failed"
                est = estimate_bits(sym)
                over = stream.nbits / n - h
                huff = huffman_stored_bits(q, DEFAULT_CHUNK_SIZE) / n - h
                for key, val in (("rans", over), ("huffman", huff), ("enc", n / t_enc),
                                 ("dec", n / t_dec), ("est", abs(est / stream.nbits - 1))):
                    stats[key].append(val)
                print(f"| {rows}x{cols} | {name} | {h:.3f} | {stream.nbits / n:.4f} | {over:.4f} "
                      f"| {huff:.4f} "
                      f"| {constriction_bits(q) / n - h:.5f} "
                      f"| {100 * (est - stream.nbits) / stream.nbits:+.3f}% "
                      f"| {n / t_enc / 1e6:.1f} | {n / t_dec / 1e6:.1f} |", flush=True)
    r, hf = stats["rans"], stats["huffman"]
    print(f"\nrANS overhead {min(r):.4f}..{max(r):.4f} b/sym (target <= 0.02); Huffman-12 "
          f"{min(hf):.4f}..{max(hf):.4f}; estimate_bits max |error| "
          f"{100 * max(stats['est']):.3f}%; "
          f"encode {min(stats['enc']) / 1e6:.1f}..{max(stats['enc']) / 1e6:.1f} Msym/s, "
          f"decode {min(stats['dec']) / 1e6:.1f}..{max(stats['dec']) / 1e6:.1f} Msym/s.")
    return stats


def breakdown(q: np.ndarray, stream, row_length: int | None) -> dict[str, float]:
    """Where the overhead of ``stream`` (the coded ``q``) goes, in bits/symbol."""
    n = q.size
    window = None if row_length is None else (-127, 127)
    table = build_code_table(torch.from_numpy(q), window)
    h = entropy_bits(q)
    size = {k: 8 * v.numel() * v.element_size() / n for k, v in stream.tensors.items()}
    coded = (table.payload_bits - table.raw_bits) / n
    parts = {
        "12-bit freqs + escapes": table.payload_bits / n - h,
        "table + header": size["freqs"] + size["header"],
        "tails + group words": size["tails"] + size["tail_ext"] + size["group_words"],
        "lane start-up + flush": size["payload"] + size["states"] - coded,
        "raw-bit padding": size["escapes"] - table.raw_bits / n,
    }
    parts["total"] = stream.nbits / n - h
    return parts


def lane_sweep(seed: int, rows: int, cols: int) -> dict[str, list[float]]:
    print(f"\n## GPU row layout: rate overhead vs lane length ({rows}x{cols}, row_length={cols})\n")
    print("Lanes = independent rANS states a GPU decodes in parallel (32 consecutive rows x one "
          "segment form a warp's group); each lane decodes `chunk_size` symbols sequentially. "
          f"`gpu_segment` picks {gpu_segment(rows, cols)} for this shape. The last row is the stored "
          "(1-D, size-first) layout. Overheads in b/sym.\n")
    print("| dist, H | layout | chunk_size | lanes | total over | start-up + flush | tails + groups "
          "| freqs + escapes | table + header | CPU decode Msym/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(seed)
    n = rows * cols
    totals: dict[str, list[float]] = {}
    for name, target in (("normal", 2.0), ("student-t5", 3.5), ("laplace", 6.0)):
        x = DISTS[name](rng, n)
        q = np.round(x / delta_for_entropy(x, target)).astype(np.int64)
        for chunk, rl in ((256, cols), (512, cols), (1024, cols), (2048, cols), (4096, None)):
            stream = encode_symbols(torch.from_numpy(q), chunk_size=chunk, row_length=rl)
            _, t_dec = timed(decode_symbols, stream)
            b = breakdown(q, stream, rl)
            totals.setdefault(f"{'rows' if rl else 'stored'} {chunk}", []).append(b["total"])
            print(f"| {name}, {entropy_bits(q):.2f} | {'rows' if rl else 'stored'} | {chunk} "
                  f"| {stream.num_lanes} | {b['total']:.4f} | {b['lane start-up + flush']:.4f} "
                  f"| {b['tails + group words']:.4f} | {b['12-bit freqs + escapes']:.4f} "
                  f"| {b['table + header']:.5f} | {n / t_dec / 1e6:.1f} |", flush=True)
    return totals


def edge_cases(seed: int) -> None:
    print("\n## Edge cases (1024x1024 unless noted)\n")
    print("| case | distinct values | stored bits | b/sym | H | table entries |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(seed)
    n = 1 << 20
    base = np.round(rng.standard_normal(n) / delta_for_entropy(rng.standard_normal(n), 4.0))
    base = base.astype(np.int64)
    with_outlier = base.copy()
    with_outlier[rng.integers(n)] = 10**6
    many_outliers = base.copy()
    idx = rng.choice(n, 100, replace=False)
    many_outliers[idx] = rng.integers(-(2**31), 2**31, 100)
    cases = {
        "normal H=4": base,
        "+ one outlier 10**6": with_outlier,
        "+ 100 int32-range outliers": many_outliers,
        "single distinct value": np.full(n, 7, np.int64),
        "two values (p=0.5)": rng.integers(0, 2, n).astype(np.int64),
        "two values (p=0.01)": (rng.random(n) < 0.01).astype(np.int64),
        "int64 extremes + small": np.where(rng.random(n) < 1e-3, np.iinfo(np.int64).max,
                                           rng.integers(-3, 4, n)).astype(np.int64),
        "uniform int32 (64k symbols)": rng.integers(-(2**31), 2**31, 1 << 16).astype(np.int64),
        "empty": np.zeros(0, np.int64),
    }
    for label, q in cases.items():
        stream = encode_symbols(torch.from_numpy(q))
        assert torch.equal(decode_symbols(stream), torch.from_numpy(q))
        h = entropy_bits(q) if q.size else 0.0
        bps = stream.nbits / q.size if q.size else float("nan")
        print(f"| {label} | {np.unique(q).size} | {stream.nbits} | {bps:.4f} | {h:.4f} "
              f"| {stream.header.alphabet_size} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024x1024 only, fewer rows")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    print(f"# hf_optquant.coding benchmark\n\npython {platform.python_version()}, "
          f"torch {torch.__version__}, numpy {np.__version__}, seed {args.seed}, "
          f"threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    sizes = [(1024, 1024)] if args.quick else [(1024, 1024), (4096, 4096)]
    stats = rate_table(sizes, [2.0, 3.0, 4.0, 5.0, 6.0], args.seed)
    lanes = lane_sweep(args.seed + 1, *((1024, 1024) if args.quick else (4096, 4096)))
    edge_cases(args.seed + 2)
    print("\n## Decision\n")
    print(f"* Code: interleaved rANS, 32 lanes per group (a GPU warp). A 12-bit length-limited Huffman "
          f"code of the same alphabet pays {min(stats['huffman']):.3f}-{max(stats['huffman']):.3f} b/sym over "
          f"the entropy on this data (prefix-code redundancy, worst at low entropy); rANS pays "
          f"{min(stats['rans']):.4f}-{max(stats['rans']):.4f} all-in in the stored layout.")
    print(f"* Stored layout: lanes of {DEFAULT_CHUNK_SIZE} (size first). Each lane costs ~20 bits: its "
          f"32-bit state holds ~24 bits of information, the first symbols coded from state 1 waste ~7, "
          f"plus a 4-bit tail count and 1 bit of group word count. A GPU needs ~64k lanes in flight, so "
          f"it transcodes to the row layout with shorter lanes at load time; over H in GPU memory: "
          + ", ".join(f"{k.split()[1]}: {min(v):.3f}-{max(v):.3f}" for k, v in lanes.items() if k.startswith("rows"))
          + " b/sym by lane length (the row layout also keeps direct values within +-127, which costs "
          "escapes at high entropy).")
    print(f"\nTotal benchmark time: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
