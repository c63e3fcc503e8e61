"""QuantLinear's runtime weights: the Triton LUT kernels (run here in Triton's interpreter) and the torch
path must both compute x @ decode(W).T; the choice follows the format; caches follow the buffers."""

from __future__ import annotations

import pytest
import torch

from hf_optquant.formats import Rotation, Scaling, SparseOutliers
from hf_optquant.formats.fit import fit_format
from hf_optquant.nn import QuantLinear
from hf_optquant.nn.runtime import lut_kernel_unsupported

CASES = [  # family, bits, scaling, shape (out, in): K deliberately not a multiple of the block / group
    ("int", 4.0, Scaling("block", 64, "absmax"), (40, 200)),
    ("nf4", 4.5, Scaling("block", 32, "absmax"), (24, 96)),
    ("fp", 4.0, Scaling("channel", 1, "rms"), (33, 130)),
    ("cube_root", 3.0, Scaling("block", 128, "signmax"), (17, 300)),
    ("lloyd_max", 5.0, Scaling("tensor", 1, "rms"), (20, 70)),
    ("int", 2.3, Scaling("block", 16, "absmax", "fp8_e4m3"), (8, 48)),  # 5 levels -> a 3-bit kernel table
]


def _layer(family, bits, scaling, shape, **kwargs):
    gen = torch.Generator().manual_seed(hash((family, bits, shape)) % 2**31)
    w = torch.distributions.StudentT(5.0).sample(shape) * 0.02 if family != "int" else \
        torch.randn(shape, generator=gen) * 0.02
    fit = fit_format(w, family, bits, scaling=scaling, **kwargs)
    bias = torch.randn(shape[0], generator=gen)
    return QuantLinear.from_encoded(fit.encoded, bias=bias), fit


def _reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    w = layer.format.decode(layer.encoded).double()
    return x.double() @ w.T + layer.bias.double()


@pytest.mark.parametrize("family,bits,scaling,shape", CASES)
def test_lut_kernel_and_torch_paths_match_a_float64_reference(family, bits, scaling, shape):
    layer, _ = _layer(family, bits, scaling, shape)
    assert lut_kernel_unsupported(layer.format) is None
    x = torch.randn(3, 5, shape[1])
    ref = _reference(layer, x)
    for kernels, kind in ((True, "lut-kernel"), (False, "torch")):
        layer.kernels = kernels
        y = layer(x)
        assert layer.runtime_weight(x.device).kind == kind
        assert y.shape == (3, 5, shape[0]) and y.dtype == x.dtype
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_kernel_path_in_bfloat16_is_within_bf16_rounding():
    layer, _ = _layer("nf4", 4.25, Scaling("block", 64, "absmax"), (64, 256))
    layer.kernels = True
    x = torch.randn(2, 256)
    xb = x.bfloat16()
    y = layer(xb).double()
    ref = _reference(layer, xb.float())
    w = layer.format.decode(layer.encoded).double()
    magnitude = xb.double().abs() @ w.abs().T + layer.bias.double().abs()
    # weights may be rounded to bf16 before the fp32-accumulated dot, and the output is rounded to bf16
    assert ((y - ref).abs() <= 2**-8 * magnitude + 2**-8 * ref.abs()).all()
    assert (y - ref).abs().max() > 0  # it really ran in bf16


@pytest.mark.parametrize("kwargs,reason", [
    (dict(sparse=SparseOutliers(0.01)), "sparse outliers"),
    (dict(rotation=Rotation(32)), "rotation"),
])
def test_formats_the_lut_kernels_cannot_run_use_the_torch_path(kwargs, reason):
    layer, _ = _layer("int", 4.5, Scaling("block", 32, "absmax"), (16, 64), **kwargs)
    assert lut_kernel_unsupported(layer.format) == reason
    layer.kernels = True
    x = torch.randn(4, 64)
    y = layer(x)
    assert layer.runtime_weight(x.device).kind == "torch"
    torch.testing.assert_close(y.double(), _reference(layer, x), rtol=1e-5, atol=1e-6)


def test_grid_layers_compute_with_the_decoded_indices():
    layer, fit = _layer("grid", 3.5, Scaling("channel", 1, "rms"), (32, 100))
    assert layer.format.variable_length
    x = torch.randn(4, 100)
    w = layer.format.decode(layer.encoded).double()
    # fp32 accumulation error scales with this, not with |y|; one wrong index would cost ~step * |x| ~ 1e-2.
    # The fused kernel accumulates (index + 128) * x and subtracts 128 * sum(x) once per lane (see
    # kernels/grid_linear.py), so its rounding error is relative to 128 * sum|x| rather than |index| * |x|:
    # ~30x a plain fp32 dot product at 3.5 b/p (|index| ~ 4), i.e. a few 1e-6 of `magnitude`; hence 2e-5.
    magnitude = x.double().abs() @ w.abs().T + layer.bias.double().abs()
    for kernels, kind in ((False, "torch"), (True, "grid-kernel")):
        layer.kernels = kernels
        y = layer(x).double()
        assert layer.runtime_weight(x.device).kind == kind
        assert ((y - _reference(layer, x)).abs() <= 2e-5 * magnitude).all()


def test_runtime_cache_follows_in_place_edits_and_buffer_replacement():
    layer, _ = _layer("int", 4.0, Scaling("block", 64, "absmax"), (16, 128))
    layer.kernels = False
    x = torch.randn(2, 128)
    first = layer(x)
    assert layer.runtime_weight(x.device) is layer.runtime_weight(x.device)  # cached
    layer.weight__scales.zero_()  # in place: bumps the tensor version
    assert torch.equal(layer(x), layer.bias.expand(2, -1))
    layer.weight__scales = layer.encoded_tensors()["scales"].clone().fill_(1.0)
    assert not torch.allclose(layer(x), first)


def test_runtime_weight_holds_codes_not_a_full_precision_copy():
    layer, fit = _layer("int", 4.0, Scaling("block", 64, "absmax"), (64, 512))
    x = torch.randn(1, 512)
    for kernels in (True, False):
        layer.kernels = kernels
        layer(x)
        runtime = layer.runtime_weight(x.device)
        # kernel layout: 4-bit codes + bf16/fp32 scales + 16-entry table; torch path: 1-byte codes
        assert runtime.nbytes < 0.3 * 64 * 512 * 4, (kernels, runtime.nbytes)


@pytest.mark.parametrize("fmt,bits", [("nf4", 4.5), ("grid", 3.5)])
def test_torch_compile_matches_eager(fmt, bits):
    """``torch.compile`` runs a quantised model (TorchDynamo breaks the graph around each
    QuantLinear: the runtime weight and the kernels are not traced) with eager's exact logits."""
    from tiny_models import tiny_llama

    from hf_optquant import OptQuantConfig
    from hf_optquant.quantize import quantize_model

    torch.manual_seed(0)
    model = tiny_llama().eval()
    config = OptQuantConfig(bits=bits, format=fmt, allocation="uniform", weighted_fit=False)
    quantize_model(model, config, apply="modules", progress=False)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, backend="eager")(ids).logits  # first call builds the runtime weights
        eager = model(ids).logits
        again = torch.compile(model, backend="eager")(ids).logits
    assert torch.equal(compiled, eager) and torch.equal(again, eager)
    torch._dynamo.reset()
