"""Format library: round trips, exact bit counts, closed-form checks, validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import linalg

from hf_optquant.formats import (
    CubeRootElement,
    EncodedTensor,
    FPElement,
    IntElement,
    LloydMaxElement,
    LookupElement,
    Rotation,
    Scaling,
    SparseOutliers,
    TensorFormat,
    hadamard_transform,
    nearest_index,
    pack_codes,
    packed_nbytes,
    spec_from_dict,
    unpack_codes,
)
from hf_optquant.formats.optimal import cube_root_distribution, unit_variance_distribution

ELEMENTS = [
    IntElement(4),
    IntElement(math.log2(5), symmetric=True),
    IntElement(3, symmetric=True),
    FPElement(2, 1),
    FPElement(3, 2),
    LookupElement("nf4"),
    LookupElement("sf4"),
    CubeRootElement("normal", 3),
    CubeRootElement("laplace", 4),
    CubeRootElement("student_t", 5, df=5.0),
    LloydMaxElement(3, iterations=20),
]
SCALINGS = [
    Scaling("block", 32, "absmax", "bf16"),
    Scaling("block", 64, "signmax", "fp8_e4m3"),
    Scaling("block", 128, "absmax", "e8m0"),
    Scaling("channel", 1, "rms", "fp16"),
    Scaling("tensor", 1, "absmax", "fp32"),
]
SHAPES = [(37, 200), (8, 64), (3, 5, 96), (129,), (16, 1000)]


def _heavy_tailed(shape, dtype=torch.float32, seed=None):
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    x = torch.randn(shape, generator=generator)
    x = x * (1 + 3 * torch.rand(shape, generator=generator) ** 8)  # a few large values
    return (x * 0.02).to(dtype)


@pytest.mark.parametrize("element", ELEMENTS, ids=lambda e: f"{e.kind}")
@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: f"{s.granularity}-{s.statistic}-{s.scale_format}")
def test_encode_decode_equals_fake_quantise(element, scaling):
    for i, shape in enumerate(SHAPES):
        dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
        w = _heavy_tailed(shape, dtype)
        for fmt in (TensorFormat(element, scaling),
                    TensorFormat(element, scaling, SparseOutliers(0.01), Rotation(32, seed=i))):
            encoded = fmt.encode(w)
            decoded = fmt.decode(encoded)
            assert decoded.dtype == dtype and decoded.shape == w.shape
            assert torch.equal(decoded, fmt.quantise(w))
            # counting and encoding agree to the bit
            assert encoded.nbits == fmt.storage_bits(tuple(w.shape)) == fmt.count_bits(w)
            # and the quantiser actually approximates w (catches scale/table mix-ups)
            rel = float((decoded.double() - w.double()).norm() / w.double().norm())
            assert rel < 0.95, (fmt, shape, rel)  # 1.0 would mean "all zeros"


def test_metadata_round_trip_survives_json():
    w = _heavy_tailed((20, 70))
    fmt = TensorFormat(LloydMaxElement(4), Scaling("block", 32, "signmax", "fp8_e4m3"),
                       SparseOutliers(0.02, "fp16"), Rotation(16, seed=3))
    encoded = fmt.encode(w)
    meta = json.loads(json.dumps(encoded.metadata()))
    again = EncodedTensor.from_metadata(meta, encoded.tensors)
    assert again.format == fmt and again.shape == encoded.shape and again.dtype == encoded.dtype
    assert torch.equal(fmt.decode(again), fmt.quantise(w))


@pytest.mark.parametrize("spec", [*ELEMENTS, *SCALINGS, SparseOutliers(0.1, "fp32"), Rotation(64, 7)])
def test_spec_json_round_trip(spec):
    assert spec_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


# ---- closed-form and published references ---------------------------------------------

def test_nf4_matches_published_table():
    published = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]
    torch.testing.assert_close(LookupElement("nf4").table(), torch.tensor(published, dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_fp_tables_match_ocp_values():
    e2m1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert FPElement(2, 1).table().tolist() == sorted({-v for v in e2m1} | set(e2m1))
    e3m0 = [0, 0.25, 0.5, 1, 2, 4, 8, 16]
    assert FPElement(3, 0).table().tolist() == sorted({-v for v in e3m0} | set(e3m0))


def test_int_tables():
    assert IntElement(4).table().tolist() == list(range(-8, 8))
    assert IntElement(4, symmetric=True).table().tolist() == [i - 7.5 for i in range(16)]
    assert IntElement(math.log2(5), symmetric=True).table().tolist() == [-2, -1, 0, 1, 2]


@pytest.mark.parametrize("name,df", [("normal", 5.0), ("laplace", 5.0), ("student_t", 5.0), ("student_t", 3.5)])
def test_cube_root_density_is_proportional_to_cube_root_of_source(name, df):
    source, cube = unit_variance_distribution(name, df), cube_root_distribution(name, df)
    x = np.linspace(-6, 6, 101)
    ratio = cube.pdf(x) / source.pdf(x) ** (1 / 3)
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)
    assert source.var() == pytest.approx(1.0, rel=1e-9)


def test_cube_root_tables_approach_panter_dite():
    x = torch.randn(1 << 20, dtype=torch.float64)
    ratios = []
    for bits in (5, 6, 8):
        table = CubeRootElement("normal", bits).table("rms")
        mse = float((table[nearest_index(x, table)] - x).square().mean())
        ratios.append(mse / (math.pi * math.sqrt(3) / 2 * 2.0 ** (-2 * bits)))
    # the high-rate formula is approached from below as the rate grows
    assert ratios[0] < ratios[1] < ratios[2] + 0.005
    assert ratios[2] == pytest.approx(1.0, abs=0.02)


def test_cube_root_absmax_table_includes_block_extremes():
    table = CubeRootElement("normal", 4).table("absmax", 64)
    assert table[0] == -1 and table[-1] == 1 and table.numel() == 16
    table = CubeRootElement("laplace", 3).table("signmax", 32)
    assert table[-1] == 1 and table[0] > -1 and table.numel() == 8
    assert bool((table[1:] > table[:-1]).all())


def test_uniform_grid_distortion_matches_gish_pierce():
    """A uniform grid of step d on N(0,1): D = d^2/12 and D ~ (pi e / 6) 2^(-2H) at high rate."""
    x = torch.randn(1 << 20, dtype=torch.float64)
    fmt = TensorFormat(__import__("hf_optquant.formats", fromlist=["GridElement"]).GridElement(0.1),
                       Scaling("tensor", 1, "rms", "fp32"))
    parts = fmt.quantise_parts(x[None, :])
    q = fmt.dequantise_parts(parts, (1, x.numel()), torch.float64)[0]
    mse = float((q - x).square().mean())
    scale = float(parts.scales)
    assert mse == pytest.approx((0.1 * scale) ** 2 / 12, rel=0.02)
    _, counts = torch.unique(parts.codes, return_counts=True)
    p = counts.double() / counts.sum()
    entropy = float(-(p * p.log2()).sum())
    assert mse == pytest.approx(math.pi * math.e / 6 * 2 ** (-2 * entropy), rel=0.02)


def test_int_grid_interior_error_is_step_squared_over_twelve():
    x = torch.rand(1 << 18, dtype=torch.float64) * 10 - 5  # uniform inside the table
    table = IntElement(4).table()
    mse = float((table[nearest_index(x, table)] - x).square().mean())
    assert mse == pytest.approx(1 / 12, rel=0.02)


def test_lloyd_max_beats_fixed_tables_and_respects_weights():
    x = torch.randn(1 << 16, dtype=torch.float64)
    mse = {}
    for element in (LloydMaxElement(3, iterations=100), CubeRootElement("normal", 3), IntElement(3)):
        fmt = TensorFormat(element, Scaling("tensor", 1, "rms", "fp32"))
        mse[element.kind] = float((fmt.quantise(x[None]) - x[None]).square().mean())
    assert mse["lloyd_max"] < mse["cube_root"] < mse["int"]
    # Lloyd-Max for N(0,1) at 8 levels: MSE 0.03454 (Max 1960)
    assert mse["lloyd_max"] == pytest.approx(0.03454, rel=0.03)
    # weights concentrated on the positive half pull the table there, and lower the weighted error
    weight = ((x > 0).double() * 10 + 0.01)[None]
    fmt = TensorFormat(LloydMaxElement(3, iterations=100), Scaling("tensor", 1, "rms", "fp32"))
    assert int((fmt.quantise_parts(x[None], weight).table > 0).sum()) >= 6

    def weighted_mse(q):
        return float((weight * (q - x[None]).square()).sum())

    assert weighted_mse(fmt.quantise(x[None], weight)) < 0.8 * weighted_mse(fmt.quantise(x[None]))


# ---- pieces ------------------------------------------------------------------------------

@pytest.mark.parametrize("levels", [2, 3, 5, 7, 8, 15, 16, 17, 31, 64, 100, 255, 256])
def test_packing_round_trip_and_size(levels):
    count = int(torch.randint(1, 3000, ()))
    codes = torch.randint(0, levels, (count,))
    packed = pack_codes(codes, levels)
    assert packed.numel() == packed_nbytes(count, levels)
    assert torch.equal(unpack_codes(packed, levels, count), codes)
    bits_per_code = 8 * packed.numel() / count
    assert bits_per_code <= math.ceil(math.log2(levels)) + 32 / count


def test_radix_packing_realises_fractional_bits():
    assert packed_nbytes(13_000, 5) * 8 / 13_000 == pytest.approx(32 / 13)
    bad = pack_codes(torch.zeros(13, dtype=torch.long), 5).clone()
    bad[:] = 255  # 0xFFFFFFFF > 5**13
    with pytest.raises(ValueError, match="corrupt"):
        unpack_codes(bad, 5, 13)
    with pytest.raises(ValueError, match="uint8 bytes"):
        unpack_codes(bad[:3], 5, 13)


def test_hadamard_matches_scipy_and_rotation_is_orthogonal():
    x = torch.randn(5, 64, dtype=torch.float64)
    ref = x @ torch.from_numpy(linalg.hadamard(64)).double() / 8
    torch.testing.assert_close(hadamard_transform(x), ref)
    rot = Rotation(32, seed=11)
    w = torch.randn(7, 96, dtype=torch.float64)
    torch.testing.assert_close(rot.unrotate(rot.rotate(w)), w)
    torch.testing.assert_close(rot.rotate(w).norm(dim=1), w.norm(dim=1))
    assert rot.effective_block(96) == 32 and rot.effective_block(24) == 8


def test_e8m0_scales_never_clip_and_zero_blocks_stay_zero():
    w = torch.randn(4, 256)
    w[1, 64:128] = 0
    fmt = TensorFormat(IntElement(4), Scaling("block", 64, "absmax", "e8m0"))
    parts = fmt.quantise_parts(w)
    scales = parts.scales
    assert bool(((scales.log2() == scales.log2().round()) | (scales == 0)).all())
    assert float(scales[1, 1]) == 0
    q = fmt.quantise(w)
    assert torch.equal(q[1, 64:128], torch.zeros(64)) and torch.isfinite(q).all()
    table = IntElement(4).table().float()
    u = w / fmt.scaling.broadcast(scales, 4, 256).clamp_min(1e-30)
    assert float(u.abs().max()) <= min(-table[0], table[-1])  # rounding the scale up avoids clipping


def test_one_sided_two_level_int_table_still_scales():
    w = torch.randn(8, 64)
    for statistic in ("absmax", "signmax"):
        q = TensorFormat(IntElement(1), Scaling("block", 32, statistic, "bf16")).quantise(w)
        assert torch.isfinite(q).all() and set(torch.unique(q.sign()).tolist()) <= {-1.0, 0.0, 1.0}
        assert float((q - w).norm()) < float(w.norm())


def test_sparse_outliers_are_kept_exactly():
    w = torch.randn(32, 128)
    w[3, 5], w[30, 100] = 40.0, -55.0
    fmt = TensorFormat(IntElement(2), Scaling("channel", 1, "absmax"), SparseOutliers(0.005, "fp32"))
    q = fmt.quantise(w)
    assert float(q[3, 5]) == 40.0 and float(q[30, 100]) == -55.0
    top = torch.topk(w.abs().flatten(), SparseOutliers(0.005).count(w.numel())).indices
    torch.testing.assert_close(q.flatten()[top], w.flatten()[top])


def test_signmax_maps_block_extreme_exactly():
    w = torch.randn(16, 64)
    fmt = TensorFormat(IntElement(4), Scaling("block", 64, "signmax", "fp32"))
    q = fmt.quantise(w)
    extreme = w.abs().argmax(dim=1)
    rows = torch.arange(16)
    torch.testing.assert_close(q[rows, extreme], w[rows, extreme], rtol=1e-6, atol=0)


# ---- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("make,field", [
    (lambda: IntElement(bits=0.5), "bits"),
    (lambda: FPElement(0, 2), "exponent_bits"),
    (lambda: FPElement(5, 4), r"exponent_bits \+ mantissa_bits"),
    (lambda: LookupElement("nf5"), "name"),
    (lambda: CubeRootElement("cauchy"), "distribution"),
    (lambda: CubeRootElement("student_t", 4, df=2.0), "df"),
    (lambda: Scaling(granularity="row"), "granularity"),
    (lambda: Scaling(statistic="max"), "statistic"),
    (lambda: Scaling(scale_format="fp8"), "scale_format"),
    (lambda: Scaling(statistic="signmax", scale_format="e8m0"), "scale_format"),
    (lambda: SparseOutliers(0.9), "fraction"),
    (lambda: Rotation(48), "block_size"),
    (lambda: TensorFormat(element="int"), "element"),
])
def test_invalid_specs_raise_value_error_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_invalid_choice_lists_allowed_values():
    with pytest.raises(ValueError, match=r"\['absmax', 'signmax', 'rms'\]"):
        Scaling(statistic="median")
    with pytest.raises(ValueError, match="allowed"):
        spec_from_dict({"kind": "int", "bits": 4, "colour": "red"})
    with pytest.raises(ValueError, match="kind"):
        spec_from_dict({"kind": "int8"})


def test_nan_weights_and_malformed_tensors_are_refused():
    fmt = TensorFormat(IntElement(4))
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="NaN"):
        fmt.quantise(torch.where(w > 1, torch.nan, w))
    encoded = fmt.encode(w)
    for broken in ({k: v for k, v in encoded.tensors.items() if k != "scales"},
                   {**encoded.tensors, "codes": encoded.tensors["codes"][:-1]},
                   {**encoded.tensors, "scales": encoded.tensors["scales"][:2]}):
        with pytest.raises(ValueError):
            fmt.decode(EncodedTensor(fmt, encoded.shape, encoded.dtype, broken))


# ---- the variable-length grid ------------------------------------------------------------

@pytest.mark.parametrize("scaling", [Scaling("channel", 1, "rms", "bf16"), Scaling("tensor", 1, "rms", "fp32"),
                                     Scaling("block", 64, "absmax", "fp8_e4m3")],
                         ids=lambda s: f"{s.granularity}-{s.statistic}")
def test_grid_round_trip_is_entropy_coded_and_exactly_counted(scaling):
    from hf_optquant.formats import GridElement

    for i, shape in enumerate([(64, 300), (7, 33), (2, 3, 128)]):
        dtype = (torch.float32, torch.bfloat16, torch.float16)[i]
        w = _heavy_tailed(shape, dtype)
        fmt = TensorFormat(GridElement(0.3), scaling, SparseOutliers(0.01) if i == 0 else None)
        encoded = fmt.encode(w)
        assert any(k.startswith("codes.") for k in encoded.tensors) and "codes" not in encoded.tensors
        assert torch.equal(fmt.decode(encoded), fmt.quantise(w))
        assert fmt.storage_bits(tuple(w.shape)) is None and fmt.count_bits(w) == encoded.nbits


def test_grid_storage_is_close_to_the_index_entropy():
    from hf_optquant.formats import GridElement

    w = torch.randn(1024, 1024)
    fmt = TensorFormat(GridElement(0.25), Scaling("tensor", 1, "rms", "fp32"))
    codes = fmt.quantise_parts(w).codes
    _, counts = torch.unique(codes, return_counts=True)
    p = counts.double() / counts.sum()
    entropy = float(-(p * p.log2()).sum())
    bits = fmt.encode(w).bits_per_element
    assert entropy < bits < entropy + 0.02


def test_corrupted_grid_stream_is_refused():
    from hf_optquant.formats import GridElement

    fmt = TensorFormat(GridElement(0.2))
    w = torch.randn(32, 256)
    encoded = fmt.encode(w)
    payload = encoded.tensors["codes.payload"].clone()
    payload[len(payload) // 2] ^= 0x10
    broken = EncodedTensor(fmt, encoded.shape, encoded.dtype, {**encoded.tensors, "codes.payload": payload})
    with pytest.raises(ValueError):
        fmt.decode(broken)
