"""Triton backend of the per-sample MSE (``tbkernels::per_sample_mse`` / ``_backward``).

The contract is that of the C++ ops (``csrc/cpu/per_sample_mse.cpp``) and of
``per_sample_mse_reference`` in ``python/tbkernels/ops/_dpo_reference.py``; this module imports
nothing from tbkernels but the shared kernels/_rounding.py. For contiguous ``pred``, ``target`` of shape ``[B, ...]`` (D = elements
per sample; the two dtypes may differ):

    forward:  out[b]     = (1/D) sum_e (pred[b,e] - target[b,e])^2     -> [B] float32 (float64 if
                                                                          either input is float64)
    backward: grad[b, e] = (2 g[b] / D) (pred[b,e] - target[b,e])     -> pred's dtype

Launch structure
----------------
Forward, two launches:

1. ``_forward_kernel``, grid ``B * n_chunks``: program (b, k) sums ``(pred - target)^2`` over
   elements ``[k*CHUNK, (k+1)*CHUNK)`` of sample b (CHUNK = BLOCK * ITERS, a loop of ITERS blocks)
   in the accumulation type and writes the chunk total to ``partials[B * n_chunks]`` (float64). No
   atomics, so the result is deterministic.
2. ``_finalize_kernel``, grid ``B``: each sample's partials summed in a fixed order in float64,
   divided by D.

Backward, one elementwise launch: ``_backward_kernel``, grid ``B * n_tiles`` (program -> (sample,
tile)); reads pred and target once, writes grad once.

Tiles: under the interpreter (TRITON_INTERPRET=1, numpy per program) blocks are large (64K
elements); on a GPU a block is 2048 elements (16-byte vectors per thread for 4-byte types; the
backward takes one 16-byte pred vector per thread when pred is the wider dtype) and a
forward program loops over up to 16 blocks so that big latents do not produce more partials than
needed while small batches still fill the SMs. Offsets are int32 below 2**31 elements.
bfloat16 outputs are rounded to nearest even by hand (the interpreter's cast truncates), so the
interpreter and the GPU write identical bits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tbkernels.kernels import _launch
from tbkernels.kernels._launch import next_pow2 as _next_pow2
from tbkernels.kernels._rounding import to_output as _to_output  # shared bf16 rounding

_INT32_OFFSET_LIMIT = 2**31
# block: elements per program iteration; max_iters: forward blocks per program;
# programs_per_sm: the forward shortens its chunk until this many programs per SM are launched.
_CONFIGS = {
    "interpreter": dict(block=1 << 16, max_iters=1, programs_per_sm=0),
    "gpu": dict(block=2048, max_iters=16, programs_per_sm=8),
}
_FINALIZE_BLOCK = 1024
_SUPPORTED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)



@triton.jit
def _forward_kernel(p_ptr, t_ptr, part_ptr, D, NC, ACC_F64: tl.constexpr, IDX64: tl.constexpr,
                    BLOCK: tl.constexpr, ITERS: tl.constexpr):
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    b = pid // NC
    k = pid - b * NC
    start = k * (BLOCK * ITERS)
    base = b * D
    acc = tl.zeros([BLOCK], dtype=acc_ty)
    for i in range(ITERS):
        e = start + i * BLOCK + tl.arange(0, BLOCK)
        m = e < D
        p = tl.load(p_ptr + base + e, mask=m, other=0.0, eviction_policy="evict_first")
        t = tl.load(t_ptr + base + e, mask=m, other=0.0, eviction_policy="evict_first")
        d = p.to(acc_ty) - t.to(acc_ty)
        acc += d * d
    tl.store(part_ptr + pid, tl.sum(acc, axis=0).to(tl.float64))


@triton.jit
def _finalize_kernel(part_ptr, out_ptr, D, NC, BLOCK_T: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    s = tl.zeros([BLOCK_T], dtype=tl.float64)
    for t0 in range(0, NC, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        s += tl.load(part_ptr + b * NC + t, mask=t < NC, other=0.0)
    total = tl.sum(s, axis=0) / tl.cast(D, tl.float64)
    tl.store(out_ptr + b, total.to(out_ptr.dtype.element_ty))


@triton.jit
def _backward_kernel(g_ptr, p_ptr, t_ptr, out_ptr, D, NT, ACC_F64: tl.constexpr,
                     IDX64: tl.constexpr, BLOCK: tl.constexpr):
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    b = pid // NT
    t = pid - b * NT
    e = t * BLOCK + tl.arange(0, BLOCK)
    m = e < D
    offs = b * D + e
    # d mean(d^2) / d pred_e = 2 d_e / D: the per-sample factor in float64, rounded once.
    scale = (2.0 * tl.load(g_ptr + b).to(tl.float64) / tl.cast(D, tl.float64)).to(acc_ty)
    p = tl.load(p_ptr + offs, mask=m, other=0.0, eviction_policy="evict_first").to(acc_ty)
    q = tl.load(t_ptr + offs, mask=m, other=0.0, eviction_policy="evict_first").to(acc_ty)
    tl.store(out_ptr + offs, _to_output(scale * (p - q), out_ptr.dtype.element_ty), mask=m,
             eviction_policy="evict_first")


# ----------------------------------------------------------------------------------------------
# Host side

def _acc(pred, target):
    return torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32


def _check(pred, target, op):
    if pred.dim() < 1:
        raise RuntimeError(f"{op}: pred must have a batch dimension, got a 0-d tensor")
    if target.shape != pred.shape:
        raise RuntimeError(f"{op}: target {list(target.shape)} must have pred's shape "
                           f"{list(pred.shape)}")
    if pred.dtype not in _SUPPORTED or target.dtype not in _SUPPORTED:
        raise RuntimeError(f"{op}: pred and target must be float32, float64, float16 or bfloat16, "
                           f"got {pred.dtype} and {target.dtype}")
    if not (pred.is_contiguous() and target.is_contiguous()):
        raise RuntimeError(f"{op}: pred and target must be contiguous")
    if target.device != pred.device:
        raise RuntimeError(f"{op}: target is on {target.device} but pred on {pred.device}")
    _launch.require_launchable(pred, op)
    B = pred.shape[0]
    return B, (pred.numel() // B if B else 0)


def _idx64(numel: int, chunk: int) -> bool:
    return numel + 2 * chunk >= _INT32_OFFSET_LIMIT


def _num_warps(block: int) -> int:
    return max(1, min(8, block // 256))


@_launch.on_tensor_device
def per_sample_mse_forward_triton(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[B]`` float32 (float64 if either input is float64), as ``tbkernels::per_sample_mse``."""
    B, D = _check(pred, target, "per_sample_mse")
    acc = _acc(pred, target)
    out = torch.empty((B,), dtype=acc, device=pred.device)
    if B == 0:
        return out
    if D == 0:
        return out.fill_(float("nan"))          # a mean over no elements, as torch's mean
    cfg = _CONFIGS["gpu" if _launch.gpu_tiles(pred) else "interpreter"]
    block = min(_next_pow2(D), cfg["block"])
    blocks = triton.cdiv(D, block)
    iters = min(cfg["max_iters"], blocks)
    if cfg["programs_per_sm"]:
        target_programs = cfg["programs_per_sm"] * _launch.sm_count(pred.device)
        while iters > 1 and B * triton.cdiv(blocks, iters) < target_programs:
            iters //= 2
    nc = triton.cdiv(blocks, iters)
    partials = torch.empty((B * nc,), dtype=torch.float64, device=pred.device)
    _forward_kernel[(B * nc,)](pred, target, partials, D, nc, ACC_F64=acc == torch.float64,
                               IDX64=_idx64(pred.numel(), block * iters), BLOCK=block,
                               ITERS=iters, num_warps=_num_warps(block))
    _finalize_kernel[(B,)](partials, out, D, nc, BLOCK_T=min(_next_pow2(nc), _FINALIZE_BLOCK),
                           num_warps=4)
    return out


@_launch.on_tensor_device
def per_sample_mse_backward_triton(grad_out: torch.Tensor, pred: torch.Tensor,
                                   target: torch.Tensor) -> torch.Tensor:
    """``grad_pred`` like pred, as ``tbkernels::per_sample_mse_backward``."""
    op = "per_sample_mse_backward"
    B, D = _check(pred, target, op)
    acc = _acc(pred, target)
    if not (grad_out.dim() == 1 and grad_out.shape[0] == B and grad_out.is_contiguous()
            and grad_out.dtype == acc and grad_out.device == pred.device):
        raise RuntimeError(f"{op}: grad_out must be a contiguous [{B}] {acc} tensor on "
                           f"{pred.device}, got {list(grad_out.shape)} {grad_out.dtype}")
    grad = torch.empty_like(pred)
    if pred.numel() == 0:
        return grad
    cfg = _CONFIGS["gpu" if _launch.gpu_tiles(pred) else "interpreter"]
    block = min(_next_pow2(D), cfg["block"])
    num_warps = _num_warps(block)
    if _launch.gpu_tiles(pred) and pred.element_size() > target.element_size():
        block = _one_store_vector_per_thread(block, num_warps, pred.element_size())
    nt = triton.cdiv(D, block)
    _backward_kernel[(B * nt,)](grad_out, pred, target, grad, D, nt,
                                ACC_F64=acc == torch.float64, IDX64=_idx64(pred.numel(), block),
                                BLOCK=block, num_warps=num_warps)
    return grad


def _one_store_vector_per_thread(block: int, num_warps: int, pred_bytes: int) -> int:
    """The backward's block when pred is the wider dtype, on a GPU.

    Triton gives both loads the widest vector either dtype allows (8 elements per thread for a
    2-byte target at the default block), but clamps the store to 16 bytes of pred's dtype (4 fp32
    elements). With more elements per thread than one store vector covers, the values are re-laid
    out through shared memory between load and store (8-16 KiB and a barrier per program). A block
    of exactly one 16-byte pred vector per thread removes the conversion; the narrower target is
    then read 4 or 8 bytes per thread, still fully coalesced across the warp (the CUDA kernel
    reads it the same way). Verified by ``tests/test_triton_compile.py``.
    """
    return min(block, 32 * num_warps * (16 // pred_bytes))
