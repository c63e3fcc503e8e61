"""transformers integration: ``OptQuantHfQuantizer``, registered as quant method ``"optquant"``.

Importing :mod:`hf_optquant` registers both the quantizer and :class:`OptQuantConfig` with
transformers, after which::

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=OptQuantConfig(bits=3.5))
    model.save_pretrained(out)                    # safetensors: encoded tensors + metadata
    model = AutoModelForCausalLM.from_pretrained(out)   # rebuilds QuantLinear, no re-quantisation

Fresh quantisation
    The full-precision weights load as usual; ``_process_model_after_weight_loading`` then
    runs :func:`~hf_optquant.quantize.quantize_model` on the whole model (Fisher estimation
    needs the model assembled, so per-parameter quantise-on-load ops would not do) with
    ``apply="modules"``: every quantised nn.Linear (or GPT-2 Conv1D) becomes a
    :class:`~hf_optquant.nn.QuantLinear` and the full-precision weight is dropped.  The
    tokenizer for the calibration text is loaded from the same path when Fisher information
    is needed.  The report is kept as ``model.optquant_report``.

Pre-quantised loading
    ``_process_model_before_weight_loading`` reads the per-tensor metadata from the
    safetensors headers (see :mod:`hf_optquant.serialization`), checks it against the
    headers, and swaps the listed modules for empty QuantLinear modules whose buffers have
    the stored shapes/dtypes; transformers then loads the encoded tensors into those buffers
    like any other state-dict entry.  After loading, every buffer's CRC32 is verified.
"""

from __future__ import annotations

import copy
import gc
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
from .model_utils import set_submodule
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

__all__ = ["OptQuantHfQuantizer", "register", "mark_quantized"]

logger = logging.get_logger(__name__)


class OptQuantHfQuantizer(HfQuantizer):
    """Quantise full-precision models on load, and save/load optquant checkpoints."""

    requires_calibration = False
    quantization_config: OptQuantConfig

    def __init__(self, quantization_config: OptQuantConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []
        self._checkpoint_metadata: dict[str, Any] | None = None
        self._module_names: dict[str, str] = {}  # checkpoint module name -> name in the model

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
        # quantisation runs on the whole loaded model (Fisher needs forward/backward passes)
        return False

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
        self._quantize(model)
        return model

    def _quantize(self, model: PreTrainedModel) -> None:
        from .quantize import quantize_model

        config = copy.deepcopy(self.quantization_config)
        config.modules_to_not_convert = self.modules_to_not_convert or self._skip_list(model)
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
        model.optquant_report = report
        self.quantization_config = config
        model.config.quantization_config = config
        gc.collect()

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
