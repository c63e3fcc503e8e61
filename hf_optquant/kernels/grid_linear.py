# ruff: noqa: SIM102, SIM108  (kernels keep static if/else blocks: clearer in Triton)
"""GPU decoding of entropy-coded (uniform grid + rANS) weights, fused into the linear layer.

Weight contract (the grid format, :mod:`hf_optquant.formats.grid`)::

    W[n, k] = float32(float32(index[n, k] * step) * scale[n])     (channel or tensor scales)

with ``index`` stored as the interleaved-rANS stream of :mod:`hf_optquant.coding` (row-structured
layout: a row is cut into ``P`` lanes of ``S`` symbols; a *group* is the 32 lanes of 32
consecutive rows at the same segment, one GPU warp).

Packed form (:class:`PackedGridWeight`): the stored stream almost as is (payload words, lane
states, group word offsets, last-read steps), plus a 4096-entry slot table
``freq << 20 | (value + 128) << 12 | bias`` (16 KB), the escaped weights as a small correction
list and float32 scales. Its size is the encoded size plus a few bytes per lane.

Kernel (one Triton kernel, three modes): a program decodes one row block (32 rows) with one
warp per segment (``W = next_pow2(P) <= 32`` warps, one lane = one thread). A step::

    slot = x & 4095;  e = table[slot]                 (shared memory on GPUs)
    x = (e >> 20) * (x >> 12) + (e & 4095)
    v = float(e & 0xFF000)                            ((value + 128) * 4096)
    need = x < 2**16                                  (gated by t <= last in the tail steps)
    rank, cnt = ballot(need)                          (vote.sync.ballot + popc on GPUs)
    x = need ? x << 16 | pf : x;  pf = need ? payload[base + rank] : pf;  base += cnt

(on GPUs the renormalisation is one inline-PTX block: 10 SASS instructions per step).

* ``MODE_GEMV`` (batch 1-4): ``acc += v * x[k]`` for up to 4 activation rows, then per row
  ``y = (sum(acc) / 4096 - 128 * sum(x over the lane) + escape corrections) * step * scale``
  -- weights never leave their compressed form, only compressed bytes cross HBM. (The +128
  bias saves an instruction per weight; removing it at the end costs ~1e-4 of relative
  precision in float32, far below a bf16 output's rounding.)
* ``MODE_DENSE``: writes the dequantised weight (float32 table of ``v * step`` times the row
  scale, rounded like the torch reference: bit-exact) -- the scratch path for larger batches;
* ``MODE_INDEX``: writes alphabet indices (int16), used once at pack time to locate escapes.

Escapes decode to the placeholder value -128; the true values live in the correction list
(row, column, value), added in the GEMV epilogue and written by :func:`decode_grid_weight`.
On CPU the kernel runs under Triton's interpreter when ``TRITON_INTERPRET=1`` (ballot and
shared memory emulated with tl.cumsum and global loads); without it :func:`grid_linear` falls
back to the torch decoder in :mod:`hf_optquant.kernels.grid_reference`.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from ..coding import CodedStream, CorruptStreamError, stream_from_tensors
from ..coding.alphabet import Alphabet, unmap_escapes, unpack_raw_bits
from ..coding.frequencies import cumulative, decode_table
from ..coding.layout import GPU_WINDOW, GROUP_LANES, MAX_SEGMENTS, PROB_SCALE, Header, gpu_segment
from ..coding.stream import decode_symbols, encode_tensors, lane_last_reads
from ..formats.grid import GridElement
from ..formats.tensor import EncodedTensor, TensorFormat
from .common import HAS_TRITON, DeviceTensors, jit_or_interpret, linear_input, scratch_weight, tl, use_triton
from .common import cdiv as _cdiv
from .common import interpret_mode as _interpret_mode
from .pair_mma import PackedPairWeight, decode_pair_weight, fits_pair_layout, pack_pair_weight, pair_linear
from .prefix_linear import PackedPrefixWeight, decode_prefix_weight, escape_weights, pack_prefix_weight, prefix_linear

__all__ = [
    "GEMV_MAX_M",
    "PackedGridWeight",
    "decode_grid_weight",
    "grid_linear",
    "grid_supported",
    "pack_grid_weight",
    "pack_grid_stream",
]

#: Largest batch served by the fused decode-GEMV (larger: decode to a scratch buffer + matmul).
GEMV_MAX_M = int(os.environ.get("HF_OPTQUANT_GRID_GEMV_MAX_M", "4"))
_BM_MAX = 4  # activation rows per GEMV program (explicit accumulators)
MODE_GEMV, MODE_DENSE, MODE_INDEX = 0, 1, 2
_PLACEHOLDER = -128
_PAD_WORDS = 64
#: 1 = inline PTX (shared-memory table, warp ballot) on GPUs; 0 = portable Triton only.
_ASM = int(os.environ.get("HF_OPTQUANT_GRID_ASM", "1"))


# --------------------------------------------------------------------------------------
# Packed weight
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class PackedGridWeight(DeviceTensors):
    """Kernel-ready form of a grid-coded ``[N, K]`` weight (see the module docstring)."""

    table: torch.Tensor  # int32 [4096]: freq << 20 | (value + 128) << 12 | bias
    symbols: torch.Tensor  # int16 [4096]: alphabet index per slot (pack-time escape search)
    vals: torch.Tensor  # float32 [256]: float32(v * step) for v = -128..127 (placeholder -> 0)
    states: torch.Tensor  # int32 [lanes]
    last: torch.Tensor  # int32 [lanes]: last read step, -1 if none
    gstart: torch.Tensor  # int32 [groups + 1]: first payload word of each group, then the total
    payload: torch.Tensor  # int16 [words + pad]
    scales: torch.Tensor  # float32 [N] or [1]
    esc_off: torch.Tensor  # int32 [row_blocks + 1]: escapes of row block rb are esc_off[rb]:esc_off[rb+1]
    esc_row: torch.Tensor  # int32 [E]
    esc_col: torch.Tensor  # int32 [E]
    esc_val: torch.Tensor  # int64 [E]: the escaped grid indices
    out_features: int
    in_features: int
    seg: int  # lane length S
    segments: int  # lanes per row P
    step: float
    dtype: torch.dtype  # the original weight dtype (what decode_grid_weight returns by default)

    @property
    def device(self) -> torch.device:
        return self.payload.device

    @property
    def row_blocks(self) -> int:
        return _cdiv(self.out_features, GROUP_LANES)

    @property
    def num_escapes(self) -> int:
        return self.esc_val.numel()


def grid_supported(fmt: TensorFormat) -> bool:
    """Whether the grid kernels can run ``fmt``: a uniform grid with tensor or channel scales,
    no sparse outliers and no rotation (the data must also be row-coded; see pack_grid_weight)."""
    return (
        isinstance(fmt, TensorFormat)
        and isinstance(fmt.element, GridElement)
        and fmt.sparse is None
        and fmt.rotation is None
        and fmt.scaling.granularity in ("tensor", "channel")
    )


def _as_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    cols = shape[-1] if shape else 1
    numel = 1
    for s in shape:
        numel *= s
    return (numel // cols if cols else 0), cols


def pack_grid_weight(
    encoded: EncodedTensor, device=None, *, chunk_size: int | None = None, layout: str = "auto"
) -> PackedGridWeight | PackedPrefixWeight:
    """Validate an encoded grid weight and build its kernel form on ``device``.

    ``layout="auto"`` (default): ``"pairs"`` on a GPU for rows of up to :data:`PAIRS_MAX_IN_FEATURES`, else
    ``"prefix"`` (:func:`layout_for`). ``layout="prefix"``: the indices re-coded with the prefix code of
    :mod:`hf_optquant.coding.prefix` (several weights per table lookup: 2-3x faster GEMV than rANS on an H100 for
    ~0.1 b/p more GPU memory; RESULTS.md section 6). ``layout="pairs"``: the pair code of
    :mod:`hf_optquant.coding.pairs`, the tensor-core GEMV and the decode kernel of :mod:`.pair_mma` (GEMV 0.85-1.33x
    the prefix layout's speed, dense decode 1.4-2.3x, on the H100, RESULTS.md section 6 session 10; in-features a
    multiple of 16). ``layout="rans"``: the rANS GPU row layout described below.

    The stored stream (size first: one lane per 4096 symbols) is transcoded, on ``device``, to
    the GPU row layout (``chunk_size`` symbols per lane, default
    :func:`~hf_optquant.coding.layout.gpu_segment`): decode the indices once, re-encode them with
    rows of ``in_features``. A stream already in that layout is used as is. Raises ValueError
    (CorruptStreamError for damaged streams) if the format is not one the kernels handle.
    """
    fmt = encoded.format
    if not grid_supported(fmt):
        raise ValueError(f"grid kernels need a grid element with 'tensor' or 'channel' scaling and no sparse "
                         f"outliers or rotation; got {fmt!r}")
    rows, cols = _as_2d(tuple(encoded.shape))
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoded.tensors.items()}
    coded = {k[len("codes."):]: v for k, v in tensors.items() if k.startswith("codes.")}
    stream = stream_from_tensors(coded)
    scales = fmt.scaling.decode_scales(tensors).float().reshape(-1)
    expected = rows if fmt.scaling.granularity == "channel" else 1
    if scales.numel() != expected or not bool(torch.isfinite(scales).all()):
        raise ValueError(f"scales must be {expected} finite values, got shape {tuple(scales.shape)}")
    h = stream.header
    if h.num_symbols != rows * cols:
        raise ValueError(f"stream holds {h.num_symbols} symbols, the weight has {rows} x {cols}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    coded = stream.tensors
    if layout not in ("auto", "prefix", "pairs", "rans"):
        raise ValueError(f"layout must be 'auto', 'prefix', 'pairs' or 'rans', got {layout!r}")
    if layout in ("auto", "prefix", "pairs"):
        index = _stream_indices(coded, h, device).reshape(rows, cols)
        if layout == "auto":
            layout = layout_for(cols, device)
            if layout == "pairs" and not fits_pair_layout(index):
                layout = "prefix"  # indices the pair layout cannot escape
        if layout == "pairs":
            return pack_pair_weight(index, scales, fmt.element.step, encoded.dtype, device)  # (chunk_size: unused)
        return pack_prefix_weight(index, scales, fmt.element.step, encoded.dtype, device, chunk_size=chunk_size)
    if not _row_coded(h, cols) or (chunk_size is not None and chunk_size != h.chunk_size):
        index = _stream_indices(coded, h, device).reshape(rows, cols)
        seg = chunk_size if chunk_size is not None else gpu_segment(rows, cols)
        coded = encode_tensors(index, chunk_size=seg, row_length=cols, crc=False)
    return pack_grid_stream(coded, scales, fmt.element.step, (rows, cols), encoded.dtype, device)


PAIRS_MAX_IN_FEATURES = 4096
"""``layout="auto"`` takes the pair layout up to this row length: on the H100 its GEMV beat the prefix layout's by
1.19-1.33x at 4096 in-features and lost (0.85-0.87x) at 14336 (RESULTS.md section 6, session 10)."""


def layout_for(in_features: int, device) -> str:
    """The GPU layout ``pack_grid_weight(layout="auto")`` picks: pairs for rows of at most
    :data:`PAIRS_MAX_IN_FEATURES` (a multiple of 16) on a GPU, else the prefix code."""
    cuda = torch.device(device).type == "cuda"
    return "pairs" if cuda and in_features % 16 == 0 and in_features <= PAIRS_MAX_IN_FEATURES else "prefix"


def _row_coded(h: Header, cols: int) -> bool:
    """Whether a stream is already in the kernels' layout for rows of ``cols``."""
    ok_rows = h.row_length == max(cols, 1) and _cdiv(h.row_length, h.chunk_size) <= MAX_SEGMENTS
    return ok_rows and (h.num_direct == 0 or (GPU_WINDOW[0] <= h.lo and h.lo + h.num_direct - 1 <= GPU_WINDOW[1]))


def _stream_indices(
    coded: dict[str, torch.Tensor], h: Header, device: torch.device, kernel: bool | None = None
) -> torch.Tensor:
    """All symbols of a validated stream, decoded on ``device``: on a GPU by the Triton kernel (a
    stream of rows of one lane each is a row-coded stream), else by the CPU reference decoder.
    ``kernel=True`` forces the kernel (tests run it in Triton's interpreter)."""
    n, seg = h.num_symbols, h.chunk_size
    if kernel is None:
        kernel = HAS_TRITON and device.type == "cuda"
    if not (kernel and n % seg == 0 and h.row_length == seg):
        return decode_symbols(CodedStream(coded)).to(device)
    view = _pack_arrays({k: v.to(device) for k, v in coded.items()}, h, (n // seg, seg), device, check_window=False)
    alpha = _decode(view, MODE_INDEX, torch.int16).to(torch.int64).reshape(-1)
    values = alpha + h.lo
    esc = torch.nonzero(alpha >= h.num_direct).reshape(-1)
    if esc.numel():
        values[esc] = torch.from_numpy(_escape_values(alpha[esc].cpu().numpy(), h, coded)).to(device)
    return values.to(torch.int32) if values.numel() and int(values.abs().max()) < 2**31 else values


def _escape_values(index: np.ndarray, h: Header, coded: dict[str, torch.Tensor]) -> np.ndarray:
    """Values of escaped symbols (alphabet indices, flat order) from the stored raw bits."""
    alphabet = Alphabet(h.lo, h.num_direct, h.num_hi_buckets, h.num_lo_buckets)
    if index.size != h.num_escapes:
        raise CorruptStreamError(f"{index.size} escape symbols decoded, {h.num_escapes} escaped values stored")
    bits = alphabet.bucket_bits()[index]
    if int(bits.sum()) != h.escape_bits:
        raise CorruptStreamError("escape buckets do not match the stored raw bits")
    raw = unpack_raw_bits(coded["escapes"].cpu().numpy().view(np.uint8), bits)
    values, ok = unmap_escapes(alphabet, index, raw)
    if not ok.all():
        raise CorruptStreamError("escaped value outside the int64 range")
    return values


def pack_grid_stream(
    coded: dict[str, torch.Tensor],
    scales: torch.Tensor,
    step: float,
    shape: tuple[int, int],
    dtype: torch.dtype = torch.bfloat16,
    device=None,
) -> PackedGridWeight:
    """Kernel form of a (validated) coded stream ``coded`` of grid indices of ``shape``.

    ``scales``: float32 [rows] or [1]. The stream must be in the GPU row layout
    (``encode_symbols(..., row_length=cols)``: at most 32 lanes per row, direct values within
    [-127, 127]); otherwise ValueError. ``coded`` may live on a GPU (then it is trusted: a
    benchmark's own encoding, or :func:`pack_grid_weight`'s transcoding of a validated stream).
    """
    rows, cols = shape
    h = Header.from_array(coded["header"].cpu().numpy())
    device = torch.device(device) if device is not None else coded["payload"].device
    if h.num_symbols != rows * cols or h.row_length != max(cols, 1):
        raise ValueError(f"stream holds {h.num_symbols} symbols in rows of {h.row_length}; the kernels need "
                         f"{rows} rows of {cols} (encode with row_length={cols})")
    packed = _pack_arrays(coded, h, shape, device, check_window=True)
    packed = dataclasses.replace(packed, scales=scales.float().reshape(-1).contiguous().to(device), step=float(step),
                                 vals=_value_table(step).to(device), dtype=dtype)  # fmt: skip
    if h.num_escapes:
        packed = _with_escapes(packed, h, coded)
    return packed


def _value_table(step: float) -> torch.Tensor:
    vals = (torch.arange(-128, 128, dtype=torch.float64) * float(step)).float()
    vals[0] = 0.0  # the escape placeholder
    return vals


def _pack_arrays(coded: dict, h: Header, shape: tuple[int, int], device, check_window: bool) -> PackedGridWeight:
    """Slot tables, lane arrays and payload of a row-coded stream (unit scales, step 1)."""
    rows, cols = shape
    geometry = h.geometry()
    if geometry.segments > MAX_SEGMENTS:
        raise ValueError(f"stream has {geometry.segments} lanes per row; the kernels take at most {MAX_SEGMENTS}")
    if check_window and h.num_direct and not (h.lo >= -127 and h.lo + h.num_direct - 1 <= 127):
        raise ValueError(f"direct values {h.lo}..{h.lo + h.num_direct - 1} exceed the kernels' [-127, 127]")
    freqs = coded["freqs"].cpu().numpy().view(np.uint16).astype(np.int64)
    table, symbols = _slot_tables(freqs, h)
    last = lane_last_reads(coded["tails"].cpu(), coded["tail_ext"].cpu(), geometry)
    words = coded["group_words"].to(torch.int64)
    gstart = torch.cat([torch.zeros(1, dtype=torch.int64, device=words.device), torch.cumsum(words, 0)]).to(torch.int32)
    payload = torch.cat([coded["payload"], torch.zeros(_PAD_WORDS, dtype=torch.int16, device=words.device)])
    rb = _cdiv(rows, GROUP_LANES)
    empty = torch.zeros(0, dtype=torch.int32)
    return PackedGridWeight(
        table=torch.from_numpy(table), symbols=torch.from_numpy(symbols), vals=_value_table(1.0),
        states=coded["states"].contiguous(), last=torch.from_numpy(last.astype(np.int32)), gstart=gstart,
        payload=payload, scales=torch.ones(1), esc_off=torch.zeros(rb + 1, dtype=torch.int32), esc_row=empty,
        esc_col=empty, esc_val=torch.zeros(0, dtype=torch.int64), out_features=rows, in_features=cols,
        seg=h.chunk_size, segments=geometry.segments, step=1.0, dtype=torch.float32,
    ).to(device)  # fmt: skip


def _slot_tables(freqs: np.ndarray, h: Header) -> tuple[np.ndarray, np.ndarray]:
    """The 4096-entry GPU table (freq << 20 | (value + 128) << 12 | bias) and alphabet index per slot."""
    if h.num_symbols == 0:
        return np.zeros(PROB_SCALE, np.int32), np.zeros(PROB_SCALE, np.int16)
    sym = decode_table(freqs).astype(np.int64)
    bias = np.arange(PROB_SCALE) - cumulative(freqs)[sym]
    value = np.where(sym < h.num_direct, h.lo + sym, _PLACEHOLDER)  # only meaningful inside [-127, 127]
    entry = (freqs[sym] << 20) | (((value + 128) & 255) << 12) | bias
    entry = np.where(entry >= 1 << 31, entry - (1 << 32), entry)
    return entry.astype(np.int32), sym.astype(np.int16)


def _with_escapes(packed: PackedGridWeight, h: Header, coded: dict[str, torch.Tensor]) -> PackedGridWeight:
    """Locate escaped symbols (one decode to alphabet indices) and build the correction list."""
    alpha = _decode(packed, MODE_INDEX, torch.int16)
    pos = torch.nonzero(alpha >= h.num_direct)
    values = _escape_values(alpha[pos[:, 0], pos[:, 1]].cpu().numpy().astype(np.int64), h, coded)
    rows = pos[:, 0].to(torch.int64)
    off = torch.searchsorted(rows, torch.arange(packed.row_blocks + 1, device=rows.device) * GROUP_LANES)
    dev = packed.device
    return dataclasses.replace(
        packed, esc_off=off.to(torch.int32).to(dev), esc_row=pos[:, 0].to(torch.int32).contiguous().to(dev),
        esc_col=pos[:, 1].to(torch.int32).contiguous().to(dev), esc_val=torch.from_numpy(values).to(dev),
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# The Triton kernel (jitted lazily, see ``_kernel``, so that the interpreter-or-compiler
# choice follows TRITON_INTERPRET at call time; hence no @triton.jit helpers).
# --------------------------------------------------------------------------------------


def _grid_kernel(
    x_ptr, out_ptr, table_ptr, sym_ptr, vals_ptr, states_ptr, last_ptr, gstart_ptr, payload_ptr, scale_ptr,
    esc_off_ptr, esc_row_ptr, esc_col_ptr, esc_val_ptr,
    M, N, K, S, P, last_word, stride_xm, stride_om, step,
    W: tl.constexpr, MODE: tl.constexpr, BM: tl.constexpr, XPACK: tl.constexpr, OPACK: tl.constexpr,
    ROW_SCALE: tl.constexpr, ASM: tl.constexpr, FULL: tl.constexpr, HAS_ESC: tl.constexpr, OBF16: tl.constexpr,
):  # fmt: skip
    LANES: tl.constexpr = 32 * W
    U: tl.constexpr = 8  # steps per main-loop iteration
    rb = tl.program_id(0)
    pm = tl.program_id(1)
    i = tl.arange(0, LANES)
    lane = i % 32
    seg = i // 32
    row = rb * 32 + lane
    g = rb * P + seg
    seg_ok = seg < P
    act = seg_ok & (row < N)
    k0 = tl.where(seg_ok, seg * S, 0)  # idle warps (seg >= P) point at segment 0
    seglen = tl.where(seg_ok, tl.minimum(K - k0, S), 0)
    lid = g * 32 + lane
    x = tl.load(states_ptr + lid, mask=act, other=1).to(tl.uint32, bitcast=True)
    last = tl.load(last_ptr + lid, mask=act, other=-1)
    base = tl.load(gstart_ptr + g, mask=seg_ok, other=0)
    pwords = payload_ptr.to(tl.pointer_type(tl.uint16))

    # ---- decode table: shared memory (inline PTX) on GPUs, global loads in the interpreter
    if ASM:
        decl = tl.inline_asm_elementwise(
            ".shared .align 16 .b8 hfoq_grid_tbl[16384];\n\tmov.u32 $0, hfoq_grid_tbl;", "=r,r",
            [tl.full([1], 0, tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip
        tbase = tl.sum(decl, 0)
        for j in range(0, 4096 // LANES):
            tv = tl.load(table_ptr + j * LANES + i)
            tl.inline_asm_elementwise(
                "st.shared.u32 [$1], $2;\n\tmov.u32 $0, 0;", "=r,r,r", [tbase + (j * LANES + i) * 4, tv],
                dtype=tl.int32, is_pure=False, pack=1,
            )  # fmt: skip
        tl.debug_barrier()
        ltmask = tl.inline_asm_elementwise(
            "mov.u32 $0, %lanemask_lt;", "=r,r", [lane], dtype=tl.int32, is_pure=True, pack=1
        )

    # ---- the first word of every lane that reads at all
    req = act & (last >= 0)
    if ASM:
        rank, cnt = tl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .b32 m; setp.ne.b32 p, $2, 0; vote.sync.ballot.b32 m, p, -1;"
            " and.b32 $0, m, $3; popc.b32 $0, $0; popc.b32 $1, m; }",
            "=r,=r,r,r", [req.to(tl.int32), ltmask], dtype=(tl.int32, tl.int32), is_pure=False, pack=1,
        )  # fmt: skip
    else:
        r2 = tl.reshape(req.to(tl.int32), [W, 32])
        rank = tl.reshape(tl.cumsum(r2, axis=1) - r2, [LANES])
        cnt = tl.reshape(tl.broadcast_to(tl.sum(r2, axis=1)[:, None], [W, 32]), [LANES])
    pf = tl.load(pwords + tl.minimum(base + rank, last_word), mask=req, other=0).to(tl.uint32)
    base += cnt

    t_main = tl.min(tl.where(act, last, S), axis=0)
    t_main = tl.maximum(t_main, 0) // U * U

    acc0 = tl.zeros([LANES], dtype=tl.float32)
    acc1 = tl.zeros([LANES], dtype=tl.float32)
    acc2 = tl.zeros([LANES], dtype=tl.float32)
    acc3 = tl.zeros([LANES], dtype=tl.float32)
    if ROW_SCALE:
        rscale = tl.load(scale_ptr + row, mask=act, other=0.0)
    else:
        rscale = tl.load(scale_ptr + row * 0)
    xrow = x_ptr + pm * BM * stride_xm
    xq = xrow.to(tl.pointer_type(tl.int64)) + k0 // 4  # XPACK: 4 bf16 activations per 8-byte load
    qs = stride_xm // 4
    orow = out_ptr + row.to(tl.int64) * K + k0  # DENSE / INDEX output rows
    mk1 = tl.full([LANES], 1, tl.int32) < M - pm * BM  # activation rows 1..3 of this tile exist
    mk2 = tl.full([LANES], 2, tl.int32) < M - pm * BM
    mk3 = tl.full([LANES], 3, tl.int32) < M - pm * BM

    # ---- main loop: every active lane is before its last read (no gating), 4 steps per iteration
    for t8 in range(0, t_main // U):
        t0 = t8 * U
        if MODE == 0:
            if XPACK:
                xw0 = tl.load(xq + 2 * t8)
                xv0 = tl.load(xq + 2 * t8 + 1)
                if BM > 1:
                    xw1 = tl.load(xq + qs + 2 * t8, mask=mk1, other=0)
                    xv1 = tl.load(xq + qs + 2 * t8 + 1, mask=mk1, other=0)
                if BM > 2:
                    xw2 = tl.load(xq + 2 * qs + 2 * t8, mask=mk2, other=0)
                    xv2 = tl.load(xq + 2 * qs + 2 * t8 + 1, mask=mk2, other=0)
                if BM > 3:
                    xw3 = tl.load(xq + 3 * qs + 2 * t8, mask=mk3, other=0)
                    xv3 = tl.load(xq + 3 * qs + 2 * t8 + 1, mask=mk3, other=0)
        else:
            word = tl.zeros([LANES], dtype=tl.int64)
            word2 = tl.zeros([LANES], dtype=tl.int64)
        for u in tl.static_range(U):
            slot = x & 4095
            if ASM:
                e = tl.inline_asm_elementwise(
                    "ld.shared.u32 $0, [$1];", "=r,r", [tbase + slot.to(tl.int32) * 4],
                    dtype=tl.int32, is_pure=True, pack=1,
                ).to(tl.uint32, bitcast=True)
            else:
                e = tl.load(table_ptr + slot).to(tl.uint32, bitcast=True)
            x = (e >> 20) * (x >> 12) + (e & 4095)
            if ASM:  # renormalise + fetch in one block: ballot rank, x = x << 16 | pf, pf = next word
                if FULL:
                    gate = tl.full([LANES], 1, tl.int32)
                else:
                    gate = act.to(tl.int32)
                x, pf, base = tl.inline_asm_elementwise(
                    "{ .reg .pred p; .reg .b32 m, r, c; .reg .b64 a;"
                    " setp.lt.u32 p, $3, 65536; setp.ne.and.b32 p, $7, 0, p;"
                    " vote.sync.ballot.b32 m, p, -1;"
                    " and.b32 r, m, $6; popc.b32 r, r; popc.b32 c, m;"
                    " add.u32 r, r, $5; min.u32 r, r, $9; mad.wide.u32 a, r, 2, $8;"
                    " mov.b32 $0, $3; mov.b32 $1, $4;"
                    " @p prmt.b32 $0, $4, $3, 0x5410; @p ld.global.nc.u16 $1, [a];"
                    " add.u32 $2, $5, c; }",
                    "=r,=r,=r,r,r,r,r,r,l,r",
                    [x, pf, base, ltmask, gate, pwords, last_word],
                    dtype=(tl.uint32, tl.uint32, tl.int32), is_pure=False, pack=1,
                )  # fmt: skip
            else:
                need = x < 65536
                if not FULL:
                    need = need & act
                r2 = tl.reshape(need.to(tl.int32), [W, 32])
                rank = tl.reshape(tl.cumsum(r2, axis=1) - r2, [LANES])
                cnt = tl.reshape(tl.broadcast_to(tl.sum(r2, axis=1)[:, None], [W, 32]), [LANES])
                x = tl.where(need, (x << 16) | pf, x)
                nw = tl.load(pwords + tl.minimum(base + rank, last_word), mask=need, other=0)
                pf = tl.where(need, nw.to(tl.uint32), pf)
                base += cnt
            # ---- use the decoded value
            if MODE == 0:
                v = (e & 0xFF000).to(tl.int32, bitcast=True).to(tl.float32)  # (value + 128) * 4096
                if XPACK:
                    if u < 4:
                        sh = 16 * u
                        acc0 += v * ((xw0 >> sh) << 16).to(tl.int32).to(tl.float32, bitcast=True)
                        if BM > 1:
                            acc1 += v * ((xw1 >> sh) << 16).to(tl.int32).to(tl.float32, bitcast=True)
                        if BM > 2:
                            acc2 += v * ((xw2 >> sh) << 16).to(tl.int32).to(tl.float32, bitcast=True)
                        if BM > 3:
                            acc3 += v * ((xw3 >> sh) << 16).to(tl.int32).to(tl.float32, bitcast=True)
                    else:
                        sh = 16 * (u - 4)
                        acc0 += v * ((xv0 >> sh) << 16).to(tl.int32).to(tl.float32, bitcast=True)
                        if BM > 1:
                            acc1 += v * ((xv1 >> sh) << 16).to(tl.int32).to(tl.float32, bitcast=True)
                        if BM > 2:
                            acc2 += v * ((xv2 >> sh) << 16).to(tl.int32).to(tl.float32, bitcast=True)
                        if BM > 3:
                            acc3 += v * ((xv3 >> sh) << 16).to(tl.int32).to(tl.float32, bitcast=True)
                else:
                    kk = k0 + t0 + u
                    acc0 += v * tl.load(xrow + kk).to(tl.float32)
                    if BM > 1:
                        acc1 += v * tl.load(xrow + stride_xm + kk, mask=mk1, other=0.0).to(tl.float32)
                    if BM > 2:
                        acc2 += v * tl.load(xrow + 2 * stride_xm + kk, mask=mk2, other=0.0).to(tl.float32)
                    if BM > 3:
                        acc3 += v * tl.load(xrow + 3 * stride_xm + kk, mask=mk3, other=0.0).to(tl.float32)
            elif MODE == 1:
                wv = tl.load(vals_ptr + ((e >> 12) & 255)) * rscale
                if OBF16:  # round to nearest even by hand (the interpreter's cast truncates)
                    ub = wv.to(tl.uint32, bitcast=True)
                    hb = (ub + 0x7FFF + ((ub >> 16) & 1)) >> 16
                    if OPACK:
                        if u < 4:
                            word = word | (hb.to(tl.int64) << (16 * u))
                        else:
                            word2 = word2 | (hb.to(tl.int64) << (16 * (u - 4)))
                    else:
                        tl.store(orow + t0 + u, hb.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=act)
                elif OPACK:
                    bits = wv.to(out_ptr.dtype.element_ty).to(tl.int16, bitcast=True).to(tl.int64) & 0xFFFF
                    if u < 4:
                        word = word | (bits << (16 * u))
                    else:
                        word2 = word2 | (bits << (16 * (u - 4)))
                else:
                    tl.store(orow + t0 + u, wv.to(out_ptr.dtype.element_ty), mask=act)
            else:
                tl.store(orow + t0 + u, tl.load(sym_ptr + slot), mask=act)
        if MODE == 1:
            if OPACK:
                tl.store(orow.to(tl.pointer_type(tl.int64)) + 2 * t8, word, mask=act)
                tl.store(orow.to(tl.pointer_type(tl.int64)) + 2 * t8 + 1, word2, mask=act)

    # ---- tail: gated reads, lanes of different lengths
    for t in range(t_main, S):
        on = act & (t < seglen)
        slot = x & 4095
        if ASM:
            e = tl.inline_asm_elementwise(
                "ld.shared.u32 $0, [$1];", "=r,r", [tbase + slot.to(tl.int32) * 4],
                dtype=tl.int32, is_pure=True, pack=1,
            ).to(tl.uint32, bitcast=True)
        else:
            e = tl.load(table_ptr + slot).to(tl.uint32, bitcast=True)
        xn = (e >> 20) * (x >> 12) + (e & 4095)
        x = tl.where(on, xn, x)
        need = on & (x < 65536) & (t <= last)
        req = need & (t < last)
        if ASM:
            rank, cnt = tl.inline_asm_elementwise(
                "{ .reg .pred p; .reg .b32 m; setp.ne.b32 p, $2, 0; vote.sync.ballot.b32 m, p, -1;"
                " and.b32 $0, m, $3; popc.b32 $0, $0; popc.b32 $1, m; }",
                "=r,=r,r,r", [req.to(tl.int32), ltmask], dtype=(tl.int32, tl.int32), is_pure=False, pack=1,
            )  # fmt: skip
        else:
            r2 = tl.reshape(req.to(tl.int32), [W, 32])
            rank = tl.reshape(tl.cumsum(r2, axis=1) - r2, [LANES])
            cnt = tl.reshape(tl.broadcast_to(tl.sum(r2, axis=1)[:, None], [W, 32]), [LANES])
        x = tl.where(need, (x << 16) | pf, x)
        nw = tl.load(pwords + tl.minimum(base + rank, last_word), mask=req, other=0)
        pf = tl.where(req, nw.to(tl.uint32), pf)
        base += cnt
        if MODE == 0:
            v = tl.where(on, (e & 0xFF000).to(tl.int32, bitcast=True).to(tl.float32), 0.0)
            kk = tl.minimum(k0 + t, K - 1)
            acc0 += v * tl.load(xrow + kk).to(tl.float32)
            if BM > 1:
                acc1 += v * tl.load(xrow + stride_xm + kk, mask=mk1, other=0.0).to(tl.float32)
            if BM > 2:
                acc2 += v * tl.load(xrow + 2 * stride_xm + kk, mask=mk2, other=0.0).to(tl.float32)
            if BM > 3:
                acc3 += v * tl.load(xrow + 3 * stride_xm + kk, mask=mk3, other=0.0).to(tl.float32)
        elif MODE == 1:
            wv = tl.load(vals_ptr + ((e >> 12) & 255)) * rscale
            if OBF16:
                ub = wv.to(tl.uint32, bitcast=True)
                hb = (ub + 0x7FFF + ((ub >> 16) & 1)) >> 16
                tl.store(orow + t, hb.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=on)
            else:
                tl.store(orow + t, wv.to(out_ptr.dtype.element_ty), mask=on)
        else:
            tl.store(orow + t, tl.load(sym_ptr + slot), mask=on)

    # ---- GEMV epilogue: remove the +128 bias (128 * sum of the segment's activations), sum the
    # warps of each row, add the escape corrections, scale
    if MODE == 0:
        rows32 = rb * 32 + tl.arange(0, 32)
        rmask = rows32 < N
        if ROW_SCALE:
            sc = tl.load(scale_ptr + rows32, mask=rmask, other=0.0) * step
        else:
            sc = tl.load(scale_ptr + rows32 * 0) * step
        for m in tl.static_range(BM):
            if m == 0:
                a = acc0
            elif m == 1:
                a = acc1
            elif m == 2:
                a = acc2
            else:
                a = acc3
            mrow = tl.full([32], m, tl.int32) < M - pm * BM
            sx = tl.zeros([LANES], dtype=tl.float32)  # lane l sums x[k0 + l + 32 j] over its segment
            for j0 in range(0, S, 32):
                kk = j0 + lane
                mx = (kk < seglen) & (tl.full([LANES], m, tl.int32) < M - pm * BM)
                sx += tl.load(xrow + m * stride_xm + k0 + kk, mask=mx, other=0.0).to(tl.float32)
            seg_sum = tl.sum(tl.reshape(sx, [W, 32]), axis=1)  # per warp
            bias = tl.reshape(tl.broadcast_to(seg_sum[:, None], [W, 32]), [LANES]) * 128.0
            a = tl.where(act, a * (1.0 / 4096.0) - bias, 0.0)
            tot = tl.sum(tl.reshape(a, [W, 32]), axis=0)
            if HAS_ESC:
                e0 = tl.load(esc_off_ptr + rb)
                e1 = tl.load(esc_off_ptr + rb + 1)
                for c0 in range(e0, e1, 32):
                    ei = c0 + tl.arange(0, 32)
                    em = ei < e1
                    er = tl.load(esc_row_ptr + ei, mask=em, other=-1) - rb * 32
                    ec = tl.load(esc_col_ptr + ei, mask=em, other=0)
                    ev = tl.load(esc_val_ptr + ei, mask=em, other=0).to(tl.float32) + 128.0  # minus the placeholder
                    xv = tl.load(x_ptr + (pm * BM + m) * stride_xm + ec, mask=em & mrow, other=0.0)
                    contrib = ev * xv.to(tl.float32)
                    onehot = er[None, :] == tl.arange(0, 32)[:, None]
                    tot += tl.sum(tl.where(onehot, contrib[None, :], 0.0), axis=1)
            y = tot * sc
            tl.store(out_ptr + (pm * BM + m) * stride_om + rows32, y.to(out_ptr.dtype.element_ty), mask=rmask & mrow)


def _launch(packed: PackedGridWeight, mode: int, out: torch.Tensor, x: torch.Tensor | None = None) -> None:
    """Run the kernel over every row block (and activation-row tile in GEMV mode)."""
    interpret = packed.device.type != "cuda" or _interpret_mode()
    n, k = packed.out_features, packed.in_features
    w = 1 << max(0, (packed.segments - 1).bit_length())
    m = x.shape[0] if x is not None else 1
    bm = min(_BM_MAX, m)
    xt = x if x is not None else packed.vals  # any tensor: unused outside GEMV mode
    xpack = (mode == MODE_GEMV and x.dtype == torch.bfloat16 and packed.seg % 4 == 0 and k % 4 == 0
             and x.stride(0) % 4 == 0 and x.data_ptr() % 8 == 0)  # fmt: skip
    opack = (mode == MODE_DENSE and out.element_size() == 2 and packed.seg % 4 == 0 and k % 4 == 0
             and out.data_ptr() % 8 == 0)  # fmt: skip
    full = n % GROUP_LANES == 0 and packed.segments == w
    grid = (packed.row_blocks, _cdiv(m, bm) if mode == MODE_GEMV else 1)
    jit_or_interpret(_grid_kernel, interpret)[grid](
        xt, out, packed.table, packed.symbols, packed.vals, packed.states, packed.last, packed.gstart,
        packed.payload, packed.scales, packed.esc_off, packed.esc_row, packed.esc_col, packed.esc_val,
        m, n, k, packed.seg, packed.segments, packed.payload.numel() - 1,
        xt.stride(0) if x is not None else 0, out.stride(0), packed.step,
        W=w, MODE=mode, BM=bm, XPACK=xpack, OPACK=opack, ROW_SCALE=packed.scales.numel() > 1,
        ASM=bool(_ASM) and not interpret, FULL=full, HAS_ESC=packed.num_escapes > 0,
        OBF16=mode == MODE_DENSE and out.dtype == torch.bfloat16,
        num_warps=w, num_stages=1,
    )  # fmt: skip


def _decode(packed: PackedGridWeight, mode: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense [N, K] output of the DENSE or INDEX mode (Triton, or the torch reference)."""
    n, k = packed.out_features, packed.in_features
    out = torch.empty((n, k), dtype=dtype, device=packed.device)
    if n == 0 or k == 0:
        return out
    if use_triton(packed.payload):
        _launch(packed, mode, out)
        return out
    from .grid_reference import decode_reference

    index, values = decode_reference(packed)
    return index.to(dtype) if mode == MODE_INDEX else values.to(dtype)


def decode_grid_weight(packed: PackedGridWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense ``[N, K]`` weight on ``packed``'s device, bit-identical to the format's decode."""
    if isinstance(packed, PackedPrefixWeight):
        return decode_prefix_weight(packed, dtype)
    if isinstance(packed, PackedPairWeight):
        return decode_pair_weight(packed, dtype)
    dtype = packed.dtype if dtype is None else dtype
    if dtype == torch.float64:
        return decode_grid_weight(packed, torch.float32).double()
    out = _decode(packed, MODE_DENSE, dtype)
    if packed.num_escapes:
        out[packed.esc_row.long(), packed.esc_col.long()] = escape_weights(packed, dtype)
    return out


def grid_linear(x: torch.Tensor, packed: PackedGridWeight, *, path: str | None = None) -> torch.Tensor:
    """``y = x @ W.T`` for a packed grid weight; ``x`` is ``[..., K]`` in bf16/fp16/fp32.

    ``path``: ``"gemv"`` (fused decode-GEMV, any batch in tiles of 4 rows), ``"dense"`` (decode
    to a scratch buffer, then ``torch.matmul``), ``"torch"`` (torch reference decoder). Default:
    ``gemv`` up to ``GEMV_MAX_M`` rows, ``dense`` above; the torch path on CPU without Triton.
    """
    if isinstance(packed, PackedPrefixWeight):
        return prefix_linear(x, packed, path=path)
    if isinstance(packed, PackedPairWeight):
        return pair_linear(x, packed, path=path)
    k, n = packed.in_features, packed.out_features
    x2, lead = linear_input(x, k, ("gemv", "dense", "torch"), path)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return x.new_zeros(*lead, n)
    if x2.device != packed.device:
        raise ValueError(f"packed weight is on {packed.device}, x on {x2.device}")
    if path == "torch" or not use_triton(x2):
        w = decode_grid_weight(packed, torch.float32)
        return (x2.float() @ w.T).to(x.dtype).reshape(*lead, n)
    if path is None:
        path = "gemv" if m <= GEMV_MAX_M else "dense"
    if path == "dense":
        w = scratch_weight(packed.device, n, k, x2.dtype)
        _launch(packed, MODE_DENSE, w)
        if packed.num_escapes:
            w[packed.esc_row.long(), packed.esc_col.long()] = escape_weights(packed, x2.dtype)
        return (x2 @ w.T).reshape(*lead, n)
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    _launch(packed, MODE_GEMV, y, x2)
    return y.reshape(*lead, n)
