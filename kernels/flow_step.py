"""Triton backend of the fused flow-matching GRPO step (``tbkernels::flow_step_forward`` /
``tbkernels::flow_step_backward``).

The contract (arguments, outputs, math) is that of the C++ ops: ``csrc/ops.cpp`` (schemas),
``csrc/cpu/flow_step.cpp`` (exact math) and ``_forward_reference`` in
``python/tbkernels/ops/flow_grpo.py``; this module imports nothing from tbkernels outside
``tbkernels.kernels``. Per sample b and element e of a latent ``[B, C, S]`` (S = (T*)H*W), with
``coefs[b] = (cx, cv, alpha, gamma, s)``:

    mean_e = cx x_e + cv v_e,   d_e = prev_e - mean_e,   logp_e = alpha d_e^2 + gamma
    forward:  logp reduced (0: mean -> [B], 1: channel sum -> [B, S...], 2: none),
              ref_sq[b] = sum_e (v_e - vref_e)^2, optionally mean, and (sampling)
              prev = mean + s*noise rounded to the latent dtype (the log-prob is that of the
              rounded sample)
    backward: grad_v_e = cv gm_e - 2 alpha cv gl(e) d_e + 2 gq_b (v_e - vref_e)

Everything is accumulated in float32 (float64 for float64 latents); the per-sample totals are
combined in float64.

Dtypes: the model dtype M is model_output's (and ref_model_output's), the latent dtype L is
sample's (and prev_sample / noise's and grad_mean's). Either L == M (float32, float64, float16 or
bfloat16), or M is bfloat16 / float16 beside float32 latents, as Flow-GRPO runs (bfloat16
velocities, float32 trajectory latents): v and v_ref are then read as they are, not copied to
float32 first. Every load is converted to the accumulation dtype (float32; float64 only when all
is float64) before any arithmetic, so a mixed call computes exactly what the same call on
``model_output.float()`` (and ``ref_model_output.float()``) computes; mean and the sampled prev
are written in L, grad_v in M (that float32 gradient rounded to nearest even).

Layout: each sample of a latent input (v, x, prev / noise, v_ref, grad_mean) is contiguous, and
each input has its own batch stride >= 0 (``_layout.batch_stride``): element e (0 <= e < C*S)
of sample b is read at ``b * batch_stride + e``. Flow-GRPO's trajectory slices ``latents[:, j]``
of a ``[B, steps, C, T, H, W]`` tensor (batch stride steps*C*S) and batch-expanded tensors
(stride 0) are so read in place. Likewise the [rows, n] old_log_prob and advantage_map of the map
losses: each row contiguous, any row stride (``_row_stride``; a one-row map is shared, stride 0),
so per-step slices ``old_log_prob[:, j]`` of a ``[B, steps, ...]`` store are read in place. Every
output, and every other tensor argument, is contiguous.

Launch structure
----------------
Forward, two launches:

1. ``_forward_kernel``, grid ``B * n_tiles`` (1-D, program -> (sample b, spatial tile)). A program
   owns one spatial tile of BLOCK_S positions of one sample and loops over the C channels: each
   input element is read exactly once, ``mean`` / ``prev`` are written only when requested, and
   logp is written per element (reduction none), per position after the channel loop (channel
   sum, accumulated over C in registers), or reduced: the tile's sum of d^2 and of (v - v_ref)^2
   go to a small float64 buffer ``partials[2, B * n_tiles]`` (no atomics, so deterministic).
2. ``_finalize_kernel``, grid ``B``: sums each sample's partials in a fixed order in float64 and
   writes ``logp[b] = alpha * sum / D + gamma`` (reduction mean) and ``ref_sq[b]``.

Backward, one elementwise launch: ``_backward_kernel``, grid ``B * C * n_tiles`` (program ->
(channel row, spatial tile)), recomputing the mean from v and x.

Tiles are sized for the machine that runs them: under the interpreter (TRITON_INTERPRET=1) each
program runs as numpy in Python, so tiles are large (64K-128K elements, a handful of programs even
for a Wan latent); on a GPU the forward tile (256..2048 positions) shrinks until there are a few
programs per SM and the backward uses 2048-element tiles; warps are chosen so that every thread
moves 16-byte vectors. Offsets are int32 unless one could reach 2**31: a latent of 2**31 elements
or more, or an input whose batch (row) stride reaches that far (``(B - 1) * batch_stride + C*S``,
a slice of a large trajectory). Row lengths and batch strides divisible by 16 (every Wan/SD latent
and trajectory) let Triton prove alignment: compiled for sm_90, every latent load/store is then
a 128-bit ``ld/st.global.v4.b32`` (``v2.b64`` for float64) with an evict-first hint (each
element is touched once).

Low-precision outputs are rounded to nearest even by hand for bfloat16 (``_to_output``): the
interpreter's float32 -> bfloat16 cast truncates, and this way the interpreter and the GPU produce
identical, correctly rounded bits.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from tbkernels.kernels import _launch
from tbkernels.kernels._launch import next_pow2 as _next_pow2
from tbkernels.kernels._layout import batch_stride
from tbkernels.kernels._rounding import to_output as _to_output  # shared bf16 rounding

_INT32_OFFSET_LIMIT = 2**31

# Tile sizes per execution mode.
#   fwd_max / fwd_min   range of the forward's spatial tile (positions; the program loops over C)
#   fwd_programs_per_sm the forward tile halves (down to fwd_min) while fewer programs than this
#                       times the SM count would be launched
#   bwd                 the backward's elementwise tile
_CONFIGS = {
    "interpreter": dict(fwd_max=1 << 16, fwd_min=1 << 16, fwd_programs_per_sm=0, bwd=1 << 17),
    "gpu": dict(fwd_max=2048, fwd_min=256, fwd_programs_per_sm=4, bwd=2048),
}
_FINALIZE_BLOCK = 1024


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _forward_kernel(v_ptr, x_ptr, pn_ptr, ref_ptr, coefs_ptr, logp_ptr, part_ptr, mean_ptr,
                    prev_ptr, C, S, NT, NP, V_STRIDE, X_STRIDE, PN_STRIDE, REF_STRIDE,
                    REDUCTION: tl.constexpr, SAMPLING: tl.constexpr, WRITE_MEAN: tl.constexpr,
                    HAS_PN: tl.constexpr, HAS_REF: tl.constexpr, IDX64: tl.constexpr,
                    BLOCK_S: tl.constexpr):
    """One (sample, spatial tile) per program, looping over the channels. The *_STRIDE
    arguments are the inputs' batch strides (elements between samples). mean and prev are
    written in the latent dtype (x's), which may be wider than v's (bf16 v, float32 x)."""
    acc_ty = coefs_ptr.dtype.element_ty
    lat_ty = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    b = pid // NT
    t = pid - b * NT
    s = t * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = s < S
    v_ptr += b * V_STRIDE
    x_ptr += b * X_STRIDE
    pn_ptr += b * PN_STRIDE
    ref_ptr += b * REF_STRIDE
    out0 = b * C * S                                # sample b of the contiguous outputs

    cx = tl.load(coefs_ptr + b * 5 + 0)
    cv = tl.load(coefs_ptr + b * 5 + 1)
    alpha = tl.load(coefs_ptr + b * 5 + 2)
    gamma = tl.load(coefs_ptr + b * 5 + 3)
    sd = tl.load(coefs_ptr + b * 5 + 4)

    sq_acc = tl.zeros([BLOCK_S], dtype=acc_ty)     # sum over channels of d^2, per position
    ref_acc = tl.zeros([BLOCK_S], dtype=acc_ty)    # sum over channels of (v - v_ref)^2
    # element c * S + s of the sample, carried across the loop: computed as c * S it would be
    # int32 even for IDX64 launches, whose samples alone may pass 2**31 elements
    e = s
    for c in range(C):
        v = tl.load(v_ptr + e, mask=smask, other=0.0, eviction_policy="evict_first").to(acc_ty)
        x = tl.load(x_ptr + e, mask=smask, other=0.0, eviction_policy="evict_first").to(acc_ty)
        mean = cx * x + cv * v
        if SAMPLING:
            if HAS_PN:
                noise = tl.load(pn_ptr + e, mask=smask, other=0.0,
                                eviction_policy="evict_first").to(acc_ty)
                p = mean + sd * noise
            else:
                p = mean
            p_out = _to_output(p, lat_ty)
            tl.store(prev_ptr + out0 + e, p_out, mask=smask, eviction_policy="evict_first")
            # The log-prob is of the sample actually stored: round-trip through its dtype.
            prev = p_out.to(acc_ty)
        else:
            if HAS_PN:
                prev = tl.load(pn_ptr + e, mask=smask, other=0.0,
                               eviction_policy="evict_first").to(acc_ty)
            else:
                prev = mean
        if WRITE_MEAN:
            tl.store(mean_ptr + out0 + e, _to_output(mean, lat_ty), mask=smask,
                     eviction_policy="evict_first")
        d = prev - mean
        d2 = d * d
        if REDUCTION == 2:
            tl.store(logp_ptr + out0 + e, alpha * d2 + gamma, mask=smask,
                     eviction_policy="evict_first")
        else:
            sq_acc += d2                            # masked positions: v = x = prev = 0 -> d = 0
        if HAS_REF:
            r = tl.load(ref_ptr + e, mask=smask, other=0.0,
                        eviction_policy="evict_first").to(acc_ty)
            dr = v - r
            ref_acc += dr * dr
        e += S

    if REDUCTION == 1:
        tl.store(logp_ptr + b * S + s, alpha * sq_acc + gamma * tl.cast(C, acc_ty), mask=smask)
    if REDUCTION == 0:
        tl.store(part_ptr + pid, tl.sum(sq_acc, axis=0).to(tl.float64))
    if HAS_REF:
        tl.store(part_ptr + NP + pid, tl.sum(ref_acc, axis=0).to(tl.float64))


@triton.jit
def _finalize_kernel(part_ptr, coefs_ptr, logp_ptr, refsq_ptr, C, S, NT, NP,
                     REDUCTION: tl.constexpr, HAS_REF: tl.constexpr, BLOCK_T: tl.constexpr):
    """Per sample: the partials of its tiles summed in float64, in a fixed order."""
    acc_ty = coefs_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    sq = tl.zeros([BLOCK_T], dtype=tl.float64)
    rs = tl.zeros([BLOCK_T], dtype=tl.float64)
    for t0 in range(0, NT, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        m = t < NT
        if REDUCTION == 0:
            sq += tl.load(part_ptr + b * NT + t, mask=m, other=0.0)
        if HAS_REF:
            rs += tl.load(part_ptr + NP + b * NT + t, mask=m, other=0.0)
    if REDUCTION == 0:
        alpha = tl.load(coefs_ptr + b * 5 + 2).to(tl.float64)
        gamma = tl.load(coefs_ptr + b * 5 + 3).to(tl.float64)
        D = tl.cast(C, tl.float64) * tl.cast(S, tl.float64)
        tl.store(logp_ptr + b, (alpha * tl.sum(sq, axis=0) / D + gamma).to(acc_ty))
    tl.store(refsq_ptr + b, tl.sum(rs, axis=0).to(acc_ty))


@triton.jit
def _backward_kernel(v_ptr, x_ptr, prev_ptr, ref_ptr, coefs_ptr, gl_ptr, gm_ptr, gq_ptr, out_ptr,
                     C, S, NT, V_STRIDE, X_STRIDE, PREV_STRIDE, REF_STRIDE, GM_STRIDE,
                     REDUCTION: tl.constexpr, NEED_D: tl.constexpr, HAS_GM: tl.constexpr,
                     HAS_GQ: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr):
    """grad_v for one (channel row, spatial tile) per program. NEED_D: grad_logp and prev are
    given (without prev the log-prob's d is identically 0, so grad_logp contributes nothing).
    The *_STRIDE arguments are the latent inputs' batch strides (elements between samples).
    grad_v is written in v's dtype (the model dtype; x, prev and grad_mean may be wider)."""
    acc_ty = coefs_ptr.dtype.element_ty
    out_ty = v_ptr.dtype.element_ty
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    row = pid // NT
    t = pid - row * NT
    b = row // C
    s = t * BLOCK + tl.arange(0, BLOCK)
    smask = s < S
    offs = row * S + s                              # in the contiguous grad_v (and grad_logp)
    e = (row - b * C) * S + s                       # within sample b of the inputs

    cv = tl.load(coefs_ptr + b * 5 + 1)
    g = tl.zeros([BLOCK], dtype=acc_ty)
    if NEED_D or HAS_GQ:
        v = tl.load(v_ptr + b * V_STRIDE + e, mask=smask, other=0.0,
                    eviction_policy="evict_first").to(acc_ty)
    if NEED_D:
        cx = tl.load(coefs_ptr + b * 5 + 0)
        alpha = tl.load(coefs_ptr + b * 5 + 2)
        x = tl.load(x_ptr + b * X_STRIDE + e, mask=smask, other=0.0,
                    eviction_policy="evict_first").to(acc_ty)
        prev = tl.load(prev_ptr + b * PREV_STRIDE + e, mask=smask, other=0.0,
                       eviction_policy="evict_first").to(acc_ty)
        d = prev - (cx * x + cv * v)
        lp_scale = -2.0 * alpha * cv                # d logp_e / d v_e = -2 alpha cv d_e
        if REDUCTION == 0:
            # grad of a mean: grad_logp[b] / D, divided in float64 (exactly rounded everywhere)
            D = tl.cast(C, tl.float64) * tl.cast(S, tl.float64)
            gl = (tl.load(gl_ptr + b).to(tl.float64) / D).to(acc_ty)
            g += (lp_scale * gl) * d
        elif REDUCTION == 1:
            gl = tl.load(gl_ptr + b * S + s, mask=smask, other=0.0)
            g += lp_scale * gl * d
        else:
            gl = tl.load(gl_ptr + offs, mask=smask, other=0.0, eviction_policy="evict_first")
            g += lp_scale * gl * d
    if HAS_GM:
        gm = tl.load(gm_ptr + b * GM_STRIDE + e, mask=smask, other=0.0,
                     eviction_policy="evict_first")
        g += cv * gm.to(acc_ty)
    if HAS_GQ:
        gq2 = 2.0 * tl.load(gq_ptr + b)
        r = tl.load(ref_ptr + b * REF_STRIDE + e, mask=smask, other=0.0,
                    eviction_policy="evict_first")
        g += gq2 * (v - r.to(acc_ty))
    tl.store(out_ptr + offs, _to_output(g, out_ty), mask=smask, eviction_policy="evict_first")


@triton.jit
def _policy_term(lp, old, a, lo, hi, SIMPLE: tl.constexpr):
    """One policy term of the surrogate (csrc/flow_grpo_surrogate.h, policy_term): the term,
    d term / d logp, delta = logp - old and the ratio."""
    delta = lp - old
    r = tl.exp(delta)
    if SIMPLE:
        term = -(a * lp)
        g = -a
    else:
        na = -a
        c = tl.where(r < lo, lo, tl.where(r > hi, hi, r))
        u = na * r
        w = na * c
        du = na * r
        dw = tl.where((r >= lo) & (r <= hi), na * r, 0.0)
        term = tl.where((u != u) | (u > w), u, w)     # torch.maximum, NaN wins
        g = tl.where(u > w, du, tl.where(u < w, dw, 0.5 * (du + dw)))  # ties split
    return term, g, delta, r


@triton.jit
def _kl_grad(klw, beta, inv_b):
    """d loss / d ref_sq of samples with KL weight klw when the KL is in the loss: beta * klw / B
    (csrc/flow_grpo_surrogate.h, kl_grad)."""
    return beta * klw * inv_b


@triton.jit
def _kl_products(ref_sq, klw, m):
    """ref_sq * kl_weight of samples (mask m) in the accumulation dtype, widened to float64."""
    return tl.where(m, ref_sq * klw, 0.0).to(tl.float64)


@triton.jit
def _kl_terms(refsq_ptr, klw_ptr, dref_ptr, b, m, beta, inv_b, HAS_REF: tl.constexpr,
              KL_IN_LOSS: tl.constexpr, BLOCK: tl.constexpr):
    """Samples b (mask m) of the KL: stores d loss / d ref_sq (beta * kl_weight / B, or 0) and
    returns their ref_sq * kl_weight in float64 (0 without a reference)."""
    acc_ty = dref_ptr.dtype.element_ty
    kl = tl.zeros([BLOCK], dtype=tl.float64)
    dref = tl.zeros([BLOCK], dtype=acc_ty)
    if HAS_REF:
        klw = tl.load(klw_ptr + b, mask=m, other=0.0)
        kl = _kl_products(tl.load(refsq_ptr + b, mask=m, other=0.0), klw, m)
        if KL_IN_LOSS:
            dref = _kl_grad(klw, beta, inv_b).to(acc_ty)
    tl.store(dref_ptr + b, dref, mask=m)
    return kl


@triton.jit
def _store_loss_metrics(loss_ptr, metrics_ptr, policy, dsq, clipped, ratio, kl_sum, terms, batch,
                        beta, KL_IN_LOSS: tl.constexpr):
    """loss and metrics from the float64 sums (csrc/flow_grpo_surrogate.h, finish): means over
    `terms` policy terms, the KL's over `batch` samples."""
    acc_ty = loss_ptr.dtype.element_ty
    n = tl.cast(terms, tl.float64)
    kl_mean = tl.sum(kl_sum, axis=0) / tl.cast(batch, tl.float64)
    loss = tl.sum(policy, axis=0) / n
    if KL_IN_LOSS:
        loss += tl.cast(beta, tl.float64) * kl_mean
    tl.store(loss_ptr, loss.to(acc_ty))
    tl.store(metrics_ptr + 0, (0.5 * (tl.sum(dsq, axis=0) / n)).to(acc_ty))
    tl.store(metrics_ptr + 1, (tl.sum(clipped, axis=0) / n).to(acc_ty))
    tl.store(metrics_ptr + 2, kl_mean.to(acc_ty))
    tl.store(metrics_ptr + 3, (tl.sum(ratio, axis=0) / n).to(acc_ty))


@triton.jit
def _clamp_adv(adv, adv_max):
    return tl.where(adv < -adv_max, -adv_max, tl.where(adv > adv_max, adv_max, adv))


@triton.jit
def _surrogate_kernel(logp_ptr, refsq_ptr, klw_ptr, old_ptr, adv_ptr, const_ptr, loss_ptr,
                      metrics_ptr, factors_ptr, B, lo, hi, clip, adv_max, beta, inv_b,
                      CONST_FROM_PTR: tl.constexpr, HAS_REF: tl.constexpr,
                      KL_IN_LOSS: tl.constexpr, SIMPLE: tl.constexpr, BLOCK: tl.constexpr):
    """flow_grpo_loss's per-sample surrogate, one program (csrc/flow_grpo_surrogate.h is the
    formula; see ``flow_grpo_surrogate_triton``)."""
    acc_ty = logp_ptr.dtype.element_ty
    if CONST_FROM_PTR:  # float64: scalar arguments would arrive as float32
        lo = tl.load(const_ptr + 0)
        hi = tl.load(const_ptr + 1)
        clip = tl.load(const_ptr + 2)
        adv_max = tl.load(const_ptr + 3)
        beta = tl.load(const_ptr + 4)
        inv_b = tl.load(const_ptr + 5)
    policy = tl.zeros([BLOCK], dtype=tl.float64)
    kl_sum = tl.zeros([BLOCK], dtype=tl.float64)
    dsq = tl.zeros([BLOCK], dtype=tl.float64)
    clipped = tl.zeros([BLOCK], dtype=tl.float64)
    ratio = tl.zeros([BLOCK], dtype=tl.float64)
    for b0 in range(0, B, BLOCK):
        b = b0 + tl.arange(0, BLOCK)
        m = b < B
        lp = tl.load(logp_ptr + b, mask=m, other=0.0)
        adv = tl.load(adv_ptr + b, mask=m, other=0.0)
        term, g, delta, r = _policy_term(lp, tl.load(old_ptr + b, mask=m, other=0.0),
                                         _clamp_adv(adv, adv_max), lo, hi, SIMPLE)
        tl.store(factors_ptr + b, (g * inv_b).to(acc_ty), mask=m)
        kl_sum += _kl_terms(refsq_ptr, klw_ptr, factors_ptr + B, b, m, beta, inv_b, HAS_REF,
                            KL_IN_LOSS, BLOCK)
        policy += tl.where(m, term, 0.0).to(tl.float64)
        dsq += tl.where(m, delta * delta, 0.0).to(tl.float64)
        clipped += tl.where(m & ((r - 1.0 < -clip) | (r - 1.0 > clip)), 1.0, 0.0).to(tl.float64)
        ratio += tl.where(m, r, 0.0).to(tl.float64)
    _store_loss_metrics(loss_ptr, metrics_ptr, policy, dsq, clipped, ratio, kl_sum, B, B, beta,
                        KL_IN_LOSS)


@triton.jit
def _store_policy_partials(part_ptr, pid, NPROG, m, term, delta, r, clip):
    """A tile's float64 sums (lanes m) of the policy terms, delta^2, clipped positions and ratios
    -> partials[0..3, pid] of a [>= 4, NPROG] buffer (one slot per program: no atomics)."""
    tl.store(part_ptr + pid, tl.sum(tl.where(m, term, 0.0).to(tl.float64), axis=0))
    tl.store(part_ptr + NPROG + pid, tl.sum(tl.where(m, delta * delta, 0.0).to(tl.float64), axis=0))
    clipped = tl.where(m & ((r - 1.0 < -clip) | (r - 1.0 > clip)), 1.0, 0.0)
    tl.store(part_ptr + 2 * NPROG + pid, tl.sum(clipped.to(tl.float64), axis=0))
    tl.store(part_ptr + 3 * NPROG + pid, tl.sum(tl.where(m, r, 0.0).to(tl.float64), axis=0))


@triton.jit
def _sum_policy_partials(part_ptr, NPROG, BLOCK: tl.constexpr):
    """The rows 0..3 of _store_policy_partials summed over the programs in a fixed order:
    [BLOCK] float64 vectors, reduced by _store_loss_metrics."""
    policy = tl.zeros([BLOCK], dtype=tl.float64)
    dsq = tl.zeros([BLOCK], dtype=tl.float64)
    clipped = tl.zeros([BLOCK], dtype=tl.float64)
    ratio = tl.zeros([BLOCK], dtype=tl.float64)
    for i0 in range(0, NPROG, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        m = i < NPROG
        policy += tl.load(part_ptr + i, mask=m, other=0.0)
        dsq += tl.load(part_ptr + NPROG + i, mask=m, other=0.0)
        clipped += tl.load(part_ptr + 2 * NPROG + i, mask=m, other=0.0)
        ratio += tl.load(part_ptr + 3 * NPROG + i, mask=m, other=0.0)
    return policy, dsq, clipped, ratio


@triton.jit
def _map_surrogate_kernel(logp_ptr, old_ptr, adv_ptr, map_ptr, const_ptr, part_ptr, P, NT, NPROG,
                          OLD_STRIDE, MAP_STRIDE, lo, hi, clip, adv_max, inv_n,
                          CONST_FROM_PTR: tl.constexpr, SIMPLE: tl.constexpr,
                          IDX64: tl.constexpr, BLOCK: tl.constexpr):
    """The surrogate with a ViPO map, one tile of BLOCK positions of one sample per program: the
    gradient d loss / d logp overwrites logp, and the tile's sums of the policy term, delta^2,
    clipped positions and ratios go to partials [4, NPROG] (float64, no atomics). old_log_prob
    and advantage_map are read at their row strides (OLD_STRIDE, MAP_STRIDE: elements between
    rows, 0 for a shared map), logp contiguously."""
    acc_ty = logp_ptr.dtype.element_ty
    if CONST_FROM_PTR:  # float64: scalar arguments would arrive as float32
        lo = tl.load(const_ptr + 0)
        hi = tl.load(const_ptr + 1)
        clip = tl.load(const_ptr + 2)
        adv_max = tl.load(const_ptr + 3)
        inv_n = tl.load(const_ptr + 6)
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    b = pid // NT
    p = (pid - b * NT) * BLOCK + tl.arange(0, BLOCK)
    m = p < P
    a_b = _clamp_adv(tl.load(adv_ptr + b), adv_max)
    lp = tl.load(logp_ptr + b * P + p, mask=m, other=0.0)
    old = tl.load(old_ptr + b * OLD_STRIDE + p, mask=m, other=0.0, eviction_policy="evict_first")
    am = tl.load(map_ptr + b * MAP_STRIDE + p, mask=m, other=0.0)
    term, g, delta, r = _policy_term(lp, old, a_b * am, lo, hi, SIMPLE)
    tl.store(logp_ptr + b * P + p, (g * inv_n).to(acc_ty), mask=m)
    _store_policy_partials(part_ptr, pid, NPROG, m, term, delta, r, clip)


@triton.jit
def _map_finalize_kernel(part_ptr, refsq_ptr, klw_ptr, const_ptr, loss_ptr, metrics_ptr,
                         dref_ptr, NPROG, B, TERMS, beta, inv_b,
                         CONST_FROM_PTR: tl.constexpr, HAS_REF: tl.constexpr,
                         KL_IN_LOSS: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the partials summed in float64 in a fixed order, the KL over the batch,
    the loss, the metrics and d loss / d ref_sq."""
    if CONST_FROM_PTR:
        beta = tl.load(const_ptr + 4)
        inv_b = tl.load(const_ptr + 5)
    policy, dsq, clipped, ratio = _sum_policy_partials(part_ptr, NPROG, BLOCK)
    kl_sum = tl.zeros([BLOCK], dtype=tl.float64)
    for b0 in range(0, B, BLOCK):
        b = b0 + tl.arange(0, BLOCK)
        kl_sum += _kl_terms(refsq_ptr, klw_ptr, dref_ptr, b, b < B, beta, inv_b, HAS_REF,
                            KL_IN_LOSS, BLOCK)
    _store_loss_metrics(loss_ptr, metrics_ptr, policy, dsq, clipped, ratio, kl_sum, TERMS, B,
                        beta, KL_IN_LOSS)


@triton.jit
def _elem_loss_kernel(v_ptr, x_ptr, prev_ptr, ref_ptr, coefs_ptr, klw_ptr, old_ptr, adv_ptr,
                      map_ptr, const_ptr, grad_ptr, part_ptr, N, NT, NPROG, OLD_STRIDE, MAP_STRIDE,
                      V_STRIDE, X_STRIDE, PREV_STRIDE, REF_STRIDE,
                      lo, hi, clip, adv_max, beta, inv_b, inv_n,
                      CONST_FROM_PTR: tl.constexpr, SIMPLE: tl.constexpr, HAS_REF: tl.constexpr,
                      KL_GRAD: tl.constexpr, WRITE_GRAD: tl.constexpr, IDX64: tl.constexpr,
                      BLOCK: tl.constexpr):
    """flow_grpo_elem_loss, one tile of BLOCK elements of one sample per program: the step's
    per-element log-prob, its policy term with the map-weighted advantage and (WRITE_GRAD)
    d loss / d v of the element; the tile's policy sums go to partials[0..3, pid] and its sum of
    (v - v_ref)^2 to partials[4, pid] (float64, no atomics). The latents are read at their batch
    strides (V_STRIDE, ...: elements between samples), old_log_prob and advantage_map at their row
    strides (OLD_STRIDE, MAP_STRIDE; 0 for a shared map), grad_v is written contiguously in v's
    dtype (the model dtype)."""
    acc_ty = coefs_ptr.dtype.element_ty
    out_ty = v_ptr.dtype.element_ty
    if CONST_FROM_PTR:  # float64: scalar arguments would arrive as float32
        lo = tl.load(const_ptr + 0)
        hi = tl.load(const_ptr + 1)
        clip = tl.load(const_ptr + 2)
        adv_max = tl.load(const_ptr + 3)
        beta = tl.load(const_ptr + 4)
        inv_b = tl.load(const_ptr + 5)
        inv_n = tl.load(const_ptr + 6)
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    b = pid // NT
    e = (pid - b * NT) * BLOCK + tl.arange(0, BLOCK)
    m = e < N
    offs = b * N + e                                # in the contiguous grad_v

    cx = tl.load(coefs_ptr + b * 5 + 0)
    cv = tl.load(coefs_ptr + b * 5 + 1)
    alpha = tl.load(coefs_ptr + b * 5 + 2)
    gamma = tl.load(coefs_ptr + b * 5 + 3)
    # the forward step's d and log-prob (reduction none), operation for operation
    v = tl.load(v_ptr + b * V_STRIDE + e, mask=m, other=0.0,
                eviction_policy="evict_first").to(acc_ty)
    x = tl.load(x_ptr + b * X_STRIDE + e, mask=m, other=0.0,
                eviction_policy="evict_first").to(acc_ty)
    prev = tl.load(prev_ptr + b * PREV_STRIDE + e, mask=m, other=0.0,
                   eviction_policy="evict_first").to(acc_ty)
    d = prev - (cx * x + cv * v)
    lp = alpha * (d * d) + gamma
    # old_log_prob and the map may be stored as bfloat16 / float16 (widened here)
    old = tl.load(old_ptr + b * OLD_STRIDE + e, mask=m, other=0.0,
                  eviction_policy="evict_first").to(acc_ty)
    # no evict-first hint: a [1, N] map is read again by every sample
    am = tl.load(map_ptr + b * MAP_STRIDE + e, mask=m, other=0.0).to(acc_ty)
    a = _clamp_adv(tl.load(adv_ptr + b), adv_max) * am
    term, g, delta, r = _policy_term(lp, old, a, lo, hi, SIMPLE)
    _store_policy_partials(part_ptr, pid, NPROG, m, term, delta, r, clip)
    if HAS_REF:
        dr = v - tl.load(ref_ptr + b * REF_STRIDE + e, mask=m, other=0.0,
                         eviction_policy="evict_first").to(acc_ty)
        # masked lanes load v = v_ref = 0: no mask needed
        tl.store(part_ptr + 4 * NPROG + pid, tl.sum((dr * dr).to(tl.float64), axis=0))
    if WRITE_GRAD:
        # the unfused path's grouping: d loss / d logp (g / n) first, then the step's chain rule
        # d logp / d v = -2 alpha cv d, then the KL's 2 (d loss / d ref_sq) (v - v_ref)
        lp_scale = -2.0 * alpha * cv
        gv = (lp_scale * (g * inv_n)) * d
        if KL_GRAD:
            gq2 = 2.0 * _kl_grad(tl.load(klw_ptr + b), beta, inv_b)
            gv += gq2 * dr
        tl.store(grad_ptr + offs, _to_output(gv, out_ty), mask=m, eviction_policy="evict_first")


@triton.jit
def _elem_finalize_kernel(part_ptr, klw_ptr, const_ptr, loss_ptr, metrics_ptr, NPROG, B, NT,
                          TERMS, beta, CONST_FROM_PTR: tl.constexpr, HAS_REF: tl.constexpr,
                          KL_IN_LOSS: tl.constexpr, BLOCK: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    """One program: the policy partials summed as _map_finalize_kernel's; per sample its tiles'
    (v - v_ref)^2 sums (row 4) in a fixed order, rounded to the accumulation dtype as ref_sq and
    weighted by kl_weight; the loss and the metrics. [BLOCK_B, BLOCK_T] blocks of the row cover
    many samples per step when each has few tiles, and a long row per step when they have many."""
    acc_ty = loss_ptr.dtype.element_ty
    if CONST_FROM_PTR:
        beta = tl.load(const_ptr + 4)
    policy, dsq, clipped, ratio = _sum_policy_partials(part_ptr, NPROG, BLOCK)
    kl_sum = tl.zeros([BLOCK_B], dtype=tl.float64)
    if HAS_REF:
        for b0 in range(0, B, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)
            mb = b < B
            rs = tl.zeros([BLOCK_B, BLOCK_T], dtype=tl.float64)
            for t0 in range(0, NT, BLOCK_T):
                t = t0 + tl.arange(0, BLOCK_T)
                mt = mb[:, None] & (t < NT)[None, :]
                rs += tl.load(part_ptr + 4 * NPROG + b[:, None] * NT + t[None, :], mask=mt,
                              other=0.0)
            ref_sq = tl.sum(rs, axis=1).to(acc_ty)
            kl_sum += _kl_products(ref_sq, tl.load(klw_ptr + b, mask=mb, other=0.0), mb)
    _store_loss_metrics(loss_ptr, metrics_ptr, policy, dsq, clipped, ratio, kl_sum, TERMS, B,
                        beta, KL_IN_LOSS)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def _num_warps(elements: int, element_size: int) -> int:
    # at least one 16-byte vector per thread and load (8 bf16, 4 fp32, 2 fp64 elements), 1-8 warps;
    # callers pass the narrowest latent's size (model_output's: a bf16 v beside float32 latents
    # gets 8 elements per thread, one 16-byte vector of v and two of each float32 latent)
    return max(1, min(8, elements * element_size // (16 * 32)))


def _elem_warps(tile: int, n: int, element_size: int) -> int:
    # A row length N not divisible by 16 (an odd channel count) gives no 16-byte alignment to
    # vectorize for, so the per-thread vector rule has nothing to fill: spread the tile over up
    # to 8 warps (two elements per thread up to a 512-element tile, as many as the tile needs
    # beyond). With 8 bf16 elements per thread (2 warps at a 512-element tile) triton 3.6's ptxas
    # spilled 8-16 B on sm_80 (triton 3.7's did not); a 2048-element tile had 8 warps before.
    if n % 16 == 0:
        return _num_warps(tile, element_size)
    return max(1, min(8, tile // 64))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DTYPE_RULE = ("the latents must all have one dtype (float32, float64, float16 or bfloat16), or "
               "model_output and ref_model_output (the model dtype) bfloat16 or float16 with "
               "float32 sample, prev_sample / noise and grad_mean (the latent dtype)")


def _dtype_combination_ok(model: torch.dtype, latent: torch.dtype) -> bool:
    """model_output's dtype (M) beside sample's (L): L == M, or M bf16/fp16 with L float32."""
    return model in _FLOAT_DTYPES and (
        latent == model or (model in (torch.float16, torch.bfloat16) and latent == torch.float32))


def _layout(v: torch.Tensor, x: torch.Tensor, op: str):
    if v.dim() < 3:
        raise RuntimeError(f"{op}: model_output must be [B, C, (T,) H, W], got {list(v.shape)}")
    if x.shape != v.shape:
        raise RuntimeError(f"{op}: sample {list(x.shape)} must match model_output {list(v.shape)}")
    if v.dtype not in _FLOAT_DTYPES:
        raise RuntimeError(f"{op}: latents must be float32/float64/float16/bfloat16, got {v.dtype}")
    if not _dtype_combination_ok(v.dtype, x.dtype):
        # the C++ ops' wording (csrc/flow_step_checks.h), then the whole rule
        raise RuntimeError(f"{op}: sample ({x.dtype}) must have model_output's dtype ({v.dtype}), "
                           f"or be float32 beside a bfloat16 or float16 model_output; "
                           f"{_DTYPE_RULE}")
    for name, t in (("model_output", v), ("sample", x)):
        if batch_stride(t) is None:
            raise RuntimeError(f"{op}: {name} must be contiguous within each sample (a batch "
                               f"stride is allowed), got {list(t.shape)} strides "
                               f"{list(t.stride())}")
    if x.device != v.device:
        raise RuntimeError(f"{op}: sample is on {x.device} but model_output on {v.device}")
    _launch.require_launchable(v, op)
    # S from the dims (not numel / (B*C)): with B = 0 a sample still has C*S elements, which
    # flow_grpo_elem_loss's [B, N] arguments are checked against
    return v.shape[0], v.shape[1], math.prod(v.shape[2:])


def _check_like(t, like, like_name, what, op):
    """An optional latent-sized input of `like`'s shape, dtype and device, each sample contiguous
    (any batch stride): like = sample (the latent dtype) for prev_sample, noise and grad_mean,
    model_output (the model dtype) for ref_model_output. The C++ ops' message
    (csrc/flow_step_checks.h), with the dtype rule when the dtype is what is wrong."""
    if t is None:
        return
    if not (t.shape == like.shape and t.dtype == like.dtype and batch_stride(t) is not None
            and t.device == like.device):
        why = ""
        if t.dtype != like.dtype:
            kind = "model" if like_name == "model_output" else "latent"
            why = f"; {what} must have the {kind} dtype ({like_name}'s): {_DTYPE_RULE}"
        raise RuntimeError(f"{op}: {what} must be a tensor like {like_name} {list(like.shape)} "
                           f"{like.dtype} with each sample contiguous (a batch stride is "
                           f"allowed), got {list(t.shape)} {t.dtype} strides {list(t.stride())} "
                           f"on {t.device}{why}")


def _latent_output(v, dtype=None):
    # contiguous whatever v's batch stride (empty_like would keep a dense v's strides); v's dtype
    # (grad_v: the model dtype) unless given (mean, prev: the latent dtype)
    return torch.empty(v.shape, dtype=v.dtype if dtype is None else dtype, device=v.device)


def _batch_strides(n, *latents):
    """batch_stride of each (checked) latent input; n, one sample's elements, for an absent one,
    which the kernel does not read."""
    return [n if t is None else batch_stride(t) for t in latents]


def _check_coefs(coefs, x, op):
    """coefs [B, 5] in the accumulation dtype of the latent dtype (x: sample)."""
    acc = _acc_dtype(x.dtype)
    if not (coefs.dim() == 2 and coefs.shape[0] == x.shape[0] and coefs.shape[1] == 5
            and coefs.is_contiguous() and coefs.dtype == acc):
        raise RuntimeError(f"{op}: coefs must be a contiguous [B, 5] {acc} tensor, got "
                           f"{list(coefs.shape)} {coefs.dtype}")
    if coefs.device != x.device:
        raise RuntimeError(f"{op}: coefs must be on the latents' device")


def _logp_shape(shape, reduction):
    if reduction == 0:
        return (shape[0],)
    if reduction == 1:
        return (shape[0],) + tuple(shape[2:])
    return tuple(shape)


def _check_acc_args(op, checks, dtype, device):
    """Each (name, tensor or None, shape) of `checks`: contiguous, of that shape, dtype, device."""
    for name, t, shape in checks:
        if t is not None and not (tuple(t.shape) == tuple(shape) and t.dtype == dtype
                                  and t.is_contiguous() and t.device == device):
            raise RuntimeError(f"{op}: {name} must be a contiguous {list(shape)} {dtype} tensor "
                               f"on {device}, got {list(t.shape)} {t.dtype} on {t.device}")


def _check_rows(op, checks, dtype, device):
    """Each (name, tensor, shape) of `checks`, a [rows, n] input read row by row (old_log_prob,
    advantage_map): of that shape, dtype and device, each row contiguous, any row stride (as
    ``check_rows_like_logp`` in csrc/flow_step_checks.h)."""
    for name, t, shape in checks:
        if not (tuple(t.shape) == tuple(shape) and t.dtype == dtype
                and batch_stride(t) is not None and t.device == device):
            raise RuntimeError(f"{op}: {name} must be a {list(shape)} {dtype} tensor on {device} "
                               f"with each row contiguous, got {list(t.shape)} {t.dtype} strides "
                               f"{list(t.stride())} on {t.device}")


def _row_stride(t):
    """Elements between row b and b + 1 of a (checked) [rows, n] input: 0 for a single row
    (a [1, n] map shared by the batch, or a batch of one)."""
    return 0 if t.shape[0] == 1 else batch_stride(t)


def _check_clip(op, clip_range, adv_clip_max):
    if not (clip_range > 0 and adv_clip_max > 0):
        raise RuntimeError(f"{op}: clip_range and adv_clip_max must be > 0, got {clip_range}, "
                           f"{adv_clip_max}")


def _surrogate_consts(clip_range, adv_clip_max, beta, batch, terms):
    """(lo, hi, clip, adv_max, beta, 1/B, 1/terms) formed in double as make_constants forms them,
    then rounded once to the accumulation dtype: by the float32 scalar arguments of a kernel, or
    not at all for float64 (passed in a tensor, read by CONST_FROM_PTR kernels)."""
    return (1.0 - clip_range, 1.0 + clip_range, clip_range, adv_clip_max, beta,
            1.0 / batch if batch else 0.0, 1.0 / terms if terms else 0.0)


def _idx64(extent: int, block: int) -> bool:
    # int32 offsets unless a (padded) tile could reach 2**31; extent: one past the largest
    # element index the launch forms
    return extent + 2 * block >= _INT32_OFFSET_LIMIT


def _latent_extent(batch: int, n: int, strides) -> int:
    """The extent (see _idx64) of a launch over contiguous [batch, n] tensors and inputs of these
    batch (row) strides: a stride beyond n (a trajectory slice) reaches past batch * n."""
    return max([batch * n] + [(batch - 1) * stride + n for stride in strides])


@_launch.on_tensor_device
def flow_step_forward_triton(v, x, prev_or_noise, ref, coefs, reduction, sampling, write_mean):
    """``(logp, ref_sq, mean_or_empty, prev_or_empty)``, as ``tbkernels::flow_step_forward``.

    v, x, prev_or_noise (optional), ref (optional): latents ``[B, C, S...]``, each sample
    contiguous (any batch stride, see ``_layout.batch_stride``); v and ref of the model dtype, x
    and prev_or_noise of the latent dtype: one dtype, or bfloat16/float16 v and ref beside float32
    x and prev_or_noise. coefs ``[B, 5]`` float32 (float64 for float64 latents), contiguous.
    ``prev_or_noise`` is the stored prev_sample, or with ``sampling`` the noise (None: the
    deterministic step, prev = mean). The outputs are contiguous; mean and prev in the latent
    dtype.
    """
    op = "flow_step_forward"
    reduction, sampling, write_mean = int(reduction), bool(sampling), bool(write_mean)
    B, C, S = _layout(v, x, op)
    _check_like(prev_or_noise, x, "sample", "noise" if sampling else "prev_sample", op)
    _check_like(ref, v, "model_output", "ref_model_output", op)
    _check_coefs(coefs, x, op)
    if reduction not in (0, 1, 2):
        raise RuntimeError(f"{op}: reduction must be 0, 1 or 2, got {reduction}")
    acc = _acc_dtype(x.dtype)
    dev = v.device
    logp = torch.empty(_logp_shape(v.shape, reduction), dtype=acc, device=dev)
    ref_sq = torch.empty((B,), dtype=acc, device=dev)
    # distinct empties: a custom op's outputs must not alias each other; the latent dtype
    mean = _latent_output(v, x.dtype) if write_mean else x.new_empty((0,))
    prev = _latent_output(v, x.dtype) if sampling else x.new_empty((0,))
    if B == 0:
        return logp, ref_sq, mean, prev
    if v.numel() == 0:                         # C or S is 0: the C++ op's values, no launch
        if reduction == 0:
            logp.fill_(float("nan"))            # a mean over no elements
        else:
            logp.zero_()
        ref_sq.zero_()
        return logp, ref_sq, mean, prev

    cfg = _CONFIGS["gpu" if _launch.gpu_tiles(v) else "interpreter"]
    block = min(_next_pow2(S), cfg["fwd_max"])
    if cfg["fwd_programs_per_sm"]:
        target = cfg["fwd_programs_per_sm"] * _launch.sm_count(dev)
        while block > cfg["fwd_min"] and B * triton.cdiv(S, block) < target:
            block //= 2
    nt = triton.cdiv(S, block)
    n_programs = B * nt
    partials = torch.empty((2, n_programs), dtype=torch.float64, device=dev)
    has_pn, has_ref = prev_or_noise is not None, ref is not None
    strides = _batch_strides(C * S, v, x, prev_or_noise, ref)
    _forward_kernel[(n_programs,)](
        v, x, prev_or_noise if has_pn else v, ref if has_ref else v, coefs, logp, partials,
        mean if write_mean else v, prev if sampling else v, C, S, nt, n_programs, *strides,
        REDUCTION=reduction, SAMPLING=sampling, WRITE_MEAN=write_mean, HAS_PN=has_pn,
        HAS_REF=has_ref, IDX64=_idx64(_latent_extent(B, C * S, strides), block), BLOCK_S=block,
        num_warps=_num_warps(block, v.element_size()))
    _finalize_kernel[(B,)](
        partials, coefs, logp, ref_sq, C, S, nt, n_programs,
        REDUCTION=reduction, HAS_REF=has_ref, BLOCK_T=min(_next_pow2(nt), _FINALIZE_BLOCK),
        num_warps=4)
    return logp, ref_sq, mean, prev


@_launch.on_tensor_device
def flow_step_backward_triton(v, x, prev, ref, coefs, reduction, grad_logp, grad_mean,
                              grad_ref_sq):
    """``grad_v`` (contiguous, v's shape and dtype), as ``tbkernels::flow_step_backward``.

    Latents (v, x, prev, ref, grad_mean) as ``flow_step_forward_triton``'s: each sample
    contiguous, any batch stride; v and ref of the model dtype, x, prev and grad_mean of the
    latent dtype (see there). grad_logp: contiguous, shaped like the reduced log-prob, float32
    (float64 for float64 latents); grad_mean: like x; grad_ref_sq: ``[B]`` accumulation dtype,
    needs ``ref``. Each of them may be None (no contribution).
    """
    op = "flow_step_backward"
    reduction = int(reduction)
    B, C, S = _layout(v, x, op)
    _check_like(prev, x, "sample", "prev_sample", op)
    _check_like(ref, v, "model_output", "ref_model_output", op)
    _check_like(grad_mean, x, "sample", "grad_mean", op)
    _check_coefs(coefs, x, op)
    if reduction not in (0, 1, 2):
        raise RuntimeError(f"{op}: reduction must be 0, 1 or 2, got {reduction}")
    acc = _acc_dtype(x.dtype)
    if grad_logp is not None:
        expect = _logp_shape(v.shape, reduction)
        if not (tuple(grad_logp.shape) == expect and grad_logp.is_contiguous()
                and grad_logp.dtype == acc and grad_logp.device == v.device):
            raise RuntimeError(f"{op}: grad_logp must be a contiguous {list(expect)} {acc} tensor, "
                               f"got {list(grad_logp.shape)} {grad_logp.dtype}")
    if grad_ref_sq is not None:
        if ref is None:
            raise RuntimeError(f"{op}: grad_ref_sq given without ref_model_output")
        if not (grad_ref_sq.numel() == B and grad_ref_sq.is_contiguous()
                and grad_ref_sq.dtype == acc and grad_ref_sq.device == v.device):
            raise RuntimeError(f"{op}: grad_ref_sq must be a contiguous [B] {acc} tensor")
    grad_v = _latent_output(v)
    if v.numel() == 0:
        return grad_v

    cfg = _CONFIGS["gpu" if _launch.gpu_tiles(v) else "interpreter"]
    block = min(_next_pow2(S), cfg["bwd"])
    nt = triton.cdiv(S, block)
    has_gl, has_gm, has_gq = grad_logp is not None, grad_mean is not None, grad_ref_sq is not None
    strides = _batch_strides(C * S, v, x, prev, ref, grad_mean)
    _backward_kernel[(B * C * nt,)](
        v, x, prev if prev is not None else v, ref if ref is not None else v, coefs,
        grad_logp if has_gl else coefs, grad_mean if has_gm else v,
        grad_ref_sq if has_gq else coefs, grad_v, C, S, nt, *strides,
        REDUCTION=reduction, NEED_D=has_gl and prev is not None, HAS_GM=has_gm, HAS_GQ=has_gq,
        IDX64=_idx64(_latent_extent(B, C * S, strides), block), BLOCK=block,
        num_warps=_num_warps(block, v.element_size()))
    return grad_v


_SURROGATE_BLOCK = 1024


@_launch.on_tensor_device
def flow_grpo_surrogate_triton(logp, ref_sq, kl_weight, old_log_prob, advantages, clip_range,
                               adv_clip_max, beta, simple):
    """``(loss [], metrics [4], factors [2, B])``, as ``tbkernels::flow_grpo_surrogate``.

    Every tensor a contiguous ``[B]`` float32 (or float64) tensor on one device; ref_sq and
    kl_weight both given (a reference policy) or both None. One launch of one program.
    """
    op = "flow_grpo_surrogate"
    if logp.dim() != 1 or logp.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"{op}: logp must be a [B] float32 or float64 tensor, got "
                           f"{list(logp.shape)} {logp.dtype}")
    if (ref_sq is None) != (kl_weight is None):
        raise RuntimeError(f"{op}: ref_sq and kl_weight go together (both for a reference "
                           f"policy, or neither)")
    _check_acc_args(op, [(name, t, logp.shape) for name, t in (
        ("logp", logp), ("old_log_prob", old_log_prob), ("advantages", advantages),
        ("ref_sq", ref_sq), ("kl_weight", kl_weight))], logp.dtype, logp.device)
    _check_clip(op, clip_range, adv_clip_max)
    _launch.require_launchable(logp, op)
    B = logp.shape[0]
    dev = logp.device
    loss = torch.empty((), dtype=logp.dtype, device=dev)
    metrics = torch.empty((4,), dtype=logp.dtype, device=dev)
    factors = torch.empty((2, B), dtype=logp.dtype, device=dev)
    has_ref = ref_sq is not None
    consts = _surrogate_consts(clip_range, adv_clip_max, beta, B, B)[:6]
    f64 = logp.dtype == torch.float64
    # float64 constants travel in a tensor (a copy per call; float64 is the checking path, not
    # the fast one); float32 ones as scalar arguments, rounded as PyTorch rounds a Python float
    const_t = torch.tensor(consts, dtype=torch.float64, device=dev) if f64 else logp
    _surrogate_kernel[(1,)](
        logp, ref_sq if has_ref else logp, kl_weight if has_ref else logp, old_log_prob,
        advantages, const_t, loss, metrics, factors, B, *consts,
        CONST_FROM_PTR=f64, HAS_REF=has_ref, KL_IN_LOSS=has_ref and beta != 0,
        SIMPLE=bool(simple), BLOCK=min(_next_pow2(max(B, 1)), _SURROGATE_BLOCK), num_warps=4)
    return loss, metrics, factors


# Tiles of the map surrogate: on a GPU 2048 positions (16 per thread, four 16-byte float32 vectors
# per tensor), a few thousand programs at Wan sizes; under the interpreter whole samples.
_MAP_TILE = {"gpu": 2048, "interpreter": 1 << 17}


@_launch.on_tensor_device
def flow_grpo_map_surrogate_triton(logp, ref_sq, kl_weight, old_log_prob, advantages,
                                   advantage_map, clip_range, adv_clip_max, beta, simple):
    """``(loss [], metrics [4], grad_ref_sq [B])``, as ``tbkernels::flow_grpo_map_surrogate``;
    logp ``[B, P]`` is overwritten with d loss / d logp.

    logp contiguous ``[B, P]``; old_log_prob ``[B, P]`` and advantage_map ``[B, P]`` or ``[1, P]``
    with each row contiguous (any row stride: trajectory slices ``[:, j]`` are read in place);
    advantages (ref_sq, kl_weight: both or neither) contiguous ``[B]``; all float32 (or float64)
    on one device. Two launches: the tiles, then one program that combines them.
    """
    op = "flow_grpo_map_surrogate"
    if logp.dim() != 2:
        raise RuntimeError(f"{op}: logp must be a [B, positions] tensor, got {list(logp.shape)}")
    if logp.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"{op}: logp must be float32 or float64, got {logp.dtype}")
    if (ref_sq is None) != (kl_weight is None):
        raise RuntimeError(f"{op}: ref_sq and kl_weight go together (both for a reference "
                           f"policy, or neither)")
    B, P = logp.shape
    map_rows = 1 if advantage_map.dim() == 2 and advantage_map.shape[0] == 1 else B
    dt, dev = logp.dtype, logp.device
    _check_acc_args(op, (("logp", logp, (B, P)),), dt, dev)
    _check_rows(op, (("old_log_prob", old_log_prob, (B, P)),), dt, dev)
    _check_acc_args(op, (("advantages", advantages, (B,)),), dt, dev)
    _check_rows(op, (("advantage_map", advantage_map, (map_rows, P)),), dt, dev)
    _check_acc_args(op, (("ref_sq", ref_sq, (B,)), ("kl_weight", kl_weight, (B,))), dt, dev)
    _check_clip(op, clip_range, adv_clip_max)
    _launch.require_launchable(logp, op)
    loss = torch.empty((), dtype=logp.dtype, device=dev)
    metrics = torch.empty((4,), dtype=logp.dtype, device=dev)
    grad_ref_sq = torch.empty((B,), dtype=logp.dtype, device=dev)
    has_ref = ref_sq is not None
    terms = B * P
    consts = _surrogate_consts(clip_range, adv_clip_max, beta, B, terms)
    f64 = logp.dtype == torch.float64
    const_t = torch.tensor(consts, dtype=torch.float64, device=dev) if f64 else logp
    tile = min(_next_pow2(max(P, 1)), _MAP_TILE["gpu" if _launch.gpu_tiles(logp) else "interpreter"])
    nt = triton.cdiv(P, tile)
    nprog = B * nt
    partials = torch.empty((4, max(nprog, 1)), dtype=torch.float64, device=dev)
    if nprog:
        strides = (_row_stride(old_log_prob), _row_stride(advantage_map))
        _map_surrogate_kernel[(nprog,)](
            logp, old_log_prob, advantages, advantage_map, const_t, partials, P, nt, nprog,
            *strides, consts[0], consts[1], consts[2], consts[3], consts[6],
            CONST_FROM_PTR=f64, SIMPLE=bool(simple),
            IDX64=_idx64(_latent_extent(B, P, strides), tile), BLOCK=tile,
            num_warps=_num_warps(tile, logp.element_size()))
    _map_finalize_kernel[(1,)](
        partials, ref_sq if has_ref else logp, kl_weight if has_ref else logp, const_t, loss,
        metrics, grad_ref_sq, nprog, B, terms, beta, consts[5],
        CONST_FROM_PTR=f64, HAS_REF=has_ref, KL_IN_LOSS=has_ref and beta != 0,
        BLOCK=_FINALIZE_BLOCK, num_warps=4)
    return loss, metrics, grad_ref_sq


# Tiles of the fused per-element loss: on a GPU 2048 elements (8 warps; one 16-byte vector per
# thread and tensor for bf16 latents, two for float32), 1024 for float64 (2048 needed 175
# registers with the KL gradient: one block of 8 warps per SM), under the interpreter whole
# samples.
_ELEM_TILE = {"gpu": 2048, "gpu_f64": 1024, "interpreter": 1 << 17}


@_launch.on_tensor_device
def flow_grpo_elem_loss_triton(model_output, sample, prev_sample, ref_model_output, coefs,
                               kl_weight, old_log_prob, advantages, advantage_map, clip_range,
                               adv_clip_max, beta, simple, write_grad):
    """``(loss [], metrics [4], grad_v)``, as ``tbkernels::flow_grpo_elem_loss``: the step's
    per-element log-prob, the surrogate with a per-element ViPO map and the KL in one pass over
    the latents, and with ``write_grad`` d loss / d model_output of a unit loss (like
    model_output, contiguous; ``[0]`` without).

    Latents as ``flow_step_forward_triton``'s (each sample contiguous, any batch stride;
    model_output and ref_model_output of the model dtype, sample and prev_sample of the latent
    dtype, grad_v in the model dtype; prev_sample required, ref_model_output optional);
    old_log_prob ``[B, N]`` (N = C*S) and advantage_map ``[B, N]`` or ``[1, N]`` with each row
    contiguous (any row stride), advantages and kl_weight (given exactly with ref_model_output)
    ``[B]`` contiguous, all float32 (float64 for float64 latents); with float32, old_log_prob
    and advantage_map may each also be bfloat16 or float16 (widened as read: no float32 copy).
    Two launches: the tiles, then one program that combines them.
    """
    op = "flow_grpo_elem_loss"
    v, x, prev, ref = model_output, sample, prev_sample, ref_model_output
    B, C, S = _layout(v, x, op)
    if prev is None:
        raise RuntimeError(f"{op}: prev_sample must be a tensor like sample "
                           f"{list(x.shape)} {x.dtype} with each sample contiguous, got None")
    _check_like(prev, x, "sample", "prev_sample", op)
    _check_like(ref, v, "model_output", "ref_model_output", op)
    _check_coefs(coefs, x, op)
    if (ref is None) != (kl_weight is None):
        raise RuntimeError(f"{op}: ref_model_output and kl_weight go together (both for a "
                           f"reference policy, or neither)")
    N = C * S
    map_rows = 1 if advantage_map.dim() == 2 and advantage_map.shape[0] == 1 else B
    acc, dev = coefs.dtype, v.device
    for name, t, rows in (("old_log_prob", old_log_prob, B), ("advantage_map", advantage_map,
                                                                map_rows)):
        reduced = acc == torch.float32 and t.dtype in (torch.bfloat16, torch.float16)
        _check_rows(op, ((name, t, (rows, N)),), t.dtype if reduced else acc, dev)
    _check_acc_args(op, (("advantages", advantages, (B,)),), acc, dev)
    _check_acc_args(op, (("kl_weight", kl_weight, (B,)),), acc, dev)
    _check_clip(op, clip_range, adv_clip_max)
    simple, write_grad = bool(simple), bool(write_grad)
    loss = torch.empty((), dtype=acc, device=dev)
    metrics = torch.empty((4,), dtype=acc, device=dev)
    grad_v = _latent_output(v) if write_grad else v.new_empty((0,))
    has_ref = ref is not None
    kl_in_loss = has_ref and beta != 0
    terms = B * N
    consts = _surrogate_consts(clip_range, adv_clip_max, beta, B, terms)
    f64 = acc == torch.float64
    const_t = torch.tensor(consts, dtype=torch.float64, device=dev) if f64 else coefs
    plan = ("gpu_f64" if f64 else "gpu") if _launch.gpu_tiles(v) else "interpreter"
    tile = min(_next_pow2(max(N, 1)), _ELEM_TILE[plan])
    nt = triton.cdiv(N, tile)
    nprog = B * nt
    partials = torch.empty((5, max(nprog, 1)), dtype=torch.float64, device=dev)
    if nprog:
        strides = _batch_strides(N, v, x, prev, ref)
        rows = (_row_stride(old_log_prob), _row_stride(advantage_map))
        _elem_loss_kernel[(nprog,)](
            v, x, prev, ref if has_ref else v, coefs, kl_weight if has_ref else coefs,
            old_log_prob, advantages, advantage_map, const_t, grad_v if write_grad else v,
            partials, N, nt, nprog, *rows, *strides, *consts,
            CONST_FROM_PTR=f64, SIMPLE=simple, HAS_REF=has_ref,
            KL_GRAD=kl_in_loss and write_grad, WRITE_GRAD=write_grad,
            IDX64=_idx64(_latent_extent(B, N, strides + list(rows)), tile), BLOCK=tile,
            num_warps=_elem_warps(tile, N, v.element_size()))
    # B = 0 or N = 0 still finalizes: the means over no terms are NaN, as the C++ op's
    block_t = min(_next_pow2(max(nt, 1)), _FINALIZE_BLOCK)
    _elem_finalize_kernel[(1,)](
        partials, kl_weight if has_ref else coefs, const_t, loss, metrics, nprog, B, nt, terms,
        consts[4], CONST_FROM_PTR=f64, HAS_REF=has_ref, KL_IN_LOSS=kl_in_loss,
        BLOCK=_FINALIZE_BLOCK, BLOCK_B=max(1, _FINALIZE_BLOCK // block_t), BLOCK_T=block_t,
        num_warps=4)
    return loss, metrics, grad_v
