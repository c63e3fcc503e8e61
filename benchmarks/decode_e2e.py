"""End-to-end decode speed of an 8B-Llama-shaped model: bf16 vs fixed-length 4-bit vs grid 3.5-bit.

The real 32-layer Llama-3-8B shape (hidden 4096, MLP 14336, 32 heads, 8 KV heads of 128,
vocabulary 128256, untied LM head) with random weights: Student-t(5) x 0.02 (heavy tails, like
trained weights), bf16 embeddings and norms. Every linear layer -- fused QKV [6144, 4096], O
[4096, 4096], fused gate/up [28672, 4096], down [4096, 14336], and the LM head [128256, 4096] --
runs in one of these forms, each in its own copy of the model on the GPU:

* ``bf16``: ``F.linear`` (cuBLAS);
* ``lut4``: ``hf_optquant.kernels.lut_linear``, 4-bit codes with bf16 block-128 scales
  (random codes: the kernel's speed does not depend on them);
* ``lut4mma``: the same format in the tensor-core fragment layout (``hf_optquant.kernels.lut_mma``);
  ``lut4mma_NAME``: the same weights launched with the kernel config ``MMA_CONFIGS[NAME]``;
* ``glue``: no linear layers at all (a fixed zero output): the time of everything else in the step;
* ``grid``: ``hf_optquant.kernels.grid_linear``, the bf16 weights quantised to the uniform grid
  (channel rms bf16 scales) at ~3.5 stored bits/parameter and entropy coded on the GPU; the
  fused decode-GEMV reads only compressed bytes.

One decode step (batch 1) is a plain-torch forward: RMSNorm, RoPE, attention over a static KV
cache of ``--context`` positions (masked beyond the current one), SwiGLU MLP, greedy argmax
(``--compile``: the glue between the linear layers -- norms, residuals, RoPE, attention, SwiGLU -- goes
through ``torch.compile``, which fuses it into a few kernels per layer; the linear layers stay as they are;
``--pdl-glue``: those kernels are generated with programmatic dependent launch, so that a kernel's launch and
prologue overlap the end of the one before it); the position lives on the GPU, so the whole step is captured in
one CUDA graph and replayed.  Each result records the last step's logits sum and token: variants that share
weights (``lut4mma``, ``lut4mma_NAME``) must agree exactly.
Tokens/s = steps / time over ``--steps`` replays (median of 3 repeats).

Run (repo root, GPU): ``PYTHONUNBUFFERED=1 python benchmarks/decode_e2e.py --out $OUT``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from entropy_kernels import (  # noqa: E402
    clone_packed,
    encode_grid,
    grid_quantise,
    log,
    mma4_packed,
    segment_for,
    student_t,
)

from hf_optquant.coding.stream import encode_tensors  # noqa: E402
from hf_optquant.kernels import grid_linear as G  # noqa: E402
from hf_optquant.kernels import pair_mma as PM  # noqa: E402
from hf_optquant.kernels import prefix_linear as PL  # noqa: E402

CFG = dict(hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=128256,
           eps=1e-5, theta=500000.0)  # fmt: skip
PROJ = ("qkv", "o", "gate_up", "down")


def shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    h, d = cfg["hidden"], cfg["head_dim"]
    q, kv = cfg["heads"] * d, cfg["kv_heads"] * d
    return {
        "qkv": (q + 2 * kv, h),
        "o": (h, q),
        "gate_up": (2 * cfg["inter"], h),
        "down": (h, cfg["inter"]),
        "lm_head": (cfg["vocab"], h),
    }


# ---- linear layers in three forms -------------------------------------------------------------


class Bf16Linear:
    def __init__(self, w: torch.Tensor):
        self.w = w

    def __call__(self, x):
        return F.linear(x, self.w)

    @property
    def nbytes(self) -> int:
        return self.w.numel() * 2


class NoLinear:
    """No linear layer at all: a fixed zero output (the ``glue`` variant times everything else in the step)."""

    def __init__(self, n: int, device):
        self.y = torch.zeros((1, n), dtype=torch.bfloat16, device=device)

    def __call__(self, x):
        return self.y

    @property
    def nbytes(self) -> int:
        return 0


class LutLinear:
    def __init__(self, n: int, k: int, device, gen):
        from entropy_kernels import lut4_packed

        self.p = lut4_packed(n, k, device, gen, block=128)

    def __call__(self, x):
        from hf_optquant.kernels.lut_linear import lut_linear

        return lut_linear(x, self.p)

    @property
    def nbytes(self) -> int:
        return self.p.nbytes


class MmaLinear:
    """4-bit codes in the tensor-core fragment layout (``lut_mma``), bf16 block-128 scales, random codes."""

    def __init__(self, n: int, k: int, device, gen):
        self.p = mma4_packed(n, k, device, gen)
        self.config = None

    def with_config(self, config: dict) -> MmaLinear:
        """The same weight launched with another kernel config (``mma_linear(config=...)``)."""
        other = copy.copy(self)
        other.config = config
        return other

    def __call__(self, x):
        from hf_optquant.kernels.lut_mma import mma_linear

        return mma_linear(x, self.p, config=self.config)

    @property
    def nbytes(self) -> int:
        return self.p.nbytes


class GridLinear:
    def __init__(self, p: G.PackedGridWeight, path: str | None = None):
        self.p, self.path = p, path

    def __call__(self, x):
        return G.grid_linear(x, self.p, path=self.path)

    @property
    def nbytes(self) -> int:
        return self.p.nbytes


# ---- the model ---------------------------------------------------------------------------------


def _rms(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _rope(x, c, s):  # x [heads, d]; c, s [1, d/2]
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2).to(x.dtype)


def glue_norm(h, delta, w, eps):
    """Residual add, then RMSNorm: ``(h + delta, rms(h + delta) * w)``."""
    h = h + delta
    return h, _rms(h, w, eps)


def glue_attention(qkv, kc, vc, pos, mask, cos, sin, nh: int, kvh: int, d: int):
    """RoPE, KV-cache write at ``pos`` and attention over the static cache (one layer, one token)."""
    c, s = cos[pos], sin[pos]
    q = _rope(qkv[: nh * d].view(nh, d), c, s)
    k = _rope(qkv[nh * d : (nh + kvh) * d].view(kvh, d), c, s)
    v = qkv[(nh + kvh) * d :].view(kvh, d)
    kc.index_copy_(1, pos, k.unsqueeze(1))
    vc.index_copy_(1, pos, v.unsqueeze(1))
    if SDPA:  # (what transformers' Llama uses by default)
        att = F.scaled_dot_product_attention(q.view(1, nh, 1, d), kc.unsqueeze(0), vc.unsqueeze(0),
                                             attn_mask=~mask.view(1, 1, 1, -1), enable_gqa=True)  # fmt: skip
        return att.reshape(1, nh * d)
    qg = q.view(kvh, nh // kvh, d)
    scores = torch.matmul(qg, kc.transpose(1, 2)).float() / math.sqrt(d)
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), -1).to(torch.bfloat16)
    return torch.matmul(probs, vc).reshape(1, nh * d)


def glue_swiglu(gu):
    g, u = gu.chunk(2, -1)
    return F.silu(g) * u


#: ``--variants lut4mma_NAME``: the lut4mma model's weights launched with ``mma_linear(config=MMA_CONFIGS[NAME])``
#: (every name spells out the three launch switches; ``s7``: the defaults of session 7, none of them).
_OFF = {"PDL": False, "L2PF": 0, "SPF": False}
MMA_CONFIGS = {"s7": _OFF, "pdl": dict(_OFF, PDL=True), "nopdl": dict(_OFF, PDL=False, L2PF=None, SPF=None),
               "spf": dict(_OFF, SPF=True), "l2pf4": dict(_OFF, L2PF=4), "l2pf2spf": dict(_OFF, L2PF=2, SPF=True),
               "l2pf4spf": dict(_OFF, L2PF=4, SPF=True), "pdl_l2pf2spf": {"PDL": True, "L2PF": 2, "SPF": True}}
SDPA = False  # --sdpa: attention through F.scaled_dot_product_attention instead of matmul + softmax + matmul
GLUE = {"norm": glue_norm, "attention": glue_attention, "swiglu": glue_swiglu}


@functools.cache
def compiled_glue() -> dict:
    """The glue between the linear layers compiled by torch.compile (fused elementwise kernels); the linear
    layers stay outside (each variant's own kernels)."""
    return {name: torch.compile(fn, dynamic=False, fullgraph=True) for name, fn in GLUE.items()}


class Model:
    """Weights + a capturable decode step (batch 1)."""

    def __init__(self, cfg, lin: dict, embed, norms, device, context: int, compiled: bool = False):
        self.cfg, self.lin, self.embed, self.norms, self.device = cfg, lin, embed, norms, device
        self.glue = compiled_glue() if compiled else GLUE
        L, kvh, d = cfg["layers"], cfg["kv_heads"], cfg["head_dim"]
        self.kc = torch.zeros((L, kvh, context, d), dtype=torch.bfloat16, device=device)
        self.vc = torch.zeros_like(self.kc)
        inv = 1.0 / (cfg["theta"] ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        ang = torch.arange(context, device=device, dtype=torch.float32)[:, None] * inv[None, :]
        self.cos, self.sin = ang.cos(), ang.sin()
        self.ctx = torch.arange(context, device=device)
        self.tok = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.logits = None

    def step(self) -> None:
        cfg, glue = self.cfg, self.glue
        h = self.embed[self.tok]  # [1, hidden]
        mask = self.ctx > self.pos  # [context]
        a = glue["norm"](h, torch.zeros_like(h), self.norms[0][0], cfg["eps"])[1]
        for i in range(cfg["layers"]):
            qkv = self.lin["qkv"][i](a)[0]
            att = glue["attention"](qkv, self.kc[i], self.vc[i], self.pos, mask, self.cos, self.sin, cfg["heads"],
                                    cfg["kv_heads"], cfg["head_dim"])  # fmt: skip
            h, a = glue["norm"](h, self.lin["o"][i](att), self.norms[i][1], cfg["eps"])
            down = self.lin["down"][i](glue["swiglu"](self.lin["gate_up"][i](a)))
            h, a = glue["norm"](h, down, self.norms[i + 1][0], cfg["eps"])  # (the last entry: the final norm)
        self.logits = self.lin["lm_head"](a)
        self.tok.copy_(self.logits.argmax(-1))
        self.pos.add_(1)

    def reset(self) -> None:
        self.tok.zero_()
        self.pos.zero_()
        self.kc.zero_()
        self.vc.zero_()

    @property
    def linear_bytes(self) -> int:
        return sum(m.nbytes for ms in self.lin.values() for m in (ms if isinstance(ms, list) else [ms]))


def time_decode(model: Model, steps: int, repeats: int = 3) -> dict:
    """Tokens/s of the CUDA-graphed decode step (and the eager step, for reference)."""
    model.reset()
    for _ in range(3):
        model.step()  # compile / autotune outside the capture
    torch.cuda.synchronize()
    model.reset()
    t = time.time()
    for _ in range(5):
        model.step()
    torch.cuda.synchronize()
    eager = 5 / (time.time() - t)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        model.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model.step()
    rates = []
    for _ in range(repeats):
        model.reset()
        graph.replay()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            graph.replay()
        b.record()
        b.synchronize()
        rates.append(steps / (a.elapsed_time(b) / 1000))
    del graph
    return dict(tokens_per_s=statistics.median(rates), eager_tokens_per_s=eager, repeats=rates,
                logits_sum=float(model.logits.float().sum()), last_token=int(model.tok))  # fmt: skip


# ---- building the three models -------------------------------------------------------------------


def build_bf16(cfg, device, gen) -> tuple[dict, torch.Tensor, list]:
    shp = shapes(cfg)
    lin = {p: [] for p in PROJ}
    for _ in range(cfg["layers"]):
        for p in PROJ:
            lin[p].append(Bf16Linear(student_t(shp[p], device, gen).to(torch.bfloat16)))
    lin["lm_head"] = Bf16Linear(student_t(shp["lm_head"], device, gen).to(torch.bfloat16))
    embed = (torch.randn((cfg["vocab"], cfg["hidden"]), device=device, generator=gen) * 0.02).to(torch.bfloat16)
    norms = [(torch.ones(cfg["hidden"], dtype=torch.bfloat16, device=device),) * 2 for _ in range(cfg["layers"])]
    norms.append((torch.ones(cfg["hidden"], dtype=torch.bfloat16, device=device),))
    return lin, embed, norms


def grid_from_bf16(lin: dict, cfg, bits: float, rule: str, distinct: int, device,
                   layout: str = "prefix") -> tuple[dict, dict]:  # fmt: skip
    """Quantise and entropy-code every bf16 weight (one grid step per shape, fitted on layer 0);
    ``layout``: the GPU form, prefix-code lanes (default) or the rANS row layout."""
    out, info = {p: [] for p in PROJ}, {}
    t0 = time.time()
    for p in (*PROJ, "lm_head"):
        mods = lin[p] if isinstance(lin[p], list) else [lin[p]]
        n, k = mods[0].w.shape
        seg = segment_for(n, k, rule)
        first = encode_grid(mods[0].w, bits, seg)  # fits the step to the bits target
        packed = []
        for j, m in enumerate(mods):
            if j == 0:
                enc = first
            elif j < distinct:
                idx, scales = grid_quantise(m.w, first["step"])
                enc = dict(idx=idx, scales=scales, step=first["step"])
                if layout == "rans":
                    enc["tensors"] = encode_tensors(idx, chunk_size=seg, row_length=k, crc=False)
            else:  # same bytes as an earlier layer, in its own memory
                packed.append(clone_packed(packed[j % distinct]))
                continue
            form = G.layout_for(k, device) if layout == "auto" else layout
            if form == "pairs":
                packed.append(PM.pack_pair_weight(enc["idx"], enc["scales"], enc["step"], torch.bfloat16, device))
            elif form == "prefix":
                packed.append(PL.pack_prefix_weight(enc["idx"], enc["scales"], enc["step"], torch.bfloat16, device))
            else:
                packed.append(G.pack_grid_stream(enc["tensors"], enc["scales"], enc["step"], (n, k), torch.bfloat16,
                                                 device))  # fmt: skip
        stored = 8 * sum(t.numel() * t.element_size() for t in first["tensors"].values()) + 16 * n
        p0 = packed[0]
        info[p] = dict(shape=[n, k], seg=getattr(p0, "seg", None), step=first["step"], bits=first["bits"], layout=form,
                       gpu_bits=8 * p0.nbytes / (n * k), stored_bits_layer0=stored,
                       escapes_layer0=p0.num_escapes)  # fmt: skip
        if p == "lm_head":
            out[p] = GridLinear(packed[0])
        else:
            out[p] = [GridLinear(q) for q in packed]
        log(
            f"grid {p} {n}x{k} {form} S={info[p]['seg']} stored {first['bits']:.3f} b/p, on the GPU "
            f"{info[p]['gpu_bits']:.3f} b/p, {len(mods)} tensors, {time.time() - t0:.0f}s"
        )
    return out, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--bits", type=float, default=3.5)
    ap.add_argument("--segments", default="speed")
    ap.add_argument("--distinct", type=int, default=32, help="grid layers encoded separately (rest: copies)")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--variants", nargs="+", default=["bf16", "lut4", "grid"])
    ap.add_argument("--grid-layout", choices=("auto", "prefix", "pairs", "rans"), default="prefix")
    ap.add_argument("--compile", action="store_true", help="torch.compile the glue between the linear layers")
    ap.add_argument("--sdpa", action="store_true", help="attention via F.scaled_dot_product_attention")
    ap.add_argument("--pdl-glue", action="store_true",
                    help="--compile'd glue kernels with programmatic dependent launch (inductor's triton.enable_pdl)")
    args = ap.parse_args()
    global SDPA
    SDPA = args.sdpa
    if args.pdl_glue:  # (each glue kernel then waits for its predecessor in-kernel, and lets its successor start)
        import torch._inductor.config as inductor_config

        inductor_config.triton.enable_pdl = True
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(7)
    cfg = dict(CFG, layers=args.layers)
    res = dict(argv=sys.argv, cfg=cfg, device=torch.cuda.get_device_name(), torch=torch.__version__)
    path = os.path.join(args.out, "decode_e2e.json")

    def save():
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1, default=str)

    lin, embed, norms = build_bf16(cfg, device, gen)
    gbytes = sum(m.nbytes for ms in lin.values() for m in (ms if isinstance(ms, list) else [ms])) / 1e9
    log(f"bf16 model built: {gbytes:.2f} GB of linear weights")
    models = {}
    if "grid" in args.variants:
        glin, res["grid_layers"] = grid_from_bf16(
            lin, cfg, args.bits, args.segments, args.distinct, device, args.grid_layout
        )
        models["grid"] = Model(cfg, glin, embed, norms, device, args.context, args.compile)
        # the same grid weights through the decode-to-scratch path: an independent check of the fused GEMV
        dense = {p: ([GridLinear(m.p, "dense") for m in v] if isinstance(v, list) else GridLinear(v.p, "dense"))
                 for p, v in glin.items()}  # fmt: skip
        check = Model(cfg, dense, embed, norms, device, args.context)
        models["grid"].reset()
        check.reset()
        models["grid"].step()
        check.step()
        a, b = models["grid"].logits.double(), check.logits.double()
        res["grid_check"] = dict(rel_logit_err=float((a - b).norm() / b.norm()), same_token=bool(
            models["grid"].tok.item() == check.tok.item()))  # fmt: skip
        log("grid fused GEMV vs decode+matmul, first step:", res["grid_check"])
        del check, dense
    if "bf16" in args.variants:
        models["bf16"] = Model(cfg, lin, embed, norms, device, args.context, args.compile)
    if "lut4" in args.variants:
        try:
            shp = shapes(cfg)
            llin = {p: [LutLinear(*shp[p], device, gen) for _ in range(cfg["layers"])] for p in PROJ}
            llin["lm_head"] = LutLinear(*shp["lm_head"], device, gen)
            models["lut4"] = Model(cfg, llin, embed, norms, device, args.context, args.compile)
        except Exception as exc:
            res["lut4_error"] = repr(exc)[:500]
            log("lut4 build failed:", exc)
    if "lut4mma" in args.variants:
        shp = shapes(cfg)
        mlin = {p: [MmaLinear(*shp[p], device, gen) for _ in range(cfg["layers"])] for p in PROJ}
        mlin["lm_head"] = MmaLinear(*shp["lm_head"], device, gen)
        models["lut4mma"] = Model(cfg, mlin, embed, norms, device, args.context, args.compile)
        for name, config in MMA_CONFIGS.items():  # the same weights, launched with other kernel configs
            if "lut4mma_" + name in args.variants:
                other = {p: ([m.with_config(config) for m in v] if isinstance(v, list) else v.with_config(config))
                         for p, v in mlin.items()}  # fmt: skip
                models["lut4mma_" + name] = Model(cfg, other, embed, norms, device, args.context, args.compile)
    if "glue" in args.variants:
        shp = shapes(cfg)
        nlin = {p: [NoLinear(shp[p][0], device)] * cfg["layers"] for p in PROJ}
        nlin["lm_head"] = NoLinear(shp["lm_head"][0], device)
        models["glue"] = Model(cfg, nlin, embed, norms, device, args.context, args.compile)
    res["results"] = {}
    for name in ["glue", "bf16", "lut4", "lut4mma"] + ["lut4mma_" + c for c in MMA_CONFIGS] + ["grid"]:
        if name not in models:
            continue
        try:
            r = time_decode(models[name], args.steps)
        except Exception as exc:
            res["results"][name] = dict(error=repr(exc)[:500])
            log(name, "failed:", exc)
            save()
            continue
        r["linear_GB"] = models[name].linear_bytes / 1e9
        r["bits_per_param"] = 8 * models[name].linear_bytes / sum(a * b for a, b in (
            [shapes(cfg)[p] for p in PROJ] * cfg["layers"] + [shapes(cfg)["lm_head"]]))  # fmt: skip
        res["results"][name] = r
        log(name, json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))
        save()
    base = res["results"].get("bf16", {}).get("tokens_per_s")
    print("\n| model | linear weights GB | b/p (device) | tokens/s (graph) | x bf16 | tokens/s (eager) |")
    print("|---|---|---|---|---|---|")
    for name, r in res["results"].items():
        if "tokens_per_s" in r:
            ratio = f"{r['tokens_per_s'] / base:.2f}" if base else "-"
            print(
                f"| {name} | {r['linear_GB']:.2f} | {r['bits_per_param']:.2f} | {r['tokens_per_s']:.1f} | {ratio} "
                f"| {r['eager_tokens_per_s']:.1f} |"
            )
    save()


if __name__ == "__main__":
    main()
