"""Benchmark of the LUT-linear Triton kernels on an 8B-Llama's layer shapes (GPU only).

For every (shape, batch M, bits, block) case it first checks the kernel on the GPU
against a float64 reference, then times (median, ``triton.testing.do_bench``, which
flushes L2 before every call; weights additionally rotate over several copies when they
are small) and reports

* achieved GB/s of weight bytes read (codes + scales + LUT) and that bandwidth as a
  fraction of the HBM bandwidth measured in the same run (device-to-device copy,
  read + write bytes);
* the speed-up over bf16 ``torch.nn.functional.linear`` and over torch's int4 tinygemm
  (``aten._weight_int4pack_mm``, 4-bit only) timed in the same run.

Usage: ``python benchmarks/kernels.py [--out DIR] [--quick]``; prints a markdown table and
writes ``kernels.json`` (and the correctness log) under ``--out`` (default ``$OUT`` or
``benchmarks/out``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

LL = importlib.import_module("hf_optquant.kernels.lut_linear")
from hf_optquant.kernels.reference import lut_linear_reference  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]  # (N out, K in)
BATCHES = [1, 4, 16, 64, 256]
L2_BYTES = 50 * 2**20


def log(*a):
    print(*a, flush=True)


SMOKE = False  # --smoke: CPU + Triton interpreter, tiny shapes (tests this script only)


def bench(fn, warmup=10, rep=60):
    import triton.testing

    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3  # us


def bench_graph(call, n_rot, reps=15):
    """GPU time per call (us): CUDA graph of max(n_rot, 20) calls rotating over n_rot
    weight copies (no L2 reuse), replayed; launch gaps inside the graph are included."""
    if SMOKE:
        return bench(lambda: call(0))
    calls = max(n_rot, 20)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(n_rot):
            call(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for i in range(calls):
            call(i % n_rot)
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / calls)
    del g
    return sorted(ts)[len(ts) // 2]


def make_weight(n, k, bits, block, device, seed=0, lut=None):
    g = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, device=device, dtype=torch.uint8)
    if lut is None:
        lut = torch.sort(torch.randn(2**bits, generator=g, device=device)).values
    # bf16-representable scales (a quantiser can choose them so): packed losslessly in bf16
    scales = (torch.rand(n, -(-k // block), generator=g, device=device) * 0.02 + 0.005).to(
        torch.bfloat16
    ).float() * torch.where(torch.rand(n, 1, generator=g, device=device) < 0.5, -1.0, 1.0)
    return codes, lut, scales


def rel_err(y, ref):
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def measure_hbm(device):
    n = 2**20 if SMOKE else 2**28  # 1 GiB of fp32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), warmup=20, rep=200)
    return 2 * n * 4 / (t * 1e-6) / 1e9  # GB/s, read + write


# ----------------------------------------------------------------------------- checks


def correctness_small(device, report):
    """Odd shapes, every bits, both paths, split-K, on the GPU (default configs, not tuned:
    few compilations); every call twice: results must be bitwise equal (no races)."""
    os.environ["HF_OPTQUANT_NO_AUTOTUNE"] = "1"
    worst = 0.0
    fails = []
    n_checks = 0
    cases = []
    for bits in (2, 3, 4, 5, 6, 8):
        cases += [(bits, 37, 200, 64, m, torch.bfloat16, None, None) for m in (1, 17)]
    for m in (1, 3, 16, 17, 64):
        for dtype in (torch.bfloat16, torch.float32):
            for split in (None, 3):
                cases.append((4, 300, 1100, 32, m, dtype, None, split))
                if m <= 4:
                    other = "gemm" if m == 1 else "gemv"
                    cases.append((4, 300, 1100, 32, m, dtype, other, split))
    for bits in (3, 4, 8):
        for m in (1, 16):
            cases.append((bits, 129, 4096, 128, m, torch.bfloat16, None, None))
    weights = {}
    try:
        for bits, n, k, block, m, dtype, path, split in cases:
            key = (bits, n, k, block)
            if key not in weights:
                codes, lut, scales = make_weight(n, k, bits, block, device, seed=bits * 7 + n)
                p = LL.pack_lut_weight(codes, lut, scales, bits, block, device=device)
                weights[key] = (codes, lut, scales, p)
            codes, lut, scales, p = weights[key]
            x = torch.randn(m, k, device=device).to(dtype)
            ref = lut_linear_reference(x.double(), codes, lut.double(), scales.double(), block)
            y = LL.lut_linear(x, p, path=path, split_k=split)
            y2 = LL.lut_linear(x, p, path=path, split_k=split)
            e = rel_err(y, ref)
            tol = 1e-2 if dtype == torch.bfloat16 else 2e-5
            same = bool(torch.equal(y, y2))
            worst = max(worst, e / tol)
            n_checks += 1
            if not (e < tol and same):
                fails.append((bits, n, k, block, m, str(dtype), path, split, e, same))
    finally:
        del os.environ["HF_OPTQUANT_NO_AUTOTUNE"]
    report["small_checks"] = n_checks
    report["small_checks_failed"] = fails
    report["small_checks_worst_err_over_tol"] = worst
    log(f"small-shape GPU checks: {n_checks} run, {len(fails)} failures, worst err/tol {worst:.3f}")
    for f in fails[:20]:
        log("  FAIL", f)


def check_tinygemm_layout(device):
    """Validate the tinygemm call on an int4 grid (lut = i - 8) against our kernel."""
    n, k, gs = 256, 1024, 128
    codes, _, scales = make_weight(n, k, 4, gs, device, seed=5)
    lut = torch.arange(16, device=device, dtype=torch.float32) - 8
    x = torch.randn(4, k, device=device, dtype=torch.bfloat16)
    wq, sz = tinygemm_pack(codes, scales, gs)
    y_t = torch.ops.aten._weight_int4pack_mm(x, wq, gs, sz)
    ref = lut_linear_reference(x.double(), codes, lut.double(), scales.double(), gs)
    return rel_err(y_t, ref)


def tinygemm_pack(codes, scales, group):
    """codes uint8 [N, K] in [0, 16) -> (int4pack weight, scales_and_zeros) for tinygemm."""
    q = codes.to(torch.int32)
    w_uint8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    wq = torch.ops.aten._convert_weight_to_int4pack(w_uint8, 8)
    # tinygemm dequantises (q - 8) * scale + zero
    s = scales.t().contiguous().to(torch.bfloat16)  # [K/group, N]
    sz = torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()
    return wq, sz


# ----------------------------------------------------------------------------- timing


def best_config(kernel):
    cfg = getattr(kernel, "best_config", None)
    if cfg is None:
        return None
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def run_case(n, k, bits, block, ms, device, hbm, paths_for_m, results, with_peers):
    codes, lut, scales = make_weight(n, k, bits, block, device, seed=n + k + bits + block)
    p = LL.pack_lut_weight(codes, lut, scales, bits, block, device=device)
    wbytes = p.nbytes
    n_rot = max(1, min(32, math.ceil(4 * L2_BYTES / wbytes)))
    packs = [p] + [
        LL.PackedLutWeight(
            qweight=p.qweight.clone(),
            lut=LL._aligned_lut(p.lut, device),
            scales=p.scales.clone(),
            out_features=p.out_features,
            in_features=p.in_features,
            bits=p.bits,
            block_size=p.block_size,
            scale_block=p.scale_block,
            sub_k=p.sub_k,
        )  # fmt: skip
        for _ in range(n_rot - 1)
    ]
    w_bf16s = None
    tgs = None
    if with_peers:
        w32 = lut[codes.long()] * scales.repeat_interleave(block, dim=1)[:, :k]
        w_bf16 = w32.to(torch.bfloat16)
        del w32
        nb = max(1, min(8, math.ceil(4 * L2_BYTES / (2 * n * k))))
        w_bf16s = [w_bf16] + [w_bf16.clone() for _ in range(nb - 1)]
        if bits == 4:
            try:
                tg = tinygemm_pack(codes, scales, block)
                nt = max(1, min(32, math.ceil(4 * L2_BYTES / tg[0].numel() / tg[0].element_size())))
                tgs = [tg] + [(tg[0].clone(), tg[1].clone()) for _ in range(nt - 1)]
            except Exception as e:  # pragma: no cover - depends on torch build
                log("tinygemm pack failed:", repr(e))
    gemv_k, gemm_k, _ = LL._kernels(SMOKE, not SMOKE)
    for m in ms:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        ref = None
        if m in (ms[0], ms[-1]):
            ref = lut_linear_reference(x.double(), codes, lut.double(), scales.double(), block)
        t_bf16 = None
        if w_bf16s is not None:
            t_bf16 = bench_graph(lambda i, x=x: torch.nn.functional.linear(x, w_bf16s[i]), len(w_bf16s))
        t_tg = None
        if tgs is not None:
            try:
                t_tg = bench_graph(
                    lambda i, x=x: torch.ops.aten._weight_int4pack_mm(x, tgs[i][0], block, tgs[i][1]),
                    len(tgs),
                )
            except Exception as e:  # pragma: no cover
                log("tinygemm failed:", repr(e))
        for path in paths_for_m(m):
            rec = dict(N=n, K=k, M=m, bits=bits, block=block, path=path or "auto")
            try:
                y = LL.lut_linear(x, p, path=path)
                torch.cuda.synchronize()
                if ref is not None:
                    rec["rel_err"] = rel_err(y, ref)
                it = iter(range(10**9))

                def fn(x=x, path=path, it=it):
                    return LL.lut_linear(x, packs[next(it) % n_rot], path=path)

                t_eager = bench(fn)  # do_bench: L2 flushed, host overhead mostly hidden
                t = bench_graph(lambda i, x=x, path=path: LL.lut_linear(x, packs[i], path=path), n_rot)
                used = path or ("gemv" if m <= LL.GEMV_MAX_M else "gemm")
                rec.update(
                    used=used,
                    time_us=t,
                    eager_us=t_eager,
                    weight_bytes=wbytes,
                    gbps=wbytes / (t * 1e-6) / 1e9,
                    frac_hbm=wbytes / (t * 1e-6) / 1e9 / hbm,
                    t_bf16_us=t_bf16,
                    speedup_bf16=(t_bf16 / t) if t_bf16 else None,
                    t_tinygemm_us=t_tg,
                    speedup_tinygemm=(t_tg / t) if t_tg else None,
                    config=best_config(gemv_k if used == "gemv" else gemm_k),
                    n_rot=n_rot,
                )
            except Exception as e:
                rec["error"] = repr(e)
                log("ERROR", rec, traceback.format_exc()[-2000:])
            results.append(rec)
            log(json.dumps(rec))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    ap.add_argument("--quick", action="store_true", help="first shape only")
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter dry run of this script")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    global SMOKE, SHAPES, BATCHES
    if args.smoke:
        SMOKE, SHAPES, BATCHES = True, [(40, 1024)], [1, 4, 17]
        os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
        torch.cuda.synchronize = torch.cuda.empty_cache = lambda *a, **k: None
    else:
        device = torch.device("cuda")
    import triton

    report = dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        device="cpu" if SMOKE else torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        sms=0 if SMOKE else torch.cuda.get_device_properties(0).multi_processor_count,
        gemv_kmajor=LL._gemv_kmajor(),
    )
    t0 = time.time()
    hbm = measure_hbm(device)
    report["hbm_copy_gbps"] = hbm
    log(f"{report['device']} torch {torch.__version__} triton {triton.__version__}: "
        f"copy bandwidth {hbm:.0f} GB/s (read+write)")  # fmt: skip
    try:
        report["tinygemm_check_rel_err"] = check_tinygemm_layout(device)
        log("tinygemm layout check rel err", report["tinygemm_check_rel_err"])
    except Exception as e:
        report["tinygemm_check_rel_err"] = repr(e)
        log("tinygemm check failed", repr(e))
    if not args.skip_small:
        try:
            correctness_small(device, report)
        except Exception as e:  # e.g. a launch error
            log("small checks raised:", repr(e))
            report["small_checks_failed"] = [repr(e)]
        if report["small_checks_failed"] and LL._ASM_LUT_MODE == 2 and not SMOKE:
            log("failures with the shared-memory LUT: retrying with LUT mode 1 (ld.global.nc)")
            report["lut_mode2_failures"] = report["small_checks_failed"]
            LL._ASM_LUT_MODE = 1
            LL._kernels.cache_clear()
            correctness_small(device, report)
    report["lut_mode"] = LL._ASM_LUT_MODE
    log(f"checks done at {time.time() - t0:.0f}s")

    results = []
    shapes = SHAPES[:1] if args.quick else SHAPES
    for n, k in shapes:
        for block in (64, 128):
            run_case(n, k, 4, block, BATCHES, device, hbm,
                     lambda m: [None, "gemm"] if m == 1 else ([None, "gemv"] if m == 4 else [None]),
                     results, with_peers=True)  # fmt: skip
            for bits in (3, 8):
                run_case(n, k, bits, block, [1], device, hbm, lambda m: [None], results,
                         with_peers=True)  # fmt: skip
            torch.cuda.empty_cache()
            log(f"shape {n}x{k} block {block} done at {time.time() - t0:.0f}s")
            with open(os.path.join(args.out, "kernels.json"), "w") as f:
                json.dump(dict(report=report, results=results), f, indent=1)
    report["elapsed_s"] = time.time() - t0
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(dict(report=report, results=results), f, indent=1)
    print_table(report, results)


def save_triton_cache(out):
    """Tar Triton's cache (compiled kernels + autotuning results) under out, if small:
    a later run on a fresh machine can unpack it and skip compilation and tuning."""
    import tarfile

    cache = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
    if SMOKE or not os.path.isdir(cache):
        return
    path = os.path.join(out, "triton_cache.tgz")
    with tarfile.open(path, "w:gz") as tf:
        tf.add(cache, arcname="cache")
    if os.path.getsize(path) > 15 * 2**20:
        os.remove(path)
        log("triton cache too large to return")


def print_table(report, results):
    log()
    log(f"Device: {report['device']}; torch {report['torch']}, triton {report['triton']}; "
        f"measured copy bandwidth {report['hbm_copy_gbps']:.0f} GB/s")  # fmt: skip
    hdr = ("| N x K | M | bits | block | path | us | eager us | weight GB/s | % HBM | bf16 us "
           "| x bf16 | tinygemm us | x tinygemm | rel err |")  # fmt: skip
    log(hdr)
    log("|" + "---|" * (hdr.count("|") - 1))
    for r in results:
        if "error" in r:
            log(f"| {r['N']}x{r['K']} | {r['M']} | {r['bits']} | {r['block']} | {r['path']} | "
                f"ERROR {r['error'][:60]} |")  # fmt: skip
            continue

        def f(v, fmt):
            return "" if v is None else format(v, fmt)

        log(
            f"| {r['N']}x{r['K']} | {r['M']} | {r['bits']} | {r['block']} | {r['used']} | "
            f"{r['time_us']:.1f} | {r['eager_us']:.1f} | {r['gbps']:.0f} | "
            f"{100 * r['frac_hbm']:.0f} | "
            f"{f(r['t_bf16_us'], '.1f')} | {f(r['speedup_bf16'], '.2f')} | "
            f"{f(r['t_tinygemm_us'], '.1f')} | {f(r['speedup_tinygemm'], '.2f')} | "
            f"{f(r.get('rel_err'), '.1e')} |"
        )


if __name__ == "__main__":
    main()
