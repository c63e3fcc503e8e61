"""Benchmark: GPU decoding of entropy-coded (grid + rANS) weights, per layer (issue 7).

For 8B-Llama layer shapes (N x K = 4096x4096, 4096x14336, 14336x4096, 128256x4096) at ~3.0 and
~3.5 stored bits/parameter (everything counted: rANS stream, lane states, tail counts, tables,
escapes, bf16 row scales), on random Student-t(5) weights quantised exactly like the grid format
(channel rms scales in bf16, ``round(w / scale / step)``):

* correctness on the GPU first: kernel indices vs the CPU reference decoder (bit-exact), dense
  decode vs the torch dequantisation (bit-exact), GEMV vs float64, GPU vs CPU encoder (same bytes),
  inline-PTX vs portable kernel (same output);
* time per call (CUDA graph of many calls rotating over weight copies that exceed the L2, median
  of replays) of the fused decode-GEMV (batch 1, 4), the decode-to-scratch path (batch 16, 64),
  bf16 ``F.linear`` and the fixed-length 4-bit LUT kernel (``hf_optquant.kernels.lut_linear``,
  random codes: its speed does not depend on them) in the same run;
* decode throughput (weights written as bf16): GB/s of output and of compressed input;
* the lane-length (segment) trade-off: stored overhead vs GEMV time.

Run (repo root, GPU): ``PYTHONUNBUFFERED=1 python benchmarks/entropy_kernels.py --out $OUT``.
``--quick`` runs small shapes only (also works on CPU with TRITON_INTERPRET=1, for a smoke test).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_optquant.coding import CodedStream, decode_symbols  # noqa: E402
from hf_optquant.coding.stream import encode_tensors  # noqa: E402
from hf_optquant.kernels import grid_linear as G  # noqa: E402
from hf_optquant.kernels import prefix_linear as PL  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (128256, 4096)]  # N x K (out x in)
L2_BYTES = 50 << 20
T0 = time.time()


def log(*args) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *args, flush=True)


# ---- weights -------------------------------------------------------------------------------


def student_t(shape: tuple[int, int], device, generator: torch.Generator, scale: float = 0.02) -> torch.Tensor:
    """Student-t(5) samples: z / sqrt(chi2_5 / 5) with chi2 from 5 squared normals (fast on GPUs)."""
    out = torch.empty(shape, dtype=torch.float32, device=device)
    rows = max(1, (1 << 24) // shape[1])
    for a in range(0, shape[0], rows):
        b = min(shape[0], a + rows)
        z = torch.randn((6, b - a, shape[1]), device=device, generator=generator)
        chi = z[1:].square().sum(0) / 5.0
        out[a:b] = z[0] * chi.rsqrt() * scale
    return out


def grid_quantise(w: torch.Tensor, step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and float32 row scales as the grid format with channel rms bf16 scales makes them."""
    rms = w.float().square().mean(1).sqrt()
    scales = rms.to(torch.bfloat16).float()
    idx = torch.empty(w.shape, dtype=torch.int32, device=w.device)
    rows = max(1, (1 << 24) // w.shape[1])
    for a in range(0, w.shape[0], rows):
        u = w[a : a + rows].float() / scales[a : a + rows, None]
        idx[a : a + rows] = torch.round(u.double() / step).clamp(-(1 << 20), 1 << 20).to(torch.int32)
    return idx, scales


def entropy(idx: torch.Tensor) -> float:
    sample = idx.reshape(-1)[:: max(1, idx.numel() // (1 << 22))]
    counts = torch.bincount((sample - sample.min()).long()).double()
    p = counts[counts > 0] / sample.numel()
    return float(-(p * p.log2()).sum())


def step_for_entropy(w: torch.Tensor, target: float) -> float:
    sample = w[:: max(1, w.shape[0] // 256)]
    lo, hi = 1e-3, 10.0
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if entropy(grid_quantise(sample, mid)[0]) > target else (lo, mid)
    return math.sqrt(lo * hi)


def segment_for(n: int, k: int, rule: str) -> int:
    """Lane length: 'auto' = the coder's default; 'speed' = >= ~64k lanes (more lanes, more bits)."""
    from hf_optquant.coding.layout import auto_segment

    if rule == "auto":
        return auto_segment(k)
    if rule == "speed":
        target = max(256, min(1024, 1 << int(round(math.log2(max(n * k / 65536, 1))))))
        return auto_segment(k, target)
    return auto_segment(k, int(rule))


def encode_grid(w: torch.Tensor, bits: float, seg: int, crc: bool = False) -> dict:
    """Grid-quantise and entropy-code ``w`` on its device at ~``bits`` stored bits/parameter.

    Two encodes: the step from the index entropy, then one correction by the measured size
    (d bits / d log2 step ~ -1)."""
    n, k = w.shape
    step = step_for_entropy(w, bits - 0.02)
    for _ in range(3):
        idx, scales = grid_quantise(w, step)
        tensors = encode_tensors(idx, chunk_size=seg, row_length=k, crc=crc)
        nbits = 8 * sum(t.numel() * t.element_size() for t in tensors.values()) + 16 * n  # + bf16 scales
        bpp = nbits / (n * k)
        if abs(bpp - bits) < 0.01:
            break
        step *= 2.0 ** (bpp - bits)
    return dict(idx=idx, scales=scales, step=step, tensors=tensors, bits=bpp, seg=seg)


def pack(enc: dict, device) -> G.PackedGridWeight:
    n, k = enc["idx"].shape
    return G.pack_grid_stream(enc["tensors"], enc["scales"], enc["step"], (n, k), torch.bfloat16, device)


def clone_packed(p):
    """A copy of a packed grid weight (either layout) in its own memory."""
    import dataclasses

    return dataclasses.replace(p, **{k: v.clone() for k, v in p._tensors().items()})


# ---- timing --------------------------------------------------------------------------------


def graph_time_us(calls: list, reps: int = 15) -> float:
    """Median GPU time per call: one CUDA graph of all ``calls`` (each on its own weight copy)."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t) / len(calls) * 1e6
    for c in calls:
        c()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / len(calls))
    del graph
    return statistics.median(times)


def copies_for(nbytes: int, most: int = 24) -> int:
    if not torch.cuda.is_available():  # CPU smoke test: one copy, timings meaningless
        return 1
    return max(2, min(most, math.ceil(4 * L2_BYTES / max(nbytes, 1))))


def copy_bandwidth(device) -> float:
    if device.type != "cuda":
        return float("nan")
    a = torch.empty(1 << 28, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    t = graph_time_us([lambda: b.copy_(a)], reps=10)
    return 2 * a.numel() * 4 / (t * 1e-6) / 1e9


# ---- correctness -----------------------------------------------------------------------------


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_prefix(enc: dict, seg: int, device, gen, checks: list) -> None:
    """Prefix-code layout: GPU encoder == CPU encoder, dense decode bit-exact, GEMV vs float64."""
    idx, (n, k) = enc["idx"], enc["idx"].shape
    pp = PL.pack_prefix_weight(idx, enc["scales"], enc["step"], torch.bfloat16, device, chunk_size=seg)
    pc = PL.pack_prefix_weight(idx.cpu(), enc["scales"].cpu(), enc["step"], torch.bfloat16, "cpu", chunk_size=seg)
    assert torch.equal(pp.words.cpu(), pc.words) and torch.equal(pp.last.cpu(), pc.last), "GPU != CPU prefix encoder"
    w_ref = (idx.double() * enc["step"]).float() * enc["scales"].float().reshape(-1, 1)
    dw = PL.decode_prefix_weight(pp, torch.float32)
    if not torch.equal(dw, w_ref):
        bad = torch.nonzero(dw != w_ref)
        PL.ASM = False  # is it the inline PTX?
        portable = torch.equal(PL.decode_prefix_weight(pp, torch.float32), w_ref)
        PL.ASM = True
        raise AssertionError(f"prefix dense decode not bit-exact: {bad.shape[0]} entries, first {bad[:5].tolist()}, "
                             f"portable kernel exact: {portable}")
    for m in (1, 3, 6):
        x = torch.randn((m, k), device=device, generator=gen).to(torch.bfloat16)
        ref = x.double() @ w_ref.double().T
        for path in ("gemv", "dense"):
            err = float((PL.prefix_linear(x, pp, path=path).double() - ref).norm() / ref.norm())
            assert err < 1e-2, f"prefix {path} m={m}: rel err {err}"
            checks.append(dict(check=f"prefix {path}", shape=[n, k], m=m, rel=err))
    log("prefix ok", n, k, seg, f"{8 * pp.nbytes / (n * k):.3f} b/p on the GPU")


def check_correctness(device, gen, results: dict, quick: bool = False) -> None:
    """Kernel vs independent references on odd and real shapes; raises on any failure."""
    checks = []
    cases = [(333, 1000, 256, 3.5), (64, 4096, 1024, 3.0), (4096, 4096, 512, 3.5)]
    for n, k, seg, bits in ([(45, 200, 64, 3.5)] if quick else cases):
        w = student_t((n, k), device, gen)
        w[5, 7] = 20.0  # an outlier: ~sqrt(K) row rms, an index beyond 127 (an escape) when K >= 4096
        enc = encode_grid(w, bits, seg, crc=True)
        assert enc["tensors"]["header"][3] == k  # row_length: the GPU layout
        packed = pack(enc, device)
        try:
            check_prefix(enc, seg, device, gen, checks)
        except AssertionError as exc:  # reported, and the timing still runs (it shows the failure beside)
            checks.append(dict(check="prefix", shape=[n, k], failed=str(exc)))
            log("PREFIX CHECK FAILED", n, k, seg, exc)
        stream = CodedStream({kk: v.cpu() for kk, v in enc["tensors"].items()})
        cpu_idx = decode_symbols(stream).reshape(n, k)  # the stored format's own CPU decoder
        assert torch.equal(cpu_idx, enc["idx"].cpu().long()), "CPU decoder != encoder input"
        h = stream.header
        alpha = G._decode(packed, G.MODE_INDEX, torch.int16).long().cpu()
        direct = (cpu_idx >= h.lo) & (cpu_idx < h.lo + h.num_direct)
        ok_idx = torch.equal(alpha[direct], cpu_idx[direct] - h.lo) and bool((alpha[~direct] >= h.num_direct).all())
        ref_w = (cpu_idx.double() * enc["step"]).float() * enc["scales"].cpu()[:, None]
        dense = {dt: G.decode_grid_weight(packed, dt).cpu() for dt in (torch.float32, torch.bfloat16)}
        ok_dense = all(torch.equal(dense[dt], ref_w.to(dt)) for dt in dense)
        errs = {}
        for m, dts in ((1, (torch.bfloat16, torch.float32)), (3, (torch.bfloat16,)), (6, (torch.bfloat16,)),
                       (16, (torch.bfloat16,))):
            if quick and m > 3:
                continue
            for dt in dts:
                x = torch.randn((m, k), device=device, generator=gen).to(dt)
                ref = x.double().cpu() @ ref_w.double().T
                for path in ("gemv", "dense") if m <= 6 else ("dense",):
                    y = G.grid_linear(x, packed, path=path)
                    y2 = G.grid_linear(x, packed, path=path)
                    assert torch.equal(y, y2), f"nondeterministic {path} m={m}"
                    errs[f"{path} m={m} {str(dt)[6:]}"] = rel(y.cpu(), ref)
        worst = {kk: v for kk, v in errs.items() if v > (3e-4 if "float32" in kk else 1e-2)}
        checks.append(dict(shape=[n, k], seg=seg, bits=round(enc["bits"], 4), escapes=packed.num_escapes,
                           index_bit_exact=ok_idx, dense_bit_exact=ok_dense, worst_rel=max(errs.values()),
                           failures=worst))  # fmt: skip
        log(f"check {n}x{k} seg {seg}: idx {ok_idx} dense {ok_dense} esc {packed.num_escapes} "
            f"worst rel {max(errs.values()):.2e} {'FAIL ' + str(worst) if worst else ''}")
        assert ok_idx and ok_dense and not worst, checks[-1]
        assert k < 4096 or packed.num_escapes > 0, "no escape exercised"
        if device.type == "cuda" and n == 333:  # portable kernel (no inline PTX) gives the same numbers
            x = torch.randn((2, k), device=device, generator=gen).to(torch.bfloat16)
            y_asm = G.grid_linear(x, packed)
            G._ASM = 0
            y_portable = G.grid_linear(x, packed)
            d_portable = G.decode_grid_weight(packed, torch.float32).cpu()
            G._ASM = 1
            same = torch.equal(y_asm, y_portable) and torch.equal(d_portable, ref_w)
            log(f"check inline-PTX vs portable kernel: same output {same}")
            assert same
            cpu_enc = encode_tensors(enc["idx"].cpu(), chunk_size=seg, row_length=k, crc=True)
            same_bytes = all(torch.equal(cpu_enc[kk], v.cpu()) for kk, v in enc["tensors"].items())
            log(f"check GPU encoder == CPU encoder (all stored bytes): {same_bytes}")
            assert same_bytes
    results["correctness"] = checks


# ---- per-layer timing ------------------------------------------------------------------------


def lut4_packed(n: int, k: int, device, gen, block: int = 64):
    """A fixed-length 4-bit LUT weight with random codes (the kernel's speed is data-independent)."""
    from hf_optquant.kernels.lut_linear import PackedLutWeight, _aligned_lut

    n_groups = -(-k // 512)
    q = torch.randint(-(1 << 31), 1 << 31, (n, n_groups * 4 * 16), device=device, generator=gen, dtype=torch.int64)
    lut = torch.sort(torch.randn(16, device=device, generator=gen)).values
    scales = (torch.rand((n, -(-k // block)), device=device, generator=gen) * 0.02 + 0.01).to(torch.bfloat16)
    return PackedLutWeight(qweight=q.to(torch.int32), lut=_aligned_lut(lut, device), scales=scales,
                           out_features=n, in_features=k, bits=4, block_size=block, scale_block=block)


def mma4_packed(n: int, k: int, device, gen):
    """A 4-bit weight in the tensor-core fragment layout (``lut_mma``), random codes, bf16 block-128 scales."""
    from hf_optquant.kernels.lut_mma import pack_mma_weight

    codes = torch.randint(0, 16, (n, k), device=device, generator=gen, dtype=torch.uint8)
    lut = torch.sort(torch.randn(16, device=device, generator=gen)).values
    scales = (torch.rand((n, -(-k // 128)), device=device, generator=gen) * 0.02 + 0.01).to(torch.bfloat16)
    return pack_mma_weight(codes, lut, scales.float(), 128)


def time_prefix(enc: dict, seg: int, device, gen, bs: tuple, row: dict) -> None:
    """The prefix-code layout of the same indices: GPU-resident bits, checks, GEMV / decode times."""
    idx, n, k = enc["idx"], *enc["idx"].shape
    tag = f"prefix{seg}"
    t0 = time.time()
    pp = PL.pack_prefix_weight(idx, enc["scales"], enc["step"], torch.bfloat16, device, chunk_size=seg)
    torch.cuda.synchronize() if device.type == "cuda" else None
    row[f"{tag}_pack_s"] = round(time.time() - t0, 2)
    row[f"{tag}_bits"] = round(8 * (pp.nbytes - 2 * n) / (n * k), 4)  # scales counted as bf16, like the stored form
    w_ref = (idx.double() * enc["step"]).float() * enc["scales"].float().reshape(-1, 1)
    row[f"{tag}_dense_exact"] = bool(torch.equal(PL.decode_prefix_weight(pp, torch.float32), w_ref))
    for m in sorted({1, max(bs)} & {1, 4}):
        x = torch.randn((m, k), device=device, generator=gen).to(torch.bfloat16)
        ref = x.double() @ w_ref.double().T
        y = PL.prefix_linear(x, pp, path="gemv").double()
        row[f"{tag}_gemv_rel_m{m}"] = float((y - ref).norm() / ref.norm())
    del w_ref
    ncopy = copies_for(pp.nbytes)
    ps = [pp] + [clone_packed(pp) for _ in range(ncopy - 1)]
    for m in bs:
        x = torch.randn((m, k), device=device, generator=gen).to(torch.bfloat16)
        row[f"{tag}_us_m{m}"] = graph_time_us([lambda p=p, x=x: PL.prefix_linear(x, p) for p in ps])
    dense = torch.empty((n, k), dtype=torch.bfloat16, device=device)
    row[f"{tag}_decode_us"] = graph_time_us([lambda p=p, o=dense: PL._launch(p, PL.MODE_DENSE, o) for p in ps])
    del ps, dense


def time_layer(n: int, k: int, bits: float, seg: int, device, gen, bs: tuple, do_base: bool, res: dict,
               prefix_segs: tuple = (), rans: bool = True) -> dict:  # fmt: skip
    w = student_t((n, k), device, gen)
    t_enc = time.time()
    enc = encode_grid(w, bits, seg)
    t_enc = time.time() - t_enc
    packed = pack(enc, device)
    del w
    nb = packed.nbytes
    ncopy = copies_for(nb)
    ps = [packed] + [clone_packed(packed) for _ in range(ncopy - 1)] if rans else []
    row = dict(shape=[n, k], bits=round(enc["bits"], 4), seg=seg, lanes=packed.states.numel(),
               escapes=packed.num_escapes, packed_bytes=nb, encode_s=round(t_enc, 2), copies=ncopy)  # fmt: skip
    for pseg in prefix_segs:
        try:
            time_prefix(enc, pseg, device, gen, bs, row)
        except Exception as exc:
            row[f"prefix{pseg}_error"] = repr(exc)[:400]
            log("prefix error", repr(exc)[:400])
    for m in bs if rans else ():
        x = torch.randn((m, k), device=device, generator=gen).to(torch.bfloat16)
        path = "gemv" if m <= G.GEMV_MAX_M else "dense"
        row[f"grid_us_m{m}"] = graph_time_us([lambda p=p, x=x, path=path: G.grid_linear(x, p, path=path) for p in ps])
        if m <= G.GEMV_MAX_M and m > 1:
            row[f"grid_dense_us_m{m}"] = graph_time_us(
                [lambda p=p, x=x: G.grid_linear(x, p, path="dense") for p in ps])
    if rans:
        dense = torch.empty((n, k), dtype=torch.bfloat16, device=device)
        row["decode_us"] = graph_time_us([lambda p=p, o=dense: G._launch(p, G.MODE_DENSE, o) for p in ps])
        row["decode_out_GBs"] = 2 * n * k / (row["decode_us"] * 1e-6) / 1e9
        row["decode_in_GBs"] = nb / (row["decode_us"] * 1e-6) / 1e9
        row["gemv_in_GBs"] = nb / (row["grid_us_m1"] * 1e-6) / 1e9
        del ps, dense
    if do_base:
        wb = torch.randn((n, k), device=device, generator=gen).to(torch.bfloat16)
        nbf = copies_for(2 * n * k)
        ws = [wb] + [wb.clone() for _ in range(nbf - 1)]
        for m in bs:
            x = torch.randn((m, k), device=device, generator=gen).to(torch.bfloat16)
            row[f"bf16_us_m{m}"] = graph_time_us([lambda w_=w_, x=x: F.linear(x, w_) for w_ in ws])
        del ws, wb
        try:
            from hf_optquant.kernels.lut_linear import lut_linear

            lp = lut4_packed(n, k, device, gen)
            ls = [lp] + [lut4_packed(n, k, device, gen) for _ in range(copies_for(lp.nbytes) - 1)]
            for m in bs:
                x = torch.randn((m, k), device=device, generator=gen).to(torch.bfloat16)
                row[f"lut4_us_m{m}"] = graph_time_us([lambda p=p, x=x: lut_linear(x, p) for p in ls])
            row["lut4_bytes"] = lp.nbytes
            del ls
        except Exception as exc:  # another helper is changing the LUT kernel: report, keep going
            row["lut4_error"] = repr(exc)[:300]
    torch.cuda.empty_cache() if device.type == "cuda" else None
    log("layer", json.dumps({kk: (round(v, 2) if isinstance(v, float) else v) for kk, v in row.items()}))
    return row


def table(rows: list[dict], bs: tuple) -> str:
    lines = ["| N x K | b/p | S | lanes | grid m=1 us | bf16 m=1 us | x bf16 | LUT4 m=1 us | grid vs LUT4 "
             "| decode us | decode GB/s out / in | " + " | ".join(f"grid/bf16/LUT4 m={m} us" for m in bs[1:]) + " |",
             "|---" * (11 + len(bs) - 1) + "|"]
    for r in rows:
        def f(key, fmt="{:.1f}", r=r):
            return fmt.format(r[key]) if key in r else "-"
        ratio = f"{r['bf16_us_m1'] / r['grid_us_m1']:.2f}" if "bf16_us_m1" in r else "-"
        lut = f"{r['lut4_us_m1'] / r['grid_us_m1']:.2f}" if "lut4_us_m1" in r else "-"
        more = " | ".join(f"{f(f'grid_us_m{m}')} / {f(f'bf16_us_m{m}')} / {f(f'lut4_us_m{m}')}" for m in bs[1:])
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['bits']:.3f} | {r['seg']} | {r['lanes']} "
                     f"| {f('grid_us_m1')} | {f('bf16_us_m1')} | {ratio} | {f('lut4_us_m1')} | {lut} "
                     f"| {f('decode_us')} | {f('decode_out_GBs', '{:.0f}')} / {f('decode_in_GBs', '{:.0f}')} "
                     f"| {more} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bits", type=float, nargs="+", default=[3.5, 3.0])
    ap.add_argument("--segments", nargs="+", default=["speed"], help="lane-length rules: auto, speed, <int>")
    ap.add_argument("--sweep", action="store_true", help="segment sweep on 4096x4096 and 14336x4096")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--prefix-segs", type=int, nargs="*", default=[512],
                    help="lane lengths of the prefix-code layout to time beside rANS (none: skip it)")
    ap.add_argument("--no-rans", action="store_true", help="time only the prefix-code layout (and baselines)")
    ap.add_argument("--budget", type=float, default=330.0, help="stop timing new configs after this many s")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=device).manual_seed(2026)
    res: dict = dict(argv=sys.argv, python=platform.python_version(), torch=torch.__version__)
    import triton

    res["triton"] = triton.__version__
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        res["device"] = f"{prop.name}, {prop.multi_processor_count} SMs, {prop.total_memory >> 30} GiB"
        res["copy_GBs"] = copy_bandwidth(device)
        log(res["device"], f"copy {res['copy_GBs']:.0f} GB/s", "torch", torch.__version__, "triton", res["triton"])
    path = os.path.join(args.out, "entropy_kernels.json")

    def save():
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1, default=str)

    if not args.skip_check:
        check_correctness(device, gen, res, args.quick)
        save()
    shapes = [(256, 1024), (512, 512)] if args.quick else SHAPES
    bs = tuple(args.batches)
    res["layers"] = []
    if args.sweep:
        res["sweep"] = []
        for n, k in ([(256, 1024)] if args.quick else [(4096, 4096), (14336, 4096)]):
            for rule in ("256", "512", "1024", "2048"):
                if time.time() - T0 > args.budget:
                    break
                seg = segment_for(n, k, rule)
                res["sweep"].append(time_layer(n, k, 3.5, seg, device, gen, (1,), False, res))
                save()
    for bits in args.bits:
        for rule in args.segments:
            for n, k in shapes:
                if time.time() - T0 > args.budget:
                    log("time budget reached: skipping", n, k, bits, rule)
                    continue
                seg = segment_for(n, k, rule)
                res["layers"].append(time_layer(n, k, bits, seg, device, gen, bs, True, res,
                                                tuple(args.prefix_segs), not args.no_rans))
                save()
    print("\n### Per-layer times (CUDA graphs, median; bf16 activations)\n")
    if not args.no_rans:
        print(table(res["layers"], bs))
    print("\n### Prefix-code layout (same indices), times in us\n")
    for r in res["layers"]:
        for ps_ in args.prefix_segs:
            t = f"prefix{ps_}"
            nan = float("nan")
            times = " ".join(f"m{m}: {r.get(f'{t}_us_m{m}', nan):.1f} (bf16 {r.get(f'bf16_us_m{m}', nan):.1f}, "
                             f"lut4 {r.get(f'lut4_us_m{m}', nan):.1f}, rans {r.get(f'grid_us_m{m}', nan):.1f})"
                             for m in bs)  # fmt: skip
            print(r["shape"], f"stored {r['bits']:.3f} b/p", f"S={ps_}", f"gpu {r.get(t + '_bits', '-')} b/p", times,
                  f"decode {r.get(t + '_decode_us', nan):.1f}", f"exact {r.get(t + '_dense_exact')}",
                  f"rel {r.get(t + '_gemv_rel_m1', nan):.1e}", r.get(t + "_error", ""))
    if res.get("sweep"):
        print("\n### Segment sweep (3.5 b/p, batch 1)\n")
        for r in res["sweep"]:
            print(f"{r['shape']} S={r['seg']} lanes={r['lanes']} bits={r['bits']:.4f} gemv {r['grid_us_m1']:.1f} us "
                  f"decode {r['decode_us']:.1f} us")
    save()


if __name__ == "__main__":
    main()
