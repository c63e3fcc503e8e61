"""quantize_model end to end on tiny random-init models; the KL metric against references."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from hf_optquant.config import OptQuantConfig
from hf_optquant.eval import evaluate_against_reference, reference_outputs
from hf_optquant.eval.kl import _kl_per_token
from hf_optquant.quantize import quantize_model


def _tiny_llama(seed=0):
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def _tiny_gpt2(seed=0):
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=96, n_positions=64)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def test_topk_kl_is_exact_when_k_covers_the_vocabulary_and_a_lower_bound_otherwise():
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(50, 40, generator=g) * 2, -1)
    q = torch.log_softmax(p + 0.3 * torch.randn(50, 40, generator=g), -1)
    exact = (p.exp() * (p - q)).sum(-1)
    torch.testing.assert_close(_kl_per_token(p, q), exact.double(), rtol=1e-5, atol=1e-9)
    top = torch.topk(p, 8, -1).indices
    coarse = _kl_per_token(p.gather(-1, top), q.gather(-1, top))
    assert bool((coarse <= exact.double() + 1e-12).all()) and float(coarse.mean()) > 0.3 * float(exact.mean())


def test_evaluation_of_an_unchanged_model_gives_zero_kl():
    model = _tiny_llama()
    seqs = torch.randint(0, 96, (3, 20))
    ref = reference_outputs(model, seqs, k=16, progress=False)
    result = evaluate_against_reference(model, ref, progress=False)
    assert result.kl == pytest.approx(0.0, abs=1e-9)
    assert result.perplexity == pytest.approx(result.reference_perplexity, rel=1e-9)
    assert result.tokens == 3 * 19 and 40 < result.perplexity < 400  # ~uniform over 96 tokens


@pytest.mark.parametrize("make,allocation", [(_tiny_llama, "uniform"), (_tiny_gpt2, "fisher"),
                                             (_tiny_llama, "fisher-global")],
                         ids=["llama-uniform", "gpt2-fisher", "llama-global"])
def test_quantize_model_meets_budget_and_kl_falls_with_bits(make, allocation):
    seqs = torch.randint(0, 96, (4, 24))
    kls = []
    for bits in (2.5, 4.5):
        model = make()
        ref = reference_outputs(model, seqs, k=32, progress=False)
        config = OptQuantConfig(bits=bits, format="cube_root", allocation=allocation, min_bits=2, max_bits=6,
                                distribution="normal")
        encoded, report = quantize_model(model, config, calibration=seqs, progress=False)
        assert report.bits_per_param <= bits + 1e-9
        assert report.bits_per_param > bits - 0.75
        assert report.bits_per_param == pytest.approx(
            sum(e.nbits for e in encoded.values()) / sum(math.prod(e.shape) for e in encoded.values()))
        assert "lm_head" not in encoded and len(encoded) == (8 if make is _tiny_gpt2 else 14)
        kls.append(evaluate_against_reference(model, ref, progress=False).kl)
    assert 0 < kls[1] < kls[0]


def test_grid_quantisation_of_a_model_is_entropy_coded_within_budget():
    model = _tiny_llama()
    seqs = torch.randint(0, 96, (2, 16))
    encoded, report = quantize_model(model, OptQuantConfig(bits=3.0, format="grid"), calibration=seqs,
                                     progress=False)
    assert report.bits_per_param <= 3.0 + 1e-9 and report.bits_per_param > 2.8
    assert all(any(k.startswith("codes.") for k in e.tensors) for e in encoded.values())
    assert report.model_bits_per_param > report.bits_per_param  # embeddings stay in fp32


def test_fisher_allocation_refuses_a_budget_below_a_fixed_width_family():
    """NF4 with block-64 bf16 scales stores 4.25 b/p and nothing less: a 3.5 budget must fail, not overshoot."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32))
    ids = torch.randint(0, 64, (2, 16))
    with pytest.raises(ValueError, match=r"bits=3.5 is below what format='nf4' can store .*4.25"):
        quantize_model(model, OptQuantConfig(bits=3.5, format="nf4", allocation="fisher"), calibration=ids,
                       progress=False, apply="none")
