"""transformers integration: ``OptQuantHfQuantizer``, registered as quant method ``"optquant"``.

Importing :mod:`hf_optquant` registers both the quantizer and :class:`OptQuantConfig` with
transformers, after which::

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=OptQuantConfig(bits=3.5))
    model.save_pretrained(out)                    # safetensors: encoded tensors + metadata
    model = AutoModelForCausalLM.from_pretrained(out)   # rebuilds QuantLinear, no re-quantisation

Fresh quantisation, with Fisher information (``config.needs_fisher``)
    The full-precision weights load as usual; ``_process_model_after_weight_loading`` then
    runs :func:`~hf_optquant.quantize.quantize_model` on the whole model (Fisher estimation
    needs the model assembled, so per-parameter quantise-on-load ops would not do) with
    ``apply="modules"``: every quantised nn.Linear (or GPT-2 Conv1D) becomes a
    :class:`~hf_optquant.nn.QuantLinear` and the full-precision weight is dropped.  The
    tokenizer for the calibration text is loaded from the same path.  The report is kept as
    ``model.optquant_report``.

Fresh quantisation without Fisher information: quantise while loading
    Uniform allocation with an unweighted fit needs nothing but the tensor itself, so each
    linear weight is quantised the moment transformers has read it (on the device it was
    loaded to) and its module replaced by a QuantLinear at once: the full-precision model is
    never assembled, and the peak is the packed model, the unquantised parameters and one
    weight with its fit's work arrays.  The hook is transformers' quantise-on-load protocol
    (``core_model_loading``): ``param_needs_quantization`` selects the weights (the rule of
    :func:`~hf_optquant.quantize.quantisable_modules`), ``get_quantize_ops`` returns a
    ``ConversionOps`` whose ``convert`` receives ``{param name: [tensor]}``, quantises it with
    :func:`~hf_optquant.quantize.quantize_tensor` (the very fit and encoding of quantize_model,
    so the checkpoint is byte-identical), swaps the module and returns nothing to load.  The
    protocol is the same in transformers 5.17 and 5.23 (both tested); it is found by feature
    detection (``ConversionOps`` importable, ``HfQuantizer.get_quantize_ops`` present), and
    where it is missing, or a weight never reaches the op, the whole-model path above
    quantises what is left after loading.  ``STREAM_WHEN_POSSIBLE = False`` forces the
    whole-model path (tests compare the two).

Pre-quantised loading
    ``_process_model_before_weight_loading`` reads the per-tensor metadata from the
    safetensors headers (see :mod:`hf_optquant.serialization`), checks it against the
    headers, and swaps the listed modules for empty QuantLinear modules whose buffers have
    the stored shapes/dtypes; transformers then loads the encoded tensors into those buffers
    like any other state-dict entry.  After loading, every buffer's CRC32 is verified.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import time
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils import logging

from .config import QUANT_METHOD, OptQuantConfig
from .model_utils import is_conv1d, set_submodule
from .nn.quant_linear import QuantLinear
from .serialization import (
    METADATA_KEY,
    build_quant_linear,
    check_checkpoint,
    collect_metadata,
    dumps_metadata,
    read_checkpoint,
    verify_module,
    verify_unquantised,
)

__all__ = ["OptQuantHfQuantizer", "register", "mark_quantized", "STREAM_WHEN_POSSIBLE"]

logger = logging.get_logger(__name__)

try:  # transformers' quantise-on-load protocol (5.x: 5.17 and 5.23 tested)
    from transformers.core_model_loading import ConversionOps
except ImportError:  # pragma: no cover - an older loader: quantise the whole model after loading
    ConversionOps = None

#: Quantise linear weights while they load when no Fisher information is needed.  False forces the
#: whole-model path (quantise after loading), which tests use as the reference.
STREAM_WHEN_POSSIBLE = True
STREAMING_SUPPORTED = ConversionOps is not None and hasattr(HfQuantizer, "get_quantize_ops")


class OptQuantHfQuantizer(HfQuantizer):
    """Quantise full-precision models on load, and save/load optquant checkpoints."""

    requires_calibration = False
    quantization_config: OptQuantConfig

    def __init__(self, quantization_config: OptQuantConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []
        self._checkpoint_metadata: dict[str, Any] | None = None
        self._module_names: dict[str, str] = {}  # checkpoint module name -> name in the model
        self._stream: _StreamState | None = None  # set when weights are quantised while loading

    # ---- checks --------------------------------------------------------------------------
    def validate_environment(self, device_map: Any = None, **kwargs: Any) -> None:
        if not isinstance(self.quantization_config, OptQuantConfig):
            raise ValueError(f"the optquant quantizer needs an OptQuantConfig, got "
                             f"{type(self.quantization_config).__name__}")
        if getattr(self.quantization_config, "dequantize", False):
            raise ValueError("optquant cannot dequantize on load; load the model and call model.dequantize()")
        values = device_map.values() if isinstance(device_map, dict) else [device_map]
        if any(str(v) == "disk" for v in values):
            raise ValueError("optquant cannot offload quantised weights to disk: use a device_map without 'disk' "
                             "entries (the encoded weights are small, CPU is enough)")

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        if dtype is None:
            return torch.get_default_dtype()
        if not dtype.is_floating_point:
            raise ValueError(f"optquant keeps activations and unquantised parameters in a floating-point dtype; "
                             f"dtype={dtype} is not one")
        return dtype

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_qat_trainable(self) -> bool:
        return False

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs: Any) -> bool:
        # only when streaming: with Fisher, quantisation runs on the whole loaded model (forward/backward passes)
        return self._stream is not None and param_name in self._stream.targets

    def get_quantize_ops(self):
        return _QuantiseOnLoad(self)

    def param_element_size(self, model: PreTrainedModel, param_name: str, param: torch.Tensor) -> float:
        """Bytes per element after loading, for transformers' memory planning (device_map="auto", the
        GPU allocator warm-up): a streamed weight takes about ``bits / 8``, not its full width."""
        if self.param_needs_quantization(model, param_name):
            return self.quantization_config.bits / 8
        return param.element_size()

    # ---- which modules ---------------------------------------------------------------------
    def _skip_list(self, model: PreTrainedModel) -> list[str]:
        skip = list(self.quantization_config.modules_to_not_convert)
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        for key in [*tied.keys(), *tied.values()]:
            module = key.rpartition(".")[0] if key.endswith((".weight", ".bias")) else key
            if module:
                skip.append(module)
        for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
            skip.extend(getattr(model, attr, None) or [])
        return sorted(set(skip))

    # ---- loading ---------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model: PreTrainedModel, checkpoint_files=None, **kwargs: Any):
        self.modules_to_not_convert = self._skip_list(model)
        if not self.pre_quantized:
            self._stream = self._plan_streaming(model)
            return model
        meta, header = read_checkpoint(checkpoint_files)
        check_checkpoint(meta, header)
        self._module_names = {}
        for name, entry in meta["modules"].items():
            target = _resolve_module_name(model, name)
            old = model.get_submodule(target)
            weight = getattr(old, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
                raise ValueError(f"optquant checkpoint quantises {name}, but the model's {target} is a "
                                 f"{type(old).__name__} without a 2-D weight")
            shape = list(weight.shape)[::-1] if type(old).__name__ == "Conv1D" else list(weight.shape)
            if shape != list(entry["shape"]):
                raise ValueError(f"optquant checkpoint has weight shape {entry['shape']} for {name}, but the model's "
                                 f"{target} has {shape}")
            old_bias = getattr(old, "bias", None)
            if (old_bias is not None) != bool(entry.get("bias", False)):
                raise ValueError(f"optquant checkpoint says {name} has bias={entry.get('bias', False)}, but the "
                                 f"model's {target} has bias={old_bias is not None}")
            module = build_quant_linear(entry, device=weight.device,
                                        bias_dtype=None if old_bias is None else old_bias.dtype)
            set_submodule(model, target, module)
            module._is_hf_initialized = True  # nothing to initialise: every buffer comes from the checkpoint
            self._module_names[name] = target
        _shield_parents_from_init(model, self._module_names.values())
        self._checkpoint_metadata = meta
        return model

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any):
        if self.pre_quantized:
            meta = self._checkpoint_metadata
            if meta is None:
                raise ValueError("optquant: no checkpoint metadata was read before loading the weights")
            for name, target in self._module_names.items():
                module = model.get_submodule(target)
                offloaded = getattr(getattr(module, "_hf_hook", None), "offload", False)
                verify_module(target, module, meta["modules"][name], skip_meta=bool(offloaded))
            verify_unquantised(model, meta)
            return model
        if self._stream is not None:
            self._finish_streaming(model)
        else:
            self._quantize(model)
        return model

    # ---- quantise while loading (no Fisher) ------------------------------------------------------
    def _config(self, model: PreTrainedModel) -> OptQuantConfig:
        """The effective config: the user's, with the modules kept in full precision filled in."""
        config = copy.deepcopy(self.quantization_config)
        config.modules_to_not_convert = self.modules_to_not_convert or self._skip_list(model)
        return config

    def _adopt(self, model: PreTrainedModel, config: OptQuantConfig, report: Any) -> None:
        """Record a finished quantisation on the model (report, config for save_pretrained)."""
        model.optquant_report = report
        self.quantization_config = config
        model.config.quantization_config = config
        gc.collect()

    def _plan_streaming(self, model: PreTrainedModel) -> _StreamState | None:
        if not (STREAM_WHEN_POSSIBLE and STREAMING_SUPPORTED) or self.quantization_config.needs_fisher:
            return None
        from .quantize import quantisable_modules

        names = list(quantisable_modules(model, self.modules_to_not_convert))
        if not names:
            return None  # quantize_model says why (no linear to quantise)
        return _StreamState(self._config(model), names, {f"{n}.weight": n for n in names}, time.perf_counter())

    def _quantise_loaded(self, model: PreTrainedModel, key: str, value: Any, missing_keys: set | None) -> bool:
        """Quantise the weight ``key`` just read (``value``: a tensor or a one-tensor list) and swap its
        module for a QuantLinear; False when it is not ours to quantise (transformers then loads it)."""
        state = self._stream
        name = None if state is None else state.targets.get(key)
        tensors = value if isinstance(value, (list, tuple)) else [value]
        if name is None or model is None or missing_keys is None or len(tensors) != 1:
            return False
        if state.errors:  # an earlier weight failed and the load will fail: do not quantise the rest
            return True
        try:
            self._quantise_module(model, name, tensors[0])
        except Exception as err:  # noqa: BLE001 - transformers would turn it into a RuntimeError: raise it after
            state.errors.append((name, err))  # loading (the key stays missing, so transformers initialises it)
            return True
        missing_keys.discard(key)
        return True

    def _quantise_module(self, model: PreTrainedModel, name: str, w: torch.Tensor) -> None:
        from .quantize import check_finite, quantize_tensor

        state = self._stream
        module = model.get_submodule(name)
        with torch.no_grad():
            # the whole-model path sees the weight in the module's dtype, Conv1D ones as nn.Linear [out, in]
            w = w.detach().to(module.weight.dtype)
            w = (w.t() if is_conv1d(module) else w).contiguous()
            if tuple(w.shape) != _linear_shape(module):
                raise ValueError(f"optquant: the checkpoint's {name}.weight has shape {tuple(w.shape)} (as [out, in]), "
                                 f"the model expects {_linear_shape(module)}")
            check_finite(name, w)
            encoded, report = quantize_tensor(name, w, state.config, float(state.config.bits), state.times)
            start = time.perf_counter()
            bias = getattr(module, "bias", None)
            if bias is not None and bias.device.type == "meta":  # not read yet: transformers fills it in later
                bias = torch.zeros(bias.shape, dtype=bias.dtype)
            new = QuantLinear.from_encoded(encoded, bias, device=w.device)
            new._is_hf_initialized = True
            set_submodule(model, name, new)
            _shield_parents_from_init(model, [name])
            state.times["apply_s"] = state.times.get("apply_s", 0.0) + time.perf_counter() - start
        state.reports.append(report)

    def _finish_streaming(self, model: PreTrainedModel) -> None:
        from .quantize import build_report, unquantised_size

        state = self._stream
        if state.errors:
            name, err = state.errors[0]
            self._stream = None
            if not isinstance(err, ValueError):
                raise err
            raise ValueError(f"optquant could not quantise {name} while loading: {err}") from err
        streamed = len(state.reports)
        for name in state.names:  # weights the loader did not hand to the op (another loading path)
            module = model.get_submodule(name)
            if isinstance(module, QuantLinear):
                continue
            if module.weight.device.type == "meta":
                raise ValueError(f"optquant cannot quantise {name}: its weight is on the meta device (offloaded); "
                                 "quantise with the whole model on CPU/GPU")
            self._quantise_module(model, name, module.weight)
        for name in state.names:  # a bias read after its weight was loaded as a trainable Parameter
            bias = model.get_submodule(name).bias
            if bias is not None:
                bias.requires_grad_(False)
        other_bits, other_params = unquantised_size(model)
        timings = {"workers": 0.0, **state.times, "streamed": float(streamed),
                   "total_s": time.perf_counter() - state.started}
        report = build_report(state.config, state.names, state.reports, other_bits, other_params, None, timings)
        self._stream = None
        self._adopt(model, state.config, report)

    def _quantize(self, model: PreTrainedModel) -> None:
        from .quantize import quantize_model

        config = self._config(model)
        for name, p in model.named_parameters():
            if p.device.type == "meta":
                raise ValueError(f"optquant cannot quantise {name}: it is on the meta device (offloaded); "
                                 "quantise with the whole model on CPU/GPU")
        tokenizer = self._calibration_tokenizer(model, config) if config.needs_fisher else None
        was_training = model.training
        model.eval()
        with torch.enable_grad():
            _, report = quantize_model(model, config, tokenizer=tokenizer, apply="modules",
                                       progress=logging.is_progress_bar_enabled())
        model.train(was_training)
        self._adopt(model, config, report)

    @staticmethod
    def _calibration_tokenizer(model: PreTrainedModel, config: OptQuantConfig):
        path = getattr(model.config, "name_or_path", None) or getattr(model, "name_or_path", None)
        if not path:
            raise ValueError(f"OptQuantConfig(allocation={config.allocation!r}) needs a tokenizer for its calibration "
                             "text but the model has no name_or_path; use allocation='uniform' or quantize_model()")
        from transformers import AutoTokenizer

        need = (f"OptQuantConfig(allocation={config.allocation!r}, weighted_fit={config.weighted_fit}) needs a "
                "tokenizer for its calibration text")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            ids = tokenizer("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)["input_ids"]
        except Exception as err:  # noqa: BLE001 - any failure means "no usable tokenizer"
            raise ValueError(f"{need}, but none could be loaded from {path!r} ({type(err).__name__}: {err}); "
                             "save one there or use allocation='uniform'") from err
        # transformers 5 may build an empty tokenizer from a bare model directory
        vocab = model.get_input_embeddings().num_embeddings if model.get_input_embeddings() is not None else None
        if not ids or (vocab is not None and max(ids) >= vocab):
            raise ValueError(f"{need}, but the tokenizer found at {path!r} is empty or does not match the model's "
                             "vocabulary; save the right one there or use allocation='uniform'")
        return tokenizer

    # ---- saving ------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, model: PreTrainedModel, *args: Any, **kwargs: Any):
        return None, {METADATA_KEY: dumps_metadata(collect_metadata(model))}

    def _dequantize(self, model: PreTrainedModel, dtype: torch.dtype | None = None):
        for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
            tensors = module.encoded_tensors()
            device = next(iter(tensors.values())).device
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=device, dtype=dtype or module.weight_dtype)
            with torch.no_grad():
                linear.weight.copy_(module.dequantize(linear.weight.dtype, device))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            set_submodule(model, name, linear)
        return model


@dataclasses.dataclass
class _StreamState:
    """What quantise-while-loading accumulates between the loader's calls."""

    config: OptQuantConfig  # the effective config (modules_to_not_convert filled in)
    names: list[str]  # modules to quantise, in module order
    targets: dict[str, str]  # "<module>.weight" -> module
    started: float
    reports: list = dataclasses.field(default_factory=list)
    times: dict[str, float] = dataclasses.field(default_factory=dict)
    errors: list[tuple[str, Exception]] = dataclasses.field(default_factory=list)


if ConversionOps is not None:
    class _QuantiseOnLoad(ConversionOps):
        """transformers' per-tensor quantise op: called with ``{param name: [tensor]}`` as each selected
        weight is read; quantises it into a QuantLinear and returns only what transformers should still
        load itself (nothing, for a quantised weight)."""

        def __init__(self, quantizer: OptQuantHfQuantizer):
            self.quantizer = quantizer

        def convert(self, input_dict: dict[str, Any], model: Any = None, missing_keys: set | None = None,
                    **kwargs: Any) -> dict[str, Any]:
            return {key: value for key, value in input_dict.items()
                    if not self.quantizer._quantise_loaded(model, key, value, missing_keys)}
else:  # pragma: no cover
    _QuantiseOnLoad = None


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    shape = tuple(module.weight.shape)
    return shape[::-1] if is_conv1d(module) else shape


def mark_quantized(model: PreTrainedModel, config: OptQuantConfig, report: Any = None) -> None:
    """Make a model quantised with :func:`~hf_optquant.quantize.quantize_model` (``apply="modules"``)
    look like one from ``from_pretrained(..., quantization_config=config)``: ``save_pretrained`` then
    writes an optquant checkpoint that ``from_pretrained(dir)`` reloads."""
    model.hf_quantizer = OptQuantHfQuantizer(config, pre_quantized=False)
    model.config.quantization_config = config
    if report is not None:
        model.optquant_report = report


def _shield_parents_from_init(model: nn.Module, names) -> None:
    """Model-specific ``_init_weights`` may touch a child's ``.weight`` from the parent (GPT-2 re-initialises
    ``attn.c_proj.weight`` from GPT2Attention), which a QuantLinear does not have.  A parent with no
    parameters or buffers of its own has nothing to initialise itself, so mark it initialised; its children
    are still visited (and initialised if missing) on their own."""
    for name in names:
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if parent is model or isinstance(parent, PreTrainedModel):
            continue
        if next(parent.named_parameters(recurse=False), None) is None and \
                next(parent.named_buffers(recurse=False), None) is None:
            parent._is_hf_initialized = True


def _resolve_module_name(model: nn.Module, name: str) -> str:
    """``name`` as saved, adjusted for a model with/without the base-model prefix."""
    candidates = [name]
    prefix = getattr(model, "base_model_prefix", "")
    if prefix:
        if name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1:])
        candidates.append(f"{prefix}.{name}")
    for candidate in candidates:
        try:
            model.get_submodule(candidate)
        except AttributeError:
            continue
        return candidate
    raise ValueError(f"optquant checkpoint quantises module {name}, which this {type(model).__name__} does not have")


def _register(mapping: dict, key: str, cls: type, registrar) -> None:
    current = mapping.get(key)
    if current is cls:
        return
    if current is None:
        registrar(key)(cls)
    elif (current.__module__, current.__qualname__) == (cls.__module__, cls.__qualname__):
        mapping[key] = cls  # the same class from a reloaded module
    else:
        raise ValueError(f"transformers already has a quantization method {key!r} ({current.__module__}."
                         f"{current.__qualname__}); hf-optquant cannot register its own")


def register() -> None:
    """Register ``OptQuantConfig`` and ``OptQuantHfQuantizer`` with transformers (idempotent)."""
    _register(AUTO_QUANTIZATION_CONFIG_MAPPING, QUANT_METHOD, OptQuantConfig, register_quantization_config)
    _register(AUTO_QUANTIZER_MAPPING, QUANT_METHOD, OptQuantHfQuantizer, register_quantizer)


register()
