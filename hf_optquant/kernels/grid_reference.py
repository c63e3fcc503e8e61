"""Torch reference for the grid kernels: the same lane decoder, run with torch ops.

:func:`decode_reference` decodes a :class:`~hf_optquant.kernels.grid_linear.PackedGridWeight`
from its kernel arrays alone (slot table, states, last-read steps, group offsets, payload) with
the lockstep lane decoder of :mod:`hf_optquant.coding.rans`, i.e. the algorithm the Triton kernel
runs, on any device. It is the CPU fallback of ``grid_linear`` and, with the stored stream's own
decoder (``hf_optquant.coding.decode_symbols``) and a float64 matmul, the reference the tests
compare the kernels against.
"""

from __future__ import annotations

import torch

from ..coding.errors import CorruptStreamError
from ..coding.layout import Geometry
from ..coding.rans import decode_lanes
from .common import grid_dequantise

__all__ = ["decode_reference", "grid_linear_reference"]


def decode_reference(packed) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alphabet index int64 [N, K], weight float32 [N, K])``; escaped weights are left at 0."""
    n, k = packed.out_features, packed.in_features
    geometry = Geometry(n * k, max(k, 1), packed.seg)
    entry = packed.table.to(torch.int64) & 0xFFFFFFFF
    freq, bias = entry >> 20, entry & 4095
    table = packed.symbols.to(torch.int64) | (bias << 20) | (freq << 32)
    words = packed.gstart[1:].to(torch.int64) - packed.gstart[:-1].to(torch.int64)
    total = int(packed.gstart[-1]) if packed.gstart.numel() else 0
    decoded = decode_lanes(packed.payload[:total], words, packed.states, packed.last, None, geometry, table)
    if decoded.bad_lanes.numel() or decoded.bad_groups.numel():
        raise CorruptStreamError("packed grid weight did not decode cleanly")
    index = decoded.index.to(torch.int64).reshape(n, k)
    slot_value = ((entry >> 12) & 255) - 128
    value_of_symbol = torch.zeros(int(packed.symbols.max()) + 1 if packed.symbols.numel() else 1,
                                  dtype=torch.int64, device=entry.device)
    value_of_symbol[packed.symbols.to(torch.int64)] = slot_value
    vals = packed.vals.to(index.device)[value_of_symbol[index] + 128]
    scale = packed.scales.to(index.device)
    return index, vals * (scale.reshape(-1, 1) if scale.numel() > 1 else scale)


def grid_linear_reference(x: torch.Tensor, packed, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``x @ W.T`` in ``dtype`` with ``W`` from :func:`decode_reference` plus the escaped weights."""
    _, w = decode_reference(packed)
    w = w.to(dtype)
    if packed.num_escapes:
        rows, cols = packed.esc_row.long().cpu(), packed.esc_col.long().cpu()
        w = w.cpu()
        w[rows, cols] = grid_dequantise(packed.esc_val.cpu(), packed.step, packed.scales, rows=rows).to(dtype)
        w = w.to(x.device)
    return (x.to(dtype) @ w.to(x.device).T)
