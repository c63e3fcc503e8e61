# ruff: noqa: SIM108  (kernels keep static if/else blocks: clearer in Triton)
"""Grid weights held prefix-coded in GPU memory, decoded several symbols per lookup inside the GEMV.

Weight contract (the grid format, as :mod:`.grid_linear`)::

    W[n, k] = float32(float32(index[n, k] * step) * scale[n])     (channel or tensor scales)

with ``index`` stored as the prefix-code lanes of :mod:`hf_optquant.coding.prefix` (a row is cut
into ``P`` lanes of ``S`` symbols; a group is the 32 lanes of 32 consecutive rows at one segment,
one GPU warp). A program decodes one 32-row block with one warp per segment. Per lane::

    check:   need = nb <= 32 and c <= last;  req = need and c < last
             rank, cnt = ballot(req);  B |= need ? pf << (32 - nb) : 0;  nb += need ? 32 : 0
             pf = req ? words[base + rank] : pf;  base += cnt
    lookup:  e = table[B >> 52];  B <<= len(e);  nb -= len(e)
             v_j = byte_j(e) - 128 (j < 3, absent symbols have value 0)
             acc += v_j * x[k0 + col + j];  col += n(e)

(two lookups per check). The main loop runs while no lane of the block can emit past its end (no
masks); a tail loop masks symbols past each lane's end. Escaped weights decode to the placeholder
-128 and are corrected in the epilogue from a (row, column, value) list, as in :mod:`.grid_linear`.

Modes: ``MODE_GEMV`` (batch 1-4, weights never leave their compressed form) and ``MODE_DENSE``
(writes the dequantised weight, bit-exact with the torch reference; the scratch path for larger
batches). On GPUs the check is one inline-PTX block (warp ballot) and the table sits in shared
memory; under ``TRITON_INTERPRET=1`` both are emulated (``tl.cumsum``, global loads).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from ..coding.alphabet import map_values
from ..coding.huffman import canonical_codes
from ..coding.layout import GPU_WINDOW, GROUP_LANES, MAX_SEGMENTS, Geometry, auto_segment
from ..coding.prefix import (
    LOOKUPS_PER_CHECK,
    LookupTable,
    PrefixCode,
    PrefixLanes,
    decode_prefix_lanes,
    encode_prefix_lanes,
    lookup_table,
)
from ..coding.table import build_code_table
from .common import (
    HAS_TRITON,
    DeviceTensors,
    grid_dequantise,
    jit_or_interpret,
    linear_input,
    scratch_weight,
    tl,
    use_triton,
)
from .common import cdiv as _cdiv
from .common import interpret_mode as _interpret_mode

__all__ = ["PackedPrefixWeight", "decode_prefix_weight", "pack_prefix_weight", "prefix_linear", "prefix_segment"]

MODE_GEMV, MODE_DENSE = 0, 1
GEMV_MAX_M = 16
"""Largest batch served by the fused decode-GEMV (in tiles of 4 rows); above: decode + matmul."""
_BM_MAX = 4
_PLACEHOLDER = -128
_PAD_WORDS = 64
_VALUE_OFFSET = 8388736.0  # 2**23 + 128: float(0x4B0000bb) - this = bb - 128
ASM = True  # inline PTX (shared-memory table, warp ballot) on GPUs; False: portable Triton only


@dataclasses.dataclass(frozen=True, eq=False)
class PackedPrefixWeight(DeviceTensors):
    """Kernel-ready prefix-coded ``[N, K]`` grid weight (see the module docstring)."""

    table: torch.Tensor  # int32 [4096] lookup entries
    code_lengths: torch.Tensor  # int16 [A]: code length per alphabet index (0 = unused)
    value_bytes: torch.Tensor  # int16 [A]: value + 128 per alphabet index (0 = escape bucket)
    words: torch.Tensor  # int32 [words + pad]: 32-bit words in load order
    gstart: torch.Tensor  # int32 [groups + 1]
    last: torch.Tensor  # int16 [lanes]: check of the lane's last read (-2: none)
    last_load: torch.Tensor  # int16 [lanes]: check of its last read that loads a word (-2: none)
    iters: torch.Tensor  # int32 [row_blocks, 2]: (loop iterations, unmasked iterations)
    scales: torch.Tensor  # float32 [N] or [1]
    vals: torch.Tensor  # float32 [256]: float32(v * step) for v = -128..127 (dense mode, bit-exact)
    esc_off: torch.Tensor  # int32 [row_blocks + 1]
    esc_row: torch.Tensor  # int32 [E]
    esc_col: torch.Tensor  # int32 [E]
    esc_val: torch.Tensor  # int64 [E]: escaped grid indices
    out_features: int
    in_features: int
    seg: int
    segments: int
    step: float
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.words.device

    @property
    def row_blocks(self) -> int:
        return _cdiv(self.out_features, GROUP_LANES)

    @property
    def num_escapes(self) -> int:
        return self.esc_val.numel()

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.out_features * self.in_features, max(self.in_features, 1), self.seg)

    def lookup(self) -> LookupTable:
        """The decode table rebuilt from the code lengths (for the torch reference decoder)."""
        lengths = self.code_lengths.cpu().numpy().astype(np.int64)
        code = PrefixCode(lengths, canonical_codes(lengths))
        return lookup_table(code, self.value_bytes.cpu().numpy().astype(np.int64))


def pack_prefix_weight(
    index: torch.Tensor,
    scales: torch.Tensor,
    step: float,
    dtype: torch.dtype = torch.bfloat16,
    device=None,
    *,
    chunk_size: int | None = None,
) -> PackedPrefixWeight:
    """Prefix-code a ``[N, K]`` tensor of grid indices (int, on any device) for the kernels.

    Encoding runs on ``index``'s device (a GPU encodes an 8B layer in well under a second);
    ``chunk_size`` is the lane length (default :func:`prefix_segment`).
    """
    if index.dim() != 2 or index.dtype.is_floating_point:
        raise ValueError(f"index must be a 2-D integer tensor, got {tuple(index.shape)} {index.dtype}")
    rows, cols = index.shape
    seg = chunk_size if chunk_size is not None else prefix_segment(rows, cols)
    if _cdiv(cols, seg) > MAX_SEGMENTS:
        raise ValueError(f"chunk_size {seg} cuts rows of {cols} into more than {MAX_SEGMENTS} lanes")
    device = torch.device(device) if device is not None else index.device
    values = index.reshape(-1).to(torch.int64)
    geometry = Geometry(rows * cols, max(cols, 1), seg)
    table = build_code_table(values, GPU_WINDOW) if values.numel() else None
    alphabet = table.alphabet if table is not None else None
    counts = table.counts if table is not None else np.zeros(1, np.int64)
    code = PrefixCode.from_counts(counts)
    if alphabet is not None:
        mapped = map_values(values, alphabet).index.to(torch.int64)
        direct = np.arange(alphabet.size) < alphabet.num_direct
        vbytes = np.where(direct, alphabet.lo + np.arange(alphabet.size) + 128, 0)
    else:
        mapped = values
        vbytes = np.zeros(1, np.int64)
    lanes = _encode_in_chunks(mapped.view(rows, cols), code, seg)
    lut = lookup_table(code, vbytes)
    gstart = torch.cat([torch.zeros(1, dtype=torch.int64, device=values.device), torch.cumsum(lanes.group_words, 0)])
    words = lanes.words
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    words = torch.cat([words, torch.zeros(_PAD_WORDS, dtype=torch.int32, device=words.device)])
    iters = _block_iters(lanes, geometry)
    esc = mapped >= (alphabet.num_direct if alphabet is not None else 1 << 62)
    pos = torch.nonzero(esc).reshape(-1)
    esc_row, esc_col = pos // max(cols, 1), pos % max(cols, 1)
    off = torch.searchsorted(esc_row, torch.arange(_cdiv(rows, GROUP_LANES) + 1, device=pos.device) * GROUP_LANES)
    i32 = functools.partial(torch.as_tensor, dtype=torch.int32)
    return PackedPrefixWeight(
        table=torch.from_numpy(lut.entries), code_lengths=i32(code.lengths).to(torch.int16),
        value_bytes=i32(vbytes).to(torch.int16), words=words, gstart=gstart.to(torch.int32),
        last=lanes.last.to(torch.int16), last_load=lanes.last_load.to(torch.int16), iters=iters,
        scales=scales.float().reshape(-1).contiguous(),
        vals=(torch.arange(-128, 128, dtype=torch.float64) * float(step)).float(),
        esc_off=off.to(torch.int32), esc_row=esc_row.to(torch.int32), esc_col=esc_col.to(torch.int32),
        esc_val=values[pos], out_features=rows, in_features=cols, seg=seg, segments=geometry.segments,
        step=float(step), dtype=dtype,
    ).to(device)  # fmt: skip


_CHUNK_SYMBOLS = 1 << 24


def prefix_segment(rows: int, cols: int) -> int:
    """Lane length: ~256 symbols (lanes in flight hide the lookup chain; measured on an H100 for 8B
    layers, RESULTS.md section 6), 512 for the largest tensors (same speed, ~0.1 b/p fewer lane
    overheads), and at most 32 lanes per row."""
    return auto_segment(cols, 256 if rows * cols < (1 << 27) else 512)


def _encode_in_chunks(mapped: torch.Tensor, code: PrefixCode, seg: int) -> PrefixLanes:
    """Encode blocks of rows separately (groups never span row blocks), bounding the encoder's memory."""
    rows, cols = mapped.shape
    step = max(GROUP_LANES, _CHUNK_SYMBOLS // max(cols, 1) // GROUP_LANES * GROUP_LANES)
    parts = [encode_prefix_lanes(mapped[r : r + step].reshape(-1), code,
                                 Geometry(min(step, rows - r) * cols, max(cols, 1), seg))
             for r in range(0, max(rows, 1), step)]  # fmt: skip
    if len(parts) == 1:
        return parts[0]
    return PrefixLanes(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(PrefixLanes)))


def _block_iters(lanes: PrefixLanes, geometry: Geometry) -> torch.Tensor:
    """Per 32-row block: loop iterations (most lookups of its lanes, halved) and unmasked ones: no
    lane of the block reads an activation past its segment within them, i.e. they end at least two
    lookups before every real lane's last (``2 * it <= lookups - 2``)."""
    per = lanes.lookups.view(geometry.row_blocks, -1)
    real = torch.as_tensor(geometry.lane_lengths(), device=per.device).view(geometry.row_blocks, -1) > 0
    most = lanes.block_iters(geometry)
    big = torch.iinfo(torch.int64).max
    least = torch.where(real, per, big).amin(1)
    safe = torch.where(least == big, 0, (least - 2).clamp_min(0) // LOOKUPS_PER_CHECK)
    return torch.stack([most, safe], 1).to(torch.int32).contiguous()


def decode_prefix_reference(packed: PackedPrefixWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alphabet index int64 [N, K], weight float32 [N, K])`` by the torch lane decoder; escaped
    weights are left at 0 (their values live in the correction list)."""
    n, k = packed.out_features, packed.in_features
    lut = packed.lookup()
    words = packed.gstart[1:].to(torch.int64) - packed.gstart[:-1].to(torch.int64)
    total = int(packed.gstart[-1]) if packed.gstart.numel() else 0
    dec = decode_prefix_lanes(packed.words[:total], words, packed.last, packed.last_load, packed.iters[:, 0], lut,
                              packed.geometry)
    index = dec.index.reshape(n, k)
    vbytes = packed.value_bytes.to(torch.int64).to(index.device)
    value = torch.where(vbytes[index] == 0, 0, vbytes[index] - 128)
    return index, grid_dequantise(value, packed.step, packed.scales)


# --------------------------------------------------------------------------------------
# The Triton kernel (jitted lazily, see ``_kernel``; no @triton.jit helpers for the same reason)
# --------------------------------------------------------------------------------------

_CHECK_ASM = (
    "{ .reg .pred p, q; .reg .b32 m, r, c, s; .reg .b64 a, t;"
    " setp.le.s32 p, $6, 32; setp.le.and.s32 p, $10, $11, p; setp.le.and.s32 q, $10, $12, p;"
    " vote.sync.ballot.b32 m, q, -1;"
    " and.b32 r, m, $13; popc.b32 r, r; popc.b32 c, m;"
    " add.u32 r, r, $9; min.u32 r, r, $15; mad.wide.u32 a, r, 4, $14;"
    " mov.b64 $0, $5; mov.b32 $1, $6; mov.b32 $2, $7; mov.b32 $3, $8;"
    " sub.u32 s, 32, $6; cvt.u64.u32 t, $7; shl.b64 t, t, s; @p or.b64 $0, $5, t; @p add.s32 $1, $6, 32;"
    " @p mov.b32 $2, $8; @q ld.global.nc.u32 $3, [a];"
    " add.u32 $4, $9, c; }"
)
"""One check: outputs (B, nb, q0, q1, base); inputs B, nb, q0, q1, base, c, last, last_load, lanemask_lt, words,
last_word."""
if HAS_TRITON:
    _CHECK_ASM = tl.constexpr(_CHECK_ASM)

_VALUES_ASM = (
    "{ .reg .b32 k; mov.b32 k, 0x4B000000;"
    " prmt.b32 $0, $3, k, 0x7650; prmt.b32 $1, $3, k, 0x7651; prmt.b32 $2, $3, k, 0x7652; }"
)
"""The three value bytes of an entry as floats 2**23 + byte (one PRMT each)."""
_SHIFT_ASM = (
    "{ .reg .b32 lo, hi, s; mov.b64 {lo, hi}, $1; shr.u32 s, $2, 24;"
    " shf.l.wrap.b32 hi, lo, hi, s; shf.l.wrap.b32 lo, 0, lo, s; mov.b64 $0, {lo, hi}; }"
)
"""``B << len`` with len = (e >> 24) mod 32: two wrap-around funnel shifts, no masking."""
if HAS_TRITON:
    _SHIFT_ASM = tl.constexpr(_SHIFT_ASM)
_X3_ASM = (
    "{ .reg .pred p; setp.ne.b32 p, $4, 0;"
    " @p ld.global.nc.u16 $0, [$3]; @p ld.global.nc.u16 $1, [$3+2]; @p ld.global.nc.u16 $2, [$3+4];"
    " shl.b32 $0, $0, 16; shl.b32 $1, $1, 16; shl.b32 $2, $2, 16; }"
)
"""Three consecutive bf16 activations as fp32 bit patterns, loaded only where the lane is real."""
if HAS_TRITON:
    _X3_ASM = tl.constexpr(_X3_ASM)
if HAS_TRITON:
    _VALUES_ASM = tl.constexpr(_VALUES_ASM)


def _prefix_kernel(
    x_ptr, out_ptr, table_ptr, words_ptr, gstart_ptr, last_ptr, last_load_ptr, iters_ptr, scale_ptr, vals_ptr,
    esc_off_ptr, esc_row_ptr, esc_col_ptr, esc_val_ptr,
    M, N, K, S, P, last_word, stride_xm, stride_om, step,
    W: tl.constexpr, MODE: tl.constexpr, BM: tl.constexpr, ROW_SCALE: tl.constexpr, ASM: tl.constexpr,
    HAS_ESC: tl.constexpr, OBF16: tl.constexpr, XBF16: tl.constexpr,
):  # fmt: skip
    LANES: tl.constexpr = 32 * W
    rb = tl.program_id(0)
    pm = tl.program_id(1)
    i = tl.arange(0, LANES)
    lane = i % 32
    seg = i // 32
    row = rb * 32 + lane
    g = rb * P + seg
    seg_ok = seg < P
    act = seg_ok & (row < N)
    k0 = tl.where(seg_ok, seg * S, 0)
    seglen = tl.where(act, tl.minimum(K - k0, S), 0)
    last = tl.load(last_ptr + g * 32 + lane, mask=act, other=-2).to(tl.int32)  # int16 in memory
    last_load = tl.load(last_load_ptr + g * 32 + lane, mask=act, other=-2).to(tl.int32)
    base = tl.load(gstart_ptr + g, mask=seg_ok, other=0)
    n_iter = tl.load(iters_ptr + 2 * rb)
    n_safe = tl.load(iters_ptr + 2 * rb + 1)

    if ASM:
        decl = tl.inline_asm_elementwise(
            ".shared .align 16 .b8 hfoq_prefix_tbl[16384];\n\tmov.u32 $0, hfoq_prefix_tbl;", "=r,r",
            [tl.full([1], 0, tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip
        tbase = tl.sum(decl, 0)
        for jt in range(0, 4096 // LANES):
            tv = tl.load(table_ptr + jt * LANES + i)
            tl.inline_asm_elementwise(
                "st.shared.u32 [$1], $2;\n\tmov.u32 $0, 0;", "=r,r,r", [tbase + (jt * LANES + i) * 4, tv],
                dtype=tl.int32, is_pure=False, pack=1,
            )  # fmt: skip
        tl.debug_barrier()
        ltmask = tl.inline_asm_elementwise(
            "mov.u32 $0, %lanemask_lt;", "=r,r", [lane], dtype=tl.int32, is_pure=True, pack=1
        )

    # ---- the first two words of every lane (init stages 0 and 1: lanes with >= 1 and >= 2 words)
    for stage in tl.static_range(2):
        req = last >= stage - 1
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
        wd = tl.load(words_ptr + tl.minimum(base + rank, last_word), mask=req, other=0).to(tl.uint32, bitcast=True)
        if stage == 0:
            q0 = wd
        else:
            q1 = wd
        base += cnt
    buf = tl.zeros([LANES], dtype=tl.uint64)
    nb = tl.zeros([LANES], dtype=tl.int32)
    col = tl.zeros([LANES], dtype=tl.int32)

    if ROW_SCALE:
        rscale = tl.load(scale_ptr + row, mask=act, other=0.0)
    else:
        rscale = tl.load(scale_ptr + row * 0)
    xrow = x_ptr + pm * BM * stride_xm + k0  # per lane: its segment's first activation
    orow = out_ptr + row.to(tl.int64) * K + k0
    mk1 = act & (tl.full([LANES], 1, tl.int32) < M - pm * BM)
    mk2 = act & (tl.full([LANES], 2, tl.int32) < M - pm * BM)
    mk3 = act & (tl.full([LANES], 3, tl.int32) < M - pm * BM)
    acc0 = tl.zeros([LANES], dtype=tl.float32)
    acc1 = tl.zeros([LANES], dtype=tl.float32)
    acc2 = tl.zeros([LANES], dtype=tl.float32)
    acc3 = tl.zeros([LANES], dtype=tl.float32)

    # phase 0: check -1 only (fills the buffer's first word); 1: unmasked loop; 2: masked tail
    for PHASE in tl.static_range(3):
        if PHASE == 0:
            c_lo = -1
            c_hi = 0
        elif PHASE == 1:
            c_lo = 0
            c_hi = n_safe
        else:
            c_lo = n_safe
            c_hi = n_iter
        for c in range(c_lo, c_hi):
            # ---- check: refill the bit buffer from the prefetched word, load the next one
            if ASM:
                buf, nb, q0, q1, base = tl.inline_asm_elementwise(
                    _CHECK_ASM, "=l,=r,=r,=r,=r,l,r,r,r,r,r,r,r,r,l,r",
                    [buf, nb, q0, q1, base, c + nb * 0, last, last_load, ltmask, words_ptr, last_word],
                    dtype=(tl.uint64, tl.int32, tl.uint32, tl.uint32, tl.int32), is_pure=False, pack=1,
                )  # fmt: skip
            else:
                need = (nb <= 32) & (c <= last)
                req = need & (c <= last_load)
                r2 = tl.reshape(req.to(tl.int32), [W, 32])
                rank = tl.reshape(tl.cumsum(r2, axis=1) - r2, [LANES])
                cnt = tl.reshape(tl.broadcast_to(tl.sum(r2, axis=1)[:, None], [W, 32]), [LANES])
                sh = tl.maximum(32 - nb, 0).to(tl.uint64)
                buf = tl.where(need, buf | (q0.to(tl.uint64) << sh), buf)
                nb = tl.where(need, nb + 32, nb)
                q0 = tl.where(need, q1, q0)
                nw = tl.load(words_ptr + tl.minimum(base + rank, last_word), mask=req, other=0)
                q1 = tl.where(req, nw.to(tl.uint32, bitcast=True), q1)
                base += cnt
            if PHASE > 0:
                for _u in tl.static_range(2):  # LOOKUPS_PER_CHECK
                    w = (buf >> 52).to(tl.int32)
                    if ASM:
                        e = tl.inline_asm_elementwise(
                            "ld.shared.u32 $0, [$1];", "=r,r", [tbase + w * 4], dtype=tl.int32, is_pure=True, pack=1,
                        )  # fmt: skip
                    else:
                        e = tl.load(table_ptr + w)
                    ue = e.to(tl.uint32, bitcast=True)
                    ln = ((ue >> 24) & 31).to(tl.int32)
                    if ASM:
                        buf = tl.inline_asm_elementwise(_SHIFT_ASM, "=l,l,r", [buf, e], dtype=tl.uint64, is_pure=True,
                                                        pack=1)  # fmt: skip
                        f0, f1, f2 = tl.inline_asm_elementwise(
                            _VALUES_ASM, "=r,=r,=r,r", [e], dtype=(tl.int32, tl.int32, tl.int32), is_pure=True, pack=1,
                        )  # fmt: skip
                    else:
                        buf = buf << ln.to(tl.uint64)
                        f0 = (e & 255) | 0x4B000000
                        f1 = ((e >> 8) & 255) | 0x4B000000
                        f2 = ((e >> 16) & 255) | 0x4B000000
                    nb -= ln
                    xp = xrow + col
                    if ASM and XBF16 and PHASE == 1:  # no zero fill: masked (idle) lanes are discarded
                        x0, x1, x2 = tl.inline_asm_elementwise(
                            _X3_ASM, "=r,=r,=r,l,r", [xp, act.to(tl.int32)], dtype=(tl.int32, tl.int32, tl.int32),
                            is_pure=True, pack=1,
                        )  # fmt: skip
                    for j in tl.static_range(3):
                        if j == 0:
                            v = f0.to(tl.float32, bitcast=True) - 8388736.0  # _VALUE_OFFSET
                        elif j == 1:
                            v = f1.to(tl.float32, bitcast=True) - 8388736.0  # _VALUE_OFFSET
                        else:
                            v = f2.to(tl.float32, bitcast=True) - 8388736.0  # _VALUE_OFFSET
                        kk = col + j
                        if PHASE == 2:
                            ok = act & (kk < seglen)
                        else:
                            ok = act
                        if MODE == 0:  # (phase 1: masked lanes are discarded in the epilogue, no zero fill)
                            if ASM and XBF16 and PHASE == 1:
                                if j == 0:
                                    xv = x0.to(tl.float32, bitcast=True)
                                elif j == 1:
                                    xv = x1.to(tl.float32, bitcast=True)
                                else:
                                    xv = x2.to(tl.float32, bitcast=True)
                            else:
                                xv = tl.load(xp + j, mask=ok, other=0.0).to(tl.float32)
                            acc0 += v * xv
                            if BM > 1:
                                acc1 += v * tl.load(xp + stride_xm + j, mask=ok & mk1, other=0.0).to(tl.float32)
                            if BM > 2:
                                acc2 += v * tl.load(xp + 2 * stride_xm + j, mask=ok & mk2, other=0.0).to(tl.float32)
                            if BM > 3:
                                acc3 += v * tl.load(xp + 3 * stride_xm + j, mask=ok & mk3, other=0.0).to(tl.float32)
                        else:
                            if j == 0:
                                vb = f0 & 255
                            elif j == 1:
                                vb = f1 & 255
                            else:
                                vb = f2 & 255
                            wv = tl.load(vals_ptr + vb) * rscale
                            if OBF16:  # round to nearest even by hand (the interpreter's cast truncates)
                                ub = wv.to(tl.uint32, bitcast=True)
                                hb = ((ub + 0x7FFF + ((ub >> 16) & 1)) >> 16).to(tl.uint16)
                                tl.store(orow + kk, hb.to(tl.bfloat16, bitcast=True), mask=ok & (kk < seglen))
                            else:
                                tl.store(orow + kk, wv.to(out_ptr.dtype.element_ty), mask=ok & (kk < seglen))
                    col += (ue >> 30).to(tl.int32)

    # ---- GEMV epilogue: sum the warps of each row, add the escape corrections, scale
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
            tot = tl.sum(tl.reshape(tl.where(act, a, 0.0), [W, 32]), axis=0)
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


def _launch(packed: PackedPrefixWeight, mode: int, out: torch.Tensor, x: torch.Tensor | None = None) -> None:
    interpret = packed.device.type != "cuda" or _interpret_mode()
    w = 1 << max(0, (packed.segments - 1).bit_length())
    m = x.shape[0] if x is not None else 1
    bm = min(_BM_MAX, m)
    xt = x if x is not None else packed.scales  # any tensor: unused outside GEMV mode
    grid = (packed.row_blocks, _cdiv(m, bm) if mode == MODE_GEMV else 1)
    jit_or_interpret(_prefix_kernel, interpret)[grid](
        xt, out, packed.table, packed.words, packed.gstart, packed.last, packed.last_load, packed.iters,
        packed.scales, packed.vals,
        packed.esc_off, packed.esc_row, packed.esc_col, packed.esc_val,
        m, packed.out_features, packed.in_features, packed.seg, packed.segments, packed.words.numel() - 1,
        xt.stride(0) if x is not None else 0, out.stride(0), packed.step,
        W=w, MODE=mode, BM=bm, ROW_SCALE=packed.scales.numel() > 1, ASM=ASM and not interpret,
        HAS_ESC=packed.num_escapes > 0, OBF16=mode == MODE_DENSE and out.dtype == torch.bfloat16,
        XBF16=x is not None and x.dtype == torch.bfloat16,
        num_warps=w, num_stages=1,
    )  # fmt: skip


def escape_weights(packed, dtype: torch.dtype) -> torch.Tensor:
    """The escaped weights of a packed grid weight (either layout) in ``dtype``, clamped to its range."""
    w = grid_dequantise(packed.esc_val, packed.step, packed.scales, rows=packed.esc_row.long())
    if dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(torch.float32).max:
        w = w.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
    return w.to(dtype)


def decode_prefix_weight(packed: PackedPrefixWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense ``[N, K]`` weight on ``packed``'s device, bit-identical to the format's decode."""
    dtype = packed.dtype if dtype is None else dtype
    if dtype == torch.float64:
        return decode_prefix_weight(packed, torch.float32).double()
    n, k = packed.out_features, packed.in_features
    if use_triton(packed.words) and n and k:
        out = torch.empty((n, k), dtype=dtype, device=packed.device)
        _launch(packed, MODE_DENSE, out)
    else:
        out = decode_prefix_reference(packed)[1].to(dtype).to(packed.device)
    if packed.num_escapes:
        out[packed.esc_row.long(), packed.esc_col.long()] = escape_weights(packed, dtype)
    return out


def prefix_linear(x: torch.Tensor, packed: PackedPrefixWeight, *, path: str | None = None) -> torch.Tensor:
    """``y = x @ W.T`` for a prefix-coded grid weight; ``x`` is ``[..., K]`` in bf16/fp16/fp32.

    ``path``: ``"gemv"`` (fused decode-GEMV, any batch in tiles of 4 rows), ``"dense"`` (decode to
    a scratch buffer, then ``torch.matmul``), ``"torch"`` (torch reference decoder). Default:
    ``gemv`` up to ``GEMV_MAX_M`` rows (at 16 rows four GEMV tiles still beat this kernel's
    scattered dense decode), ``dense`` above; the torch path without Triton.
    """
    k, n = packed.in_features, packed.out_features
    x2, lead = linear_input(x, k, ("gemv", "dense", "torch"), path)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return x.new_zeros(*lead, n)
    if x2.device != packed.device:
        raise ValueError(f"packed weight is on {packed.device}, x on {x2.device}")
    if path == "torch" or not use_triton(x2):
        w = decode_prefix_weight(packed, torch.float32)
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
