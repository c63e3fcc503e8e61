"""On-disk format of optquant checkpoints (safetensors only, never pickle).

Where things live
    * The encoded tensors are ordinary safetensors entries, one per EncodedTensor key, named
      ``<module>.weight__<key with "." -> "__">`` (see :mod:`hf_optquant.nn.quant_linear`),
      e.g. ``model.layers.0.self_attn.q_proj.weight__codes__payload``.
    * Everything needed to rebuild and check them is one JSON document stored in the
      safetensors **header metadata** under the key ``"optquant"`` (written into every shard
      by ``save_pretrained`` through ``HfQuantizer.get_state_dict_and_metadata``)::

        {"format_version": 2,
         "modules": {"model.layers.0.self_attn.q_proj": {
             "format": {...TensorFormat spec...}, "shape": [out, in], "dtype": "float32",
             "bias": false,
             "tensors": {"codes.payload": {"shape": [1911], "dtype": "int16", "crc32": 123}, ...}}},
         "unquantised": {"model.norm.weight": {"shape": [64], "dtype": "float32", "crc32": 456}, ...},
         "crc32": 789}

      The metadata sits next to the bytes it describes (so a shard cannot be paired with the
      wrong description) and ``config.json``'s ``quantization_config`` stays the plain
      user-facing :class:`~hf_optquant.config.OptQuantConfig` (whose constructor rejects
      unknown fields, so per-tensor data could not round-trip there anyway).

Integrity (version 2)
    * ``crc32`` (top level) is the CRC32 of the document itself, written as canonical JSON
      (sorted keys, no spaces) without that field: a flipped digit in a grid step or a shape
      is caught even though it still parses as a valid spec.
    * every encoded tensor has a CRC32 (checked after loading, on the loaded bytes);
    * every other tensor of ``model.state_dict()`` (embeddings, norms, biases, an unquantised
      lm_head) has a CRC32 under ``unquantised``.  It is checked twice: on the raw bytes in the
      shard before loading (whatever dtype the model is loaded in), and on the loaded model for
      tensors loaded in their stored dtype, which catches a tensor that went missing (e.g. a
      renamed key in a corrupted header) and was silently re-initialised by transformers.
    Version 1 (session-1 pre-releases) had neither and is refused: re-quantise.

Validation on load (every failure is a ``ValueError`` naming the file, tensor, module or
field): unreadable or truncated safetensors files, unknown ``format_version``, metadata
checksum, malformed JSON/spec, shards with differing metadata, missing or extra encoded
tensors, shape/dtype mismatches between the metadata and the safetensors header (checked
before any weight is read), and a CRC32 mismatch of any stored tensor's bytes.
Entropy-coded streams carry their own CRC on top.  Nothing is ever unpickled.

Determinism
    The same model and config give the same tensors and the same metadata.  safetensors (0.8)
    writes the ``__metadata__`` map (``optquant`` plus transformers' ``format``) in a random
    per-process order (safetensors issue #584), so two saves can differ in the order of those two
    keys only; :func:`canonicalise_checkpoint` rewrites that map in sorted order in place
    (same header length), after which the files are byte-identical.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .formats import EncodedTensor
from .nn.quant_linear import BUFFER_PREFIX, QuantLinear, buffer_name

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "tensor_crc32",
    "module_metadata",
    "unquantised_metadata",
    "collect_metadata",
    "seal_metadata",
    "metadata_crc32",
    "dumps_metadata",
    "parse_metadata",
    "read_checkpoint",
    "check_checkpoint",
    "build_quant_linear",
    "verify_module",
    "verify_unquantised",
    "expected_keys",
    "canonicalise_checkpoint",
]

FORMAT_VERSION = 2
METADATA_KEY = "optquant"
_RETIRED_VERSIONS = {1: "it was written by an hf-optquant 0.1 pre-release, without metadata or full-precision "
                        "checksums; quantise the model again"}

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool, "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
}
for _name in ("uint16", "uint32", "uint64"):  # torch >= 2.3
    if hasattr(torch, _name):
        _DTYPES[_name] = getattr(torch, _name)
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
# safetensors header dtype strings
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64"}
_ENCODED_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<buffer>" + re.escape(BUFFER_PREFIX) + r".+)$")


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} cannot be stored in an optquant checkpoint")
    return _DTYPE_NAMES[dtype]


def _any_dtype_name(dtype: torch.dtype) -> str:
    """Name of any torch dtype (unquantised tensors may use dtypes the encoded ones never do)."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def tensor_crc32(t: torch.Tensor) -> int:
    """CRC32 of the tensor's bytes in row-major, native (little-endian) order."""
    data = t.detach().contiguous().cpu().reshape(-1)
    if data.numel() == 0:
        return 0
    return zlib.crc32(data.view(torch.uint8).numpy().tobytes()) & 0xFFFFFFFF


def _is_uint32(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32


# ---- writing -------------------------------------------------------------------------------
def module_metadata(encoded: EncodedTensor, bias: bool = False) -> dict[str, Any]:
    """Metadata of one quantised weight: format spec, shape, dtype, bias flag, and each stored
    tensor's shape, dtype and CRC32."""
    meta = encoded.metadata()
    meta["bias"] = bool(bias)
    meta["tensors"] = {
        key: {"shape": list(t.shape), "dtype": dtype_name(t.dtype), "crc32": tensor_crc32(t)}
        for key, t in sorted(encoded.tensors.items())
    }
    for key in meta["tensors"]:
        buffer_name(key)  # raises if the key cannot be stored reversibly
    return meta


def unquantised_metadata(model: nn.Module) -> dict[str, Any]:
    """Shape, dtype and CRC32 of every ``state_dict`` entry that is not an encoded buffer
    (tied weights appear under each name, with the same CRC; tensors on the meta device and
    keys transformers does not save are left out)."""
    encoded = {f"{name}.{buffer_name(key)}" for name, module in iter_quant_linears(model) for key in module.tensor_keys}
    ignore = list(getattr(model, "_keys_to_ignore_on_save", None) or [])
    out = {}
    for key, t in model.state_dict().items():
        if key in encoded or t.device.type == "meta" or any(re.search(p, key) for p in ignore):
            continue
        out[key] = {"shape": list(t.shape), "dtype": _any_dtype_name(t.dtype), "crc32": tensor_crc32(t)}
    return out


def collect_metadata(model: nn.Module) -> dict[str, Any]:
    """The sealed metadata document (``format_version``, ``modules``, ``unquantised``, ``crc32``)
    for every :class:`QuantLinear` in ``model``."""
    modules = {}
    for name, module in iter_quant_linears(model):
        tensors = module.encoded_tensors()
        if any(t.device.type == "meta" for t in tensors.values()):
            raise ValueError(f"cannot save {name}: its encoded tensors are on the meta device (offloaded?)")
        modules[name] = module_metadata(module.encoded, module.bias is not None)
    meta = {"format_version": FORMAT_VERSION, "modules": modules, "unquantised": unquantised_metadata(model)}
    return seal_metadata(meta)


def dumps_metadata(meta: Mapping[str, Any]) -> str:
    """Canonical JSON: sorted keys, no spaces, ASCII (what the metadata CRC is computed over)."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"))


def metadata_crc32(meta: Mapping[str, Any]) -> int:
    """CRC32 of the canonical JSON of ``meta`` without its own ``crc32`` field."""
    body = {k: v for k, v in meta.items() if k != "crc32"}
    return zlib.crc32(dumps_metadata(body).encode("ascii")) & 0xFFFFFFFF


def seal_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``meta`` with its ``crc32`` (re)computed."""
    out = {k: v for k, v in meta.items() if k != "crc32"}
    out["crc32"] = metadata_crc32(out)
    return out


# ---- reading -------------------------------------------------------------------------------
def _check_shape(where: str, shape: Any) -> list[int]:
    if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                            for s in shape)):
        raise ValueError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    return shape


def _check_tensor_spec(where: str, spec: Any, dtypes: Iterable[str] | None) -> None:
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be an object")
    _check_shape(where, spec.get("shape"))
    dtype = spec.get("dtype")
    if not isinstance(dtype, str) or (dtypes is not None and dtype not in dtypes):
        allowed = sorted(dtypes) if dtypes is not None else "a dtype name"
        raise ValueError(f"{where}: dtype must be one of {allowed}, got {dtype!r}")
    if not _is_uint32(spec.get("crc32")):
        raise ValueError(f"{where}: crc32 must be an unsigned 32-bit int, got {spec.get('crc32')!r}")


def _check_version(meta: Mapping[str, Any]) -> None:
    version = meta.get("format_version")
    if type(version) is int and version in _RETIRED_VERSIONS:
        raise ValueError(f"optquant checkpoint format_version {version} is no longer read: "
                         f"{_RETIRED_VERSIONS[version]}")
    if not (type(version) is int and version == FORMAT_VERSION):
        raise ValueError(f"optquant checkpoint format_version {version!r} is not supported "
                         f"(this hf-optquant reads version {FORMAT_VERSION})")


def _check_module(name: str, entry: Any) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"optquant metadata for module {name!r} must be an object")
    for field in ("format", "shape", "dtype", "tensors"):
        if field not in entry:
            raise ValueError(f"optquant metadata for module {name!r} lacks {field!r}")
    try:
        enc = EncodedTensor.from_metadata(entry, {})
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"optquant metadata for module {name!r}: {err}") from None
    if len(enc.shape) != 2:
        raise ValueError(f"optquant metadata for module {name!r}: weight shape must be 2-D, got {enc.shape}")
    if not isinstance(entry.get("bias", False), bool):
        raise ValueError(f"optquant metadata for module {name!r}: 'bias' must be a boolean")
    tensors = entry["tensors"]
    if not isinstance(tensors, dict) or not tensors:
        raise ValueError(f"optquant metadata for module {name!r}: 'tensors' must be a non-empty object")
    for key, spec in tensors.items():
        try:
            buffer_name(key)
        except ValueError as err:
            raise ValueError(f"optquant metadata for module {name!r}: {err}") from None
        _check_tensor_spec(f"optquant metadata for tensor {name}.{key}", spec, _DTYPES)


def parse_metadata(text: str | Mapping[str, Any]) -> dict[str, Any]:
    """Parse and validate the metadata document (version, checksum, structure); raises ValueError."""
    try:
        return _parse_metadata(text)
    except RecursionError:
        raise ValueError("optquant checkpoint metadata is nested too deeply to be valid") from None


def _parse_metadata(text: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(text, str):
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"optquant checkpoint metadata is not valid JSON: {err}") from None
    else:
        meta = dict(text)
    if not isinstance(meta, dict):
        raise ValueError("optquant checkpoint metadata must be a JSON object")
    _check_version(meta)
    crc = meta.get("crc32")
    if not _is_uint32(crc) or crc != metadata_crc32(meta):
        raise ValueError(f"optquant checkpoint metadata checksum mismatch (crc32 {crc!r}, computed "
                         f"{metadata_crc32(meta):#010x}): the metadata was modified or corrupted")
    unknown = sorted(set(meta) - {"format_version", "modules", "unquantised", "crc32"})
    if unknown:
        raise ValueError(f"optquant checkpoint metadata has unknown fields {unknown}")
    modules = meta.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise ValueError("optquant checkpoint metadata has no 'modules' (nothing is quantised?)")
    for name, entry in modules.items():
        _check_module(name, entry)
    unquantised = meta.get("unquantised")
    if not isinstance(unquantised, dict):
        raise ValueError("optquant checkpoint metadata field 'unquantised' must be an object")
    for key, spec in unquantised.items():
        _check_tensor_spec(f"optquant metadata for unquantised tensor {key}", spec, None)
    return meta


def _read_shard(path: str) -> tuple[str | None, dict[str, tuple[list[int], str]]]:
    """``(optquant metadata text, {key: (shape, dtype name)})`` from one shard's header."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get(METADATA_KEY)
            header = {}
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                sl = f.get_slice(key)
                header[key] = (list(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own non-ValueError type
        raise ValueError(f"checkpoint shard {path} is not a readable safetensors file "
                         f"({type(err).__name__}: {err}); it is truncated or corrupt") from err
    return text, header


def read_checkpoint(files: Sequence[str]) -> tuple[dict[str, Any], dict[str, tuple[list[int], str]]]:
    """Read and validate the optquant metadata and every tensor's ``(shape, dtype name)`` from
    the safetensors headers of ``files``; the unquantised tensors' bytes are checked against
    their CRC32 here (encoded tensors are checked once loaded, by :func:`verify_module`)."""
    files = [str(f) for f in files or []]
    if not files or not all(f.endswith(".safetensors") for f in files):
        raise ValueError("a pre-quantised optquant model must be loaded from safetensors files; got "
                         f"{[f.rsplit('/', 1)[-1] for f in files] or 'no checkpoint files'}")
    texts, header, where = set(), {}, {}
    for path in files:
        text, shard = _read_shard(path)
        if text is None:
            raise ValueError(f"checkpoint shard {path} has no '{METADATA_KEY}' metadata: it was not written by "
                             "hf-optquant (or the metadata was stripped)")
        texts.add(text)
        header.update(shard)
        where.update(dict.fromkeys(shard, path))
    if len(texts) != 1:
        raise ValueError("checkpoint shards carry different optquant metadata; the checkpoint is inconsistent")
    meta = parse_metadata(texts.pop())
    _verify_file_tensors(meta["unquantised"], header, where)
    return meta, header


def _verify_file_tensors(specs: Mapping[str, Any], header: Mapping[str, tuple[list[int], str]],
                         where: Mapping[str, str]) -> None:
    """CRC32 of each unquantised tensor's stored bytes (in whatever shard holds it)."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for key, spec in specs.items():
        if key not in header:
            continue  # a tied alias transformers did not save, or a renamed key: checked after loading
        shape, dtype = header[key]
        if dtype not in _ST_DTYPES.values():
            continue  # a dtype this module cannot name; the post-load check still covers it
        if shape != spec["shape"] or dtype != spec["dtype"]:
            raise ValueError(f"tensor {key} is {dtype}{shape} in {where[key]} but the optquant metadata says "
                             f"{spec['dtype']}{spec['shape']}")
        by_file.setdefault(where[key], []).append(key)
    for path, keys in by_file.items():
        try:
            with safe_open(path, framework="pt") as f:
                crcs = {key: tensor_crc32(f.get_tensor(key)) for key in keys}
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"checkpoint shard {path} could not be read ({type(err).__name__}: {err})") from err
        for key, crc in crcs.items():
            if crc != specs[key]["crc32"]:
                raise ValueError(f"checksum mismatch for tensor {key} in {path}: crc32 {crc:#010x}, metadata says "
                                 f"{specs[key]['crc32']:#010x} (the checkpoint is corrupt)")


def expected_keys(name: str, entry: Mapping[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{state-dict key: (EncodedTensor key, tensor spec)}`` for one module's encoded tensors."""
    return {f"{name}.{buffer_name(key)}": (key, spec) for key, spec in entry["tensors"].items()}


def check_checkpoint(meta: Mapping[str, Any], header: Mapping[str, tuple[list[int], str]]) -> None:
    """Compare the metadata against the safetensors header: missing/extra encoded tensors,
    shape or dtype mismatches, full-precision weights stored next to encoded ones."""
    expected: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, entry in meta["modules"].items():
        expected.update(expected_keys(name, entry))
        if f"{name}.weight" in header:
            raise ValueError(f"checkpoint holds both a full-precision {name}.weight and optquant encoded tensors "
                             f"for {name}")
        if entry.get("bias", False) and f"{name}.bias" not in header:
            raise ValueError(f"checkpoint is missing tensor {name}.bias (the metadata says {name} has a bias)")
    for key, (tkey, spec) in expected.items():
        if key not in header:
            raise ValueError(f"checkpoint is missing encoded tensor {key} ({tkey!r} of the optquant metadata)")
        shape, dtype = header[key]
        if shape != spec["shape"] or dtype != spec["dtype"]:
            raise ValueError(f"encoded tensor {key} is {dtype}{shape} in the checkpoint but the optquant metadata "
                             f"says {spec['dtype']}{spec['shape']}")
    extra = sorted(k for k in header if _ENCODED_KEY_RE.match(k) and k not in expected)
    if extra:
        raise ValueError(f"checkpoint has encoded tensor {extra[0]} that the optquant metadata does not describe"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def build_quant_linear(entry: Mapping[str, Any], device: torch.device | str | None = None,
                       bias_dtype: torch.dtype | None = None) -> QuantLinear:
    """An empty :class:`QuantLinear` (buffers uninitialised, e.g. on ``meta``) for one entry."""
    enc = EncodedTensor.from_metadata(dict(entry), {})
    specs = {k: (tuple(s["shape"]), _DTYPES[s["dtype"]]) for k, s in entry["tensors"].items()}
    return QuantLinear(enc.format, enc.shape, enc.dtype, specs, bias=bool(entry.get("bias", False)),
                       bias_dtype=bias_dtype, device=device)


def verify_module(name: str, module: QuantLinear, entry: Mapping[str, Any], skip_meta: bool = False) -> None:
    """After loading: every encoded buffer has the metadata's shape/dtype and CRC32."""
    tensors = module.encoded_tensors()
    if set(tensors) != set(entry["tensors"]):
        raise ValueError(f"{name}: encoded tensors {sorted(tensors)} != metadata {sorted(entry['tensors'])}")
    for key, t in tensors.items():
        spec = entry["tensors"][key]
        full = f"{name}.{buffer_name(key)}"
        if list(t.shape) != spec["shape"] or dtype_name(t.dtype) != spec["dtype"]:
            raise ValueError(f"encoded tensor {full} loaded as {dtype_name(t.dtype)}{list(t.shape)}, expected "
                             f"{spec['dtype']}{spec['shape']}")
        if t.device.type == "meta":
            if skip_meta:
                continue
            raise ValueError(f"encoded tensor {full} was not loaded from the checkpoint")
        crc = tensor_crc32(t)
        if crc != spec["crc32"]:
            raise ValueError(f"checksum mismatch for encoded tensor {full}: crc32 {crc:#010x}, metadata says "
                             f"{spec['crc32']:#010x} (the checkpoint is corrupt)")
    if any(t.device.type == "meta" for t in tensors.values()):
        return
    try:
        module.format.validate_tensors(module.weight_shape, {k: t.cpu() for k, t in tensors.items()})
    except ValueError as err:
        raise ValueError(f"encoded tensors of {name} do not match its format: {err}") from None


def iter_quant_linears(model: nn.Module) -> Iterable[tuple[str, QuantLinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear))


def _resolve_key(state: Mapping[str, torch.Tensor], key: str, prefix: str) -> str | None:
    """``key`` as saved, adjusted for a model with/without the base-model prefix (None: absent)."""
    candidates = [key]
    if prefix:
        if key.startswith(prefix + "."):
            candidates.append(key[len(prefix) + 1:])
        candidates.append(f"{prefix}.{key}")
    return next((c for c in candidates if c in state), None)


def verify_unquantised(model: nn.Module, meta: Mapping[str, Any]) -> None:
    """After loading: every unquantised tensor loaded in its stored dtype has the metadata's CRC32.

    The raw bytes were already checked by :func:`read_checkpoint`; this second check catches a
    tensor that transformers did not find in the checkpoint (e.g. its key was renamed by a
    corrupted header) and re-initialised.  Tensors loaded in another dtype (``dtype=...``), on the
    meta device (offloaded), or that this model class does not have (another head) are skipped."""
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or ""
    for name, spec in meta.get("unquantised", {}).items():
        key = _resolve_key(state, name, prefix)
        if key is None:
            continue
        t = state[key]
        if t.device.type == "meta" or _any_dtype_name(t.dtype) != spec["dtype"]:
            continue
        if list(t.shape) != spec["shape"]:
            raise ValueError(f"tensor {key} loaded with shape {list(t.shape)}, the optquant metadata says "
                             f"{spec['shape']}")
        crc = tensor_crc32(t)
        if crc != spec["crc32"]:
            raise ValueError(f"checksum mismatch for tensor {key}: crc32 {crc:#010x}, metadata says "
                             f"{spec['crc32']:#010x} (the checkpoint is corrupt, or the tensor was missing from it "
                             "and re-initialised)")


def canonicalise_checkpoint(path: str | os.PathLike) -> list[str]:
    """Rewrite the ``__metadata__`` map of each safetensors file in sorted key order, in place.

    safetensors 0.8 writes that map in a random per-process order, so two saves of the same
    model differ by the order of ``optquant`` and ``format``; afterwards they are byte-identical.
    Only the header is rewritten, at its original length (tensor data is not touched).
    ``path`` is a file or a directory; returns the files that changed."""
    path = os.fspath(path)
    files = ([os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
             if os.path.isdir(path) else [path])
    return [f for f in files if _canonicalise_file(f)]


def _canonicalise_file(path: str) -> bool:
    with open(path, "r+b") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", prefix)
        raw = f.read(n) if n <= 100_000_000 else b""
        if len(raw) != n:
            raise ValueError(f"{path} is not a safetensors file (header length {n} exceeds the file)")
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} has a corrupt safetensors header: {err}") from None
        if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
            return False
        canonical = {"__metadata__": dict(sorted(header["__metadata__"].items()))}
        canonical.update((k, v) for k, v in header.items() if k != "__metadata__")
        text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > n:
            raise ValueError(f"{path}: the canonical header is longer than the original; not rewritten")
        text += b" " * (n - len(text))
        if text == raw:
            return False
        f.seek(8)
        f.write(text)
    return True
