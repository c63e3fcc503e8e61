"""Pure-torch reference for the LUT-quantised linear layer.

A weight ``W`` of shape ``[N, K]`` (out_features, in_features) is stored as

* ``codes``  uint8 ``[N, K]`` with values in ``[0, 2**bits)``,
* ``lut``    float32 ``[2**bits]`` (any table: int grid, fp ExMy, NF4, Lloyd-Max, ...),
* ``scales`` float32 ``[N, ceil(K / block_size)]`` (may be negative),

and ``W[n, k] = lut[codes[n, k]] * scales[n, k // block_size]``.  The reference
dequantises in float32 and multiplies in float32; it is the ground truth the Triton
kernels in :mod:`hf_optquant.kernels.lut_linear` are tested against.
"""

from __future__ import annotations

import torch

__all__ = ["dequantize_reference", "lut_linear_reference"]


def dequantize_reference(
    codes: torch.Tensor,
    lut: torch.Tensor,
    scales: torch.Tensor,
    block_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return the dense weight ``W[n, k] = lut[codes[n, k]] * scales[n, k // block_size]``."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    n, k = codes.shape
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    n_blocks = -(-k // block_size)
    if tuple(scales.shape) != (n, n_blocks):
        raise ValueError(
            f"scales must have shape [N, ceil(K / block_size)] = {[n, n_blocks]}, got {list(scales.shape)}"
        )
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    vals = lut.to(device=codes.device, dtype=compute)[codes.long()]
    cols = torch.arange(k, device=codes.device) // block_size
    w = vals * scales.to(device=codes.device, dtype=compute)[:, cols]
    return w.to(dtype)


def lut_linear_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    lut: torch.Tensor,
    scales: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """``y = x @ W.T`` with ``W`` dequantised in float32 (float64 if ``x`` is float64).

    ``x`` has shape ``[..., K]``; the result has shape ``[..., N]`` and the dtype of ``x``.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = dequantize_reference(codes.to(x.device), lut, scales, block_size, dtype=compute)
    y = x.to(compute) @ w.T
    return y.to(x.dtype)
