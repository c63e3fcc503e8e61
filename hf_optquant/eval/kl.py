"""KL divergence and perplexity of a quantised model against its unquantised reference.

KL is the paper's metric: the mean over predicted tokens of KL(p_ref || p_quant) of the
next-token distributions.  The reference is summarised by its top-k tokens (k = 128 by
default) and their log-probabilities; the rest of the vocabulary is merged into one
tail bin, so per token

    KL_k = sum_{top-k} p log(p / q) + p_tail log(p_tail / q_tail),

the KL between the two distributions coarsened to k + 1 bins.  It never exceeds the
full KL (data processing inequality) and equals it when the tail is negligible; with
``k = None`` the exact full-vocabulary KL is computed instead.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from tqdm.auto import tqdm

TAIL_FLOOR = 1e-5

__all__ = ["ReferenceOutputs", "EvalResult", "reference_outputs", "evaluate_against_reference", "text_to_sequences"]


@dataclasses.dataclass(frozen=True)
class ReferenceOutputs:
    sequences: torch.Tensor  # int64 [S, L] token ids
    top_ids: torch.Tensor  # int64 [S, L-1, k] (k = vocab when exact)
    top_logprobs: torch.Tensor  # float32 [S, L-1, k]
    nll: float  # reference mean negative log-likelihood of the text
    k: int | None

    @property
    def tokens(self) -> int:
        return self.sequences.shape[0] * (self.sequences.shape[1] - 1)


@dataclasses.dataclass(frozen=True)
class EvalResult:
    kl: float  # mean KL(p_ref || p_quant) per token, nats
    kl_stderr: float  # standard error over sequences
    perplexity: float
    reference_perplexity: float
    tokens: int
    k: int | None

    @property
    def delta_perplexity(self) -> float:
        return self.perplexity - self.reference_perplexity


def text_to_sequences(tokenizer, text: str, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping [S, seq_len] windows of the tokenised text, at most ``max_tokens`` tokens.

    Each window starts with the BOS token when the tokenizer adds one by default: models
    such as Gemma are trained with it, and without it their predictions (and so perplexity
    and KL) are badly off."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] != [bos]:
        bos = None
    body = seq_len - (bos is not None)
    count = min(ids.numel(), max_tokens) // body if body > 0 else 0
    if count == 0:
        raise ValueError(f"text has {ids.numel()} tokens: too few for one sequence of {seq_len}")
    windows = ids[: count * body].reshape(count, body)
    if bos is not None:
        windows = torch.cat([torch.full((count, 1), bos, dtype=windows.dtype), windows], dim=1)
    return windows


def _logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device)).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


@torch.no_grad()
def reference_outputs(model: nn.Module, sequences: torch.Tensor, k: int | None = 128,
                      progress: bool = True) -> ReferenceOutputs:
    tops, ids, nll = [], [], 0.0
    for row in tqdm(sequences, desc="reference", disable=not progress, unit="seq"):
        logp = _logprobs(model, row[None])[0]
        nll -= float(logp.gather(-1, row[1:, None]).sum())
        if k is None:
            tops.append(logp)
            ids.append(torch.arange(logp.shape[-1]).expand_as(logp))
        else:
            values, index = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
            tops.append(values)
            ids.append(index)
    tokens = sequences.shape[0] * (sequences.shape[1] - 1)
    return ReferenceOutputs(sequences, torch.stack(ids), torch.stack(tops), nll / tokens, k)


def _kl_per_token(ref_top: torch.Tensor, quant_top: torch.Tensor) -> torch.Tensor:
    p, q = ref_top.double().exp(), quant_top.double().exp()
    kl = (p * (ref_top.double() - quant_top.double())).sum(-1)
    # below ~1e-5 the tail mass is float32 rounding of the log-probabilities, not probability
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    q_tail = (1 - q.sum(-1)).clamp_min(1e-30)
    real_tail = p_tail > TAIL_FLOOR
    tail = p_tail * (p_tail.clamp_min(1e-30).log() - q_tail.log())
    tail = torch.where(real_tail, tail, torch.zeros_like(tail))
    return (kl + tail).clamp_min(0)


@torch.no_grad()
def evaluate_against_reference(model: nn.Module, reference: ReferenceOutputs, progress: bool = True) -> EvalResult:
    per_sequence, nll = [], 0.0
    for s, row in enumerate(tqdm(reference.sequences, desc="evaluate", disable=not progress, unit="seq")):
        logp = _logprobs(model, row[None])[0]
        nll -= float(logp.gather(-1, row[1:, None]).sum())
        quant_top = logp.gather(-1, reference.top_ids[s])
        per_sequence.append(float(_kl_per_token(reference.top_logprobs[s], quant_top).mean()))
    values = torch.tensor(per_sequence, dtype=torch.float64)
    stderr = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    tokens = reference.tokens
    return EvalResult(float(values.mean()), stderr, math.exp(nll / tokens), math.exp(reference.nll), tokens,
                      reference.k)
