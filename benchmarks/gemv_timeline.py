"""Per-program timeline of the 4-bit tensor-core GEMV (``lut_mma._mma_gemv_kernel``) on the GPU.

Where does a small layer's time go?  This script builds an instrumented copy of the kernel -- the library's own
source with clock reads inserted at four points (program start, after the table fill, after the main loop, after
the output stores) plus ``%globaltimer`` at start and end and ``%smid`` -- launches it back to back in a CUDA graph
over weight copies that defeat the L2 (as ``kernels.bench_graph`` does), and prints, for one call in the middle
of the graph: how long the launch takes to start every program, each phase's length per program, how programs
spread over SMs, and the gap to the previous call's last program.  The instrumented kernel is a benchmark-only
copy (written to a temporary module); the library kernel is unchanged.

Run (repo root, GPU): ``PYTHONUNBUFFERED=1 python benchmarks/gemv_timeline.py --out $OUT``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as KB  # noqa: E402  (loads hf_optquant/kernels as the stand-alone package _hfoq_kernels)
from lut_mma import mma_copies  # noqa: E402

LM = importlib.import_module("_hfoq_kernels.lut_mma")
log = KB.log

_HELPERS = '''
@triton.jit
def _clock(dep):
    return tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [dep.to(tl.int32)], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _gtime(dep):
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dep.to(tl.int32)], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _smid(dep):
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [dep.to(tl.int32)], dtype=tl.int32,
                                     is_pure=False, pack=1)
'''


def instrumented_source() -> str:
    """The GEMV kernel's source with the probes and a ``trace_ptr`` argument (int64 [programs, 8])."""
    src = inspect.getsource(LM._mma_gemv_kernel)
    sig_end = "SPF: tl.constexpr,\n):"
    assert sig_end in src, "kernel signature changed: update gemv_timeline.py"
    src = src.replace(sig_end, "SPF: tl.constexpr, trace_ptr,\n):", 1)
    start = "    lead = (lane == 0) & tile_ok\n"
    fill = "    zero = tl.zeros([NT], dtype=tl.float32)\n"  # (after the table fill, PDL or not)
    loop_end = "    # the KW slices of a tile summed"
    for anchor in (start, fill, loop_end):
        assert anchor in src, f"kernel source changed near {anchor!r}: update gemv_timeline.py"
    src = src.replace(start, start + "    c0 = _clock(t)\n    g0 = _gtime(t)\n", 1)
    src = src.replace(fill, "    c1 = _clock(t)\n" + fill, 1)
    src = src.replace(loop_end, "    c2 = _clock(acc0.to(tl.int32) + acc3.to(tl.int32))\n" + loop_end, 1)
    assert src.endswith("tl.atomic_xchg(cnt_ptr + tile_id, 0)\n"), "kernel source changed: update gemv_timeline.py"
    tail = """    tl.debug_barrier()
    c3 = _clock(t)
    g3 = _gtime(t)
    sm = _smid(t).to(tl.int64)
    pid = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
    row = trace_ptr + pid.to(tl.int64) * 8
    first = t == 0
    tl.store(row + 0 + 0 * t, g0, mask=first)
    tl.store(row + 1 + 0 * t, g3, mask=first)
    tl.store(row + 2 + 0 * t, c0, mask=first)
    tl.store(row + 3 + 0 * t, c1, mask=first)
    tl.store(row + 4 + 0 * t, c2, mask=first)
    tl.store(row + 5 + 0 * t, c3, mask=first)
    tl.store(row + 6 + 0 * t, sm, mask=first)
"""
    return src + tail


def load_instrumented():
    """Import the instrumented kernel from a temporary module whose globals are lut_mma's (its jitted helpers)."""
    header = ("import triton\nimport triton.language as tl\nimport _hfoq_kernels.lut_mma as _LM\n"
              "globals().update({k: v for k, v in vars(_LM).items() if not k.startswith('__')})\n")  # fmt: skip
    text = header + _HELPERS + "\n\n" + instrumented_source().replace("def _mma_gemv_kernel(", "def gemv_traced(", 1)
    path = os.path.join(tempfile.mkdtemp(prefix="hfoq_timeline_"), "gemv_traced.py")
    with open(path, "w") as fh:
        fh.write(text)
    spec = importlib.util.spec_from_file_location("gemv_traced", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import triton

    return triton.jit(mod.gemv_traced)


def _pct(v: torch.Tensor, qs=(0.0, 0.5, 0.9, 1.0)) -> list[float]:
    v = v.double()
    return [round(float(torch.quantile(v, q)), 3) for q in qs]


def timeline(kernel, n: int, k: int, config: dict | None, calls: int = 12) -> dict:
    device = torch.device("cuda")
    case = KB.Case(n, k, 4, 128, device, peers=False)
    packs = mma_copies(case, case.n_rot)
    x = case.x(1)
    y = torch.empty((1, n), device=device, dtype=x.dtype)
    args, meta, grid, *_ = LM._gemv_plan(x, packs[0], y, False, None, config)
    meta["maxnreg"] = 64  # (the library kernel's count; the probes' registers would otherwise cost occupancy)
    programs = grid[0] * grid[1] * grid[2]
    calls = max(calls, case.n_rot + 2)
    trace = torch.zeros((calls, programs, 8), dtype=torch.int64, device=device)

    def call(i):
        a = dict(args, w_ptr=packs[i % case.n_rot].words, s_ptr=packs[i % case.n_rot].scales)
        kernel[grid](*a.values(), **meta, trace_ptr=trace[i])

    for i in range(case.n_rot):
        call(i)
    torch.cuda.synchronize()
    ref = LM.mma_linear(x, packs[0], config=config)
    call(0)
    torch.cuda.synchronize()
    same = torch.equal(y, ref)  # (the probes must not change the result)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for i in range(calls):
            call(i)
    g.replay()
    torch.cuda.synchronize()
    t_us = KB.bench_graph(lambda i: call(i % calls), case.n_rot)  # the instrumented kernel's own per-call time
    tr = trace.cpu()
    mid = calls // 2
    cur, prev = tr[mid], tr[mid - 1]
    g0, g3 = cur[:, 0], cur[:, 1]
    ghz = float(((cur[:, 5] - cur[:, 2]).double() / (g3 - g0).clamp(min=1).double()).median())  # cycles per ns
    per_sm = torch.bincount(cur[:, 6], minlength=torch.cuda.get_device_properties(0).multi_processor_count)
    cyc = lambda a, b: (cur[:, b] - cur[:, a]).double() / ghz / 1e3  # noqa: E731  (cycles -> us)
    res = dict(
        n=n, k=k, config=config, meta={kk: v for kk, v in meta.items() if kk.isupper()}, programs=programs,
        same_output=same, instrumented_us_per_call=t_us, clock_ghz=ghz,
        globaltimer_distinct_starts=int(torch.unique(g0).numel()),
        gap_from_previous_call_us=float(g0.min() - prev[:, 1].max()) / 1e3,
        span_us=float(g3.max() - g0.min()) / 1e3,
        start_offset_us_p0_50_90_100=_pct((g0 - g0.min()).double() / 1e3),
        end_offset_us_p0_50_90_100=_pct((g3 - g0.min()).double() / 1e3),
        program_us_p0_50_90_100=_pct(cyc(2, 5)),
        fill_us=_pct(cyc(2, 3)), loop_us=_pct(cyc(3, 4)), epilogue_us=_pct(cyc(4, 5)),
        programs_per_sm=torch.bincount(per_sm).tolist(),
    )  # fmt: skip
    log(json.dumps(res))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "14336x4096", "4096x14336", "28672x4096",
                                                    "128256x4096"])  # fmt: skip
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    KB.L2_BYTES = torch.cuda.get_device_properties(0).L2_cache_size
    kernel = load_instrumented()
    out = dict(argv=sys.argv, device=torch.cuda.get_device_name(), rows=[])
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        for config in (None, {"L2PF": 0, "SPF": False}):
            out["rows"].append(timeline(kernel, n, k, config))
            with open(os.path.join(args.out, "gemv_timeline.json"), "w") as fh:
                json.dump(out, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
