"""hf-optquant: optimal weight-quantisation formats (Orr, Ribar, Luschi 2025) for transformers."""

from .formats import TensorFormat  # noqa: F401

__version__ = "0.1.0"
