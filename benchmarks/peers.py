"""Peer baselines for the model-quality benchmark: other quantisers on the same weights and protocol.

The protocol is exactly the one of ``benchmarks/model_quality.py``: same model loading, the same
evaluation windows from ``text_to_sequences`` (BOS first where the tokenizer uses one), seq_len 256,
top-k 128 KL, 8192 evaluation tokens by default; its ``load`` and ``grid_flattery`` are reused.
Every ``nn.Linear`` weight except ``lm_head`` is quantised by the peer's own quantiser and replaced
by the peer's own de-quantisation (fake quantisation); embeddings and lm_head stay unquantised, as
for our method.  Nothing of the peers' code is copied: each is called through its installed
package, on the CPU.

Stored bits per parameter are measured from what each peer actually keeps for a tensor, summed over
the quantised tensors and divided by their parameter count:

* **GGUF** (``gguf`` package, numpy reference code of llama.cpp's formats): the quantised byte array
  that ``gguf.quants.quantize`` returns, i.e. whole blocks of ``GGML_QUANT_SIZES[type]`` =
  (block size, bytes).  Q4_0 = 32 x 4-bit codes + fp16 scale = 18 B / 32 = 4.5 b/p; Q4_1 adds an
  fp16 min (5.0); Q5_0 = 4+1-bit codes + fp16 scale (5.5); Q8_0 = 8-bit codes + fp16 scale (8.5);
  MXFP4 = 32 x FP4 (E2M1) codes + one E8M0 shared exponent (17 B / 32 = 4.25).  No per-tensor extras
  beyond the GGUF header.  k-quants (Q2_K..Q6_K) are tried and skipped if the installed package can
  only de-quantise them.
* **HQQ** (``hqq``, ``HQQLinear`` with ``BaseQuantizeConfig(nbits, group_size=64)`` defaults: axis 1,
  half-quadratic optimisation of scale/zero, zero rounded at 4 bits; ``compute_dtype=float16``, its
  default, so scale and zero are stored as fp16): bytes of the packed ``W_q`` (4-bit: 2 per uint8;
  3-bit: 10 per int32 = 3.2 bits per code, rows padded to a multiple of 10; 2-bit: 4 per uint8) plus the
  fp16 ``scale`` and ``zero`` tensors (16 + 16 bits per group of 64 = 0.5 b/p).
* **bitsandbytes** (``bitsandbytes.functional.quantize_4bit`` on the CPU backend): packed 4-bit codes
  plus every tensor of the ``QuantState`` as serialised (``as_dict``): fp32 ``absmax`` per block and the
  16-entry fp32 code table; with double quantisation (``compress_statistics=True``) ``absmax`` becomes
  uint8 per block plus fp32 ``nested_absmax`` per 256 blocks, a 256-entry fp32 nested code table and
  an fp32 offset.
* **torchao** (optional): ``Int4WeightOnlyConfig`` is tried first (it needs CUDA/mslk kernels); the CPU
  path is ``IntxWeightOnlyConfig(int4, PerGroup(g), scale_dtype=bfloat16)``, symmetric.  Its CPU tensor
  subclass ``IntxUnpackedToInt8Tensor`` keeps one int8 per code plus bf16 scale and int8 zero point
  per group, so the *stored* width is 8 + 24/g b/p; the width a packed int4 serialisation would have
  (4 + 24/g) is printed next to it.

Usage:
  python benchmarks/peers.py --model gemma-3-270m --eval-tokens 8192 --out benchmarks/out
  python benchmarks/peers.py --peers gguf hqq --gguf-types Q4_0 Q5_0 --hqq-bits 4 3
Prints one line per config and a markdown table; writes ``peers_<model>.json`` under ``--out`` after
every config (``--resume`` carries on from it after an interruption).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# `python benchmarks/peers.py` puts benchmarks/ first on sys.path, where bitsandbytes' optional
# `import kernels` (the HF kernels-hub package) would find benchmarks/kernels.py: drop it, and load
# model_quality.py by its path instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402
from torch import nn  # noqa: E402

from hf_optquant.eval import evaluate_against_reference, reference_outputs, text_to_sequences  # noqa: E402
from hf_optquant.fisher import linear_weights  # noqa: E402


def _model_quality():
    spec = importlib.util.spec_from_file_location("model_quality", _HERE / "model_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# same model loading and on-grid detector as our own benchmark
_MQ = _model_quality()
load, grid_flattery = _MQ.load, _MQ.grid_flattery

SKIP = ("lm_head",)
EXACT_TOLERANCE = 1e-3  # a tensor whose relative RMS error is below this is reproduced (on-grid)

# (de-quantised float32 weight, stored bits of the tensor, bits if packed to nominal width or None)
QuantFn = Callable[[torch.Tensor], tuple[torch.Tensor, int, "int | None"]]


class Unsupported(Exception):
    """A peer or one of its settings cannot run here; the message says why."""


@dataclasses.dataclass
class PeerConfig:
    peer: str
    setting: str
    layout: str  # how the stored bits are counted
    quantise: QuantFn


def _tensor_bits(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() * 8


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _probe(config: PeerConfig, shape: tuple[int, int] = (128, 512)) -> None:
    """Quantise a small random tensor; raise Unsupported if the peer fails or is clearly broken."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02
    try:
        deq, bits, _ = config.quantise(w)
    except Unsupported:
        raise
    except Exception as err:  # any failure of a peer means "skip it"
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise Unsupported(f"{type(err).__name__}: {first_line}") from err
    rel = float((deq.float() - w).norm() / w.norm())
    if deq.shape != w.shape or not math.isfinite(rel) or rel > 0.8 or bits <= 0:
        raise Unsupported(f"probe gave shape {tuple(deq.shape)}, relative error {rel:.3f}, {bits} bits")


# ----------------------------------------------------------------------------------------- GGUF


def gguf_configs(types: list[str]) -> list[PeerConfig]:
    try:
        import gguf
        from gguf import quants
    except ImportError as err:
        raise Unsupported(f"gguf not importable ({err}); pip install gguf") from err

    def make(name: str) -> PeerConfig:
        qtype = gguf.GGMLQuantizationType[name]
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]

        def fn(w: torch.Tensor):
            x = w.detach().float().cpu().numpy()
            if x.shape[-1] % block:
                raise Unsupported(f"row length {x.shape[-1]} is not a multiple of the {name} block {block}")
            try:
                q = quants.quantize(x, qtype)
            except NotImplementedError as err:
                raise Unsupported(f"gguf {_version('gguf')} can de-quantise {name} but not quantise it "
                                  f"(gguf.quants.quantize raises NotImplementedError)") from err
            deq = quants.dequantize(q, qtype).reshape(x.shape)
            bits = q.nbytes * 8
            assert bits == x.size // block * block_bytes * 8, (name, bits, x.size)
            return torch.from_numpy(deq.astype("float32")), bits, None

        layout = f"{block_bytes} B per block of {block} ({8 * block_bytes / block:g} b/p)"
        return PeerConfig("gguf", name, layout, fn)

    return [make(t) for t in types]


# ------------------------------------------------------------------------------------------ HQQ


def hqq_configs(bits: list[int], group_size: int) -> list[PeerConfig]:
    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    except ImportError as err:
        raise Unsupported(f"hqq not importable ({err}); pip install hqq") from err

    def make(nbits: int) -> PeerConfig:
        quant_config = BaseQuantizeConfig(nbits=nbits, group_size=group_size)

        def fn(w: torch.Tensor):
            layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
            layer.weight.data = w.detach().float().clone()
            h = HQQLinear(layer, quant_config, compute_dtype=torch.float16, device="cpu", del_orig=True)
            deq = h.dequantize().float().reshape(w.shape)
            meta = h.meta
            bits = _tensor_bits(h.W_q) + _tensor_bits(meta["scale"]) + _tensor_bits(meta["zero"])
            return deq, bits, None

        layout = (f"packed {nbits}-bit W_q ({'3.2 b/code, 10 per int32' if nbits == 3 else 'uint8'}) "
                  f"+ fp16 scale + fp16 zero per {group_size}")
        return PeerConfig("hqq", f"{nbits}-bit g{group_size} (defaults, fp16 meta)", layout, fn)

    return [make(b) for b in bits]


# --------------------------------------------------------------------------------- bitsandbytes


def bnb_configs(blocksize: int) -> list[PeerConfig]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import bitsandbytes.functional as bnbf
        except Exception as err:  # a broken native library also means "skip"
            raise Unsupported(f"bitsandbytes not importable ({err}); pip install bitsandbytes") from err

    def make(quant_type: str, double: bool) -> PeerConfig:
        def fn(w: torch.Tensor):
            x = w.detach().float().contiguous()
            codes, state = bnbf.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                              compress_statistics=double)
            deq = bnbf.dequantize_4bit(codes, state).float().reshape(w.shape)
            bits = _tensor_bits(codes)
            for value in state.as_dict(packed=False).values():
                if torch.is_tensor(value):
                    bits += _tensor_bits(value)
            if double:
                bits += 32  # nested_offset, a python float serialised as fp32
            return deq, bits, None

        if double:
            layout = (f"4-bit codes + uint8 absmax per {blocksize} + fp32 absmax per 256 blocks "
                      "+ fp32 code tables (16 + 256) + fp32 offset")
        else:
            layout = f"4-bit codes + fp32 absmax per {blocksize} + fp32 16-entry code table"
        setting = f"{quant_type} b{blocksize}" + (" double-quant" if double else "")
        return PeerConfig("bitsandbytes", setting, layout, fn)

    return [make("nf4", False), make("nf4", True)]


# -------------------------------------------------------------------------------------- torchao


def torchao_configs(group_size: int) -> list[PeerConfig]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from torchao.quantization import Int4WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
            from torchao.quantization.granularity import PerGroup
        except Exception as err:
            raise Unsupported(f"torchao not importable ({err}); pip install torchao") from err

    def run(w: torch.Tensor, config):
        module = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False))
        module[0].weight.data = w.detach().float().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(module, config)
        return module[0].weight

    # the int4 weight-only path proper: report why it cannot run here, then use the CPU path
    try:
        run(torch.randn(64, 256), Int4WeightOnlyConfig(group_size=group_size))
        int4_note = "Int4WeightOnlyConfig ran on CPU but is not wired up here"
    except Exception as err:
        int4_note = f"Int4WeightOnlyConfig unavailable on CPU ({type(err).__name__}: {err})"
    print(f"torchao: {int4_note}; using IntxWeightOnlyConfig(int4, PerGroup({group_size}))", flush=True)

    def fn(w: torch.Tensor):
        t = run(w, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size),
                                        scale_dtype=torch.bfloat16))
        names, _ = t.__tensor_flatten__()
        stored = sum(_tensor_bits(getattr(t, n)) for n in names)
        packed = stored - _tensor_bits(t.qdata) + 4 * t.qdata.numel()
        return t.dequantize().float().reshape(w.shape), stored, packed

    layout = f"int8 per code (unpacked int4) + bf16 scale + int8 zero point per {group_size}"
    return [PeerConfig("torchao", f"int4 sym g{group_size} (Intx CPU path, bf16 scales)", layout, fn)]


# ------------------------------------------------------------------------------------- driver


def build_configs(args) -> tuple[list[PeerConfig], list[dict]]:
    """Configs that passed a probe on this machine, and the skipped ones with their reasons."""
    builders = {
        "gguf": lambda: gguf_configs(args.gguf_types),
        "hqq": lambda: hqq_configs(args.hqq_bits, args.hqq_group_size),
        "bitsandbytes": lambda: bnb_configs(args.bnb_blocksize),
        "torchao": lambda: torchao_configs(args.torchao_group_size),
    }
    configs, skipped = [], []
    for peer in args.peers:
        try:
            candidates = builders[peer]()
        except Unsupported as err:
            print(f"skip {peer}: {err}", flush=True)
            skipped.append({"peer": peer, "setting": "all", "reason": str(err)})
            continue
        for config in candidates:
            try:
                _probe(config)
            except Unsupported as err:
                print(f"skip {peer} {config.setting}: {err}", flush=True)
                skipped.append({"peer": peer, "setting": config.setting, "reason": str(err)})
                continue
            configs.append(config)
    return configs, skipped


def apply(model: nn.Module, original: dict[str, torch.Tensor], config: PeerConfig) -> dict:
    """Replace every quantised weight by the peer's de-quantisation; return bit and error totals."""
    params = linear_weights(model, skip=SKIP)
    stored = numel = 0
    packed: int | None = 0
    err2 = ref2 = exact = 0.0
    with torch.no_grad():
        for name, param in params.items():
            w = original[name]
            deq, bits, packed_bits = config.quantise(w)
            param.copy_(deq.to(param.dtype))
            stored += bits
            numel += w.numel()
            packed = None if packed is None or packed_bits is None else packed + packed_bits
            e2, r2 = float((deq.double() - w.double()).square().sum()), float(w.double().square().sum())
            err2, ref2 = err2 + e2, ref2 + r2
            if e2 <= EXACT_TOLERANCE**2 * r2:
                exact += w.numel()
    return {"bits": stored / numel, "packed_bits": None if packed is None else packed / numel,
            "quantised_params": numel, "weight_rel_rmse": math.sqrt(err2 / ref2), "exact_fraction": exact / numel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=128)
    parser.add_argument("--peers", nargs="+", default=["gguf", "hqq", "bitsandbytes", "torchao"],
                        choices=["gguf", "hqq", "bitsandbytes", "torchao"])
    parser.add_argument("--gguf-types", nargs="+", default=["Q5_0", "Q4_1", "Q4_0", "MXFP4", "Q3_K", "Q2_K"],
                        help="Q8_0 is a useful sanity check of the pipeline (KL ~ 0)")
    parser.add_argument("--hqq-bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--hqq-group-size", type=int, default=64)
    parser.add_argument("--bnb-blocksize", type=int, default=64)
    parser.add_argument("--torchao-group-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--resume", action="store_true",
                        help="keep the configs already in the output JSON (same protocol) and run the rest")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 avoids stalls on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    configs, skipped = build_configs(args)
    if not configs:
        sys.exit("no peer can run here")

    from hf_optquant.data.text import load_text

    model, tokenizer = load(args.model)
    original = {n: p.detach().clone() for n, p in linear_weights(model, skip=SKIP).items()}
    eval_ids = text_to_sequences(tokenizer, load_text("evaluation"), args.seq_len, args.eval_tokens)
    bos = tokenizer.bos_token_id is not None and bool((eval_ids[:, 0] == tokenizer.bos_token_id).all())
    start = time.perf_counter()
    reference = reference_outputs(model, eval_ids, k=args.top_k, progress=False)
    flattery = grid_flattery(model)
    print(f"reference: {reference.tokens} tokens, ppl {math.exp(reference.nll):.3f} "
          f"({time.perf_counter() - start:.0f}s); 4-bit/32 RTN relative RMS error {math.sqrt(flattery):.2%} "
          f"(relative MSE {flattery:.4%}, the number model_quality.py prints); "
          f"{sum(w.numel() for w in original.values()) / 1e6:.1f} M quantised params in {len(original)} tensors; "
          f"windows {'start with BOS' if bos else 'have no BOS'}",
          flush=True)

    versions = {p: _version(p) for p in ("torch", "transformers", "gguf", "hqq", "bitsandbytes", "torchao")}
    out = args.out / f"peers_{args.model}.json"
    header = {"model": args.model, "eval_tokens": reference.tokens, "seq_len": args.seq_len, "top_k": args.top_k,
              "bos_first": bos, "reference_ppl": math.exp(reference.nll)}
    rows = []
    if args.resume and out.is_file():
        previous = json.loads(out.read_text())
        if all(previous.get(k) == v for k, v in header.items() if k != "reference_ppl") and \
                math.isclose(previous["reference_ppl"], header["reference_ppl"], rel_tol=1e-4):
            rows = previous["rows"]
            print(f"resume: {len(rows)} configs already in {out}", flush=True)
        else:
            print(f"resume: {out} is from another protocol; starting afresh", flush=True)

    def save(complete: bool) -> None:
        out.write_text(json.dumps({
            **header, "date": datetime.date.today().isoformat(), "machine": platform.platform(),
            "complete": complete, "int4_b32_rtn_rel_mse": flattery, "int4_b32_rtn_rel_rmse": math.sqrt(flattery),
            "versions": versions, "rows": rows, "skipped": skipped}, indent=1))

    done = {(r["peer"], r["setting"]) for r in rows}
    for config in configs:
        if (config.peer, config.setting) in done:
            continue
        start = time.perf_counter()
        try:
            stats = apply(model, original, config)
        except Unsupported as err:
            print(f"skip {config.peer} {config.setting}: {err}", flush=True)
            skipped.append({"peer": config.peer, "setting": config.setting, "reason": str(err)})
            continue
        seconds = time.perf_counter() - start
        result = evaluate_against_reference(model, reference, progress=False)
        rows.append({"model": args.model, "peer": config.peer, "setting": config.setting, "layout": config.layout,
                     **stats, "kl": result.kl, "kl_stderr": result.kl_stderr, "ppl": result.perplexity,
                     "ref_ppl": result.reference_perplexity, "quantise_seconds": seconds,
                     "eval_seconds": time.perf_counter() - start - seconds})
        save(complete=False)
        r = rows[-1]
        packed = f" ({r['packed_bits']:.3f} if packed)" if r["packed_bits"] is not None else ""
        print(f"{r['peer']:12s} {r['setting']:38s} stored {r['bits']:.3f} b/p{packed}  KL {r['kl']:.4f}±"
              f"{r['kl_stderr']:.4f}  ppl {r['ppl']:.3f} (ref {r['ref_ppl']:.3f})  weight err "
              f"{r['weight_rel_rmse']:.2%}, exact {r['exact_fraction']:.0%}  [{seconds:.0f}s + "
              f"{r['eval_seconds']:.0f}s]", flush=True)
    with torch.no_grad():
        for n, p in linear_weights(model, skip=SKIP).items():
            p.copy_(original[n])

    packages = ", ".join(f"{k} {v}" for k, v in versions.items())
    print(f"\n# peer baselines: {args.model}, eval {reference.tokens} tokens (k={args.top_k}, seq_len "
          f"{args.seq_len}{', BOS first' if bos else ''}), {platform.machine()}, {packages}\n")
    print("| model | peer | setting | stored b/p | KL (nats/token) | ppl | Δppl | weight rel. RMSE | exact |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["peer"], -r["bits"])):
        bits = f"{r['bits']:.3f}" + (f" ({r['packed_bits']:.3f} packed)" if r["packed_bits"] is not None else "")
        print(f"| {r['model']} | {r['peer']} | {r['setting']} | {bits} | {r['kl']:.4f} ± {r['kl_stderr']:.4f} | "
              f"{r['ppl']:.3f} | {r['ppl'] - r['ref_ppl']:+.3f} | {r['weight_rel_rmse']:.2%} | "
              f"{r['exact_fraction']:.0%} |")
    for s in skipped:
        print(f"skipped: {s['peer']} {s['setting']}: {s['reason']}")
    save(complete=True)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
