"""torch modules for quantised models: :class:`QuantLinear` (weight held only in encoded form)."""

from .quant_linear import BUFFER_PREFIX, QuantLinear, buffer_name, set_weight_cache, tensor_key

__all__ = ["BUFFER_PREFIX", "QuantLinear", "buffer_name", "set_weight_cache", "tensor_key"]
