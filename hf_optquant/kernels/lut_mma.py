# ruff: noqa: SIM108  (kernels keep static if/else blocks: clearer in Triton)
"""Tensor-core decode GEMV for 4-bit lookup-table weights: codes stored in ``mma.sync`` fragment order.

Why a second 4-bit layout.  The CUDA-core GEMV of :mod:`.lut_linear` spends ~4.7 instructions per
code (extract, table read, two converts, two FMAs per pair) and stays below the HBM rate (Nsight
Compute, benchmarks/kernels_notes.md).  Here the multiply-adds go to the tensor cores: one 32-bit word
of codes is exactly one thread's share of the A operand of ``mma.m16n8k16`` (16 weight rows x 16 k),
so per word a thread does four pair-table reads and one ``mma`` -- 2.75 SASS instructions per code in
the batch-1 loop -- and batches of up to 8 activation rows (16 with two B tiles) cost the same decode
as one.

Layout (:class:`MmaLutWeight`)
------------------------------
Rows come in *tiles* of 16, K in *groups* of 64 (both zero-padded).  ``words`` is int32
``[n_tiles, n_groups, 32, 4]``: word ``j`` of lane ``l = 4 g + c`` (``g < 8``, ``c < 4``) of group
``q`` holds 8 codes in 4 bytes; byte ``b = h + 2 e`` holds the two codes (low nibble first) of row
``16 tile + 8 h + g`` at ``k = 64 q + 16 c + 4 j + 2 e + {0, 1}``.  Read as an A fragment of the
j-th k16 step, the fragment column ``2c + i`` (``i < 2``) stands for ``k = 64q + 16c + 4j + i`` and
column ``2c + 8 + i`` for ``k = 64q + 16c + 4j + 2 + i``: the k order inside a group is permuted, the
same way for the activations, so that lane ``(g, c)`` reads the 16 *consecutive* activations
``x[m, 64q + 16c : 64q + 16c + 16]`` and hands four of them to each k16 step's B fragment
(batch row ``m = g``).  A lane's four words are contiguous (one 16-byte load per group).

A byte indexes a 256-entry *pair table* ``(lut[lo], lut[hi])`` rounded to bf16 (fp16 for fp16
activations), which is an A-fragment register as it stands.  The kernel keeps it in shared memory in
``COPIES`` copies (copy ``lane % COPIES`` in its own banks: 32 copies never conflict).  Scales
(per row and block of ``64 * SG`` columns, or per row) multiply the fp32 accumulators once per
block; the bf16 table rounding (2**-9 relative) is the rounding a bf16 weight has anyway.

Kernels
-------
* ``_mma_gemv_kernel`` -- batch tiles of 8 or 16 rows of x (``MT`` = 1 or 2 B tiles per A
  fragment; more rows run more programs along the grid's batch axis, which re-read the codes from
  L2).  K is split between the ``KW`` warps of a row tile (summed through shared memory) and between
  programs (deterministic partial sums in global memory, as in :mod:`.lut_linear`).  On sm_90, launches with
  few programs per SM also ask for their next code words and their scale rows to be brought into L2 ahead of
  the loads (``cp.async.bulk.prefetch``: more bytes in flight without registers).  Under
  ``TRITON_INTERPRET=1`` the inline PTX (table reads, ``mma``, vector loads) is replaced by Triton
  code that emulates it lane by lane (``_mma_emulated``), so CPU tests run the kernel's indexing.
* ``_mma_gemm_kernel`` -- batches of 33-256 rows: per 64-column group the code words are decoded in registers
  (``prmt`` lookups into the table's low and high bytes, times the 16-bit block scales) into two weight tiles
  that feed ``tl.dot`` (wgmma on sm_90), the activations as the first operand; split-K where programs are
  fewer than SMs.
* ``_mma_dequant_kernel`` -- the dense weight (larger batches: dequantise + cuBLAS, and fp32 x).

:func:`mma_reference_codes` inverts the layout in torch (the reference the tests use).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import torch

from .common import HAS_TRITON, interpreted, jit_helpers, linear_input, scratch_weight, tl, use_triton
from .common import cdiv as _cdiv
from .common import interpret_mode as _interpret_mode
from .lut_linear import (
    _FAST_CHECKED,
    _check_fast,
    _choose_split,
    _fast_run,
    _Launch,
    _launcher_ok,
    _num_sms,
    _pick_scale_dtype,
    _workspace,
    lut_fits_fp16,
)
from .reference import dequantize_reference

__all__ = ["GEMM_MAX_M", "MMA_MAX_M", "MmaLutWeight", "gemm_unsupported", "mma_linear", "mma_reference_codes",
           "mma_unsupported", "pack_mma_weight", "dequantize_mma"]  # fmt: skip

#: Batches up to ``MMA_MAX_M`` rows take the GEMV (programs of 8 or 16 rows), up to ``GEMM_MAX_M`` the fused GEMM,
#: larger ones dequantise + cuBLAS (the fastest of the three at each size on the H100: RESULTS.md section 5).
MMA_MAX_M = 32
GEMM_MAX_M = 256
#: Launch defaults: warps per program, warps sharing one 16-row tile (each takes a slice of the program's K
#: range; summed in shared memory), groups loaded ahead, table copies, programs per SM the split-K heuristic
#: aims for (H100 sweeps, benchmarks/RESULTS.md section 5).
#: ``KW=None``: the fewest warps per tile that still give ``MIN_PROGRAMS_PER_SM`` programs per SM.
#: ``PDL``: programmatic dependent launch (sm_90+): a call reads its first code words and fills its table while
#: the previous kernel in the stream finishes, and x only after it has.  ``None`` follows
#: ``torch._inductor.config.triton.enable_pdl`` (read when a weight's launch is first planned): measured on the H100
#: (RESULTS.md section 6, session 8) it gains only where the kernels around it use PDL too -- whole 8B model 2.43x
#: bf16 with it vs 2.32x without when the compiled glue does, 2.30x vs 2.40x when the glue does not.
#: ``L2PF``: code-word groups requested into L2 ahead of the loads (``cp.async.bulk.prefetch``, sm_90+); ``SPF``:
#: the tile's block-scale rows requested at the start.  ``None``: ``PREFETCH_GROUPS`` and on where the launch has
#: at most ``PREFETCH_MAX_PROGRAMS_PER_SM`` programs per SM (few warps per SM, few loads in flight: 4096x14336 15.8
#: -> 14.5 us, 4096x4096 6.9 -> 6.7 us), off where there are more (there it cost 0-3%; section 5, session 8).
MMA_DEFAULT = {"NW": 8, "KW": None, "AHEAD": 2, "COPIES": 32, "PER_SM": 1, "PDL": None, "L2PF": None, "SPF": None}
MMA_DEFAULT_WIDE = {"NW": 4, "KW": None, "AHEAD": 1, "COPIES": 32, "PER_SM": 1, "PDL": None, "L2PF": 0, "SPF": False}
PREFETCH_GROUPS, PREFETCH_MAX_PROGRAMS_PER_SM = 2, 2
MIN_PROGRAMS_PER_SM = 3
DEQUANT_CONFIG = {"BN": 64, "num_warps": 4}
DEQUANT16_CONFIG = {"BT": 8, "GQ": 4, "num_warps": 4}
#: Fused GEMM (batches > MMA_MAX_M): 16 BT features x BM rows of x per program (None: 64 up to 64 rows, else
#: 128), STAGES groups in flight, SPLIT K slices (None: :func:`gemm_split`) -- the H100 sweep's best at 64-256 rows.
GEMM_DEFAULT = {"BT": 8, "BM": None, "STAGES": 3, "num_warps": 4, "SPLIT": None, "TMA": None}
GEMM_PROGRAMS_PER_SM, GEMM_MIN_GROUPS = 1, 16
TILE_ROWS, GROUP_K = 16, 64


# --------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class MmaLutWeight:
    """A 4-bit LUT weight ``W[n, k] = lut[code] * scales[n, k // scale_block]`` in fragment order."""

    words: torch.Tensor  # int32 [n_tiles, n_groups, 32, 4]
    lut: torch.Tensor  # float32 [16]
    pairs_bf16: torch.Tensor  # int32 [256]: (bf16 lut[e & 15]) | (bf16 lut[e >> 4]) << 16
    pairs_f16: torch.Tensor | None  # the same in fp16; None when the table leaves fp16's normal range
    #: int32 [2, 8]: the 16 table values' low bytes (4 words) then high bytes (4 words), bf16 (row 0) and fp16
    #: (row 1; zeros without ``pairs_f16``) -- the GEMM's ``prmt`` lookup tables
    byte_tables: torch.Tensor
    scales: torch.Tensor  # bf16 / fp16 / fp32 [N, n_blocks]
    out_features: int
    in_features: int
    scale_block: int  # columns per scale (in_features for one scale per row)
    _launch_cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def n_tiles(self) -> int:
        return self.words.shape[0]

    @property
    def n_groups(self) -> int:
        return self.words.shape[1]

    @property
    def device(self) -> torch.device:
        return self.words.device

    @property
    def nbytes(self) -> int:
        """Bytes held on the device (codes, scales and tables)."""
        ts = (self.words, self.lut, self.pairs_bf16, self.pairs_f16, self.byte_tables, self.scales)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def to(self, device) -> MmaLutWeight:
        moved = {f: getattr(self, f).to(device) for f in ("words", "lut", "pairs_bf16", "byte_tables", "scales")}
        pf = None if self.pairs_f16 is None else self.pairs_f16.to(device)
        return dataclasses.replace(self, pairs_f16=pf, **moved)


def mma_unsupported(bits: int, block_size: int, in_features: int) -> str | None:
    """Why a weight cannot take the fragment layout (None when it can)."""
    if bits != 4:
        return f"bits={bits} (the fragment layout holds 4-bit codes)"
    if in_features % 16:
        return f"in_features={in_features} is not a multiple of 16 (16-byte activation loads)"
    if block_size < in_features and block_size % GROUP_K:
        return f"block_size={block_size} is neither a multiple of {GROUP_K} nor the whole row"
    return None


def _pair_table(lut: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bits = lut.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    e = torch.arange(256)
    return bits[e & 15] | (bits[e >> 4] << 16)  # int32: the high half wraps into the sign bit


def _byte_table(lut: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int32 [8]: the 16-bit table values' low bytes packed four to a word (words 0-3), then the high bytes."""
    bits = lut.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    by = torch.stack([bits & 255, bits >> 8]).view(2, 4, 4)  # [low / high, word, byte]
    words = (by << (8 * torch.arange(4))).sum(-1).reshape(8)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def fragment_words(codes: torch.Tensor) -> torch.Tensor:
    """int32 ``[n_tiles, n_groups, 32, 4]`` words of 4-bit ``codes [N, K]`` (layout: module docstring)."""
    n, k = codes.shape
    nt, ng = _cdiv(n, TILE_ROWS), _cdiv(k, GROUP_K)
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, ng * GROUP_K - k, 0, nt * TILE_ROWS - n))
    # [tile, h, g, q, c, j, e, i]: row = 16 tile + 8 h + g, k = 64 q + 16 c + 4 j + 2 e + i
    c = c.view(nt, 2, 8, ng, 4, 4, 2, 2)
    byte = c[..., 0] | (c[..., 1] << 4)  # [tile, h, g, q, c, j, e]
    two = torch.arange(2, device=c.device)
    shift = 8 * (2 * two.view(2, 1) + two.view(1, 2))  # [e, h]: byte h + 2 e
    word = (byte.permute(0, 3, 2, 4, 5, 6, 1) << shift).sum(dim=(-2, -1))  # [tile, q, g, c, j]
    word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    return word.reshape(nt, ng, 32, 4).contiguous()


def mma_reference_codes(p: MmaLutWeight) -> torch.Tensor:
    """The ``[N, K]`` codes of a fragment-layout weight (torch inverse of :func:`fragment_words`)."""
    w = p.words.to(torch.int64) & 0xFFFFFFFF
    nt, ng = p.n_tiles, p.n_groups
    w = w.view(nt, ng, 8, 4, 4)  # [tile, q, g, c, j]
    h = torch.arange(2, device=w.device).view(2, 1, 1)
    e = torch.arange(2, device=w.device).view(1, 2, 1)
    i = torch.arange(2, device=w.device).view(1, 1, 2)
    shift = 8 * (h + 2 * e) + 4 * i  # [h, e, i]
    codes = (w[..., None, None, None] >> shift) & 15  # [tile, q, g, c, j, h, e, i]
    codes = codes.permute(0, 5, 2, 1, 3, 4, 6, 7).reshape(nt * TILE_ROWS, ng * GROUP_K)
    return codes[: p.out_features, : p.in_features].to(torch.uint8)


def pack_mma_weight(codes: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor, block_size: int,
                    device=None) -> MmaLutWeight:  # fmt: skip
    """4-bit ``codes [N, K]`` with ``lut [16]`` and ``scales [N, ceil(K / block_size)]`` in fragment order.

    Scales are kept in bf16 or fp16 where that is lossless, else float32.  Raises ValueError for
    shapes :func:`mma_unsupported` rejects, codes out of range or mismatched scales.
    """
    if codes.dim() != 2 or codes.numel() == 0:
        raise ValueError(f"codes must be a non-empty 2-D [N, K] tensor, got shape {tuple(codes.shape)}")
    n, k = codes.shape
    why = mma_unsupported(4, block_size, k)
    if why:
        raise ValueError(f"fragment layout unsupported: {why}")
    if lut.numel() != 16:
        raise ValueError(f"lut must have 16 entries, got {lut.numel()}")
    n_blocks = _cdiv(k, block_size)
    if tuple(scales.shape) != (n, n_blocks):
        raise ValueError(f"scales must have shape [N, ceil(K / block_size)] = {[n, n_blocks]}, got "
                         f"{list(scales.shape)}")  # fmt: skip
    device = torch.device(device) if device is not None else codes.device
    codes = codes.to(device)
    if int(codes.min()) < 0 or int(codes.max()) > 15:
        raise ValueError("codes must lie in [0, 16)")
    lut32 = lut.detach().to("cpu", torch.float32).reshape(16)
    scales32 = scales.detach().to(device, torch.float32)
    f16 = lut_fits_fp16(lut32)
    tables = [
        _byte_table(lut32, torch.bfloat16),
        _byte_table(lut32, torch.float16) if f16 else torch.zeros(8, dtype=torch.int32),
    ]
    return MmaLutWeight(
        words=fragment_words(codes),
        lut=lut32.to(device),
        pairs_bf16=_pair_table(lut32, torch.bfloat16).to(device),
        pairs_f16=_pair_table(lut32, torch.float16).to(device) if f16 else None,
        byte_tables=torch.stack(tables).to(device),
        scales=scales32.to(_pick_scale_dtype(scales32, "auto")).contiguous(),
        out_features=n,
        in_features=k,
        scale_block=min(block_size, k),
    )


def dequantize_mma(p: MmaLutWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[N, K]`` weight (torch reference)."""
    return dequantize_reference(mma_reference_codes(p), p.lut, p.scales.float(), p.scale_block, dtype=dtype)


# --------------------------------------------------------------------------------------
# Kernels.  Helpers are plain functions: compiled kernels see them as JITFunctions (module
# globals set below), the interpreter runs a copy of the kernel whose globals map them back.
# --------------------------------------------------------------------------------------

_CONSTEXPR = tl.constexpr if HAS_TRITON else str
_TABLE_DECL32 = _CONSTEXPR(".shared .align 16 .b8 hfoq_mma_tbl[32768];\n\tmov.u32 $0, hfoq_mma_tbl;")  # 32 copies
_TABLE_DECL8 = _CONSTEXPR(".shared .align 16 .b8 hfoq_mma_tbl[8192];\n\tmov.u32 $0, hfoq_mma_tbl;")  # 8 copies


def _lookup_asm(sh: int) -> str:
    """Four pair-table reads for the bytes of word $4; $5 = this lane's copy offset."""
    mask = 255 << sh
    parts = ["{ .reg .u32 t, o0, o1, o2, o3; mov.u32 t, hfoq_mma_tbl;"]
    for b in range(4):  # (shifted & mask) | lane offset is one LOP3; ptxas folds the symbol into LDS [R+UR]
        d = 8 * b - sh
        op = f"shl.b32 o{b}, $4, {-d};" if d < 0 else f"shr.u32 o{b}, $4, {d};"
        parts.append(f" {op} and.b32 o{b}, o{b}, {mask}; or.b32 o{b}, o{b}, $5; add.u32 o{b}, o{b}, t;")
    parts.append(" ld.shared.b32 $0, [o0]; ld.shared.b32 $1, [o1]; ld.shared.b32 $2, [o2]; ld.shared.b32 $3, [o3]; }")
    return "".join(parts)


_LOOKUP8 = _CONSTEXPR(_lookup_asm(5))  # 8 copies: entry e, copy l at (8 e + l) * 4
_LOOKUP32 = _CONSTEXPR(_lookup_asm(7))  # 32 copies
_MMA_BF16 = _CONSTEXPR("{ .reg .b32 b0, b1; mov.b64 {b0, b1}, $8; mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
                       " {$0,$1,$2,$3}, {$4,$5,$6,$7}, {b0,b1}, {$9,$10,$11,$12}; }")  # fmt: skip
_MMA_F16 = _CONSTEXPR("{ .reg .b32 b0, b1; mov.b64 {b0, b1}, $8; mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
                      " {$0,$1,$2,$3}, {$4,$5,$6,$7}, {b0,b1}, {$9,$10,$11,$12}; }")  # fmt: skip
_WORDS_ASM = _CONSTEXPR("{ .reg .pred p; setp.ne.b32 p, $5, 0; mov.b32 $0, 0; mov.b32 $1, 0; mov.b32 $2, 0;"
                        " mov.b32 $3, 0; @p ld.global.nc.L1::no_allocate.v4.b32 {$0, $1, $2, $3}, [$4]; }")  # fmt: skip
_XFRAG_ASM = _CONSTEXPR("{ .reg .pred p; setp.ne.b32 p, $5, 0; mov.b64 $0, 0; mov.b64 $1, 0; mov.b64 $2, 0;"
                        " mov.b64 $3, 0; @p ld.global.nc.v2.b64 {$0, $1}, [$4];"
                        " @p ld.global.nc.v2.b64 {$2, $3}, [$4+16]; }")  # fmt: skip
_L2PF_ASM = _CONSTEXPR("{ .reg .pred p; setp.ne.b32 p, $3, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2;"
                       " mov.b32 $0, 0; }")  # fmt: skip


def _words(w_lane, q, ok, ASM: tl.constexpr):
    """The four code words of group ``q`` of this lane (zero where not ``ok``)."""
    p = w_lane + q * 128
    if ASM:
        w0, w1, w2, w3 = tl.inline_asm_elementwise(_WORDS_ASM, "=r,=r,=r,=r,l,r", [p, ok.to(tl.int32)],
                                                   dtype=(tl.int32,) * 4, is_pure=True, pack=1)  # fmt: skip
    else:
        w0 = tl.load(p, mask=ok, other=0)
        w1 = tl.load(p + 1, mask=ok, other=0)
        w2 = tl.load(p + 2, mask=ok, other=0)
        w3 = tl.load(p + 3, mask=ok, other=0)
    return w0, w1, w2, w3


def _l2_prefetch(ptr, nbytes, ok):
    """Ask for ``nbytes`` (a multiple of 16) at ``ptr`` (16-byte aligned) to be brought into L2, where ``ok``.

    One lane per warp asks; the bytes are then in flight without holding registers, and the loads that follow
    find them in L2 (sm_90+; GPU only).
    """
    tl.inline_asm_elementwise(_L2PF_ASM, "=r,l,r,r", [ptr, nbytes, (ok & (nbytes > 0)).to(tl.int32)],
                              dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip


def _xfrag(x_lane, k, ok, ASM: tl.constexpr):
    """This lane's B fragments of the four k16 steps of a group: ``x[k + 4 j : k + 4 j + 4]`` as one int64 each
    (16-bit values, lowest k in the low bits; zero where not ``ok``)."""
    p = x_lane + k
    if ASM:
        p0, p1, p2, p3 = tl.inline_asm_elementwise(_XFRAG_ASM, "=l,=l,=l,=l,l,r", [p, ok.to(tl.int32)],
                                                   dtype=(tl.int64,) * 4, is_pure=True, pack=1)  # fmt: skip
    else:
        p0 = _xquad(p, ok)
        p1 = _xquad(p + 4, ok)
        p2 = _xquad(p + 8, ok)
        p3 = _xquad(p + 12, ok)
    return p0, p1, p2, p3


def _xquad(p, ok):
    """Four 16-bit activations at ``p`` packed into an int64 (interpreter)."""
    q = tl.zeros(ok.shape, dtype=tl.int64)
    for i in tl.static_range(4):
        v = tl.load(p + i, mask=ok, other=0.0).to(tl.int16, bitcast=True).to(tl.int64) & 0xFFFF
        q = q | (v << (16 * i))
    return q


def _pick(J: tl.constexpr, v0, v1, v2, v3):
    """``(v0, v1, v2, v3)[J]`` for a compile-time J."""
    if J == 0:
        v = v0
    elif J == 1:
        v = v1
    elif J == 2:
        v = v2
    else:
        v = v3
    return v


def _lookup(w, lane_off, tab_ptr, ASM: tl.constexpr, COPIES: tl.constexpr):
    """A fragment of one code word: the pair-table entries of its four bytes."""
    if ASM:
        if COPIES == 32:
            a0, a1, a2, a3 = tl.inline_asm_elementwise(_LOOKUP32, "=r,=r,=r,=r,r,r", [w, lane_off],
                                                       dtype=(tl.int32,) * 4, is_pure=True, pack=1)  # fmt: skip
        else:
            a0, a1, a2, a3 = tl.inline_asm_elementwise(_LOOKUP8, "=r,=r,=r,=r,r,r", [w, lane_off],
                                                       dtype=(tl.int32,) * 4, is_pure=True, pack=1)  # fmt: skip
    else:
        a0 = tl.load(tab_ptr + (w & 255))
        a1 = tl.load(tab_ptr + ((w >> 8) & 255))
        a2 = tl.load(tab_ptr + ((w >> 16) & 255))
        a3 = tl.load(tab_ptr + ((w >> 24) & 255))
    return a0, a1, a2, a3


def _half(v, HI: tl.constexpr, F16: tl.constexpr):
    """One 16-bit half of packed pairs as fp32 (interpreter emulation)."""
    if HI:
        h = (v >> 16) & 0xFFFF
    else:
        h = v & 0xFFFF
    if F16:
        return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        return (h << 16).to(tl.float32, bitcast=True)


def _emu_part(a, b, NW: tl.constexpr, F16: tl.constexpr):
    """``P[w, g, n] = sum over lanes c and halves i of A_i[w, g, c] * B_i[w, n, c]`` (one A register)."""
    p = tl.zeros([NW, 8, 8], dtype=tl.float32)
    for i in tl.static_range(2):
        ai = tl.reshape(_half(a, i, F16), [NW, 8, 4])
        bi = tl.reshape(_half(b, i, F16), [NW, 8, 4])
        p += tl.sum(ai[:, :, None, :] * bi[:, None, :, :], axis=3)
    return p


def _mma_emulated(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, NW: tl.constexpr, F16: tl.constexpr):
    """``mma.m16n8k16`` of every warp, element ``32 w + l`` being lane ``l`` of warp ``w``: rows g (a0: columns
    2c + i, a2: 2c + 8 + i) and g + 8 (a1, a3), B rows 2c + i (b0) and 2c + 8 + i (b1) of column g; outputs
    (row g, columns 2c, 2c + 1), (row g + 8, the same)."""
    NT: tl.constexpr = 32 * NW
    top = _emu_part(a0, b0, NW, F16) + _emu_part(a2, b1, NW, F16)
    bot = _emu_part(a1, b0, NW, F16) + _emu_part(a3, b1, NW, F16)
    t0, t1 = tl.split(tl.reshape(top, [NW, 8, 4, 2]))
    u0, u1 = tl.split(tl.reshape(bot, [NW, 8, 4, 2]))
    return (c0 + tl.reshape(t0, [NT]), c1 + tl.reshape(t1, [NT]), c2 + tl.reshape(u0, [NT]),
            c3 + tl.reshape(u1, [NT]))  # fmt: skip


def _mma(a0, a1, a2, a3, b, c0, c1, c2, c3, NW: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr):
    """``C += A @ B`` for one warp-wide 16x16 by 16x8 tile (fp32 accumulate); ``b`` holds the lane's B pair of
    registers in one int64."""
    if ASM:
        if F16:
            d0, d1, d2, d3 = tl.inline_asm_elementwise(
                _MMA_F16, "=f,=f,=f,=f,r,r,r,r,l,f,f,f,f", [a0, a1, a2, a3, b, c0, c1, c2, c3],
                dtype=(tl.float32,) * 4, is_pure=True, pack=1)  # fmt: skip
        else:
            d0, d1, d2, d3 = tl.inline_asm_elementwise(
                _MMA_BF16, "=f,=f,=f,=f,r,r,r,r,l,f,f,f,f", [a0, a1, a2, a3, b, c0, c1, c2, c3],
                dtype=(tl.float32,) * 4, is_pure=True, pack=1)  # fmt: skip
    else:
        b0 = (b & 0xFFFFFFFF).to(tl.int32)
        b1 = (b >> 32).to(tl.int32)
        d0, d1, d2, d3 = _mma_emulated(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, NW, F16)
    return d0, d1, d2, d3


def _fill_table(tab_ptr, t, NT: tl.constexpr, COPIES: tl.constexpr):
    """Copy the 256-entry pair table into shared memory, ``COPIES`` interleaved copies."""
    if COPIES == 32:
        decl = tl.inline_asm_elementwise(_TABLE_DECL32, "=r,r", [tl.full([1], 0, tl.int32)], dtype=tl.int32,
                                         is_pure=False, pack=1)  # fmt: skip
    else:
        decl = tl.inline_asm_elementwise(_TABLE_DECL8, "=r,r", [tl.full([1], 0, tl.int32)], dtype=tl.int32,
                                         is_pure=False, pack=1)  # fmt: skip
    sym = tl.sum(decl, 0)
    for it in tl.static_range(256 * COPIES // NT):  # unrolled: the loads go out together
        idx = it * NT + t
        v = tl.load(tab_ptr + idx // COPIES)
        tl.inline_asm_elementwise("st.shared.b32 [$1], $2;\n\tmov.u32 $0, 0;", "=r,r,r", [sym + idx * 4, v],
                                  dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip
    tl.debug_barrier()


def _store_out(y_ptr, ws_ptr, d0, d1, d2, d3, m0, row_a, M, N, stride_ym, pid_k, SPLIT: tl.constexpr):
    """Write one 16x8 output tile (rows of W are features n, columns batch rows m0 and m0 + 1)."""
    ok_a = (row_a < N) & (m0 < M)
    ok_b = (row_a + 8 < N) & (m0 < M)
    ok_c = (row_a < N) & (m0 + 1 < M)
    ok_d = (row_a + 8 < N) & (m0 + 1 < M)
    o = m0.to(tl.int64) * stride_ym + row_a
    if SPLIT:
        part = ws_ptr + pid_k * (M * N) + m0 * N + row_a
        tl.store(part, d0, mask=ok_a)
        tl.store(part + N, d1, mask=ok_c)
        tl.store(part + 8, d2, mask=ok_b)
        tl.store(part + N + 8, d3, mask=ok_d)
    else:
        dt = y_ptr.dtype.element_ty
        tl.store(y_ptr + o, d0.to(dt), mask=ok_a)
        tl.store(y_ptr + o + stride_ym, d1.to(dt), mask=ok_c)
        tl.store(y_ptr + o + 8, d2.to(dt), mask=ok_b)
        tl.store(y_ptr + o + stride_ym + 8, d3.to(dt), mask=ok_d)


def _reduce_out(y_ptr, ws_ptr, m0, row_a, M, N, stride_ym, n_split):
    """Sum the split-K partials of one 16x8 output tile in a fixed order and write it."""
    dt = y_ptr.dtype.element_ty
    o = m0.to(tl.int64) * stride_ym + row_a
    for r in tl.static_range(2):
        for h in tl.static_range(2):
            ok = (row_a + 8 * h < N) & (m0 + r < M)
            tot = tl.zeros(row_a.shape, dtype=tl.float32)
            for i in range(n_split):
                tot += tl.load(ws_ptr + i * (M * N) + (m0 + r) * N + row_a + 8 * h, mask=ok, other=0.0,
                               cache_modifier=".cg")  # fmt: skip
            tl.store(y_ptr + o + r * stride_ym + 8 * h, tot.to(dt), mask=ok)


def _program_lanes(pid_n, NW: tl.constexpr, KW: tl.constexpr):
    """A GEMV program's per-thread indices, its NW warps holding NW // KW row tiles of 16 (KW warps each):
    ``(t, lane, g, c, tile, kw)`` -- thread, lane, fragment row group ``lane // 4`` and column ``lane % 4``, row
    tile, and the warp's slot among its tile's KW."""
    t = tl.arange(0, 32 * NW)
    lane = t % 32
    tile = pid_n * (NW // KW) + (t // 32) // KW
    return t, lane, lane // 4, lane % 4, tile, (t // 32) % KW


def _stage(w_lane, x_a, x_b, q, q_hi, kc, tile_ok, ok_a, ok_b, K, MT: tl.constexpr, ASM: tl.constexpr):
    """One group's loads: code words, B fragments of batch tile 0 and (MT = 2) tile 1; zero past ``q_hi``."""
    w0, w1, w2, w3 = _words(w_lane, q, tile_ok & (q < q_hi), ASM)
    p0, p1, p2, p3, r0, r1, r2, r3 = _xstage(x_a, x_b, q, q_hi, kc, ok_a, ok_b, K, MT, ASM)
    return w0, w1, w2, w3, p0, p1, p2, p3, r0, r1, r2, r3


def _xstage(x_a, x_b, q, q_hi, kc, ok_a, ok_b, K, MT: tl.constexpr, ASM: tl.constexpr):
    """The activation half of :func:`_stage`: B fragments of batch tile 0 and (MT = 2) tile 1."""
    xok = (q < q_hi) & (q * 64 + kc < K)
    p0, p1, p2, p3 = _xfrag(x_a, q * 64, ok_a & xok, ASM)
    r0, r1, r2, r3 = p0, p1, p2, p3
    if MT == 2:
        r0, r1, r2, r3 = _xfrag(x_b, q * 64, ok_b & xok, ASM)
    return p0, p1, p2, p3, r0, r1, r2, r3


def _mma_gemv_kernel(
    x_ptr, w_ptr, tab_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_ym, lds, n_tiles, n_groups, n_units, n_split,
    SG: tl.constexpr, ROW_SCALE: tl.constexpr, MT: tl.constexpr, NW: tl.constexpr, KW: tl.constexpr,
    AHEAD: tl.constexpr, COPIES: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr, SPLIT: tl.constexpr,
    PDL: tl.constexpr, L2PF: tl.constexpr, SPF: tl.constexpr,
):  # fmt: skip
    # One element per thread: element 32 w + l of every [NT] tensor is lane l of warp w.  The program owns
    # RT = NW / KW row tiles of 16 and K units (of SG groups) [u_lo, u_hi); the KW warps of a tile take
    # consecutive slices of that range and are summed through shared memory at the end.
    NT: tl.constexpr = 32 * NW
    RT: tl.constexpr = NW // KW
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    t, lane, g, c, tile, kw = _program_lanes(pid_n, NW, KW)
    tile_ok = tile < n_tiles
    row_a = tile * 16 + g  # rows of a0/d0 (row_a + 8: a1/d2)
    ups = tl.cdiv(n_units, n_split)
    u_lo = pid_k * ups
    u_hi = tl.minimum(u_lo + ups, n_units)
    per = tl.cdiv(u_hi - u_lo, KW)  # units per warp
    u0 = u_lo + kw * per  # this warp's first unit (a tensor: warps differ)
    q_hi = tl.minimum(tl.minimum(u0 + per, u_hi) * SG, n_groups)
    w_warp = w_ptr + tile.to(tl.int64) * (n_groups * 128)  # this warp's tile (its slice: groups [q0, q_hi))
    w_lane = w_warp + lane * 4
    m_a = pid_m * (8 * MT) + g  # batch row of this lane's B fragment (tile 0; tile 1: + 8)
    x_a = x_ptr + m_a.to(tl.int64) * stride_xm + 16 * c
    x_b = x_a + 8 * stride_xm
    ok_a = m_a < M
    ok_b = (m_a + 8) < M
    kc = 16 * c
    lane_off = (lane % COPIES) * 4

    # a stage = one group's code words (w), B fragments of batch tile 0 (p) and tile 1 (r); the first
    # loads go out before the table fill so that their latency overlaps it.  With PDL the first code words and
    # the table (this layer's own data) are read while the previous kernel finishes; x only after the wait.
    if PDL:  # (programmatic dependent launch, sm_90+: the next kernel in the stream may start its prologue)
        tl.extra.cuda.gdc_launch_dependents()
    q0 = u0 * SG
    lead = (lane == 0) & tile_ok
    if L2PF > 0:  # the first L2PF groups of the slice
        _l2_prefetch(w_warp + q0 * 128, (tl.minimum(q_hi, q0 + L2PF) - q0) * 512, lead)
    if SPF and not ROW_SCALE:  # the tile's block-scale rows (one warp per tile; read once per unit below)
        s_bytes: tl.constexpr = s_ptr.dtype.element_ty.primitive_bitwidth // 8
        rows = tl.minimum(N - tile * 16, 16)
        _l2_prefetch(s_ptr + tile.to(tl.int64) * 16 * lds, (rows * lds * s_bytes) & -16, lead & (kw == 0))
    w0, w1, w2, w3 = _words(w_lane, q0, tile_ok & (q0 < q_hi), ASM)
    if AHEAD == 2:  # (a third stage measured slower on all six 8B-Llama shapes: RESULTS.md section 5)
        v0, v1, v2, v3 = _words(w_lane, q0 + 1, tile_ok & (q0 + 1 < q_hi), ASM)
    if PDL:  # (waiting before the table fill instead measured slower still)
        if ASM:
            _fill_table(tab_ptr, t, NT, COPIES)
        tl.extra.cuda.gdc_wait()  # the previous kernel has finished, its writes (x) are visible
    p0, p1, p2, p3, r0, r1, r2, r3 = _xstage(x_a, x_b, q0, q_hi, kc, ok_a, ok_b, K, MT, ASM)
    if AHEAD == 2:
        pv0, pv1, pv2, pv3, rv0, rv1, rv2, rv3 = _xstage(x_a, x_b, q0 + 1, q_hi, kc, ok_a, ok_b, K, MT, ASM)
    if ASM and not PDL:
        _fill_table(tab_ptr, t, NT, COPIES)
    zero = tl.zeros([NT], dtype=tl.float32)
    acc0, acc1, acc2, acc3 = zero, zero, zero, zero  # batch tile 0 (MT = 2: also tile 1 below)
    bcc0, bcc1, bcc2, bcc3 = zero, zero, zero, zero
    for i in range(0, per):
        u = u0 + i
        if L2PF > 0:  # keep L2PF groups requested ahead of the loads
            qp = u * SG + L2PF
            _l2_prefetch(w_warp + qp * 128, tl.minimum(q_hi - qp, SG) * 512, lead)
        # two accumulator sets: B tiles 0 / 1 (MT = 2), or even / odd k16 steps (MT = 1)
        e0, e1, e2, e3 = zero, zero, zero, zero
        f0, f1, f2, f3 = zero, zero, zero, zero
        for s in tl.static_range(SG):
            q = u * SG + s
            n0, n1, n2, n3, pn0, pn1, pn2, pn3, rn0, rn1, rn2, rn3 = _stage(
                w_lane, x_a, x_b, q + AHEAD, q_hi, kc, tile_ok, ok_a, ok_b, K, MT, ASM)  # fmt: skip
            for j in tl.static_range(4):
                a0, a1, a2, a3 = _lookup(_pick(j, w0, w1, w2, w3), lane_off, tab_ptr, ASM, COPIES)
                b = _pick(j, p0, p1, p2, p3)
                if MT == 2:
                    e0, e1, e2, e3 = _mma(a0, a1, a2, a3, b, e0, e1, e2, e3, NW, F16, ASM)
                    b = _pick(j, r0, r1, r2, r3)
                    f0, f1, f2, f3 = _mma(a0, a1, a2, a3, b, f0, f1, f2, f3, NW, F16, ASM)
                elif j % 2 == 0:
                    e0, e1, e2, e3 = _mma(a0, a1, a2, a3, b, e0, e1, e2, e3, NW, F16, ASM)
                else:
                    f0, f1, f2, f3 = _mma(a0, a1, a2, a3, b, f0, f1, f2, f3, NW, F16, ASM)
            if AHEAD == 2:  # rotate the stages
                w0, w1, w2, w3, v0, v1, v2, v3 = v0, v1, v2, v3, n0, n1, n2, n3
                p0, p1, p2, p3, pv0, pv1, pv2, pv3 = pv0, pv1, pv2, pv3, pn0, pn1, pn2, pn3
                r0, r1, r2, r3, rv0, rv1, rv2, rv3 = rv0, rv1, rv2, rv3, rn0, rn1, rn2, rn3
            else:
                w0, w1, w2, w3 = n0, n1, n2, n3
                p0, p1, p2, p3 = pn0, pn1, pn2, pn3
                r0, r1, r2, r3 = rn0, rn1, rn2, rn3
        if MT == 1:
            e0, e1, e2, e3 = e0 + f0, e1 + f1, e2 + f2, e3 + f3
        if ROW_SCALE:
            acc0, acc1, acc2, acc3 = acc0 + e0, acc1 + e1, acc2 + e2, acc3 + e3
            if MT == 2:
                bcc0, bcc1, bcc2, bcc3 = bcc0 + f0, bcc1 + f1, bcc2 + f2, bcc3 + f3
        else:  # (a unit past this warp's slice has zero activations: any in-bounds scale will do)
            us = tl.minimum(u, n_units - 1)
            sa = tl.load(s_ptr + row_a.to(tl.int64) * lds + us, mask=row_a < N, other=0.0).to(tl.float32)
            sb = tl.load(s_ptr + (row_a + 8).to(tl.int64) * lds + us, mask=row_a + 8 < N, other=0.0).to(tl.float32)
            acc0, acc1, acc2, acc3 = acc0 + e0 * sa, acc1 + e1 * sa, acc2 + e2 * sb, acc3 + e3 * sb
            if MT == 2:
                bcc0, bcc1, bcc2, bcc3 = bcc0 + f0 * sa, bcc1 + f1 * sa, bcc2 + f2 * sb, bcc3 + f3 * sb
    if ROW_SCALE:
        sa = tl.load(s_ptr + row_a.to(tl.int64) * lds, mask=row_a < N, other=0.0).to(tl.float32)
        sb = tl.load(s_ptr + (row_a + 8).to(tl.int64) * lds, mask=row_a + 8 < N, other=0.0).to(tl.float32)
        acc0, acc1, acc2, acc3 = acc0 * sa, acc1 * sa, acc2 * sb, acc3 * sb
        bcc0, bcc1, bcc2, bcc3 = bcc0 * sa, bcc1 * sa, bcc2 * sb, bcc3 * sb

    # the KW slices of a tile summed (through shared memory); lane (g, c) of tile r then holds outputs
    # (feature rows row_o / row_o + 8, batch rows m0 / m0 + 1)
    lane_o = tl.arange(0, 32)[None, :]
    row_o = (pid_n * RT + tl.arange(0, RT)[:, None]) * 16 + lane_o // 4
    m0 = pid_m * (8 * MT) + 2 * (lane_o % 4)
    acc0, acc1, acc2, acc3 = (_kw_sum(acc0, RT, KW), _kw_sum(acc1, RT, KW), _kw_sum(acc2, RT, KW),
                              _kw_sum(acc3, RT, KW))  # fmt: skip
    _store_out(y_ptr, ws_ptr, acc0, acc1, acc2, acc3, m0, row_o, M, N, stride_ym, pid_k, SPLIT)
    if MT == 2:
        bcc0, bcc1, bcc2, bcc3 = (_kw_sum(bcc0, RT, KW), _kw_sum(bcc1, RT, KW), _kw_sum(bcc2, RT, KW),
                                  _kw_sum(bcc3, RT, KW))  # fmt: skip
        _store_out(y_ptr, ws_ptr, bcc0, bcc1, bcc2, bcc3, m0 + 8, row_o, M, N, stride_ym, pid_k, SPLIT)
    if SPLIT:
        tl.debug_barrier()
        tile_id = pid_m * tl.num_programs(0) + pid_n
        done = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
        if done == n_split - 1:
            _reduce_out(y_ptr, ws_ptr, m0, row_o, M, N, stride_ym, n_split)
            if MT == 2:
                _reduce_out(y_ptr, ws_ptr, m0 + 8, row_o, M, N, stride_ym, n_split)
            tl.atomic_xchg(cnt_ptr + tile_id, 0)


def _kw_sum(v, RT: tl.constexpr, KW: tl.constexpr):
    """``[NT]`` per-lane values -> ``[RT, 32]``: the sum over the KW warps of each row tile."""
    return tl.sum(tl.reshape(v, [RT, KW, 32]), axis=1)


def _decode_asm(op: str) -> str:
    """Eight weights of a code word ($8) for the GEMM: rows h = 0 / 1 times their scale pairs ($9 / $10), each
    a pair of 16-bit registers ($0-$3 / $4-$7 in k order), looked up in the byte tables $11-$18 with ``prmt``
    (low 3 code bits pick a byte of a register pair, bit 3 the pair)."""
    half = (
        "prmt.b32 a, $11, $12, {l}; prmt.b32 b, $13, $14, {l}; prmt.b32 lo, a, b, {h};"
        " prmt.b32 a, $15, $16, {l}; prmt.b32 b, $17, $18, {l}; prmt.b32 hi, a, b, {h};"
        " prmt.b32 p0, lo, hi, 0x5140; prmt.b32 p1, lo, hi, 0x7362;"
        f" {op} p0, p0, {{s}}, z; {op} p1, p1, {{s}}, z;"
        " mov.b32 {{{o0}, {o1}}}, p0; mov.b32 {{{o2}, {o3}}}, p1;"
    )
    return (
        "{ .reg .b32 c, l3, hb, l3h, hbh, a, b, lo, hi, p0, p1, z; mov.b32 z, 0x80008000;"
        " prmt.b32 c, $8, 0, 0x3120; and.b32 l3, c, 0x77777777; shr.u32 hb, c, 1;"
        " and.b32 hb, hb, 0x44444444; or.b32 hb, hb, 0x32103210; shr.u32 l3h, l3, 16; shr.u32 hbh, hb, 16; "
        + half.format(l="l3", h="hb", s="$9", o0="$0", o1="$1", o2="$2", o3="$3")
        + half.format(l="l3h", h="hbh", s="$10", o0="$4", o1="$5", o2="$6", o3="$7")
        + " }"
    )


_DECODE_BF16 = _CONSTEXPR(_decode_asm("fma.rn.bf16x2"))
_DECODE_F16 = _CONSTEXPR(_decode_asm("fma.rn.f16x2"))


def _scale_pair(s):
    """A 16-bit scale twice in one int32 (both halves of a packed pair)."""
    return (s.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) * 65537


def _decode_tile(wd, s0, s1, lut_ptr, tb_ptr, F16: tl.constexpr, ASM: tl.constexpr):
    """Weights of code words ``wd [R, 16]`` (rows (t, g), words (c, j)) times their row scales, in x's dtype:
    eight tensors ``o[4 h + 2 e + i]``, value of row ``16 t + 8 h + g`` at ``k = 4 (4 c + j) + 2 e + i``."""
    if ASM:
        z = tl.zeros(wd.shape, dtype=tl.int32)
        sa = z + _scale_pair(s0)[:, None]
        sb = z + _scale_pair(s1)[:, None]
        args = [wd, sa, sb, z + tl.load(tb_ptr), z + tl.load(tb_ptr + 1), z + tl.load(tb_ptr + 2),
                z + tl.load(tb_ptr + 3), z + tl.load(tb_ptr + 4), z + tl.load(tb_ptr + 5), z + tl.load(tb_ptr + 6),
                z + tl.load(tb_ptr + 7)]  # fmt: skip
        if F16:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                _DECODE_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r,r,r", args, dtype=(tl.float16,) * 8,
                is_pure=True, pack=1)  # fmt: skip
        else:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                _DECODE_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r,r,r", args, dtype=(tl.bfloat16,) * 8,
                is_pure=True, pack=1)  # fmt: skip
    else:  # interpreter: table gather, the same roundings (value to x's dtype, then the product)
        dt: tl.constexpr = s0.dtype
        o0 = _decode_one(wd, 0, s0, lut_ptr, dt)
        o1 = _decode_one(wd, 4, s0, lut_ptr, dt)
        o2 = _decode_one(wd, 16, s0, lut_ptr, dt)
        o3 = _decode_one(wd, 20, s0, lut_ptr, dt)
        o4 = _decode_one(wd, 8, s1, lut_ptr, dt)
        o5 = _decode_one(wd, 12, s1, lut_ptr, dt)
        o6 = _decode_one(wd, 24, s1, lut_ptr, dt)
        o7 = _decode_one(wd, 28, s1, lut_ptr, dt)
    return o0, o1, o2, o3, o4, o5, o6, o7


def _group_tiles(wd, s_rows, q, ok0, ok1, lds, lut_ptr, tb_ptr, SG: tl.constexpr, R: tl.constexpr,
                 dt: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    """Group ``q``'s two ``[R, 64]`` weight tiles in ``dt``, rows ``16 t + g`` (h = 0) and ``16 t + 8 + g`` (h = 1),
    from its code words ``wd``: row scales loaded (zero where ``ok0`` / ``ok1`` are off), decoded, assembled in k
    order."""
    s0 = tl.load(s_rows + q // SG, mask=ok0, other=0.0).to(dt)  # (lossless: checked on the host)
    s1 = tl.load(s_rows + 8 * lds + q // SG, mask=ok1, other=0.0).to(dt)
    o0, o1, o2, o3, o4, o5, o6, o7 = _decode_tile(wd, s0, s1, lut_ptr, tb_ptr, F16, ASM)
    # (tl.join appends the new axis last: the outer join's operands differ in i, the inner ones' in e)
    w0 = tl.reshape(tl.join(tl.join(o0, o2), tl.join(o1, o3)), [R, 64])
    w1 = tl.reshape(tl.join(tl.join(o4, o6), tl.join(o5, o7)), [R, 64])
    return w0, w1


def _decode_one(wd, SH: tl.constexpr, s, lut_ptr, dt: tl.constexpr):
    """One code of every word (bits ``SH .. SH + 3``), looked up, rounded to ``dt`` and scaled (interpreter)."""
    v = _round_to(tl.load(lut_ptr + ((wd >> SH) & 15)), dt)
    return _round_to(v.to(tl.float32) * s.to(tl.float32)[:, None], dt)


def _round_to(v, dt: tl.constexpr):
    """fp32 -> ``dt`` rounded to nearest even (Triton 3.9's interpreter truncates to bf16)."""
    if dt == tl.bfloat16:
        b = v.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        return b.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dt)


def _gemm_program(groups_per_split, n_groups):
    """A GEMM program's row block of x, feature block, and its K slice ``[q_lo, q_end)`` of 64-column groups."""
    q_lo = tl.program_id(2) * groups_per_split
    return tl.program_id(0), tl.program_id(1), q_lo, tl.minimum(q_lo + groups_per_split, n_groups)


def _mma_gemm_kernel(
    x_ptr, w_ptr, lut_ptr, tb_ptr, s_ptr, y_ptr, ws_ptr, M, N, K, stride_xm, stride_ym, lds, n_tiles, n_groups,
    groups_per_split, SG: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, STAGES: tl.constexpr,
    F16: tl.constexpr, ASM: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """``y[BM rows of x, 16 BT features] = x @ W.T`` per program (batches > ``MMA_MAX_M``), K in steps of one
    64-column group: the group's code words are decoded (times their scales) into two ``[8 BT, 64]`` weight
    tiles -- rows ``16 t + g`` (h = 0) and ``16 t + 8 + g`` (h = 1) -- and fed to ``tl.dot`` (wgmma on
    sm_90) with the activations as the first operand.  Programs along axis 0 share a weight tile (L2); axis 2
    splits K (``SPLIT``: fp32 partial sums per slice, summed afterwards in a fixed order)."""
    pid_m, pid_n, q_lo, q_end = _gemm_program(groups_per_split, n_groups)
    R: tl.constexpr = BT * 8
    rr = tl.arange(0, R)
    t = pid_n * BT + rr // 8
    row0 = t * 16 + rr % 8  # feature rows of the h = 0 tile (h = 1: + 8)
    cj = tl.arange(0, 16)
    w_rows = w_ptr + t.to(tl.int64)[:, None] * (n_groups * 128) + ((rr % 8) * 16)[:, None] + cj[None, :]
    t_ok = (t < n_tiles)[:, None]
    m = pid_m * BM + tl.arange(0, BM)
    kk = tl.arange(0, 64)
    x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_xm + kk[None, :]
    m_ok = m < M
    s_rows = s_ptr + row0.to(tl.int64) * lds
    acc0 = tl.zeros([BM, R], dtype=tl.float32)
    acc1 = tl.zeros([BM, R], dtype=tl.float32)
    for q in tl.range(q_lo, q_end, num_stages=STAGES):
        wd = tl.load(w_rows + q * 128, mask=t_ok, other=0)
        xt = tl.load(x_rows + q * 64, mask=m_ok[:, None] & ((q * 64 + kk) < K)[None, :], other=0.0)
        w0, w1 = _group_tiles(wd, s_rows, q, row0 < N, row0 + 8 < N, lds, lut_ptr, tb_ptr, SG, R,
                              x_ptr.dtype.element_ty, F16, ASM)  # fmt: skip
        if not ASM:  # (Triton 3.9's interpreter multiplies the bit patterns of bf16 dot operands)
            xt, w0, w1 = xt.to(tl.float32), w0.to(tl.float32), w1.to(tl.float32)
        acc0 = tl.dot(xt, tl.trans(w0), acc0)
        acc1 = tl.dot(xt, tl.trans(w1), acc1)
    _gemm_store(acc0, acc1, y_ptr, ws_ptr, m, row0, M, N, stride_ym, SPLIT)


def _gemm_store(acc0, acc1, y_ptr, ws_ptr, m, row0, M, N, stride_ym, SPLIT: tl.constexpr):
    """The GEMM's two accumulator tiles (rows ``m`` of y, features ``row0`` and ``row0 + 8``) to y in its dtype, or
    as fp32 partial sums of K slice ``program_id(2)`` to the workspace (``SPLIT``)."""
    ok0 = (m < M)[:, None] & (row0 < N)[None, :]
    ok1 = (m < M)[:, None] & (row0 + 8 < N)[None, :]
    if SPLIT:
        part = ws_ptr + tl.program_id(2).to(tl.int64) * M * N + m.to(tl.int64)[:, None] * N + row0[None, :]
        tl.store(part, acc0, mask=ok0)
        tl.store(part + 8, acc1, mask=ok1)
    else:
        dt = y_ptr.dtype.element_ty
        y0 = y_ptr + m.to(tl.int64)[:, None] * stride_ym + row0[None, :]
        tl.store(y0, acc0.to(dt), mask=ok0)
        tl.store(y0 + 8, acc1.to(dt), mask=ok1)


def _mma_gemm_tma_kernel(
    x_desc, w_desc, lut_ptr, tb_ptr, s_ptr, y_ptr, ws_ptr, M, N, stride_ym, lds, groups_per_split, n_groups,
    SG: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, STAGES: tl.constexpr, F16: tl.constexpr,
    ASM: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """:func:`_mma_gemm_kernel` with its operands brought in by the tensor-memory accelerator (sm_90+) instead of
    per-thread loads: ``x_desc`` is x as ``[M, K]`` in ``[BM, 64]`` blocks, ``w_desc`` the code words as
    ``[tiles, groups * 128]`` in ``[BT, 128]`` blocks; out-of-range rows and columns read as zeros, so no masks."""
    pid_m, pid_n, q_lo, q_end = _gemm_program(groups_per_split, n_groups)
    R: tl.constexpr = BT * 8
    rr = tl.arange(0, R)
    row0 = (pid_n * BT + rr // 8) * 16 + rr % 8  # feature rows of the h = 0 tile (h = 1: + 8)
    s_rows = s_ptr + row0.to(tl.int64) * lds
    dt: tl.constexpr = tl.float16 if F16 else tl.bfloat16
    acc0 = tl.zeros([BM, R], dtype=tl.float32)
    acc1 = tl.zeros([BM, R], dtype=tl.float32)
    for q in tl.range(q_lo, q_end, num_stages=STAGES):
        wd = tl.reshape(w_desc.load([pid_n * BT, q * 128]), [R, 16])
        xt = x_desc.load([pid_m * BM, q * 64])
        w0, w1 = _group_tiles(wd, s_rows, q, row0 < N, row0 + 8 < N, lds, lut_ptr, tb_ptr, SG, R, dt, F16, ASM)
        if not ASM:  # (Triton 3.9's interpreter multiplies the bit patterns of bf16 dot operands)
            xt, w0, w1 = xt.to(tl.float32), w0.to(tl.float32), w1.to(tl.float32)
        acc0 = tl.dot(xt, tl.trans(w0), acc0)
        acc1 = tl.dot(xt, tl.trans(w1), acc1)
    _gemm_store(acc0, acc1, y_ptr, ws_ptr, pid_m * BM + tl.arange(0, BM), row0, M, N, stride_ym, SPLIT)


def _mma_dequant16_kernel(
    w_ptr, lut_ptr, tb_ptr, s_ptr, o_ptr, N, K, n_tiles, n_groups, lds,
    SG: tl.constexpr, BT: tl.constexpr, GQ: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """The dense weight in bf16 / fp16 as the GEMM sees it (``round(round(lut) * scale)``): ``16 BT`` rows x
    ``GQ`` groups per program, each code word read once and decoded in registers (``_decode_tile``)."""
    R: tl.constexpr = BT * 8
    rr = tl.arange(0, R)
    t = tl.program_id(0) * BT + rr // 8
    row0 = t * 16 + rr % 8
    cj = tl.arange(0, 16)
    kk = tl.arange(0, 64)
    w_rows = w_ptr + t.to(tl.int64)[:, None] * (n_groups * 128) + ((rr % 8) * 16)[:, None] + cj[None, :]
    s_rows = s_ptr + row0.to(tl.int64) * lds
    out_rows = o_ptr + row0.to(tl.int64)[:, None] * K
    dt = o_ptr.dtype.element_ty
    for i in tl.static_range(GQ):
        q = tl.program_id(1) * GQ + i
        live = (q + tl.zeros([R], dtype=tl.int32)) < n_groups  # (a tensor: the interpreter refuses scalar masks)
        wd = tl.load(w_rows + q * 128, mask=((t < n_tiles) & live)[:, None], other=0)
        w0, w1 = _group_tiles(wd, s_rows, q, (row0 < N) & live, (row0 + 8 < N) & live, lds, lut_ptr, tb_ptr, SG, R,
                              dt, F16, ASM)  # fmt: skip
        col = q * 64 + kk
        ok = (col < K)[None, :]
        tl.store(out_rows + col[None, :], w0, mask=(row0 < N)[:, None] & ok)
        tl.store(out_rows + 8 * K + col[None, :], w1, mask=(row0 + 8 < N)[:, None] & ok)


def _mma_dequant_kernel(w_ptr, lut_ptr, s_ptr, o_ptr, N, K, n_groups, lds, SBK: tl.constexpr, BN: tl.constexpr):
    """The dense ``[BN, 64]`` block of group ``program_id(1)``: each code word is read by its 8 codes' threads
    (L1 hits), every output row segment is written whole."""
    q = tl.program_id(1)
    r = tl.program_id(0) * BN + tl.arange(0, BN)  # [BN]
    kk = tl.arange(0, 64)  # [64]
    # word (tile, q, lane = 4 g + c, j) of code (row 16 tile + 8 h + g, k = 64 q + 16 c + 4 j + 2 e + i)
    row_word = (r // 16).to(tl.int64) * (n_groups * 128) + q * 128 + (r % 8) * 16
    col_word = (kk // 16) * 4 + (kk % 16) // 4
    shift = (8 * ((r % 16) // 8))[:, None] + (16 * ((kk % 4) // 2) + 4 * (kk % 2))[None, :]
    r_ok = r < N
    ok = r_ok[:, None] & ((q * 64 + kk) < K)[None, :]
    code = (tl.load(w_ptr + row_word[:, None] + col_word[None, :], mask=ok, other=0) >> shift) & 15
    sc = tl.load(s_ptr + r.to(tl.int64) * lds + (q * 64) // SBK, mask=r_ok, other=0.0).to(tl.float32)
    v = tl.load(lut_ptr + code) * sc[:, None]
    out = o_ptr + r.to(tl.int64)[:, None] * K + (q * 64 + kk)[None, :]
    tl.store(out, v.to(o_ptr.dtype.element_ty), mask=ok)


_HELPERS = (
    "_words",
    "_program_lanes",
    "_l2_prefetch",
    "_xfrag",
    "_xquad",
    "_pick",
    "_lookup",
    "_half",
    "_emu_part",
    "_mma_emulated",
    "_mma",
    "_fill_table",
    "_store_out",
    "_reduce_out",
    "_stage",
    "_xstage",
    "_kw_sum",
    "_scale_pair",
    "_decode_tile",
    "_group_tiles",
    "_decode_one",
    "_round_to",
    "_gemm_store",
    "_gemm_program",
)
_PLAIN = jit_helpers(globals(), _HELPERS)
if HAS_TRITON:
    from triton.runtime.jit import JITFunction as _JITFunction

    try:  # (host-side tensor descriptors: Triton >= 3.4)
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # pragma: no cover
        TensorDescriptor = None
else:  # pragma: no cover
    TensorDescriptor = None


@functools.cache
def _kernel(fn, interpret: bool):
    """``fn`` jitted, or interpreted with the plain helpers (strict about keyword arguments)."""
    return interpreted(fn, _PLAIN) if interpret else _JITFunction(fn)


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------


def tiles_per_program(n_tiles: int, nw: int, min_programs: int) -> int:
    """Row tiles per program (a power of two up to ``nw``): as many as still leave ``min_programs`` programs.

    Measured on the H100 (RESULTS.md section 5): few row tiles (4096 rows) want one tile per program and all
    warps splitting its K; the LM head (8016 tiles) one warp per tile; 14336 rows two tiles per program.
    """
    rt = nw
    while rt > 1 and _cdiv(n_tiles, rt) < min_programs:
        rt //= 2
    return rt


def _knobs() -> tuple:
    return tuple(MMA_DEFAULT.values()) + tuple(MMA_DEFAULT_WIDE.values()) + (MIN_PROGRAMS_PER_SM,)


def _check_config(cfg: dict, kw: int) -> None:
    """Launch configs the kernel supports (ValueError naming the field otherwise)."""
    nw = cfg["NW"]
    if nw not in (1, 2, 4, 8, 16):
        raise ValueError(f"config NW must be 1, 2, 4, 8 or 16, got {nw!r}")
    if kw not in (1, 2, 4, 8, 16) or nw % kw:
        raise ValueError(f"config KW={kw!r} must be a power of two that divides NW={nw}")
    if cfg["AHEAD"] not in (1, 2):
        raise ValueError(f"config AHEAD must be 1 or 2, got {cfg['AHEAD']!r}")
    if cfg["COPIES"] not in (8, 32):
        raise ValueError(f"config COPIES must be 8 or 32, got {cfg['COPIES']!r}")
    for name in ("PDL", "SPF"):
        if cfg[name] is not None and not isinstance(cfg[name], bool):
            raise ValueError(f"config {name} must be True, False or None (automatic), got {cfg[name]!r}")
    l2pf = cfg["L2PF"]
    if l2pf is not None and (not isinstance(l2pf, int) or isinstance(l2pf, bool) or not 0 <= l2pf <= 64):
        raise ValueError(f"config L2PF (groups prefetched into L2) must be None or an int in [0, 64], got {l2pf!r}")


def _sm_count(x2: torch.Tensor, interpret: bool) -> int:
    """SMs of x's GPU (4 under the interpreter, where the launch rules only need a number)."""
    return 4 if interpret else _num_sms(_device_index(x2))


def _device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


@functools.cache
def _sm90_or_later(index: int) -> bool:
    """Whether GPU ``index`` is sm_90 or later (programmatic dependent launch, bulk L2 prefetch)."""
    return torch.cuda.get_device_capability(index) >= (9, 0)


def _prefetch_plan(cfg: dict, p: MmaLutWeight, programs: int, x2: torch.Tensor, interpret: bool) -> tuple[int, bool]:
    """``(L2PF, SPF)`` of a launch: the config's values, ``None`` resolved by the programs-per-SM rule; nothing under
    the interpreter, before sm_90, or where the words or scales are not 16-byte aligned (bulk prefetches need it)."""
    hw = not interpret and _sm90_or_later(_device_index(x2))
    if not (hw and p.words.data_ptr() % 16 == 0 and p.scales.data_ptr() % 16 == 0):
        return 0, False
    few = programs <= PREFETCH_MAX_PROGRAMS_PER_SM * _sm_count(x2, interpret)
    l2pf = cfg["L2PF"] if cfg["L2PF"] is not None else (PREFETCH_GROUPS if few else 0)
    spf = cfg["SPF"] if cfg["SPF"] is not None else few
    return l2pf, spf


def _inductor_pdl() -> bool:
    """Whether torch.compile generates its kernels with programmatic dependent launch."""
    try:
        import torch._inductor.config as inductor_config
    except ImportError:  # pragma: no cover  (a torch build without inductor)
        return False
    return bool(getattr(inductor_config.triton, "enable_pdl", False))


def _gemv_plan(x2: torch.Tensor, p: MmaLutWeight, y: torch.Tensor, interpret: bool, split_k: int | None,
               config: dict | None):  # fmt: skip
    """Kernel arguments, constexprs, grid and split-K sizes of one GEMV call."""
    m, k = x2.shape
    mt = 1 if m <= 8 else 2
    cfg = dict(MMA_DEFAULT if mt == 1 else MMA_DEFAULT_WIDE, **(config or {}))
    m_tiles = _cdiv(m, 8 * mt)
    nw, kw = cfg["NW"], cfg["KW"]
    if kw is None:
        kw = nw // tiles_per_program(p.n_tiles, nw, MIN_PROGRAMS_PER_SM * _sm_count(x2, interpret))
    _check_config(cfg, kw)
    row_progs = _cdiv(p.n_tiles, nw // kw)
    row_scale = p.scales.shape[1] == 1
    sg = 1 if row_scale else p.scale_block // GROUP_K
    n_units = _cdiv(p.n_groups, sg)
    if split_k is None:
        split_k = _choose_split(row_progs * m_tiles, n_units, x2.device, per_sm=cfg["PER_SM"])
    split = max(1, min(int(split_k), n_units))
    split = _cdiv(n_units, _cdiv(n_units, split))  # no empty slices
    n_part, n_cnt = split * m * y.shape[1], row_progs * m_tiles
    ws, cnt = _workspace(x2.device, n_part, n_cnt) if split > 1 else (y, y)
    f16 = x2.dtype == torch.float16
    args = dict(x_ptr=x2, w_ptr=p.words, tab_ptr=p.pairs_f16 if f16 else p.pairs_bf16, s_ptr=p.scales, y_ptr=y,
                ws_ptr=ws, cnt_ptr=cnt, M=m, N=y.shape[1], K=k, stride_xm=x2.stride(0), stride_ym=y.stride(0),
                lds=p.scales.stride(0), n_tiles=p.n_tiles, n_groups=p.n_groups, n_units=n_units,
                n_split=split)  # fmt: skip
    pdl = cfg["PDL"] if cfg["PDL"] is not None else _inductor_pdl()
    pdl = pdl and not interpret and _sm90_or_later(_device_index(x2))
    l2pf, spf = _prefetch_plan(cfg, p, row_progs * m_tiles * split, x2, interpret)
    meta = dict(SG=sg, ROW_SCALE=row_scale, MT=mt, NW=nw, KW=kw, AHEAD=cfg["AHEAD"], COPIES=cfg["COPIES"], F16=f16,
                ASM=not interpret, SPLIT=split > 1, PDL=pdl, L2PF=l2pf, SPF=spf, num_warps=nw,
                num_stages=1)  # fmt: skip
    if pdl:
        meta["launch_pdl"] = True
    if cfg.get("MAXNREG"):  # (ptxas keeps 8-warp programs at 64 registers; caps above measured mixed)
        meta["maxnreg"] = cfg["MAXNREG"]
    return args, meta, (row_progs, m_tiles, split), split, n_part, n_cnt


def _launch_gemv(x2: torch.Tensor, p: MmaLutWeight, interpret: bool, split_k: int | None, config: dict | None):
    """Run the GEMV; eager calls reuse a launch record cached on the weight (Triton's launcher called directly)."""
    fast = not interpret and config is None and _FAST_CHECKED.get("mma") is not False and _launcher_ok()
    key = ("mma", x2.shape[0], x2.dtype, x2.stride(0), split_k, x2.device.index, _knobs())
    rec = p._launch_cache.get(key) if fast else None
    y = torch.empty((x2.shape[0], p.out_features), device=x2.device, dtype=x2.dtype)
    if rec is not None and _FAST_CHECKED.get("mma"):
        ws, cnt = _workspace(x2.device, rec.n_part, rec.n_cnt) if rec.split > 1 else (y, y)
        _fast_run(rec, x2.device, (x2, y, ws, cnt))
        return y
    args, meta, grid, split, n_part, n_cnt = _gemv_plan(x2, p, y, interpret, split_k, config)
    compiled = _kernel(_mma_gemv_kernel, interpret)[grid](*args.values(), **meta)
    if fast and rec is None and compiled is not None:
        names = tuple(inspect.signature(_mma_gemv_kernel).parameters)
        allargs = {**args, **meta}
        full = [None if nm in _SLOTS else allargs[nm] for nm in names]
        rec = _Launch(compiled, grid, full, tuple(names.index(nm) for nm in _SLOTS), split, n_part, n_cnt)
        if _check_fast("mma", rec, x2, y, split, n_part, n_cnt):
            p._launch_cache[key] = rec
    return y


_SLOTS = ("x_ptr", "y_ptr", "ws_ptr", "cnt_ptr")  # arguments refilled per call in a launch record


def gemm_unsupported(x_dtype: torch.dtype, p: MmaLutWeight) -> str | None:
    """Why the fused GEMM cannot serve ``x_dtype`` activations for ``p`` (None when it can): it multiplies the
    16-bit table values by 16-bit scales, so the scales must be stored in x's dtype (lossless)."""
    if x_dtype not in (torch.bfloat16, torch.float16):
        return f"x is {x_dtype} (the GEMM takes bf16 / fp16)"
    if x_dtype == torch.float16 and p.pairs_f16 is None:
        return "the table leaves fp16's normal range"
    key = ("gemm_scales", x_dtype)
    if key not in p._launch_cache:  # (checked once per weight and dtype)
        s = p.scales
        p._launch_cache[key] = s.dtype in (torch.bfloat16, torch.float16) and bool(
            torch.equal(s.to(x_dtype).to(s.dtype), s)
        )
    if not p._launch_cache[key]:
        return f"the scales ({p.scales.dtype}) are not exactly representable in {x_dtype}"
    return None


def gemm_split(programs: int, n_groups: int, sms: int) -> int:
    """K slices of the fused GEMM: enough to give every SM ``GEMM_PROGRAMS_PER_SM`` programs, each slice at
    least ``GEMM_MIN_GROUPS`` groups long (long-K layers with few row tiles, e.g. the MLP's down projection)."""
    want = GEMM_PROGRAMS_PER_SM * sms
    if programs >= want:
        return 1
    split = min(_cdiv(want, programs), max(1, n_groups // GEMM_MIN_GROUPS))
    return _cdiv(n_groups, _cdiv(n_groups, split))  # no empty slices


def _decode_operands(p: MmaLutWeight, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """What the register decode (``_group_tiles``) of the GEMM and the 16-bit dequantisation needs for ``dtype``:
    its ``prmt`` byte tables and the groups per scale (all of them for one scale per row)."""
    sg = p.n_groups if p.scales.shape[1] == 1 else p.scale_block // GROUP_K
    return p.byte_tables[1 if dtype == torch.float16 else 0], sg


def _use_tma(cfg: dict, x2: torch.Tensor, words: torch.Tensor, interpret: bool) -> bool:
    """Whether the GEMM takes its operands through tensor descriptors (``cfg["TMA"]``; None: on sm_90+ GPUs):
    both must start on 16-byte boundaries and x's rows too (the code-word rows always do)."""
    want = cfg["TMA"] if cfg["TMA"] is not None else not interpret and _sm90_or_later(_device_index(x2))
    aligned = x2.data_ptr() % 16 == 0 and (x2.stride(0) * x2.element_size()) % 16 == 0 and words.data_ptr() % 16 == 0
    return bool(want) and TensorDescriptor is not None and aligned


def _launch_gemm(x2: torch.Tensor, p: MmaLutWeight, interpret: bool, config: dict | None) -> torch.Tensor:
    cfg = dict(GEMM_DEFAULT, **(config or {}))
    if cfg["BM"] is None:
        cfg["BM"] = 64 if x2.shape[0] <= 64 else 128
    for name, allowed in (("BT", (2, 4, 8, 16)), ("BM", (16, 32, 64, 128, 256)), ("STAGES", (1, 2, 3, 4, 5)),
                          ("TMA", (None, False, True))):
        if cfg[name] not in allowed:
            raise ValueError(f"gemm config {name} must be one of {allowed}, got {cfg[name]!r}")
    m, k = x2.shape
    n = p.out_features
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    grid = (_cdiv(m, cfg["BM"]), _cdiv(p.n_tiles, cfg["BT"]))
    split = cfg.get("SPLIT")
    if split is None:
        split = gemm_split(grid[0] * grid[1], p.n_groups, _sm_count(x2, interpret))
    if not isinstance(split, int) or split < 1:
        raise ValueError(f"gemm config SPLIT must be a positive int or None, got {split!r}")
    per = _cdiv(p.n_groups, min(split, p.n_groups))
    split = _cdiv(p.n_groups, per)
    ws = _workspace(x2.device, split * m * n, 1)[0] if split > 1 else y
    table, sg = _decode_operands(p, x2.dtype)
    common = dict(SG=sg, BT=cfg["BT"], BM=cfg["BM"], STAGES=cfg["STAGES"], F16=x2.dtype == torch.float16,
                  ASM=not interpret, SPLIT=split > 1, num_warps=cfg["num_warps"], num_stages=cfg["STAGES"])
    if _use_tma(cfg, x2, p.words, interpret):
        x_desc = TensorDescriptor.from_tensor(x2, [cfg["BM"], GROUP_K])
        w_desc = TensorDescriptor.from_tensor(p.words.view(p.n_tiles, p.n_groups * 128), [cfg["BT"], 128])
        _kernel(_mma_gemm_tma_kernel, interpret)[grid + (split,)](
            x_desc, w_desc, p.lut, table, p.scales, y, ws, m, n, y.stride(0), p.scales.stride(0), per, p.n_groups,
            **common)  # fmt: skip
    else:
        _kernel(_mma_gemm_kernel, interpret)[grid + (split,)](
            x2, p.words, p.lut, table, p.scales, y, ws, m, n, k, x2.stride(0), y.stride(0), p.scales.stride(0),
            p.n_tiles, p.n_groups, per, **common)  # fmt: skip
    if split > 1:  # (deterministic: a fixed summation order)
        y.copy_(ws[: split * m * n].view(split, m, n).sum(dim=0))
    return y


def decode_mma_weight(p: MmaLutWeight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight on ``p``'s device (Triton kernel where it runs, else the torch reference).

    In bf16 / fp16, where the GEMM applies (:func:`gemm_unsupported`), it is the GEMM's weight
    ``round(round(lut) * scale)`` (one code-word read per 8 weights); otherwise ``round(lut * scale)``."""
    n, k = p.out_features, p.in_features
    if not use_triton(p.words):
        return dequantize_mma(p, dtype).to(p.device)
    out = scratch_weight(p.device, n, k, dtype)
    interpret = p.device.type != "cuda" or _interpret_mode()
    if gemm_unsupported(dtype, p) is None:
        bt, gq = DEQUANT16_CONFIG["BT"], DEQUANT16_CONFIG["GQ"]
        table, sg = _decode_operands(p, dtype)
        _kernel(_mma_dequant16_kernel, interpret)[(_cdiv(p.n_tiles, bt), _cdiv(p.n_groups, gq))](
            p.words, p.lut, table, p.scales, out, n, k, p.n_tiles, p.n_groups, p.scales.stride(0), SG=sg, BT=bt,
            GQ=gq, F16=dtype == torch.float16, ASM=not interpret, num_warps=DEQUANT16_CONFIG["num_warps"],
        )  # fmt: skip
        return out
    bn = DEQUANT_CONFIG["BN"]
    sbk = p.scale_block if p.scales.shape[1] > 1 else max(k, 1)
    _kernel(_mma_dequant_kernel, interpret)[(_cdiv(n, bn), p.n_groups)](
        p.words, p.lut, p.scales, out, n, k, p.n_groups, p.scales.stride(0),
        SBK=sbk, BN=bn, num_warps=DEQUANT_CONFIG["num_warps"],
    )  # fmt: skip
    return out


def mma_linear(x: torch.Tensor, p: MmaLutWeight, *, path: str | None = None, split_k: int | None = None,
               config: dict | None = None) -> torch.Tensor:  # fmt: skip
    """``y = x @ W.T`` for a fragment-layout weight; ``x`` is ``[..., K]`` in bf16/fp16/fp32.

    ``path``: ``"mma"`` (fused tensor-core GEMV, bf16/fp16 x), ``"gemm"`` (fused decode + ``tl.dot`` GEMM,
    bf16/fp16 x and scales), ``"dequant"`` (dense weight into a reused scratch buffer, then
    ``torch.matmul``), ``"torch"`` (reference).  Default: ``mma`` up to ``MMA_MAX_M`` rows of bf16/fp16 x,
    ``gemm`` up to ``GEMM_MAX_M`` where it applies, ``dequant`` otherwise; ``torch`` without Triton.
    ``split_k`` / ``config`` override the K slices and the launch defaults (``MMA_DEFAULT``; ``GEMM_DEFAULT``
    for ``gemm``).
    """
    k, n = p.in_features, p.out_features
    x2, lead = linear_input(x, k, ("mma", "gemm", "dequant", "torch"), path)
    if x2.stride(0) % 8 or x2.data_ptr() % 16:  # 16-byte activation loads
        x2 = x2.clone(memory_format=torch.contiguous_format)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    if x2.device != p.device:
        raise ValueError(f"packed weight is on {p.device}, x on {x2.device}")
    if path == "gemm" and (why := gemm_unsupported(x2.dtype, p)):
        raise ValueError(f"path='gemm' unsupported: {why}")
    if path == "torch" or not use_triton(x2):
        return (x2.float() @ dequantize_mma(p).to(x2.device).T).to(x.dtype).reshape(*lead, n)
    fused_ok = x2.dtype == torch.bfloat16 or (x2.dtype == torch.float16 and p.pairs_f16 is not None)
    if path is None:
        if fused_ok and m <= MMA_MAX_M:
            path = "mma"
        else:
            path = "gemm" if m <= GEMM_MAX_M and gemm_unsupported(x2.dtype, p) is None else "dequant"
    if path == "mma" and not fused_ok:
        raise ValueError(f"path='mma' needs bf16 activations (or fp16 with a table in fp16 range), got {x2.dtype}")
    interpret = not x2.is_cuda or _interpret_mode()
    if path == "gemm":
        y = _launch_gemm(x2, p, interpret, config)
    elif path == "dequant":
        y = x2 @ decode_mma_weight(p, x2.dtype).T
    else:
        y = _launch_gemv(x2, p, interpret, split_k, config)
    return y.reshape(*lead, n)
