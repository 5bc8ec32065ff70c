"""Latent layouts the flow-step kernels read in place (no triton import: the ops layer uses it too).

A latent ``[B, C, (T,) H, W]`` is read without a copy when every sample ``t[b]`` is contiguous: the
strides of dims 1.. are those of a contiguous ``[C, (T,) H, W]`` (size-1 dims ignored), and the
batch stride is free. Flow-GRPO's trajectory slices ``latents[:, j]`` of a ``[B, steps, C, T, H,
W]`` tensor are such views. Same rule as ``batch_stride`` in ``csrc/flow_step_checks.h``.
"""
from __future__ import annotations

import math

import torch


def batch_stride(t: torch.Tensor) -> int | None:
    """Elements between sample b and b + 1 of ``t`` if each sample is contiguous, else None.

    A batch of one (or an empty tensor) gets the per-sample element count, so a kernel can
    always index element e of sample b at ``b * batch_stride + e``.
    """
    per_sample = math.prod(t.shape[1:])
    if t.numel() == 0:
        return per_sample
    expect = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expect:
            return None
        expect *= size
    return per_sample if t.shape[0] == 1 else t.stride(0)
