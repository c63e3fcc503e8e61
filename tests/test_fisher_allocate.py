"""Fisher estimation against closed forms and autograd; allocation against brute force."""

from __future__ import annotations

import itertools
import math
import types

import pytest
import torch
from torch import nn

from hf_optquant.allocate import (
    RatePoint,
    TensorStats,
    fisher_allocation,
    global_allocation,
    mean_bits,
    round_allocation,
    uniform_allocation,
)
from hf_optquant.fisher import estimate_fisher, linear_weights
from hf_optquant.model_utils import conv1d_to_linear


class SoftmaxRegression(nn.Module):
    """logits = W e(x): a model whose Fisher has a closed form."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids):
        return types.SimpleNamespace(logits=self.head(self.embed(input_ids)))


def test_sampled_fisher_matches_closed_form():
    torch.manual_seed(0)
    model = SoftmaxRegression(5, 3)
    seq = torch.full((3000, 5), 2)  # a single context token: one predictive distribution
    est = estimate_fisher(model, seq, per_element=True, seed=1, progress=False)
    x = model.embed.weight[2].detach().double()
    p = torch.softmax(model.head.weight.detach().double() @ x, 0)
    # F[k, j] = E_y[(1[y=k] - p_k)^2] x_j^2 = p_k (1 - p_k) x_j^2
    expected = (p * (1 - p))[:, None] * x[None, :] ** 2
    got = est.per_element["head"].double()
    torch.testing.assert_close(got, expected, rtol=0.1, atol=1e-4)
    assert est.sums["head"] == pytest.approx(float(got.sum()), rel=1e-4)  # fp32 vs fp64 accumulation
    assert est.tokens == 3000 * 4 and est.mean("head") == pytest.approx(est.sums["head"] / 15)


def test_empirical_fisher_equals_squared_autograd_gradients():
    torch.manual_seed(1)
    model = SoftmaxRegression(11, 4)
    seqs = torch.randint(0, 11, (6, 7))
    est = estimate_fisher(model, seqs, mode="empirical", per_element=True, progress=False)
    ref = torch.zeros_like(model.head.weight, dtype=torch.float64)
    for row in seqs:
        logits = model(row[None]).logits[:, :-1]
        ll = torch.log_softmax(logits.double(), -1).gather(-1, row[None, 1:, None]).sum()
        (g,) = torch.autograd.grad(ll, model.head.weight)
        ref += g.double() ** 2
    torch.testing.assert_close(est.per_element["head"].double(), ref / (6 * 6), rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())
    assert model.head.weight.requires_grad and model.embed.weight.requires_grad


def test_fisher_on_a_transformers_model_with_checkpointing_matches_without():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    seqs = torch.randint(0, 64, (3, 16))
    reference = model(seqs).logits
    assert conv1d_to_linear(model) == 8  # GPT-2's Conv1D projections become nn.Linear
    torch.testing.assert_close(model(seqs).logits, reference)
    conv = linear_weights(model, skip=("lm_head",))
    assert len(conv) == 8
    plain = estimate_fisher(model, seqs, conv, mode="empirical", progress=False)
    ckpt = estimate_fisher(model, seqs, conv, mode="empirical", gradient_checkpointing=True, progress=False)
    for name in conv:
        assert ckpt.sums[name] == pytest.approx(plain.sums[name], rel=1e-4)
    assert not model.training


def test_fisher_rejects_bad_input():
    model = SoftmaxRegression(5, 3)
    with pytest.raises(ValueError, match="mode"):
        estimate_fisher(model, torch.zeros(2, 4, dtype=torch.long), mode="true")
    with pytest.raises(ValueError, match="seq_len"):
        estimate_fisher(model, torch.zeros(4, dtype=torch.long))


# ---- allocation ------------------------------------------------------------------------

def _stats(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": TensorStats(int(torch.randint(100, 5000, (), generator=g)),
                                 float(torch.rand((), generator=g)) * 0.1 + 0.01,
                                 float(torch.rand((), generator=g) ** 4) + 1e-6) for i in range(n)}


def test_fisher_allocation_is_the_paper_rule_and_meets_the_budget():
    stats = _stats()
    bits = fisher_allocation(stats, 4.0, min_bits=-50, max_bits=50)
    numels = {n: s.numel for n, s in stats.items()}
    assert mean_bits(bits, numels) == pytest.approx(4.0, abs=1e-9)
    a, b = stats["t0"], stats["t1"]
    assert bits["t0"] - bits["t1"] == pytest.approx(
        math.log2(a.rms / b.rms) + 0.5 * math.log2(a.fisher_mean / b.fisher_mean), abs=1e-9)


def test_fisher_allocation_minimises_the_high_rate_kl_proxy():
    stats = _stats(seed=3)
    numels = {n: s.numel for n, s in stats.items()}

    def kl(bits):
        return sum(s.numel * s.fisher_mean * s.rms**2 * 2 ** (-2 * bits[n]) for n, s in stats.items())

    best = fisher_allocation(stats, 3.5, min_bits=-50, max_bits=50)
    assert kl(best) < kl(uniform_allocation(stats, 3.5))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # any budget-neutral perturbation is worse
        delta = {n: float(torch.randn((), generator=g)) * 0.3 for n in stats}
        shift = mean_bits(delta, numels)
        other = {n: best[n] + delta[n] - shift for n in stats}
        assert kl(other) > kl(best)


def test_clamped_allocation_still_meets_the_budget():
    stats = _stats(seed=5)
    bits = fisher_allocation(stats, 3.0, min_bits=2.0, max_bits=4.0)
    assert all(2.0 <= b <= 4.0 for b in bits.values())
    assert mean_bits(bits, {n: s.numel for n, s in stats.items()}) == pytest.approx(3.0, abs=1e-6)
    with pytest.raises(ValueError, match="budget"):
        fisher_allocation(stats, 9.0)


def test_fisher_allocation_respects_per_tensor_floors():
    stats = _stats(seed=9)
    numels = {n: s.numel for n, s in stats.items()}
    free = fisher_allocation(stats, 3.0, min_bits=-50, max_bits=50)
    low = min(free, key=free.get)
    floors = {low: free[low] + 1.0}  # e.g. a small tensor whose scales and code table cost that much
    bits = fisher_allocation(stats, 3.0, min_bits=-50, max_bits=50, floors=floors)
    assert bits[low] == pytest.approx(floors[low], abs=1e-9)
    assert mean_bits(bits, numels) == pytest.approx(3.0, abs=1e-9)
    a, b = [n for n in stats if n != low][:2]
    assert bits[a] - bits[b] == pytest.approx(free[a] - free[b], abs=1e-9)  # the rule holds for the others
    assert bits[a] < free[a]  # and they paid for the floor
    with pytest.raises(ValueError, match="budget"):
        fisher_allocation(stats, 3.0, min_bits=1.0, max_bits=8.0, floors=dict.fromkeys(stats, 3.5))


def test_round_allocation_respects_budget_and_options():
    stats = _stats(seed=7)
    numels = {n: s.numel for n, s in stats.items()}
    targets = fisher_allocation(stats, 4.1, 2.0, 8.0)
    options = {n: [b + 0.25 for b in range(2, 9)] for n in stats}
    chosen = round_allocation(targets, options, numels, 4.1)
    assert all(chosen[n] in options[n] for n in stats)
    assert mean_bits(chosen, numels) <= 4.1 + 1e-12
    assert mean_bits(chosen, numels) > 4.1 - 1.0


def test_global_allocation_matches_brute_force():
    stats = {f"t{i}": TensorStats(n, 1.0, f) for i, (n, f) in enumerate([(300, 2.0), (500, 0.3), (200, 5.0)])}
    g = torch.Generator().manual_seed(11)
    curves = {}
    for name in stats:
        widths = [2.0, 2.5, 3.0, 3.5, 4.0, 5.0]
        slope = float(torch.rand((), generator=g)) + 0.5
        curves[name] = [RatePoint(b, stats[name].numel * 2 ** (-2 * slope * b)) for b in widths]
    budget = 3.2
    chosen = global_allocation(curves, stats, budget)
    numels = {n: s.numel for n, s in stats.items()}

    def objective(choice):
        return sum(stats[n].fisher_mean * next(p.sse for p in curves[n] if p.bits == choice[n]) for n in choice)

    feasible = [dict(zip(curves, combo)) for combo in itertools.product(*[[p.bits for p in curves[n]] for n in curves])
                if mean_bits(dict(zip(curves, combo)), numels) <= budget + 1e-12]
    brute = min(feasible, key=objective)
    assert mean_bits(chosen, numels) <= budget + 1e-12
    assert objective(chosen) <= objective(brute) * 1.05
