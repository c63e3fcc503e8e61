"""``QuantLinear``: a linear layer whose weight exists only as an :class:`EncodedTensor`.

The module holds the encoded tensors (packed or entropy-coded codes, scales, tables,
outliers) as **buffers**, so ``.to(device)``, accelerate device maps and ``state_dict`` /
safetensors all see them; the :class:`TensorFormat`, weight shape and dtype are plain
attributes (they travel as JSON metadata, see :mod:`hf_optquant.serialization`).

Buffer names
    EncodedTensor keys contain dots (``codes.payload``, ``scales.outer``), which buffer
    names cannot.  Key ``k`` is stored as buffer ``"weight__" + k.replace(".", "__")``, so the
    state-dict / safetensors key of ``codes.payload`` in ``model.layers.0.mlp.up_proj`` is
    ``model.layers.0.mlp.up_proj.weight__codes__payload``.  :func:`buffer_name` and
    :func:`tensor_key` are inverse; keys are restricted to segments of letters, digits and
    single inner underscores so the mapping is reversible.

Forward
    On the first call on a device the stored tensors are validated and turned into a *runtime
    weight* (:mod:`hf_optquant.nn.runtime`), cached until a buffer is replaced or modified in
    place or the module is moved: on CUDA with Triton, the Triton kernels' layout (LUT codes
    repacked for the fused dequantise-matmul; grid indices kept entropy-coded when the
    entropy-decoding kernels are available); otherwise the codes, scales and table on the
    device, dequantised by torch at each call.  None of these holds a full-precision weight.
    ``kernels=False`` forces the torch path, ``kernels=True`` the Triton kernels (on CPU they
    then run in Triton's interpreter, ``TRITON_INTERPRET=1``: for tests).  ``cache_weight=True``
    keeps the decoded full-precision weight instead (fastest on CPU, most memory).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import EncodedTensor, TensorFormat
from ..kernels import HAS_TRITON
from .runtime import RuntimeWeight, build_runtime

__all__ = ["QuantLinear", "BUFFER_PREFIX", "buffer_name", "tensor_key", "set_weight_cache"]

BUFFER_PREFIX = "weight__"
_KEY_RE = re.compile(r"^[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*(?:\.[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*)*$")


def buffer_name(key: str) -> str:
    """Buffer name for EncodedTensor key ``key`` (``scales.outer`` -> ``weight__scales__outer``)."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"encoded tensor key {key!r} cannot be mapped to a buffer name reversibly "
                         "(allowed: dot-separated segments of letters/digits with single inner underscores)")
    return BUFFER_PREFIX + key.replace(".", "__")


def tensor_key(name: str) -> str:
    """Inverse of :func:`buffer_name`."""
    if not name.startswith(BUFFER_PREFIX):
        raise ValueError(f"{name!r} is not a QuantLinear encoded-tensor buffer (expected prefix {BUFFER_PREFIX!r})")
    key = name[len(BUFFER_PREFIX):].replace("__", ".")
    if not _KEY_RE.match(key):
        raise ValueError(f"{name!r} is not a valid QuantLinear encoded-tensor buffer name")
    return key


class QuantLinear(nn.Module):
    """``y = x @ decode(W).T + b`` with ``W`` stored only in its encoded form.

    Args:
        format: the weight's :class:`TensorFormat`.
        shape: the weight's shape ``(out_features, in_features)``.
        weight_dtype: dtype the weight had (and decodes to) before casting to the input's.
        tensor_specs: ``{key: (shape, dtype)}`` of the encoded tensors; buffers are created
            empty (on the current default device, e.g. ``meta`` inside transformers'
            loading context) and filled by ``load_state_dict`` / from_pretrained.
        bias: whether there is a bias; ``bias_dtype`` its dtype.
        cache_weight: keep the decoded weight between forwards (off by default).
        kernels: ``None`` (Triton kernels on CUDA when available), ``True`` or ``False``.
    """

    def __init__(
        self,
        format: TensorFormat,
        shape: tuple[int, ...],
        weight_dtype: torch.dtype,
        tensor_specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
        bias: bool = False,
        bias_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        cache_weight: bool = False,
        kernels: bool | None = None,
    ):
        super().__init__()
        if not isinstance(format, TensorFormat):
            raise ValueError(f"QuantLinear.format must be a TensorFormat, got {type(format).__name__}")
        if len(shape) != 2:
            raise ValueError(f"QuantLinear weight shape must be 2-D (out_features, in_features), got {shape}")
        if not tensor_specs:
            raise ValueError("QuantLinear needs at least one encoded tensor")
        self.format = format
        self.out_features, self.in_features = (int(s) for s in shape)
        self.weight_dtype = weight_dtype
        self.cache_weight = cache_weight
        self.kernels = kernels
        self._cache: tuple[Any, torch.Tensor] | None = None
        self._runtime: tuple[Any, RuntimeWeight] | None = None
        self._keys: list[str] = []
        for key, (tshape, tdtype) in tensor_specs.items():
            self.register_buffer(buffer_name(key), torch.empty(tuple(tshape), dtype=tdtype, device=device))
            self._keys.append(key)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=bias_dtype or weight_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # ---- construction ----------------------------------------------------------------
    @classmethod
    def from_encoded(cls, encoded: EncodedTensor, bias: torch.Tensor | None = None,
                     device: torch.device | str | None = None, cache_weight: bool = False) -> QuantLinear:
        specs = {k: (tuple(t.shape), t.dtype) for k, t in encoded.tensors.items()}
        module = cls(encoded.format, encoded.shape, encoded.dtype, specs, bias=bias is not None,
                     bias_dtype=None if bias is None else bias.dtype, device="meta", cache_weight=cache_weight)
        target = torch.device(device) if device is not None else None
        for key, t in encoded.tensors.items():
            module._buffers[buffer_name(key)] = t.detach().to(target if target is not None else t.device)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone().to(target if target is not None else bias.device),
                                       requires_grad=False)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Module, encoded: EncodedTensor, cache_weight: bool = False) -> QuantLinear:
        """A QuantLinear for ``linear`` (an nn.Linear, or anything with ``weight``/``bias`` of that
        layout) whose weight is ``encoded``; the encoded tensors go to the weight's device."""
        weight = linear.weight
        if tuple(weight.shape) != tuple(encoded.shape):
            raise ValueError(f"encoded weight has shape {tuple(encoded.shape)}, the linear's weight "
                             f"{tuple(weight.shape)}")
        device = weight.device if weight.device.type != "meta" else None
        return cls.from_encoded(encoded, getattr(linear, "bias", None), device=device, cache_weight=cache_weight)

    # ---- access ------------------------------------------------------------------------
    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def tensor_keys(self) -> list[str]:
        return list(self._keys)

    def encoded_tensors(self) -> dict[str, torch.Tensor]:
        """``{EncodedTensor key: buffer}`` (the stored bytes, on the module's device)."""
        return {k: self._buffers[buffer_name(k)] for k in self._keys}

    @property
    def encoded(self) -> EncodedTensor:
        return EncodedTensor(self.format, self.weight_shape, self.weight_dtype, self.encoded_tensors())

    @property
    def nbits(self) -> int:
        return 8 * sum(t.numel() * t.element_size() for t in self.encoded_tensors().values())

    @property
    def bits_per_element(self) -> float:
        return self.nbits / max(1, self.out_features * self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """The decoded weight (decoded on CPU, then moved to ``device``, default the buffers' device)."""
        tensors = self.encoded_tensors()
        if any(t.device.type == "meta" for t in tensors.values()):
            raise ValueError("QuantLinear buffers are on the meta device (not loaded yet); cannot decode")
        here = next(iter(tensors.values())).device
        enc = EncodedTensor(self.format, self.weight_shape, self.weight_dtype,
                            {k: t.cpu() for k, t in tensors.items()})
        w = self.format.decode(enc)
        return w.to(device=device if device is not None else here, dtype=dtype or self.weight_dtype)

    def _cache_key(self, dtype: torch.dtype, device: torch.device) -> tuple:
        return (dtype, device, tuple((t.data_ptr(), t._version) for t in self.encoded_tensors().values()))

    def clear_cache(self) -> None:
        self._cache = None
        self._runtime = None

    def use_kernels(self, device: torch.device) -> bool:
        if self.kernels is not None:
            return self.kernels
        return device.type == "cuda" and HAS_TRITON

    def runtime_weight(self, device: torch.device | str) -> RuntimeWeight:
        """The cached runtime form of the weight on ``device`` (built on first use)."""
        device = torch.device(device)
        kernels = self.use_kernels(device)
        key = (kernels, self._cache_key(None, device))
        if self._runtime is None or self._runtime[0] != key:
            self._runtime = None  # free the old one before building the new one
            encoded = self.encoded
            if any(t.device.type == "meta" for t in encoded.tensors.values()):
                raise ValueError("QuantLinear buffers are on the meta device (not loaded yet); cannot run forward")
            self._runtime = (key, build_runtime(encoded, device, kernels))
        return self._runtime[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantised_linear(x)

    # TorchDynamo must not trace this: the runtime weight is built (decoders, numpy, scipy) and
    # cached on first use, and the Triton kernels keep launch caches of their own. Under
    # torch.compile the graph breaks around each QuantLinear instead (tests/test_runtime.py).
    @torch.compiler.disable
    def _quantised_linear(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        if self.cache_weight:
            key = self._cache_key(x.dtype, x.device)
            if self._cache is None or self._cache[0] != key:
                self._cache = (key, self.dequantize(x.dtype, x.device))
            return F.linear(x, self._cache[1], bias)
        self._cache = None
        y = self.runtime_weight(x.device).linear(x)
        return y if bias is None else y + bias

    # ---- module plumbing ---------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        # ``.to(dtype)`` / ``.half()`` must not cast the encoded bytes (a float32 lut or bf16
        # scales cast to another dtype would no longer decode); only device moves apply.
        before = {name: self._buffers[name] for name in map(buffer_name, self._keys)}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and old is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        self.clear_cache()
        return self

    def extra_repr(self) -> str:
        el = self.format.element
        scaling = self.format.scaling
        desc = f"{el.kind}, {scaling.granularity}"
        if scaling.granularity == "block":
            desc += f"{scaling.block_size}"
        desc += f" {scaling.statistic}/{scaling.scale_format}"
        if self.format.sparse is not None:
            desc += f", sparse={self.format.sparse.fraction:g}"
        if self.format.rotation is not None:
            desc += f", rotation={self.format.rotation.block_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format=[{desc}], bits={self.bits_per_element:.3f}/weight, "
                f"cache_weight={self.cache_weight}")


def set_weight_cache(model: nn.Module, enabled: bool = True) -> int:
    """Turn the decoded-weight cache of every :class:`QuantLinear` in ``model`` on or off (e.g. after
    ``from_pretrained``: faster repeated forwards at the cost of one full-precision copy of each
    weight).  Returns how many modules were changed."""
    count = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.cache_weight = enabled
            module.clear_cache()
            count += 1
    return count
