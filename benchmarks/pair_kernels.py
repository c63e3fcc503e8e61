"""Pair-code GPU layout (hf_optquant.coding.pairs, kernels.pair_mma) per layer: bits on the GPU, GPU checks, times.

For 8B-Llama layer shapes, Student-t(5) weights grid-quantised (channel rms scales) at an index entropy of ``--bits``:
the pair layout's GPU bits/parameter against the entropy, correctness on the GPU (indices decoded by the torch
bit-position decoder == the original, fused GEMV within 1e-2 of float64), and CUDA-graph times of the fused
decode-GEMV against bf16 ``F.linear``, the prefix-code layout (kernels.prefix_linear) and the fixed-length 4-bit
tensor-core kernel (kernels.lut_mma) measured in the same process.

    python benchmarks/pair_kernels.py --out DIR [--bits 3.5 3.0] [--batches 1 4 16] [--configs '[{"NW": 8}]']
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import entropy_kernels as EK  # noqa: E402

from hf_optquant.kernels import pair_mma as PM  # noqa: E402
from hf_optquant.kernels import prefix_linear as PL  # noqa: E402
from hf_optquant.kernels.common import grid_dequantise  # noqa: E402
from hf_optquant.kernels.lut_mma import mma_linear  # noqa: E402


def layer(n: int, k: int, bits: float, device, gen, batches: tuple, configs: list, prefix: bool,
          chunks: tuple = (), dense: bool = False) -> dict:  # fmt: skip
    row = dict(shape=[n, k], bits_target=bits)
    w = EK.student_t((n, k), device, gen)
    step = EK.step_for_entropy(w, bits)
    idx, scales = EK.grid_quantise(w, step)
    del w
    row["entropy"] = EK.entropy(idx)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    p = PM.pack_pair_weight(idx, scales, step, torch.bfloat16, device)
    sync()
    row["encode_s"] = time.perf_counter() - t
    row["gpu_bpp"] = 8 * p.nbytes / (n * k)
    row["escapes_per_weight"] = p.num_escapes * 2 / (n * k)
    row["table_pairs"] = int(p.code_pairs.shape[0])
    row["chunk"] = p.chunk
    row["index_exact"] = bool(torch.equal(PM.pair_reference_index(p), idx.long()))
    w_ref = (idx.double() * float(p.step)) * scales.double()[:, None]
    for m in (1, 5, 16):
        x = torch.randn((m, k), device=device, generator=gen).to(torch.bfloat16)
        ref = x.double() @ w_ref.T
        row[f"rel_err_m{m}"] = EK.rel(PM.pair_linear(x, p, path="gemv"), ref)
        for ci, cfg in enumerate(configs):  # every launch config checked on the GPU before it is timed
            try:
                row[f"pair_cfg{ci}_rel_err_m{m}"] = EK.rel(PM.pair_linear(x, p, path="gemv", config=cfg), ref)
            except Exception as exc:  # noqa: BLE001  (a config the kernel refuses: recorded, the run goes on)
                row[f"pair_cfg{ci}_error"] = repr(exc)[:300]
    w_ref32 = grid_dequantise(idx, float(p.step), scales) if dense else None  # the format's dequantisation
    del w_ref
    EK.log(n, k, f"H {row['entropy']:.3f} gpu {row['gpu_bpp']:.3f} b/p exact {row['index_exact']}",
           f"err {row['rel_err_m1']:.2e}/{row['rel_err_m5']:.2e}/{row['rel_err_m16']:.2e}",
           f"encode {row['encode_s']:.2f}s")  # fmt: skip
    copies = EK.copies_for(p.nbytes)
    ps = [p] + [EK.clone_packed(p) for _ in range(copies - 1)]
    wb = [torch.empty((n, k), dtype=torch.bfloat16, device=device).normal_(generator=gen) for _ in range(
        EK.copies_for(2 * n * k))]  # fmt: skip
    mm = [EK.mma4_packed(n, k, device, gen) for _ in range(EK.copies_for(n * k // 2))]
    for m in batches:
        x = torch.randn((m, k), device=device, generator=gen).to(torch.bfloat16)
        row[f"bf16_us_m{m}"] = EK.graph_time_us([lambda w_=w_, x=x: F.linear(x, w_) for w_ in wb])
        row[f"pair_us_m{m}"] = EK.graph_time_us([lambda q=q, x=x: PM.pair_linear(x, q) for q in ps])
        row[f"lut4mma_us_m{m}"] = EK.graph_time_us([lambda q=q, x=x: mma_linear(x, q) for q in mm])
        for ci, cfg in enumerate(configs):
            try:
                calls = [lambda q=q, x=x, c=cfg: PM.pair_linear(x, q, config=c) for q in ps]
                row[f"pair_cfg{ci}_us_m{m}"] = EK.graph_time_us(calls)
            except Exception as exc:  # noqa: BLE001  (a config the kernel refuses: recorded, the run goes on)
                row[f"pair_cfg{ci}_error"] = repr(exc)[:300]
        EK.log(n, k, f"m={m}", {kk: round(v, 2) for kk, v in row.items() if kk.endswith(f"_m{m}")})
    del ps, mm
    for ch in chunks:  # other chunk lengths (more warps, more bits): batch 1 only
        pc = PM.pack_pair_weight(idx, scales, step, torch.bfloat16, device, chunk=ch)
        row[f"chunk{ch}_gpu_bpp"] = 8 * pc.nbytes / (n * k)
        pcs = [pc] + [EK.clone_packed(pc) for _ in range(EK.copies_for(pc.nbytes) - 1)]
        x = torch.randn((1, k), device=device, generator=gen).to(torch.bfloat16)
        row[f"chunk{ch}_us_m1"] = EK.graph_time_us([lambda q=q, x=x: PM.pair_linear(x, q) for q in pcs])
        for ci, cfg in enumerate(configs):
            calls = [lambda q=q, x=x, c=cfg: PM.pair_linear(x, q, config=c) for q in pcs]
            row[f"chunk{ch}_cfg{ci}_us_m1"] = EK.graph_time_us(calls)
        EK.log(n, k, f"chunk {ch}", {kk: round(v, 3) for kk, v in row.items() if kk.startswith(f"chunk{ch}_")})
        del pcs
    if prefix:
        pp = PL.pack_prefix_weight(idx, scales, step, torch.bfloat16, device)
        row["prefix_gpu_bpp"] = 8 * pp.nbytes / (n * k)
        pps = [pp] + [EK.clone_packed(pp) for _ in range(EK.copies_for(pp.nbytes) - 1)]
        x = torch.randn((1, k), device=device, generator=gen).to(torch.bfloat16)
        row["prefix_us_m1"] = EK.graph_time_us([lambda q=q, x=x: PL.prefix_linear(x, q) for q in pps])
        EK.log(n, k, "prefix", row["prefix_gpu_bpp"], row["prefix_us_m1"])
        if dense:  # decode to a dense bf16 weight (the path above GEMV_MAX_M rows): pair vs prefix kernel
            ps = [p] + [EK.clone_packed(p) for _ in range(EK.copies_for(p.nbytes) - 1)]
            row["pair_dense_exact"] = bool(torch.equal(PM.decode_pair_weight(p, torch.float32), w_ref32))
            row["pair_decode_us"] = EK.graph_time_us([lambda q=q: PM.decode_pair_weight(q) for q in ps])
            row["prefix_decode_us"] = EK.graph_time_us([lambda q=q: PL.decode_prefix_weight(q) for q in pps])
            EK.log(n, k, "dense decode us pair / prefix", row["pair_decode_us"], row["prefix_decode_us"],
                   "exact", row["pair_dense_exact"])  # fmt: skip
            del ps
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--bits", type=float, nargs="+", default=[3.5])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--configs", default="[]", help="JSON list of extra pair_mma launch configs to time")
    ap.add_argument("--shapes", default="all", help="'all' or a JSON list of [N, K]")
    ap.add_argument("--no-prefix", action="store_true")
    ap.add_argument("--dense", action="store_true", help="also time the dense decode kernels (pair vs prefix)")
    ap.add_argument("--chunks", type=int, nargs="*", default=[], help="extra chunk lengths (groups) to time at batch 1")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test under TRITON_INTERPRET=1 (times meaningless)")
    ap.add_argument("--budget", type=float, default=500.0, help="seconds; later shapes are skipped past it")
    args = ap.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator(device).manual_seed(0)
    shapes = EK.SHAPES if args.shapes == "all" else [tuple(s) for s in json.loads(args.shapes)]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    res = dict(device=name, torch=torch.__version__, copy_gbps=EK.copy_bandwidth(device), rows=[])
    os.makedirs(args.out, exist_ok=True)
    for bits in args.bits:
        for n, k in shapes:
            if time.time() - EK.T0 > args.budget:
                EK.log("budget spent, skipping", n, k, bits)
                continue
            opts = (tuple(args.batches), json.loads(args.configs), not args.no_prefix, tuple(args.chunks), args.dense)
            res["rows"].append(layer(n, k, bits, device, gen, *opts))
            with open(os.path.join(args.out, "pair_kernels.json"), "w") as f:
                json.dump(res, f, indent=1)
    for r in res["rows"]:
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))


if __name__ == "__main__":
    main()
