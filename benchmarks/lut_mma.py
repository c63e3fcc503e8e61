"""Benchmark of the tensor-core 4-bit GEMV (``hf_optquant.kernels.lut_mma``) on 8B-Llama layer shapes (GPU).

Per case, in one run: bf16 ``F.linear`` (cuBLAS), torch's int4 tinygemm, the bit-plane LUT kernels
(``lut_linear``, default dispatch) and the fragment-layout kernels (``mma_linear``, default dispatch),
all timed with CUDA-graph replays rotating over enough weight copies to defeat the L2
(``kernels.bench_graph``); achieved GB/s of weight bytes and the fraction of the HBM bandwidth measured
in the same run (device-to-device copy).  First, correctness on the GPU against a float64 reference
(odd shapes, batches 1-64, bf16 and fp16, block 64 / 128 / per row) and a launch-config sweep at batch 1.

Parts (``--parts``): ``check`` (GPU correctness), ``sweep`` (batch-1 launch configs), ``wsweep`` (8- vs 16-warp
programs at batch 1), ``msweep`` (the same at batch 4 and 16), ``asweep`` (the launch configs of ``--configs``, by
default the L2 prefetch of code words x of scales), ``table`` (the RESULTS table), ``eager`` (host time per eager
call), ``pdl`` (programmatic dependent launch on / off), ``gemm`` (the fused large-batch GEMM's configs vs
dequantise + cuBLAS at ``--gemm-batches``); ``--shapes NxK ...`` replaces the four 8B-Llama shapes.

Run (repo root, GPU): ``PYTHONUNBUFFERED=1 python benchmarks/lut_mma.py --out $OUT``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as KB  # noqa: E402  (loads hf_optquant/kernels as the stand-alone package _hfoq_kernels)

LM = importlib.import_module("_hfoq_kernels.lut_mma")
log = KB.log


def mma_copies(case: KB.Case, n_rot: int) -> list:
    p = LM.pack_mma_weight(case.codes, case.lut, case.scales, case.block)
    return [p] + [dataclasses.replace(p, words=p.words.clone(), scales=p.scales.clone()) for _ in range(n_rot - 1)]


def check(device) -> list[dict]:
    """Fused kernel vs float64 on odd shapes, both activation dtypes, three scale granularities."""
    rows = []
    for (n, k), block, m, dt in itertools.product(
        [(40, 128), (333, 1008), (1000, 4096)], (64, 128, 0), (1, 3, 8, 11, 16, 33, 64), (torch.bfloat16, torch.float16)
    ):
        blk = block or k
        codes, lut, scales = KB.make_weight(n, k, 4, blk, device, seed=n + m)
        p = LM.pack_mma_weight(codes, lut, scales, blk)
        x = torch.randn(m, k, device=device, dtype=dt)
        ref = KB.lut_linear_reference(x.double(), codes, lut.double(), scales.double(), blk)
        for split, l2pf in itertools.product((None, 1, 3), (0, 4)):
            y = LM.mma_linear(x, p, path="mma", split_k=split, config=dict(L2PF=l2pf))
            rows.append(dict(n=n, k=k, block=blk, m=m, dtype=str(dt), split=split, l2pf=l2pf,
                             rel_err=KB.rel_err(y, ref)))  # fmt: skip
        if not LM.gemm_unsupported(dt, p):
            yg = LM.mma_linear(x, p, path="gemm", config=dict(BM=64) if m > 16 else dict(BM=16))
            rows.append(dict(n=n, k=k, block=blk, m=m, dtype=str(dt), split="gemm", rel_err=KB.rel_err(yg, ref)))
        yd = LM.mma_linear(x, p, path="dequant")
        rows.append(dict(n=n, k=k, block=blk, m=m, dtype=str(dt), split="dequant", rel_err=KB.rel_err(yd, ref)))
        exact = torch.equal(LM.mma_reference_codes(p), codes)
        rows[-1]["codes_round_trip"] = exact
    bad = [r for r in rows if not r["rel_err"] < 1e-2 or r.get("codes_round_trip") is False]
    log(f"checks: {len(rows)} cases, {len(bad)} failures; worst rel_err {max(r['rel_err'] for r in rows):.2e}")
    for r in bad[:10]:
        log("  FAIL", r)
    return rows


def sweep(device, hbm, shapes, block, m=1, grid=None) -> list[dict]:
    """Batch ``m``: every launch variant of ``grid`` (split-K from the PER_SM heuristic)."""
    out = []
    if grid is None:
        grid = dict(NW=(4, 8), KW=(1, 2, 4, 8), AHEAD=(2,) if m <= 8 else (1,), COPIES=(32,), PER_SM=(1, 2, 4, 8))
    for n, k in shapes:
        case = KB.Case(n, k, 4, block, device, peers=False)
        packs = mma_copies(case, case.n_rot)
        x = case.x(m)
        for vals in itertools.product(*grid.values()):
            cfg = dict(zip(grid, vals, strict=True))
            if cfg["KW"] is not None and cfg["NW"] % cfg["KW"]:
                continue
            try:
                t = KB.bench_graph(lambda i, cfg=cfg, x=x, packs=packs: LM.mma_linear(x, packs[i], config=cfg),
                                   case.n_rot)  # fmt: skip
            except Exception as exc:  # (a config that does not compile or fit: reported, not fatal)
                log(f"sweep {n}x{k} {cfg}: {exc!r:.200}")
                continue
            out.append(dict(n=n, k=k, m=m, config=cfg, time_us=t,
                            pct_hbm=100 * packs[0].nbytes / (t * 1e-6) / 1e9 / hbm))  # fmt: skip
        best = min((r for r in out if (r["n"], r["k"]) == (n, k)), key=lambda r: r["time_us"])
        log(f"sweep M={m} {n}x{k}: best {best['time_us']:.1f} us {best['pct_hbm']:.0f}% HBM {best['config']}")
        case = packs = None
        torch.cuda.empty_cache()
    return out


#: ``asweep``'s default configs: groups prefetched into L2 ahead (``L2PF``) x the tile's scale rows (``SPF``)
AHEAD_CONFIGS = [dict(L2PF=l2pf, SPF=spf) for l2pf, spf in itertools.product((0, 2, 4), (False, True))]


def ahead_sweep(device, hbm, shapes, block, batches=(1, 4, 16), configs=None) -> list[dict]:
    """Each of ``configs`` (default ``AHEAD_CONFIGS``) merged into the default launch config."""
    out = []
    for case, packs, m, x in cases(device, shapes, batches, block, peers=False):
        for cfg in configs or AHEAD_CONFIGS:
            t = KB.bench_graph(lambda i, cfg=cfg, x=x, packs=packs: LM.mma_linear(x, packs[i], config=cfg),
                               case.n_rot)  # fmt: skip
            out.append(dict(n=case.n, k=case.k, m=m, config=cfg, time_us=t,
                            pct_hbm=100 * packs[0].nbytes / (t * 1e-6) / 1e9 / hbm))  # fmt: skip
            log(f"ahead M={m} {case.n}x{case.k} {cfg}: {t:.1f} us")
    return out


def eager_overhead(device) -> dict:
    """Host time per eager call at batch 1 (what generate() without CUDA graphs pays per layer)."""
    case = KB.Case(4096, 4096, 4, 128, device, peers=True)
    packs = mma_copies(case, 1)
    x = case.x(1)
    calls = {
        "bf16": lambda: torch.nn.functional.linear(x, case.w_bf16s[0]),
        "planes": lambda: KB.LL.lut_linear(x, case.packs[0]),
        "mma": lambda: LM.mma_linear(x, packs[0]),
    }
    out = {}
    for name, fn in calls.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(500):
            fn()
        torch.cuda.synchronize()
        out[name + "_us_per_call"] = (time.perf_counter() - t) / 500 * 1e6
    out["fast_launch_checked"] = dict(KB.LL._FAST_CHECKED)
    log("eager:", out)
    return out


def cases(device, shapes, batches, block, peers=True):
    """``(case, fragment-layout copies, m, x)`` per shape and batch; a shape's weights are freed before the next."""
    for n, k in shapes:
        case = KB.Case(n, k, 4, block, device, peers=peers)
        packs = mma_copies(case, case.n_rot)
        for m in batches:
            yield case, packs, m, case.x(m)
        case = packs = None
        torch.cuda.empty_cache()


def table(device, hbm, shapes, batches, block) -> list[dict]:
    out = []
    for case, packs, m, x in cases(device, shapes, batches, block):
        ref = case.ref(x)
        rec = dict(n=case.n, k=case.k, m=m, block=block, mma_bytes=packs[0].nbytes, planes_bytes=case.wbytes)
        rec["bf16_us"] = case.t_bf16(x)
        rec["tinygemm_us"] = case.t_tinygemm(x)
        planes = case.packs
        rec["planes_us"] = KB.bench_graph(lambda i, x=x, ps=planes: KB.LL.lut_linear(x, ps[i]), case.n_rot)
        rec["mma_us"] = KB.bench_graph(lambda i, x=x, ps=packs: LM.mma_linear(x, ps[i]), case.n_rot)
        if m > 16:  # the alternative for larger batches: dequantise + cuBLAS
            rec["mma_dequant_us"] = KB.bench_graph(lambda i, x=x, ps=packs: LM.mma_linear(x, ps[i], path="dequant"),
                                                   case.n_rot)  # fmt: skip
        rec["mma_rel_err"] = KB.rel_err(LM.mma_linear(x, packs[0]), ref)
        rec["mma_path"] = "mma" if m <= LM.MMA_MAX_M else "gemm" if m <= LM.GEMM_MAX_M else "dequant"
        rec["split"] = next((r.split for key, r in packs[0]._launch_cache.items() if key[:2] == ("mma", m)), None)
        t = rec["mma_us"]
        rec["mma_pct_hbm"] = 100 * packs[0].nbytes / (t * 1e-6) / 1e9 / hbm
        rec["x_bf16"] = rec["bf16_us"] / t
        rec["x_planes"] = rec["planes_us"] / t
        rec["x_tinygemm"] = rec["tinygemm_us"] / t if rec["tinygemm_us"] else None
        out.append(rec)
        log(json.dumps({a: (round(b, 3) if isinstance(b, float) else b) for a, b in rec.items()}))
    return out


GEMM_CONFIGS = [dict(BM=bm, STAGES=st, num_warps=nw, SPLIT=sp, BT=bt) for bm, st, nw, sp, bt in
                [(64, 3, 4, None, 8), (64, 3, 4, 1, 8), (128, 3, 4, None, 8), (128, 3, 4, 1, 8), (128, 3, 8, None, 8),
                 (64, 3, 4, None, 16), (128, 3, 8, None, 16), (128, 4, 8, None, 16), (256, 3, 8, None, 8)]]  # fmt: skip


def gemm_table(device, hbm, shapes, batches, block, gemm_configs=None) -> list[dict]:
    """Large batches: the fused GEMM (every config in GEMM_CONFIGS) vs dequantise + cuBLAS, bf16, tinygemm."""
    out = []
    for case, packs, m, x in cases(device, shapes, batches, block):
        ref = case.ref(x)
        rec = dict(n=case.n, k=case.k, m=m, block=block, bf16_us=case.t_bf16(x), tinygemm_us=case.t_tinygemm(x))
        rec["dequant_us"] = KB.bench_graph(lambda i, x=x, ps=packs: LM.mma_linear(x, ps[i], path="dequant"),
                                           case.n_rot)  # fmt: skip
        if m <= 64:
            rec["gemv_us"] = KB.bench_graph(lambda i, x=x, ps=packs: LM.mma_linear(x, ps[i], path="mma"), case.n_rot)
        rec["gemm"] = []
        for cfg in gemm_configs or GEMM_CONFIGS:
            if cfg["BM"] > 2 * max(m, 16) or (cfg["BM"] < 64 and m > 128):
                continue
            try:
                err = KB.rel_err(LM.mma_linear(x, packs[0], path="gemm", config=cfg), ref)

                def call(i, x=x, ps=packs, cfg=cfg):
                    return LM.mma_linear(x, ps[i], path="gemm", config=cfg)

                t = KB.bench_graph(call, case.n_rot)
                rec["gemm"].append(dict(config=cfg, us=t, rel_err=err, x_bf16=rec["bf16_us"] / t))
            except Exception as exc:  # (a config that does not fit: reported, not fatal)
                rec["gemm"].append(dict(config=cfg, error=repr(exc)[:300]))
        ok = [g for g in rec["gemm"] if "us" in g]
        best = min(ok, key=lambda g: g["us"]) if ok else None
        rec["best"] = best
        out.append(rec)
        log(f"gemm {case.n}x{case.k} M={m}: bf16 {rec['bf16_us']:.1f} gemv {rec.get('gemv_us', 0):.1f} tinygemm "
            f"{rec['tinygemm_us'] or 0:.1f} dequant {rec['dequant_us']:.1f} best gemm "
            f"{best['us'] if best else float('nan'):.1f} us ({best['config'] if best else '-'}, x bf16 "
            f"{best['x_bf16'] if best else 0:.2f}, err {best['rel_err'] if best else 0:.1e})")  # fmt: skip
    return out


def pdl_table(device, hbm, shapes, block) -> list[dict]:
    """Programmatic dependent launch on / off, batch 1 and 4: calls back to back (consecutive layers on one
    input, e.g. q / k / v), and with a small elementwise kernel writing x before each call (glue -> layer)."""
    out = []
    for case, packs, m, x in cases(device, shapes, (1, 4), block, peers=False):
        buf = torch.empty_like(x)
        rec = dict(n=case.n, k=case.k, m=m)
        for pdl in (True, False):
            cfg = {"PDL": pdl}

            def plain(i, ps=packs, cfg=cfg, x=x):
                return LM.mma_linear(x, ps[i], config=cfg)

            def glued(i, ps=packs, cfg=cfg, x=x, buf=buf):
                torch.mul(x, 1.0, out=buf)
                return LM.mma_linear(buf, ps[i], config=cfg)

            rec[f"pdl_{pdl}_us"] = KB.bench_graph(plain, case.n_rot)
            rec[f"glue_pdl_{pdl}_us"] = KB.bench_graph(glued, case.n_rot)
        rec["glue_only_us"] = KB.bench_graph(lambda i, x=x, buf=buf: torch.mul(x, 1.0, out=buf), case.n_rot)
        rec["pct_hbm_pdl"] = 100 * packs[0].nbytes / (rec["pdl_True_us"] * 1e-6) / 1e9 / hbm
        out.append(rec)
        log("pdl", json.dumps({a: (round(b, 2) if isinstance(b, float) else b) for a, b in rec.items()}))
    return out


def print_table(rows: list[dict]) -> None:
    print("\n| shape (N x K) | M | path | bf16 us | tinygemm us | planes us | mma us | % HBM | x bf16 | x planes |"
          " x tinygemm | rel err |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tg = f"{r['x_tinygemm']:.2f}" if r["x_tinygemm"] else "-"
        tgu = f"{r['tinygemm_us']:.1f}" if r["tinygemm_us"] else "-"
        print(f"| {r['n']}x{r['k']} | {r['m']} | {r['mma_path']} | {r['bf16_us']:.1f} | {tgu} | {r['planes_us']:.1f} "
              f"| {r['mma_us']:.1f} | {r['mma_pct_hbm']:.0f} | {r['x_bf16']:.2f} | {r['x_planes']:.2f} | {tg} "
              f"| {r['mma_rel_err']:.1e} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    ap.add_argument("--parts", nargs="+", default=["check", "sweep", "table"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 64, 256])
    ap.add_argument("--gemm-batches", nargs="+", type=int, default=[64, 128, 256, 512, 1024])
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--config", default=None, help="JSON dict merged into MMA_DEFAULT before the table")
    ap.add_argument("--gemm-configs", default=None, help="JSON list of config dicts for gemm (default GEMM_CONFIGS)")
    ap.add_argument("--configs", default=None, help="JSON list of config dicts for asweep (default AHEAD_CONFIGS)")
    ap.add_argument("--shapes", nargs="+", default=None, help="NxK layer shapes (default: the 8B-Llama four)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda")
    KB.T0 = time.time()
    KB.L2_BYTES = torch.cuda.get_device_properties(0).L2_cache_size
    res = dict(argv=sys.argv, device=torch.cuda.get_device_name(), torch=torch.__version__)
    hbm = KB.measure_hbm(device)
    res["hbm_GBps"] = hbm
    log(f"HBM copy bandwidth {hbm:.0f} GB/s")
    if args.config:
        LM.MMA_DEFAULT.update(json.loads(args.config))
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else KB.SHAPES
    path = os.path.join(args.out, "lut_mma.json")

    def save():
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1, default=str)

    if "check" in args.parts:
        res["checks"] = check(device)
        save()
    if "sweep" in args.parts:
        res["sweep"] = sweep(device, hbm, shapes, args.block)
        save()
    if "asweep" in args.parts:
        res["asweep"] = ahead_sweep(device, hbm, shapes, args.block, [b for b in args.batches if b <= LM.MMA_MAX_M],
                                    json.loads(args.configs) if args.configs else None)  # fmt: skip
        save()
    if "eager" in args.parts:
        res["eager"] = eager_overhead(device)
        save()
    if "wsweep" in args.parts:  # 16-warp programs (more loads in flight per SM on small layers)
        wide = dict(NW=(8, 16), KW=(None, 4, 8, 16), AHEAD=(2,), COPIES=(32,), PER_SM=(1, 2))
        res["wsweep"] = sweep(device, hbm, shapes, args.block, grid=wide)
        save()
    if "msweep" in args.parts:  # the same at decode batches 4 and 16
        res["msweep"] = sweep(device, hbm, shapes, args.block, m=4) + sweep(device, hbm, shapes, args.block, m=16)
        save()
    if "pdl" in args.parts:
        res["pdl"] = pdl_table(device, hbm, shapes, args.block)
        save()
    if "gemm" in args.parts:
        res["gemm"] = gemm_table(device, hbm, shapes, args.gemm_batches, args.block,
                                 json.loads(args.gemm_configs) if args.gemm_configs else None)  # fmt: skip
        save()
    if "table" in args.parts:
        res["table"] = table(device, hbm, shapes, args.batches, args.block)
        save()
        print_table(res["table"])
    log(f"done in {time.time() - KB.T0:.0f} s; MMA_DEFAULT {LM.MMA_DEFAULT}")


if __name__ == "__main__":
    main()
