"""Fitting families to tensors at a target all-inclusive bit width."""

from __future__ import annotations

import math

import pytest
import torch

from hf_optquant.formats import CubeRootElement, FPElement, IntElement, Scaling, SparseOutliers, TensorFormat
from hf_optquant.formats.fit import FAMILIES, fit_format, relative_error

FIXED_FAMILIES = ["int", "fp", "nf4", "sf4", "cube_root", "lloyd_max"]


def _sample(shape=(96, 320)):
    return torch.distributions.StudentT(6.0).sample(shape) * 0.03


@pytest.mark.parametrize("family", FIXED_FAMILIES)
@pytest.mark.parametrize("bits", [3.3, 4.25, 5.1])
def test_fit_stays_within_budget_and_reports_exact_bits(family, bits):
    w = _sample()
    if family in ("nf4", "sf4") and bits < 4.25:
        with pytest.raises(ValueError, match="bits"):
            fit_format(w, family, bits)
        return
    result = fit_format(w, family, bits)
    assert result.bits == result.format.encode(w).nbits
    assert result.bits_per_element <= bits
    assert result.error == pytest.approx(relative_error(w, result.format.quantise(w)), rel=1e-9)
    assert 0 < result.error < 0.2


def test_int_uses_fractional_levels_to_fill_the_budget():
    w = _sample()
    result = fit_format(w, "int", 2.75, scaling=Scaling("block", 128, "absmax", "bf16"))
    levels = result.format.element.num_levels
    assert levels & (levels - 1) != 0  # a non-power-of-two level count (radix packed)
    assert 2.75 - 0.2 < result.bits_per_element <= 2.75  # 5 levels: 32/13 bits + bf16 scales


def test_scale_search_beats_the_unsearched_default():
    w = _sample()
    fitted = fit_format(w, "int", 4.25)
    plain = TensorFormat(IntElement(4), fitted.format.scaling.replace(multiplier=1.0))
    assert fitted.error < relative_error(w, plain.quantise(w))


def test_fp_exponent_search_finds_the_best_split():
    w = _sample()
    fitted = fit_format(w, "fp", 4.25)
    for e in (1, 2):
        other = fit_format(w, "fp", 4.25).format.replace(element=FPElement(e, 2 - e))
        assert fitted.error <= relative_error(w, other.quantise(w)) + 1e-12


def test_cube_root_df_search_prefers_heavy_tails_on_heavy_tailed_data():
    w = torch.distributions.StudentT(3.0).sample((64, 512))
    result = fit_format(w, "cube_root", 4.25, scaling=Scaling("channel", 1, "rms"))
    assert isinstance(result.format.element, CubeRootElement)
    assert result.format.element.distribution in ("student_t", "laplace")
    normal = result.format.replace(element=CubeRootElement("normal", 4))
    assert result.error < relative_error(w, normal.quantise(w))


def test_weighted_fit_lowers_weighted_error():
    w = _sample((64, 256))
    weight = (w > 0).float() * 20 + 0.05  # the error on positive weights matters most
    unweighted = fit_format(w, "lloyd_max", 3.2)
    weighted = fit_format(w, "lloyd_max", 3.2, weight=weight)
    assert relative_error(w, weighted.format.quantise(w, weight), weight) < relative_error(
        w, unweighted.format.quantise(w), weight)


def test_sparse_outliers_are_paid_for_inside_the_budget():
    w = _sample()
    result = fit_format(w, "int", 4.0, sparse=SparseOutliers(0.005))
    assert result.bits_per_element <= 4.0
    assert result.format.element.num_levels < 16


def test_fit_rejects_bad_arguments():
    w = _sample((8, 64))
    with pytest.raises(ValueError, match="family"):
        fit_format(w, "int3", 4)
    with pytest.raises(ValueError, match="bits"):
        fit_format(w, "int", -1)
    with pytest.raises(ValueError, match="distribution"):
        fit_format(w, "cube_root", 4, distribution="cauchy")
    with pytest.raises(ValueError, match="weight"):
        fit_format(w, "int", 4, weight=torch.ones(3))
    assert set(FIXED_FAMILIES) < set(FAMILIES)
    assert math.isfinite(fit_format(w, "int", 8.5).error)


@pytest.mark.parametrize("bits", [2.5, 3.5, 5.0])
def test_grid_fit_hits_the_all_inclusive_target(bits):
    w = torch.distributions.StudentT(5.0).sample((512, 512)) * 0.02
    result = fit_format(w, "grid", bits)
    assert result.bits == result.format.encode(w).nbits
    assert bits - 0.03 < result.bits_per_element <= bits
    # the grid beats the best fixed-length table at the same all-inclusive budget
    assert result.error < fit_format(w, "cube_root", bits).error
