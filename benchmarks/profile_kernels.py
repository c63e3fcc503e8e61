"""Hardware-counter profile of the batch-1 kernels under Nsight Compute (GPU only).

Builds 4-bit LUT weights (block 128, random codes) and entropy-coded grid weights (3.5 b/p)
for 8B-Llama layer shapes, runs every kernel a few times outside the profiled range (compile,
first-call checks), then runs each once between ``cudaProfilerStart`` / ``cudaProfilerStop``
so that ``ncu --profile-from-start off`` measures exactly those launches::

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
        --section SchedulerStats --section LaunchStats \
        python3 benchmarks/profile_kernels.py --shapes 128256x4096,14336x4096

bf16 ``F.linear`` of the same shape runs in the profiled range too (the cuBLAS GEMV as the
yardstick).  ``--lut-config`` forces a GEMV config (JSON), e.g. ``'{"BN": 128, "AHEAD": 2,
"num_warps": 8}'``.  Without ncu the script just times nothing and exits (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from entropy_kernels import (  # noqa: E402
    encode_grid,
    grid_quantise,
    lut4_packed,
    mma4_packed,
    pack,
    segment_for,
    step_for_entropy,
    student_t,
)

from hf_optquant.kernels import grid_linear as G  # noqa: E402
from hf_optquant.kernels import pair_mma as PM  # noqa: E402
from hf_optquant.kernels import prefix_linear as PL  # noqa: E402
from hf_optquant.kernels.lut_linear import lut_linear  # noqa: E402
from hf_optquant.kernels.lut_mma import mma_linear  # noqa: E402


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="128256x4096,14336x4096,4096x4096")
    ap.add_argument("--grid-shapes", default="14336x4096", help="shapes for the entropy-coded kernel ('' = none)")
    ap.add_argument("--pair-shapes", default="", help="shapes for the pair-code layout ('' = none)")
    ap.add_argument("--pair-configs", default="", help="';'-separated JSON pair_mma launch configs")
    ap.add_argument("--lut-configs", default="", help="';'-separated JSON GEMV configs (default: the built-in)")
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--mma-batches", default="", help="fragment-layout kernel batches, e.g. 1,256")
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    configs = [json.loads(c) for c in args.lut_configs.split(";") if c] or [None]
    calls = []  # (label, fn)
    for n, k in parse_shapes(args.shapes):
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        p = lut4_packed(n, k, dev, gen, block=128)
        for cfg in configs:
            calls.append(
                (f"lut4 {n}x{k} {cfg}", lambda x=x, p=p, cfg=cfg: lut_linear(x, p, path="gemv", config=cfg))
            )
        w = None if args.no_bf16 else torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        if w is not None:
            calls.append((f"bf16 {n}x{k}", lambda x=x, w=w: F.linear(x, w)))
        for m in (int(v) for v in args.mma_batches.split(",") if v):  # GEMV / GEMM by the default dispatch
            pm = mma4_packed(n, k, dev, gen)
            xm = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            calls.append((f"mma {n}x{k} M={m}", lambda x=xm, p=pm: mma_linear(x, p)))
            if w is not None and m > 1:
                calls.append((f"bf16 {n}x{k} M={m}", lambda x=xm, w=w: F.linear(x, w)))
    for n, k in parse_shapes(args.grid_shapes):
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        enc = encode_grid(student_t((n, k), dev, gen), 3.5, segment_for(n, k, "speed"))
        p = pack(enc, dev)
        calls.append((f"grid3.5 {n}x{k}", lambda x=x, p=p: G.grid_linear(x, p, path="gemv")))
    for n, k in parse_shapes(args.pair_shapes):  # pair and prefix layouts of the same 3.5 b/sym indices
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        w = student_t((n, k), dev, gen)
        step = step_for_entropy(w, 3.5)
        idx, scales = grid_quantise(w, step)
        pp = PM.pack_pair_weight(idx, scales, step, torch.bfloat16, dev)
        px = PL.pack_prefix_weight(idx, scales, step, torch.bfloat16, dev)
        for cfg in [json.loads(c) for c in args.pair_configs.split(";") if c] or [None]:
            fn = lambda x=x, p=pp, c=cfg: PM.pair_linear(x, p, path="gemv", config=c)  # noqa: E731
            calls.append((f"pairs3.5 {n}x{k} {cfg}", fn))
        calls.append((f"prefix3.5 {n}x{k}", lambda x=x, p=px: PL.prefix_linear(x, p)))
    for _, fn in calls:
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    order = []
    torch.cuda.cudart().cudaProfilerStart()
    for label, fn in calls:
        fn()
        torch.cuda.synchronize()
        order.append(label)
    torch.cuda.cudart().cudaProfilerStop()
    print("PROFILED IN ORDER:", json.dumps(order))


if __name__ == "__main__":
    main()
