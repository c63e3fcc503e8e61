# ruff: noqa: SIM108  (kernels keep static if/else blocks: clearer in Triton)
"""Tensor-core decode-GEMV for grid weights held pair-coded in GPU memory (:mod:`hf_optquant.coding.pairs`).

Weight contract (the grid format, as :mod:`.prefix_linear`)::

    W[n, k] = index[n, k] * step * scale[n]     (channel or tensor scales)

Every lane of a warp decodes one pair per table lookup, so a warp's lanes stay at the same columns and
each lookup *is* one bf16x2 register of the ``mma.m16n8k16`` A fragment (the order of :mod:`.lut_mma`):
four lookups and one ``mma`` per k16 step.  Per lane (inline PTX on GPUs, emulated under
``TRITON_INTERPRET=1``)::

    check:   if nb <= 32:  B |= q0 << (32 - nb);  nb += 32;  q0 = q1;  q1 = *next++     (every two lookups)
    lookup:  e = table[B >> 52];  B <<= len(e);  nb -= len(e);  a = prmt(e, 0x43) = bf16x2(192 + i0, 192 + i1)

``B`` is a 64-bit bit buffer (``nb`` valid bits), ``q0, q1`` words loaded ahead.  After a check ``nb >= 33``,
enough for two codes of <= 12 bits.  The table value bytes are biased (``index + 64``, written into a bf16
``0x43XX`` = 128 + byte): the kernel accumulates ``sum (i + 192) x`` and a second ``mma`` with an all-ones A
fragment gives ``sum x``, removed once at the end.  Escaped pairs decode to value 0 and are added from their
list after the chunk loop, 32 at a time (one per lane, summed by output slot in a warp-private shared table).  A
warp decodes the lanes of one (row tile, chunk); the warps of a program split the tile's chunks (summed through
shared memory), programs split K where tiles are few (partials in a workspace).  Above :data:`GEMV_MAX_M` rows
the weight is decoded to a dense buffer by ``_pair_dense_kernel`` (the same decoder, one unit per warp) and
multiplied by cuBLAS.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..coding.pairs import (
    GROUP_K,
    MAX_CHUNK,
    TILE_ROWS,
    VALUE_BIAS,
    PairCode,
    PairLanes,
    build_pair_code,
    decode_pair_lanes,
    encode_pair_lanes,
    entry_values,
    lane_positions,
)
from . import lut_mma as _lm
from .common import HAS_TRITON, DeviceTensors, grid_dequantise, interpreted, jit_helpers, linear_input, tl, use_triton
from .common import cdiv as _cdiv
from .common import interpret_mode as _interpret_mode
from .lut_linear import _choose_split, _workspace
from .lut_mma import (  # noqa: F401
    _MMA_BF16,
    _MMA_F16,
    _XFRAG_ASM,
    _kw_sum,
    _mma,
    _pick,
    _program_lanes,
    _reduce_out,
    _store_out,
    _xfrag,
)

__all__ = ["PackedPairWeight", "decode_pair_weight", "fits_pair_layout", "pack_pair_weight", "pair_linear",
           "pair_chunk"]

GEMV_MAX_M = 16
"""Largest batch served by the fused decode-GEMV (programs of 8 rows); above: decode + matmul."""
#: Launch defaults: warps per program, warps sharing one row tile (each takes a slice of its chunks; None: by shape,
#: :func:`_auto_kw`), ``PF``: prefetch each lane's words into L1 at the start of a chunk (GPU only).
#: H100 sweeps (RESULTS.md section 6, sessions 9-10): 8 warps beat 4 with 8-group chunks on three of the four 8B
#: shapes; the L1 prefetch gained 4-19%; register caps for more resident warps were slower (L1 holds fewer streams).
PAIR_DEFAULT = {"NW": 8, "KW": None, "PER_SM": 2, "PF": True}
_EXTRA_PAD = 6 * MAX_CHUNK * 16 // 16  # words a warp may read past its data in a partial last chunk
_BIAS = {torch.bfloat16: 192.0, torch.float16: 1088.0}  # value of byte 0 of the table in the A fragment
_ONES = {torch.bfloat16: 0x3F803F80, torch.float16: 0x3C003C00}


@dataclasses.dataclass(frozen=True, eq=False)
class PackedPairWeight(DeviceTensors):
    """Kernel-ready pair-coded ``[N, K]`` grid weight (layout: :mod:`hf_optquant.coding.pairs`)."""

    HOST_ONLY = ("code_pairs", "code_lengths")  # the code, for the reference decoder

    words: torch.Tensor  # int32 [W + pad]
    chunk_base: torch.Tensor  # int32 [units + 1]
    counts: torch.Tensor  # uint8 [units * 32]
    table: torch.Tensor  # int32 [4096]
    mult: torch.Tensor  # float32 [N] or [1]: step * scale
    values: torch.Tensor  # float32 [128]: float32((b - 64) * step), the value of table byte b
    scales: torch.Tensor  # float32 [N] or [1]
    esc_off: torch.Tensor  # int32 [units + 1]
    esc_pos: torch.Tensor  # int32 [E]: col << 4 | row % 16 (the pair's first column)
    esc_val: torch.Tensor  # int32 [E]: v0 & 0xFFFF | v1 << 16 (int16 each)
    code_pairs: torch.Tensor  # int64 [T, 2]
    code_lengths: torch.Tensor  # int64 [T + 1]
    out_features: int
    in_features: int
    chunk: int
    step: float
    dtype: torch.dtype
    esc_tile_max: int = 0  # most escaped pairs in one row tile (bounds the kernel's escape batches)

    @property
    def device(self) -> torch.device:
        return self.words.device

    @property
    def n_tiles(self) -> int:
        return _cdiv(self.out_features, TILE_ROWS)

    @property
    def n_groups(self) -> int:
        return _cdiv(self.in_features, GROUP_K)

    @property
    def n_chunks(self) -> int:
        return _cdiv(self.n_groups, self.chunk)

    @property
    def num_escapes(self) -> int:
        return self.esc_pos.numel()


CHUNK_GROUPS = 8
"""Default groups of 64 columns per chunk: more warps in flight for +0.05 b/p over 16 (H100, session 9)."""


def pair_chunk(in_features: int) -> int:
    """Groups of 64 columns per chunk: :data:`CHUNK_GROUPS`, or the divisor of the row's groups within 25% of it
    (closest first) where that avoids a partial last chunk."""
    ng = max(_cdiv(in_features, GROUP_K), 1)
    if ng <= CHUNK_GROUPS:
        return ng
    lo, hi = (3 * CHUNK_GROUPS) // 4, (5 * CHUNK_GROUPS) // 4
    fits = [c for c in range(lo, hi + 1) if ng % c == 0]
    return min(fits, key=lambda c: abs(c - CHUNK_GROUPS)) if fits else CHUNK_GROUPS


def fits_pair_layout(index: torch.Tensor) -> bool:
    """Whether every grid index fits the pair layout's escapes (int16)."""
    return not index.numel() or int(index.abs().max()) < 1 << 15


def pack_pair_weight(
    index: torch.Tensor, scales: torch.Tensor, step: float, dtype: torch.dtype = torch.bfloat16, device=None,
    *, chunk: int | None = None, code: PairCode | None = None,
) -> PackedPairWeight:  # fmt: skip
    """Pair-code a ``[N, K]`` tensor of grid indices (encoded on ``index``'s device) for the kernels."""
    if index.dim() != 2 or index.dtype.is_floating_point:
        raise ValueError(f"index must be a 2-D integer tensor, got {tuple(index.shape)} {index.dtype}")
    rows, cols = index.shape
    if cols % 16:
        raise ValueError(f"in_features={cols} is not a multiple of 16 (16-byte activation loads)")
    if not fits_pair_layout(index):
        raise ValueError("grid indices beyond int16 cannot be escaped in the pair layout")
    scales = scales.float().reshape(-1)
    if scales.numel() not in (1, rows):
        raise ValueError(f"scales must hold 1 or {rows} values, got {scales.numel()}")
    chunk = pair_chunk(cols) if chunk is None else chunk
    code = build_pair_code(index) if code is None else code
    lanes = encode_pair_lanes(index, code, chunk)
    words = torch.cat([lanes.words, torch.zeros(_EXTRA_PAD, dtype=torch.int32, device=lanes.words.device)])
    pos = lanes.esc_col.long() << 4 | (lanes.esc_row.long() % TILE_ROWS)
    val = (lanes.esc_v0.long() & 0xFFFF) | (lanes.esc_v1.long() << 16)
    val = torch.where(val >= 1 << 31, val - (1 << 32), val)
    device = torch.device(device) if device is not None else index.device
    per_tile = (lanes.esc_off[1:] - lanes.esc_off[:-1]).view(-1, _cdiv(_cdiv(cols, GROUP_K), chunk)).sum(1)
    return PackedPairWeight(
        words=words, chunk_base=lanes.chunk_base, counts=lanes.counts, table=torch.from_numpy(code.table()),
        mult=(scales.double() * float(step)).float(), scales=scales,
        values=grid_dequantise(torch.arange(-VALUE_BIAS, VALUE_BIAS), float(step), torch.ones(1)),
        esc_off=lanes.esc_off,
        esc_pos=pos.to(torch.int32), esc_val=val.to(torch.int32),
        code_pairs=torch.from_numpy(code.pairs),
        code_lengths=torch.from_numpy(code.lengths), out_features=rows, in_features=cols, chunk=chunk,
        step=float(step), dtype=dtype, esc_tile_max=int(per_tile.max()) if per_tile.numel() else 0,
    ).to(device)  # fmt: skip


def pair_reference_index(p: PackedPairWeight) -> torch.Tensor:
    """The ``[N, K]`` grid indices of a packed weight, by the torch bit-position decoder and the escape list."""
    nt, nch, ch = p.n_tiles, p.n_chunks, p.chunk
    lanes = PairLanes(p.words, p.chunk_base, p.counts, p.esc_off, *(torch.empty(0),) * 4)
    ent = decode_pair_lanes(lanes, p.table, nt * nch, ch)
    v0, v1 = entry_values(ent)
    row, col = lane_positions(nt, nch, ch, ent.device)
    dense = torch.zeros(nt * TILE_ROWS, nch * ch * GROUP_K + 2, dtype=torch.int64, device=ent.device)
    dense[row.reshape(-1), col.reshape(-1)] = v0.reshape(-1)
    dense[row.reshape(-1), col.reshape(-1) + 1] = v1.reshape(-1)
    r, c, v0, v1 = _escaped_pairs(p)
    dense[r, c] = v0
    dense[r, c + 1] = v1
    return dense[: p.out_features, : p.in_features]


def _escaped_pairs(p: PackedPairWeight) -> tuple[torch.Tensor, ...]:
    """``(row, first column, value 0, value 1)`` int64 of every escaped pair (no host sync: CUDA-graph safe)."""
    e = torch.arange(p.num_escapes, device=p.device, dtype=p.esc_off.dtype)
    unit = torch.searchsorted(p.esc_off[1:], e, right=True)  # escapes of unit u: esc_off[u] <= e < esc_off[u + 1]
    pos, val = p.esc_pos.long(), p.esc_val.long()
    row = (unit // p.n_chunks) * TILE_ROWS + (pos & 15)
    return row, pos >> 4, ((val & 0xFFFF) ^ 0x8000) - 0x8000, val >> 16


def decode_pair_weight(p: PackedPairWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense ``[N, K]`` weight (float32 ``index * step * scale``, then ``dtype``) on ``p``'s device: the
    decode kernel where Triton runs, else the torch reference decoder."""
    dtype = p.dtype if dtype is None else dtype
    n, k = p.out_features, p.in_features
    if not (use_triton(p.words) and n and k) or dtype == torch.float64:
        return grid_dequantise(pair_reference_index(p), p.step, p.scales).to(dtype)
    out = torch.empty((n, k), dtype=dtype, device=p.device)
    nw = PAIR_DEFAULT["NW"]
    interpret = _interpret_mode()
    units = p.n_tiles * p.n_chunks
    _kernel(_pair_dense_kernel, interpret)[(_cdiv(units, nw),)](
        p.words, p.chunk_base, p.counts, p.table, p.values, p.scales, out, n, k, units, p.n_chunks, CH=p.chunk, NW=nw,
        ASM=not interpret, PF=not interpret, ROW_SCALE=p.scales.numel() > 1, OBF16=dtype == torch.bfloat16,
        num_warps=nw, num_stages=1)  # fmt: skip
    if p.num_escapes:
        r, c, v0, v1 = _escaped_pairs(p)
        rows = torch.cat([r, r])
        out[rows, torch.cat([c, c + 1])] = grid_dequantise(torch.cat([v0, v1]), p.step, p.scales, rows=rows).to(dtype)
    return out


# --------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------

_CONSTEXPR = tl.constexpr if HAS_TRITON else str
_PAIR_TABLE_DECL = _CONSTEXPR(".shared .align 16 .b8 hfoq_pair_tbl[16384];\n\tmov.u32 $0, hfoq_pair_tbl;")
_PAIR_CHECK = _CONSTEXPR(
    "{ .reg .pred p; .reg .b32 t, u, s, one; .reg .b64 a; and.b32 t, $8, 127; setp.le.u32 p, t, 32;"
    " shr.b32 u, $9, t; or.b32 $0, $6, u; sub.u32 s, 32, t; shl.b32 u, $9, s; or.b32 $1, $7, u;"
    " selp.b32 u, 32, 0, p; add.u32 $2, t, u; selp.b32 $3, $10, $9, p; mov.b32 $4, $10;"
    " mad.wide.u32 a, $11, 4, $12; @p ld.global.nc.b32 $4, [a]; selp.b32 one, 1, 0, p; add.u32 $5, $11, one; }"
)
"""One check: outputs (hi, lo, nb, q0, q1, next); inputs the same and the words' base address. ``nb`` arrives with
garbage above bit 6 (lookups subtract whole entries) and leaves clean. Shifts by >= 32 give 0 in PTX, so the merge
needs no predicate: a buffer with more than 32 bits gets nothing."""
_LOOKUP_ASM = (
    "{ .reg .b32 i, e, c; mov.u32 c, hfoq_pair_tbl; shr.u32 i, $4, 20; mad.lo.u32 i, i, 4, c; ld.shared.b32 e, [i];"
    " shf.l.wrap.b32 $1, $5, $4, e; shf.l.wrap.b32 $2, 0, $5, e; sub.s32 $3, $6, e; prmt.b32 $0, e, HB, 0x4241; }"
)
"""One lookup: outputs (a, hi, lo, nb); inputs (hi, lo, nb). The entry's low byte is the code length, so wrap-mode
funnel shifts use the entry as it is (shift mod 32), and ``nb - e`` is right in its low 7 bits."""
_ESC_DECL = _CONSTEXPR(".shared .align 16 .b8 hfoq_pair_esc[8192];\n\tmov.u32 $0, hfoq_pair_esc;")
"""Escape sums: a 16-row x 8-batch-row fp32 table per warp (16 warps at most)."""
_ST_ZERO = _CONSTEXPR("st.shared.b32 [$1], 0;\n\tmov.u32 $0, 0;")
_RED_ADD = _CONSTEXPR("{ .reg .pred p; setp.ne.b32 p, $3, 0; @p red.shared.add.f32 [$1], $2; mov.u32 $0, 0; }")
_PF_L1 = _CONSTEXPR("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L1 [$1]; mov.b32 $0, 0; }")
_PAIR_LOOKUP_BF16 = _CONSTEXPR(_LOOKUP_ASM.replace("HB", "0x43"))
_PAIR_LOOKUP_F16 = _CONSTEXPR(_LOOKUP_ASM.replace("HB", "0x64"))


def _check(hi, lo, nb, q0, q1, nxt, w_ptr, ASM: tl.constexpr):
    """Refill the bit buffer from the word queue where it holds <= 32 bits (``nxt``: index of the next word)."""
    if ASM:
        hi, lo, nb, q0, q1, nxt = tl.inline_asm_elementwise(
            _PAIR_CHECK, "=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,l", [hi, lo, nb, q0, q1, nxt, w_ptr + 0 * nxt],
            dtype=(tl.int32,) * 6, is_pure=False, pack=1)  # fmt: skip
    else:
        p = nb <= 32
        b = (hi.to(tl.int64) << 32) | (lo.to(tl.int64) & 0xFFFFFFFF)
        b = tl.where(p, b | ((q0.to(tl.int64) & 0xFFFFFFFF) << (32 - tl.minimum(nb, 32))), b)
        hi = (b >> 32).to(tl.int32)
        lo = b.to(tl.int32)
        nb = tl.where(p, nb + 32, nb)
        q0n = tl.where(p, q1, q0)
        q1 = tl.where(p, tl.load(w_ptr + nxt, mask=p, other=0), q1)
        nxt = tl.where(p, nxt + 1, nxt)
        q0 = q0n
    return hi, lo, nb, q0, q1, nxt


def _lookup(hi, lo, nb, tab_ptr, F16: tl.constexpr, ASM: tl.constexpr):
    """Decode one pair: its A-fragment register (two biased 16-bit values) and the advanced buffer."""
    if ASM:
        if F16:
            a, hi, lo, nb = tl.inline_asm_elementwise(_PAIR_LOOKUP_F16, "=r,=r,=r,=r,r,r,r", [hi, lo, nb],
                                                      dtype=(tl.int32,) * 4, is_pure=False, pack=1)  # fmt: skip
        else:
            a, hi, lo, nb = tl.inline_asm_elementwise(_PAIR_LOOKUP_BF16, "=r,=r,=r,=r,r,r,r", [hi, lo, nb],
                                                      dtype=(tl.int32,) * 4, is_pure=False, pack=1)  # fmt: skip
    else:
        e = tl.load(tab_ptr + ((hi >> 20) & 0xFFF))
        ln = e & 15
        b = (hi.to(tl.int64) << 32) | (lo.to(tl.int64) & 0xFFFFFFFF)
        b = b << ln
        hi = (b >> 32).to(tl.int32)
        lo = b.to(tl.int32)
        nb = nb - ln
        hb = 0x4300
        if F16:
            hb = 0x6400
        a = (hb | ((e >> 8) & 255)) | ((hb | ((e >> 16) & 255)) << 16)
    return a, hi, lo, nb


def _prefetch_l1(ptr, ok):
    """Bring the 128-byte line at ``ptr`` into L1 where ``ok`` (no register holds it: the refills that follow hit)."""
    tl.inline_asm_elementwise(_PF_L1, "=r,l,r", [ptr, ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


def _open_unit(w_ptr, cnt, base, lane, NW: tl.constexpr, CH: tl.constexpr, PF: tl.constexpr):
    """A lane's decoder state at the start of a unit (its lanes' word counts ``cnt``, first word ``base``): bit buffer
    ``(hi, lo, nb)``, word queue ``(q0, q1)`` and the index of its next word (after those of the lanes before it)."""
    cnt2 = tl.reshape(cnt, [NW, 32])
    start = base + tl.reshape(tl.cumsum(cnt2, axis=1) - cnt2, [32 * NW])
    ptr = w_ptr + start
    if PF:  # the lane's words into L1 first: a refill then waits ~L1 latency, not DRAM's
        for li in tl.static_range((6 * CH + 31) // 32 + 1):
            _prefetch_l1(ptr + 32 * li, 32 * li < cnt + 4)
    nb = tl.full([32 * NW], 64, tl.int32)
    return tl.load(ptr), tl.load(ptr + 1), nb, tl.load(ptr + 2), tl.load(ptr + 3), start + 4


def _decode_k16(hi, lo, nb, q0, q1, nxt, w_ptr, tab_ptr, F16: tl.constexpr, ASM: tl.constexpr):
    """The four A-fragment registers of one k16 step (two checks, four lookups) and the advanced state."""
    hi, lo, nb, q0, q1, nxt = _check(hi, lo, nb, q0, q1, nxt, w_ptr, ASM)
    a0, hi, lo, nb = _lookup(hi, lo, nb, tab_ptr, F16, ASM)
    a1, hi, lo, nb = _lookup(hi, lo, nb, tab_ptr, F16, ASM)
    hi, lo, nb, q0, q1, nxt = _check(hi, lo, nb, q0, q1, nxt, w_ptr, ASM)
    a2, hi, lo, nb = _lookup(hi, lo, nb, tab_ptr, F16, ASM)
    a3, hi, lo, nb = _lookup(hi, lo, nb, tab_ptr, F16, ASM)
    return a0, a1, a2, a3, hi, lo, nb, q0, q1, nxt


def _fill_pair_table(tab_ptr, t, NT: tl.constexpr):
    """Copy the 4096-entry decode table into shared memory."""
    decl = tl.inline_asm_elementwise(_PAIR_TABLE_DECL, "=r,r", [tl.full([1], 0, tl.int32)], dtype=tl.int32,
                                     is_pure=False, pack=1)  # fmt: skip
    sym = tl.sum(decl, 0)
    for it in tl.static_range(4096 // NT):
        idx = it * NT + t
        v = tl.load(tab_ptr + idx)
        tl.inline_asm_elementwise("st.shared.b32 [$1], $2;\n\tmov.u32 $0, 0;", "=r,r,r", [sym + idx * 4, v],
                                  dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip
    tl.debug_barrier()


def _escape_sums(pos, val, ok, x_ptr, pid_m, M, stride_xm, g, c, warp, esc_smem, NW: tl.constexpr,
                 MR: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    """One escaped pair per lane (where ``ok``) summed into the accumulator slots of its row's lanes: returns the four
    sums that belong to this lane (rows ``g`` / ``g + 8`` of the tile, batch rows ``m0`` / ``m0 + 1``).

    GPU: ``red.shared.add`` into a warp-private 16 x 8 table (``esc_smem``: :func:`_escape_table`), then each lane
    reads its four slots; the interpreter sums the same contributions by comparing slots across the warp's lanes."""
    v0 = (((val & 0xFFFF) ^ 0x8000) - 0x8000).to(tl.float32)
    v1 = (val >> 16).to(tl.float32)
    row16 = pos & 15
    col = pos >> 4
    own = g * 8 + 2 * c  # this lane's slot for (row g, batch row m0); + 1: m0 + 1; + 64: row g + 8
    s0 = tl.zeros(ok.shape, dtype=tl.float32)
    s1, s2, s3 = s0, s0, s0
    if ASM:
        mine = esc_smem + warp * 512 + own * 4
        for o in tl.static_range(4):  # zero this lane's four slots
            tl.inline_asm_elementwise(_ST_ZERO, "=r,r", [mine + 4 * (o % 2) + 256 * (o // 2)], dtype=tl.int32,
                                      is_pure=False, pack=1)  # fmt: skip
        _warp_sync(ok)
        base = mine - own * 4
    for mm in tl.static_range(MR):
        m = pid_m * 8 + mm + 0 * col  # (full shape: the interpreter's bool & scalar-bool gives int32)
        okm = ok & (m < M)
        xp = x_ptr + m.to(tl.int64) * stride_xm + col
        xv = v0 * tl.load(xp, mask=okm, other=0.0).to(tl.float32) + v1 * tl.load(xp + 1, mask=okm, other=0.0).to(
            tl.float32)  # fmt: skip
        slot = row16 * 8 + mm
        if ASM:
            tl.inline_asm_elementwise(_RED_ADD, "=r,r,f,r", [base + slot * 4, xv, okm.to(tl.int32)], dtype=tl.int32,
                                      is_pure=False, pack=1)  # fmt: skip
        else:
            cw = tl.reshape(tl.where(okm, xv, 0.0), [NW, 32, 1])
            sw = tl.reshape(slot, [NW, 32, 1])
            s0 += tl.reshape(tl.sum(tl.where(sw == tl.reshape(own, [NW, 1, 32]), cw, 0.0), axis=1), [32 * NW])
            s1 += tl.reshape(tl.sum(tl.where(sw == tl.reshape(own + 1, [NW, 1, 32]), cw, 0.0), axis=1), [32 * NW])
            s2 += tl.reshape(tl.sum(tl.where(sw == tl.reshape(own + 64, [NW, 1, 32]), cw, 0.0), axis=1), [32 * NW])
            s3 += tl.reshape(tl.sum(tl.where(sw == tl.reshape(own + 65, [NW, 1, 32]), cw, 0.0), axis=1), [32 * NW])
    if ASM:
        _warp_sync(ok)
        s0 = tl.inline_asm_elementwise("ld.shared.f32 $0, [$1];", "=f,r", [mine], dtype=tl.float32, is_pure=False,
                                       pack=1)  # fmt: skip
        s1 = tl.inline_asm_elementwise("ld.shared.f32 $0, [$1];", "=f,r", [mine + 4], dtype=tl.float32,
                                       is_pure=False, pack=1)  # fmt: skip
        s2 = tl.inline_asm_elementwise("ld.shared.f32 $0, [$1];", "=f,r", [mine + 256], dtype=tl.float32,
                                       is_pure=False, pack=1)  # fmt: skip
        s3 = tl.inline_asm_elementwise("ld.shared.f32 $0, [$1];", "=f,r", [mine + 260], dtype=tl.float32,
                                       is_pure=False, pack=1)  # fmt: skip
        _warp_sync(ok)  # the slots are zeroed again by the next batch
    return s0, s1, s2, s3


def _escape_table():
    """Shared-memory address of the escape sums (declared once per kernel)."""
    decl = tl.inline_asm_elementwise(_ESC_DECL, "=r,r", [tl.full([1], 0, tl.int32)], dtype=tl.int32, is_pure=False,
                                     pack=1)  # fmt: skip
    return tl.sum(decl, 0)


def _warp_sync(like):
    """``bar.warp.sync``: the warp's shared-memory writes before it are visible to its lanes after it."""
    tl.inline_asm_elementwise("bar.warp.sync -1;\n\tmov.u32 $0, 0;", "=r,r", [like.to(tl.int32)], dtype=tl.int32,
                              is_pure=False, pack=1)  # fmt: skip


def _pair_gemv_kernel(
    x_ptr, w_ptr, base_ptr, cnt_ptr, tab_ptr, mult_ptr, y_ptr, ws_ptr, tick_ptr, esc_off_ptr, esc_pos_ptr,
    esc_val_ptr, M, N, K, stride_xm, stride_ym, n_tiles, n_chunks, n_groups, n_split, bias, esc_batches,
    CH: tl.constexpr, NW: tl.constexpr, KW: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr,
    SPLIT: tl.constexpr, ROW_MULT: tl.constexpr, HAS_ESC: tl.constexpr, ONES: tl.constexpr, PF: tl.constexpr,
    MR: tl.constexpr,
):  # fmt: skip
    # One element per thread: element 32 w + l of every [NT] tensor is lane l of warp w.  The program owns
    # RT = NW / KW row tiles and chunks [h_lo, h_hi); the KW warps of a tile take consecutive slices.
    NT: tl.constexpr = 32 * NW
    RT: tl.constexpr = NW // KW
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    t, lane, g, c, tile, kw = _program_lanes(pid_n, NW, KW)
    tile_ok = tile < n_tiles
    tile_c = tl.minimum(tile, n_tiles - 1)
    cps = tl.cdiv(n_chunks, n_split)
    h_lo = pid_k * cps
    h_hi = tl.minimum(h_lo + cps, n_chunks)
    per = tl.cdiv(h_hi - h_lo, KW)  # chunks per warp
    h0 = h_lo + kw * per
    h_end = tl.minimum(h0 + per, h_hi)
    m_a = pid_m * 8 + g  # batch row of this lane's B fragment
    x_a = x_ptr + m_a.to(tl.int64) * stride_xm + 16 * c
    ok_a = m_a < M
    ones = tl.full([NT], ONES, tl.int32)
    row_a = tile * 16 + g  # outputs: lane (g, c) holds rows row_a / row_a + 8, batch rows 8 pid_m + 2 c (+ 1)
    # Loads whose latency would otherwise sit at the start or end of the work, issued before the table fill: the
    # first unit's word counts and base, the first 32 escaped pairs of the warp's units, the row multipliers.
    unit = tile_c * n_chunks + tl.minimum(h0, n_chunks - 1)
    cnt = tl.load(cnt_ptr + unit * 32 + lane).to(tl.int32)
    base = tl.load(base_ptr + unit)
    if HAS_ESC:
        e_lo = tl.load(esc_off_ptr + tile_c * n_chunks + tl.minimum(h0, n_chunks))
        e_hi = tl.load(esc_off_ptr + tile_c * n_chunks + tl.minimum(h_end, n_chunks))
        e_ok = tile_ok & (e_lo + lane < e_hi)
        pos = tl.load(esc_pos_ptr + e_lo + lane, mask=e_ok, other=0)
        val = tl.load(esc_val_ptr + e_lo + lane, mask=e_ok, other=0)
    sa, sb = _row_pair(mult_ptr, row_a, N, ROW_MULT)
    esc_smem = 0
    if ASM:
        _fill_pair_table(tab_ptr, t, NT)
        if HAS_ESC:
            esc_smem = _escape_table()
    zero = tl.zeros([NT], dtype=tl.float32)
    acc0, acc1, acc2, acc3 = zero, zero, zero, zero
    sum0, sum1, sum2, sum3 = zero, zero, zero, zero
    for i in range(0, per):
        h = h0 + i
        h_ok = tile_ok & (h < h_end)
        hi, lo, nb, q0, q1, nxt = _open_unit(w_ptr, cnt, base, lane, NW, CH, PF)
        unit = tile_c * n_chunks + tl.minimum(h + 1, n_chunks - 1)  # the next unit's counts, during this one
        cnt = tl.load(cnt_ptr + unit * 32 + lane).to(tl.int32)
        base = tl.load(base_ptr + unit)
        for q in range(0, CH):
            kq = (h * CH + q) * 64
            p0, p1, p2, p3 = _xfrag(x_a, kq, ok_a & h_ok & (kq + 16 * c < K), ASM)
            if PF:  # the next group's activations into L1 (the first mma of a group waited on them)
                _prefetch_l1(x_a + kq + 64, ok_a & h_ok & (kq + 64 + 16 * c < K))
            for j in tl.static_range(4):
                a0, a1, a2, a3, hi, lo, nb, q0, q1, nxt = _decode_k16(hi, lo, nb, q0, q1, nxt, w_ptr, tab_ptr, F16,
                                                                      ASM)  # fmt: skip
                b = _pick(j, p0, p1, p2, p3)
                acc0, acc1, acc2, acc3 = _mma(a0, a1, a2, a3, b, acc0, acc1, acc2, acc3, NW, F16, ASM)
                sum0, sum1, sum2, sum3 = _mma(ones, ones, ones, ones, b, sum0, sum1, sum2, sum3, NW, F16, ASM)
    acc0 -= bias * sum0
    acc1 -= bias * sum1
    acc2 -= bias * sum2
    acc3 -= bias * sum3
    if HAS_ESC:  # escaped pairs decoded as 0: add them, 32 per lane batch
        warp = t // 32
        for bt in range(0, esc_batches):
            if bt > 0:
                e_ok = tile_ok & (e_lo + 32 * bt + lane < e_hi)
                pos = tl.load(esc_pos_ptr + e_lo + 32 * bt + lane, mask=e_ok, other=0)
                val = tl.load(esc_val_ptr + e_lo + 32 * bt + lane, mask=e_ok, other=0)
            s0, s1, s2, s3 = _escape_sums(pos, val, e_ok, x_ptr, pid_m, M, stride_xm, g, c, warp, esc_smem, NW,
                                          MR, ASM)  # fmt: skip
            acc0, acc1, acc2, acc3 = acc0 + s0, acc1 + s1, acc2 + s2, acc3 + s3
    acc0, acc1, acc2, acc3 = acc0 * sa, acc1 * sa, acc2 * sb, acc3 * sb
    lane_o = tl.arange(0, 32)[None, :]
    row_o = (pid_n * RT + tl.arange(0, RT)[:, None]) * 16 + lane_o // 4
    m_o = pid_m * 8 + 2 * (lane_o % 4)
    acc0, acc1, acc2, acc3 = (_kw_sum(acc0, RT, KW), _kw_sum(acc1, RT, KW), _kw_sum(acc2, RT, KW),
                              _kw_sum(acc3, RT, KW))  # fmt: skip
    _store_out(y_ptr, ws_ptr, acc0, acc1, acc2, acc3, m_o, row_o, M, N, stride_ym, pid_k, SPLIT)
    if SPLIT:
        tl.debug_barrier()
        tile_id = pid_m * tl.num_programs(0) + pid_n
        done = tl.atomic_add(tick_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
        if done == n_split - 1:
            _reduce_out(y_ptr, ws_ptr, m_o, row_o, M, N, stride_ym, n_split)
            tl.atomic_xchg(tick_ptr + tile_id, 0)


def _row_pair(ptr, row, N, PER_ROW: tl.constexpr):
    """``(v[row], v[row + 8])`` of a per-row float vector (0 past ``N``), or its one value twice."""
    if PER_ROW:
        va = tl.load(ptr + row, mask=row < N, other=0.0)
        vb = tl.load(ptr + row + 8, mask=row + 8 < N, other=0.0)
    else:
        va = tl.load(ptr + row * 0)
        vb = va
    return va, vb


def _store_weight(ptr, w, ok, OBF16: tl.constexpr):
    """Store float32 ``w`` in the output's dtype, bf16 rounded to nearest even by hand (the interpreter truncates)."""
    if OBF16:
        u = w.to(tl.uint32, bitcast=True)
        tl.store(ptr, ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=ok)
    else:
        tl.store(ptr, w.to(ptr.dtype.element_ty), mask=ok)


def _pair_dense_kernel(
    w_ptr, base_ptr, cnt_ptr, tab_ptr, vals_ptr, scale_ptr, out_ptr, N, K, n_units, n_chunks,
    CH: tl.constexpr, NW: tl.constexpr, ASM: tl.constexpr, PF: tl.constexpr, ROW_SCALE: tl.constexpr,
    OBF16: tl.constexpr,
):  # fmt: skip
    # One unit (row tile, chunk) per warp; every lane writes its pairs as vals[index + 64] * scale, with
    # vals = float32(index * step) (the format's dequantisation, bit for bit).
    NT: tl.constexpr = 32 * NW
    t = tl.arange(0, NT)
    lane = t % 32
    g = lane // 4
    c = lane % 4
    unit = tl.program_id(0) * NW + t // 32
    unit_ok = unit < n_units
    unit = tl.minimum(unit, n_units - 1)
    tile = unit // n_chunks
    h = unit % n_chunks
    cnt = tl.load(cnt_ptr + unit * 32 + lane).to(tl.int32)
    base = tl.load(base_ptr + unit)
    row_a = tile * 16 + g
    sa, sb = _row_pair(scale_ptr, row_a, N, ROW_SCALE)
    if ASM:
        _fill_pair_table(tab_ptr, t, NT)
    hi, lo, nb, q0, q1, nxt = _open_unit(w_ptr, cnt, base, lane, NW, CH, PF)
    for q in range(0, CH):
        for j in tl.static_range(4):
            a0, a1, a2, a3, hi, lo, nb, q0, q1, nxt = _decode_k16(hi, lo, nb, q0, q1, nxt, w_ptr, tab_ptr, False, ASM)
            for r in tl.static_range(4):
                a = _pick(r, a0, a1, a2, a3)
                row = row_a + 8 * (r % 2)
                col = (h * CH + q) * 64 + 16 * c + 4 * j + 2 * (r // 2)
                s = _pick(r, sa, sb, sa, sb)
                ok = unit_ok & (row < N) & (col < K)
                p = out_ptr + row.to(tl.int64) * K + col
                _store_weight(p, tl.load(vals_ptr + (a & 255)) * s, ok, OBF16)
                _store_weight(p + 1, tl.load(vals_ptr + ((a >> 16) & 255)) * s, ok & (col + 1 < K), OBF16)


_HELPERS = ("_check", "_row_pair", "_store_weight", "_lookup", "_prefetch_l1", "_open_unit", "_decode_k16",
            "_fill_pair_table", "_escape_sums", "_escape_table", "_warp_sync")
_PLAIN = {**_lm._PLAIN, **jit_helpers(globals(), _HELPERS)}
if HAS_TRITON:
    from triton.runtime.jit import JITFunction as _JITFunction


@functools.cache
def _kernel(fn, interpret: bool):
    return interpreted(fn, _PLAIN) if interpret else _JITFunction(fn)


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------


def _auto_kw(p: PackedPairWeight, nw: int, device: torch.device) -> int:
    """Warps per row tile: half the program where tiles are many (>= 16 per SM: fewer, longer programs) or rows long
    (>= 16 chunks: fewer K slices), else all of it (H100, RESULTS.md section 6, session 10)."""
    if device.type != "cuda":
        return nw
    sms = _lm._num_sms(device.index if device.index is not None else torch.cuda.current_device())
    many = p.n_tiles >= 16 * sms or p.n_chunks >= 16
    return max(nw // 2, 1) if many else nw


def _plan(x2: torch.Tensor, p: PackedPairWeight, y: torch.Tensor, interpret: bool, split_k: int | None,
          config: dict | None):  # fmt: skip
    m, k = x2.shape
    cfg = dict(PAIR_DEFAULT, **(config or {}))
    nw = cfg["NW"]
    if nw not in (1, 2, 4, 8, 16):
        raise ValueError(f"config NW must be 1, 2, 4, 8 or 16, got {nw!r}")
    kw = cfg["KW"] if cfg["KW"] is not None else _auto_kw(p, nw, x2.device)
    if kw not in (1, 2, 4, 8, 16) or nw % kw:
        raise ValueError(f"config KW={kw!r} must be a power of two that divides NW={nw}")
    m_tiles = _cdiv(m, 8)
    row_progs = _cdiv(p.n_tiles, nw // kw)
    nch = p.n_chunks
    if split_k is None:
        split_k = _cdiv(nch, kw) if not interpret else 1
        if x2.device.type == "cuda":
            split_k = max(1, min(split_k, _choose_split(row_progs * m_tiles, nch, x2.device, per_sm=cfg["PER_SM"])))
    split = max(1, min(int(split_k), nch))
    split = _cdiv(nch, _cdiv(nch, split))
    n_part, n_cnt = split * m * y.shape[1], row_progs * m_tiles
    ws, cnt = _workspace(x2.device, n_part, n_cnt) if split > 1 else (y, y)
    f16 = x2.dtype == torch.float16
    args = dict(x_ptr=x2, w_ptr=p.words, base_ptr=p.chunk_base, cnt_ptr=p.counts, tab_ptr=p.table, mult_ptr=p.mult,
                y_ptr=y, ws_ptr=ws, tick_ptr=cnt, esc_off_ptr=p.esc_off, esc_pos_ptr=p.esc_pos, esc_val_ptr=p.esc_val,
                M=m, N=p.out_features, K=k, stride_xm=x2.stride(0), stride_ym=y.stride(0), n_tiles=p.n_tiles,
                n_chunks=nch, n_groups=p.n_groups, n_split=split, bias=_BIAS[torch.float16 if f16 else torch.bfloat16],
                esc_batches=_cdiv(p.esc_tile_max, 32))
    meta = dict(CH=p.chunk, NW=nw, KW=kw, F16=f16, ASM=not interpret, SPLIT=split > 1, ROW_MULT=p.mult.numel() > 1,
                HAS_ESC=p.num_escapes > 0, ONES=_ONES[torch.float16 if f16 else torch.bfloat16],
                PF=bool(cfg["PF"]) and not interpret, MR=min(m, 8), num_warps=nw, num_stages=1)
    return args, meta, (row_progs, m_tiles, split)


def pair_linear(x: torch.Tensor, p: PackedPairWeight, *, path: str | None = None, split_k: int | None = None,
                config: dict | None = None) -> torch.Tensor:  # fmt: skip
    """``y = x @ W.T`` for a pair-coded grid weight; ``x`` is ``[..., K]`` (bf16 / fp16; fp32 is cast to bf16).

    ``path``: ``"gemv"`` (fused decode-GEMV), ``"dense"`` (decode + matmul), ``"torch"`` (reference decoder).
    Default: ``gemv`` up to :data:`GEMV_MAX_M` rows, ``dense`` above; ``torch`` without Triton.
    """
    k, n = p.in_features, p.out_features
    x2, lead = linear_input(x, k, ("gemv", "dense", "torch"), path)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return x.new_zeros(*lead, n)
    if x2.device != p.device:
        raise ValueError(f"packed weight is on {p.device}, x on {x2.device}")
    if path is None:
        path = "gemv" if use_triton(x2) and m <= GEMV_MAX_M else "dense"
    if path != "gemv" or not use_triton(x2):
        w = decode_pair_weight(p, torch.float32 if x2.dtype == torch.float32 else x2.dtype)
        return (x2.to(w.dtype) @ w.T).to(x.dtype).reshape(*lead, n)
    xin = x2 if x2.dtype in (torch.bfloat16, torch.float16) else x2.to(torch.bfloat16)
    y = torch.empty((m, n), dtype=xin.dtype, device=x2.device)
    interpret = _interpret_mode()
    args, meta, grid = _plan(xin, p, y, interpret, split_k, config)
    _kernel(_pair_gemv_kernel, interpret)[grid](*args.values(), **meta)
    return y.to(x.dtype).reshape(*lead, n)
