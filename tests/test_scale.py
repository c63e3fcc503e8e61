"""Layer-by-layer quantisation: same bytes as fitting each tensor alone, bounded memory, worker processes."""

from __future__ import annotations

import gc
import pickle
import weakref

import pytest
import torch
import transformers
from torch import nn

from hf_optquant.config import OptQuantConfig
from hf_optquant.fisher import estimate_fisher, linear_weights
from hf_optquant.formats import fit as fit_module
from hf_optquant.formats.fit import fit_format, relative_error, run_encode_job, start_fit
from hf_optquant.nn import QuantLinear
from hf_optquant.quantize import checkpoint_source, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")

ATTENTION_ONLY = ["lm_head", "mlp"]  # fewer grid tensors: each tiny one costs the coder ~2k sequential steps




def _tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # heavy-tailed weights, as in trained models
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.distributions.StudentT(5.0).sample(module.weight.shape) * 0.02)
    return model


def _same_bytes(a, b) -> bool:
    return a.format == b.format and a.shape == b.shape and list(a.tensors) == list(b.tensors) and all(
        torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def _linear_names(model, skip=("lm_head",)) -> list[str]:
    return list(linear_weights(model, skip=tuple(skip)))


class _Tracked:
    """A weight source that hands out fresh copies and counts how many are alive at once."""

    def __init__(self, state: dict[str, torch.Tensor], probe=None):
        self.state, self.probe = state, probe
        self.alive: set[int] = set()
        self.peak = 0
        self.calls: list[str] = []

    def __call__(self, name: str) -> torch.Tensor:
        if self.probe is not None:
            self.probe(name)
        t = self.state[name].clone()
        self.alive.add(id(t))
        weakref.finalize(t, self.alive.discard, id(t))
        self.peak = max(self.peak, len(self.alive))
        self.calls.append(name)
        return t


def _to_meta(model, names) -> None:
    for name in names:
        module = model.get_submodule(name)
        module.weight = nn.Parameter(torch.empty_like(module.weight, device="meta"), requires_grad=False)


def test_streamed_layer_by_layer_equals_fitting_each_tensor_alone_and_keeps_one_weight_alive():
    config = OptQuantConfig(bits=3.0, format="grid", allocation="uniform", modules_to_not_convert=ATTENTION_ONLY)
    resident = _tiny_llama()
    names = _linear_names(resident, ATTENTION_ONLY)
    state = {n: resident.get_submodule(n).weight.detach().clone() for n in names}
    alone = {n: fit_format(state[n], "grid", 3.0 + 1e-9, scaling=config.scaling()).encoded for n in names}

    enc_resident, report = quantize_model(resident, config, apply="modules", progress=False, workers=0)
    streamed = _tiny_llama()
    _to_meta(streamed, names)
    source = _Tracked(state)
    enc_streamed, _ = quantize_model(streamed, config, apply="modules", progress=False, workers=0, weights=source)

    assert list(enc_resident) == names and list(enc_streamed) == names
    # in order; a tensor is fetched again only when its coded size overshot (tiny tensors: coder overheads)
    assert list(dict.fromkeys(source.calls)) == names and report.timings["retries"] == len(source.calls) - len(names)
    assert all(_same_bytes(alone[n], enc_resident[n]) and _same_bytes(alone[n], enc_streamed[n]) for n in names)
    assert source.peak == 1 and not source.alive  # one full-precision weight at a time, none kept
    assert report.bits_per_param <= 3.0 + 1e-9
    for name in names:  # both models hold the same packed modules (streamed ones where the weights came from)
        a, b = resident.get_submodule(name), streamed.get_submodule(name)
        assert isinstance(a, QuantLinear) and isinstance(b, QuantLinear) and _same_bytes(a.encoded, b.encoded)
    for key in ("allocation_s", "fit_s", "encode_wait_s", "encode_cpu_s", "total_s"):
        assert report.timings[key] >= 0
    assert report.timings["total_s"] >= report.timings["fit_s"]


def test_resident_weights_are_released_as_each_module_is_swapped():
    model = _tiny_llama()
    names = _linear_names(model)
    originals = [weakref.ref(model.get_submodule(n).weight) for n in names]
    alive_at_fetch = []

    def probe(_name):
        gc.collect()
        alive_at_fetch.append(sum(r() is not None for r in originals))

    state = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    quantize_model(model, OptQuantConfig(bits=3.5, format="int", allocation="uniform"), apply="modules",
                   progress=False, workers=0, weights=_Tracked(state, probe))
    # inline encoding keeps one tensor in flight: when tensor i is fetched, modules 0..i-2 are QuantLinear
    # and their full-precision weights are gone
    assert alive_at_fetch == [len(names) - max(0, i - 1) for i in range(len(names))]
    gc.collect()
    assert all(r() is None for r in originals)


def test_fisher_allocation_streams_with_a_precomputed_estimate():
    config = OptQuantConfig(bits=3.0, format="int", allocation="fisher", min_bits=2, max_bits=5)
    seqs = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(2))
    resident = _tiny_llama()
    names = _linear_names(resident)
    fisher = estimate_fisher(resident, seqs, linear_weights(resident, skip=("lm_head",)), progress=False)
    state = {n: resident.get_submodule(n).weight.detach().clone() for n in names}
    enc_a, rep_a = quantize_model(resident, config, fisher=fisher, apply="none", progress=False, workers=0)
    streamed = _tiny_llama()
    _to_meta(streamed, names)
    with pytest.raises(ValueError, match="precomputed `fisher`"):
        quantize_model(streamed, config, apply="none", progress=False, workers=0, weights=_Tracked(state))
    source = _Tracked(state)
    enc_b, rep_b = quantize_model(streamed, config, fisher=fisher, apply="modules", progress=False, workers=0,
                                  weights=source)
    assert [t.target_bits for t in rep_a.tensors] == [t.target_bits for t in rep_b.tensors]
    assert len({t.target_bits for t in rep_a.tensors}) > 1  # Fisher really moved the budgets
    assert all(_same_bytes(enc_a[n], enc_b[n]) for n in names)
    assert source.peak == 1 and len(source.calls) == 2 * len(names)  # one pass for the rms, one to fit


def test_a_worker_process_gives_the_same_bytes():
    config = OptQuantConfig(bits=3.5, format="grid", allocation="uniform", modules_to_not_convert=ATTENTION_ONLY)
    inline, _ = quantize_model(_tiny_llama(), config, apply="none", progress=False, workers=0)
    pooled, report = quantize_model(_tiny_llama(), config, apply="none", progress=False, workers=1)
    assert report.timings["workers"] == 1 and report.timings["encode_cpu_s"] > 0
    assert list(inline) == list(pooled) and all(_same_bytes(inline[n], pooled[n]) for n in inline)


@pytest.mark.parametrize("family", ["grid", "int", "lloyd_max"])
def test_encode_jobs_survive_pickling(family):
    w = torch.distributions.StudentT(5.0).sample((48, 200)).to(torch.bfloat16)
    weight = torch.rand(48, 200) + 0.1
    pending, result = start_fit(w, family, 3.5, weight=weight), None
    while result is None:  # the grid may overshoot on a tensor this small and ask for another job
        job = pickle.loads(pickle.dumps(pending.job(w, weight)))  # what crosses to a worker process
        result = pending.accept(pickle.loads(pickle.dumps(run_encode_job(job))))
    reference = fit_format(w, family, 3.5, weight=weight)
    assert _same_bytes(result.encoded, reference.encoded)
    decoded = result.format.decode(result.encoded)
    assert decoded.dtype == torch.bfloat16
    assert result.error == pytest.approx(relative_error(w, decoded, weight), rel=1e-12)


def test_grid_overshoot_is_retried_until_it_fits(monkeypatch):
    w = torch.distributions.StudentT(5.0).sample((128, 512)) * 0.02
    monkeypatch.setattr(fit_module, "ESTIMATE_SLACK", -0.05)  # aim 0.05 b/sym above the budget
    pending = start_fit(w, "grid", 3.0)
    first = pending.accept(run_encode_job(pending.job(w)))
    assert first is None  # over budget: the step grows and a new job is needed
    result = fit_format(w, "grid", 3.0)
    assert result.bits <= 3.0 * w.numel() and result.bits == result.format.encode(w).nbits
    monkeypatch.setattr(fit_module, "MAX_GRID_ATTEMPTS", 1)  # no endless loop: a clear error
    with pytest.raises(ValueError, match="could not fit the grid"):
        fit_format(w, "grid", 3.0)


def test_chunked_full_tensor_passes_and_newton_refinement_match_one_pass(monkeypatch):
    w = torch.distributions.StudentT(4.0).sample((300, 256)) * 0.05
    whole = fit_format(w, "grid", 3.25)  # 76800 values: the search sample is about 65536 of them
    monkeypatch.setattr(fit_module, "CHUNK_ELEMENTS", 1000)
    chunked = fit_format(w, "grid", 3.25)
    assert _same_bytes(whole.encoded, chunked.encoded) and chunked.error == pytest.approx(whole.error, rel=1e-12)
    assert _same_bytes(whole.encoded, whole.format.encode(w))  # the fit hands the coder what TensorFormat does
    monkeypatch.setattr(fit_module, "SEARCH_ELEMENTS", 2048)  # a small sample: Newton steps on the whole tensor
    sampled = fit_format(w, "grid", 3.25)
    assert 3.25 - 0.02 < sampled.bits_per_element <= 3.25
    assert sampled.error == pytest.approx(whole.error, rel=0.01)
    assert torch.equal(sampled.format.decode(sampled.encoded), sampled.format.quantise(w))


def test_bad_arguments_are_rejected_with_the_field_named():
    model = _tiny_llama()
    config = OptQuantConfig(bits=3.0, format="int", allocation="uniform")
    with pytest.raises(ValueError, match="workers"):
        quantize_model(model, config, workers=-1, progress=False)
    with pytest.raises(ValueError, match="max_in_flight"):
        quantize_model(model, config, max_in_flight=0, progress=False, workers=0)
    with pytest.raises(ValueError, match="weights"):
        quantize_model(model, config, weights=lambda name: torch.zeros(3), progress=False, workers=0)
    meta = _tiny_llama()
    _to_meta(meta, _linear_names(meta))
    with pytest.raises(ValueError, match="meta"):
        quantize_model(meta, config, progress=False, workers=0)


def test_weights_stream_from_a_safetensors_checkpoint(tmp_path):
    config = OptQuantConfig(bits=4.0, format="int", allocation="uniform")
    model = _tiny_llama()
    model.save_pretrained(tmp_path)
    names = _linear_names(model)
    resident, _ = quantize_model(model, config, apply="none", progress=False, workers=0)
    skeleton = _tiny_llama()
    _to_meta(skeleton, names)
    streamed, _ = quantize_model(skeleton, config, apply="modules", progress=False, workers=0,
                                 weights=checkpoint_source(tmp_path))
    assert all(_same_bytes(resident[n], streamed[n]) for n in names)
    with pytest.raises(ValueError, match="not in the checkpoint"):
        checkpoint_source(tmp_path, prefix="nothing.")("model.layers.0.mlp.up_proj")
    with pytest.raises(ValueError, match="no safetensors"):
        checkpoint_source(tmp_path / "missing")
