"""Tiny random-init causal LMs and an offline byte-level tokenizer, shared by the tests.

Random weights are fine for plumbing tests (save/load/upload/dispatch); never for quality claims.
"""

from __future__ import annotations

import transformers

VOCAB = 256


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A 256-symbol byte-level BPE tokenizer with no merges: works offline, ids < VOCAB."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


def tiny_llama(layers: int = 2, hidden: int = 64, intermediate: int = 128) -> transformers.LlamaForCausalLM:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))


def tiny_qwen2(layers: int = 2, hidden: int = 64, intermediate: int = 96) -> transformers.Qwen2ForCausalLM:
    """Qwen2: q/k/v biases, tied embeddings (lm_head must stay unquantised)."""
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True))


def tiny_gpt2(layers: int = 2, hidden: int = 64) -> transformers.GPT2LMHeadModel:
    """GPT-2: projections are transformers' Conv1D (weight stored [in, out]), tied embeddings."""
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=layers, n_embd=hidden, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0))
