"""Property-based fuzzing (hypothesis) of the checkpoint loader, the metadata / config / spec
parsers and the tensor decoder.

Each property runs a bounded number of examples in CI; ``benchmarks/fuzz.py`` runs the same
properties with >= 10**5 inputs in all (``HF_OPTQUANT_CKPT_FUZZ='{"file": 20000, ...}'``).

Oracles ("no crash, no hang, no silent wrong result"):

* **file**: bit flips, byte writes, splices, truncation and extension of a saved
  ``model.safetensors`` (header length, header JSON, any tensor's data).  Loading with
  ``from_pretrained`` must either raise a ValueError whose message names the file, a tensor,
  a module or a field, or load a model whose logits are *bitwise equal* to the original's
  (possible only when the mutation hit bytes that carry no meaning, e.g. header padding).
* **metadata**: structured edits of the optquant JSON (types, missing keys, unknown keys and
  spec kinds, shapes, huge numbers, versions, renamed/swapped modules).  Unsealed (the
  metadata CRC left as it was), any change must be rejected; re-sealed (a forged checksum,
  as an adversary would), loading must still raise only ValueErrors, never crash.
* **swap**: buffers re-typed, reshaped, swapped, dropped or renamed with the metadata
  untouched: rejected, or (no-op) identical logits.
* **config** / **spec**: random dicts for ``OptQuantConfig`` and mutated spec dicts: a
  ValueError naming a field, or a valid object that keeps every given field exactly (value and
  type) and round-trips through JSON.
* **config_json**: byte-level edits of a config's JSON text, parsed and given to
  ``OptQuantConfig.from_dict``: not JSON, a ValueError, or accepted with every field kept.
* **config_file**: ``config.json``'s ``quantization_config`` edited, then ``from_pretrained``:
  a ValueError naming a field, or bitwise-identical logits.
* **decode**: mutated encoded tensors: ``TensorFormat.decode`` raises ValueError or returns a
  finite tensor of the declared shape and dtype, which must equal the original weights when
  nothing or only the entropy-coded stream (CRC-protected) changed; scales, packed codes,
  tables and outliers carry no checksum at this level (the checkpoint's CRC32s cover them).

Every example runs under a 60 s alarm (``fuzz_support.guard``: a hang fails the test).
``fuzz_support.OUTCOMES`` counts what happened per property, ``DURATIONS`` the slowest
example, for the benchmark's report.
"""

from __future__ import annotations

import atexit
import copy
import functools
import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import transformers
from fuzz_support import OUTCOMES, counts, fuzz_settings
from fuzz_support import guard as _guard
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import hf_optquant  # noqa: F401  (registers "optquant" with transformers)
from hf_optquant.config import OptQuantConfig
from hf_optquant.formats import (
    CubeRootElement,
    EncodedTensor,
    FPElement,
    GridElement,
    IntElement,
    LloydMaxElement,
    LookupElement,
    Rotation,
    Scaling,
    SparseOutliers,
    Spec,
    TensorFormat,
    spec_from_dict,
)
from hf_optquant.serialization import METADATA_KEY, dumps_metadata, seal_metadata

COUNTS = counts({"file": 70, "metadata": 60, "swap": 30, "config": 400, "config_json": 300, "config_file": 15,
                 "spec": 400, "decode": 250})
VOCAB = 64
IDS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))


def _settings(name: str):
    return fuzz_settings(COUNTS[name])


@pytest.fixture(scope="module", autouse=True)
def _quiet(one_thread):
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    yield
    transformers.logging.enable_progress_bar()
    transformers.logging.set_verbosity(verbosity)


# ---- base checkpoints -------------------------------------------------------------------------
def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=False))  # no 16x32 k/v: see report


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=VOCAB,
                                                                n_positions=32))


BASE_CONFIGS = {
    # entropy-coded grid streams (codes.*); two modules only: the CPU reference decoder costs ~1 s per
    # stream however small, and every accepted example decodes them all in its forward pass
    "llama-grid": (_llama, dict(bits=4.0, format="grid", allocation="uniform",
                                modules_to_not_convert=["lm_head", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj"])),
    # fixed-length int + fp8 scales (scales.outer) + sparse outliers + rotation; biases; tied embeddings
    "qwen2-int": (_qwen2, dict(bits=4.5, format="int", allocation="uniform", granularity="block", block_size=16,
                               scale_format="fp8_e4m3", sparse_fraction=0.02, rotation_block=16,
                               modules_to_not_convert=[])),
    # Conv1D -> QuantLinear, fitted Lloyd-Max table (lut), e8m0 scales
    "gpt2-lloyd": (_gpt2, dict(bits=4.5, format="lloyd_max", allocation="uniform", granularity="block",
                               block_size=16, scale_format="e8m0")),
}


@dataclass
class Base:
    name: str
    saved: str  # the pristine quantised checkpoint directory
    scratch: str  # a copy whose model.safetensors each example overwrites
    raw: bytes
    header_len: int
    header: dict
    meta: dict
    logits: torch.Tensor
    names: frozenset  # tensor keys and module names a message may mention

    @property
    def target(self) -> str:
        return os.path.join(self.scratch, "model.safetensors")


@functools.cache
def _root() -> str:
    root = tempfile.mkdtemp(prefix="optquant-fuzz-")
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.cache
def base_checkpoint(name: str) -> Base:
    """The quantised checkpoint ``name`` of BASE_CONFIGS, built once per process."""
    factory, kwargs = BASE_CONFIGS[name]
    source, saved, scratch = (os.path.join(_root(), name + suffix) for suffix in ("-fp", "-q", "-scratch"))
    with torch.random.fork_rng():
        torch.manual_seed(11)
        model = factory()
    with torch.no_grad():  # non-trivial norms, so a re-initialised one shows in the logits
        for pname, p in model.named_parameters():
            if "norm" in pname or "ln_" in pname:
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(12))
    model.save_pretrained(source)
    quantised = transformers.AutoModelForCausalLM.from_pretrained(source, quantization_config=OptQuantConfig(**kwargs))
    quantised.save_pretrained(saved)
    shutil.copytree(saved, scratch)
    with open(os.path.join(saved, "model.safetensors"), "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"][METADATA_KEY])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(saved)
    names = set(header) | set(meta["modules"]) | set(meta["unquantised"])
    return Base(name, saved, scratch, raw, n, header, meta, _logits(reloaded), frozenset(names))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _names_something(message: str, base: Base) -> bool:
    anchors = ("model.safetensors", "optquant", "format_version", "safetensors")
    return any(a in message for a in anchors) or any(n in message for n in base.names)


def _load_and_judge(prop: str, base: Base, data: bytes, forged: bool = False, must_reject: bool = False) -> str:
    """Write ``data`` as the scratch checkpoint, load it, and apply the oracle; returns the outcome."""
    with open(base.target, "wb") as f:
        f.write(data)
    stage = "load"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(base.scratch)
        stage = "forward"
        logits = _logits(model)
    except ValueError as err:  # includes CorruptStreamError
        message = str(err)
        assert message and _names_something(message, base), f"uninformative error: {message!r}"
        outcome = f"rejected at {stage}"
    else:
        identical = torch.equal(logits, base.logits)
        assert not must_reject, "a changed, unsealed metadata document was accepted"
        assert identical or forged, "silent wrong result: the mutated checkpoint loaded with different logits"
        outcome = "loaded, identical logits" if identical else "loaded, different logits (forged checksum)"
    OUTCOMES[(prop, outcome)] += 1
    return outcome


# ---- property: file bytes ------------------------------------------------------------------------
@st.composite
def file_mutation(draw, name: str) -> bytes:
    base = base_checkpoint(name)  # by name: hypothesis prints strategy arguments, and a Base is large
    data = bytearray(base.raw)
    n = base.header_len
    tensors = sorted(k for k in base.header if k != "__metadata__")
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip_header", "flip_data", "write", "flip_length", "splice", "truncate",
                                   "extend"]))
        if op == "flip_header":
            pos = draw(st.integers(8, 8 + n - 1))
            if pos < len(data):  # an earlier truncation may have cut it off
                data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "flip_data":
            key = draw(st.sampled_from(tensors))
            start, end = base.header[key]["data_offsets"]
            pos = 8 + n + draw(st.integers(start, max(start, end - 1)))
            if end > start and pos < len(data):
                data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "write" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif op == "flip_length" and len(data) >= 8:
            data[draw(st.integers(0, 7))] ^= 1 << draw(st.integers(0, 7))
        elif op == "splice" and data:
            pos = draw(st.integers(0, len(data) - 1))
            chunk = draw(st.binary(min_size=1, max_size=32))
            data[pos:pos + len(chunk)] = chunk
        elif op == "truncate" and data:
            del data[draw(st.integers(0, len(data) - 1)):]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


@_settings("file")
@given(data=st.data(), name=st.sampled_from(list(BASE_CONFIGS)))
def test_mutated_checkpoint_files_are_rejected_or_load_identically(data, name):
    base = base_checkpoint(name)
    mutated = data.draw(file_mutation(name))
    with _guard("file"):
        _load_and_judge("file", base, mutated)


# ---- property: metadata JSON ------------------------------------------------------------------------
JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70), st.integers(-(2**70), 2**70), st.just(10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.sampled_from(
        ["grid", "int", "tensor_format", "scaling", "nonsense", "float32", "bfloat16", "uint8", "int16"]),
    st.lists(st.integers(-2, 2**33), max_size=3), st.just({}), st.just({"kind": "grid"}),
)


def _paths(node, prefix=()) -> list[tuple]:
    """Every path (tuple of keys/indices) into a JSON tree."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _get(node, path):
    for key in path:
        node = node[key]
    return node


def _document(source: str) -> dict:
    """The JSON document to mutate: ``base:<name>`` (a checkpoint's metadata) or ``spec:<i>``."""
    kind, _, key = source.partition(":")
    return base_checkpoint(key).meta if kind == "base" else SPEC_SEEDS[int(key)].to_dict()


@st.composite
def metadata_mutation(draw, source: str) -> dict:
    meta = copy.deepcopy(_document(source))
    paths = [p for p in _paths(meta) if p]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "delete", "add", "rename", "swap", "version", "kind", "shape"]))
        path = draw(st.sampled_from(paths))
        parent = _get(meta, path[:-1]) if _valid(meta, path[:-1]) else None
        if parent is None or not _valid(meta, path):
            continue
        if op == "set":
            parent[path[-1]] = draw(JSON_VALUES)
        elif op == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "bias", "crc32", "shape", "kind", "codes"]))] = draw(JSON_VALUES)
        elif op == "rename" and isinstance(parent, dict):
            parent[str(path[-1]) + draw(st.sampled_from(["x", ".0", "_1", ""]))] = parent.pop(path[-1])
        elif op == "swap" and isinstance(parent, dict) and len(parent) > 1:
            other = draw(st.sampled_from(sorted(parent, key=str)))
            parent[path[-1]], parent[other] = parent[other], parent[path[-1]]
        elif op == "version":
            meta["format_version"] = draw(st.sampled_from([0, 1, 3, 99, -2, "2", 2.0, True, None, 2]))
        elif op == "kind":
            specs = [p for p in paths if p and p[-1] == "kind" and _valid(meta, p)]
            if specs:
                where = draw(st.sampled_from(specs))
                _get(meta, where[:-1])["kind"] = draw(st.sampled_from(
                    ["grid", "int", "fp", "lookup", "cube_root", "lloyd_max", "scaling", "sparse", "hadamard",
                     "tensor_format", "nonsense", ""]))
        elif op == "shape":
            shapes = [p for p in paths if p and p[-1] == "shape" and _valid(meta, p)]
            if shapes:
                shape = _get(meta, draw(st.sampled_from(shapes)))
                if isinstance(shape, list) and shape:
                    shape[draw(st.integers(0, len(shape) - 1))] = draw(st.sampled_from([0, 1, 7, 2**31, 2**62,
                                                                                        -1, 10**30]))
    return meta


def _valid(node, path) -> bool:
    try:
        _get(node, path)
    except (KeyError, IndexError, TypeError):
        return False
    return True


def _with_metadata(base: Base, text: str) -> bytes:
    """The base file with its optquant metadata replaced (tensor entries and data unchanged)."""
    header = dict(base.header)
    header["__metadata__"] = {**header["__metadata__"], METADATA_KEY: text}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + base.raw[8 + base.header_len:]


@_settings("metadata")
@given(data=st.data(), name=st.sampled_from(list(BASE_CONFIGS)), sealed=st.booleans())
def test_mutated_metadata_is_rejected_unless_unchanged(data, name, sealed):
    base = base_checkpoint(name)
    mutated = data.draw(metadata_mutation(f"base:{name}"))
    changed = dumps_metadata(mutated) != dumps_metadata(base.meta)  # canonical JSON: 1 == True but "1" != "true"
    document = seal_metadata(mutated) if sealed and isinstance(mutated, dict) else mutated
    with _guard("metadata"):
        outcome = _load_and_judge("metadata", base, _with_metadata(base, json.dumps(document)), forged=sealed,
                                  must_reject=changed and not sealed)
    if not changed:
        assert outcome == "loaded, identical logits"


# ---- property: buffer dtype / shape swaps ----------------------------------------------------------
@st.composite
def tensor_swap(draw, name: str) -> bytes:
    base = base_checkpoint(name)
    tensors = load_file(os.path.join(base.saved, "model.safetensors"))
    keys = sorted(tensors)
    op = draw(st.sampled_from(["retype", "reshape", "swap", "drop", "rename", "duplicate", "noop"]))
    key = draw(st.sampled_from(keys))
    t = tensors[key]
    if op == "retype":
        dtype = draw(st.sampled_from([torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                                      torch.bfloat16, torch.float32, torch.float64]))
        tensors[key] = t.to(dtype) if draw(st.booleans()) or t.numel() * t.element_size() % 8 else \
            t.contiguous().reshape(-1).view(torch.uint8).view(dtype)
    elif op == "reshape":
        tensors[key] = t.reshape(1, -1) if t.ndim == 1 else t.reshape(-1)
    elif op == "swap":
        other = draw(st.sampled_from(keys))
        tensors[key], tensors[other] = tensors[other], tensors[key]
    elif op == "drop":
        del tensors[key]
    elif op == "rename":
        tensors[key + draw(st.sampled_from(["x", "__x", ".weight"]))] = tensors.pop(key)
    elif op == "duplicate":
        tensors[draw(st.sampled_from(keys))] = t.clone()
    path = os.path.join(base.scratch, "swap.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=base.header["__metadata__"])
    with open(path, "rb") as f:
        return f.read()


@_settings("swap")
@given(data=st.data(), name=st.sampled_from(list(BASE_CONFIGS)))
def test_swapped_buffers_are_rejected_or_load_identically(data, name):
    base = base_checkpoint(name)
    mutated = data.draw(tensor_swap(name))
    with _guard("swap"):
        _load_and_judge("swap", base, mutated)


# ---- property: OptQuantConfig dicts ------------------------------------------------------------------
CONFIG_FIELDS = {
    "bits": st.one_of(st.floats(0, 20), st.integers(-1, 20)),
    "format": st.sampled_from(["grid", "int", "fp", "nf4", "sf4", "cube_root", "lloyd_max", "int3", "", None]),
    "granularity": st.sampled_from([None, "tensor", "channel", "block", "row"]),
    "block_size": st.one_of(st.integers(-2, 1 << 17), st.sampled_from([8.0, "64", True])),
    "statistic": st.sampled_from([None, "absmax", "signmax", "rms", "mean"]),
    "scale_format": st.sampled_from(["fp32", "bf16", "fp16", "fp8_e4m3", "e8m0", "fp64", None]),
    "distribution": st.sampled_from(["auto", "normal", "laplace", "student_t", "cauchy"]),
    "sparse_fraction": st.one_of(st.floats(-0.1, 0.7), st.just(math.nan), st.just(True)),
    "rotation_block": st.one_of(st.integers(-1, 1 << 16), st.just(64.0)),
    "allocation": st.sampled_from(["uniform", "fisher", "fisher-global", "best"]),
    "min_bits": st.floats(0, 17), "max_bits": st.floats(0, 17),
    "fisher_mode": st.sampled_from(["sampled", "empirical", "exact"]),
    "weighted_fit": st.sampled_from([True, False, 0, 1, "yes"]),
    "calibration_text": st.one_of(st.none(), st.text(max_size=5), st.just(3)),
    "calibration_tokens": st.one_of(st.integers(-5, 1 << 27), st.just(1e3)),
    "calibration_seq_len": st.integers(0, 1 << 18),
    "modules_to_not_convert": st.one_of(st.none(), st.lists(st.sampled_from(["lm_head", "mlp"]), max_size=2),
                                        st.just("lm_head"), st.just([1])),
    "seed": st.one_of(st.integers(-1, 2**64), st.just(1.5)),
    "colour": st.just("blue"), "quant_method": st.just("optquant"), "self": st.just(1), "kwargs": st.just({}),
    "format_version": st.sampled_from([2, "x"]), 3: st.just(1),
}
CONFIG_IGNORED = ("quant_method", "format_version")  # the method's name; a field older saves wrote


def _check_accepted_config(given_fields: dict, parsed: OptQuantConfig) -> None:
    """The oracle for an accepted config: every given field kept exactly (value *and* type: no
    silent coercion), the documented default for ``modules_to_not_convert=None``, and a JSON
    round trip that rebuilds the same config."""
    out = parsed.to_dict()
    for key, value in given_fields.items():
        if key in CONFIG_IGNORED:
            continue
        expected = ["lm_head"] if key == "modules_to_not_convert" and value is None else value
        assert type(out[key]) is type(expected) and out[key] == expected, (key, value, out[key])
    again = OptQuantConfig.from_dict(json.loads(json.dumps(out)))
    assert again.to_dict() == out


@_settings("config")
@given(config=st.fixed_dictionaries({}, optional=CONFIG_FIELDS))
def test_config_dicts_are_validated_by_field(config):
    with _guard("config"):
        try:
            parsed = OptQuantConfig.from_dict(dict(config))
        except ValueError as err:
            message = str(err)
            assert any(str(field) in message for field in config if field != "quant_method"), message
            OUTCOMES[("config", "rejected")] += 1
            return
        _check_accepted_config(config, parsed)
        OUTCOMES[("config", "accepted, fields kept, round-trips")] += 1


@pytest.mark.parametrize("document", [{"self": 1}, {"bits": 4.0, 3: 1}, [("bits", 4.0)], "bits=4", None,
                                      {"kwargs": {}}])
def test_config_from_dict_rejects_odd_documents_with_a_value_error(document):
    """Found by the dedicated fuzz run: the mixin's ``cls(**config_dict)`` raised TypeError for
    these (a key named ``self``, a non-string key, a non-dict)."""
    with pytest.raises(ValueError, match="OptQuantConfig"):
        OptQuantConfig.from_dict(document)


def test_config_from_dict_validates_keyword_overrides():
    """The mixin set ``from_dict(d, bits=99)``'s kwargs *after* validation; they are fields too."""
    with pytest.raises(ValueError, match="bits"):
        OptQuantConfig.from_dict({}, bits=99)
    config, unused = OptQuantConfig.from_dict({"format": "int"}, return_unused_kwargs=True, bits=5.0, other=1)
    assert (config.bits, config.format, unused) == (5.0, "int", {"other": 1})


CONFIG_SEEDS = [
    OptQuantConfig(),
    OptQuantConfig(bits=3.5, format="int", granularity="block", block_size=32, scale_format="fp8_e4m3",
                   sparse_fraction=0.01, rotation_block=64, allocation="fisher-global", weighted_fit=True,
                   modules_to_not_convert=["lm_head", "mlp"], seed=7),
    OptQuantConfig(bits=4.25, format="cube_root", distribution="student_t", statistic="absmax",
                   scale_format="e8m0", calibration_text="some text", calibration_tokens=512,
                   calibration_seq_len=64, min_bits=2.0, max_bits=6.0, fisher_mode="empirical"),
]
JSON_TOKENS = [b'"self":1,', b'"bits":', b"null", b"1e999", b"NaN", b"-Infinity", b"-0", b"true", b"[", b"]",
               b"{", b"}", b'"', b",", b":", b"\\u0000", b"9" * 30, b'"lm_head"', b'"optquant"', b" "]
JSON_LITERALS = ["null", "true", "false", "0", "-0", "-0.0", "1", "4", "4.0", "4.5e0", "1E1", "64", "64.0", "8",
                 "65536", "1e999", "-1e999", "NaN", "Infinity", "9" * 25, "9223372036854775808", "0.001", "0.5",
                 '"4"', '""', '" "', '"grid"', '"int"', '"block"', '"absmax"', '"e8m0"', '"fisher"', '"lm_head"',
                 "[]", '["lm_head"]', '[1]', "{}", '{"kind": "grid"}', '"\\ud800"']


@st.composite
def json_text_mutation(draw, seed: int) -> bytes:
    """Edits of a config's JSON text: mostly a value replaced by a raw JSON literal (NaN, 1e999,
    -0, "4", duplicate keys ...), so most inputs still parse and reach the config parser; also
    byte flips, writes, deletions, token insertions and truncation."""
    items = [[json.dumps(k), json.dumps(v)] for k, v in CONFIG_SEEDS[seed].to_dict().items()]
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["value", "value", "duplicate", "drop", "rename"]))
        i = draw(st.integers(0, len(items) - 1))
        if op == "value":
            items[i][1] = draw(st.sampled_from(JSON_LITERALS))
        elif op == "duplicate":
            items.append([items[i][0], draw(st.sampled_from(JSON_LITERALS))])
        elif op == "drop" and len(items) > 1:
            del items[i]
        elif op == "rename":
            items[i][0] = items[i][0][:-1] + draw(st.sampled_from(["x", "_", "S", " "])) + '"'
    data = bytearray(("{" + ", ".join(f"{k}: {v}" for k, v in items) + "}").encode())
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # most inputs stay parseable
        op = draw(st.sampled_from(["flip", "write", "delete", "insert", "truncate"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "write" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 12))]
        elif op == "insert":
            data[pos:pos] = draw(st.sampled_from(JSON_TOKENS))
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


@_settings("config_json")
@given(data=st.data(), seed=st.sampled_from(range(len(CONFIG_SEEDS))))
def test_mutated_config_json_is_rejected_or_kept_exactly(data, seed):
    text = data.draw(json_text_mutation(seed))
    with _guard("config_json"):
        try:
            document = json.loads(text)
        except (ValueError, RecursionError):  # JSONDecodeError / bad UTF-8: never reaches our parser
            OUTCOMES[("config_json", "not JSON (json.loads rejects)")] += 1
            return
        try:
            parsed = OptQuantConfig.from_dict(document)
        except ValueError as err:
            assert "OptQuantConfig" in str(err), str(err)
            OUTCOMES[("config_json", "rejected")] += 1
            return
        _check_accepted_config(document, parsed)
        same = parsed.to_dict() == CONFIG_SEEDS[seed].to_dict()
        OUTCOMES[("config_json", "accepted, " + ("identical to the original" if same else "fields kept exactly"))] += 1


@functools.cache
def config_scratch(name: str) -> str:
    """A copy of a saved checkpoint whose config.json the config_file property overwrites."""
    scratch = os.path.join(_root(), name + "-config")
    shutil.copytree(base_checkpoint(name).saved, scratch)
    return scratch


@_settings("config_file")
@given(name=st.sampled_from(["qwen2-int", "gpt2-lloyd"]),  # no grid: its forward costs ~1 s on CPU
       edits=st.fixed_dictionaries({}, optional=CONFIG_FIELDS), drop=st.sets(st.sampled_from(sorted(
           OptQuantConfig().to_dict())), max_size=3))
def test_mutated_quantization_config_in_config_json(name, edits, drop):
    """config.json's quantization_config (still an optquant dict) mutated, then from_pretrained:
    a ValueError naming the field, or the model loads with bitwise-identical logits (the stored
    formats come from the checksummed safetensors metadata, not from this dict)."""
    base, scratch = base_checkpoint(name), config_scratch(name)
    with open(os.path.join(base.saved, "config.json")) as f:
        config = json.load(f)
    quant = {k: v for k, v in config["quantization_config"].items() if k not in drop or k == "quant_method"}
    quant.update({k: v for k, v in edits.items() if k not in ("quant_method", 3)})  # JSON keys are strings
    config["quantization_config"] = quant
    with open(os.path.join(scratch, "config.json"), "w") as f:
        json.dump(config, f)
    with _guard("config_file"):
        try:
            logits = _logits(transformers.AutoModelForCausalLM.from_pretrained(scratch))
        except ValueError as err:
            assert any(str(field) in str(err) for field in [*edits, *drop]), str(err)
            OUTCOMES[("config_file", "rejected at load")] += 1
            return
        assert torch.equal(logits, base.logits), "silent wrong result: config.json edit changed the logits"
        OUTCOMES[("config_file", "loaded, identical logits")] += 1


# ---- property: spec dicts ------------------------------------------------------------------------------
SPEC_SEEDS = [
    TensorFormat(GridElement(0.37), Scaling("channel", 1, "rms")),
    TensorFormat(IntElement(math.log2(11), symmetric=True), Scaling("block", 32, "absmax", "fp8_e4m3"),
                 SparseOutliers(0.01, "fp16"), Rotation(64, seed=5)),
    TensorFormat(FPElement(3, 2), Scaling("tensor", 1, "signmax", "fp32", multiplier=0.8)),
    TensorFormat(CubeRootElement("student_t", 5, 4.0), Scaling("block", 128, "signmax", "bf16")),
    TensorFormat(LookupElement("sf4"), Scaling("block", 64, "absmax", "e8m0")),
    TensorFormat(LloydMaxElement(3, iterations=5), Scaling("channel", 1, "rms", "fp16")),
]


@_settings("spec")
@given(data=st.data(), seed=st.sampled_from(range(len(SPEC_SEEDS))))
def test_mutated_spec_dicts_are_rejected_or_round_trip(data, seed):
    mutated = data.draw(metadata_mutation(f"spec:{seed}"))
    with _guard("spec"):
        try:
            spec = spec_from_dict(mutated)
        except ValueError as err:
            assert str(err), "empty error message"
            OUTCOMES[("spec", "rejected")] += 1
            return
        assert isinstance(spec, Spec)
        assert spec_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
        OUTCOMES[("spec", "accepted, round-trips")] += 1


# ---- property: decoding mutated encoded tensors ----------------------------------------------------------
@functools.cache
def encoded_seeds() -> list[EncodedTensor]:
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(12, 96, generator=gen) * 0.05).to(torch.bfloat16)
    return [fmt.encode(w) for fmt in SPEC_SEEDS]


def _raw(t: torch.Tensor) -> np.ndarray:
    return _raw_tensor(t).numpy().copy()


@st.composite
def encoded_mutation(draw, seed: int) -> dict[str, torch.Tensor]:
    encoded = encoded_seeds()[seed]
    tensors = dict(encoded.tensors)
    keys = sorted(tensors)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(keys))
        if key not in tensors:
            continue
        t = tensors[key]
        op = draw(st.sampled_from(["flip", "write", "truncate", "extend", "retype", "reshape", "drop", "zero"]))
        raw = _raw(t)
        if op in ("flip", "write") and raw.size:
            pos = draw(st.integers(0, raw.size - 1))
            raw[pos] = raw[pos] ^ (1 << draw(st.integers(0, 7))) if op == "flip" else draw(st.integers(0, 255))
        elif op == "truncate" and raw.size:
            raw = raw[:draw(st.integers(0, raw.size - 1))]
        elif op == "extend":
            raw = np.concatenate([raw, np.frombuffer(draw(st.binary(min_size=1, max_size=16)), np.uint8)])
        elif op == "retype":
            tensors[key] = t.to(draw(st.sampled_from([torch.uint8, torch.int16, torch.int64, torch.float32,
                                                      torch.bfloat16, torch.float8_e4m3fn])))
            continue
        elif op == "reshape":
            tensors[key] = t.reshape(1, -1)
            continue
        elif op == "drop":
            del tensors[key]
            continue
        elif op == "zero":
            raw[:] = 0
        size = t.element_size()
        raw = np.ascontiguousarray(raw[:raw.size - raw.size % size])
        tensors[key] = torch.from_numpy(raw).view(t.dtype).clone() if raw.size else torch.empty(0, dtype=t.dtype)
    return tensors


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_raw_tensor(a), _raw_tensor(b))


def _raw_tensor(t: torch.Tensor) -> torch.Tensor:
    if t.numel() == 0:  # torch cannot view an empty tensor of stride 0 as bytes
        return torch.empty(0, dtype=torch.uint8)
    return t.contiguous().reshape(-1).view(torch.uint8)


@_settings("decode")
@given(data=st.data(), seed=st.sampled_from(range(len(SPEC_SEEDS))))
def test_decoding_mutated_tensors_raises_or_returns_finite_weights(data, seed):
    encoded = encoded_seeds()[seed]
    tensors = data.draw(encoded_mutation(seed))
    with _guard("decode"):
        try:
            out = encoded.format.decode(EncodedTensor(encoded.format, encoded.shape, encoded.dtype, tensors))
        except ValueError as err:
            assert str(err), "empty error message"
            OUTCOMES[("decode", "rejected")] += 1
            return
        assert out.shape == encoded.shape and out.dtype == encoded.dtype
        assert bool(torch.isfinite(out).all())
        changed = {k for k in tensors.keys() | encoded.tensors.keys()
                   if k not in tensors or k not in encoded.tensors or not _same_bytes(tensors[k], encoded.tensors[k])}
        if not changed or all(k.startswith("codes.") for k in changed):
            # untouched, or only the entropy-coded stream changed (it carries its own CRC32): the
            # output must be the original weights, bit for bit
            assert torch.equal(out, encoded.format.decode(encoded)), f"silent wrong result: {sorted(changed)} changed"
            OUTCOMES[("decode", "decoded, equals the original")] += 1
        else:
            # scales / packed codes / tables / outliers have no checksum at this level (the
            # checkpoint's per-tensor CRC32 catches them on load: see the file property)
            OUTCOMES[("decode", "decoded a changed unchecksummed buffer: finite, declared shape")] += 1
