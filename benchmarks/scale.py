"""Scale (issue #9): an 8B-shaped model quantised on one GPU in stages, bounded-memory streaming,
and a model split over two GPUs with accelerate's ``device_map="auto"``.

Weights are random and heavy-tailed (Student-t, df 5, rows scaled by a log-normal factor so
channel scales vary, tensor rms 0.02), drawn directly on the GPU in bf16 into a model built on
the meta device.  The tokenizer is a byte-level BPE trained here on the embedded calibration
text (8192 tokens, ids < vocab), so nothing comes from the Hub.

Modes
  single   (one GPU) A: Fisher (sampled, embedded text) -> allocation -> fit -> encode of the
           whole model resident on the GPU, each stage timed with its peak GPU / host memory;
           B: the same shapes streamed weight by weight (uniform allocation, linear weights
           generated on demand, never all resident), peak memory against one bf16 layer;
           C: the lossless coder in CPU worker processes vs in-process on the GPU (same run).
  split    (two GPUs) save a smaller random model, load it with
           ``from_pretrained(..., device_map="auto", max_memory=...)`` and an OptQuantConfig so the
           quantizer runs on the split model; compare its logits with the saved quantised
           checkpoint reloaded on one GPU, and the bytes with a quantisation on one GPU.
  local    a tiny config of mode ``single`` on the CPU (checks the script end to end).

Usage:  PYTHONUNBUFFERED=1 python benchmarks/scale.py --mode single --phases ABC --out $OUT
        PYTHONUNBUFFERED=1 python benchmarks/scale.py --mode split --out $OUT
        MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/scale.py --mode local --phases B --layers 8
(glibc keeps freed heap blocks, so without that variable host RSS also counts fragmentation.)
Writes ``scale_<mode>.json`` and prints a markdown table last.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import psutil
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's hf_optquant, installed or not

LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256}
SPLIT_MODEL = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8, "num_attention_heads": 16,
               "num_key_value_heads": 8, "vocab_size": 32000}
LOCAL_MODEL = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 4, "num_attention_heads": 16,
               "num_key_value_heads": 4, "vocab_size": 8192}
GIB = 1 << 30


# ---- model and tokenizer ---------------------------------------------------------------------
def llama_config(shape: dict, layers: int | None = None):
    from transformers import LlamaConfig

    kwargs = dict(shape, max_position_embeddings=2048, tie_word_embeddings=False, torch_dtype="bfloat16")
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    return LlamaConfig(**kwargs)


def build_tokenizer(vocab: int = 8192):
    """Byte-level BPE trained on the embedded calibration text (offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hf_optquant.data.text import load_text

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(load_text("calibration").split("\n\n"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


def _seed(name: str, base: int) -> int:
    return (zlib.crc32(name.encode()) + 1_000_003 * base) % (1 << 62)


@torch.no_grad()
def heavy_tailed(shape: tuple[int, ...], name: str, device, dtype=torch.bfloat16, seed: int = 0, df: float = 5.0,
                 rms: float = 0.02) -> torch.Tensor:
    """Student-t(df) / its std, rows scaled by exp(0.3 N(0,1)), whole tensor at ``rms``; made in row chunks."""
    g = torch.Generator(device=device).manual_seed(_seed(name, seed))
    out = torch.empty(shape, dtype=dtype, device=device)
    flat = out.reshape(-1, shape[-1])
    row_scale = torch.exp(0.3 * torch.randn(flat.shape[0], 1, generator=g, device=device))
    per = max(1, (1 << 22) // shape[-1])
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for a in range(0, flat.shape[0], per):
        b = min(flat.shape[0], a + per)
        z = torch.randn((b - a, shape[-1]), generator=g, device=device)
        chi = torch._standard_gamma(torch.full_like(z, df / 2), generator=g) * (2.0 / df)
        t = z / chi.sqrt() / (df / (df - 2)) ** 0.5 * row_scale[a:b]
        sq += t.double().square().sum()
        flat[a:b] = t.to(dtype)
    out.mul_(rms / float((sq / out.numel()).sqrt()))
    return out


def _is_streamed_linear(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and "lm_head" not in name


@torch.no_grad()
def materialise(model: nn.Module, device, seed: int, skip_linear: bool) -> None:
    """Allocate a meta-built model on ``device`` and fill it (linear weights stay on meta if ``skip_linear``)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    for name, module in model.named_modules():
        if skip_linear and _is_streamed_linear(name, module):
            continue
        module.to_empty(device=device, recurse=False)
        for pname, p in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if p.ndim == 1:
                p.fill_(1.0)  # RMSNorm gains
            else:
                p.copy_(heavy_tailed(tuple(p.shape), full, device, p.dtype, seed))
    with torch.device("cpu"):  # non-persistent buffers (inv_freq) were never loaded: rebuild them
        model.model.rotary_emb = LlamaRotaryEmbedding(model.config).to(device)


def weight_source(model: nn.Module, device, seed: int):
    """Linear weights generated on demand, identical to what ``materialise`` would have written."""
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if _is_streamed_linear(n, m)}

    def source(name: str) -> torch.Tensor:
        return heavy_tailed(shapes[name], f"{name}.weight", device, torch.bfloat16, seed)

    return source


def meta_model(shape: dict, layers: int | None):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(shape, layers)).to(torch.bfloat16)
    return model.eval()


# ---- measuring ---------------------------------------------------------------------------------
def host_rss() -> int:
    me = psutil.Process()
    return me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True))


class HostMemory:
    """Peak resident memory of this process plus its children (sampled every 0.2 s), and the level before."""

    def __init__(self):
        self.before = host_rss()
        self.peak_total = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                total = host_rss()
            except psutil.Error:
                total = 0
            self.peak_total = max(self.peak_total, total)
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def gpu_peak_reset(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak(device) -> float:
    if torch.device(device).type != "cuda":
        return 0.0
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / GIB


def gpu_now(device) -> float:
    return torch.cuda.memory_allocated(device) / GIB if torch.device(device).type == "cuda" else 0.0


def self_maxrss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


# ---- mode single -------------------------------------------------------------------------------
def run_resident(args, device, shape, tokenizer) -> dict:
    from hf_optquant.config import OptQuantConfig
    from hf_optquant.fisher import estimate_fisher, linear_weights
    from hf_optquant.quantize import calibration_sequences, quantize_model

    out: dict = {"phase": "A: resident, Fisher allocation", "device": str(device)}
    start = time.perf_counter()
    model = meta_model(shape, args.layers)
    materialise(model, device, args.seed, skip_linear=False)
    out["build_s"] = time.perf_counter() - start
    out["model_gib"] = gpu_now(device)
    params = linear_weights(model, skip=("lm_head",))
    out["quantised_params"] = sum(p.numel() for p in params.values())
    keep = {n: params[n].detach().cpu().clone() for n in list(params)[:2]}  # to check decoding afterwards
    config = OptQuantConfig(bits=args.bits, format="grid", allocation="fisher", calibration_tokens=args.tokens)
    seqs = calibration_sequences(tokenizer, config)
    out["fisher_tokens"] = int(seqs.shape[0] * (seqs.shape[1] - 1))
    out["fisher_sequences"] = f"{seqs.shape[0]} x {seqs.shape[1]}"

    gpu_peak_reset(device)
    mark = time.perf_counter()
    fisher = estimate_fisher(model, seqs, params, mode="sampled", seed=0, progress=False)
    out["fisher_s"] = time.perf_counter() - mark
    out["fisher_gpu_peak_gib"] = gpu_peak(device)
    del params

    gpu_peak_reset(device)
    with HostMemory() as host:
        encoded, report = quantize_model(model, config, fisher=fisher, apply="modules", progress=args.progress,
                                         workers=args.workers)
    out["quantise_gpu_peak_gib"] = gpu_peak(device)
    out["after_gpu_gib"] = gpu_now(device)
    out["host_before_gib"] = host.before / GIB
    out["host_peak_total_gib"] = host.peak_total / GIB
    out["host_self_maxrss_gib"] = self_maxrss_gib()
    out["host_child_maxrss_gib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / (1 << 20)
    out["timings"] = report.timings
    out["bits_per_param"] = report.bits_per_param
    out["model_bits_per_param"] = report.model_bits_per_param
    out["packed_gib"] = sum(e.nbits for e in encoded.values()) / 8 / GIB
    out["mean_relative_error"] = sum(t.relative_error * t.numel for t in report.tensors) / report.quantised_params
    out["target_bits_range"] = [min(t.target_bits for t in report.tensors), max(t.target_bits for t in report.tensors)]
    out["stage_sum_s"] = out["fisher_s"] + report.timings["allocation_s"] + report.timings["fit_encode_s"]
    checks = []
    for name, w in keep.items():  # decode on the CPU and re-measure the error the report claims
        enc = encoded[name]
        q = enc.format.decode(enc)
        err = float((w.double() - q.double()).square().sum() / w.double().square().sum())
        claimed = next(t.relative_error for t in report.tensors if t.name == name)
        checks.append({"name": name, "decoded_error": err, "reported_error": claimed})
    out["decode_checks"] = checks
    del model, encoded, fisher
    return out


def run_streamed(args, device, shape) -> dict:
    from hf_optquant.config import OptQuantConfig
    from hf_optquant.quantize import quantize_model

    layers = args.stream_layers
    out: dict = {"phase": f"B: streamed, uniform allocation, {layers} layers"}
    torch.cuda.empty_cache() if torch.device(device).type == "cuda" else None
    model = meta_model(shape, layers)
    materialise(model, device, args.seed, skip_linear=True)
    out["skeleton_gib"] = gpu_now(device)  # embeddings, lm_head, norms
    source = weight_source(model, device, args.seed)
    cfg = llama_config(shape, layers)
    q, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    layer_params = 2 * q * q + 2 * q * kv + 3 * q * cfg.intermediate_size
    out["one_layer_bf16_gib"] = 2 * layer_params / GIB
    out["largest_weight_bf16_gib"] = 2 * q * cfg.intermediate_size / GIB
    config = OptQuantConfig(bits=args.bits, format="grid", allocation="uniform")
    workers = args.workers if args.workers is not None else None
    gpu_peak_reset(device)
    with HostMemory() as host:
        encoded, report = quantize_model(model, config, apply="modules", progress=args.progress, workers=workers,
                                         weights=source, max_in_flight=args.stream_in_flight)
    out["gpu_peak_gib"] = gpu_peak(device)
    out["after_gpu_gib"] = gpu_now(device)
    out["packed_gib"] = sum(e.nbits for e in encoded.values()) / 8 / GIB
    out["gpu_working_set_gib"] = out["gpu_peak_gib"] - out["after_gpu_gib"]
    out["host_before_gib"] = host.before / GIB
    out["host_peak_total_gib"] = host.peak_total / GIB
    out["host_self_maxrss_gib"] = self_maxrss_gib()
    out["timings"] = report.timings
    out["bits_per_param"] = report.bits_per_param
    out["quantised_params"] = report.quantised_params
    out["max_in_flight"] = args.stream_in_flight
    out["live_cpu_tensors_gib"] = live_cpu_tensor_bytes() / GIB  # what is really still allocated
    out["host_after_gib"], out["host_after_malloc_trim_gib"] = host_rss() / GIB, trimmed_rss() / GIB
    return out


def live_cpu_tensor_bytes() -> int:
    """Bytes of distinct CPU tensor storages reachable by the garbage collector."""
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def trimmed_rss() -> int:
    """RSS after asking glibc to return freed heap memory (plain RSS where there is no glibc)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return host_rss()


def run_coder_on_device(args, device, shape) -> dict:
    """Same tensors, two ways to run the lossless coder: in worker processes on the CPU (the default)
    and in this process on the device that holds the codes (``workers=0``)."""
    from hf_optquant.config import OptQuantConfig
    from hf_optquant.quantize import default_workers, quantize_model

    layers = args.coder_layers
    model = meta_model(shape, layers)
    materialise(model, device, args.seed, skip_linear=False)
    config = OptQuantConfig(bits=args.bits, format="grid", allocation="uniform")
    out: dict = {"phase": f"C: where the coder runs, {layers} layers, uniform allocation"}
    runs = {}
    for label, workers in (("cpu_processes", args.workers), ("device_inline", 0)):
        start = time.perf_counter()
        encoded, report = quantize_model(model, config, apply="none", progress=False, workers=workers)
        runs[label] = {"wall_s": time.perf_counter() - start, "timings": report.timings,
                       "bits_per_param": report.bits_per_param}
        runs[label]["bytes"] = encoded
    a, b = runs["cpu_processes"].pop("bytes"), runs["device_inline"].pop("bytes")
    out["identical_bytes"] = all(_same(a[n], b[n]) for n in a)
    out["runs"] = runs
    out["workers"] = args.workers if args.workers is not None else default_workers(sum(
        m.weight.numel() for n, m in model.named_modules() if _is_streamed_linear(n, m)))
    out["device_over_cpu_speed"] = runs["cpu_processes"]["wall_s"] / runs["device_inline"]["wall_s"]
    return out


# ---- mode split ----------------------------------------------------------------------------------
def _logits(model, ids, device) -> torch.Tensor:
    from hf_optquant.nn import set_weight_cache

    set_weight_cache(model)
    with torch.no_grad():
        return model(input_ids=ids.to(device)).logits.float().cpu()


def run_split(args) -> dict:
    from transformers import AutoModelForCausalLM

    from hf_optquant.config import OptQuantConfig
    from hf_optquant.data.text import load_text
    from hf_optquant.eval import text_to_sequences
    from hf_optquant.nn import QuantLinear

    out: dict = {"gpus": torch.cuda.device_count()}
    tmp = Path(tempfile.mkdtemp(prefix="optquant_split_"))
    tokenizer = build_tokenizer()
    model = meta_model(SPLIT_MODEL, None)
    materialise(model, "cuda:0", args.seed, skip_linear=False)
    model.save_pretrained(tmp / "fp")
    tokenizer.save_pretrained(tmp / "fp")
    out["model_params"] = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    config = OptQuantConfig(bits=args.bits, format="grid", allocation="fisher", calibration_tokens=args.tokens)
    max_memory = {0: args.gpu0_memory, 1: "40GiB", "cpu": "64GiB"}
    start = time.perf_counter()
    split = AutoModelForCausalLM.from_pretrained(tmp / "fp", quantization_config=config, device_map="auto",
                                                 max_memory=max_memory, dtype=torch.bfloat16)
    out["split_load_quantise_s"] = time.perf_counter() - start
    out["device_map_devices"] = sorted({str(v) for v in split.hf_device_map.values()})
    out["quant_linear_devices"] = sorted({str(next(iter(m.encoded_tensors().values())).device)
                                          for m in split.modules() if isinstance(m, QuantLinear)})
    out["split_timings"] = split.optquant_report.timings
    out["split_bits_per_param"] = split.optquant_report.bits_per_param
    ids = text_to_sequences(tokenizer, load_text("evaluation"), 128, 4 * 128)
    first = next(split.parameters()).device
    logits_split = _logits(split, ids, first)
    split.save_pretrained(tmp / "q")
    split_bytes = {n: m.encoded for n, m in split.named_modules() if isinstance(m, QuantLinear)}
    del split
    torch.cuda.empty_cache()

    single = AutoModelForCausalLM.from_pretrained(tmp / "q", device_map={"": 0}, dtype=torch.bfloat16)
    logits_single = _logits(single, ids, "cuda:0")
    out["reloaded_one_gpu_max_abs_logit_diff"] = float((logits_split - logits_single).abs().max())
    out["reloaded_one_gpu_logits_identical"] = bool(torch.equal(logits_split, logits_single))
    out["logit_scale"] = float(logits_single.abs().mean())
    del single
    torch.cuda.empty_cache()

    start = time.perf_counter()  # the same checkpoint quantised on one GPU: are the bytes the same?
    one = AutoModelForCausalLM.from_pretrained(tmp / "fp", quantization_config=config, device_map={"": 0},
                                               dtype=torch.bfloat16)
    out["one_gpu_load_quantise_s"] = time.perf_counter() - start
    one_bytes = {n: m.encoded for n, m in one.named_modules() if isinstance(m, QuantLinear)}
    same = [n for n in split_bytes if n in one_bytes and _same(split_bytes[n], one_bytes[n])]
    out["tensors"] = len(split_bytes)
    out["tensors_byte_identical_to_one_gpu_quantisation"] = len(same)
    logits_one = _logits(one, ids, "cuda:0")
    out["one_gpu_quantised_max_abs_logit_diff"] = float((logits_split - logits_one).abs().max())
    return out


def _same(a, b) -> bool:
    return a.format == b.format and list(a.tensors) == list(b.tensors) and all(
        torch.equal(a.tensors[k].cpu(), b.tensors[k].cpu()) for k in a.tensors)


# ---- report --------------------------------------------------------------------------------------
def table_single(res: dict) -> str:
    a, b = res.get("resident"), res.get("streamed")
    rows = [] if a is None else table_resident(a)
    if b:
        rows += ["", f"B ({b['phase']}): {b['timings']['total_s']:.1f} s, {b['bits_per_param']:.4f} b/p, "
                 f"{b['quantised_params'] / 1e6:.0f}M params; GPU peak {b['gpu_peak_gib']:.2f} GiB = after "
                 f"{b['after_gpu_gib']:.2f} (skeleton {b['skeleton_gib']:.2f} + packed {b['packed_gib']:.3f}) + "
                 f"working set {b['gpu_working_set_gib']:.2f} GiB; one bf16 layer {b['one_layer_bf16_gib']:.3f} GiB, "
                 f"largest weight {b['largest_weight_bf16_gib']:.3f} GiB; host memory {b['host_before_gib']:.2f} "
                 f"GiB before, peak {b['host_peak_total_gib']:.2f} GiB, after {b['host_after_gib']:.2f} GiB "
                 f"({b['host_after_malloc_trim_gib']:.2f} after malloc_trim; live CPU tensors "
                 f"{b['live_cpu_tensors_gib']:.3f} GiB)"]
    c = res.get("coder")
    if c:
        cpu, dev = c["runs"]["cpu_processes"], c["runs"]["device_inline"]
        rows += ["", f"C ({c['phase']}): coder in {c['workers']} CPU processes {cpu['wall_s']:.1f} s, in this process "
                 f"on the device {dev['wall_s']:.1f} s (speed ratio device/CPU {c['device_over_cpu_speed']:.2f}x); "
                 f"identical bytes: {c['identical_bytes']}"]
    return "\n".join(rows)


def table_resident(a: dict) -> list[str]:
    t = a["timings"]
    return [
        "| stage | wall s | GPU peak GiB | notes |",
        "|---|---:|---:|---|",
        f"| build model on {a['device']} (not counted) | {a['build_s']:.1f} | {a['model_gib']:.1f} | "
        f"{a['quantised_params'] / 1e9:.2f}B quantised params, bf16 |",
        f"| Fisher (sampled) | {a['fisher_s']:.1f} | {a['fisher_gpu_peak_gib']:.1f} | "
        f"{a['fisher_tokens']} tokens ({a['fisher_sequences']}) |",
        f"| allocation | {t['allocation_s']:.2f} | | "
        f"bits {a['target_bits_range'][0]:.2f}..{a['target_bits_range'][1]:.2f} |",
        f"| fit (main thread, on {a['device']}) | {t['fit_s']:.1f} | {a['quantise_gpu_peak_gib']:.1f} | "
        f"{int(t['retries'])} retries |",
        f"| encode ({int(t['workers'])} worker processes; 0: inline) | {t['encode_wait_s']:.1f} waited | | "
        f"{t['encode_cpu_s']:.0f} CPU s |",
        f"| **fit + encode** | **{t['fit_encode_s']:.1f}** | | apply={t['apply_s']:.1f} s |",
        f"| **Fisher + allocation + fit + encode** | **{a['stage_sum_s']:.1f}** | | |",
        "",
        f"A: {a['bits_per_param']:.4f} b/p over quantised tensors ({a['model_bits_per_param']:.3f} whole model), "
        f"packed {a['packed_gib']:.3f} GiB, mean relative error {a['mean_relative_error']:.5f}; host memory "
        f"{a['host_before_gib']:.2f} GiB before quantize_model, peak {a['host_peak_total_gib']:.2f} GiB (this process "
        f"+ encoders); GPU after {a['after_gpu_gib']:.2f} GiB",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("single", "split", "local"), default="single")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers (phase A)")
    parser.add_argument("--phases", default="AB",
                        help="single/local: any of A (resident, Fisher), B (streamed), C (where the coder runs)")
    parser.add_argument("--coder-layers", type=int, default=2, help="layers in phase C")
    parser.add_argument("--stream-layers", type=int, default=8, help="layers in phase B")
    parser.add_argument("--stream-in-flight", type=int, default=None, help="phase B max_in_flight")
    parser.add_argument("--bits", type=float, default=3.5)
    parser.add_argument("--tokens", type=int, default=8192, help="Fisher calibration tokens")
    parser.add_argument("--workers", type=int, default=None, help="encoder processes (default: automatic)")
    parser.add_argument("--gpu0-memory", default="300MiB", help="split mode: max_memory for GPU 0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in this process")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
           "cpu_cores": len(os.sched_getaffinity(0)), "host_memory_gib": psutil.virtual_memory().total / GIB,
           "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    print(json.dumps(env), flush=True)
    if args.mode == "split":
        res = {"env": env, "split": run_split(args)}
        print(json.dumps(res["split"], indent=1), flush=True)
    else:
        device = "cuda" if args.mode == "single" else "cpu"
        shape = LLAMA_8B if args.mode == "single" else LOCAL_MODEL
        if args.mode == "local" and args.stream_layers:
            args.stream_layers = args.layers or shape["num_hidden_layers"]
        res = {"env": env}
        if "A" in args.phases:
            res["resident"] = run_resident(args, device, shape, build_tokenizer())
            print(json.dumps(res["resident"], indent=1), flush=True)
        if "B" in args.phases:
            res["streamed"] = run_streamed(args, device, shape)
            print(json.dumps(res["streamed"], indent=1), flush=True)
        if "C" in args.phases:
            res["coder"] = run_coder_on_device(args, device, shape)
            print(json.dumps(res["coder"], indent=1), flush=True)
        print(table_single(res), flush=True)
    (args.out / f"scale_{args.mode}_{args.phases if args.mode != 'split' else ''}.json".replace("_.", ".")).write_text(
        json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
