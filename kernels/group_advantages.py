"""Triton backend of group-normalized advantages.

The contract (arguments, outputs, math) is the docstring of
``python/tbkernels/ops/_group_advantages_reference.py``; this module reproduces it and imports
only the shared kernels/_rounding.py from tbkernels. ``rewards`` is [B, K] (K heads, each normalised independently) and all
statistics are accumulated in float32 (float64 for float64 rewards).

Numerics: corrected two-pass
----------------------------
Pass 1's mean, mean1 = fl(sum(r) / n), is rounded to the accumulation type (and, summed with
atomics, may be off by several ulps). Subtracting it as it is would shift every advantage of a
group by (mean1 - mean) / std, which is large when the rewards' offset is large relative to their
spread: for float32 rewards 1000 + 1e-3 * randn the ulp of 1000 is 6e-5, so mean1 can be off by
3% of the std, and the group's advantages no longer sum to 0. Every path therefore computes

    d = r - mean1        exact when r is within a factor 2 of mean1 (Sterbenz's lemma)
    c = sum(d) / n       the correction: the mean is mean1 + c (the reported mean)
    dev = d - c          the advantage's numerator
    ss = sum(dev^2)      (fused kernel), or sum(d^2) - sum(d)^2 / n (row kernels)

so advantages are accurate to float32 rounding relative to the group's spread, not its offset.
Where the advantage is computed by a later kernel than the statistics (the row kernels), the
mean is handed over as an unevaluated sum hi + lo, hi = fl(mean1 + c) (the reported mean) and
lo = (mean1 - hi) + c (Fast2Sum: hi's exact rounding error), and dev = (r - hi) - lo, so the
rounding of the reported mean does not come back. The global std (std_mode 1) is corrected the
same way (sum(d^2) - sum(d)^2 / B about the rounded global mean).

Launch structure
----------------
Tiles are sized for the machine that runs them: under the interpreter (TRITON_INTERPRET=1) every
program instance is executed in Python, so tiles are large (64K elements) and grids are a few
dozen programs even for B = 1,000,000; on a GPU tiles hold a few thousand elements, so that
enough programs exist to fill the SMs.

1. std_mode 1 ("global") first runs ``_global_moments_kernel`` twice over row tiles: per-head
   sum, then per-head sums of d = r - mean and of d^2 about that (rounded) mean (corrected
   two-pass, see Numerics). Each tile is reduced in registers and added with one atomic per
   head and sum into a [3, K] buffer. Later kernels turn those 3K numbers into the per-head
   global std themselves, so there is no host round trip.

2. Contiguous groups whose padded size next_pow2(S) * next_pow2(K) fits one tile:
   ``_contiguous_fused_kernel``, a single launch, grid cdiv(G, BLOCK_G). A program loads a
   [BLOCK_G, BLOCK_K, BLOCK_S] tile of whole groups, derives sum -> mean1 -> d -> correction
   -> dev -> std and min/max in registers and writes adv, mean, std and count: rewards are read
   once and adv written once.

3. Everything else (group_index given, or contiguous groups longer than a tile) works on row
   tiles [BLOCK_K, BLOCK_R] in four launches:
     a. ``_rows_stats_kernel``  per-(group, head) sum, min, max and per-group count (atomics)
     b. ``_rows_sqdev_kernel``  per-(group, head) sums of d = r - mean and d^2 (atomics)
     c. ``_finalize_kernel``    mean and std, in place over G x K, with the corrected two-pass
                                formulas (mean1 + sum(d)/n, sum d^2 - sum(d)^2/n), which undo the
                                rounding of pass 1's atomically accumulated sums; the mean's
                                low part lo goes into the sum(d) buffer (see Numerics)
     d. ``_rows_adv_kernel``    advantages, dev = (r - hi) - lo; each row gathers its group's
                                statistics
   In (a) and (b) a tile whose rows all belong to at most two groups (always true for contiguous
   groups at least a tile long, and for sorted ids with large groups) is reduced in registers and
   issues one atomic per head and group, so a single huge group does not serialise B atomics on
   one address. Other tiles issue one atomic per element, which is cheap when groups are small.
   Float atomics make the summation order, and hence the last bits of mean/std/adv,
   run-dependent on a GPU; min/max (which decide "all rewards equal" -> advantage exactly 0)
   and counts are exact.

A group holding a NaN is never "all equal" (the reference's amin/amax propagate NaN, so its
advantages are NaN, as are the CUDA kernel's): the fused kernel tests x != x, and because float
atomic min/max need not propagate NaN, the row path's finalize marks a group whose pass-1 sum is
NaN by storing NaN as its minimum. (Without a NaN reward, a NaN sum needs partial sums at +inf
and at -inf, hence rewards of both signs: such a group is not flat anyway. An all-+inf group stays
flat, as in the reference.)

All atomics are "relaxed": nothing inside a launch depends on their ordering (kernel boundaries
order the passes), and relaxed reductions are cheaper than the default acq_rel on NVIDIA GPUs.

Non-finite rewards (check_finite) are detected by the first kernel that reads the rewards: each
tile reduces the flat indices of its NaN/inf elements to their minimum and, only if it found one,
does a single ``atomic_min`` into an int64 scalar. After the launches the host reads that scalar
once and raises the same ValueError as the reference.

eps and clip are passed as float64 bit patterns (int64 arguments) because Triton passes Python
floats as float32, which would perturb float64 results (clip = 0.2 is not a float32 value).
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from tbkernels.kernels import _launch
from tbkernels.kernels._launch import next_pow2 as _next_pow2
from tbkernels.kernels._rounding import to_output as _to_output  # shared bf16 rounding

_IMAX = tl.constexpr(2**63 - 1)
_INT64_MAX = 2**63 - 1
_INT32_OFFSET_LIMIT = 2**31      # element offsets at or beyond this switch the kernels to int64

# Tile sizes (in elements) per execution mode.
#   tile             row tile of the row kernels and the global reduction
#   fused_tile       target size of a fused-kernel tile (whole groups)
#   fused_group_max  largest padded group (BLOCK_S * BLOCK_K) handled by the fused kernel
#   fused_min_tile   the fused tile may shrink down to this to create more programs ...
#   min_programs     ... while fewer than this many programs would be launched
_CONFIGS = {
    "interpreter": dict(tile=1 << 16, fused_tile=1 << 16, fused_group_max=1 << 16,
                        fused_min_tile=1 << 16, min_programs=1),
    "gpu": dict(tile=2048, fused_tile=4096, fused_group_max=4096,
                fused_min_tile=1024, min_programs=264),
}


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _from_bits(bits, ty: tl.constexpr):
    """A float64 passed as its int64 bit pattern, converted to the accumulation type."""
    return tl.cast(tl.cast(bits, tl.int64), tl.float64, bitcast=True).to(ty)


@triton.jit
def _div(a, b):
    # IEEE-rounded division: '/' on float32 lowers to an approximate division on NVIDIA GPUs.
    a, b = tl.broadcast(a, b)
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt(x):
    # tl.sqrt is the fast approximate square root for float32; float64 sqrt is exact already.
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _std_from_ss(ss, n, DDOF: tl.constexpr):
    """sqrt(ss / (n - ddof)), or 0 when n - ddof <= 0 (n may be a scalar or a tensor)."""
    dof = n - DDOF
    return tl.where(dof > 0, _sqrt(_div(ss, tl.maximum(dof, 1.0))), 0.0)


@triton.jit
def _nonneg(x):
    """max(x, 0) that keeps NaN (tl.maximum lowers to a NaN-dropping max on a GPU)."""
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def _global_std(gmom_ptr, ks, B, K: tl.constexpr, DDOF: tl.constexpr, acc_ty: tl.constexpr):
    """Per-head std over all B rewards, from rows 1 and 2 (sums of d^2 and d, d = r - rounded
    global mean) of the [3, K] buffer: sum (r - mean)^2 = sum d^2 - sum(d)^2 / B, which removes
    the rounding of the global mean (second order in it, but visible at large offsets)."""
    kmask = ks < K
    n = tl.cast(B, acc_ty)
    gss = tl.load(gmom_ptr + K + ks, mask=kmask, other=0.0)
    gds = tl.load(gmom_ptr + 2 * K + ks, mask=kmask, other=0.0)
    return _std_from_ss(_nonneg(gss - _div(gds * gds, n)), n, DDOF)


@triton.jit
def _finish(dev, denom, flat, clip_bits, STD_MODE: tl.constexpr, CLIP: tl.constexpr):
    """adv = dev / denom (dev for std_mode 2), exactly 0 in flat groups, then the clamp."""
    if STD_MODE == 2:
        adv = dev
    else:
        # flat groups divide by 1 instead of a possibly zero denominator (0/0 when eps = 0)
        adv = _div(dev, tl.where(flat, 1.0, denom))
    # An all-equal group carries no preference signal: exactly 0, not rounding noise / eps.
    adv = tl.where(flat, 0.0, adv)
    if CLIP:
        clip = _from_bits(clip_bits, dev.dtype)
        # where() rather than tl.minimum/maximum, which drop NaN on a GPU: a group holding a NaN
        # keeps NaN advantages, as torch.clamp does in the reference.
        adv = tl.where(adv < -clip, -clip, tl.where(adv > clip, clip, adv))
    return adv



@triton.jit
def _flag_first_nonfinite(x, mask, offs, bad_ptr):
    """Lower *bad_ptr to the smallest flat index of a NaN/inf in this tile, if there is one."""
    bad = mask & ~(tl.abs(x) < float("inf"))        # false for NaN and +-inf
    first = tl.min(tl.where(bad, offs.to(tl.int64), _IMAX))
    if first < _IMAX:                               # one atomic, and only for a bad tile
        tl.atomic_min(bad_ptr, first, sem="relaxed")


@triton.jit
def _row_tile(B, K: tl.constexpr, IDX64: tl.constexpr, BLOCK_R: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """Rows, heads, masks and flat offsets of this program's row tile, laid out [BLOCK_K, BLOCK_R]
    (heads first) so that reductions over rows run along the last axis: the interpreter's numpy
    then sums pairwise instead of sequentially; a GPU is indifferent to the order."""
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    ks = tl.arange(0, BLOCK_K)
    rmask = rows < B
    kmask = ks < K
    mask = kmask[:, None] & rmask[None, :]
    offs = rows[None, :] * K + ks[:, None]
    return rows, ks, rmask, kmask, mask, offs


@triton.jit
def _row_groups(gid_ptr, rows, rmask, S, HAS_IDS: tl.constexpr):
    """Group of each row: group_index[row], or row // group_size for contiguous groups."""
    if HAS_IDS:
        gid = tl.load(gid_ptr + rows, mask=rmask, other=0).to(tl.int64)
    else:
        gid = (rows // S).to(tl.int64)
    return gid


@triton.jit
def _tile_segments(gid, rmask):
    """Smallest and largest group of the tile, and whether every row is in one of those two."""
    g_lo = tl.min(tl.where(rmask, gid, _IMAX))
    g_hi = tl.max(tl.where(rmask, gid, -1))
    outside = rmask & (gid != g_lo) & (gid != g_hi)
    two = tl.max(outside.to(tl.int32)) == 0
    return g_lo, g_hi, two


@triton.jit
def _stats_segment(x, mask, rmask, gid, g, ks, kmask, sum_ptr, min_ptr, max_ptr, cnt_ptr,
                   K: tl.constexpr):
    """Reduce the tile's rows of group g in registers; one atomic per head and statistic."""
    in_g = rmask & (gid == g)
    sel = mask & in_g[None, :]
    base = g * K + ks
    seg_sum = tl.sum(tl.where(sel, x, 0.0), axis=1)
    seg_min = tl.min(tl.where(sel, x, float("inf")), axis=1)
    seg_max = tl.max(tl.where(sel, x, float("-inf")), axis=1)
    tl.atomic_add(sum_ptr + base, seg_sum, mask=kmask, sem="relaxed")
    tl.atomic_min(min_ptr + base, seg_min, mask=kmask, sem="relaxed")
    tl.atomic_max(max_ptr + base, seg_max, mask=kmask, sem="relaxed")
    tl.atomic_add(cnt_ptr + g, tl.sum(in_g.to(tl.int64)), sem="relaxed")


@triton.jit
def _sqdev_segment(dev, d2, gid, g, ks, kmask, dsum_ptr, ss_ptr, K: tl.constexpr):
    """Pass-2 counterpart of _stats_segment: sums of d and d^2 over the tile's rows of group g."""
    sel = (gid == g)[None, :]
    base = g * K + ks
    seg_dsum = tl.sum(tl.where(sel, dev, 0.0), axis=1)
    seg_ss = tl.sum(tl.where(sel, d2, 0.0), axis=1)
    tl.atomic_add(dsum_ptr + base, seg_dsum, mask=kmask, sem="relaxed")
    tl.atomic_add(ss_ptr + base, seg_ss, mask=kmask, sem="relaxed")


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _global_moments_kernel(x_ptr, gmom_ptr, B,
                           K: tl.constexpr, SQUARES: tl.constexpr, IDX64: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """gmom[0, k] += sum of the tile's rewards, or (SQUARES) gmom[1, k] += sum d^2 and
    gmom[2, k] += sum d, d = r - fl(gmom[0, k] / B) (corrected two-pass, see _global_std)."""
    acc_ty = gmom_ptr.dtype.element_ty
    rows, ks, rmask, kmask, mask, offs = _row_tile(B, K, IDX64, BLOCK_R, BLOCK_K)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    if SQUARES:
        gmean = _div(tl.load(gmom_ptr + ks, mask=kmask, other=0.0), tl.cast(B, acc_ty))
        d = tl.where(mask, x - gmean[:, None], 0.0)
        tl.atomic_add(gmom_ptr + K + ks, tl.sum(d * d, axis=1), mask=kmask, sem="relaxed")
        tl.atomic_add(gmom_ptr + 2 * K + ks, tl.sum(d, axis=1), mask=kmask, sem="relaxed")
    else:
        tl.atomic_add(gmom_ptr + ks, tl.sum(x, axis=1), mask=kmask, sem="relaxed")


@triton.jit(do_not_specialize=["eps_bits", "clip_bits"])
def _contiguous_fused_kernel(x_ptr, adv_ptr, mean_ptr, std_ptr, cnt_ptr, gmom_ptr, bad_ptr,
                             G, S, B, eps_bits, clip_bits,
                             K: tl.constexpr, DDOF: tl.constexpr, STD_MODE: tl.constexpr,
                             CLIP: tl.constexpr, CHECK: tl.constexpr, IDX64: tl.constexpr,
                             S_FIXED: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    """Whole contiguous groups per program: one read of rewards, one write of adv."""
    acc_ty = mean_ptr.dtype.element_ty
    if S_FIXED > 0:
        # Power-of-two group sizes are compile-time constants (a handful of variants): the
        # compiler then knows each group starts aligned and emits vector loads/stores.
        S = S_FIXED
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    g = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    s = tl.arange(0, BLOCK_S)
    ks = tl.arange(0, BLOCK_K)
    gmask = g < G
    gk_mask = gmask[:, None] & (ks < K)[None, :]                       # [BG, BK]
    # Tile [BLOCK_G, BLOCK_K, BLOCK_S]: members last, so that the per-group reductions run along
    # the last axis (pairwise sums in the interpreter's numpy; no difference on a GPU).
    mask = gk_mask[:, :, None] & (s < S)[None, None, :]
    # rewards[g * S + s, k]; for fixed g the (k, s) block is contiguous in memory
    offs = ((g * S)[:, None, None] + s[None, None, :]) * K + ks[None, :, None]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    if CHECK:
        _flag_first_nonfinite(x, mask, offs, bad_ptr)

    # "all equal" from min == max, but never for a group holding a NaN (the reference's amin/amax
    # propagate NaN; tl.min/tl.max need not); padding groups/heads count as flat so that they
    # never divide 0 by 0
    has_nan = tl.max((mask & (x != x)).to(tl.int32), axis=2) > 0
    flat = (((tl.min(tl.where(mask, x, float("inf")), axis=2)
              == tl.max(tl.where(mask, x, float("-inf")), axis=2)) & ~has_nan) | ~gk_mask)

    # Corrected two-pass (module docstring): the rounded mean1 is not subtracted as it is.
    n = tl.cast(S, acc_ty)
    mean1 = _div(tl.sum(x, axis=2), n)                                 # [BG, BK]
    d = tl.where(mask, x - mean1[:, :, None], 0.0)                     # exact (Sterbenz)
    c = _div(tl.sum(d, axis=2), n)                                     # mean = mean1 + c
    dev = tl.where(mask, d - c[:, :, None], 0.0)                       # r - mean
    mean = mean1 + c
    std = _std_from_ss(tl.sum(dev * dev, axis=2), n, DDOF)

    eps = _from_bits(eps_bits, acc_ty)
    if STD_MODE == 0:
        denom = (std + eps)[:, :, None]
    elif STD_MODE == 1:
        denom = (_global_std(gmom_ptr, ks, B, K, DDOF, acc_ty) + eps)[None, :, None]
    else:
        denom = eps
    adv = _finish(dev, denom, flat[:, :, None], clip_bits, STD_MODE, CLIP)
    tl.store(adv_ptr + offs, _to_output(adv, adv_ptr.dtype.element_ty), mask=mask)

    gk = g[:, None] * K + ks[None, :]
    tl.store(mean_ptr + gk, mean, mask=gk_mask)
    tl.store(std_ptr + gk, std, mask=gk_mask)
    tl.store(cnt_ptr + g, tl.zeros([BLOCK_G], tl.int64) + S, mask=gmask)


@triton.jit
def _rows_stats_kernel(x_ptr, gid_ptr, sum_ptr, min_ptr, max_ptr, cnt_ptr, bad_ptr, B, S,
                       K: tl.constexpr, HAS_IDS: tl.constexpr, CHECK: tl.constexpr,
                       IDX64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pass 1 over row tiles: per-group sum, min, max (per head) and count."""
    acc_ty = sum_ptr.dtype.element_ty
    rows, ks, rmask, kmask, mask, offs = _row_tile(B, K, IDX64, BLOCK_R, BLOCK_K)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    if CHECK:
        _flag_first_nonfinite(x, mask, offs, bad_ptr)
    gid = _row_groups(gid_ptr, rows, rmask, S, HAS_IDS)
    g_lo, g_hi, two = _tile_segments(gid, rmask)
    if two:
        _stats_segment(x, mask, rmask, gid, g_lo, ks, kmask, sum_ptr, min_ptr, max_ptr, cnt_ptr, K)
        if g_hi != g_lo:
            _stats_segment(x, mask, rmask, gid, g_hi, ks, kmask, sum_ptr, min_ptr, max_ptr,
                           cnt_ptr, K)
    else:
        gk = gid[None, :] * K + ks[:, None]
        tl.atomic_add(sum_ptr + gk, x, mask=mask, sem="relaxed")
        tl.atomic_min(min_ptr + gk, x, mask=mask, sem="relaxed")
        tl.atomic_max(max_ptr + gk, x, mask=mask, sem="relaxed")
        tl.atomic_add(cnt_ptr + gid, tl.full([BLOCK_R], 1, tl.int64), mask=rmask, sem="relaxed")


@triton.jit
def _rows_sqdev_kernel(x_ptr, gid_ptr, sum_ptr, cnt_ptr, dsum_ptr, ss_ptr, B, S,
                       K: tl.constexpr, HAS_IDS: tl.constexpr, IDX64: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pass 2 over row tiles: per-group sums of d = r - mean and of d^2.

    Sum(d) is the correction term of the corrected two-pass algorithm: per-element float atomics
    add in an arbitrary sequential order, so pass 1's sum of a large group (unsorted ids) can be
    off by ~n ulps; the sum of the small, centred d recovers mean and sum of squares to ~1 ulp."""
    acc_ty = sum_ptr.dtype.element_ty
    rows, ks, rmask, kmask, mask, offs = _row_tile(B, K, IDX64, BLOCK_R, BLOCK_K)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    gid = _row_groups(gid_ptr, rows, rmask, S, HAS_IDS)
    g_lo, g_hi, two = _tile_segments(gid, rmask)
    gk = gid[None, :] * K + ks[:, None]
    cnt = tl.load(cnt_ptr + gid, mask=rmask, other=1).to(acc_ty)
    # pass-1 mean, recomputed identically by _finalize_kernel before it adds the correction
    mean = _div(tl.load(sum_ptr + gk, mask=mask, other=0.0), tl.maximum(cnt, 1.0)[None, :])
    dev = tl.where(mask, x - mean, 0.0)
    d2 = dev * dev                                  # dev, d2: 0 outside the valid elements
    if two:
        _sqdev_segment(dev, d2, gid, g_lo, ks, kmask, dsum_ptr, ss_ptr, K)
        if g_hi != g_lo:
            _sqdev_segment(dev, d2, gid, g_hi, ks, kmask, dsum_ptr, ss_ptr, K)
    else:
        tl.atomic_add(dsum_ptr + gk, dev, mask=mask, sem="relaxed")
        tl.atomic_add(ss_ptr + gk, d2, mask=mask, sem="relaxed")


@triton.jit
def _finalize_kernel(mean_ptr, std_ptr, cnt_ptr, dsum_ptr, min_ptr, GK,
                     K: tl.constexpr, DDOF: tl.constexpr, IDX64: tl.constexpr,
                     BLOCK: tl.constexpr):
    """In place over the G x K statistics: sums -> mean (hi; lo replaces sum(d) in dsum),
    squared deviations -> std; the minimum of a group whose sum is NaN -> NaN (never flat)."""
    acc_ty = mean_ptr.dtype.element_ty
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    m = i < GK
    cnt = tl.load(cnt_ptr + i // K, mask=m, other=1).to(acc_ty)
    n = tl.maximum(cnt, 1.0)
    total = tl.load(mean_ptr + i, mask=m, other=0.0)
    dsum = tl.load(dsum_ptr + i, mask=m, other=0.0)
    # corrected two-pass: mean = mean1 + sum(d) / n, sum (r - mean)^2 = sum d^2 - sum(d)^2 / n
    mean1 = _div(total, n)            # the same bits as _rows_sqdev_kernel's pass-1 mean
    c = _div(dsum, n)
    hi = mean1 + c                    # the reported mean
    # Fast2Sum: hi + lo == mean1 + c exactly when |mean1| >= |c|, i.e. unless the mean is within
    # a few ulps of 0, where lo's error is far below the other roundings. _rows_adv_kernel
    # subtracts hi then lo, so hi's rounding (up to half an ulp of the rewards' offset, which may
    # be a sizeable part of their spread) does not bias the advantages.
    lo = (mean1 - hi) + c
    ss = _nonneg(tl.load(std_ptr + i, mask=m, other=0.0) - _div(dsum * dsum, n))
    tl.store(mean_ptr + i, hi, mask=m)
    tl.store(dsum_ptr + i, lo, mask=m)            # dsum is not read again: reuse it for lo
    tl.store(std_ptr + i, _std_from_ss(ss, cnt, DDOF), mask=m)
    # Float atomic min/max need not propagate NaN, so a group holding a NaN could look flat; its
    # pass-1 sum is NaN (without a NaN reward, a NaN sum needs rewards of both signs summing to
    # +inf and -inf: never a flat group).
    tl.store(min_ptr + i, tl.full([BLOCK], float("nan"), acc_ty), mask=m & (total != total))


@triton.jit(do_not_specialize=["eps_bits", "clip_bits"])
def _rows_adv_kernel(x_ptr, gid_ptr, adv_ptr, mean_ptr, lo_ptr, std_ptr, min_ptr, max_ptr,
                     gmom_ptr, B, S, eps_bits, clip_bits,
                     K: tl.constexpr, DDOF: tl.constexpr, STD_MODE: tl.constexpr,
                     CLIP: tl.constexpr, HAS_IDS: tl.constexpr, IDX64: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pass 3 over row tiles: advantages from the finalized per-group statistics (the mean as
    hi + lo, see _finalize_kernel)."""
    acc_ty = mean_ptr.dtype.element_ty
    rows, ks, rmask, kmask, mask, offs = _row_tile(B, K, IDX64, BLOCK_R, BLOCK_K)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    gid = _row_groups(gid_ptr, rows, rmask, S, HAS_IDS)
    gk = gid[None, :] * K + ks[:, None]
    # (r - hi) - lo: r - hi is exact (Sterbenz) for rewards within 2x of the mean
    dev = ((x - tl.load(mean_ptr + gk, mask=mask, other=0.0))
           - tl.load(lo_ptr + gk, mask=mask, other=0.0))
    flat = (tl.load(min_ptr + gk, mask=mask, other=0.0)      # NaN (never flat) for NaN groups
            == tl.load(max_ptr + gk, mask=mask, other=0.0))
    eps = _from_bits(eps_bits, acc_ty)
    if STD_MODE == 0:
        denom = tl.load(std_ptr + gk, mask=mask, other=0.0) + eps
    elif STD_MODE == 1:
        denom = (_global_std(gmom_ptr, ks, B, K, DDOF, acc_ty) + eps)[:, None]
    else:
        denom = eps
    adv = _finish(dev, denom, flat, clip_bits, STD_MODE, CLIP)
    tl.store(adv_ptr + offs, _to_output(adv, adv_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def _f64_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _config(t: torch.Tensor) -> dict:
    return _CONFIGS["gpu" if _launch.gpu_tiles(t) else "interpreter"]


def _num_warps(elements: int) -> int:
    return max(1, min(8, elements // 256))      # roughly 8-16 elements per thread


def _raise_nonfinite(rewards: torch.Tensor, index: int) -> None:
    # Same message as tbkernels.ops._group_advantages_reference.raise_nonfinite.
    k = rewards.shape[1]
    value = rewards.reshape(-1)[index].item()
    where = f"rewards[{index // k}, {index % k}]" if k > 1 else f"rewards[{index // k}]"
    raise ValueError(
        f"rewards must be finite: {where} is {value} (first non-finite element; "
        f"flat index {index}). Filter or replace failed reward evaluations before normalising.")


@_launch.on_tensor_device
def group_advantages_triton(rewards, group_index, group_size, num_groups, std_mode, ddof, eps,
                            clip, check_finite=True):
    """Group-normalised advantages; see the reference module for the exact contract.

    Returns (adv [B, K] rewards.dtype, mean [G, K], std [G, K], count [G] int64), mean/std in
    float64 for float64 rewards and float32 otherwise.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, K], got shape {tuple(rewards.shape)}")
    _launch.require_launchable(rewards, "group_advantages")
    std_mode, ddof = int(std_mode), int(ddof)      # they become compile-time constants
    if std_mode not in (0, 1, 2):
        raise ValueError(f"std_mode must be 0, 1 or 2, got {std_mode}")
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof}")
    rewards = rewards.contiguous()
    B, K = rewards.shape
    G = int(num_groups)
    dev = rewards.device
    acc = torch.float64 if rewards.dtype == torch.float64 else torch.float32

    adv = torch.empty_like(rewards)
    mean = torch.zeros(G, K, dtype=acc, device=dev)
    std = torch.zeros(G, K, dtype=acc, device=dev)
    count = torch.zeros(G, dtype=torch.int64, device=dev)
    if B == 0 or K == 0:
        return adv, mean, std, count

    cfg = _config(rewards)
    BLOCK_K = _next_pow2(K)
    eps_bits, clip_bits = _f64_bits(eps), _f64_bits(clip)
    CLIP = bool(clip > 0)
    # int32 offsets unless a (padded) tile could reach 2**31
    IDX64 = (B * K + 2 * max(cfg["tile"], cfg["fused_tile"], cfg["fused_group_max"])
             >= _INT32_OFFSET_LIMIT)
    bad = (torch.full((1,), _INT64_MAX, dtype=torch.int64, device=dev) if check_finite
           else count)                                   # never touched when CHECK is off

    rows_block = max(1, cfg["tile"] // BLOCK_K)
    rows_grid = (triton.cdiv(B, rows_block),)
    rows_warps = _num_warps(rows_block * BLOCK_K)

    gmom = mean                                          # placeholder unless std_mode is global
    if std_mode == 1:
        gmom = torch.zeros(3, K, dtype=acc, device=dev)  # [sum; sum of d^2; sum of d]
        for squares in (False, True):
            _global_moments_kernel[rows_grid](
                rewards, gmom, B, K=K, SQUARES=squares, IDX64=IDX64,
                BLOCK_R=rows_block, BLOCK_K=BLOCK_K, num_warps=rows_warps)

    S = int(group_size) if group_index is None else 1
    group_elems = _next_pow2(S) * BLOCK_K
    if group_index is None and group_elems <= cfg["fused_group_max"]:
        BLOCK_S = _next_pow2(S)
        BLOCK_G = min(_next_pow2(G), max(1, cfg["fused_tile"] // group_elems))
        # On a GPU prefer more, smaller programs when there are few groups.
        while (BLOCK_G > 1 and triton.cdiv(G, BLOCK_G) < cfg["min_programs"]
               and BLOCK_G * group_elems > cfg["fused_min_tile"]):
            BLOCK_G //= 2
        _contiguous_fused_kernel[(triton.cdiv(G, BLOCK_G),)](
            rewards, adv, mean, std, count, gmom, bad, G, S, B, eps_bits, clip_bits,
            K=K, DDOF=ddof, STD_MODE=std_mode, CLIP=CLIP, CHECK=bool(check_finite), IDX64=IDX64,
            S_FIXED=S if S == BLOCK_S else 0, BLOCK_G=BLOCK_G, BLOCK_S=BLOCK_S, BLOCK_K=BLOCK_K,
            num_warps=_num_warps(BLOCK_G * group_elems))
    else:
        has_ids = group_index is not None
        gid = group_index.to(device=dev, dtype=torch.int64).contiguous() if has_ids else count
        vmin = torch.full((G, K), float("inf"), dtype=acc, device=dev)
        vmax = torch.full((G, K), float("-inf"), dtype=acc, device=dev)
        common = dict(K=K, HAS_IDS=has_ids, IDX64=IDX64, BLOCK_R=rows_block, BLOCK_K=BLOCK_K,
                      num_warps=rows_warps)
        # mean / std first accumulate sums / squared deviations and are finalized in place;
        # dsum (sum of d) then holds the low part of the mean (see _finalize_kernel).
        _rows_stats_kernel[rows_grid](rewards, gid, mean, vmin, vmax, count, bad, B, S,
                                      CHECK=bool(check_finite), **common)
        dsum = torch.zeros(G, K, dtype=acc, device=dev)
        _rows_sqdev_kernel[rows_grid](rewards, gid, mean, count, dsum, std, B, S, **common)
        fin_block = cfg["tile"]
        _finalize_kernel[(triton.cdiv(G * K, fin_block),)](
            mean, std, count, dsum, vmin, G * K, K=K, DDOF=ddof, IDX64=IDX64, BLOCK=fin_block,
            num_warps=_num_warps(fin_block))
        _rows_adv_kernel[rows_grid](rewards, gid, adv, mean, dsum, std, vmin, vmax, gmom, B, S,
                                    eps_bits, clip_bits, DDOF=ddof, STD_MODE=std_mode, CLIP=CLIP,
                                    **common)

    if check_finite:
        index = int(bad.item())                          # the only host sync
        if index != _INT64_MAX:
            _raise_nonfinite(rewards, index)
    return adv, mean, std, count
