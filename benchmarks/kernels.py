"""Benchmark of the LUT-linear Triton kernels on an 8B-Llama's layer shapes (GPU only).

Every case is first checked on the GPU against a float64 reference; times are GPU time
per call from CUDA-graph replays that rotate over enough weight copies to defeat the
50 MB L2 (``bench_graph``).  Reported per case:

* GB/s of weight bytes read (codes + scales + LUT) and that bandwidth as a fraction of
  the HBM bandwidth measured in the same run (device-to-device copy, read + write);
* the speed-up over bf16 ``torch.nn.functional.linear`` and over torch's int4 tinygemm
  (``aten._weight_int4pack_mm``, 4-bit only) timed the same way in the same run.

Modes: ``--mode full`` (default: the RESULTS table, ``auto`` dispatch plus forced
alternatives), ``--mode explore`` (kernel-variant sweep to choose the defaults; see
benchmarks/kernels_notes.md), ``--mode sass`` (no GPU: compile for sm_90 and count SASS
instructions per code in each kernel's main loop), ``--smoke`` (CPU interpreter dry run).
Prints markdown tables and writes JSON under ``--out`` (default ``$OUT`` or
``benchmarks/out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
if "--smoke" in sys.argv:  # Triton reads this when it is first imported
    os.environ["TRITON_INTERPRET"] = "1"



def _load_kernels():
    """hf_optquant/kernels/{reference,lut_linear}.py as a stand-alone package: importing
    ``hf_optquant`` itself would pull in transformers (slow, and not needed here)."""
    import importlib.util
    import types

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "hf_optquant", "kernels")
    pkg = types.ModuleType("_hfoq_kernels")
    pkg.__path__ = [root]
    sys.modules["_hfoq_kernels"] = pkg
    mods = []
    for name in ("reference", "lut_linear"):
        spec = importlib.util.spec_from_file_location(f"_hfoq_kernels.{name}", os.path.join(root, f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods.append(mod)
    return mods


_REF, LL = _load_kernels()
lut_linear_reference = _REF.lut_linear_reference

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]  # (N out, K in)
BATCHES = [1, 4, 16, 64, 256]
L2_BYTES = 50 * 2**20
SMOKE = False  # --smoke: CPU + Triton interpreter, tiny shapes (tests this script only)
BLOCKS = (64, 128)  # scale block sizes timed by --mode full
T0 = time.time()
BUDGET = 1e9  # seconds; sections are skipped once exceeded
SECTIONS = ("m1", "bits", "smallm", "largem", "eager")  # --sections: parts of --mode explore to run
VARIANTS: tuple = ()  # --variants: GEMV variants of the M = 1 sweep (default: all)


def log(*a):
    print(*a, flush=True)


def elapsed() -> float:
    return time.time() - T0


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


def make_weight(n, k, bits, block, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, device=device, dtype=torch.uint8)
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


def copies_of(p, n_rot, device):
    return [p] + [
        LL.PackedLutWeight(
            qweight=p.qweight.clone(), lut=LL._aligned_lut(p.lut, device), scales=p.scales.clone(),
            out_features=p.out_features, in_features=p.in_features, bits=p.bits,
            block_size=p.block_size, scale_block=p.scale_block, sub_k=p.sub_k,
        )  # fmt: skip
        for _ in range(n_rot - 1)
    ]


def tinygemm_pack(codes, scales, group):
    """codes uint8 [N, K] in [0, 16) -> (int4pack weight, scales_and_zeros) for tinygemm."""
    q = codes.to(torch.int32)
    w_uint8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    wq = torch.ops.aten._convert_weight_to_int4pack(w_uint8, 8)
    # tinygemm dequantises (q - 8) * scale + zero
    s = scales.t().contiguous().to(torch.bfloat16)  # [K/group, N]
    sz = torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()
    return wq, sz


def check_tinygemm_layout(device):
    """Validate the tinygemm call on an int4 grid (lut = i - 8) against the reference."""
    n, k, gs = 256, 1024, 128
    codes, _, scales = make_weight(n, k, 4, gs, device, seed=5)
    lut = torch.arange(16, device=device, dtype=torch.float32) - 8
    x = torch.randn(4, k, device=device, dtype=torch.bfloat16)
    wq, sz = tinygemm_pack(codes, scales, gs)
    y_t = torch.ops.aten._weight_int4pack_mm(x, wq, gs, sz)
    ref = lut_linear_reference(x.double(), codes, lut.double(), scales.double(), gs)
    return rel_err(y_t, ref)


# ----------------------------------------------------------------------------- checks


SINGLE = {"PAIR": False, "COPIES": 1, "SH0": 2, "BIG": False}  # one 16-entry table, no pair lookups


def correctness_small(device, report, full=True):
    """Odd shapes, every bits, every path, split-K, on the GPU (default configs, not
    tuned: few compilations); every call twice (the second through the cached direct
    launch): results must be bitwise equal (no races, launch cache correct)."""
    tuned_before = os.environ.pop("HF_OPTQUANT_AUTOTUNE", None)
    LL._kernels.cache_clear()
    worst, fails, n_checks, cases = 0.0, [], 0, []
    for bits in (2, 3, 4, 5, 6, 8):
        cases += [(bits, 37, 200, 64, m, torch.bfloat16, None, None, None) for m in ((1, 3, 17) if full else (1, 17))]
    ms = (1, 2, 3, 4, 16, 17, 64) if full else (1, 2, 4, 17)
    for m in ms:
        for dtype in (torch.bfloat16, torch.float32) if full else (torch.bfloat16,):
            for split in (None, 3):
                cases.append((4, 300, 1100, 32, m, dtype, None, split, None))
                if m <= 4:
                    cases.append((4, 300, 1100, 32, m, dtype, "gemm", split, None))
                elif m <= 17:
                    cases.append((4, 300, 1100, 32, m, dtype, "gemv", split, None))
        cases.append((4, 300, 1100, 32, m, torch.bfloat16, "dequant", None, None))
        cases.append((3, 300, 1100, 96, m, torch.float16, None, None, None))
    cases += [
        (4, 300, 1100, 32, 1, torch.bfloat16, "gemv", None, {"BN": 32, "AHEAD": 2, "num_warps": 4}),
        (4, 300, 1100, 32, 1, torch.bfloat16, "gemv", None, {"BN": 128, "AHEAD": 1, "num_warps": 8}),
        (4, 300, 1100, 32, 1, torch.bfloat16, "gemv", None, {"BN": 64, "AHEAD": 1, "num_warps": 4, **SINGLE}),
        (8, 300, 1100, 32, 1, torch.bfloat16, "gemv", None, {"BN": 64, "AHEAD": 1, "num_warps": 4,
                                                            "COPIES": 1, "SH0": 2, "BIG": False}),
        (4, 300, 1100, 32, 17, torch.bfloat16, "gemm", None, {"BM": 16, "BN": 64, "J": 4, "num_warps": 4,
                                                             "SUBDOT": False}),
        (4, 300, 1100, 32, 17, torch.bfloat16, "gemm", None, {"BM": 16, "BN": 64, "J": 8, "num_warps": 4}),
        (4, 300, 1100, 128, 300, torch.bfloat16, "gemm", None, {"BM": 256, "BN": 128, "J": 4, "num_warps": 8,
                                                               "num_stages": 2}),
        (4, 300, 1100, 128, 300, torch.bfloat16, "gemm", None, {"BM": 128, "BN": 128, "J": 4, "num_warps": 4,
                                                               "num_stages": 2}),
    ]  # fmt: skip
    for bits in (3, 4, 8):
        for m in (1, 16):
            cases.append((bits, 129, 4096, 128, m, torch.bfloat16, None, None, None))
    if not SMOKE:  # inline PTX: GPU only
        cases.append((4, 300, 1100, 32, 1, torch.bfloat16, "gemv", None, {
            "BN": 64, "AHEAD": 1, "num_warps": 4, "LMODE": 1, **SINGLE}))
    weights = {}
    try:
        for bits, n, k, block, m, dtype, path, split, cfg in cases:
            key = (bits, n, k, block)
            if key not in weights:
                codes, lut, scales = make_weight(n, k, bits, block, device, seed=bits * 7 + n)
                p = LL.pack_lut_weight(codes, lut, scales, bits, block, device=device)
                weights[key] = (codes, lut, scales, p)
            codes, lut, scales, p = weights[key]
            x = torch.randn(m, k, device=device).to(dtype)
            ref = lut_linear_reference(x.double(), codes, lut.double(), scales.double(), block)
            try:
                y = LL.lut_linear(x, p, path=path, split_k=split, config=cfg)
                y2 = LL.lut_linear(x, p, path=path, split_k=split, config=cfg)
                e = rel_err(y, ref)
                same = bool(torch.equal(y, y2))
            except Exception as ex:
                e, same = float("inf"), False
                log("  EXC", (bits, n, k, block, m, str(dtype), path, split, cfg), repr(ex)[:300])
            tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}.get(dtype, 2e-5)
            worst = max(worst, e / tol)
            n_checks += 1
            if not (e < tol and same):
                fails.append((bits, n, k, block, m, str(dtype), path, split, str(cfg), e, same))
    finally:
        if tuned_before is not None:
            os.environ["HF_OPTQUANT_AUTOTUNE"] = tuned_before
        LL._kernels.cache_clear()
    report["small_checks"] = n_checks
    report["small_checks_failed"] = fails
    report["small_checks_worst_err_over_tol"] = worst
    report["fast_launch_checked"] = dict(LL._FAST_CHECKED)
    report["gemm_smem_lut"] = LL._GEMM_SMEM_LUT
    log(f"small-shape GPU checks: {n_checks} run, {len(fails)} failures, worst err/tol {worst:.3f}; "
        f"direct launch verified: {LL._FAST_CHECKED}; GEMM smem table: {LL._GEMM_SMEM_LUT}")  # fmt: skip
    for f in fails[:30]:
        log("  FAIL", f)


# ----------------------------------------------------------------------------- timing


class Case:
    """One weight (all copies for rotation) and its baselines, timed for several calls."""

    def __init__(self, n, k, bits, block, device, peers=True):
        self.n, self.k, self.bits, self.block, self.device = n, k, bits, block, device
        self.codes, self.lut, self.scales = make_weight(n, k, bits, block, device, seed=n + k + bits + block)
        p = LL.pack_lut_weight(self.codes, self.lut, self.scales, bits, block, device=device)
        self.wbytes = p.nbytes
        self.n_rot = max(1, min(32, math.ceil(4 * L2_BYTES / self.wbytes)))
        self.packs = copies_of(p, self.n_rot, device)
        self.w_bf16s = self.tgs = None
        if peers:
            w32 = self.lut[self.codes.long()] * self.scales.repeat_interleave(block, dim=1)[:, :k]
            w_bf16 = w32.to(torch.bfloat16)
            del w32
            nb = max(1, min(8, math.ceil(4 * L2_BYTES / (2 * n * k))))
            self.w_bf16s = [w_bf16] + [w_bf16.clone() for _ in range(nb - 1)]
            if bits == 4:
                try:
                    tg = tinygemm_pack(self.codes, self.scales, block)
                    nt = max(1, min(32, math.ceil(4 * L2_BYTES / tg[0].numel() / tg[0].element_size())))
                    self.tgs = [tg] + [(tg[0].clone(), tg[1].clone()) for _ in range(nt - 1)]
                except Exception as e:  # pragma: no cover - depends on torch build
                    log("tinygemm pack failed:", repr(e))

    def x(self, m):
        return torch.randn(m, self.k, device=self.device, dtype=torch.bfloat16)

    def ref(self, x):
        return lut_linear_reference(x.double(), self.codes, self.lut.double(), self.scales.double(), self.block)

    def t_bf16(self, x):
        if self.w_bf16s is None:
            return None
        return bench_graph(lambda i: torch.nn.functional.linear(x, self.w_bf16s[i]), len(self.w_bf16s))

    def t_tinygemm(self, x):
        if self.tgs is None:
            return None
        try:
            return bench_graph(
                lambda i: torch.ops.aten._weight_int4pack_mm(x, self.tgs[i][0], self.block, self.tgs[i][1]),
                len(self.tgs),
            )
        except Exception as e:  # pragma: no cover
            log("tinygemm failed:", repr(e))
            return None

    def run(self, x, path=None, config=None, split=None, check=False, eager=False):
        """dict with time_us (graph), optional eager_us and rel_err of one kernel variant."""
        rec = {}
        y = LL.lut_linear(x, self.packs[0], path=path, config=config, split_k=split)
        if check:
            rec["rel_err"] = rel_err(y, self.ref(x))
        if eager:
            it = iter(range(10**9))
            rec["eager_us"] = bench(lambda: LL.lut_linear(x, self.packs[next(it) % self.n_rot], path=path,
                                                          config=config, split_k=split))  # fmt: skip
        rec["time_us"] = bench_graph(
            lambda i: LL.lut_linear(x, self.packs[i], path=path, config=config, split_k=split), self.n_rot
        )
        return rec


def derived(rec, wbytes, hbm, t_bf16=None, t_tg=None):
    t = rec["time_us"]
    rec["weight_bytes"] = wbytes
    rec["gbps"] = wbytes / (t * 1e-6) / 1e9
    rec["frac_hbm"] = rec["gbps"] / hbm
    if t_bf16:
        rec["t_bf16_us"], rec["speedup_bf16"] = t_bf16, t_bf16 / t
    if t_tg:
        rec["t_tinygemm_us"], rec["speedup_tinygemm"] = t_tg, t_tg / t
    return rec


def used_config(path):
    ks, tuned = LL._kernels(SMOKE, not SMOKE and LL.autotune_enabled())
    cfg = getattr(ks.get(path), "best_config", None)
    if cfg is None:
        return None
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def auto_path(m):
    if m <= LL.GEMV_MAX_M:
        return "gemv"
    if LL.DEQUANT_MIN_M is not None and m >= LL.DEQUANT_MIN_M and not SMOKE:
        return "dequant"
    return "gemm"


# ----------------------------------------------------------------------------- explore


GEMV_VARIANTS = {
    "pair64a1": {"BN": 64, "AHEAD": 1, "num_warps": 4},
    "pair64a2": {"BN": 64, "AHEAD": 2, "num_warps": 4},
    "pair32a2": {"BN": 32, "AHEAD": 2, "num_warps": 4},
    "pair128a1": {"BN": 128, "AHEAD": 1, "num_warps": 4},
    "pair128a2w8": {"BN": 128, "AHEAD": 2, "num_warps": 8},
    "single64a1": {"BN": 64, "AHEAD": 1, "num_warps": 4, **SINGLE},
    "single64a2": {"BN": 64, "AHEAD": 2, "num_warps": 4, **SINGLE},
    "single128a1w4": {"BN": 128, "AHEAD": 1, "num_warps": 4, **SINGLE},
    "single128a2w8": {"BN": 128, "AHEAD": 2, "num_warps": 8, **SINGLE},
    "single256a2w8": {"BN": 256, "AHEAD": 2, "num_warps": 8, **SINGLE},
    "pair256a2w8": {"BN": 256, "AHEAD": 2, "num_warps": 8},
    "pair128a2w8r64": {"BN": 128, "AHEAD": 2, "num_warps": 8, "maxnreg": 64},
    "pair128a2w8gx": {"BN": 128, "AHEAD": 2, "num_warps": 8, "XS": False},  # activations from global memory
    "pair128a2w8xs": {"BN": 128, "AHEAD": 2, "num_warps": 8, "XS": True},  # activations in smem (default)
}
SMALLM_VARIANTS = {  # M = 2..16
    "gemv32a1": ("gemv", {"BN": 32, "AHEAD": 1, "num_warps": 4}),
    "gemv64a1": ("gemv", {"BN": 64, "AHEAD": 1, "num_warps": 4}),
    "gemm16x64j4": ("gemm", {"BM": 16, "BN": 64, "J": 4, "num_warps": 4, "num_stages": 2}),
    "gemm16x64j8": ("gemm", {"BM": 16, "BN": 64, "J": 8, "num_warps": 4, "num_stages": 2}),
    "gemm16x128j8": ("gemm", {"BM": 16, "BN": 128, "J": 8, "num_warps": 4, "num_stages": 2}),
    "gemm16x64j4old": ("gemm", {"BM": 16, "BN": 64, "J": 4, "num_warps": 4, "num_stages": 2, "SUBDOT": False}),
}
LARGEM_VARIANTS = {  # M = 64, 256
    "gemm64x128j4w4s3": ("gemm", {"BM": 64, "BN": 128, "J": 4, "num_warps": 4, "num_stages": 3}),
    "gemm128x128j4w4s2": ("gemm", {"BM": 128, "BN": 128, "J": 4, "num_warps": 4, "num_stages": 2}),
    "gemm128x128j4w8s3": ("gemm", {"BM": 128, "BN": 128, "J": 4, "num_warps": 8, "num_stages": 3}),
    "gemm256x128j4w8s2": ("gemm", {"BM": 256, "BN": 128, "J": 4, "num_warps": 8, "num_stages": 2}),
    "gemm128x256j4w8s2": ("gemm", {"BM": 128, "BN": 256, "J": 4, "num_warps": 8, "num_stages": 2}),
    "dequant": ("dequant", None),
}


def explore(device, hbm, report, results):
    block = 128
    cases = {}

    def case(n, k, bits=4, blk=block, peers=True):
        key = (n, k, bits, blk)
        if key not in cases:
            cases[key] = Case(n, k, bits, blk, device, peers)
        return cases[key]

    def emit(rec):
        results.append(rec)
        log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}))

    def variant(c, m, name, path, cfg, x, t_bf16, t_tg=None, split=None, check=False):
        rec = dict(section="", N=c.n, K=c.k, M=m, bits=c.bits, block=c.block, variant=name, path=path)
        try:
            rec.update(c.run(x, path=path, config=cfg, split=split, check=check))
            derived(rec, c.wbytes, hbm, t_bf16, t_tg)
        except Exception as e:
            rec["error"] = repr(e)[:300]
            log("ERROR", name, traceback.format_exc()[-1500:])
        return rec

    # 1. M = 1, 4-bit: GEMV variants, two split targets
    for n, k in SHAPES if "m1" in SECTIONS else ():
        if elapsed() > BUDGET * 0.40:
            log("budget: skipping rest of M=1 sweep")
            break
        for blk in sorted(BLOCKS, reverse=True):
            c = case(n, k, 4, blk)
            x = c.x(1)
            tb, tt = c.t_bf16(x), c.t_tinygemm(x)
            for name, cfg in GEMV_VARIANTS.items():
                if VARIANTS and name not in VARIANTS:
                    continue
                for per_sm in (2, 4) if n * k <= 4096 * 14336 else (4,):
                    LL.GEMV_PROGRAMS_PER_SM = per_sm
                    check = name in ("pair64a1", "pair128a2w8", "single128a2w8") or name.startswith("pair128a2w8")
                    rec = variant(c, 1, name, "gemv", cfg, x, tb, tt, check=check)
                    rec.update(section="m1", per_sm=per_sm)
                    emit(rec)
            LL.GEMV_PROGRAMS_PER_SM = 4
        torch.cuda.empty_cache()
    # 2. other bits at M = 1 (two shapes)
    for n, k in (SHAPES[3],) if "bits" in SECTIONS else ():
        for bits in (3, 8):
            if elapsed() > BUDGET * 0.45:
                break
            c = case(n, k, bits, 128, peers=False)
            x = c.x(1)
            for name in ("pair64a1", "pair64a2", "pair128a2w8"):
                cfg = {kk: v for kk, v in GEMV_VARIANTS[name].items()}
                rec = variant(c, 1, name, "gemv", cfg, x, None)
                rec.update(section="bits")
                emit(rec)
            cases.pop((n, k, bits, 128))
    # 3. M = 2..16
    for n, k in (SHAPES[1], SHAPES[3], SHAPES[0]) if "smallm" in SECTIONS else ():
        c = case(n, k, 4, 128)
        for m in (2, 4, 16):
            if elapsed() > BUDGET * 0.65:
                break
            x = c.x(m)
            tb, tt = c.t_bf16(x), c.t_tinygemm(x)
            for name, (path, cfg) in SMALLM_VARIANTS.items():
                if path == "gemv" and m > 4:
                    continue
                rec = variant(c, m, name, path, cfg, x, tb, tt, check=(m == 16))
                rec.update(section="smallm")
                emit(rec)
    # 4. M = 64, 256
    for n, k in SHAPES if "largem" in SECTIONS else ():
        c = case(n, k, 4, 128)
        for m in (64, 256):
            if elapsed() > BUDGET * 0.92:
                break
            x = c.x(m)
            tb, tt = c.t_bf16(x), None
            for name, (path, cfg) in LARGEM_VARIANTS.items():
                rec = variant(c, m, name, path, cfg, x, tb, tt, check=(name == "dequant" or m == 256))
                rec.update(section="largem")
                emit(rec)
        torch.cuda.empty_cache()
    # 5. eager host overhead (cached direct launch vs the normal path), M=1
    if "eager" not in SECTIONS:
        return
    n, k = SHAPES[0]
    c = case(n, k, 4, 128)
    x = c.x(1)
    calls = 3 if SMOKE else 300
    for fast in (True, False):
        LL._FAST_LAUNCH = fast
        for i in range(c.n_rot):
            LL.lut_linear(x, c.packs[i])
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(calls):
            LL.lut_linear(x, c.packs[i % c.n_rot])
        torch.cuda.synchronize()
        emit(dict(section="eager", N=n, K=k, M=1, fast_launch=fast,
                  host_us_per_call=(time.perf_counter() - t) / calls * 1e6))  # fmt: skip
    LL._FAST_LAUNCH = True


# ----------------------------------------------------------------------------- sass


SASS_VARIANTS = [  # (label, path, bits, block, M, format/table overrides, config, num_warps, num_stages)
    ("gemv pair BN=64", "gemv", 4, 128, 1, {}, {"BN": 64, "AHEAD": 1}, 4, 1),
    ("gemv pair BN=64 ahead 2", "gemv", 4, 128, 1, {}, {"BN": 64, "AHEAD": 2}, 4, 1),
    ("gemv pair BN=128", "gemv", 4, 128, 1, {}, {"BN": 128, "AHEAD": 1}, 4, 1),
    ("gemv pair BN=128 w8", "gemv", 4, 128, 1, {}, {"BN": 128, "AHEAD": 2}, 8, 1),
    ("gemv single BN=64", "gemv", 4, 128, 1, SINGLE,
     {"BN": 64, "AHEAD": 1}, 4, 1),
    ("gemv 3-bit BN=64", "gemv", 3, 128, 1, {}, {"BN": 64, "AHEAD": 1}, 4, 1),
    ("gemv 8-bit BN=64 (32 copies)", "gemv", 8, 128, 1, {}, {"BN": 64, "AHEAD": 1}, 4, 1),
    ("gemv BM=2 BN=64", "gemv", 4, 128, 2, {"BM": 2}, {"BN": 64, "AHEAD": 1}, 4, 1),
    ("gemv BM=4 BN=32", "gemv", 4, 128, 4, {"BM": 4}, {"BN": 32, "AHEAD": 1}, 4, 1),
    ("gemm BM=16 BN=64 J=4 subdot", "gemm", 4, 128, 16, {}, {"BM": 16, "BN": 64, "J": 4, "SUBDOT": True}, 4, 2),
    ("gemm BM=16 BN=64 J=8 subdot", "gemm", 4, 128, 16, {}, {"BM": 16, "BN": 64, "J": 8, "SUBDOT": True}, 4, 2),
    ("gemm BM=16 BN=64 J=4 one-dot", "gemm", 4, 128, 16, {}, {"BM": 16, "BN": 64, "J": 4, "SUBDOT": False}, 4, 2),
    ("gemm BM=16 BN=64 J=4 one-dot, global table", "gemm", 4, 128, 16, {"LMODE": 1},
     {"BM": 16, "BN": 64, "J": 4, "SUBDOT": False}, 4, 2),
    ("gemm BM=128 BN=128 J=4 subdot w8", "gemm", 4, 128, 256, {}, {"BM": 128, "BN": 128, "J": 4, "SUBDOT": True},
     8, 3),
    ("gemm BM=128 BN=128 J=4 one-dot w8", "gemm", 4, 128, 256, {},
     {"BM": 128, "BN": 128, "J": 4, "SUBDOT": False}, 8, 3),
]


def _sass_loop_ops(sass: str):
    """Instructions in the largest loop (the body between a label and its backward branch)."""
    import re

    lines = sass.splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", ln))}
    best = None
    for i, ln in enumerate(lines):
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", ln)
        backward = m and m.group(1) in labels and labels[m.group(1)] < i
        if backward and (best is None or i - labels[m.group(1)] > best[1] - best[0]):
            best = (labels[m.group(1)], i)
    if best is None:
        return None
    ops = [m.group(1) for ln in lines[best[0] : best[1] + 1]
           if (m := re.match(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", ln))]  # fmt: skip
    return ops


def sass_report(out_dir):
    """Compile kernel variants for sm_90 (no GPU needed: Triton's bundled ptxas/nvdisasm) and
    count SASS instructions per code in the main loop: the issue-rate side of the roofline."""
    import re
    import subprocess
    from collections import Counter

    import triton
    from triton.backends.compiler import GPUTarget

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    rows = []
    for label, path, bits, block, m, over, cfg, nw, st in SASS_VARIANTS:
        k, n = 4096, 128256
        codes = torch.zeros(2, 512, dtype=torch.uint8)
        p = LL.pack_lut_weight(codes, torch.arange(2.0**bits), torch.ones(2, 512 // block), bits, block)
        meta = LL._format_meta(p, k)
        tm = LL._table_meta(p, path, False, torch.bfloat16)
        tm["LMODE"] = 2
        meta.update(tm)
        ng, ldw, lds = k // 512, (k // 512) * bits * 16, k // block
        if path == "gemv":
            meta.update(SPLIT=False, KMAJOR=LL._gemv_kmajor(), BM=1, XS=False)
        else:
            for name in ("COPIES", "PAIR", "BIG"):
                meta.pop(name)
            meta.update(SPLIT=False, DOT_IEEE=False)
        meta.update(over)
        meta.update(cfg)
        args = dict(x_ptr="*bf16", w_ptr="*i32", lut_ptr="*fp32", s_ptr="*bf16", y_ptr="*bf16", ws_ptr="*fp32",
                    cnt_ptr="*i32", M=m, N=n, K=k, stride_xm=k, stride_ym=n, ldw=ldw, lds=lds, n_groups=ng,
                    n_split=1, M_KEY=m)  # fmt: skip
        names = LL._param_names(path)
        sig, attrs, consts = {}, {}, {}
        for i, name in enumerate(names):
            if name in meta:
                sig[name] = "constexpr"
                consts[name] = meta[name]
                continue
            v = args[name]
            if isinstance(v, str):
                sig[name], attrs[(i,)] = v, [["tt.divisibility", 16]]
            elif v == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = triton.compiler.ASTSource(LL._JITFunction(LL._RAW[path]), sig, constexprs=consts, attrs=attrs)
        row = dict(label=label, path=path, bits=bits, M=m, num_warps=nw)
        try:
            ker = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw, num_stages=st))
            cub = os.path.join(out_dir, "k.cubin")
            with open(cub, "wb") as f:
                f.write(ker.asm["cubin"])
            sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", cub], capture_output=True, text=True).stdout
            res = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cub], capture_output=True,
                                 text=True).stdout  # fmt: skip
            mres = re.search(r"REG:(\d+) STACK:(\d+)", res)
            ops = _sass_loop_ops(sass) or []
            threads = nw * 32
            # GEMV: one group (512 codes per row) per iteration; GEMM: one K step of J*16
            codes_per_iter = cfg["BN"] * (512 if path == "gemv" else cfg["J"] * 16) // threads
            hist = Counter(o for o in ops)
            row.update(regs=int(mres.group(1)), stack=int(mres.group(2)), loop_instr=len(ops),
                       codes_per_thread=codes_per_iter, instr_per_code=len(ops) / codes_per_iter,
                       top=dict(hist.most_common(6)))  # fmt: skip
        except Exception as e:
            row["error"] = repr(e)[:200]
        rows.append(row)
        log(json.dumps(row))
    log()
    log(f"SASS (sm_90, Triton {triton.__version__}), main loop of each kernel; 4-bit unless noted, block 128")
    log("| variant | warps | regs | spill bytes | loop instr | codes/thread/iter | instr/code | top ops |")
    log("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            log(f"| {r['label']} | {r['num_warps']} | ERROR {r['error'][:80]} | | | | | |")
            continue
        top = ", ".join(f"{k} {v}" for k, v in r["top"].items())
        log(f"| {r['label']} | {r['num_warps']} | {r['regs']} | {r['stack']} | {r['loop_instr']} | "
            f"{r['codes_per_thread']} | {r['instr_per_code']:.2f} | {top} |")  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- full


def run_full(device, hbm, report, results, shapes):
    for n, k in shapes:
        for block in BLOCKS:
            if elapsed() > BUDGET:
                log("budget exceeded: stopping")
                return
            c = Case(n, k, 4, block, device)
            for m in BATCHES:
                x = c.x(m)
                ref_needed = m in (BATCHES[0], BATCHES[-1])
                tb, tt = c.t_bf16(x), c.t_tinygemm(x)
                # alternatives to the auto dispatch, timed for the record (and to revisit it)
                forced = {1: ["gemm"], 4: ["gemv"], 16: ["gemv"], 64: ["dequant"], 256: ["dequant"]}.get(m, [])
                forced = [f for f in forced if f != auto_path(m)]
                for path in [None, *forced]:
                    rec = dict(N=n, K=k, M=m, bits=4, block=block, path=path or "auto")
                    try:
                        rec.update(c.run(x, path=path, check=ref_needed, eager=(path is None)))
                        used = path or auto_path(m)
                        rec.update(used=used, config=used_config(used) if used != "dequant" else None)
                        derived(rec, c.wbytes, hbm, tb, tt)
                    except Exception as e:
                        rec["error"] = repr(e)[:300]
                        log("ERROR", rec, traceback.format_exc()[-1500:])
                    results.append(rec)
                    log(json.dumps(rec))
            for bits in (3, 8):
                cb = Case(n, k, bits, block, device, peers=False)
                x = cb.x(1)
                rec = dict(N=n, K=k, M=1, bits=bits, block=block, path="auto")
                try:
                    rec.update(cb.run(x, check=True, eager=True), used="gemv", config=used_config("gemv"))
                    derived(rec, cb.wbytes, hbm, c.t_bf16(x))
                except Exception as e:
                    rec["error"] = repr(e)[:300]
                results.append(rec)
                log(json.dumps(rec))
                del cb
            del c
            torch.cuda.empty_cache()
            log(f"shape {n}x{k} block {block} done at {elapsed():.0f}s")


def print_table(report, results):
    log()
    log(f"Device: {report['device']}; torch {report['torch']}, triton {report['triton']}; "
        f"measured copy bandwidth {report['hbm_copy_gbps']:.0f} GB/s")  # fmt: skip
    hdr = ("| N x K | M | bits | block | kernel | us | eager us | weight GB/s | % HBM | bf16 us "
           "| x bf16 | tinygemm us | x tinygemm | rel err |")  # fmt: skip
    log(hdr)
    log("|" + "---|" * (hdr.count("|") - 1))

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    for r in results:
        name = r.get("used", r.get("path"))
        if r.get("path") not in (None, "auto"):
            name = f"{name} (forced)"
        if "error" in r:
            log(f"| {r['N']}x{r['K']} | {r['M']} | {r['bits']} | {r['block']} | {name} | ERROR {r['error'][:60]} |")
            continue
        log(
            f"| {r['N']}x{r['K']} | {r['M']} | {r['bits']} | {r['block']} | {name} | "
            f"{r['time_us']:.1f} | {f(r.get('eager_us'), '.1f')} | {r['gbps']:.0f} | "
            f"{100 * r['frac_hbm']:.0f} | "
            f"{f(r.get('t_bf16_us'), '.1f')} | {f(r.get('speedup_bf16'), '.2f')} | "
            f"{f(r.get('t_tinygemm_us'), '.1f')} | {f(r.get('speedup_tinygemm'), '.2f')} | "
            f"{f(r.get('rel_err'), '.1e')} |"
        )


def print_explore(results):
    log()
    log("| section | N x K | M | bits | block | variant | per_sm | us | % HBM | x bf16 | x tinygemm | rel err |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r.get("section") == "eager":
            log(f"| eager | {r['N']}x{r['K']} | 1 | 4 | 128 | fast_launch={r['fast_launch']} | | "
                f"host {r['host_us_per_call']:.1f} us/call | | | | |")  # fmt: skip
            continue
        if "error" in r:
            log(f"| {r['section']} | {r['N']}x{r['K']} | {r['M']} | {r['bits']} | {r['block']} | {r['variant']} "
                f"| | ERROR {r['error'][:50]} | | | | |")  # fmt: skip
            continue
        sb, st, re_ = r.get("speedup_bf16"), r.get("speedup_tinygemm"), r.get("rel_err")
        log(f"| {r['section']} | {r['N']}x{r['K']} | {r['M']} | {r['bits']} | {r['block']} | {r['variant']} | "
            f"{r.get('per_sm', '')} | {r['time_us']:.1f} | {100 * r['frac_hbm']:.0f} | "
            f"{'' if sb is None else f'{sb:.2f}'} | {'' if st is None else f'{st:.2f}'} | "
            f"{'' if re_ is None else f'{re_:.1e}'} |")  # fmt: skip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    ap.add_argument("--mode", choices=("full", "explore", "sass"), default="full")
    ap.add_argument("--quick", action="store_true", help="first shape only")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds before sections are skipped")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter dry run of this script")
    ap.add_argument("--shapes", help="comma-separated NxK (out x in) layer shapes, default: the 8B-Llama four")
    ap.add_argument("--blocks", default="64,128", help="comma-separated scale block sizes for --mode full")
    ap.add_argument("--sections", default="m1,bits,smallm,largem,eager", help="parts of --mode explore to run")
    ap.add_argument("--variants", default="", help="comma-separated GEMV variants of the M = 1 sweep (default all)")
    ap.add_argument("--autotune", action="store_true", help="HF_OPTQUANT_AUTOTUNE=1 (default: the fixed configs)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    global SMOKE, SHAPES, BATCHES, BUDGET, BLOCKS, SECTIONS, VARIANTS
    if args.mode == "sass":  # static analysis: no GPU, no interpreter
        rows = sass_report(args.out)
        with open(os.path.join(args.out, "kernels_sass.json"), "w") as f:
            json.dump(rows, f, indent=1)
        return
    BUDGET = args.budget
    SECTIONS = tuple(args.sections.split(","))
    VARIANTS = tuple(v for v in args.variants.split(",") if v)
    if args.shapes:
        SHAPES = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    BLOCKS = tuple(int(b) for b in args.blocks.split(","))
    if args.autotune:
        os.environ["HF_OPTQUANT_AUTOTUNE"] = "1"
    if args.smoke:
        SMOKE, SHAPES, BATCHES = True, [(40, 1024)] * (4 if args.mode == "explore" else 1), [1, 4, 17]
        os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
        torch.cuda.synchronize = torch.cuda.empty_cache = lambda *a, **k: None
    else:
        device = torch.device("cuda")
    import triton

    report = dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        mode=args.mode,
        device="cpu" if SMOKE else torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        sms=0 if SMOKE else torch.cuda.get_device_properties(0).multi_processor_count,
        gemv_kmajor=LL._gemv_kmajor(),
        gemv_max_m=LL.GEMV_MAX_M,
        autotune=LL.autotune_enabled(),
        dequant_min_m=LL.DEQUANT_MIN_M,
    )
    hbm = measure_hbm(device)
    report["hbm_copy_gbps"] = hbm
    log(f"{report['device']} torch {torch.__version__} triton {triton.__version__}: "
        f"copy bandwidth {hbm:.0f} GB/s (read+write)")  # fmt: skip
    if not SMOKE:
        try:
            report["tinygemm_check_rel_err"] = check_tinygemm_layout(device)
            log("tinygemm layout check rel err", report["tinygemm_check_rel_err"])
        except Exception as e:
            report["tinygemm_check_rel_err"] = repr(e)
            log("tinygemm check failed", repr(e))
    if not args.skip_checks:
        try:
            correctness_small(device, report, full=args.mode == "full")
        except Exception as e:  # e.g. a launch error
            log("small checks raised:", repr(e), traceback.format_exc()[-2000:])
            report["small_checks_failed"] = [repr(e)]
    log(f"checks done at {elapsed():.0f}s")
    results = []
    out_json = os.path.join(args.out, f"kernels_{args.mode}.json")
    try:
        if args.mode == "explore":
            explore(device, hbm, report, results)
        else:
            run_full(device, hbm, report, results, SHAPES[:1] if args.quick else SHAPES)
    finally:
        report["elapsed_s"] = elapsed()
        with open(out_json, "w") as f:
            json.dump(dict(report=report, results=results), f, indent=1)
    if args.mode == "explore":
        print_explore(results)
    else:
        print_table(report, results)


if __name__ == "__main__":
    main()
