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
extra load and an OR.

Kernels
-------
* ``_lut_gemv_kernel`` (decode; used for M == 1, see ``GEMV_MAX_M``): CUDA-core FMAs; one
  program owns ``BN`` rows and a slice of the groups; the 32 sub-slots of a group are
  unrolled with compile-time shifts; x times lut[code] is summed over a scale block and
  scaled once.  The LUT is copied into a small ``.shared`` array (inline PTX) and read with
  ``ld.shared`` at ``base | code << 2`` -- per code: SHF + LOP3 + LDS + FFMA (~5.6 SASS
  instructions per code in all on sm_90, vs ~6.8 with ``tl.load(lut_ptr + code)``).
* ``_lut_gemm_kernel`` (M > 1): per K step of ``KT = J*C`` codes it dequantises a
  ``[BN, KT]`` tile (``lut[code] * scale`` rounded to the activation dtype; each word read
  J times, with a per-column shift, so the tile is in natural k order) and feeds
  ``tl.dot`` (wgmma / mma) against the ``[BM, KT]`` tile of x.  LUT reads are inline-PTX
  ``ld.global.nc``, opaque to Triton's pipeliner (which otherwise turns the gather into
  4-byte cp.async copies: 5-25x slower), while the x and word tiles are pipelined.
* Split-K (decode shapes with few output tiles): fp32 partials in a cached workspace and
  a per-tile counter; the CTA that finishes a tile last sums the partials in fixed order
  (deterministic) and resets the counter -- one launch, no memset, no cast kernel.

On CPU the kernels run under Triton's interpreter when ``TRITON_INTERPRET=1``; without
it (or without Triton) :func:`lut_linear` falls back to the torch reference.
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

from .reference import dequantize_reference

try:  # Triton is optional
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "PackedLutWeight",
    "pack_lut_weight",
    "unpack_lut_weight",
    "dequantize_packed",
    "lut_linear",
    "GEMV_MAX_M",
]

#: Sub-slot width C (codes per contiguous k-run, words per chunk); group = 32 * C codes.
SUB_K = 16
#: Largest batch (rows of x) served by the CUDA-core GEMV kernel by default (larger
#: batches use the tl.dot kernel; the GEMV's multi-row [BM, BN, C] variant measured slower).
GEMV_MAX_M = 1
#: Tests set this to exercise the plain ``lut_ptr + code`` lookup path.
_NO_LUT_OR = False
#: LUT lookups on GPUs: 2 = table copied to a shared-memory array (inline PTX ld.shared;
#: GEMV only), 1 = inline PTX ld.global.nc, 0 = tl.load (the interpreter always uses 0).
_ASM_LUT_MODE = int(os.environ.get("HF_OPTQUANT_LUT_MODE", "2"))

_PLANES = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 8: (8,)}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class PackedLutWeight:
    """Kernel-ready form of a LUT-quantised ``[N, K]`` weight (layout: module docstring).

    ``scales`` has shape ``[N, ceil(K / scale_block)]``; ``scale_block`` equals
    ``block_size`` except for a block size that is not a power of two (other than
    per-channel), whose scales are repeated to the largest power of two dividing it.
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
# Triton kernels.  They are plain functions, jitted lazily (see ``_kernels``) so that the
# interpreter-or-compiler choice follows TRITON_INTERPRET at call time, not import time;
# hence no @triton.jit helpers: shared pieces are written out in each kernel.
#
# LUT lookups: the table is aligned to its own size, so &lut[code] is its base OR-ed with
# ``code << 2``: the code is shifted straight into a byte offset and OR-ed in (SHF + LOP3
# per code).  ASM_LUT=2: base = a shared-memory copy (32-bit address, ld.shared);
# ASM_LUT=1: the global table, ``hi32(lut) : (lo32(lut) | code << 2)`` and ld.global.nc;
# ASM_LUT=0 (interpreter): tl.load, through the same OR (LUT_OR) or ``lut_ptr + code``.
#
# Split-K (SPLIT): each K-slice stores fp32 partials to a workspace, then bumps a
# per-tile counter (acq_rel, after a CTA barrier); the CTA that arrives last sums the
# partials in a fixed order (deterministic), writes y in its dtype and resets the
# counter to zero for the next launch -- one launch, no memset, no cast kernel.
# --------------------------------------------------------------------------------------


def _lut_gemv_kernel(
    x_ptr, w_ptr, lut_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_ym, ldw, lds, n_groups, n_split,
    BITS_A: tl.constexpr, BITS_B: tl.constexpr, SLOTS_A: tl.constexpr, SLOTS_B: tl.constexpr,
    MASK_A: tl.constexpr, MASK_B: tl.constexpr, C: tl.constexpr,
    SCALE_SHIFT: tl.constexpr, BSG: tl.constexpr, EVEN_K: tl.constexpr,
    LUT_OR: tl.constexpr, ASM_LUT: tl.constexpr, SPLIT: tl.constexpr, KMAJOR: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    # Tiles are [BN, C] (KMAJOR=False) or [C, BN] (KMAJOR=True); BM > 1 adds a leading M
    # axis: [BM, BN, C].  KMAJOR only changes register layouts (which one a Triton
    # version gives the LUT gather without a shared-memory shuffle), not the arithmetic.
    BITS: tl.constexpr = BITS_A + BITS_B
    G: tl.constexpr = 32 * C
    SUBS: tl.constexpr = BSG // C  # sub-slots per scale block (within a group)
    POS_B: tl.constexpr = BITS_A + 2  # bit position of plane B in a LUT byte offset
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    gps = tl.cdiv(n_groups, n_split)
    g_lo = pid_k * gps
    g_hi = tl.minimum(g_lo + gps, n_groups)

    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    offs_c = tl.arange(0, C)
    rows_w = offs_n.to(tl.int64) * ldw
    rows_s = offs_n.to(tl.int64) * lds
    if BM > 1 or not KMAJOR:
        w_tile = w_ptr + rows_w[:, None] + offs_c[None, :]  # [BN, C]
        nm2 = n_mask[:, None]
        cc = offs_c[None, :]  # [1, C]
    else:
        w_tile = w_ptr + rows_w[None, :] + offs_c[:, None]  # [C, BN]
        nm2 = n_mask[None, :]
        cc = offs_c[:, None]  # [C, 1]
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm  # BM == 1
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # BM > 1
    if ASM_LUT == 2:  # copy the table to shared memory (a .shared array of our own)
        li = tl.arange(0, 1 << BITS)
        lvals = tl.load(lut_ptr + li)
        decl = tl.inline_asm_elementwise(
            ".shared .align 1024 .b8 hfoq_lut_smem[1024];\n\tmov.u32 $0, hfoq_lut_smem;",
            "=r,r", [tl.full([1], 0, tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip
        base_lo = tl.sum(decl, 0)
        tl.inline_asm_elementwise(
            "st.shared.f32 [$1], $2;\n\tmov.u32 $0, 0;", "=r,r,f", [base_lo + li * 4, lvals],
            dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip
        tl.debug_barrier()
    elif LUT_OR:
        lut_i = lut_ptr.to(tl.int64)
        base_lo = (lut_i & 0xFFFFFFFF).to(tl.int32)
        base_hi = lut_i & -4294967296

    if BM == 1:
        if KMAJOR:
            acc = tl.zeros([C, BN], dtype=tl.float32)
        else:
            acc = tl.zeros([BN, C], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN, C], dtype=tl.float32)
    for g in range(g_lo, g_hi):
        wg = w_tile + g * (BITS * C)
        k0 = g * G
        for s in tl.static_range(32):
            # ---- codes of sub-slot s (k = k0 + s*C + t) -> lut values v
            if s % SLOTS_A == 0:
                wa = tl.load(wg + (s // SLOTS_A) * C, mask=nm2, other=0, eviction_policy="evict_first")
            if BITS_B > 0:
                if s % SLOTS_B == 0:
                    wb = tl.load(
                        wg + (BITS_A + s // SLOTS_B) * C, mask=nm2, other=0,
                        eviction_policy="evict_first",
                    )  # fmt: skip
            sa = (s % SLOTS_A) * BITS_A  # compile-time shifts
            sb = (s % SLOTS_B) * BITS_B
            if LUT_OR:
                if sa >= 2:
                    off = (wa >> (sa - 2)) & (MASK_A << 2)
                else:
                    off = (wa << (2 - sa)) & (MASK_A << 2)
                if BITS_B > 0:
                    if sb >= POS_B:
                        off = off | ((wb >> (sb - POS_B)) & (MASK_B << POS_B))
                    else:
                        off = off | ((wb << (POS_B - sb)) & (MASK_B << POS_B))
                if ASM_LUT == 2:  # shared-memory table: OR the byte offset into its address
                    v = tl.inline_asm_elementwise(
                        "ld.shared.f32 $0, [$1];", "=r,r", [off | base_lo],
                        dtype=tl.float32, is_pure=True, pack=1,
                    )  # fmt: skip
                else:
                    addr = (off | base_lo).to(tl.uint32, bitcast=True).to(tl.int64) | base_hi
                    if ASM_LUT == 1:  # opaque to pipeliner / coalescer: one plain LDG per code
                        v = tl.inline_asm_elementwise(
                            "ld.global.nc.f32 $0, [$1];", "=r,l", [addr],
                            dtype=tl.float32, is_pure=True, pack=1,
                        )  # fmt: skip
                    else:
                        v = tl.load(addr.to(tl.pointer_type(tl.float32)))
            else:
                code = (wa >> sa) & MASK_A
                if BITS_B > 0:
                    code = code | (((wb >> sb) & MASK_B) << BITS_A)
                v = tl.load(lut_ptr + code)
            # ---- times x, summed over the scale block, then scaled
            if BM == 1:  # x as a [1, C] / [C, 1] tile: broadcasts in the layout of v
                kk = k0 + s * C + cc
                if EVEN_K:
                    xv = tl.load(x_row + kk)
                else:
                    xv = tl.load(x_row + kk, mask=kk < K, other=0.0)
                prod = v * xv.to(tl.float32)
            else:
                kk = k0 + s * C + offs_c
                if EVEN_K:
                    xv = tl.load(x_rows + kk[None, :], mask=m_mask[:, None], other=0.0)
                else:
                    xv = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & (kk[None, :] < K), other=0.0)
                prod = v[None, :, :] * xv.to(tl.float32)[:, None, :]
            if s % SUBS == 0:
                blk = prod
            else:
                blk += prod
            if s % SUBS == SUBS - 1:
                ks = k0 + (s + 1 - SUBS) * C
                # scales: a 1-D [BN] load expanded to the tile (a [1, BN]/[BN, 1] load
                # makes some Triton versions shuffle the whole block through smem)
                sidx = ks >> SCALE_SHIFT
                if EVEN_K:
                    sc = tl.load(s_ptr + rows_s + sidx, mask=n_mask, other=0.0)
                else:
                    ks_ok = (tl.zeros([BN], dtype=tl.int32) + ks) < K
                    sc = tl.load(s_ptr + rows_s + sidx, mask=n_mask & ks_ok, other=0.0)
                sc = sc.to(tl.float32)
                if BM > 1:
                    acc += blk * sc[None, :, None]
                elif KMAJOR:
                    acc += blk * sc[None, :]
                else:
                    acc += blk * sc[:, None]
    if BM == 1:
        if KMAJOR:
            y = tl.sum(acc, axis=0)[None, :]
        else:
            y = tl.sum(acc, axis=1)[None, :]
    else:
        y = tl.sum(acc, axis=2)

    out = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    omask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:
        tile = pid_m * tl.num_programs(0) + pid_n
        part = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part + pid_k * (M * N), y, mask=omask)
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if done == n_split - 1:
            tot = tl.zeros([BM, BN], dtype=tl.float32)
            for i in range(n_split):
                tot += tl.load(part + i * (M * N), mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(out, tot.to(y_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(cnt_ptr + tile, 0)
    else:
        tl.store(out, y.to(y_ptr.dtype.element_ty), mask=omask)


def _lut_gemm_kernel(
    x_ptr, w_ptr, lut_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_ym, ldw, lds, n_groups, n_split, M_KEY,
    BITS_A: tl.constexpr, BITS_B: tl.constexpr, SLOTS_A: tl.constexpr, SLOTS_B: tl.constexpr,
    MASK_A: tl.constexpr, MASK_B: tl.constexpr, C: tl.constexpr,
    SCALE_SHIFT: tl.constexpr, BSG: tl.constexpr, EVEN_K: tl.constexpr,
    LUT_OR: tl.constexpr, ASM_LUT: tl.constexpr, SPLIT: tl.constexpr, DOT_IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, J: tl.constexpr,
):  # fmt: skip
    # One K step = J consecutive sub-slots = KT = J*C consecutive values of k.  They come
    # from one chunk per plane (J divides 32/bits), so the [BN, KT] word tile reads each
    # word J times (L1 hits) and shifts column p by ((s0 + p // C) % slots) * bits: the
    # dequantised tile is then in natural k order and meets a plain [BM, KT] tile of x.
    BITS: tl.constexpr = BITS_A + BITS_B
    SPG: tl.constexpr = 32 // J  # steps per group
    KT: tl.constexpr = J * C
    POS_B: tl.constexpr = BITS_A + 2
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
    if ASM_LUT == 2:  # copy the table to shared memory (a .shared array of our own)
        li = tl.arange(0, 1 << BITS)
        lvals = tl.load(lut_ptr + li)
        decl = tl.inline_asm_elementwise(
            ".shared .align 1024 .b8 hfoq_lut_smem[1024];\n\tmov.u32 $0, hfoq_lut_smem;",
            "=r,r", [tl.full([1], 0, tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip
        base_lo = tl.sum(decl, 0)
        tl.inline_asm_elementwise(
            "st.shared.f32 [$1], $2;\n\tmov.u32 $0, 0;", "=r,r,f", [base_lo + li * 4, lvals],
            dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip
        tl.debug_barrier()
    elif LUT_OR:
        lut_i = lut_ptr.to(tl.int64)
        base_lo = (lut_i & 0xFFFFFFFF).to(tl.int32)
        base_hi = lut_i & -4294967296
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for step in range(st_lo, st_hi):
        g = step // SPG
        s0 = (step % SPG) * J
        k0 = step * KT
        wg = w_tile + g * (BITS * C)
        wa = tl.load(wg + (s0 // SLOTS_A) * C, mask=n_mask[:, None], other=0)
        sh_a = (s0 % SLOTS_A + sub_p) * BITS_A
        if BITS_B > 0:
            wb = tl.load(wg + (BITS_A + s0 // SLOTS_B) * C, mask=n_mask[:, None], other=0)
            sh_b = (s0 % SLOTS_B + sub_p) * BITS_B
        if LUT_OR:
            off = ((wa >> sh_a[None, :]) & MASK_A) << 2
            if BITS_B > 0:
                off = off | (((wb >> sh_b[None, :]) & MASK_B) << POS_B)
            if ASM_LUT == 2:  # shared-memory table
                lv = tl.inline_asm_elementwise(
                    "ld.shared.f32 $0, [$1];", "=r,r", [off | base_lo],
                    dtype=tl.float32, is_pure=True, pack=1,
                )  # fmt: skip
            else:
                addr = (off | base_lo).to(tl.uint32, bitcast=True).to(tl.int64) | base_hi
                if ASM_LUT == 1:  # opaque to the pipeliner: not turned into 4-byte cp.async
                    lv = tl.inline_asm_elementwise(
                        "ld.global.nc.f32 $0, [$1];", "=r,l", [addr],
                        dtype=tl.float32, is_pure=True, pack=1,
                    )  # fmt: skip
                else:
                    lv = tl.load(addr.to(tl.pointer_type(tl.float32)))
        else:
            code = (wa >> sh_a[None, :]) & MASK_A
            if BITS_B > 0:
                code = code | (((wb >> sh_b[None, :]) & MASK_B) << BITS_A)
            lv = tl.load(lut_ptr + code)
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


# --------------------------------------------------------------------------------------
# Configs, autotuning and launch
# --------------------------------------------------------------------------------------

_GEMV_KEY = ["N", "K", "n_split", "BITS_A", "BITS_B", "SCALE_SHIFT", "BM"]
_GEMM_KEY = ["M_KEY", "N", "K", "n_split", "BITS_A", "BITS_B", "SCALE_SHIFT"]
_MIN_BN_GEMV = 16  # smallest BN of any GEMV config (sizes the split-K counters)
_MIN_BM_GEMM, _MIN_BN_GEMM = 16, 32


def _gemv_configs():
    return [
        triton.Config({"BN": bn}, num_warps=w, num_stages=1)
        for bn, w in ((16, 4), (32, 4), (64, 4), (128, 4), (128, 8), (256, 8))
    ]


def _prune_gemv(configs, named_args, **kwargs):
    bm = kwargs.get("BM", named_args.get("BM", 1))
    if bm == 1:
        keep = [c for c in configs if c.kwargs["BN"] >= 32]
    elif bm == 2:  # the [BM, BN, C] accumulators get large: small tiles only (no spills)
        keep = [c for c in configs if c.kwargs["BN"] <= 32]
    else:
        keep = [c for c in configs if c.kwargs["BN"] <= 16]
    return keep or configs[:1]


def _gemm_configs():
    cfg = []
    # decode-sized batches (M <= 16): BM = 16
    for bn, j, w in ((32, 2, 4), (64, 2, 4), (64, 4, 4), (128, 4, 4)):
        cfg.append(triton.Config({"BM": 16, "BN": bn, "J": j}, num_warps=w, num_stages=2))
    # medium (<= 64) and large batches
    for bm, bn, j, w, st in (
        (32, 64, 4, 4, 2),
        (64, 64, 4, 4, 2),
        (64, 128, 4, 8, 3),
        (128, 64, 4, 4, 2),
        (128, 128, 4, 8, 2),
        (128, 128, 4, 8, 3),
    ):
        cfg.append(triton.Config({"BM": bm, "BN": bn, "J": j}, num_warps=w, num_stages=st))
    return cfg


def _prune_gemm(configs, named_args, **kwargs):
    m = named_args.get("M_KEY", kwargs.get("M_KEY", 16))
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


@functools.cache
def _kernels(interpret: bool, tune: bool = True):
    """``(gemv, gemm, tuned)``: kernel objects for the interpreter or the compiler."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_lut_gemv_kernel), InterpretedFunction(_lut_gemm_kernel), False
    gemv = triton.jit(_lut_gemv_kernel)
    gemm = triton.jit(_lut_gemm_kernel)
    if not tune:
        return gemv, gemm, False
    gemv = _autotune(gemv, _gemv_configs(), _GEMV_KEY, prune=_prune_gemv)
    gemm = _autotune(gemm, _gemm_configs(), _GEMM_KEY, prune=_prune_gemm)
    return gemv, gemm, True


# Configs used when not autotuning (interpreter, HF_OPTQUANT_NO_AUTOTUNE=1); tests may
# edit these dicts to cover other tile shapes.
GEMV_DEFAULT = {"BN": 64, "num_warps": 4}
GEMM_DEFAULT_SMALL = {"BM": 16, "BN": 64, "J": 2, "num_warps": 4}
GEMM_DEFAULT_LARGE = {"BM": 64, "BN": 64, "J": 4, "num_warps": 4}


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _choose_split(tiles: int, n_units: int, device: torch.device) -> int:
    """K slices so that about 2 CTAs per SM have work (decode-sized batches)."""
    if device.type != "cuda" or n_units <= 1:
        return 1
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    want = 2 * sms
    if tiles >= want:
        return 1
    target = min(n_units, _cdiv(want, tiles), 16)
    per = _cdiv(n_units, target)  # units per slice; no empty slices
    return _cdiv(n_units, per)


_WORKSPACES: dict = {}


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


def _kernel_meta(p: PackedLutWeight, k: int, interpret: bool) -> dict:
    planes = p.planes
    ba = planes[0]
    bb = planes[1] if len(planes) > 1 else 0
    g = p.group_size
    if p.n_scale_blocks == 1:
        shift, bsg = 31, g
    else:
        shift, bsg = int(math.log2(p.scale_block)), min(p.scale_block, g)
    lut_bytes = p.lut.numel() * 4
    lut_or = p.lut.data_ptr() % lut_bytes == 0 and not _NO_LUT_OR
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
        LUT_OR=lut_or,
        ASM_LUT=0 if (interpret or not lut_or) else _ASM_LUT_MODE,
    )


@functools.lru_cache(maxsize=1)
def _gemv_kmajor() -> bool:
    """Tile orientation of the M=1 GEMV whose LUT gather needs no layout shuffle.

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


def lut_linear(
    x: torch.Tensor,
    packed: PackedLutWeight,
    *,
    path: str | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """``y = x @ W.T`` for a packed LUT weight; ``x`` is ``[..., K]`` in bf16/fp16/fp32.

    ``path`` forces ``"gemv"`` (CUDA-core kernel; any M, tiles of <= 4 rows), ``"gemm"``
    (``tl.dot`` kernel) or ``"torch"`` (dequantise + matmul); by default M <= GEMV_MAX_M
    uses the GEMV kernel and larger M the GEMM kernel.  ``split_k`` overrides the
    split-K heuristic (number of K slices).
    """
    k, n = packed.in_features, packed.out_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {k}")
    lead = x.shape[:-1]
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    if path == "torch" or not _use_triton(x2):
        w = dequantize_packed(packed).to(x2.device)
        y = (x2.to(torch.float32) @ w.T).to(x.dtype)
        return y.reshape(*lead, n)
    if packed.device != x2.device:
        raise ValueError(f"packed weight is on {packed.device}, x on {x2.device}")
    if path is None:
        path = "gemv" if m <= GEMV_MAX_M else "gemm"
    if path not in ("gemv", "gemm"):
        raise ValueError(f"path must be 'gemv', 'gemm', 'torch' or None, got {path!r}")

    interpret = not x2.is_cuda or _interpret_mode()
    gemv, gemm, tuned = _kernels(interpret, not os.environ.get("HF_OPTQUANT_NO_AUTOTUNE"))
    meta = _kernel_meta(packed, k, interpret)
    n_groups = packed.n_groups
    ldw = packed.qweight.stride(0)
    lds = packed.scales.stride(0)
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)

    if path == "gemv":
        bm = 1 if m == 1 else (2 if m == 2 else 4)
        m_tiles = _cdiv(m, bm)
        split = split_k or _choose_split(m_tiles * _cdiv(n, 64), n_groups, x2.device)
        split = max(1, min(split, n_groups))
        n_cnt = m_tiles * _cdiv(n, _MIN_BN_GEMV)
    else:
        m_tiles = _cdiv(m, 16 if m <= 16 else 64)
        split = split_k or _choose_split(m_tiles * _cdiv(n, 64), n_groups, x2.device)
        split = max(1, min(split, n_groups * 8))  # >= 1 step per slice for any J <= 4
        n_cnt = _cdiv(m, _MIN_BM_GEMM) * _cdiv(n, _MIN_BN_GEMM)
    if split > 1:
        ws, cnt = _workspace(x2.device, split * m * n, n_cnt)
    else:
        ws, cnt = y, y  # unused
    common = (x2, packed.qweight, packed.lut, packed.scales, y, ws, cnt,
              m, n, k, x2.stride(0), y.stride(0), ldw, lds, n_groups, split)  # fmt: skip

    if path == "gemv":
        cfg = {} if tuned else dict(GEMV_DEFAULT)

        def grid(meta_):
            return (_cdiv(n, meta_["BN"]), m_tiles, split)

        gemv[grid](*common, **meta, SPLIT=split > 1, KMAJOR=_gemv_kmajor(), BM=bm, **cfg)
    else:
        mkey = min(256, 1 << max(0, (m - 1).bit_length()))
        cfg = {} if tuned else dict(GEMM_DEFAULT_SMALL if m <= 16 else GEMM_DEFAULT_LARGE)

        def grid(meta_):
            return (_cdiv(m, meta_["BM"]) * _cdiv(n, meta_["BN"]), split)

        # The GEMM keeps the table in global memory (ASM_LUT <= 1): Triton sizes the
        # dynamic shared memory of its pipeline without knowing of a static .shared array,
        # and the launch fails once both together pass 48 KB.
        meta["ASM_LUT"] = min(meta["ASM_LUT"], 1)
        gemm[grid](
            *common, mkey, **meta, SPLIT=split > 1,
            DOT_IEEE=x2.dtype == torch.float32 or interpret, **cfg,
        )  # fmt: skip
    return y.reshape(*lead, n)
