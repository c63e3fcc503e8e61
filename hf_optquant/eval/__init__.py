"""Evaluation against the unquantised model: KL divergence and perplexity."""

from .kl import (
    EvalResult,
    ReferenceOutputs,
    evaluate_against_reference,
    reference_outputs,
    text_to_sequences,
)

__all__ = ["EvalResult", "ReferenceOutputs", "evaluate_against_reference", "reference_outputs", "text_to_sequences"]
