# ruff: noqa: SIM102, SIM108  (kernels keep static if/else blocks: clearer in Triton)
"""Triton kernels for ``y = x @ W.T`` with ``W`` in a fixed-length LUT format.

Weight contract (see :mod:`hf_optquant.kernels.reference`)::

    W[n, k] = lut[codes[n, k]] * scales[n, k // block_size]

Kernel-ready layout (:class:`PackedLutWeight`)
----------------------------------------------
``qweight`` is an int32 tensor ``[N, n_groups * bits * C]`` (row-major, one row per output
feature).  K is cut into *groups* of ``G = 32 * C`` codes (``C = sub_k = 16``, so G = 512;
K is zero-padded up to a multiple of G).  A group is cut into 32 *sub-slots* of C
consecutive codes: sub-slot ``s`` holds ``k = g*G + s*C + t`` for ``t < C``.

The ``bits`` of a code are split into at most two power-of-two *bit planes*
(2 -> 2, 3 -> 2+1, 4 -> 4, 5 -> 4+1, 6 -> 4+2, 8 -> 8; the code is
``plane0 | plane1 << bits0``).  A plane of ``b`` bits packs ``32 / b`` codes per word
and owns ``b`` *chunks* of C words in each group; word ``t`` of chunk ``q`` holds, in
bit field ``j`` (bits ``[j*b, (j+1)*b)``), the plane bits of the code at
``k = g*G + (q*(32/b) + j)*C + t``.  Per row and group the chunks of plane 0 come first,
then those of plane 1: ``bits * C`` contiguous words (``bits * 64`` bytes).

So one coalesced ``[rows, C]`` load of a chunk, shifted by ``j*b`` and masked, yields
the codes of a *contiguous* run of C values of k for every row: the kernels never
shuffle codes between threads, every shift is uniform, and 3/5/6-bit codes cost one
extra load and an OR.  For 4-bit codes byte ``u`` of a word holds the codes of the two
sub-slots ``2u`` and ``2u + 1``: the GEMV looks both up at once (see "pair table").

Kernels (``path`` of :func:`lut_linear`)
----------------------------------------
* ``gemv`` -- ``_lut_gemv_kernel``, CUDA cores, used for decode batches
  (``M <= GEMV_MAX_M``).  A program owns ``BN`` output features, ``BM`` (1, 2 or 4) rows
  of x and a slice of the groups (split-K).  The 32 sub-slots of a group are unrolled with
  compile-time shifts; ``x * lut[code]`` is summed over a scale block and scaled once.
  Chunk loads run ``AHEAD`` chunks in front of their use (also across groups), so
  every program keeps memory requests in flight while it computes.
  The table lives in shared memory (a ``.shared`` array declared in inline PTX, read with
  ``ld.shared`` at ``symbol + offset``, which ptxas folds into ``LDS [R+UR]``):

  - *pair table* (4-bit codes, bf16/fp16 activations): 256 entries ``(lut[lo], lut[hi])``
    rounded to fp16 and packed in one 32-bit word, indexed by a whole byte, so one ``LDS.32``
    serves two codes (per two codes: SHF + LOP3 + LDS + 2 cvt + 2 FFMA).  It is replicated
    32 times, copy ``lane`` in bank ``lane``, so a warp's random lookups never conflict
    (32 KB).  Shared-memory wavefronts, not DRAM, bounded the GEMV (Nsight Compute, H100):
    a wavefront moves 128 bytes, so 2-byte values serve 64 codes per wavefront where fp32
    values serve 32.  The fp16 rounding (<= 2**-11 relative, tables within fp16's normal
    range only) is finer than the activations' own; fp32 activations use the fp32 table;
  - otherwise one entry per code; 6- and 8-bit tables are replicated 32 times (one copy
    per bank) for the same reason, smaller tables fit the 32 banks as they are.

  bf16 activations of the program's K range are staged once in a second ``.shared`` array
  (``XS``, 8 KB; ``GEMV_X_SMEM``) and read with one 8-byte ``ld.shared`` per sub-slot.
* ``gemm`` -- ``_lut_gemm_kernel``, ``tl.dot`` (wgmma/mma) for larger batches: per K step
  of ``KT = J*C`` codes it dequantises ``lut[code] * scale`` (rounded to the activation
  dtype) and multiplies it with x.  Two K-loop forms, both autotuned: ``SUBDOT`` loads the
  step's [BN, C] words once, pre-shifts them and runs one dot per sub-slot with
  compile-time shifts; otherwise a [BN, KT] word tile reads each word J times with a
  per-column shift and one dot covers the step.  The table sits in shared memory (inline
  PTX reads are opaque to Triton's pipeliner, which would otherwise turn a ``tl.load``
  gather into 4-byte cp.async copies), or is read with ``ld.global.nc`` where a static
  ``.shared`` array cannot launch next to Triton's own (see ``_GEMM_SMEM_LUT``).
* ``dequant`` -- ``_lut_dequant_kernel`` writes the dense weight in the activation dtype
  into a scratch buffer that is reused between calls (one per device, stream and dtype),
  then cuBLAS multiplies (``torch.matmul``).  Off by default (``DEQUANT_MIN_M``).
* Split-K (decode shapes with few output tiles): fp32 partials in a cached workspace and
  a per-tile counter; the program that finishes a tile last sums the partials in fixed
  order (deterministic) and resets the counter -- one launch, no memset, no cast kernel.

All kernels share the dequantise helpers ``_code_offset`` / ``_var_offset`` (code ->
byte offset into the table) and ``_lut_value`` / ``_lut_pair`` (the lookup).

Eager calls: the first call for a given (weight, batch, dtype, ...) goes through the
autotuner; later calls reuse the compiled kernel, its grid and argument order, cached on
the :class:`PackedLutWeight` (``_launch_cache``), and call Triton's launcher directly.

On CPU the kernels run under Triton's interpreter when ``TRITON_INTERPRET=1``; without
it (or without Triton) :func:`lut_linear` falls back to the torch reference.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os

import torch

from .common import HAS_TRITON, interpreted, jit_helpers, linear_input, tl, triton
from .common import cdiv as _cdiv
from .common import interpret_mode as _interpret_mode
from .reference import dequantize_reference

__all__ = [
    "HAS_TRITON",
    "PackedLutWeight",
    "pack_lut_weight",
    "unpack_lut_weight",
    "dequantize_packed",
    "lut_linear",
    "GEMV_MAX_M",
    "DEQUANT_MIN_M",
]

#: Sub-slot width C (codes per contiguous k-run, words per chunk); group = 32 * C codes.
SUB_K = 16
#: Largest batch (rows of x) served by the CUDA-core GEMV kernel (measured: see
#: benchmarks/kernels_notes.md); larger batches use the tensor-core kernel.
GEMV_MAX_M = 1
#: Smallest batch for which dequantise-to-scratch + cuBLAS is used instead of the fused
#: tl.dot kernel (``None``: never). H100, 4096x4096 4-bit (RESULTS section 5): tie at M = 64
#: (30.3 vs 30.5 us), dequant 1.6x faster at M = 256 (38.9 vs 63.4 us).
DEQUANT_MIN_M: int | None = 128
#: LUT lookups on GPUs: 2 = table in shared memory, 1 = inline PTX ld.global.nc, 0 =
#: tl.load (the interpreter always uses 0).
_ASM_LUT_MODE = int(os.environ.get("HF_OPTQUANT_LUT_MODE", "2"))
#: The GEMM's table in shared memory: a static .shared array next to Triton's dynamic
#: shared memory makes a launch fail when dynamic <= 48 KB < dynamic + static (Triton
#: only opts in to > 48 KB for the dynamic part); such a failure switches this off.
_GEMM_SMEM_LUT = True
#: Pair table for 4-bit GEMV lookups (see the module docstring).
_PAIR_LUT = os.environ.get("HF_OPTQUANT_PAIR_LUT", "1") == "1"

_PLANES = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 8: (8,)}


# --------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class PackedLutWeight:
    """Kernel-ready form of a LUT-quantised ``[N, K]`` weight (layout: module docstring).

    ``scales`` has shape ``[N, ceil(K / scale_block)]``; ``scale_block`` equals
    ``block_size`` except for a block size that is not a power of two (other than
    per-channel), whose scales are repeated to the largest power of two dividing it.
    ``_launch_cache`` holds compiled-kernel launch records for eager calls and facts about the
    weight that choosing a launch needs (whether the table fits fp16); it is not copied by
    :meth:`to` or :func:`dataclasses.replace`.
    """

    qweight: torch.Tensor  # int32 [N, n_groups * bits * sub_k]
    lut: torch.Tensor  # float32 [2**bits]
    scales: torch.Tensor  # bf16 / fp16 / fp32 [N, ceil(K / scale_block)]
    out_features: int
    in_features: int
    bits: int
    block_size: int
    scale_block: int
    sub_k: int = SUB_K
    _launch_cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def group_size(self) -> int:
        return 32 * self.sub_k

    @property
    def n_groups(self) -> int:
        return _cdiv(self.in_features, self.group_size)

    @property
    def planes(self) -> tuple[int, ...]:
        return _PLANES[self.bits]

    @property
    def n_scale_blocks(self) -> int:
        return self.scales.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        """Bytes the kernels read from memory for the weight (codes + scales + lut)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.lut, self.scales))

    def to(self, device) -> PackedLutWeight:
        return dataclasses.replace(
            self,
            qweight=self.qweight.to(device),
            lut=_aligned_lut(self.lut, device),
            scales=self.scales.to(device),
        )


def _aligned_lut(lut: torch.Tensor, device) -> torch.Tensor:
    """float32 copy of ``lut`` on ``device`` whose address is a multiple of its byte size.

    The kernels then form ``&lut[code]`` by OR-ing ``code * 4`` into the low address word.
    (A view into a buffer twice the size; the kernels check the alignment at launch and
    use plain pointer arithmetic when it does not hold.)
    """
    lut = lut.detach().to(device=device, dtype=torch.float32).reshape(-1)
    n = lut.numel()
    nbytes = 4 * n
    buf = torch.empty(2 * n, device=device, dtype=torch.float32)
    off = (-buf.data_ptr() % nbytes) // 4
    out = buf[off : off + n]
    out.copy_(lut)
    return out


def _pick_scale_dtype(scales: torch.Tensor, scale_dtype) -> torch.dtype:
    if scale_dtype is None or scale_dtype == "auto":
        for dt in (torch.bfloat16, torch.float16):
            if torch.equal(scales.to(dt).to(torch.float32), scales):
                return dt
        return torch.float32
    if scale_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"scale_dtype must be 'auto', bf16, fp16 or fp32, got {scale_dtype!r}")
    return scale_dtype


def pack_lut_weight(
    codes: torch.Tensor,
    lut: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    block_size: int,
    device=None,
    *,
    scale_dtype="auto",
) -> PackedLutWeight:
    """Repack ``(codes, lut, scales)`` into the kernel layout (see the module docstring).

    ``scale_dtype='auto'`` stores the scales in bf16 (or fp16) when that is lossless and in
    float32 otherwise, so that :func:`unpack_lut_weight` is an exact inverse; passing
    ``torch.bfloat16`` rounds them (faster: fewer bytes per weight).
    """
    if bits not in _PLANES:
        raise ValueError(f"bits must be one of {sorted(_PLANES)}, got {bits}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    n, k = codes.shape
    if n == 0 or k == 0:
        raise ValueError("empty weight")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    n_blocks = _cdiv(k, block_size)
    if tuple(scales.shape) != (n, n_blocks):
        raise ValueError(
            f"scales must have shape [N, ceil(K / block_size)] = {[n, n_blocks]}, got {list(scales.shape)}"
        )
    if lut.numel() != 2**bits:
        raise ValueError(f"lut must have 2**bits = {2**bits} entries, got {lut.numel()}")
    device = torch.device(device) if device is not None else codes.device
    c = SUB_K
    group = 32 * c

    # Scale granularity the kernels see (a power of two >= C, or one block per row).
    scales32 = scales.detach().to(torch.float32)
    scale_block = block_size
    if n_blocks > 1 and block_size & (block_size - 1):
        scale_block = block_size & -block_size
        if scale_block < c:
            raise ValueError(f"block_size {block_size} unsupported: needs a power-of-two factor >= {c}")
        rep = block_size // scale_block
        scales32 = scales32.repeat_interleave(rep, dim=1)[:, : _cdiv(k, scale_block)]
    elif n_blocks > 1 and block_size < c:
        raise ValueError(f"block_size must be >= {c} (or K), got {block_size}")
    sdt = _pick_scale_dtype(scales32, scale_dtype)

    codes64 = codes.detach().to("cpu", torch.int64)
    if codes64.min() < 0 or codes64.max() >= 2**bits:
        raise ValueError(f"codes must lie in [0, 2**bits) = [0, {2**bits})")
    n_groups = _cdiv(k, group)
    kp = n_groups * group
    if kp != k:
        codes64 = torch.nn.functional.pad(codes64, (0, kp - k))
    sub = codes64.view(n, n_groups, 32, c)  # [n, g, s, t]
    words = []
    lo = 0
    for b in _PLANES[bits]:
        slots = 32 // b
        plane = ((sub >> lo) & ((1 << b) - 1)).view(n, n_groups, b, slots, c)  # s = q*slots + j
        shifts = (torch.arange(slots, dtype=torch.int64) * b).view(1, 1, 1, slots, 1)
        w = (plane << shifts).sum(dim=3)  # disjoint bit fields: sum == or; [n, g, b, c]
        words.append(w)
        lo += b
    w = torch.cat(words, dim=2).reshape(n, n_groups * bits * c)
    w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)  # reinterpret as int32
    return PackedLutWeight(
        qweight=w.contiguous().to(device),
        lut=_aligned_lut(lut, device),
        scales=scales32.to(sdt).contiguous().to(device),
        out_features=n,
        in_features=k,
        bits=bits,
        block_size=block_size,
        scale_block=scale_block,
        sub_k=c,
    )


def unpack_lut_weight(p: PackedLutWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact inverse of :func:`pack_lut_weight`: ``(codes uint8, lut fp32, scales fp32)``."""
    n, k, c = p.out_features, p.in_features, p.sub_k
    n_groups = p.n_groups
    w = p.qweight.detach().to("cpu", torch.int64) & 0xFFFFFFFF
    w = w.view(n, n_groups, p.bits, c)
    codes = torch.zeros(n, n_groups, 32, c, dtype=torch.int64)
    q0 = 0
    lo = 0
    for b in p.planes:
        slots = 32 // b
        chunk = w[:, :, q0 : q0 + b, :].unsqueeze(3)  # [n, g, b, 1, c]
        shifts = (torch.arange(slots, dtype=torch.int64) * b).view(1, 1, 1, slots, 1)
        plane = (chunk >> shifts) & ((1 << b) - 1)  # [n, g, b, slots, c]
        codes |= plane.reshape(n, n_groups, 32, c) << lo
        q0 += b
        lo += b
    codes = codes.reshape(n, n_groups * 32 * c)[:, :k].to(torch.uint8)
    scales = p.scales.detach().to("cpu", torch.float32)
    if p.scale_block != p.block_size:
        rep = p.block_size // p.scale_block
        scales = scales[:, ::rep]
    scales = scales[:, : _cdiv(k, p.block_size)].contiguous()
    return codes, p.lut.detach().to("cpu", torch.float32), scales


def dequantize_packed(p: PackedLutWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[N, K]`` weight of a packed layer (torch; used by the fallback path)."""
    codes, lut, scales = unpack_lut_weight(p)
    return dequantize_reference(codes, lut, scales, p.block_size, dtype=dtype).to(p.device)


# --------------------------------------------------------------------------------------
# Triton kernels and their shared helpers.  They are plain functions, jitted lazily (see
# ``_kernels``) so that the interpreter-or-compiler choice follows TRITON_INTERPRET at
# call time, not import time: compiled kernels see the helpers as ``JITFunction``s
# (module globals set below), interpreted kernels run on a copy of the function whose
# globals map the helper names back to the plain functions.
#
# Table lookups take a byte offset ``off`` = (code << SH0) | base:
#   LMODE 2: base = this lane's copy in the shared-memory table; the asm adds the table
#            symbol, which ptxas folds into ``LDS [R+UR]``;
#   LMODE 1: base = low 32 bits of the global table (aligned to its size: OR == ADD), the
#            high 32 bits are OR-ed back and ``ld.global.nc`` reads it;
#   LMODE 0: base = 0 and ``tl.load(lut_ptr + (off >> SH0))`` (the interpreter).
# --------------------------------------------------------------------------------------

_CONSTEXPR = tl.constexpr if HAS_TRITON else str  # Triton kernels may read constexpr globals only
_ASM_LUT1 = _CONSTEXPR("{ .reg .u32 a; mov.u32 a, hfoq_lut_smem; add.u32 a, a, $1; ld.shared.f32 $0, [a]; }")
_ASM_LUT2 = _CONSTEXPR(
    "{ .reg .u32 a; .reg .b32 r; .reg .b16 l, h; mov.u32 a, hfoq_lut_smem; add.u32 a, a, $2; "
    "ld.shared.b32 r, [a]; mov.b32 {l, h}, r; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }"
)
_ASM_DECL_SMALL = _CONSTEXPR(".shared .align 1024 .b8 hfoq_lut_smem[1024];\n\tmov.u32 $0, hfoq_lut_smem;")
#: bf16 activations of a GEMV program's K range in shared memory (``XS`` in the GEMV); with
#: the 32 KB pair table this stays under the 48 KB of static shared memory a kernel may use.
X_SMEM_VALUES = 4096
_ASM_DECL_X = _CONSTEXPR(f".shared .align 16 .b8 hfoq_x_smem[{2 * X_SMEM_VALUES}];\n\tmov.u32 $0, hfoq_x_smem;")
_ASM_X4 = _CONSTEXPR(  # 4 bf16 -> 4 fp32 (a bf16 is the top half of an fp32)
    "{ .reg .u32 a, lo, hi; mov.u32 a, hfoq_x_smem; add.u32 a, a, $4; ld.shared.v2.b32 {lo, hi}, [a]; "
    "shl.b32 $0, lo, 16; and.b32 $1, lo, 0xFFFF0000; shl.b32 $2, hi, 16; and.b32 $3, hi, 0xFFFF0000; }"
)
_ASM_DECL_BIG = _CONSTEXPR(".shared .align 1024 .b8 hfoq_lut_smem[32768];\n\tmov.u32 $0, hfoq_lut_smem;")


def _code_offset(w, SHIFT: tl.constexpr, MASK: tl.constexpr, POS: tl.constexpr):
    """``((w >> SHIFT) & MASK) << POS`` with compile-time shifts: one shift and one AND."""
    if SHIFT >= POS:
        return (w >> (SHIFT - POS)) & (MASK << POS)
    else:
        return (w << (POS - SHIFT)) & (MASK << POS)


def _var_offset(w, sh, MASK: tl.constexpr, POS: tl.constexpr):
    """``((w >> sh) & MASK) << POS`` for a shift tensor (GEMM: one shift per column)."""
    return ((w >> sh) & MASK) << POS


def _plane_offsets(wa, wb, sa, sb, MASK_A: tl.constexpr, MASK_B: tl.constexpr, BITS_A: tl.constexpr,
                   BITS_B: tl.constexpr, SH0: tl.constexpr, CONST_SHIFT: tl.constexpr):  # fmt: skip
    """Table byte offset of the code whose plane bits sit at ``sa`` in ``wa`` / ``sb`` in ``wb``."""
    if CONST_SHIFT:
        off = _code_offset(wa, sa, MASK_A, SH0)
        if BITS_B > 0:
            off = off | _code_offset(wb, sb, MASK_B, SH0 + BITS_A)
    else:
        off = _var_offset(wa, sa, MASK_A, SH0)
        if BITS_B > 0:
            off = off | _var_offset(wb, sb, MASK_B, SH0 + BITS_A)
    return off


def _lut_value(off, lut_ptr, base_hi, LMODE: tl.constexpr, SH0: tl.constexpr):
    """fp32 table value at byte offset ``off`` (see the LMODE notes above)."""
    if LMODE == 2:
        v = tl.inline_asm_elementwise(_ASM_LUT1, "=r,r", [off], dtype=tl.float32, is_pure=True, pack=1)
    elif LMODE == 1:  # opaque to the pipeliner: one plain LDG per code
        addr = off.to(tl.uint32, bitcast=True).to(tl.int64) | base_hi
        v = tl.inline_asm_elementwise(
            "ld.global.nc.f32 $0, [$1];", "=r,l", [addr], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        v = tl.load(lut_ptr + (off >> SH0))
    return v


def _lut_pair(off, lut_ptr, LMODE: tl.constexpr, SH0: tl.constexpr):
    """``(lut[byte & 15], lut[byte >> 4])`` rounded to fp16, for the byte in ``off`` (pair table)."""
    if LMODE == 2:
        lo, hi = tl.inline_asm_elementwise(
            _ASM_LUT2, "=r,=r,r", [off], dtype=(tl.float32, tl.float32), is_pure=True, pack=1
        )
    else:
        e = off >> SH0
        lo = tl.load(lut_ptr + (e & 15)).to(tl.float16).to(tl.float32)
        hi = tl.load(lut_ptr + (e >> 4)).to(tl.float16).to(tl.float32)
    return lo, hi


def _smem_array(DECL: tl.constexpr):
    """Declare the static ``.shared`` array of ``DECL`` (one of the ``_ASM_DECL_*``) in this kernel
    and return its shared-memory address (a scalar)."""
    decl = tl.inline_asm_elementwise(DECL, "=r,r", [tl.full([1], 0, tl.int32)], dtype=tl.int32, is_pure=False,
                                     pack=1)  # fmt: skip
    return tl.sum(decl, 0)


def _lut_table(lut_ptr, zero, LMODE: tl.constexpr, PAIR: tl.constexpr, COPIES: tl.constexpr,
               NENT: tl.constexpr, BIG: tl.constexpr):  # fmt: skip
    """Set up the lookups; return ``base`` (shape of ``zero``) and ``base_hi`` (LMODE 1).

    LMODE 2 fills the shared-memory table: entry ``e``, copy ``c`` at byte
    ``(e * COPIES + c) * width``; lane ``l`` reads copy ``l % COPIES``.
    """
    base_hi = lut_ptr.to(tl.int64) & -4294967296
    if LMODE == 2:
        if BIG:
            sym = _smem_array(_ASM_DECL_BIG)
        else:
            sym = _smem_array(_ASM_DECL_SMALL)
        e = tl.arange(0, NENT)[:, None]  # [NENT, 1]: one table read per entry, not per copy
        c = tl.arange(0, COPIES)[None, :]
        if PAIR:  # (fp16 lo, fp16 hi) in one 32-bit word
            lo = tl.load(lut_ptr + (e & 15)).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            hi = tl.load(lut_ptr + (e >> 4)).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
            addr = sym + (e * COPIES + c) * 4
            tl.inline_asm_elementwise(
                "st.shared.b32 [$1], $2;\n\tmov.u32 $0, 0;", "=r,r,r", [addr, (lo | (hi << 16)) + addr * 0],
                dtype=tl.int32, is_pure=False, pack=1,
            )  # fmt: skip
            width = 4
        else:
            v = tl.load(lut_ptr + e)
            addr = sym + (e * COPIES + c) * 4
            tl.inline_asm_elementwise(
                "st.shared.f32 [$1], $2;\n\tmov.u32 $0, 0;", "=r,r,f", [addr, v + (addr * 0).to(tl.float32)],
                dtype=tl.int32, is_pure=False, pack=1,
            )  # fmt: skip
            width = 4
        tl.debug_barrier()
        if COPIES > 1:
            lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [zero], dtype=tl.int32,
                                             is_pure=True, pack=1)  # fmt: skip
            base = (lane % COPIES) * width
        else:
            base = zero
    elif LMODE == 1:
        base = zero + (lut_ptr.to(tl.int64) & 0xFFFFFFFF).to(tl.int32)
    else:
        base = zero
    return base, base_hi


def _gemv_x(x_row, kk, row, M, K, EVEN_K: tl.constexpr, ROW_MASK: tl.constexpr):
    """fp32 activations ``x[row, kk]`` (zero past K or for a row past M).

    Scalar conditions are broadcast to the tile before ``&`` (Triton's interpreter gets
    the dtype of ``tile & scalar`` wrong).
    """
    if ROW_MASK:
        row_ok = (kk * 0 + row) < M
        if EVEN_K:
            xv = tl.load(x_row + kk, mask=row_ok, other=0.0)
        else:
            xv = tl.load(x_row + kk, mask=row_ok & (kk < K), other=0.0)
    else:
        if EVEN_K:
            xv = tl.load(x_row + kk)
        else:
            xv = tl.load(x_row + kk, mask=kk < K, other=0.0)
    return xv.to(tl.float32)


def _chunk_load(ptr, mask):
    """A chunk of code words: read once, so evicted first (bypassing L1 with ``ld.global.cg``
    measured no faster on the H100, RESULTS section 5)."""
    return tl.load(ptr, mask=mask, other=0, eviction_policy="evict_first")


def _x_stage(x_row, k_lo, k_hi, K, ST: tl.constexpr):
    """Copy bf16 ``x[k_lo:k_hi]`` (zero past K) into the shared array ``hfoq_x_smem``."""
    sym = _smem_array(_ASM_DECL_X)
    offs = tl.arange(0, ST)
    for i in range(k_lo, k_hi, ST):
        kk = i + offs
        xv = tl.load(x_row + kk, mask=(kk < K) & (kk < k_hi), other=0.0)
        bits = xv.to(tl.int16, bitcast=True).to(tl.int32)
        tl.inline_asm_elementwise("st.shared.b16 [$1], $2;\n\tmov.u32 $0, 0;", "=r,r,r",
                                  [sym + (kk - k_lo) * 2, bits], dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip
    tl.debug_barrier()


def _x_smem(off):
    """fp32 values of the bf16 activations at byte offsets ``off`` of ``hfoq_x_smem``: one 8-byte
    ``ld.shared`` per 4 consecutive elements of a thread (their first offset is 8-byte aligned)."""
    return tl.inline_asm_elementwise(_ASM_X4, "=r,=r,=r,=r,r,r,r,r", [off], dtype=tl.float32, is_pure=True,
                                     pack=4)  # fmt: skip


def _chunk_ptr(w_tile, g, q, D: tl.constexpr, NQ: tl.constexpr, PLANE_OFF: tl.constexpr,
               GW: tl.constexpr, C: tl.constexpr):  # fmt: skip
    """Address tile and group index of the chunk D chunks after chunk q of group g."""
    gg = g + (q + D) // NQ
    return w_tile + gg * GW + (PLANE_OFF + (q + D) % NQ) * C, gg


def _lut_gemv_kernel(
    x_ptr, w_ptr, lut_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_ym, ldw, lds, n_groups, n_split,
    BITS_A: tl.constexpr, BITS_B: tl.constexpr, SLOTS_A: tl.constexpr, SLOTS_B: tl.constexpr,
    MASK_A: tl.constexpr, MASK_B: tl.constexpr, C: tl.constexpr,
    SCALE_SHIFT: tl.constexpr, BSG: tl.constexpr, EVEN_K: tl.constexpr,
    LMODE: tl.constexpr, PAIR: tl.constexpr, COPIES: tl.constexpr, SH0: tl.constexpr, BIG: tl.constexpr,
    SPLIT: tl.constexpr, KMAJOR: tl.constexpr, BM: tl.constexpr, AHEAD: tl.constexpr,
    XS: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    # Tiles are [C, BN] (KMAJOR) or [BN, C]: KMAJOR only changes register layouts (which
    # one a Triton version gives the tiles without a shared-memory shuffle).  Rows of x
    # (BM <= 4) get their own accumulators: the table lookups are shared by all rows.
    BITS: tl.constexpr = BITS_A + BITS_B
    GW: tl.constexpr = BITS * C  # words per row and group
    G: tl.constexpr = 32 * C
    SUBS: tl.constexpr = BSG // C  # sub-slots per scale block (within a group)
    NENT: tl.constexpr = 256 if PAIR else (1 << BITS)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    gps = tl.cdiv(n_groups, n_split)
    g_lo = pid_k * gps
    g_hi = tl.minimum(g_lo + gps, n_groups)

    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    offs_c = tl.arange(0, C)
    rows_w = offs_n.to(tl.int64) * ldw
    rows_s = offs_n.to(tl.int64) * lds
    if KMAJOR:
        w_tile = w_ptr + rows_w[None, :] + offs_c[:, None]  # [C, BN]
        nm2 = n_mask[None, :]
        cc = offs_c[:, None]
        zero = tl.zeros([C, BN], dtype=tl.int32)
    else:
        w_tile = w_ptr + rows_w[:, None] + offs_c[None, :]  # [BN, C]
        nm2 = n_mask[:, None]
        cc = offs_c[None, :]
        zero = tl.zeros([BN, C], dtype=tl.int32)
    row0 = pid_m * BM
    x0 = x_ptr + row0.to(tl.int64) * stride_xm
    ok1 = (offs_n * 0 + row0 + 1) < M  # [BN] (see _gemv_x on scalar masks)
    ok2 = (offs_n * 0 + row0 + 2) < M
    ok3 = (offs_n * 0 + row0 + 3) < M
    if XS:  # (BM = 1, LMODE 2, the K range fits X_SMEM_VALUES)
        _x_stage(x0, g_lo * G, g_hi * G, K, 1024)
    base, base_hi = _lut_table(lut_ptr, zero, LMODE, PAIR, COPIES, NENT, BIG)

    # chunk streams (plane A: chunks 0..BITS_A-1 of each group; plane B after them)
    pa, ga = _chunk_ptr(w_tile, g_lo, 0, 0, BITS_A, 0, GW, C)
    wa = _chunk_load(pa, nm2 & ((zero + ga) < g_hi))
    if AHEAD == 2:
        pa, ga = _chunk_ptr(w_tile, g_lo, 0, 1, BITS_A, 0, GW, C)
        wa1 = _chunk_load(pa, nm2 & ((zero + ga) < g_hi))
    if BITS_B > 0:
        pb, gb = _chunk_ptr(w_tile, g_lo, 0, 0, BITS_B, BITS_A, GW, C)
        wb = _chunk_load(pb, nm2 & ((zero + gb) < g_hi))
        if AHEAD == 2:
            pb, gb = _chunk_ptr(w_tile, g_lo, 0, 1, BITS_B, BITS_A, GW, C)
            wb1 = _chunk_load(pb, nm2 & ((zero + gb) < g_hi))
    else:
        wb = wa

    acc0 = tl.zeros(zero.shape, dtype=tl.float32)
    if BM > 1:
        acc1 = tl.zeros(zero.shape, dtype=tl.float32)
    if BM > 2:
        acc2 = tl.zeros(zero.shape, dtype=tl.float32)
        acc3 = tl.zeros(zero.shape, dtype=tl.float32)
    for g in range(g_lo, g_hi):
        k0 = g * G
        for s in tl.static_range(32):
            # ---- prefetch: at the start of a chunk, load the one AHEAD chunks further on
            if s % SLOTS_A == 0:
                pa, ga = _chunk_ptr(w_tile, g, s // SLOTS_A, AHEAD, BITS_A, 0, GW, C)
                wa_new = _chunk_load(pa, nm2 & ((zero + ga) < g_hi))
            if BITS_B > 0:
                if s % SLOTS_B == 0:
                    pb, gb = _chunk_ptr(w_tile, g, s // SLOTS_B, AHEAD, BITS_B, BITS_A, GW, C)
                    wb_new = _chunk_load(pb, nm2 & ((zero + gb) < g_hi))
            # ---- codes of sub-slot s (k = k0 + s*C + t) -> table values v
            if PAIR:  # 4-bit: byte s // 2 of the word holds sub-slots s and s + 1
                if s % 2 == 0:
                    off = _code_offset(wa, (s % SLOTS_A) * BITS_A, 255, SH0) | base
                    v, v_next = _lut_pair(off, lut_ptr, LMODE, SH0)
                else:
                    v = v_next
            else:
                off = _plane_offsets(wa, wb, (s % SLOTS_A) * BITS_A, (s % SLOTS_B) * BITS_B,
                                     MASK_A, MASK_B, BITS_A, BITS_B, SH0, True) | base  # fmt: skip
                v = _lut_value(off, lut_ptr, base_hi, LMODE, SH0)
            # ---- times x, summed over the scale block, then scaled
            kk = k0 + s * C + cc
            if XS:
                p0 = v * _x_smem((kk - g_lo * G) * 2)
            else:
                p0 = v * _gemv_x(x0, kk, row0, M, K, EVEN_K, False)
            if BM > 1:
                p1 = v * _gemv_x(x0 + stride_xm, kk, row0 + 1, M, K, EVEN_K, True)
            if BM > 2:
                p2 = v * _gemv_x(x0 + 2 * stride_xm, kk, row0 + 2, M, K, EVEN_K, True)
                p3 = v * _gemv_x(x0 + 3 * stride_xm, kk, row0 + 3, M, K, EVEN_K, True)
            if s % SUBS == 0:
                b0 = p0
                if BM > 1:
                    b1 = p1
                if BM > 2:
                    b2 = p2
                    b3 = p3
            else:
                b0 += p0
                if BM > 1:
                    b1 += p1
                if BM > 2:
                    b2 += p2
                    b3 += p3
            if s % SUBS == SUBS - 1:
                # scales: a 1-D [BN] load expanded to the tile (a [1, BN]/[BN, 1] load
                # makes some Triton versions shuffle the whole block through smem)
                ks = k0 + (s + 1 - SUBS) * C
                sidx = ks >> SCALE_SHIFT
                if EVEN_K:
                    sc = tl.load(s_ptr + rows_s + sidx, mask=n_mask, other=0.0)
                else:
                    ks_ok = (tl.zeros([BN], dtype=tl.int32) + ks) < K
                    sc = tl.load(s_ptr + rows_s + sidx, mask=n_mask & ks_ok, other=0.0)
                sc = sc.to(tl.float32)
                if KMAJOR:
                    sc2 = sc[None, :]
                else:
                    sc2 = sc[:, None]
                acc0 += b0 * sc2
                if BM > 1:
                    acc1 += b1 * sc2
                if BM > 2:
                    acc2 += b2 * sc2
                    acc3 += b3 * sc2
            # ---- rotate the chunk streams at the end of a chunk
            if s % SLOTS_A == SLOTS_A - 1:
                if AHEAD == 2:
                    wa = wa1
                    wa1 = wa_new
                else:
                    wa = wa_new
            if BITS_B > 0:
                if s % SLOTS_B == SLOTS_B - 1:
                    if AHEAD == 2:
                        wb = wb1
                        wb1 = wb_new
                    else:
                        wb = wb_new

    RED: tl.constexpr = 0 if KMAJOR else 1
    y0 = tl.sum(acc0, axis=RED)
    if BM > 1:
        y1 = tl.sum(acc1, axis=RED)
    if BM > 2:
        y2 = tl.sum(acc2, axis=RED)
        y3 = tl.sum(acc3, axis=RED)
    out = y_ptr + row0.to(tl.int64) * stride_ym + offs_n
    if SPLIT:
        tile = pid_m * tl.num_programs(0) + pid_n
        part = ws_ptr + pid_k * (M * N) + row0 * N + offs_n
        tl.store(part, y0, mask=n_mask)
        if BM > 1:
            tl.store(part + N, y1, mask=n_mask & ok1)
        if BM > 2:
            tl.store(part + 2 * N, y2, mask=n_mask & ok2)
            tl.store(part + 3 * N, y3, mask=n_mask & ok3)
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if done == n_split - 1:
            for r in tl.static_range(BM):
                ok = ((offs_n * 0 + row0 + r) < M) & n_mask
                tot = tl.zeros([BN], dtype=tl.float32)
                for i in range(n_split):
                    tot += tl.load(ws_ptr + i * (M * N) + (row0 + r) * N + offs_n, mask=ok, other=0.0,
                                   cache_modifier=".cg")  # fmt: skip
                tl.store(out + r * stride_ym, tot.to(y_ptr.dtype.element_ty), mask=ok)
            tl.atomic_xchg(cnt_ptr + tile, 0)
    else:
        tl.store(out, y0.to(y_ptr.dtype.element_ty), mask=n_mask)
        if BM > 1:
            tl.store(out + stride_ym, y1.to(y_ptr.dtype.element_ty), mask=n_mask & ok1)
        if BM > 2:
            tl.store(out + 2 * stride_ym, y2.to(y_ptr.dtype.element_ty), mask=n_mask & ok2)
            tl.store(out + 3 * stride_ym, y3.to(y_ptr.dtype.element_ty), mask=n_mask & ok3)


def _lut_gemm_kernel(
    x_ptr, w_ptr, lut_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_ym, ldw, lds, n_groups, n_split, M_KEY,
    BITS_A: tl.constexpr, BITS_B: tl.constexpr, SLOTS_A: tl.constexpr, SLOTS_B: tl.constexpr,
    MASK_A: tl.constexpr, MASK_B: tl.constexpr, C: tl.constexpr,
    SCALE_SHIFT: tl.constexpr, BSG: tl.constexpr, EVEN_K: tl.constexpr,
    LMODE: tl.constexpr, SH0: tl.constexpr, SPLIT: tl.constexpr, DOT_IEEE: tl.constexpr,
    SUBDOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, J: tl.constexpr,
):  # fmt: skip
    # One K step = J consecutive sub-slots = KT = J*C consecutive values of k.  They come
    # from one chunk per plane (J divides 32/bits).
    # SUBDOT: the [BN, C] chunk words are loaded once per step, shifted by the step's
    #   position in the chunk, and each sub-slot is dequantised with compile-time shifts
    #   and multiplied by its own [BM, C] tile of x (J dots of K = C per step);
    # otherwise the [BN, KT] word tile reads each word J times (L1 hits) and shifts column
    #   p by ((s0 + p // C) % slots) * bits: one dot of K = KT per step.
    BITS: tl.constexpr = BITS_A + BITS_B
    SPG: tl.constexpr = 32 // J  # steps per group
    KT: tl.constexpr = J * C
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    pid_m = pid % num_m  # the M tiles of one N tile run together: W leaves HBM once
    pid_n = pid // num_m
    n_steps = n_groups * SPG
    sps = tl.cdiv(n_steps, n_split)
    st_lo = pid_k * sps
    st_hi = tl.minimum(st_lo + sps, n_steps)

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_p = tl.arange(0, KT)
    sub_p = offs_p // C
    x_tile = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_p[None, :]
    w_tile = w_ptr + offs_n[:, None].to(tl.int64) * ldw + (offs_p % C)[None, :]
    s_rows = s_ptr + offs_n.to(tl.int64) * lds
    base, base_hi = _lut_table(lut_ptr, tl.zeros([BN, 1], dtype=tl.int32), LMODE, False, 1, 1 << BITS, False)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if SUBDOT:
        acc = _gemm_subdot(acc, x_ptr, w_ptr, lut_ptr, s_ptr, base, base_hi, offs_m, offs_n, m_mask, n_mask,
                           st_lo, st_hi, K, stride_xm, ldw, lds, BITS_A, BITS_B, SLOTS_A, SLOTS_B, MASK_A,
                           MASK_B, C, SCALE_SHIFT, BSG, EVEN_K, LMODE, SH0, DOT_IEEE, BM, BN, J)  # fmt: skip
    else:
        for step in range(st_lo, st_hi):
            g = step // SPG
            s0 = (step % SPG) * J
            k0 = step * KT
            wg = w_tile + g * (BITS * C)
            wa = tl.load(wg + (s0 // SLOTS_A) * C, mask=n_mask[:, None], other=0)
            sh_a = ((s0 % SLOTS_A + sub_p) * BITS_A)[None, :]
            if BITS_B > 0:
                wb = tl.load(wg + (BITS_A + s0 // SLOTS_B) * C, mask=n_mask[:, None], other=0)
                sh_b = ((s0 % SLOTS_B + sub_p) * BITS_B)[None, :]
            else:
                wb = wa
                sh_b = sh_a
            off = _plane_offsets(wa, wb, sh_a, sh_b, MASK_A, MASK_B, BITS_A, BITS_B, SH0, False) | base
            lv = _lut_value(off, lut_ptr, base_hi, LMODE, SH0)
            if BSG >= KT:  # one scale per row for the whole step
                sidx = k0 >> SCALE_SHIFT
                if EVEN_K:
                    sc = tl.load(s_rows + sidx, mask=n_mask, other=0.0)
                else:
                    ks_ok = (tl.zeros([BN], dtype=tl.int32) + k0) < K
                    sc = tl.load(s_rows + sidx, mask=n_mask & ks_ok, other=0.0)
                v = lv * sc.to(tl.float32)[:, None]
            else:  # several scale blocks in the step
                kcol = k0 + offs_p
                sc = tl.load(
                    s_rows[:, None] + (kcol >> SCALE_SHIFT)[None, :],
                    mask=n_mask[:, None] & (kcol < K)[None, :], other=0.0,
                )  # fmt: skip
                v = lv * sc.to(tl.float32)
            if EVEN_K:
                xt = tl.load(x_tile + k0, mask=m_mask[:, None], other=0.0)
            else:
                xt = tl.load(x_tile + k0, mask=m_mask[:, None] & (k0 + offs_p < K)[None, :], other=0.0)
            if DOT_IEEE:  # fp32 activations, or the interpreter (its bf16 tl.dot is broken)
                vt = tl.trans(v.to(x_ptr.dtype.element_ty).to(tl.float32))
                acc = tl.dot(xt.to(tl.float32), vt, acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, tl.trans(v.to(x_ptr.dtype.element_ty)), acc)

    out = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    omask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:
        part = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part + pid_k * (M * N), acc, mask=omask)
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if done == n_split - 1:
            tot = tl.zeros([BM, BN], dtype=tl.float32)
            for i in range(n_split):
                tot += tl.load(part + i * (M * N), mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(out, tot.to(y_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(cnt_ptr + pid, 0)
    else:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=omask)


def _gemm_subdot(acc, x_ptr, w_ptr, lut_ptr, s_ptr, base, base_hi, offs_m, offs_n, m_mask, n_mask, st_lo, st_hi, K,
                 stride_xm, ldw, lds, BITS_A: tl.constexpr, BITS_B: tl.constexpr, SLOTS_A: tl.constexpr,
                 SLOTS_B: tl.constexpr, MASK_A: tl.constexpr, MASK_B: tl.constexpr, C: tl.constexpr,
                 SCALE_SHIFT: tl.constexpr, BSG: tl.constexpr, EVEN_K: tl.constexpr, LMODE: tl.constexpr,
                 SH0: tl.constexpr, DOT_IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 J: tl.constexpr):  # fmt: skip
    """The GEMM's K loop with one dot per sub-slot and compile-time shifts (``SUBDOT``)."""
    BITS: tl.constexpr = BITS_A + BITS_B
    SPG: tl.constexpr = 32 // J
    KT: tl.constexpr = J * C
    offs_c = tl.arange(0, C)
    w_tile = w_ptr + offs_n[:, None].to(tl.int64) * ldw + offs_c[None, :]  # [BN, C]
    x_tile = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_c[None, :]  # [BM, C]
    s_rows = s_ptr + offs_n.to(tl.int64) * lds
    for step in range(st_lo, st_hi):
        g = step // SPG
        s0 = (step % SPG) * J
        k0 = step * KT
        wg = w_tile + g * (BITS * C)
        # words of this step's chunk, shifted so that sub-slot s0 + kk sits at field kk
        wa = tl.load(wg + (s0 // SLOTS_A) * C, mask=n_mask[:, None], other=0) >> ((s0 % SLOTS_A) * BITS_A)
        if BITS_B > 0:
            wb = tl.load(wg + (BITS_A + s0 // SLOTS_B) * C, mask=n_mask[:, None], other=0)
            wb = wb >> ((s0 % SLOTS_B) * BITS_B)
        else:
            wb = wa
        for kk in tl.static_range(J):
            if (kk * C) % BSG == 0:  # a new scale block starts at this sub-slot
                ks = k0 + kk * C
                if EVEN_K:
                    sc = tl.load(s_rows + (ks >> SCALE_SHIFT), mask=n_mask, other=0.0)
                else:
                    ks_ok = (tl.zeros([BN], dtype=tl.int32) + ks) < K
                    sc = tl.load(s_rows + (ks >> SCALE_SHIFT), mask=n_mask & ks_ok, other=0.0)
                sc = sc.to(tl.float32)[:, None]
            off = _plane_offsets(wa, wb, kk * BITS_A, kk * BITS_B, MASK_A, MASK_B, BITS_A, BITS_B,
                                 SH0, True) | base  # fmt: skip
            v = _lut_value(off, lut_ptr, base_hi, LMODE, SH0) * sc
            kx = k0 + kk * C
            if EVEN_K:
                xt = tl.load(x_tile + kx, mask=m_mask[:, None], other=0.0)
            else:
                xt = tl.load(x_tile + kx, mask=m_mask[:, None] & (kx + offs_c < K)[None, :], other=0.0)
            if DOT_IEEE:
                vt = tl.trans(v.to(x_ptr.dtype.element_ty).to(tl.float32))
                acc = tl.dot(xt.to(tl.float32), vt, acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, tl.trans(v.to(x_ptr.dtype.element_ty)), acc)
    return acc


def _lut_dequant_kernel(
    w_ptr, lut_ptr, s_ptr, o_ptr, N, K, ldw, lds, ldo,
    BITS_A: tl.constexpr, BITS_B: tl.constexpr, SLOTS_A: tl.constexpr, SLOTS_B: tl.constexpr,
    MASK_A: tl.constexpr, MASK_B: tl.constexpr, C: tl.constexpr,
    SCALE_SHIFT: tl.constexpr, EVEN_K: tl.constexpr, LMODE: tl.constexpr, SH0: tl.constexpr,
    BN: tl.constexpr,
):  # fmt: skip
    """Dense weight ``o[n, k] = lut[code] * scale`` in o's dtype: one program = [BN, one group]."""
    BITS: tl.constexpr = BITS_A + BITS_B
    G: tl.constexpr = 32 * C
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    offs_c = tl.arange(0, C)
    wg = w_ptr + offs_n[:, None].to(tl.int64) * ldw + offs_c[None, :] + g * (BITS * C)
    o_rows = o_ptr + offs_n[:, None].to(tl.int64) * ldo
    s_rows = s_ptr + offs_n.to(tl.int64) * lds
    base, base_hi = _lut_table(lut_ptr, tl.zeros([BN, C], dtype=tl.int32), LMODE, False, 1, 1 << BITS, False)
    for s in tl.static_range(32):
        if s % SLOTS_A == 0:
            wa = tl.load(wg + (s // SLOTS_A) * C, mask=n_mask[:, None], other=0)
        if BITS_B > 0:
            if s % SLOTS_B == 0:
                wb = tl.load(wg + (BITS_A + s // SLOTS_B) * C, mask=n_mask[:, None], other=0)
        else:
            wb = wa
        off = _plane_offsets(wa, wb, (s % SLOTS_A) * BITS_A, (s % SLOTS_B) * BITS_B,
                             MASK_A, MASK_B, BITS_A, BITS_B, SH0, True) | base  # fmt: skip
        v = _lut_value(off, lut_ptr, base_hi, LMODE, SH0)
        k = g * G + s * C + offs_c
        if EVEN_K:
            sc = tl.load(s_rows + ((g * G + s * C) >> SCALE_SHIFT), mask=n_mask, other=0.0)
            tl.store(o_rows + k[None, :], (v * sc.to(tl.float32)[:, None]).to(o_ptr.dtype.element_ty),
                     mask=n_mask[:, None])  # fmt: skip
        else:
            k_ok = (tl.zeros([BN], dtype=tl.int32) + g * G + s * C) < K
            sc = tl.load(s_rows + ((g * G + s * C) >> SCALE_SHIFT), mask=n_mask & k_ok, other=0.0)
            tl.store(o_rows + k[None, :], (v * sc.to(tl.float32)[:, None]).to(o_ptr.dtype.element_ty),
                     mask=n_mask[:, None] & (k < K)[None, :])  # fmt: skip


_HELPERS = ("_code_offset", "_var_offset", "_plane_offsets", "_lut_value", "_lut_pair", "_smem_array", "_lut_table",
            "_gemv_x", "_chunk_ptr", "_chunk_load", "_x_stage", "_x_smem", "_gemm_subdot")  # fmt: skip
_PLAIN = jit_helpers(globals(), _HELPERS)  # compiled kernels resolve these module globals to JITFunctions
if HAS_TRITON:
    from triton.runtime.jit import JITFunction as _JITFunction


# --------------------------------------------------------------------------------------
# Configs, autotuning and launch
# --------------------------------------------------------------------------------------

_GEMV_KEY = ["N", "K", "n_split", "BITS_A", "BITS_B", "SCALE_SHIFT", "BM", "PAIR"]
_GEMM_KEY = ["M_KEY", "N", "K", "n_split", "BITS_A", "BITS_B", "SCALE_SHIFT"]
_MIN_BN_GEMV = 16  # smallest BN of any GEMV config (sizes the split-K counters)
_MIN_BM_GEMM, _MIN_BN_GEMM = 16, 32
#: GEMM K-loop form when not autotuning: one dot per sub-slot with compile-time shifts
#: (see the kernel); autotuning tries both forms.
GEMM_SUBDOT = True
#: GEMV programs wanted per SM before split-K stops (more programs: more loads in flight,
#: but more table set-ups and partial sums).
GEMV_PROGRAMS_PER_SM = 4
#: bf16 GEMV activations staged once per program in shared memory when its K range fits.
GEMV_X_SMEM = True
#: Fewest groups per GEMV program for the pair table: its 32 KB set-up costs more than it
#: saves on shorter K slices (H100: 4096x4096 10.1 us with it, 9.5 without; RESULTS section 5).
PAIR_MIN_GROUPS = 2


def _gemv_configs():
    return [
        triton.Config({"BN": bn, "AHEAD": ahead}, num_warps=w, num_stages=1)
        for bn, w in ((32, 4), (64, 4), (128, 4), (128, 8))
        for ahead in (1, 2)
    ]


def _prune_gemv(configs, named_args, **kwargs):
    bm = kwargs.get("BM", named_args.get("BM", 1))
    bits = kwargs.get("BITS_A", named_args.get("BITS_A", 4)) + kwargs.get("BITS_B", named_args.get("BITS_B", 0))
    keep = configs
    if bm == 4 or bits > 4:  # more registers per row (x rows, chunk streams): smaller tiles
        keep = [c for c in configs if c.kwargs["BN"] <= 64]
    return keep or configs[:1]


def _gemm_configs():
    """Tile shapes x both K-loop forms (SUBDOT): which one wins is left to the autotuner."""
    cfg = []
    # decode-sized batches (M <= 16): BM = 16
    for bn, j, w in ((32, 2, 4), (64, 4, 4), (64, 8, 4), (128, 4, 4)):
        for sub in (True, False):
            cfg.append(triton.Config({"BM": 16, "BN": bn, "J": j, "SUBDOT": sub}, num_warps=w, num_stages=2))
    # medium (<= 64) and large batches
    for bm, bn, j, w, st in (
        (32, 64, 4, 4, 2),
        (64, 64, 4, 4, 2),
        (64, 128, 4, 8, 3),
        (128, 128, 4, 4, 2),
        (128, 128, 4, 8, 3),
        (256, 128, 4, 8, 2),
    ):
        for sub in (True, False):
            cfg.append(triton.Config({"BM": bm, "BN": bn, "J": j, "SUBDOT": sub}, num_warps=w, num_stages=st))
    return cfg


def _prune_gemm(configs, named_args, **kwargs):
    m = named_args.get("M_KEY", kwargs.get("M_KEY", 16))
    slots = min(kwargs.get("SLOTS_A", named_args.get("SLOTS_A", 8)),
                kwargs.get("SLOTS_B", named_args.get("SLOTS_B", 32)))  # fmt: skip
    configs = [c for c in configs if slots % c.kwargs["J"] == 0] or configs
    if m <= 16:
        keep = [c for c in configs if c.kwargs["BM"] == 16]
    elif m <= 64:
        keep = [c for c in configs if c.kwargs["BM"] in (32, 64) and c.kwargs["BN"] <= 128]
    else:
        keep = [c for c in configs if c.kwargs["BM"] >= 64]
    return keep or configs[:1]


def _autotune(fn, configs, key, prune=None):
    params = inspect.signature(triton.autotune).parameters
    kw = {}
    if prune is not None:
        kw["prune_configs_by"] = {"early_config_prune": prune}
    if "cache_results" in params:  # tuning results join Triton's on-disk cache
        kw["cache_results"] = True
    if "do_bench" in params:

        def bench(kernel_call, quantiles=None):
            return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)

        kw["do_bench"] = bench
    else:  # older Triton
        kw["warmup"], kw["rep"] = 5, 25
    return triton.autotune(configs=configs, key=key, **kw)(fn)


_RAW = {"gemv": _lut_gemv_kernel, "gemm": _lut_gemm_kernel, "dequant": _lut_dequant_kernel}


def autotune_enabled() -> bool:
    """Autotuning is opt-in (``HF_OPTQUANT_AUTOTUNE=1``): see ``GEMV_DEFAULT``."""
    return os.environ.get("HF_OPTQUANT_AUTOTUNE", "0") == "1"


@functools.cache
def _kernels(interpret: bool, tune: bool = True):
    """``{path: kernel}`` for the interpreter or the compiler, and whether it is autotuned."""
    if interpret:
        return {name: interpreted(fn, _PLAIN) for name, fn in _RAW.items()}, False
    ks = {name: _JITFunction(fn) for name, fn in _RAW.items()}
    if not tune:
        return ks, False
    ks["gemv"] = _autotune(ks["gemv"], _gemv_configs(), _GEMV_KEY, prune=_prune_gemv)
    ks["gemm"] = _autotune(ks["gemm"], _gemm_configs(), _GEMM_KEY, prune=_prune_gemm)
    return ks, True


# Configs used unless HF_OPTQUANT_AUTOTUNE=1: the GEMV's is the best of an H100 sweep over
# the four 8B-Llama shapes (within 1-6% of each shape's best), the GEMM's the autotuner's picks
# for 4096x4096 (benchmarks/RESULTS.md section 5). Autotuning is opt-in because it costs ~100 s
# of compilation and timing per layer shape on the first calls (measured), which a user
# meets on their first generate(); tests may edit these dicts to cover other tile shapes.
GEMV_DEFAULT = {"BN": 128, "AHEAD": 2, "num_warps": 8}
GEMM_DEFAULT_SMALL = {"BM": 16, "BN": 64, "J": 8, "num_warps": 4, "num_stages": 2}
GEMM_DEFAULT_LARGE = {"BM": 64, "BN": 128, "J": 4, "SUBDOT": False, "num_warps": 8, "num_stages": 3}
DEQUANT_CONFIG = {"BN": 64, "num_warps": 4}


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _choose_split(tiles: int, n_units: int, device: torch.device, per_sm: int = 2) -> int:
    """K slices so that about ``per_sm`` programs per SM have work (decode-sized batches)."""
    if device.type != "cuda" or n_units <= 1:
        return 1
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    want = per_sm * sms
    if tiles >= want:
        return 1
    target = min(n_units, _cdiv(want, tiles), 16)
    per = _cdiv(n_units, target)  # units per slice; no empty slices
    return _cdiv(n_units, per)


_WORKSPACES: dict = {}
_SCRATCH: dict = {}


def _workspace(device: torch.device, n_part: int, n_cnt: int):
    """fp32 partials and int32 counters (kept at zero between launches) for split-K."""
    if device.type != "cuda":
        return (
            torch.empty(n_part, device=device, dtype=torch.float32),
            torch.zeros(n_cnt, device=device, dtype=torch.int32),
        )
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    ws, cnt = _WORKSPACES.get(key, (None, None))
    if ws is None or ws.numel() < n_part:
        ws = torch.empty(max(n_part, 1 << 16), device=device, dtype=torch.float32)
    if cnt is None or cnt.numel() < n_cnt:
        cnt = torch.zeros(max(n_cnt, 1 << 12), device=device, dtype=torch.int32)
    _WORKSPACES[key] = (ws, cnt)
    return ws, cnt


def _scratch(device: torch.device, dtype: torch.dtype, n: int, k: int) -> torch.Tensor:
    """Reused ``[n, k]`` buffer for the dequantised weight (one per device, stream, dtype).

    Grown to the largest layer seen; warm up before capturing CUDA graphs so that no
    allocation happens during capture.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream, dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < n * k:
        buf = torch.empty(n * k, device=device, dtype=dtype)
        _SCRATCH[key] = buf
    return buf[: n * k].view(n, k)


def _format_meta(p: PackedLutWeight, k: int) -> dict:
    """Constexprs that describe the packed format (shared by all kernels)."""
    planes = p.planes
    ba = planes[0]
    bb = planes[1] if len(planes) > 1 else 0
    g = p.group_size
    if p.n_scale_blocks == 1:
        shift, bsg = 31, g
    else:
        shift, bsg = int(math.log2(p.scale_block)), min(p.scale_block, g)
    return dict(
        BITS_A=ba,
        BITS_B=bb,
        SLOTS_A=32 // ba,
        SLOTS_B=32 // bb if bb else 1,
        MASK_A=(1 << ba) - 1,
        MASK_B=(1 << bb) - 1 if bb else 0,
        C=p.sub_k,
        SCALE_SHIFT=shift,
        BSG=bsg,
        EVEN_K=(k % g == 0),
    )


def lut_fits_fp16(lut: torch.Tensor) -> bool:
    """Whether every nonzero table value lies in fp16's normal range (relative rounding error <= 2**-11)."""
    mag = lut.abs()
    mag = mag[mag > 0]
    return bool(mag.numel() == 0 or (mag.min() >= 2.0**-14 and mag.max() <= 65504))


def _lut_fits_fp16(p: PackedLutWeight) -> bool:
    """:func:`lut_fits_fp16` of the weight's table, cached on the weight (one device sync)."""
    ok = p._launch_cache.get("lut_fits_fp16")
    if ok is None:
        ok = p._launch_cache["lut_fits_fp16"] = lut_fits_fp16(p.lut)
    return ok


def _table_meta(p: PackedLutWeight, path: str, interpret: bool, act_dtype: torch.dtype, pair_ok: bool = True) -> dict:
    """How a kernel reads the table: LMODE, pair table, copies, offset shift (see above).

    The pair table holds fp16 values, so it serves 16-bit activations only (whose own
    rounding is as coarse or coarser); fp32 activations read the fp32 single table.
    """
    aligned = p.lut.data_ptr() % (p.lut.numel() * 4) == 0
    mode = 0 if interpret else _ASM_LUT_MODE
    if path == "gemm" and not _GEMM_SMEM_LUT:
        mode = min(mode, 1)
    if mode == 1 and not aligned:
        mode = 0
    pair = (pair_ok and path == "gemv" and p.bits == 4 and _PAIR_LUT and act_dtype in (torch.bfloat16, torch.float16)
            and _lut_fits_fp16(p))  # fmt: skip
    copies = 1
    if mode == 2 and path == "gemv":
        copies = 32 if pair or p.bits >= 6 else 1
    width = 4
    sh0 = int(math.log2(copies * width))
    nent = 256 if pair else (1 << p.bits)
    return dict(LMODE=mode, PAIR=pair, COPIES=copies, SH0=sh0, BIG=nent * copies * width > 1024)


@functools.lru_cache(maxsize=1)
def _gemv_kmajor() -> bool:
    """Tile orientation of the GEMV whose loads and lookups need no layout shuffle.

    Triton's coalescing pass orders the dims of a load without known contiguity (the
    gather) one way up to 3.6 and the other way from 3.7 on (checked on 3.6 and 3.9).
    """
    env = os.environ.get("HF_OPTQUANT_GEMV_KMAJOR")
    if env is not None:
        return env == "1"
    try:
        major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    except Exception:
        return False
    return (major, minor) < (3, 7)


def _use_triton(x: torch.Tensor) -> bool:
    if not HAS_TRITON:
        return False
    if x.is_cuda:
        return True
    return _interpret_mode()


# ---- launch records (eager calls skip the autotuner and Triton's argument binding)


@dataclasses.dataclass
class _Launch:
    """A compiled kernel, its grid and its full argument list (runtime slots refilled)."""

    kernel: object
    grid: tuple
    args: list
    slots: tuple  # positions of x, y, ws, cnt in ``args``
    split: int
    n_part: int
    n_cnt: int


_FAST_LAUNCH = os.environ.get("HF_OPTQUANT_FAST_LAUNCH", "1") == "1"
_FAST_CHECKED: dict = {}  # kernel name -> True (matched the normal launch) / False (disabled)
#: Arguments that change from call to call (refilled in a launch record), per kernel.
_SLOT_NAMES = {"gemv": ("x_ptr", "y_ptr", "ws_ptr", "cnt_ptr"), "gemm": ("x_ptr", "y_ptr", "ws_ptr", "cnt_ptr"),
               "dequant": ("o_ptr",)}  # fmt: skip


@functools.cache
def _param_names(path: str) -> tuple:
    return tuple(inspect.signature(_RAW[path]).parameters)


def _launcher_ok() -> bool:
    """Direct launches skip Triton's launch hooks: only when none is installed (None in
    Triton 3.6, an empty HookChain in later versions)."""
    knobs = getattr(triton, "knobs", None)
    if not _FAST_LAUNCH or knobs is None:
        return False
    rt = knobs.runtime

    def idle(hook) -> bool:
        return hook is None or (hasattr(hook, "calls") and not hook.calls)

    return idle(getattr(rt, "launch_enter_hook", None)) and idle(getattr(rt, "launch_exit_hook", None))


def _record(kernel, compiled, path: str, runtime: dict, meta: dict, grid_fn, split, n_part, n_cnt):
    """Launch record for the config the (autotuned) kernel just ran, or None."""
    if compiled is None or not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
        return None
    cfg = getattr(kernel, "best_config", None)
    allargs = dict(runtime)
    allargs.update(meta)
    if cfg is not None:
        allargs.update(cfg.kwargs)
    names = _param_names(path)
    if any(n not in allargs for n in names):
        return None
    args = [allargs[n] for n in names]
    slots = tuple(names.index(n) for n in _SLOT_NAMES[path])
    for pos in slots:  # refilled per call; do not keep this call's tensors alive
        args[pos] = None
    return _Launch(compiled, tuple(grid_fn(allargs)), args, slots, split, n_part, n_cnt)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _current_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _fast_run(rec: _Launch, device: torch.device, tensors: tuple) -> None:
    """Launch ``rec`` with the call's tensors in their slots (Triton's own launcher)."""
    args = list(rec.args)
    for pos, t in zip(rec.slots, tensors):
        args[pos] = t
    k = rec.kernel
    stream = _current_stream(device)
    g = rec.grid + (1,) * (3 - len(rec.grid))
    k.run(g[0], g[1], g[2], stream, k.function, k.packed_metadata, None, None, None, *args)


def _knob_state() -> tuple:
    return (_ASM_LUT_MODE, _PAIR_LUT, _GEMM_SMEM_LUT, GEMV_PROGRAMS_PER_SM, GEMM_SUBDOT, _gemv_kmajor(),
            GEMV_X_SMEM)  # fmt: skip


def _prepare(path: str, x2: torch.Tensor, packed: PackedLutWeight, split_k, config, interpret: bool):
    """Kernel, grid function, runtime args, constexprs and split-K sizes of one call."""
    m, k, n = x2.shape[0], packed.in_features, packed.out_features
    ks, tuned = _kernels(interpret, autotune_enabled())
    meta = _format_meta(packed, k)
    n_groups = packed.n_groups
    if config is not None:  # a forced config bypasses the autotuner (it refuses tuned names as arguments)
        cfg, tuned = dict(config), False
        ks = _kernels(interpret, False)[0]
    elif path == "gemv":
        cfg = {} if tuned else dict(GEMV_DEFAULT)
    else:
        cfg = {} if tuned else dict(GEMM_DEFAULT_SMALL if m <= 16 else GEMM_DEFAULT_LARGE)
        if "J" in cfg:  # a K step must not straddle chunks: J divides the sub-slots per chunk
            cfg["J"] = math.gcd(cfg["J"], meta["SLOTS_A"], meta["SLOTS_B"] if meta["BITS_B"] else 32)
    if path == "gemv":
        bm = 1 if m == 1 else (2 if m == 2 else 4)
        m_tiles = _cdiv(m, bm)
        split = split_k or _choose_split(m_tiles * _cdiv(n, 64), n_groups, x2.device, GEMV_PROGRAMS_PER_SM)
        split = max(1, min(split, n_groups))
        n_cnt = m_tiles * _cdiv(n, _MIN_BN_GEMV)
        per_program = _cdiv(n_groups, split)  # groups of K each program covers
        meta.update(SPLIT=split > 1, KMAJOR=_gemv_kmajor(), BM=bm)
        # (the pair table's set-up is not amortised over fewer than PAIR_MIN_GROUPS groups)
        meta.update(_table_meta(packed, path, interpret, x2.dtype, pair_ok=per_program >= PAIR_MIN_GROUPS))
        xs_fits = (bm == 1 and meta["LMODE"] == 2 and x2.dtype == torch.bfloat16
                   and per_program * packed.group_size <= X_SMEM_VALUES)  # fmt: skip
        meta.update(XS=GEMV_X_SMEM and xs_fits)
        for name in ("COPIES", "SH0", "BIG", "PAIR", "LMODE"):
            if name in cfg:  # experiments may force the table variant
                meta[name] = cfg.pop(name)
        if "XS" in cfg:  # (only where the K range fits the shared array)
            meta["XS"] = bool(cfg.pop("XS")) and xs_fits

        def grid(a):
            return (_cdiv(n, a["BN"]), m_tiles, split)

    else:
        tmeta = _table_meta(packed, path, interpret, x2.dtype)
        meta.update(LMODE=tmeta["LMODE"], SH0=tmeta["SH0"])
        m_tiles = _cdiv(m, 16 if m <= 16 else 64)
        split = split_k or _choose_split(m_tiles * _cdiv(n, 64), n_groups, x2.device)
        split = max(1, min(split, n_groups * 8))  # (an empty slice adds a zero partial)
        n_cnt = _cdiv(m, _MIN_BM_GEMM) * _cdiv(n, _MIN_BN_GEMM)
        meta.update(SPLIT=split > 1, DOT_IEEE=x2.dtype == torch.float32 or interpret)
        if not tuned:  # (tuned: SUBDOT is part of each autotuning config)
            meta["SUBDOT"] = cfg.pop("SUBDOT", GEMM_SUBDOT)

        def grid(a):
            return (_cdiv(m, a["BM"]) * _cdiv(n, a["BN"]), split)

    runtime = dict(
        x_ptr=x2, w_ptr=packed.qweight, lut_ptr=packed.lut, s_ptr=packed.scales, M=m, N=n, K=k,
        stride_xm=x2.stride(0), ldw=packed.qweight.stride(0), lds=packed.scales.stride(0),
        n_groups=n_groups, n_split=split,
    )  # fmt: skip
    if path == "gemm":
        runtime["M_KEY"] = min(256, 1 << max(0, (m - 1).bit_length()))
    return ks[path], tuned, cfg, grid, runtime, meta, split, split * m * n, n_cnt


def _run_fused(path, x2, packed, split_k, config, interpret):
    m, n = x2.shape[0], packed.out_features
    fast = not interpret and config is None and _FAST_CHECKED.get(path) is not False and _launcher_ok()
    key = (path, m, x2.dtype, x2.stride(0), x2.data_ptr() % 16 == 0, split_k, x2.device.index, _knob_state())
    rec = packed._launch_cache.get(key) if fast else None
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    if rec is not None and _FAST_CHECKED.get(path):
        ws, cnt = _workspace(x2.device, rec.n_part, rec.n_cnt) if rec.split > 1 else (y, y)
        _fast_run(rec, x2.device, (x2, y, ws, cnt))
        return y
    kern, tuned, cfg, grid, runtime, meta, split, n_part, n_cnt = _prepare(path, x2, packed, split_k, config,
                                                                           interpret)  # fmt: skip
    ws, cnt = _workspace(x2.device, n_part, n_cnt) if split > 1 else (y, y)
    runtime.update(y_ptr=y, ws_ptr=ws, cnt_ptr=cnt, stride_ym=y.stride(0))
    names = [nm for nm in _param_names(path) if nm in runtime]
    try:
        compiled = kern[lambda a: grid({**a, **cfg})](*(runtime[nm] for nm in names), **meta, **cfg)
    except RuntimeError:
        if not (path == "gemm" and meta.get("LMODE") == 2):
            raise
        global _GEMM_SMEM_LUT
        _GEMM_SMEM_LUT = False  # see its comment; the retry reads the table from global memory
        return _run_fused(path, x2, packed, split_k, config, interpret)
    if fast and rec is None:
        rec = _record(kern, compiled, path, runtime, {**meta, **cfg}, grid, split, n_part, n_cnt)
        if rec is not None and _check_fast(path, rec, x2, y, split, n_part, n_cnt):
            packed._launch_cache[key] = rec
    return y


def _check_fast(path, rec, x2, y, split, n_part, n_cnt) -> bool:
    """First use of the direct launch for a kernel: it must reproduce the normal launch."""
    state = _FAST_CHECKED.get(path)
    if state is not None:
        return state
    if _capturing(x2.device):
        return False
    y2 = torch.empty_like(y)
    ws, cnt = _workspace(x2.device, n_part, n_cnt) if split > 1 else (y2, y2)
    try:
        _fast_run(rec, x2.device, (x2, y2, ws, cnt))
        ok = bool(torch.equal(y, y2))
    except Exception:  # pragma: no cover - launcher API of another Triton version
        ok = False
    _FAST_CHECKED[path] = ok
    return ok


def _run_dequant(x2: torch.Tensor, packed: PackedLutWeight, interpret: bool) -> torch.Tensor:
    """Dense weight in x's dtype into the reused scratch buffer, then cuBLAS."""
    n, k = packed.out_features, packed.in_features
    w = _scratch(x2.device, x2.dtype, n, k)
    fast = not interpret and _FAST_CHECKED.get("dequant") is not False and _launcher_ok()
    key = ("dequant", x2.dtype, x2.device.index, w.data_ptr(), _knob_state())
    rec = packed._launch_cache.get(key) if fast else None
    if rec is not None and _FAST_CHECKED.get("dequant"):
        _fast_run(rec, x2.device, (w,))
    else:
        ks, _ = _kernels(interpret, False)
        meta = _format_meta(packed, k)
        tmeta = _table_meta(packed, "dequant", interpret, w.dtype)
        meta.update(LMODE=tmeta["LMODE"], SH0=tmeta["SH0"])
        meta = {name: v for name, v in meta.items() if name in _param_names("dequant")}  # (no BSG: one group)
        cfg = dict(DEQUANT_CONFIG)
        runtime = dict(w_ptr=packed.qweight, lut_ptr=packed.lut, s_ptr=packed.scales, o_ptr=w, N=n, K=k,
                       ldw=packed.qweight.stride(0), lds=packed.scales.stride(0), ldo=w.stride(0))  # fmt: skip

        def grid(a):
            return (_cdiv(n, a["BN"]), packed.n_groups)

        names = [nm for nm in _param_names("dequant") if nm in runtime]
        compiled = ks["dequant"][lambda a: grid({**a, **cfg})](*(runtime[nm] for nm in names), **meta, **cfg)
        if fast and rec is None:
            rec = _record(ks["dequant"], compiled, "dequant", runtime, {**meta, **cfg}, grid, 1, 0, 0)
            if rec is not None:
                if _FAST_CHECKED.get("dequant") is None and not _capturing(x2.device):
                    ref = w.clone()
                    w.zero_()
                    try:
                        _fast_run(rec, x2.device, (w,))
                        _FAST_CHECKED["dequant"] = bool(torch.equal(ref, w))
                    except Exception:  # pragma: no cover
                        _FAST_CHECKED["dequant"] = False
                    w.copy_(ref)
                if _FAST_CHECKED.get("dequant"):
                    packed._launch_cache[key] = rec
    return torch.matmul(x2, w.t())


def lut_linear(
    x: torch.Tensor,
    packed: PackedLutWeight,
    *,
    path: str | None = None,
    split_k: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``y = x @ W.T`` for a packed LUT weight; ``x`` is ``[..., K]`` in bf16/fp16/fp32.

    ``path`` forces ``"gemv"`` (CUDA-core kernel; any M, 1/2/4 rows per program),
    ``"gemm"`` (``tl.dot`` kernel), ``"dequant"`` (dequantise to a scratch buffer +
    cuBLAS) or ``"torch"`` (dequantise + matmul in torch); by default M <= GEMV_MAX_M uses
    the GEMV, M >= DEQUANT_MIN_M (on CUDA) the dequant path and other M the GEMM.
    ``split_k`` overrides the split-K heuristic (number of K slices); ``config`` forces a
    kernel config (tile sizes, ``num_warps``, table variant) instead of autotuning.
    """
    k, n = packed.in_features, packed.out_features
    x2, lead = linear_input(x, k, ("gemv", "gemm", "dequant", "torch"), path)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    if path == "torch" or not _use_triton(x2):
        w = dequantize_packed(packed).to(x2.device)
        y = (x2.to(torch.float32) @ w.T).to(x.dtype)
        return y.reshape(*lead, n)
    if packed.device != x2.device:
        raise ValueError(f"packed weight is on {packed.device}, x on {x2.device}")
    interpret = not x2.is_cuda or _interpret_mode()
    if path is None:
        if m <= GEMV_MAX_M:
            path = "gemv"
        elif DEQUANT_MIN_M is not None and m >= DEQUANT_MIN_M and not interpret:
            path = "dequant"
        else:
            path = "gemm"
    if path == "dequant":
        y = _run_dequant(x2, packed, interpret)
    else:
        y = _run_fused(path, x2, packed, split_k, config, interpret)
    return y.reshape(*lead, n)
