"""Reliability: edge-case weights, the NaN/Inf policy, scale ranges, checkpoint versioning and
checksums, loading without executing code, and deterministic checkpoints.

Policy for non-finite weights (also in the README of the package docs):
    quantising a tensor holding NaN or Inf is a ValueError (naming the row/column, and the
    tensor when it goes through ``quantize_model``); such a module can be kept in full
    precision with ``modules_to_not_convert``.  Decoding never returns NaN/Inf: corrupt
    scales/tables/outliers are a ValueError.

Edge cases that must work for every format family (int, fp, nf4, sf4, cube_root, lloyd_max,
grid): all-zero tensors and blocks, constant tensors, tiny (1e-30) and huge (1e30)
magnitudes, and shapes not divisible by the block size.  References are independent
(float64 block quantisation written here) or exact (power-of-two scale equivariance).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hf_optquant  # noqa: F401  (registers "optquant" with transformers)
from hf_optquant.config import OptQuantConfig
from hf_optquant.formats import (
    CubeRootElement,
    FPElement,
    GridElement,
    IntElement,
    LloydMaxElement,
    LookupElement,
    Rotation,
    Scaling,
    SparseOutliers,
    TensorFormat,
    spec_from_dict,
)
from hf_optquant.formats.fit import fit_format
from hf_optquant.nn import QuantLinear
from hf_optquant.quantize import quantize_model
from hf_optquant.serialization import (
    FORMAT_VERSION,
    METADATA_KEY,
    canonicalise_checkpoint,
    metadata_crc32,
    parse_metadata,
    seal_metadata,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = int(os.environ.get("HF_OPTQUANT_TEST_SEED", "0"))
VOCAB = 256




def _gen(offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(SEED * 1000 + offset)


# one representative element per family, with the family's default scaling
FAMILY_FORMATS = {
    "int": TensorFormat(IntElement(4), Scaling("block", 64, "absmax")),
    "fp": TensorFormat(FPElement(2, 1), Scaling("block", 64, "absmax")),
    "nf4": TensorFormat(LookupElement("nf4"), Scaling("block", 64, "absmax")),
    "sf4": TensorFormat(LookupElement("sf4"), Scaling("block", 64, "absmax")),
    "cube_root": TensorFormat(CubeRootElement("student_t", 4, 5.0), Scaling("block", 64, "signmax")),
    "lloyd_max": TensorFormat(LloydMaxElement(4), Scaling("channel", 1, "rms")),
    "grid": TensorFormat(GridElement(0.3), Scaling("channel", 1, "rms")),
}
# the composite pieces on top: fp8 scales with an outer scale, sparse outliers, rotation, e8m0
EXTRA_FORMATS = {
    "int-fp8-sparse-rot": TensorFormat(IntElement(math.log2(11)), Scaling("block", 32, "absmax", "fp8_e4m3"),
                                       SparseOutliers(0.01), Rotation(32, seed=3)),
    "grid-block-e8m0": TensorFormat(GridElement(0.25), Scaling("block", 48, "rms", "e8m0")),
}
ALL_FORMATS = {**FAMILY_FORMATS, **EXTRA_FORMATS}


def _rel_error(w: torch.Tensor, q: torch.Tensor) -> float:
    ref = float(w.double().square().sum())
    return float((w.double() - q.double()).square().sum()) / ref


def _round_trip(fmt: TensorFormat, w: torch.Tensor) -> torch.Tensor:
    """encode -> decode, checking the invariants every format promises."""
    encoded = fmt.encode(w)
    decoded = fmt.decode(encoded)
    assert decoded.shape == w.shape and decoded.dtype == w.dtype
    assert torch.equal(decoded, fmt.quantise(w)), "decode(encode(w)) must equal quantise(w)"
    assert encoded.nbits == fmt.count_bits(w)
    assert bool(torch.isfinite(decoded).all())
    return decoded


# ---- edge-case weights, every family --------------------------------------------------------
@pytest.mark.parametrize("name", list(ALL_FORMATS))
def test_all_zero_tensor_decodes_to_exact_zeros(name):
    w = torch.zeros(24, 100)
    assert torch.equal(_round_trip(ALL_FORMATS[name], w), w)


@pytest.mark.parametrize("name", list(ALL_FORMATS))
@pytest.mark.parametrize("value", [0.37, -2.5e-3])
def test_constant_tensor_is_reproduced_closely(name, value):
    w = torch.full((16, 96), value)
    q = _round_trip(ALL_FORMATS[name], w)
    # every row/block shares one value, which the scale maps onto a table level or grid point
    # (up to rounding of the scale to its storage format: bf16 has 8 significant bits, and the
    # grid / fp8 / e8m0 scale paths land within a step of the level)
    assert _rel_error(w, q) < (0.03 if "grid" in name or "fp8" in name else 2.0**-14)
    assert bool((torch.sign(q) == math.copysign(1.0, value)).all())


@pytest.mark.parametrize("name", list(ALL_FORMATS))
def test_zero_blocks_and_rows_decode_to_zero_and_leave_the_rest_alone(name):
    fmt = ALL_FORMATS[name]
    w = torch.randn(12, 200, generator=_gen(1))
    w[3] = 0  # a dead row
    w[5:8, 64:128] = 0  # whole blocks (block size 64) in three rows
    q = _round_trip(fmt, w)
    assert torch.equal(q[3], torch.zeros(200))
    if fmt.scaling.granularity == "block" and 64 % fmt.scaling.block_size == 0:  # the zeros fill whole blocks
        assert torch.equal(q[5:8, 64:128], torch.zeros(3, 64))
    nonzero = w.abs().sum(1) > 0
    assert _rel_error(w[nonzero], q[nonzero]) < 0.1


@pytest.mark.parametrize("name", list(ALL_FORMATS))
@pytest.mark.parametrize("exponent", [-100, 100])
def test_tiny_and_huge_magnitudes_scale_exactly(name, exponent):
    """Scaling w by 2**k (k = +-100, i.e. ~1e-30 and ~1e30) scales every stored scale by 2**k and
    changes nothing else, so the quantised tensor must be exactly 2**k times the unit-scale one."""
    fmt = ALL_FORMATS[name]
    w = torch.randn(16, 128, generator=_gen(2)) * 0.02
    base = _round_trip(fmt, w)
    scaled = _round_trip(fmt, w * 2.0**exponent)
    assert torch.equal(scaled, base * 2.0**exponent)


@pytest.mark.parametrize("name", list(FAMILY_FORMATS))
@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
def test_decimal_tiny_and_huge_magnitudes_keep_their_relative_error(name, magnitude):
    fmt = FAMILY_FORMATS[name]
    w = torch.randn(16, 128, generator=_gen(3))
    unit = _rel_error(w, _round_trip(fmt, w))
    scaled = w * magnitude
    error = _rel_error(scaled, _round_trip(fmt, scaled))
    assert 0 < error < 1.3 * unit + 1e-4  # only the scale's bf16 rounding differs


def _int4_scale(part: torch.Tensor) -> torch.Tensor:
    return (part.abs().amax(1, keepdim=True).float() * (1.0 / 7)).to(torch.bfloat16).double()


def _reference_int4_block_absmax(w: torch.Tensor, block: int) -> torch.Tensor:
    """Independent float64 reference: signed int4 (-8..7), absmax over 1 x ``block`` groups along
    the last dim (the last group of a row may be short), scale = absmax * float32(1/7) rounded to bf16."""
    rows = w.reshape(-1, w.shape[-1]).double()
    out = torch.empty_like(rows)
    for start in range(0, rows.shape[1], block):
        part = rows[:, start:start + block]
        scale = _int4_scale(part)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        out[:, start:start + block] = torch.clamp(torch.round(part / safe), -8, 7) * scale
    return out.reshape(w.shape)


@pytest.mark.parametrize("shape", [(7, 33), (5, 100), (3, 1), (1, 1), (2, 3, 70), (9, 129)])
def test_shapes_not_divisible_by_the_block_match_a_float64_reference(shape):
    fmt = TensorFormat(IntElement(4), Scaling("block", 64, "absmax"))
    w = torch.randn(*shape, generator=_gen(4))
    q = _round_trip(fmt, w)
    ref = _reference_int4_block_absmax(w, 64)
    diff = (q.double() - ref).abs()
    # the library divides in float32: disagreements may only occur at rounding ties
    rows = w.reshape(-1, shape[-1]).double()
    scale = torch.cat([_int4_scale(rows[:, s:s + 64]).expand(-1, rows[:, s:s + 64].shape[1])
                       for s in range(0, shape[-1], 64)], 1)
    frac = (rows / scale).remainder(1.0).reshape(shape)
    tie = (frac - 0.5).abs() < 1e-4
    assert bool((diff[~tie] < 1e-12).all())


@pytest.mark.parametrize("name", list(ALL_FORMATS))
@pytest.mark.parametrize("shape", [(7, 33), (3, 1), (2, 3, 70)])
def test_every_format_handles_awkward_shapes(name, shape):
    w = torch.randn(*shape, generator=_gen(5))
    q = _round_trip(ALL_FORMATS[name], w)
    assert _rel_error(w, q) < 0.35  # tiny tensors: few values per scale, but nothing degenerate


FIT_CASES = {
    "zero": lambda: torch.zeros(32, 128),
    "constant": lambda: torch.full((32, 128), -0.05),
    "tiny": lambda: torch.randn(32, 128, generator=_gen(6)) * 1e-30,
    "huge": lambda: torch.randn(32, 128, generator=_gen(7)) * 1e30,
    "ragged": lambda: torch.randn(48, 100, generator=_gen(8)) * 0.02,
}


@pytest.mark.parametrize("family", list(FAMILY_FORMATS))
@pytest.mark.parametrize("case", list(FIT_CASES))
def test_fit_format_handles_edge_cases_for_every_family(family, case):
    w = FIT_CASES[case]()
    result = fit_format(w, family, 4.5)
    decoded = result.format.decode(result.encoded)
    assert bool(torch.isfinite(decoded).all()) and decoded.shape == w.shape
    assert result.bits_per_element <= 4.5 + 1e-9 and math.isfinite(result.error)
    if case in ("zero",):
        assert torch.equal(decoded, w)
    elif case == "constant":
        assert result.error < 1e-3
    else:
        assert result.error < 0.05  # ~4.3 b/p on Gaussian data: about 1 % for every family


@pytest.mark.parametrize("seed", [0, 1, 6])  # seeds that made session 1's grid step correction give up
def test_grid_fit_with_half_the_rows_zero(seed):
    w = torch.cat([torch.zeros(8, 100), torch.randn(8, 100, generator=torch.Generator().manual_seed(seed))])
    result = fit_format(w, "grid", 4.5)
    decoded = result.format.decode(result.encoded)
    assert result.bits_per_element <= 4.5 and torch.equal(decoded[:8], torch.zeros(8, 100))
    assert result.error < 0.01


# ---- NaN / Inf and scale ranges ---------------------------------------------------------------
@pytest.mark.parametrize("name", list(ALL_FORMATS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_with_their_position(name, bad):
    w = torch.randn(6, 70, generator=_gen(9))
    w[4, 33] = bad
    with pytest.raises(ValueError, match=r"NaN/Inf.*\(4, 33\)"):
        ALL_FORMATS[name].encode(w)


def _tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False))
    with torch.no_grad():  # non-trivial norms, so a re-initialised norm differs from the saved one
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("allocation", ["uniform", "fisher"])
def test_quantize_model_names_the_tensor_holding_nan(allocation):
    model = _tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    ids = torch.randint(0, VOCAB, (2, 16), generator=_gen(10))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj"):
        quantize_model(model, OptQuantConfig(bits=4, format="int", allocation=allocation), calibration=ids,
                       progress=False, apply="none")


def test_modules_to_not_convert_keeps_a_non_finite_module_in_full_precision():
    model = _tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("inf")
    config = OptQuantConfig(bits=4, format="int", allocation="uniform",
                            modules_to_not_convert=["lm_head", "layers.1.mlp.up_proj"])
    encoded, _ = quantize_model(model, config, progress=False, apply="modules")
    assert "model.layers.1.mlp.up_proj" not in encoded and len(encoded) == 13
    assert type(model.model.layers[1].mlp.up_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)


@pytest.mark.parametrize("magnitude,scale_format", [(1e30, "fp16"), (1e-30, "fp16"), (1e-42, "bf16"),
                                                    (1e-42, "e8m0")])
def test_scales_outside_the_scale_format_range_are_an_error_naming_it(magnitude, scale_format):
    fmt = TensorFormat(IntElement(4), Scaling("block", 64, "absmax", scale_format))
    w = torch.randn(4, 128, generator=_gen(11)) * magnitude
    with pytest.raises(ValueError, match=f"scale_format '{scale_format}' cannot represent"):
        fmt.encode(w)


def test_float16_weights_at_the_top_of_the_range_saturate_instead_of_overflowing():
    w = torch.full((2, 64), 65504.0, dtype=torch.float16)
    w[:, 1::2] = -65504.0
    # the bf16 block scale rounds up (65504 -> 65536 for nf4, 65504/3 -> 21888 for E2M1), so the
    # largest level decodes above 65504 before the cast to float16
    for fmt in (TensorFormat(LookupElement("nf4"), Scaling("block", 64, "absmax", "bf16")),
                TensorFormat(FPElement(2, 1), Scaling("block", 64, "absmax", "bf16"))):
        assert float(fmt.quantise(w.float()).abs().max()) > 65504.0
        q = _round_trip(fmt, w)
        assert bool(torch.isfinite(q).all()) and float(q.float().abs().max()) == 65504.0


@pytest.mark.parametrize("key,value", [("scales", float("nan")), ("scales", float("inf")), ("lut", float("nan")),
                                       ("outliers.val", float("inf"))])
def test_corrupt_non_finite_stored_values_are_rejected_on_decode(key, value):
    fmt = TensorFormat(LloydMaxElement(3), Scaling("block", 32, "absmax", "fp32"), SparseOutliers(0.02))
    encoded = fmt.encode(torch.randn(8, 64, generator=_gen(12)))
    tensors = {k: v.clone() for k, v in encoded.tensors.items()}
    tensors[key].view(-1)[0] = value
    with pytest.raises(ValueError):
        fmt.decode(type(encoded)(fmt, encoded.shape, encoded.dtype, tensors))


def test_huge_numbers_in_specs_and_configs_are_value_errors():
    for spec in ({"kind": "grid", "step": 10**400}, {"kind": "scaling", "block_size": 10**400},
                 {"kind": "int", "bits": -(10**500)}, {"kind": "int", "symmetric": 1}):
        with pytest.raises(ValueError):
            spec_from_dict(spec)
    for field, value in (("bits", 10**400), ("seed", 2**64), ("weighted_fit", 1), ("block_size", 1e400)):
        with pytest.raises(ValueError, match=field):
            OptQuantConfig(**{field: value})


# ---- checkpoints: version, checksums, no code execution ----------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A quantised tiny Llama (int, uniform) saved once: (directory, logits)."""
    root = tmp_path_factory.mktemp("reliability")
    _tiny_llama().save_pretrained(str(root / "fp"))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(root / "fp"), quantization_config=OptQuantConfig(bits=4.0, format="int", allocation="uniform"))
    model.save_pretrained(str(root / "q"))
    return str(root / "q"), _logits(model)


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _copy(src: str, dst) -> str:
    import shutil

    shutil.copytree(src, str(dst))
    return str(dst)


def _meta(path: str) -> dict:
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()[METADATA_KEY])


def _write_meta(path: str, meta: dict, seal: bool) -> None:
    tensors = load_file(path)
    text = json.dumps(seal_metadata(meta) if seal else meta)
    save_file(tensors, path, metadata={"format": "pt", METADATA_KEY: text})


def _load(path: str, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)


def test_checkpoint_carries_version_and_sealed_metadata(saved):
    meta = _meta(os.path.join(saved[0], "model.safetensors"))
    assert meta["format_version"] == FORMAT_VERSION == 2
    assert meta["crc32"] == metadata_crc32(meta)
    assert {"model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"} <= set(meta["unquantised"])
    assert parse_metadata(json.dumps(meta)) == meta


@pytest.mark.parametrize("version", [None, 1, 3, 99, "2", 2.0, True, -1])
def test_unknown_or_mistyped_versions_are_refused_by_name(saved, version):
    meta = _meta(os.path.join(saved[0], "model.safetensors"))
    meta["format_version"] = version
    with pytest.raises(ValueError, match="format_version"):
        parse_metadata(json.dumps(seal_metadata(meta)))
    if type(version) is int and version == 1:
        with pytest.raises(ValueError, match="no longer read"):
            parse_metadata(json.dumps(seal_metadata(meta)))


def test_unsealed_metadata_edits_are_caught_by_the_metadata_checksum(saved, tmp_path):
    out = _copy(saved[0], tmp_path / "edited")
    path = os.path.join(out, "model.safetensors")
    meta = _meta(path)
    scaling = meta["modules"]["model.layers.0.self_attn.q_proj"]["format"]["scaling"]
    scaling["multiplier"] = scaling["multiplier"] * 0.999  # still a valid spec; decode is unaffected
    _write_meta(path, meta, seal=False)
    with pytest.raises(ValueError, match="metadata checksum mismatch"):
        _load(out)
    _write_meta(path, meta, seal=True)  # re-sealed, the same edit is accepted: the checksum is what caught it
    assert torch.equal(_logits(_load(out)), saved[1])


def test_deeply_nested_or_unknown_metadata_is_a_value_error():
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_metadata("[" * 100_000 + "]" * 100_000)
    meta = seal_metadata({"format_version": FORMAT_VERSION, "modules": {}, "unquantised": {}, "extra": 1})
    with pytest.raises(ValueError, match="unknown fields"):
        parse_metadata(json.dumps(meta))


def _data_offset(path: str, key: str) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return 8 + n + header[key]["data_offsets"][0]


def _flip(path: str, offset: int, mask: int = 0x20) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("key", ["model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"])
def test_a_flipped_byte_in_an_unquantised_tensor_is_refused_by_name(saved, tmp_path, key, dtype):
    out = _copy(saved[0], tmp_path / "flip")
    path = os.path.join(out, "model.safetensors")
    _flip(path, _data_offset(path, key) + 9)
    with pytest.raises(ValueError, match=f"checksum mismatch for tensor {key}".replace(".", r"\.")):
        _load(out, **({} if dtype is None else {"dtype": dtype}))


def test_a_renamed_tensor_that_transformers_would_reinitialise_is_caught(saved, tmp_path):
    out = _copy(saved[0], tmp_path / "renamed")
    path = os.path.join(out, "model.safetensors")
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    start = raw.index(b'"model.norm.weight"', 8, 8 + n)
    raw = raw[:start] + b'"model.norm.weighu"' + raw[start + len(b'"model.norm.weight"'):]
    with open(path, "wb") as f:
        f.write(raw)
    with pytest.raises(ValueError, match=r"checksum mismatch for tensor model\.norm\.weight.*re-initialised"):
        _load(out)


@pytest.mark.parametrize("cut", [0, 5, 8, 100, -1])
def test_truncated_files_are_refused_naming_the_file(saved, tmp_path, cut):
    out = _copy(saved[0], tmp_path / "cut")
    path = os.path.join(out, "model.safetensors")
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[:cut])
    with pytest.raises(ValueError, match="model.safetensors"):
        _load(out)


class _Bomb:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_never_unpickles_a_checkpoint(saved, tmp_path):
    out = tmp_path / "pickled"
    out.mkdir()
    with open(os.path.join(saved[0], "config.json")) as f:
        config = json.load(f)
    (out / "config.json").write_text(json.dumps(config))
    marker = str(tmp_path / "code-ran")
    with open(out / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": _Bomb(marker)}, f)
    with pytest.raises(ValueError, match="safetensors"):
        _load(str(out))
    assert not os.path.exists(marker)


# ---- determinism -------------------------------------------------------------------------------
_DETERMINISM_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_reliability import DETERMINISM_CONFIGS, _quantise_and_save
    for name, kwargs in DETERMINISM_CONFIGS.items():
        _quantise_and_save({src!r}, {dst!r} + "/" + name, kwargs)
""")

DETERMINISM_CONFIGS = {
    # min_bits: the grid cannot fit 1024-element tensors at the default 1.5 b/p (fixed stream overhead);
    # three modules only: the CPU rANS coder costs ~0.5 s per small stream and attempt
    "grid-fisher": dict(bits=4.0, format="grid", allocation="fisher", min_bits=3.0, calibration_tokens=64,
                        calibration_seq_len=32, modules_to_not_convert=["lm_head", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj"]),
    "lloyd-sparse-rotation": dict(bits=4.0, format="lloyd_max", allocation="uniform", sparse_fraction=0.01,
                                  rotation_block=16, granularity="block", block_size=16, scale_format="fp8_e4m3"),
}


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


def _quantise_and_save(src: str, dst: str, kwargs: dict) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=OptQuantConfig(**kwargs))
    model.save_pretrained(dst)


@pytest.fixture(scope="module")
def determinism_runs(tmp_path_factory):
    """A full-precision tiny Llama (+ tokenizer) and, for each config, the directory quantised in a
    fresh subprocess (one interpreter for all configs: importing torch + transformers dominates)."""
    root = tmp_path_factory.mktemp("determinism")
    source, fresh = str(root / "fp"), str(root / "subprocess")
    _tiny_llama(seed=5, hidden=32, layers=1).save_pretrained(source)  # small: the CPU rANS coder loops per symbol
    _byte_tokenizer().save_pretrained(source)
    script = _DETERMINISM_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), src=source, dst=fresh)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert done.returncode == 0, done.stderr[-3000:]
    return source, fresh


def _file(directory: str) -> bytes:
    with open(os.path.join(directory, "model.safetensors"), "rb") as f:
        return f.read()


def _data_section(raw: bytes) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 + n:]


@pytest.mark.parametrize("name", list(DETERMINISM_CONFIGS))
def test_the_same_model_and_config_give_byte_identical_checkpoints(name, determinism_runs, tmp_path):
    source, fresh = determinism_runs
    runs = [str(tmp_path / "run0"), str(tmp_path / "run1"), os.path.join(fresh, name)]
    _quantise_and_save(source, runs[0], DETERMINISM_CONFIGS[name])
    _quantise_and_save(source, runs[1], DETERMINISM_CONFIGS[name])
    raw = [_file(r) for r in runs]
    # the tensors are identical straight away; the header may differ in the order of its two
    # __metadata__ keys (safetensors writes that map in a per-process random order)
    assert _data_section(raw[1]) == _data_section(raw[0]) == _data_section(raw[2])
    for r in runs:
        canonicalise_checkpoint(r)
    canonical = [_file(r) for r in runs]
    assert canonical[0] == canonical[1] == canonical[2]
    assert canonicalise_checkpoint(runs[0]) == []  # idempotent
    assert isinstance(_load(runs[2]), transformers.PreTrainedModel)  # canonicalised files still load (and verify)


def test_canonicalise_only_reorders_the_metadata_map(tmp_path):
    path = str(tmp_path / "x.safetensors")
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(3, dtype=torch.bfloat16)}
    metadata = {f"k{i}": str(i) for i in range(12)}
    save_file(tensors, path, metadata=metadata)
    with open(path, "rb") as f:
        before = f.read()
    canonicalise_checkpoint(path)
    with open(path, "rb") as f:
        after = f.read()
    assert len(after) == len(before) and _data_section(after) == _data_section(before)
    (n,) = struct.unpack("<Q", after[:8])
    assert list(json.loads(after[8:8 + n])["__metadata__"]) == sorted(metadata)
    loaded = load_file(path)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == metadata
