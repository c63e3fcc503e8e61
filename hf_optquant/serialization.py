"""On-disk format of optquant checkpoints (safetensors only, never pickle).

Where things live
    * The encoded tensors are ordinary safetensors entries, one per EncodedTensor key, named
      ``<module>.weight__<key with "." -> "__">`` (see :mod:`hf_optquant.nn.quant_linear`),
      e.g. ``model.layers.0.self_attn.q_proj.weight__codes__payload``.
    * Everything needed to rebuild and check them is one JSON document stored in the
      safetensors **header metadata** under the key ``"optquant"`` (written into every shard
      by ``save_pretrained`` through ``HfQuantizer.get_state_dict_and_metadata``)::

        {"format_version": 1,
         "modules": {"model.layers.0.self_attn.q_proj": {
             "format": {...TensorFormat spec...}, "shape": [out, in], "dtype": "float32",
             "bias": false,
             "tensors": {"codes.payload": {"shape": [1911], "dtype": "int16", "crc32": 123}, ...}}}}

      The metadata sits next to the bytes it describes (so a shard cannot be paired with the
      wrong description) and ``config.json``'s ``quantization_config`` stays the plain
      user-facing :class:`~hf_optquant.config.OptQuantConfig` (whose constructor rejects
      unknown fields, so per-tensor data could not round-trip there anyway).

Validation on load (every failure is a ``ValueError`` naming the tensor or module):
unknown ``format_version``, malformed JSON/spec, shards with differing metadata, missing or
extra encoded tensors, shape/dtype mismatches between the metadata and the safetensors
header (checked before any weight is read), and a CRC32 mismatch of any stored tensor's
bytes (checked after loading).  Entropy-coded streams carry their own CRC on top.
"""

from __future__ import annotations

import json
import re
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
    "collect_metadata",
    "dumps_metadata",
    "parse_metadata",
    "read_checkpoint",
    "check_checkpoint",
    "build_quant_linear",
    "verify_module",
    "expected_keys",
]

FORMAT_VERSION = 1
METADATA_KEY = "optquant"

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


def tensor_crc32(t: torch.Tensor) -> int:
    """CRC32 of the tensor's bytes in row-major, native (little-endian) order."""
    data = t.detach().contiguous().cpu().reshape(-1)
    if data.numel() == 0:
        return 0
    return zlib.crc32(data.view(torch.uint8).numpy().tobytes()) & 0xFFFFFFFF


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


def collect_metadata(model: nn.Module) -> dict[str, Any]:
    """``{"format_version", "modules"}`` for every :class:`QuantLinear` in ``model``."""
    modules = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            tensors = module.encoded_tensors()
            if any(t.device.type == "meta" for t in tensors.values()):
                raise ValueError(f"cannot save {name}: its encoded tensors are on the meta device (offloaded?)")
            modules[name] = module_metadata(module.encoded, module.bias is not None)
    return {"format_version": FORMAT_VERSION, "modules": modules}


def dumps_metadata(meta: Mapping[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"))


# ---- reading -------------------------------------------------------------------------------
def _check_shape(where: str, shape: Any) -> list[int]:
    if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                            for s in shape)):
        raise ValueError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    return shape


def parse_metadata(text: str | Mapping[str, Any]) -> dict[str, Any]:
    """Parse and structurally validate the metadata document; raises ValueError."""
    if isinstance(text, str):
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"optquant checkpoint metadata is not valid JSON: {err}") from None
    else:
        meta = dict(text)
    if not isinstance(meta, dict):
        raise ValueError("optquant checkpoint metadata must be a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"optquant checkpoint format_version {version!r} is not supported "
                         f"(this hf-optquant reads version {FORMAT_VERSION})")
    modules = meta.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise ValueError("optquant checkpoint metadata has no 'modules' (nothing is quantised?)")
    for name, entry in modules.items():
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
            where = f"optquant metadata for tensor {name}.{key}"
            buffer_name(key)
            if not isinstance(spec, dict):
                raise ValueError(f"{where} must be an object")
            _check_shape(where, spec.get("shape"))
            if spec.get("dtype") not in _DTYPES:
                raise ValueError(f"{where}: dtype must be one of {sorted(_DTYPES)}, got {spec.get('dtype')!r}")
            crc = spec.get("crc32")
            if not (isinstance(crc, int) and not isinstance(crc, bool) and 0 <= crc < 2**32):
                raise ValueError(f"{where}: crc32 must be an unsigned 32-bit int, got {crc!r}")
    return meta


def read_checkpoint(files: Sequence[str]) -> tuple[dict[str, Any], dict[str, tuple[list[int], str]]]:
    """Read the optquant metadata and every tensor's ``(shape, dtype name)`` from the
    safetensors headers of ``files`` (no tensor data is read)."""
    from safetensors import safe_open

    files = [str(f) for f in files or []]
    if not files or not all(f.endswith(".safetensors") for f in files):
        raise ValueError("a pre-quantised optquant model must be loaded from safetensors files; got "
                         f"{[f.rsplit('/', 1)[-1] for f in files] or 'no checkpoint files'}")
    texts, header = set(), {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get(METADATA_KEY)
            if text is None:
                raise ValueError(f"checkpoint shard {path} has no '{METADATA_KEY}' metadata: it was not written by "
                                 "hf-optquant (or the metadata was stripped)")
            texts.add(text)
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                sl = f.get_slice(key)
                header[key] = (list(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
    if len(texts) != 1:
        raise ValueError("checkpoint shards carry different optquant metadata; the checkpoint is inconsistent")
    return parse_metadata(texts.pop()), header


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


def iter_quant_linears(model: nn.Module) -> Iterable[tuple[str, QuantLinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear))
