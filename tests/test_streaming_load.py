"""Quantise-while-loading: ``from_pretrained(..., quantization_config=...)`` without Fisher information.

The reference is the whole-model path (load everything, then ``quantize_model``), forced with the
module-level switch ``hf_optquant.quantizer.STREAM_WHEN_POSSIBLE = False``.  Streaming must give the
same checkpoint, byte for byte, the same logits and the same report, on Llama (nn.Linear), GPT-2
(Conv1D, stored [in, out]) and Qwen2 (biases, tied embeddings), for fixed-length (int, NF4), sparse and
entropy-coded (grid) formats; Fisher configurations must still take the whole-model path; and a
subprocess shows that the full-precision model is never held.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny_models import VOCAB, byte_tokenizer, tiny_gpt2, tiny_llama, tiny_qwen2

import hf_optquant  # noqa: F401  (registers "optquant" with transformers)
from hf_optquant import quantize as quantize_module
from hf_optquant import quantizer as quantizer_module
from hf_optquant.config import OptQuantConfig
from hf_optquant.nn import QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
# architecture -> (factory, sizes); "-small" variants (one layer) for the entropy coder, whose CPU
# encoder costs ~0.5 s per tensor here (so the grid cases also keep the MLPs unquantised)
FACTORIES = {"llama": (tiny_llama, {}), "gpt2": (tiny_gpt2, {}), "qwen2": (tiny_qwen2, {}),
             "llama-small": (tiny_llama, dict(layers=1)),
             "gpt2-small": (tiny_gpt2, dict(layers=1))}
LINEARS = {"llama": 14, "gpt2": 8, "qwen2": 14, "llama-small": 4, "gpt2-small": 2}
SKIP_MLP = ["lm_head", "mlp"]

# case -> (architecture, OptQuantConfig kwargs); every one uniform allocation, unweighted fit
CASES = {
    "llama-nf4": ("llama", dict(bits=4.25, format="nf4")),
    "llama-int-sparse": ("llama", dict(bits=4.5, format="int", sparse_fraction=0.01)),
    "llama-grid": ("llama-small", dict(bits=3.5, format="grid", modules_to_not_convert=SKIP_MLP)),
    "gpt2-grid-sparse": ("gpt2-small", dict(bits=3.5, format="grid", sparse_fraction=0.01,
                                            modules_to_not_convert=SKIP_MLP)),
    "gpt2-nf4": ("gpt2", dict(bits=4.25, format="nf4")),
    "qwen2-int": ("qwen2", dict(bits=4.0, format="int", modules_to_not_convert=[])),
}




@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """architecture -> full-precision checkpoint directory (float32, random init, seed 0)."""
    made = {}

    def get(arch: str) -> str:
        if arch not in made:
            torch.manual_seed(0)
            path = str(tmp_path_factory.mktemp(f"{arch}-fp"))
            factory, sizes = FACTORIES[arch]
            factory(**sizes).save_pretrained(path)
            byte_tokenizer().save_pretrained(path)
            made[arch] = path
        return made[arch]

    return get


def _load(path: str, stream: bool, monkeypatch, **kwargs):
    monkeypatch.setattr(quantizer_module, "STREAM_WHEN_POSSIBLE", stream)
    config = OptQuantConfig(**{"allocation": "uniform", **kwargs})
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _forbid(monkeypatch, *names: str) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("this path must not run here")

    for name in names:
        monkeypatch.setattr(quantize_module, name, forbidden)


def _safetensors_contents(path: Path):
    """(metadata dict, header entries in file order, data bytes).  The safetensors library writes
    ``__metadata__`` from a hash map, so the order of its keys changes from one save to the next even
    for one model; every metadata string, each tensor's entry (name, dtype, shape, offsets, in order)
    and every data byte must be identical."""
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    metadata = header.pop("__metadata__")
    return metadata, list(header.items()), raw[8 + size:]


def _saved(model, path: Path):
    model.save_pretrained(str(path))
    return _safetensors_contents(path / "model.safetensors"), json.loads((path / "config.json").read_text())


def _same_report(streamed, whole) -> None:
    a, b = streamed.optquant_report, whole.optquant_report
    assert a.tensors == b.tensors  # names in module order, bits, errors, rms, fitted formats
    assert (a.other_bits, a.other_params, a.fisher, a.config) == (b.other_bits, b.other_params, b.fisher, b.config)
    assert streamed.config.quantization_config.to_dict() == whole.config.quantization_config.to_dict()


# ---- the streamed checkpoint is the whole-model path's ----------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_streamed_checkpoint_is_byte_identical_to_the_whole_model_path(case, checkpoints, tmp_path, monkeypatch):
    arch, kwargs = CASES[case]
    whole = _load(checkpoints(arch), False, monkeypatch, **kwargs)
    assert "streamed" not in whole.optquant_report.timings
    with monkeypatch.context() as patch:
        _forbid(patch, "quantize_model")  # streaming never assembles and quantises the whole model
        streamed = _load(checkpoints(arch), True, monkeypatch, **kwargs)
    report = streamed.optquant_report
    quantised = [n for n, m in streamed.named_modules() if isinstance(m, QuantLinear)]
    assert report.timings["streamed"] == len(report.tensors) == len(quantised) == LINEARS[arch]
    assert [t.name for t in report.tensors] == quantised
    _same_report(streamed, whole)
    assert torch.equal(_logits(streamed), _logits(whole))

    streamed_files, streamed_config = _saved(streamed, tmp_path / "streamed")
    whole_files, whole_config = _saved(whole, tmp_path / "whole")
    assert streamed_config == whole_config
    assert streamed_files[0] == whole_files[0]  # metadata strings: per-tensor formats, CRC32s, shapes
    assert streamed_files[1] == whole_files[1]  # tensor names, dtypes, shapes, offsets, in order
    assert streamed_files[2] == whole_files[2]  # every byte of every tensor

    _forbid(monkeypatch, "quantize_model", "quantize_tensor")  # a saved checkpoint reloads as it is
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "streamed"))
    assert torch.equal(_logits(reloaded), _logits(whole))


def test_weights_the_loader_does_not_hand_over_are_quantised_after_loading(checkpoints, tmp_path, monkeypatch):
    """The fallback for a loader that never calls the quantise op (another transformers loading path):
    the weights load in full precision and are quantised once loading is done, with the same result."""
    kwargs = CASES["gpt2-nf4"][1]
    whole = _load(checkpoints("gpt2"), False, monkeypatch, **kwargs)
    monkeypatch.setattr(quantizer_module.OptQuantHfQuantizer, "param_needs_quantization", lambda *a, **k: False)
    late = _load(checkpoints("gpt2"), True, monkeypatch, **kwargs)
    assert late.optquant_report.timings["streamed"] == 0 and len(late.optquant_report.tensors) == 8
    _same_report(late, whole)
    assert _saved(late, tmp_path / "late")[0][2] == _saved(whole, tmp_path / "whole")[0][2]


def test_without_the_quantise_on_load_protocol_the_whole_model_path_runs(checkpoints, monkeypatch):
    calls = []
    real = quantize_module.quantize_model
    monkeypatch.setattr(quantize_module, "quantize_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(quantizer_module, "STREAMING_SUPPORTED", False)
    model = _load(checkpoints("llama"), True, monkeypatch, bits=4.25, format="nf4")
    assert calls == [1] and "streamed" not in model.optquant_report.timings


def test_skipped_conv1d_layers_keep_their_layout_and_the_checkpoint_reloads(checkpoints, tmp_path, monkeypatch):
    """GPT-2 with its MLPs in modules_to_not_convert: both paths leave them Conv1D (the whole-model
    path used to turn them into nn.Linear, and the saved [out, in] weights did not reload)."""
    for stream in (False, True):
        model = _load(checkpoints("gpt2-small"), stream, monkeypatch, bits=4.25, format="nf4",
                      modules_to_not_convert=SKIP_MLP)
        assert type(model.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
        model.save_pretrained(str(tmp_path / str(stream)))
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / str(stream)))
        assert torch.equal(_logits(reloaded), _logits(model))


# ---- Fisher configurations keep the whole-model path ------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(allocation="fisher"), dict(allocation="uniform", weighted_fit=True)],
                         ids=["fisher-allocation", "weighted-fit"])
def test_fisher_configs_quantise_the_whole_loaded_model(kwargs, checkpoints, monkeypatch):
    calls = {"quantize_model": 0, "quantize_tensor": 0}
    for name in calls:
        real = getattr(quantize_module, name)

        def spy(*args, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*args, **kw)
        monkeypatch.setattr(quantize_module, name, spy)
    needs = []
    real_needs = quantizer_module.OptQuantHfQuantizer.param_needs_quantization
    monkeypatch.setattr(quantizer_module.OptQuantHfQuantizer, "param_needs_quantization",
                        lambda self, *a, **k: needs.append(real_needs(self, *a, **k)) or needs[-1])
    model = _load(checkpoints("llama"), True, monkeypatch, bits=4.5, format="int", calibration_tokens=64,
                  calibration_seq_len=32, **kwargs)
    assert calls == {"quantize_model": 1, "quantize_tensor": 0}
    assert needs and not any(needs)  # asked about every weight, quantised none while loading
    timings = model.optquant_report.timings
    assert "streamed" not in timings and timings["fisher_s"] > 0
    assert model.optquant_report.fisher is not None


# ---- bad input -------------------------------------------------------------------------------
def test_a_nan_weight_is_a_value_error_naming_it(checkpoints, tmp_path, monkeypatch):
    source = Path(checkpoints("llama"))
    tensors = load_file(str(source / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj contains NaN or Inf"):
        _load(str(tmp_path), True, monkeypatch, bits=4.25, format="nf4")


# ---- memory: the full-precision model is never held -------------------------------------------
MEMORY_CHILD = r"""
import json, re, sys
import torch, transformers
import hf_optquant
from hf_optquant import quantizer
from hf_optquant.config import OptQuantConfig

def status(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1))

torch.set_num_threads(1)
quantizer.STREAM_WHEN_POSSIBLE = sys.argv[2] == "1"
with open("/proc/self/clear_refs", "w") as f:  # peak RSS := current RSS (Linux >= 4.0)
    f.write("5")
before = status("VmRSS")
model = transformers.AutoModelForCausalLM.from_pretrained(
    sys.argv[1], dtype=torch.float32, quantization_config=OptQuantConfig(bits=4.25, format="nf4", allocation="uniform"))
print(json.dumps({"before_kib": before, "peak_kib": status("VmHWM"),
                  "streamed": model.optquant_report.timings.get("streamed")}))
"""
WIDE = dict(layers=8, hidden=512, intermediate=2048)  # 33.8M parameters: 65 MiB in bf16, 129 MiB in float32


def _wide_checkpoint(path: Path) -> int:
    """A bf16 Llama with 8 wide layers (1M-element projections), written directly (no slow init)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=WIDE["hidden"], intermediate_size=WIDE["intermediate"],
        num_hidden_layers=WIDE["layers"], num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64,
        tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tensors = {k: (torch.ones(s) if k.endswith("norm.weight") else torch.randn(s, generator=generator) * 0.02)
               .to(torch.bfloat16) for k, s in shapes.items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(path))
    return sum(t.numel() for t in tensors.values())


def _peak_mib(path: Path, stream: bool) -> float:
    """Peak RSS of the child above its RSS after imports, MiB."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(path), "1" if stream else "0"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["streamed"] == (7 * WIDE["layers"] if stream else None)
    return (result["peak_kib"] - result["before_kib"]) / 1024


def test_streaming_peak_memory_stays_below_the_full_precision_model(tmp_path):
    """Peak RSS of from_pretrained in a fresh process, above the RSS after imports.

    The peak is VmHWM, reset after the imports (``/proc/self/clear_refs``): ``ru_maxrss`` would not do
    in a child of pytest, as Linux starts it at the high-water mark of the forked pytest process.

    A bf16 checkpoint loaded with dtype=float32, so that the loader makes a copy of each weight: the
    whole-model path holds the float32 model (129 MiB) before quantising; streaming holds one 4 MiB
    weight with its fit's work arrays (~50 MiB for NF4 on 1M values) and the packed model (18 MiB).
    Both also count the checkpoint's memory-mapped pages (64 MiB, touched as tensors are read).  (A
    checkpoint already in the load dtype is memory-mapped without a copy on CPU, so there neither path
    holds a private full-precision copy.)  Measured here, three runs: whole-model +208..209 MiB,
    streaming +141..148 MiB, a gap of 61..68 MiB.  The margin, a third of the float32 model (43 MiB),
    fails if streaming held the model (gap ~0) and leaves room for noise (a few MiB between runs).
    glibc's mmap threshold is pinned at 1 MiB in the children so that freed weights go back to the
    system (its default dynamic threshold keeps them in the heap)."""
    params = _wide_checkpoint(tmp_path)
    model_mib = params * 4 / 2**20
    streamed, whole = _peak_mib(tmp_path, True), _peak_mib(tmp_path, False)
    assert whole > model_mib, f"the whole-model path should hold the float32 model: +{whole:.0f} MiB"
    assert streamed < whole - model_mib / 3, f"streaming +{streamed:.0f} MiB vs whole-model +{whole:.0f} MiB"
