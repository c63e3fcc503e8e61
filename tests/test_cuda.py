"""QuantLinear on a CUDA device (skipped where there is none, e.g. in CI; run on the lent GPU):
from_pretrained with device_map="cuda" uses the Triton kernels, which must agree with the torch path
and with the CPU model; save/reload on the GPU gives identical logits."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import VOCAB, tiny_llama

import hf_optquant  # noqa: F401
from hf_optquant import OptQuantConfig
from hf_optquant.nn import QuantLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASES = {
    "int": (dict(bits=4.0, format="int", allocation="uniform"), "lut-kernel"),
    "nf4": (dict(bits=4.25, format="nf4", allocation="uniform"), "lut-kernel"),
    "cube_root": (dict(bits=3.25, format="cube_root", allocation="uniform", block_size=128), "lut-kernel"),
    "sparse": (dict(bits=4.5, format="int", allocation="uniform", sparse_fraction=0.005), "torch"),
    "grid": (dict(bits=3.5, format="grid", allocation="uniform"), None),  # grid kernel if available, else torch
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fp")
    tiny_llama(layers=2, hidden=256, intermediate=704).save_pretrained(path)
    return path


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_torch_path_and_cpu(name, dtype, source, tmp_path):
    kwargs, kind = CASES[name]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        source, quantization_config=OptQuantConfig(**kwargs), device_map="cuda", dtype=dtype)
    ids = torch.randint(0, VOCAB, (3, 40), device="cuda")
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert quant and all(m.weight__scales.is_cuda for m in quant)
    fast = _logits(model, ids)
    kinds = {m.runtime_weight(ids.device).kind for m in quant}
    if kind is not None:
        assert kinds == {kind}
    for m in quant:
        m.kernels = False
    slow = _logits(model, ids)
    tol = 2e-4 if dtype == torch.float32 else 6e-2
    torch.testing.assert_close(fast, slow, rtol=tol, atol=tol * slow.abs().max().item())
    cpu = _logits(model.to("cpu"), ids.cpu())  # torch path on the CPU, same dtype
    torch.testing.assert_close(fast.cpu(), cpu, rtol=tol, atol=tol * cpu.abs().max().item())

    model.to("cuda")
    for m in quant:
        m.kernels = None
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cuda", dtype=dtype)
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))


def test_generate_on_cuda_with_kernels_matches_the_torch_path(source):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        source, quantization_config=OptQuantConfig(bits=4.25, format="nf4", allocation="uniform"),
        device_map="cuda", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (1, 8), device="cuda")
    fast = model.generate(ids, max_new_tokens=16, do_sample=False)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernels = False
    slow = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(fast, slow)
