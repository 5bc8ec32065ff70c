"""Autograd plumbing shared by the ops' backward formulas: saving inputs that may be inference
tensors, and refusing a second derivative the kernels do not have.

Saving an op's inputs for its backward when some of them are inference tensors:

A rollout usually runs under ``torch.inference_mode()``, so the latents, old log-probs and
advantages a training step is then given are often inference tensors. Autograd refuses to
``save_for_backward`` those ("Inference tensors cannot be saved for backward"), although
PyTorch's own ops accept them as inputs to a differentiable computation. They also have no
version counter, so the check ``save_for_backward`` exists for cannot apply to them: keeping a
plain reference is what PyTorch itself can offer, and it copies nothing. Other tensors go
through ``save_for_backward`` as usual (in-place modification before the backward is caught).
"""
from __future__ import annotations

import functools

import torch

from ._compile import inline_only


@inline_only
def save(ctx, *tensors) -> None:
    """``ctx.save_for_backward(*tensors)``, with inference tensors kept as plain references."""
    kept = {}
    if not torch.compiler.is_compiling():     # traced tensors are never inference tensors
        kept = {i: t for i, t in enumerate(tensors)
                if isinstance(t, torch.Tensor) and t.is_inference()}
    ctx.tbk_inference_saved = kept
    ctx.save_for_backward(*(None if i in kept else t for i, t in enumerate(tensors)))


def saved(ctx) -> list:
    """The tensors given to :func:`save`, in order."""
    out = list(ctx.saved_tensors)
    for i, t in getattr(ctx, "tbk_inference_saved", {}).items():
        out[i] = t
    return out


@inline_only
def refuse_double_backward(op: str) -> None:
    """Raise when a backward runs with ``create_graph=True`` (grad mode on): the kernels'
    gradients carry no graph, so a second derivative (a gradient penalty, a Hessian-vector
    product) would silently come out as zero or be dropped. Called first in a backward."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"{op}: the fused kernels have no second derivative, so a backward with "
            f"create_graph=True (double backward) is not supported; use backend='reference' "
            f"(plain PyTorch) for higher-order gradients")


def kernel_backward(op: str):
    """Decorator for an autograd.Function backward computed by the kernels: refuses double
    backward (:func:`refuse_double_backward`, where ``once_differentiable`` would hand back a
    gradient without a graph when the incoming gradient has none), then runs without grad."""
    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            refuse_double_backward(op)
            with torch.no_grad():
                return backward(ctx, *grads)
        return wrapper
    return decorate
