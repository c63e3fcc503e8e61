"""hf-optquant: optimal weight-quantisation formats (Orr, Ribar, Luschi 2025) for transformers.

Importing the package registers the ``"optquant"`` quantization method with transformers
(:class:`OptQuantConfig` + :class:`~hf_optquant.quantizer.OptQuantHfQuantizer`).
"""

from .config import OptQuantConfig  # noqa: F401
from .formats import TensorFormat  # noqa: F401
from .hub import model_card, push_to_hub  # noqa: F401
from .nn import QuantLinear  # noqa: F401
from .quantizer import OptQuantHfQuantizer  # noqa: F401  (registers "optquant" with transformers)

__version__ = "0.1.0"
