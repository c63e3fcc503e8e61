"""push_to_hub: the upload goes through huggingface_hub to a Hub look-alike on localhost (no network here),
the card states the stored format, bits/parameter and the measured KL, and a download reloads identically."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from hub_server import FakeHub
from huggingface_hub import ModelCard, snapshot_download
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file
from tiny_models import VOCAB, byte_tokenizer, tiny_llama

import hf_optquant  # noqa: F401  (registers "optquant")
from hf_optquant import OptQuantConfig
from hf_optquant.eval import evaluate_against_reference, reference_outputs
from hf_optquant.hub import model_card, push_to_hub, storage_summary
from hf_optquant.nn import QuantLinear
from hf_optquant.serialization import canonicalise_checkpoint

REPO = "user/tiny-optquant"


@pytest.fixture(scope="module")
def quantised(tmp_path_factory):
    torch.manual_seed(0)
    src = tmp_path_factory.mktemp("src")
    reference = tiny_llama()
    reference.save_pretrained(src)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        src, quantization_config=OptQuantConfig(bits=4.0, format="int", allocation="uniform"))
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    evaluation = evaluate_against_reference(model, reference_outputs(reference, ids, k=None), progress=False)
    return model, evaluation


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_storage_summary_counts_the_encoded_bytes_and_every_parameter(quantised):
    model, _ = quantised
    summary = storage_summary(model)
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert summary.modules == len(quant) == 14  # 7 linears per layer, lm_head kept by default
    assert summary.quantised_bits == sum(8 * t.numel() * t.element_size()
                                         for m in quant for t in m.encoded_tensors().values())
    assert summary.quantised_params == sum(m.in_features * m.out_features for m in quant)
    # everything that is not an encoded weight is a parameter at its own width (float32 here)
    assert summary.other_bits == 32 * summary.other_params == 32 * sum(p.numel() for p in model.parameters())
    # the budget is all-inclusive: 4.0 b/p holds the codes plus bf16 block scales
    assert 3.0 < summary.bits_per_param <= 4.0
    assert summary.bits_per_param == pytest.approx(model.optquant_report.bits_per_param, rel=1e-12)
    assert summary.formats == {"int block-64": 14}


def test_push_uploads_checkpoint_tokenizer_and_card_and_download_reloads_identically(quantised, tmp_path):
    model, evaluation = quantised
    local = tmp_path / "local"
    model.save_pretrained(local)
    with FakeHub() as hub:
        info = push_to_hub(model, REPO, tokenizer=byte_tokenizer(), evaluation=evaluation, endpoint=hub.endpoint,
                           token="hf_test")
        files = dict(hub.repos[REPO].files)
        snapshot = snapshot_download(REPO, endpoint=hub.endpoint, cache_dir=tmp_path / "cache", token="hf_test")
    assert info.oid == hub.repos[REPO].sha
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(files)
    # the uploaded checkpoint holds exactly what save_pretrained writes, header canonicalised: the same bytes
    uploaded, saved = safetensors_load(files["model.safetensors"]), load_file(local / "model.safetensors")
    assert uploaded.keys() == saved.keys() and all(torch.equal(uploaded[k], saved[k]) for k in saved)
    canonicalise_checkpoint(local)
    assert files["model.safetensors"] == (local / "model.safetensors").read_bytes()
    header_len = int.from_bytes(files["model.safetensors"][:8], "little")
    metadata = json.loads(files["model.safetensors"][8:8 + header_len])["__metadata__"]
    assert list(metadata) == sorted(metadata)  # (the order safetensors writes is random per process)

    card = ModelCard(files["README.md"].decode())
    assert "hf-optquant" in card.data.tags and card.data.library_name == "transformers"
    summary = storage_summary(model)
    assert f"| bits / parameter, quantised tensors | {summary.bits_per_param:.3f} |" in card.text
    assert f"{evaluation.kl:.4f} ± {evaluation.kl_stderr:.4f}" in card.text
    assert f"{evaluation.perplexity:.3f}" in card.text and "int block-64 (14)" in card.text

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(snapshot)
    assert sum(isinstance(m, QuantLinear) for m in reloaded.modules()) == 14
    ids = torch.randint(0, VOCAB, (2, 16))
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))
    assert transformers.AutoTokenizer.from_pretrained(snapshot)("abc")["input_ids"] == \
        byte_tokenizer()("abc")["input_ids"]


def test_card_without_evaluation_says_quality_was_not_measured(quantised):
    model, _ = quantised
    text = str(model_card(model, REPO))
    assert "Not measured for this upload" in text
    assert re.search(r"bits / parameter, whole model \| \d+\.\d{3} \|", text)


def test_pushing_an_unquantised_model_fails_before_any_request(tmp_path):
    with FakeHub() as hub:
        with pytest.raises(ValueError, match="no QuantLinear modules"):
            push_to_hub(tiny_llama(), REPO, endpoint=hub.endpoint, token="hf_test")
        assert hub.requests == [] and not Path(tmp_path, "x").exists()
