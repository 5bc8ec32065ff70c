"""Flow-matching GRPO hot path: SDE-step log-prob, KL to the reference, ViPO maps, clipped surrogate.

Public entry points: :func:`sde_step_with_logprob` (a drop-in for Flow-GRPO's function, every
``sde_type``) and :func:`flow_grpo_loss` (log-prob + KL + clipped surrogate in one fused pass).

How it is built: every transition is ``mean = cx*x + cv*v``, ``logp = alpha*(prev-mean)^2 + gamma``
with per-sample coefficients (``_flow_grpo_coefs.py``), so one pair of ops serves all conventions:

* ``tbkernels::flow_step_forward`` reads model_output, sample, prev_sample (and the reference
  model_output) once and writes the reduced log-prob and ``sum((v - v_ref)^2)`` per sample;
* ``tbkernels::flow_step_backward`` writes grad_v in one more pass, recomputing the mean.

* ``tbkernels::flow_grpo_surrogate`` turns the per-sample log-prob and reference distance into
  the clipped surrogate, the KL term, the metrics and the per-sample gradients, in one launch
  (``csrc/flow_grpo_surrogate.h``), so that a GPU step is not a few dozen tiny launches of
  ``[B]`` arithmetic. In eager mode the step and the surrogate run as one autograd node
  (``_FusedLoss``).

* ``tbkernels::flow_grpo_map_surrogate`` is the same surrogate with a ViPO advantage map, one
  policy term per position of the step's per-position (channel-summed) log-prob, which it
  overwrites with its gradient; in eager mode the step and it are one node (``_MapLoss``).

* ``tbkernels::flow_grpo_elem_loss`` is the per-element map case whole: step, surrogate, KL and
  d loss / d model_output in one pass, since every gradient term is then elementwise; in eager
  mode it is one node (``_ElemLoss``) and no latent-sized log-prob exists.

The C++ CPU kernels are ``csrc/cpu/flow_step.cpp``; every op has a fake implementation, and all
but the map surrogate (used below autograd only) a registered autograd formula here, so they
trace under ``torch.compile(fullgraph=True)``; compiled, a ViPO map goes through the plain
PyTorch surrogate (``_policy_loss``, also the reference backend's), which Inductor fuses.
Gradients flow into ``model_output`` only: never into ``sample``, ``prev_sample`` or the
reference.
"""
from __future__ import annotations

import collections
import functools
import math
import numbers
import threading

import torch

from .._backend import resolve_backend
from ..kernels._layout import batch_stride
from . import _autograd, _compile
from ._flow_grpo_coefs import step_coefficients
from ._flow_grpo_reference import REDUCTIONS, SDE_TYPES

IMPLEMENTED = ("reference", "cpu", "cuda", "triton")
KL_FORMS = ("flow_grpo", "exact")
VIPO_FORMS = ("clipped", "simple")
_REDUCTION_CODE = {name: i for i, name in enumerate(REDUCTIONS)}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logp_shape(shape, reduction):
    if reduction == 0:
        return (shape[0],)
    if reduction == 1:
        return (shape[0],) + tuple(shape[2:])
    return tuple(shape)


# --------------------------------------------------------------------------------------------
# The reference implementation of the two ops (plain PyTorch, autograd by PyTorch).

def _forward_reference(v, x, prev_or_noise, ref, coefs, reduction, sampling, write_mean):
    acc = _acc(v.dtype)
    shp = (-1,) + (1,) * (v.ndim - 1)
    cx, cv, alpha, gamma, s = (coefs[:, i].to(acc).reshape(shp) for i in range(5))
    vf = v.to(acc)
    mean = cx * x.to(acc) + cv * vf
    prev_out = None
    if sampling:
        prev_out = (mean + s * prev_or_noise.to(acc) if prev_or_noise is not None else mean)
        prev_out = prev_out.to(x.dtype)                 # a latent: the latents' dtype
        prev = prev_out.to(acc)
    else:
        prev = prev_or_noise.to(acc) if prev_or_noise is not None else mean
    d = prev.detach() - mean
    logp = alpha * d * d + gamma
    if reduction == 0:
        logp = logp.mean(dim=tuple(range(1, v.ndim)))
    elif reduction == 1:
        logp = logp.sum(dim=1)
    red = tuple(range(1, v.ndim))
    ref_sq = (((vf - ref.to(acc)) ** 2).sum(red) if ref is not None
              else torch.zeros(v.shape[0], dtype=acc, device=v.device))
    return (logp, ref_sq, mean.to(x.dtype) if write_mean else v.new_empty((0,)),
            prev_out if sampling else v.new_empty((0,)))


# --------------------------------------------------------------------------------------------
# torch.library: fake implementations and autograd of the compiled ops.

def _fake_forward(v, x, prev_or_noise, ref, coefs, reduction, sampling, write_mean):
    acc = _acc(v.dtype)
    # Two distinct empties: a custom op's outputs must not alias each other.
    return (v.new_empty(_logp_shape(v.shape, reduction), dtype=acc),
            v.new_empty((v.shape[0],), dtype=acc),
            x.new_empty(x.shape) if write_mean else v.new_empty((0,)),
            x.new_empty(x.shape) if sampling else v.new_empty((0,)))


def _setup_forward(ctx, inputs, output):
    v, x, prev_or_noise, ref, coefs, reduction, sampling, _ = inputs
    prev = output[3] if sampling else prev_or_noise
    _autograd.save(ctx, v, x, prev, ref, coefs)
    ctx.reduction, ctx.sampling = reduction, sampling
    # An output nobody differentiated arrives as None, not as zeros: no zero-fill launches, and
    # an unused ref_sq (a reference given for the KL metric only, beta = 0) keeps the backward
    # from reading ref_model_output at all.
    ctx.set_materialize_grads(False)


def _compact_logp_grad(grad_logp, reduction, elements):
    """(gradient, reduction) to run the step's backward with. The gradient of a per-element
    log-prob (reduction "none") that arrives as an expanded view -- from logp.sum() or .mean(),
    or a per-sample / per-position weight broadcast against it -- would become a full-size
    float32 tensor through .contiguous() (one float32 latent; found by audit, 2026-11-22). It is
    the same gradient as a per-sample one (reduction "mean", times the `elements` the mean
    divides by: one float rounding of that product) or a per-position one (reduction
    "channel_sum", whose rows the kernel reads once per channel)."""
    if reduction == 2 and grad_logp.dim() >= 2 and grad_logp.numel():
        strides = grad_logp.stride()
        if all(st == 0 for st in strides[1:]):
            return grad_logp[(slice(None),) + (0,) * (grad_logp.dim() - 1)] * elements, 0
        if strides[1] == 0:
            return grad_logp[:, 0].contiguous(), 1
    return grad_logp.contiguous(), reduction


def _make_backward(backward_op):
    def backward(ctx, grad_logp, grad_ref_sq, grad_mean, grad_prev):
        _autograd.refuse_double_backward("sde_step_with_logprob")
        v, x, prev, ref, coefs = _autograd.saved(ctx)
        # A sampled prev_sample is mean + s*noise: its gradient reaches v through the mean.
        if ctx.sampling and grad_prev is not None and grad_prev.numel():
            grad_mean = grad_prev if grad_mean is None or not grad_mean.numel() else grad_mean + grad_prev
        if grad_mean is not None and not grad_mean.numel():
            grad_mean = None
        if ref is None:
            grad_ref_sq = None
        reduction = ctx.reduction
        if grad_logp is not None:
            grad_logp, reduction = _compact_logp_grad(grad_logp, reduction,
                                                      math.prod(v.shape[1:]))
        grad_v = backward_op(
            v, x, prev, ref, coefs, reduction, grad_logp,
            None if grad_mean is None else _kernel_layout(grad_mean.to(x.dtype)),
            None if grad_ref_sq is None else grad_ref_sq.contiguous())
        return grad_v, None, None, None, None, None, None, None
    return backward


def _register_compiled():
    try:
        from .. import _C  # noqa: F401  (defines the tbkernels:: schemas)
    except ImportError:
        return
    torch.library.register_fake("tbkernels::flow_step_forward")(_fake_forward)

    @torch.library.register_fake("tbkernels::flow_step_backward")
    def _(v, x, prev, ref, coefs, reduction, grad_logp, grad_mean, grad_ref_sq):
        return v.new_empty(v.shape)

    torch.library.register_autograd(
        "tbkernels::flow_step_forward",
        _make_backward(torch.ops.tbkernels.flow_step_backward),
        setup_context=_setup_forward)


_register_compiled()


# The Triton backend (kernels/flow_step.py, imported on first use): custom ops of the same
# signatures as the C++ ones, with the same fake and autograd formula.

@torch.library.custom_op("tbkernels::flow_step_forward_triton", mutates_args=())
def _flow_step_forward_triton(v: torch.Tensor, x: torch.Tensor, prev_or_noise: torch.Tensor | None,
                              ref: torch.Tensor | None, coefs: torch.Tensor, reduction: int,
                              sampling: bool, write_mean: bool
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from tbkernels.kernels.flow_step import flow_step_forward_triton
    return flow_step_forward_triton(v, x, prev_or_noise, ref, coefs, reduction, sampling,
                                    write_mean)


@torch.library.custom_op("tbkernels::flow_step_backward_triton", mutates_args=())
def _flow_step_backward_triton(v: torch.Tensor, x: torch.Tensor, prev: torch.Tensor | None,
                               ref: torch.Tensor | None, coefs: torch.Tensor, reduction: int,
                               grad_logp: torch.Tensor | None, grad_mean: torch.Tensor | None,
                               grad_ref_sq: torch.Tensor | None) -> torch.Tensor:
    from tbkernels.kernels.flow_step import flow_step_backward_triton
    return flow_step_backward_triton(v, x, prev, ref, coefs, reduction, grad_logp, grad_mean,
                                     grad_ref_sq)


_flow_step_forward_triton.register_fake(_fake_forward)


@_flow_step_backward_triton.register_fake
def _(v, x, prev, ref, coefs, reduction, grad_logp, grad_mean, grad_ref_sq):
    return v.new_empty(v.shape)


_flow_step_forward_triton.register_autograd(_make_backward(_flow_step_backward_triton),
                                            setup_context=_setup_forward)


# The per-sample surrogate epilogue of flow_grpo_loss (no advantage map): loss, metrics and the
# per-sample gradient factors in one launch, C++ (CPU, CUDA: csrc/flow_grpo_surrogate.h) or
# Triton (kernels/flow_step.py). Its backward is one multiply; the gradients then go to
# flow_step_backward. The reference backend keeps the plain-PyTorch surrogate (_policy_loss).

def _fake_surrogate(logp, ref_sq, kl_weight, old_log_prob, advantages, clip_range, adv_clip_max,
                    beta, simple):
    return logp.new_empty(()), logp.new_empty((4,)), logp.new_empty((2, logp.shape[0]))


def _setup_surrogate(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[2])
    # beta = 0: the KL is a metric only, so ref_sq gets no gradient (and the step's backward
    # then skips the reference)
    ctx.kl_grad = inputs[1] is not None and inputs[7] != 0


def _surrogate_backward(ctx, grad_loss, grad_metrics, grad_factors):
    _autograd.refuse_double_backward("flow_grpo_loss")
    (factors,) = ctx.saved_tensors
    grads = factors * grad_loss           # one launch for both per-sample gradients
    return grads[0], grads[1] if ctx.kl_grad else None, None, None, None, None, None, None, None


def _register_compiled_surrogate():
    try:
        from .. import _C  # noqa: F401  (defines the tbkernels:: schemas)
    except ImportError:
        return
    torch.library.register_fake("tbkernels::flow_grpo_surrogate")(_fake_surrogate)
    torch.library.register_autograd("tbkernels::flow_grpo_surrogate", _surrogate_backward,
                                    setup_context=_setup_surrogate)


_register_compiled_surrogate()


@torch.library.custom_op("tbkernels::flow_grpo_surrogate_triton", mutates_args=())
def _flow_grpo_surrogate_triton(logp: torch.Tensor, ref_sq: torch.Tensor | None,
                                kl_weight: torch.Tensor | None, old_log_prob: torch.Tensor,
                                advantages: torch.Tensor, clip_range: float, adv_clip_max: float,
                                beta: float, simple: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from tbkernels.kernels.flow_step import flow_grpo_surrogate_triton
    return flow_grpo_surrogate_triton(logp, ref_sq, kl_weight, old_log_prob, advantages,
                                      clip_range, adv_clip_max, beta, simple)


_flow_grpo_surrogate_triton.register_fake(_fake_surrogate)
_flow_grpo_surrogate_triton.register_autograd(_surrogate_backward,
                                              setup_context=_setup_surrogate)


# The surrogate with a ViPO map: the same formula with one policy term per position, in place on
# the step's [B, positions] log-prob (which becomes d loss / d logp). Used below autograd by
# _MapLoss only (the compiled path keeps _policy_loss, which Inductor fuses), so no autograd
# formula is registered.

def _fake_map_surrogate(logp, ref_sq, kl_weight, old_log_prob, advantages, advantage_map,
                        clip_range, adv_clip_max, beta, simple):
    return logp.new_empty(()), logp.new_empty((4,)), logp.new_empty((logp.shape[0],))


def _register_compiled_map_surrogate():
    try:
        from .. import _C  # noqa: F401  (defines the tbkernels:: schemas)
    except ImportError:
        return
    torch.library.register_fake("tbkernels::flow_grpo_map_surrogate")(_fake_map_surrogate)


_register_compiled_map_surrogate()


@torch.library.custom_op("tbkernels::flow_grpo_map_surrogate_triton", mutates_args=("logp",))
def _flow_grpo_map_surrogate_triton(logp: torch.Tensor, ref_sq: torch.Tensor | None,
                                    kl_weight: torch.Tensor | None, old_log_prob: torch.Tensor,
                                    advantages: torch.Tensor, advantage_map: torch.Tensor,
                                    clip_range: float, adv_clip_max: float, beta: float,
                                    simple: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from tbkernels.kernels.flow_step import flow_grpo_map_surrogate_triton
    return flow_grpo_map_surrogate_triton(logp, ref_sq, kl_weight, old_log_prob, advantages,
                                          advantage_map, clip_range, adv_clip_max, beta, simple)


_flow_grpo_map_surrogate_triton.register_fake(_fake_map_surrogate)


# flow_grpo_loss with a per-element map: the step and the surrogate as one op that also writes
# the gradient of a unit loss (every term of it is elementwise), so no [B, N] float32 log-prob
# buffer exists. Used below autograd by _ElemLoss only (compiled: _policy_loss, as for maps).

def _fake_elem_loss(model_output, sample, prev_sample, ref_model_output, coefs, kl_weight,
                    old_log_prob, advantages, advantage_map, clip_range, adv_clip_max, beta,
                    simple, write_grad):
    grad_v = (model_output.new_empty(model_output.shape) if write_grad
              else model_output.new_empty((0,)))
    return coefs.new_empty(()), coefs.new_empty((4,)), grad_v


def _register_compiled_elem_loss():
    try:
        from .. import _C  # noqa: F401  (defines the tbkernels:: schemas)
    except ImportError:
        return
    torch.library.register_fake("tbkernels::flow_grpo_elem_loss")(_fake_elem_loss)


_register_compiled_elem_loss()


@torch.library.custom_op("tbkernels::flow_grpo_elem_loss_triton", mutates_args=())
def _flow_grpo_elem_loss_triton(model_output: torch.Tensor, sample: torch.Tensor,
                                prev_sample: torch.Tensor, ref_model_output: torch.Tensor | None,
                                coefs: torch.Tensor, kl_weight: torch.Tensor | None,
                                old_log_prob: torch.Tensor, advantages: torch.Tensor,
                                advantage_map: torch.Tensor, clip_range: float,
                                adv_clip_max: float, beta: float, simple: bool,
                                write_grad: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from tbkernels.kernels.flow_step import flow_grpo_elem_loss_triton
    return flow_grpo_elem_loss_triton(model_output, sample, prev_sample, ref_model_output, coefs,
                                      kl_weight, old_log_prob, advantages, advantage_map,
                                      clip_range, adv_clip_max, beta, simple, write_grad)


_flow_grpo_elem_loss_triton.register_fake(_fake_elem_loss)


def _elem_loss_op(name):
    if name == "triton":
        return _flow_grpo_elem_loss_triton
    return torch.ops.tbkernels.flow_grpo_elem_loss


def _map_surrogate_op(name):
    if name == "triton":
        return _flow_grpo_map_surrogate_triton
    return torch.ops.tbkernels.flow_grpo_map_surrogate


def _backward_op(name):
    if name == "triton":
        return _flow_step_backward_triton
    return torch.ops.tbkernels.flow_step_backward


def _surrogate_op(name):
    if name == "triton":
        return _flow_grpo_surrogate_triton
    return torch.ops.tbkernels.flow_grpo_surrogate


def _forward_op(name):
    if name == "reference":
        return _forward_reference
    if name == "triton":
        return _flow_step_forward_triton
    return torch.ops.tbkernels.flow_step_forward


@torch.compiler.assume_constant_result
def _pick(device: torch.device, backend: str | None) -> str:
    return resolve_backend("flow_grpo", IMPLEMENTED, device, backend)


# --------------------------------------------------------------------------------------------
# Argument handling.

@_compile.inline_only
def _sigma_tensor(value, name, batch, device):
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] not in (1, batch)):
            raise ValueError(f"{name} must be a float, a 0-d tensor or a [B] = [{batch}] tensor, "
                             f"got shape {list(value.shape)}")
        return value.detach().to(device=device, dtype=torch.float64).reshape(-1).expand(batch)
    if _is_number(value):
        if torch.compiler.is_compiling():
            # ones * value, not torch.full: Inductor bakes a fill value into the graph (one graph
            # per sigma, and a sampler's steps reach torch._dynamo's recompile limit of 8 in
            # its first iteration; found by audit), while a float multiplied into a tensor
            # stays an input of the graph. The same values: 1.0 * value is exact.
            return torch.ones((batch,), dtype=torch.float64, device=device) * value
        return torch.full((batch,), float(value), dtype=torch.float64, device=device)
    raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")


def _is_number(value):
    """A real number given as a Python or NumPy scalar (numpy.float32 is not a float)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _scalar_setting(value, name):
    """noise_level / sigma_max / sigma_min as a Python float (None stays None)."""
    if value is None or _is_number(value):
        return None if value is None else float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        return float(value.detach().reshape(()).item())
    raise TypeError(f"{name} must be a float (or a one-element tensor), got "
                    f"{type(value).__name__}" + (f" of shape {list(value.shape)}"
                                                 if isinstance(value, torch.Tensor) else ""))


def _host_levels(value, name, batch):
    """A host sigma as a tuple of B Python floats (the cache key), without building tensors
    for plain numbers."""
    if _is_number(value):
        return (float(value),) * batch
    if isinstance(value, torch.Tensor) and value.dim() <= 1 and value.numel() in (1, batch):
        # a CPU tensor's values, read directly (float32 or float64 -> exact Python floats)
        levels = value.detach().reshape(-1).tolist()
        return tuple(levels * batch) if len(levels) == 1 and batch != 1 else tuple(levels)
    return tuple(_sigma_tensor(value, name, batch, torch.device("cpu")).tolist())


def _randn(shape, generator, device, dtype):
    """Standard normal noise as diffusers' randn_tensor draws it, so a sampled step reproduces
    Flow-GRPO's: one generator, or a list of B (sample i from generator i); a generator on the
    CPU for latents elsewhere draws there and copies."""
    if isinstance(generator, (list, tuple)):
        if len(generator) == shape[0] == 0:
            return torch.empty(shape, device=device, dtype=dtype)
        if len(generator) == 1:
            generator = generator[0]
        elif len(generator) != shape[0]:
            raise ValueError(f"generator: a list needs one generator per sample (B = "
                             f"{shape[0]}), got {len(generator)}")
        else:
            return torch.cat([_randn((1,) + tuple(shape[1:]), g, device, dtype)
                              for g in generator])
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or a list of them, got "
                        f"{type(generator).__name__}")
    if generator is not None and generator.device.type != device.type:
        if generator.device.type != "cpu":
            raise ValueError(f"generator is on {generator.device}, the latents on {device}: use "
                             f"a generator on {device.type} or on the CPU")
        return torch.randn(shape, generator=generator, device="cpu", dtype=dtype).to(device)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def _check_number_sigmas(sigma, sigma_next, sde_type, noise_level, sigma_max, sigma_min):
    """While torch.compile traces, the tensor checks below cannot run (their values are not
    known, and reading them would break the graph). Sigmas given as Python numbers are known to
    the trace, though: check those here in plain Python, so a compiled step refuses the same bad
    input instead of returning NaN. Comparisons only, and messages without the values: after a
    recompile Dynamo may trace such floats symbolically, where a comparison becomes a guard but
    float(), math.isfinite or formatting the value do not trace. (With fullgraph=True Dynamo
    reports the ValueError as "Observed exception", its message under "debug context".)"""
    if not (_is_number(sigma) and _is_number(sigma_next)):
        return
    s, sn = sigma, sigma_next
    later = " (checked while torch.compile traced; call eagerly to see the values)"
    if not (sn == sn and -math.inf < sn < math.inf):
        raise ValueError("sigma_next must be a finite number in [0, sigma)" + later)
    if not 0 < s <= 1:
        raise ValueError("sigma must lie in (0, 1] (rectified flow noise level)" + later)
    if not sn < s:
        raise ValueError("sigma_next must be < sigma (sampling goes from noise at 1 towards data "
                         "at 0)" + later)
    if not sn >= 0:
        raise ValueError("sigma_next must be >= 0" + later)
    if not all(v is None or _is_number(v) for v in (noise_level, sigma_max, sigma_min)):
        return
    if sde_type == "wan" and not sigma_min + (sigma_max - sigma_min) * s > 0:
        raise ValueError("sde_type='wan' gives a degenerate transition: std_dev_t = sigma_min + "
                         "(sigma_max - sigma_min) * sigma must be > 0" + later)
    if sde_type == "flow_grpo" and s == 1 and sigma_max is not None and not sigma_max < 1:
        raise ValueError("sde_type='flow_grpo' gives a degenerate transition: at sigma = 1 "
                         "Flow-GRPO's std uses 1 - sigma_max, which must be > 0" + later)


def _check_number_kl_step(sde_type, sigma_next, beta):
    """The compiled counterpart of _kl_weight's refusal: CPS's last step (sigma_next = 0) is
    deterministic, so a KL in the loss (beta != 0) would be infinite. Checked at trace time when
    sigma_next is a Python number, as _check_number_sigmas (comparisons only, no values)."""
    if sde_type == "cps" and _is_number(sigma_next) and sigma_next == 0 and beta != 0:
        raise ValueError("the KL to the reference is undefined at CPS's last step "
                         "(sde_type='cps', sigma_next = 0: deterministic, std 0), so beta != 0 "
                         "would make the loss infinite; leave that step out of the KL (beta=0 "
                         "there) (checked while torch.compile traced)")


@_compile.inline_only
def _check_sigmas(sigma, sigma_next):
    if torch.compiler.is_compiling() or sigma.is_meta:   # no values to check (tracing, meta)
        return
    if not bool(torch.isfinite(sigma_next).all()):
        raise ValueError(f"sigma_next must be a finite number in [0, sigma), got "
                         f"{sigma_next[~torch.isfinite(sigma_next)][0].item()}")
    if not bool(((sigma > 0) & (sigma <= 1)).all()):
        raise ValueError(f"sigma must lie in (0, 1] (rectified flow noise level), got "
                         f"{sigma.min().item():.6g}..{sigma.max().item():.6g}")
    if not bool((sigma_next < sigma).all()):
        i = int((sigma_next >= sigma).nonzero()[0, 0])
        raise ValueError(f"sigma_next must be < sigma (sampling goes from noise at 1 towards data "
                         f"at 0), got sigma_next={sigma_next[i].item():.6g} >= "
                         f"sigma={sigma[i].item():.6g} at sample {i}")
    if not bool((sigma_next >= 0).all()):
        raise ValueError(f"sigma_next must be >= 0, got {sigma_next.min().item():.6g}")


def _check_latents(model_output, sample, prev_sample, ref_model_output):
    if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
        raise TypeError("model_output and sample must be tensors")
    if model_output.dim() not in (4, 5):
        raise ValueError(f"model_output must be an image [B, C, H, W] or video [B, C, T, H, W] "
                         f"latent, got shape {list(model_output.shape)}")
    if not model_output.dtype.is_floating_point:
        raise TypeError(f"model_output must be floating, got {model_output.dtype}")
    for name, t in (("sample", sample), ("prev_sample", prev_sample),
                    ("ref_model_output", ref_model_output)):
        if t is not None:
            _check_companion(name, t, model_output, same_shape=True)
    if sample.requires_grad:
        raise ValueError("sample requires grad, but tbkernels differentiates the step only in "
                         "model_output (as Flow-GRPO trains); pass sample.detach()")


def _check_companion(name, t, model_output, same_shape=False):
    """A tensor argument read beside model_output: a floating tensor on its device (and of its
    shape, for the latents)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if same_shape and t.shape != model_output.shape:
        raise ValueError(f"{name} has shape {list(t.shape)} but model_output has "
                         f"{list(model_output.shape)}; they must match")
    if t.device != model_output.device:
        raise ValueError(f"{name} is on {t.device} but model_output is on "
                         f"{model_output.device}; move it there")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating, got {t.dtype}")


def _check_finite(**tensors):
    for name, t in tensors.items():
        if t is not None and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t.reshape(-1))).nonzero()[0, 0])
            raise ValueError(f"{name} contains a non-finite value at flat index {bad} "
                             f"({t.reshape(-1)[bad].item()})")


def _kernel_layout(t):
    """t itself where the kernels read it in place (each sample contiguous, any batch stride:
    Flow-GRPO's trajectory slices latents[:, j]), else a contiguous copy."""
    return t if batch_stride(t) is not None else t.contiguous()


def _rows(t, rows):
    """t as the [rows, n] rows the map ops read: a view where each row is contiguous (any row
    stride: a [:, j] slice of log-probs or maps stored for a whole trajectory), else a copy."""
    assert t.shape[0] == rows
    r = t.reshape(rows, math.prod(t.shape[1:]))   # a view whenever the dims after the first merge
    return r if batch_stride(r) is not None else r.contiguous()


def _compute_dtype(*tensors):
    """The dtype the step is computed in: the widest of the given tensors' dtypes. Flow-GRPO
    computes the step in float32 whatever its model's output dtype, so a bfloat16 model_output
    with float32 latents is computed in float32 (read as it is where the kernels take the pair,
    _kernel_dtypes; else converted). Rounding the float32 latents to bfloat16 instead moved
    per-element log-probs by up to 0.079 (sigma 0.8 -> 0.7, [2, 16, 3, 32, 32]), a ratio error
    far beyond any clip range."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors if t is not None))


# Backends whose latent kernels read a bfloat16 / float16 model_output beside float32 latents
# (csrc/flow_step_checks.h, dtypes_supported; kernels/flow_step.py): every kernel backend. The
# reference backend computes such a pair after converting it to float32.
_MIXED_DTYPE_BACKENDS = frozenset({"cpu", "cuda", "triton"})


def _kernel_dtypes(name, model_output, latents, ref):
    """(model dtype, latent dtype) handed to backend `name`'s kernels: the widest dtype given
    (_compute_dtype), except that a bfloat16 / float16 model_output (and reference) beside
    float32 latents is passed as it is where the backend reads that pair: the same float32
    arithmetic without a float32 copy of model_output or a float32 gradient."""
    compute = _compute_dtype(model_output, *latents, ref)
    model = model_output.dtype
    if (name in _MIXED_DTYPE_BACKENDS and compute == torch.float32
            and model in (torch.bfloat16, torch.float16)
            and (ref is None or ref.dtype == model)):
        return model, compute
    return compute, compute


def _latents(dtype, *tensors):
    """Detached, one dtype, in a layout the kernels read (a copy only where needed)."""
    return [None if t is None else _kernel_layout(t.detach().to(dtype)) for t in tensors]


@_compile.inline_only
def _coefficients(model_output, sigma, sigma_next, sde_type, noise_level, sigma_max, sigma_min,
                  dtype=None):
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    if sde_type == "wan" and (sigma_max is None or sigma_min is None):
        raise ValueError("sde_type='wan' needs sigma_max and sigma_min (the schedule's sigmas[1] "
                         "and sigmas[-1]): std_dev_t = sigma_min + (sigma_max - sigma_min)*sigma")
    if torch.compiler.is_compiling():
        _check_number_sigmas(sigma, sigma_next, sde_type, noise_level, sigma_max, sigma_min)
    else:
        # the cache key holds these by value: a 0-d tensor (an annealed noise level, say) would
        # key by identity, and an in-place update would keep returning the old table
        noise_level, sigma_max, sigma_min = (
            _scalar_setting(v, name) for v, name in ((noise_level, "noise_level"),
                                                      (sigma_max, "sigma_max"),
                                                      (sigma_min, "sigma_min")))
    if sde_type in ("flow_grpo", "dance_grpo", "cps") and not noise_level > 0:
        raise ValueError(f"noise_level must be > 0 for sde_type={sde_type!r}, got {noise_level}")
    batch, device = model_output.shape[0], model_output.device
    # With sigma and sigma_next given as numbers or CPU tensors (a scheduler's sigmas usually
    # live on the CPU), the checks and the ~30 tiny float64 ops of the coefficient table run on
    # the host and the [B, 5] table is copied to the device once: on a GPU that saves ~40 kernel
    # launches and the three device-to-host syncs of the checks per call, host time that the
    # fused step's own kernels (~0.1 ms at Wan 480p bf16 B=8) would otherwise wait on. CUDA
    # sigma tensors keep the on-device path (their checks sync). Not while tracing. CPU latents
    # take the same path: there it saves recomputing the table (~140 us) on every call.
    host = not torch.compiler.is_compiling() and all(
        not isinstance(t, torch.Tensor) or t.device.type == "cpu" for t in (sigma, sigma_next))
    acc = _acc(model_output.dtype if dtype is None else dtype)
    if host:
        # A schedule revisits the same few noise levels every iteration: the checked table for
        # a (sigmas, convention, dtype, device) seen before is reused from the device, so the
        # steady state costs a lookup -- no host arithmetic, no copy.
        key = (_host_levels(sigma, "sigma", batch), _host_levels(sigma_next, "sigma_next", batch),
               sde_type, noise_level, sigma_max, sigma_min, acc, device)
        stream, capturing = _stream_state(device)
        per_stream = _COEF_CACHE.get(key)
        if per_stream:
            cached = per_stream.get(stream)
            if cached is None and capturing:
                # CUDA-graph capture runs on its own stream: take a table made before it (the
                # capture began with a device sync, so its copy is complete) rather than
                # capturing a copy from a pinned host buffer that replays would read after it
                # is freed
                cached = next(iter(per_stream.values()))
            if cached is not None:
                return cached
    if host and torch.is_inference_mode_enabled():
        # a cached table outlives this call: made under inference_mode it would be an inference
        # tensor, which a later differentiable call at the same noise levels cannot save for
        # its backward (the usual rollout-then-train loop)
        with torch.inference_mode(False):
            return _coefficients(model_output, sigma, sigma_next, sde_type, noise_level,
                                 sigma_max, sigma_min, dtype)
    where = torch.device("cpu") if host else device
    s = _sigma_tensor(sigma, "sigma", batch, where)
    sn = _sigma_tensor(sigma_next, "sigma_next", batch, where)
    _check_sigmas(s, sn)
    coefs, std_dev_t = step_coefficients(s, sn, sde_type, noise_level, sigma_max, sigma_min)
    _check_table(coefs, s, sn, sde_type, sigma_max, sigma_min)
    coefs = coefs.to(acc).contiguous()
    # memo: per-sample quantities derived from the table (the KL weight), kept with a cached
    # table so that they too are computed once per noise level
    memo = {}
    if host:
        # the host copies stay in the memo: the KL weight is derived from them on the host too
        memo["host_table"] = (coefs, std_dev_t)
        coefs, std_dev_t = _to_device(coefs, device), _to_device(std_dev_t, device)
        _COEF_CACHE.put(key, stream, (coefs, std_dev_t, memo))
    return coefs, std_dev_t, memo


@_compile.inline_only
def _check_table(coefs, sigma, sigma_next, sde_type, sigma_max, sigma_min):
    """Valid sigmas can still make a convention's transition degenerate: a zero or negative
    Wan std (sigma_min + (sigma_max - sigma_min) * sigma <= 0), or Flow-GRPO's first step with
    sigma_max >= 1 (1 - sigma_max in a square root's denominator). The log-prob would then be
    NaN or infinite everywhere; say which argument did it instead."""
    if torch.compiler.is_compiling() or coefs.is_meta:
        return
    gaussian = sde_type in ("flow_grpo", "dance_grpo", "wan")
    ok = torch.isfinite(coefs).all(dim=1)
    if gaussian:
        ok &= coefs[:, 4] > 0
    if bool(ok.all()):
        return
    i = int((~ok).nonzero()[0, 0])
    raise ValueError(_degenerate_message(sde_type, coefs[i, 4].item(), i, sigma[i].item(),
                                         sigma_next[i].item(), sigma_max, sigma_min))


def _degenerate_message(sde_type, std, i, s, sn, sigma_max, sigma_min):
    hint = {"wan": f"std_dev_t = sigma_min + (sigma_max - sigma_min) * sigma must be > 0; got "
                   f"sigma_max={sigma_max!r}, sigma_min={sigma_min!r}",
            "flow_grpo": f"at sigma = 1 Flow-GRPO's std uses sigma_max (the schedule's sigmas[1]) "
                         f"in 1 - sigma_max, which must be > 0; got sigma_max={sigma_max!r}"}
    return (f"sde_type={sde_type!r} gives a degenerate transition (std {std:.6g}, coefficients "
            f"not finite or std <= 0) at sample {i}: sigma={s:.6g}, sigma_next={sn:.6g}. "
            + hint.get(sde_type, "check noise_level and the sigmas"))


def _stream_state(device):
    """(current CUDA stream of ``device``, whether it is capturing a CUDA graph); (None, False)
    off CUDA. The coefficient cache keeps one entry per stream: a table is copied to the device
    asynchronously on the stream current when its noise levels are first seen (and is that
    stream's memory when evicted), so a call on another stream must not read it before that
    copy has run, nor have it freed under its own pending work."""
    if device.type != "cuda":
        return None, False
    return (torch.cuda.current_stream(device).cuda_stream,
            torch.cuda.is_current_stream_capturing())


def _kl_weight_and_std(coefs, std_dev_t, kl_form, numel, acc):
    """(w, s): the KL weight cv^2 / (2 numel s^2) and the std s it divides by (_kl_weight)."""
    cv = coefs[:, 1].to(acc)
    kl_std = (std_dev_t if kl_form == "flow_grpo" else coefs[:, 4].double()).to(acc)
    return (cv * cv) / (numel * 2 * kl_std * kl_std), kl_std


@_compile.inline_only
def _kl_weight(coefs, std_dev_t, kl_form, numel, acc, memo, beta=0.0):
    """Per-sample w with kl = ref_sq * w: mean - mean_ref = cv * (v - v_ref), so the KL needs
    only sum((v - v_ref)^2) per sample, times cv^2 / (2 numel s^2) with s the training script's
    std_dev_t (kl_form "flow_grpo") or the transition std (the exact Gaussian KL). Memoized
    with a cached table; for a table made on the host it is computed there and copied (no device
    arithmetic), otherwise it is six tiny launches on the device."""
    if torch.compiler.is_compiling():
        # traced: no memo (a traced table is never a cached one, and looking the key up would
        # specialise numel: one graph per latent size under dynamic shapes, found by audit)
        return _kl_weight_and_std(coefs, std_dev_t, kl_form, numel, acc)[0]
    key = (kl_form, numel, acc)
    if key not in memo and "host_table" in memo and torch.is_inference_mode_enabled():
        with torch.inference_mode(False):     # memoized with a cached table (_coefficients)
            return _kl_weight(coefs, std_dev_t, kl_form, numel, acc, memo, beta)
    if key not in memo:
        host = memo.get("host_table")
        device = coefs.device
        if host is not None:
            coefs, std_dev_t = host
        w, kl_std = _kl_weight_and_std(coefs, std_dev_t, kl_form, numel, acc)
        # CPS's last step (sigma_next = 0) is deterministic: std 0, an infinite weight. Found
        # once per table (on the host for a cached one) and kept with it: a KL in the loss
        # (beta != 0) is then refused, a KL only logged (beta = 0) reads inf.
        infinite = None
        if not w.is_meta and not bool(torch.isfinite(w).all()):
            i = int((~torch.isfinite(w)).nonzero()[0, 0])
            infinite = (i, kl_std[i].item())
        memo[key] = (_to_device(w, device) if host is not None else w), infinite
    w, infinite = memo[key]
    if infinite is not None and beta != 0:
        raise ValueError(f"the KL to the reference is undefined at sample {infinite[0]}: the "
                         f"transition std is {infinite[1]:.6g} (sde_type='cps' at sigma_next = 0, "
                         f"its last step, is deterministic), so beta = {beta} would make the "
                         "loss infinite; leave that step out of the KL (beta=0 there)")
    return w


class _LRU:
    """A small thread-safe LRU map of dicts (per key, the device tensors of a coefficient table
    per CUDA stream; never handed out for writing: flow_grpo_loss uses them internally,
    sde_step_with_logprob returns a copy)."""

    def __init__(self, size):
        self.size, self.items, self.lock = size, collections.OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def clear(self):
        with self.lock:
            self.items.clear()

    def put(self, key, inner, value):
        """items[key][inner] = value: a dict per key (the coefficient cache's streams)."""
        with self.lock:
            self.items.setdefault(key, {})[inner] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


_COEF_CACHE = _LRU(1024)


def _to_device(t, device):
    """A small host tensor onto the device without waiting for the device's queue: staged
    through (cached) pinned memory, copied asynchronously."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# --------------------------------------------------------------------------------------------
# Public API.

def sde_step_with_logprob(model_output, sigma, sigma_next, sample, prev_sample=None, *,
                          sde_type="flow_grpo", noise_level=0.7, generator=None,
                          logprob_reduction="mean", sigma_max=None, sigma_min=None,
                          backend=None, check_finite=False):
    """One stochastic sampling step of a flow-matching model and its log-probability.

    A drop-in for Flow-GRPO's ``sde_step_with_logprob`` (same argument meaning, same return order),
    extended to the other systems' conventions.

    Parameters
    ----------
    model_output : Tensor ``[B, C, H, W]`` or ``[B, C, T, H, W]`` (fp32/bf16/fp16/fp64)
        Predicted velocity v. Differentiable.
    sigma, sigma_next : float or Tensor ``[B]``
        Noise levels of this step, ``0 <= sigma_next < sigma <= 1``. Numbers or CPU tensors
        (as a scheduler keeps them) are checked and turned into coefficients on the host, and
        the table is cached on the device per noise level; tensors on the GPU cost ~30 tiny
        kernels and three syncs per call (docs/flow_grpo.md, "Host overhead").
    sample : Tensor like model_output
        The current latent x_t (no gradient).
    prev_sample : Tensor like model_output, optional
        The stored next latent (training). None: sample it (respecting ``generator``).
    generator : torch.Generator or a list of B of them, optional
        As diffusers' ``randn_tensor`` takes it (Flow-GRPO passes its per-prompt generators
        through the pipeline): a list draws each sample's noise from its own generator, and a
        CPU generator beside CUDA latents draws on the CPU and copies the noise over.
    sde_type : ``"flow_grpo"`` | ``"dance_grpo"`` | ``"wan"`` | ``"cps"`` | ``"ode"``
        Flow-GRPO's SDE (sigma_t = a sqrt(t/(1-t))), DanceGRPO's (sigma_t = eta = noise_level),
        Wan's (sigma_t linear in sigma between sigma_min and sigma_max), Coefficients-Preserving
        Sampling, or the deterministic ODE step. CPS and ODE log-probs are Flow-GRPO's constant-free
        ``-(prev - mean)^2``.
    noise_level : float
        a for flow_grpo/cps, eta for dance_grpo; unused by wan and ode. The default 0.7 is
        Flow-GRPO's a; DanceGRPO's scripts use eta = 0.3 (Flux, Wan2.1) or 0.25 (HunyuanVideo),
        so pass it with ``sde_type="dance_grpo"``.
    logprob_reduction : ``"mean"`` | ``"channel_sum"`` | ``"none"``
        Mean over all latent elements → ``[B]`` (all public systems); sum over channels →
        ``[B, (T,) H, W]`` (ViPO's dense form); elementwise.
    sigma_max, sigma_min : float, optional
        Wan's schedule bounds (required for ``"wan"``). For flow_grpo, sigma_max replaces sigma in
        the denominator at sigma = 1; default sigma_next, which equals Flow-GRPO's ``sigmas[1]``
        at the first step.
    check_finite : bool
        Check every input for NaN/inf first (costs one pass per input).

    The step is computed in the widest dtype of model_output, sample and prev_sample (a bfloat16
    model_output with float32 latents: float32, as Flow-GRPO computes it). One dtype, or a
    bfloat16 / float16 model_output beside float32 latents, is read as it is; other pairs are
    converted. Latents whose samples are each contiguous (any batch stride, e.g. a trajectory's
    ``latents[:, j]``) are read in place.

    Returns
    -------
    prev_sample : the given one, or the new sample in the compute dtype
    log_prob : float32 (float64 when computing in float64), shaped by ``logprob_reduction``
    prev_sample_mean : in the compute dtype
    std_dev_t : ``[B, 1, 1, 1(, 1)]``, float32 (float64 when computing in float64), what each
        system returns (Flow-GRPO and Wan: sigma_t; DanceGRPO: eta*sqrt(-dt); CPS: its transition
        std; ODE: 0)
    """
    _check_latents(model_output, sample, prev_sample, None)
    if logprob_reduction not in _REDUCTION_CODE:
        raise ValueError(f"logprob_reduction must be one of {REDUCTIONS}, got {logprob_reduction!r}")
    if check_finite:
        _check_finite(model_output=model_output, sample=sample, prev_sample=prev_sample)
    name = _pick(model_output.device, backend)
    model_dtype, dtype = _kernel_dtypes(name, model_output, (sample, prev_sample), None)
    coefs, std_dev_t, _ = _coefficients(model_output, sigma, sigma_next, sde_type, noise_level,
                                        sigma_max, sigma_min, dtype)
    v = _kernel_layout(model_output.to(model_dtype))
    (x, prev) = _latents(dtype, sample, prev_sample)
    sampling = prev_sample is None
    noise = None
    if sampling and sde_type != "ode":
        noise = _randn(model_output.shape, generator, v.device, dtype)
    logp, _, mean, new_prev = _forward_op(name)(v, x, noise if sampling else prev, None, coefs,
                                                _REDUCTION_CODE[logprob_reduction], sampling, True)
    out_prev = new_prev if sampling else prev_sample
    shp = (-1,) + (1,) * (v.ndim - 1)
    # a fresh tensor: std_dev_t may be a cached table's (see _coefficients)
    return out_prev, logp, mean, std_dev_t.to(_acc(dtype), copy=True).reshape(shp)


def flow_grpo_loss(model_output, sample, prev_sample, sigma, sigma_next, old_log_prob, advantages,
                   *, ref_model_output=None, beta=0.0, clip_range=1e-4, adv_clip_max=5.0,
                   advantage_map=None, sde_type="flow_grpo", noise_level=0.7, kl_form="flow_grpo",
                   vipo_form="clipped", sigma_max=None, sigma_min=None, backend=None,
                   check_finite=False):
    """Flow-GRPO's per-timestep loss, fused: log-prob, KL to the reference, clipped surrogate.

    ``loss = mean(max(-A*ratio, -A*clamp(ratio, 1-clip_range, 1+clip_range))) + beta*mean(kl)``
    with ``ratio = exp(logp - old_log_prob)`` and ``A = clamp(advantages, ±adv_clip_max)``.

    Parameters
    ----------
    model_output, sample, prev_sample : Tensor ``[B, C, (T,) H, W]``
        Current policy's velocity (differentiable), x_t and the stored x_{t+dt}.
    sigma, sigma_next : float or ``[B]`` (numbers or CPU tensors: no coefficient work on the GPU)
    old_log_prob : Tensor ``[B]`` (no map), ``[B, (T,) H, W]`` (map without channels: ViPO's
        channel-summed per-position log-prob) or like the latent (per-element map).
    advantages : Tensor ``[B]``
    ref_model_output : Tensor like model_output, optional
        The reference policy's velocity; needed when ``beta != 0``; never differentiated.
    advantage_map : Tensor ``[B, (T,) H, W]`` (broadcast over channels) or ``[B, C, (T,) H, W]``, optional
        ViPO's per-latent map M >= 0: dense advantage ``A_b * M`` with per-position ratios.
    kl_form : ``"flow_grpo"`` (the training script's ||Δμ||²/(2 std_dev_t²)) | ``"exact"``
        (the Gaussian KL ||Δμ||²/(2 s²), s the transition std, as Flow-GRPO's Wan script).
    vipo_form : ``"clipped"`` (the paper's per-position clipped surrogate) | ``"simple"``
        (TeleBoost's report form ``-mean(M*A*log π)``).

    Computed in the widest dtype of the latents given (see :func:`sde_step_with_logprob`);
    trajectory slices ``[:, j]`` of latents, and of a stored per-position/per-element
    ``old_log_prob`` or map, are read in place.

    Returns
    -------
    loss : 0-d tensor, differentiable in model_output only
    metrics : dict of detached 0-d tensors ``approx_kl``, ``clipfrac``, ``kl``, ``ratio_mean``
    """
    _check_latents(model_output, sample, prev_sample, ref_model_output)
    if prev_sample is None:
        raise ValueError("flow_grpo_loss needs the stored prev_sample")
    if kl_form not in KL_FORMS:
        raise ValueError(f"kl_form must be one of {KL_FORMS}, got {kl_form!r}")
    if vipo_form not in VIPO_FORMS:
        raise ValueError(f"vipo_form must be one of {VIPO_FORMS}, got {vipo_form!r}")
    if not 0 <= beta < math.inf:   # (comparisons: math.isfinite does not trace a SymFloat)
        raise ValueError(f"beta (the KL coefficient) must be a finite number >= 0, got {beta}")
    if beta != 0 and ref_model_output is None:
        raise ValueError(f"beta = {beta} needs ref_model_output (the reference policy's velocity)")
    if ref_model_output is not None and sde_type == "ode":
        raise ValueError("sde_type='ode' is deterministic (zero transition std): there is no KL to "
                         "the reference policy; drop ref_model_output/beta or use a stochastic step")
    if not (clip_range > 0 and adv_clip_max > 0):
        raise ValueError(f"clip_range and adv_clip_max must be > 0, got {clip_range}, {adv_clip_max}")
    for arg, t in (("old_log_prob", old_log_prob), ("advantages", advantages),
                   ("advantage_map", advantage_map)):
        if t is not None or arg != "advantage_map":
            _check_companion(arg, t, model_output)
    batch = model_output.shape[0]
    reduction = 0
    if advantage_map is not None:
        if advantage_map.dim() == model_output.dim() - 1:
            reduction = 1
        elif advantage_map.dim() == model_output.dim():
            reduction = 2
        else:
            raise ValueError(f"advantage_map must be [B, (T,) H, W] or [B, C, (T,) H, W] for latents "
                             f"{list(model_output.shape)}, got {list(advantage_map.shape)}")
    logp_shape = _logp_shape(model_output.shape, reduction)
    if advantage_map is not None:
        try:
            ok = torch.broadcast_shapes(advantage_map.shape, logp_shape) == torch.Size(logp_shape)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"advantage_map of shape {list(advantage_map.shape)} does not "
                             f"broadcast to the per-position log-prob shape {list(logp_shape)}")
    if tuple(old_log_prob.shape) != logp_shape:
        raise ValueError(f"old_log_prob must have shape {list(logp_shape)} "
                         f"({'per sample' if reduction == 0 else 'per position'}), got "
                         f"{list(old_log_prob.shape)}")
    if tuple(advantages.shape) != (batch,):
        raise ValueError(f"advantages must have shape [B] = [{batch}], got {list(advantages.shape)}")
    if check_finite:
        _check_finite(model_output=model_output, sample=sample, prev_sample=prev_sample,
                      ref_model_output=ref_model_output, old_log_prob=old_log_prob,
                      advantages=advantages, advantage_map=advantage_map)
    name = _pick(model_output.device, backend)
    model_dtype, dtype = _kernel_dtypes(name, model_output, (sample, prev_sample),
                                        ref_model_output)
    coefs, std_dev_t, memo = _coefficients(model_output, sigma, sigma_next, sde_type,
                                           noise_level, sigma_max, sigma_min, dtype)
    v = _kernel_layout(model_output.to(model_dtype))
    x, prev = _latents(dtype, sample, prev_sample)
    (ref,) = _latents(model_dtype, ref_model_output)
    acc = _acc(dtype)
    kl_w = (None if ref is None else
            _kl_weight(coefs, std_dev_t, kl_form, math.prod(model_output.shape[1:]), acc, memo,
                       beta))
    if ref is not None and torch.compiler.is_compiling():
        _check_number_kl_step(sde_type, sigma_next, beta)
    elem = name != "reference" and not torch.compiler.is_compiling() and reduction == 2
    # (the per-element op may read old_log_prob as stored: no conversion for it here)
    old_lp = old_log_prob.detach()
    old_lp = old_lp if elem else old_lp.to(acc)
    adv = advantages.detach().to(acc)
    consts = (float(clip_range), float(adv_clip_max), float(beta), vipo_form == "simple")
    if name != "reference" and advantage_map is None:
        # the fused [B] epilogue: one launch forward, one multiply backward
        old_lp, adv = old_lp.contiguous(), adv.contiguous()
        if torch.compiler.is_compiling():
            # traced: the ops with their registered autograd (Inductor sees through neither)
            logp, ref_sq, _, _ = _forward_op(name)(v, x, prev, ref, coefs, 0, False, False)
            loss, m, _ = _surrogate_op(name)(logp, None if ref is None else ref_sq, kl_w,
                                             old_lp, adv, *consts)
        else:
            loss, m = _FusedLoss.apply(v, x, prev, ref, coefs, kl_w, old_lp, adv, consts, name)
        return loss, _metric_dict(m, ref, batch)
    if elem:
        # per-element ViPO map, eager: step, surrogate and gradient in one op (see _ElemLoss)
        amap = _map_rows(advantage_map, logp_shape, _elem_rows_dtype(name, advantage_map, acc))
        old_rows = _rows(old_lp.to(_elem_rows_dtype(name, old_lp, acc)), batch)
        if torch.is_grad_enabled() and v.requires_grad:
            loss, m = _ElemLoss.apply(v, x, prev, ref, coefs, kl_w, old_rows, adv.contiguous(),
                                      amap, consts, name)
        else:
            loss, m, _ = _elem_loss_op(name)(v, x, prev, ref, coefs, kl_w, old_rows,
                                             adv.contiguous(), amap, *consts, False)
        return loss, _metric_dict(m, ref, batch)
    if name != "reference" and not torch.compiler.is_compiling():
        # ViPO map per position, eager: the step and the surrogate as one node (see _MapLoss)
        amap = _map_rows(advantage_map, logp_shape, acc)
        loss, m = _MapLoss.apply(v, x, prev, ref, coefs, kl_w, old_lp, adv, amap, consts, name,
                                 reduction)
        return loss, _metric_dict(m, ref, batch)
    logp, ref_sq, _, _ = _forward_op(name)(v, x, prev, ref, coefs, reduction, False, False)
    return _policy_loss(logp, ref_sq if ref is not None else None, kl_w, old_lp, adv,
                        advantage_map, clip_range, adv_clip_max, beta, vipo_form)


_METRICS = ("approx_kl", "clipfrac", "kl", "ratio_mean")


def _metric_dict(m: torch.Tensor, ref, batch: int) -> dict:
    """The kernels' [4] metric vector as a dict. Without a reference the kl metric is 0, as the
    reference backend says; the kernels' 0/B would make it NaN for an empty batch (B = 0, where
    the other metrics are means of nothing and NaN on every backend)."""
    metrics = dict(zip(_METRICS, m.unbind()))
    if ref is None and batch == 0:
        metrics["kl"] = torch.zeros_like(metrics["kl"])
    return metrics


class _FusedLoss(torch.autograd.Function):
    """flow_grpo_loss without an advantage map, eager: the fused step and the [B] epilogue as one
    autograd node whose ops run below the autograd dispatch key. Against two nodes of
    torch.library-registered autograd this saves ~150 us of Python per forward+backward
    (docs/flow_grpo.md, "Host overhead"), which on a GPU is time the step's ~0.1 ms of kernels
    would wait on. torch.compile takes the ops' registered autograd instead (same math)."""

    @staticmethod
    def forward(ctx, v, x, prev, ref, coefs, kl_w, old_lp, adv, consts, name):
        with torch._C._AutoDispatchBelowAutograd():
            logp, ref_sq, _, _ = _forward_op(name)(v, x, prev, ref, coefs, 0, False, False)
            loss, metrics, factors = _surrogate_op(name)(
                logp, None if ref is None else ref_sq, kl_w, old_lp, adv, *consts)
        ctx.mark_non_differentiable(metrics)
        ctx.set_materialize_grads(False)     # no zero-filled gradient for the metrics
        # beta = 0: the KL is only a metric, so the backward does not read the reference
        ctx.kl_grad = ref is not None and consts[2] != 0
        _autograd.save(ctx, v, x, prev, ref if ctx.kl_grad else None, coefs, factors)
        ctx.backend = name
        return loss, metrics

    @staticmethod
    @_autograd.kernel_backward("flow_grpo_loss")   # the kernels' backward has no autograd
    def backward(ctx, grad_loss, grad_metrics):
        if grad_loss is None:
            return (None,) * 10
        v, x, prev, ref, coefs, factors = _autograd.saved(ctx)
        grads = factors * grad_loss          # d loss / d logp and d loss / d ref_sq, one launch
        with torch._C._AutoDispatchBelowAutograd():
            grad_v = _backward_op(ctx.backend)(v, x, prev, ref, coefs, 0, grads[0], None,
                                            grads[1] if ctx.kl_grad else None)
        return (grad_v,) + (None,) * 9


# Backends whose per-element loss reads a bfloat16 / float16 old_log_prob or map as it is beside
# float32 accumulation (csrc/flow_step_checks.h, check_elem_rows).
_REDUCED_ROW_BACKENDS = frozenset({"cpu", "cuda", "triton"})


def _elem_rows_dtype(name, t, acc):
    """The dtype the per-element loss is given old_log_prob / the map in: as stored when that
    is bfloat16 / float16 beside float32 accumulation and backend `name` reads it (a float32
    copy would be a latent-sized temporary), else the accumulation dtype."""
    if (name in _REDUCED_ROW_BACKENDS and acc == torch.float32
            and t.dtype in (torch.bfloat16, torch.float16)):
        return t.dtype
    return acc


def _map_rows(advantage_map, logp_shape, acc):
    """The map as the [B or 1, positions] rows the map ops read: no copy for a map of the
    log-prob's shape (or of one sample's, shared by the batch) already in the accumulation dtype
    with each row contiguous (a trajectory slice [:, j] too); any other broadcast is
    materialised (in that dtype)."""
    m = advantage_map.detach().to(acc)
    if tuple(m.shape[1:]) == tuple(logp_shape[1:]) and m.shape[0] in (1, logp_shape[0]):
        return _rows(m, m.shape[0])
    return m.expand(logp_shape).contiguous().view(logp_shape[0], math.prod(logp_shape[1:]))


class _MapLoss(torch.autograd.Function):
    """flow_grpo_loss with a per-position ViPO map, eager: one autograd node whose ops run below
    the autograd key. The step writes the channel-summed log-prob (a [B, positions] float32
    buffer, 1/C of the latent); flow_grpo_map_surrogate reads it and overwrites it with
    d loss / d log-prob of a unit loss, in one pass and one launch (plus a tiny finalize on a
    GPU). That buffer is saved for backward, which feeds it to the step's backward and scales the
    result by the incoming gradient (one extra rounding of grad_v when that is not a power of
    two). Written as whole-tensor PyTorch the same surrogate allocated some ten full-size float32
    temporaries (20 bf16 latents of peak at Wan 480p, B = 8, per-element map) and, as slabs of
    PyTorch ops, cost a dozen launches per sample."""

    @staticmethod
    def forward(ctx, v, x, prev, ref, coefs, kl_w, old_lp, adv, amap, consts, name, reduction):
        beta = consts[2]
        rows = (v.shape[0], amap.shape[1])               # [B, positions]
        with torch._C._AutoDispatchBelowAutograd():
            logp, ref_sq, _, _ = _forward_op(name)(v, x, prev, ref, coefs, reduction, False,
                                                   False)
            loss, metrics, grad_ref_sq = _map_surrogate_op(name)(
                logp.view(rows), None if ref is None else ref_sq, kl_w,
                _rows(old_lp, rows[0]), adv.contiguous(), amap, *consts)
        ctx.mark_non_differentiable(metrics)
        ctx.set_materialize_grads(False)
        ctx.kl_grad = ref is not None and beta != 0
        _autograd.save(ctx, v, x, prev, ref if ctx.kl_grad else None, coefs, logp,
                              grad_ref_sq if ctx.kl_grad else None)
        ctx.backend, ctx.reduction = name, reduction
        return loss, metrics

    @staticmethod
    @_autograd.kernel_backward("flow_grpo_loss")
    def backward(ctx, grad_loss, grad_metrics):
        if grad_loss is None:
            return (None,) * 12
        v, x, prev, ref, coefs, factor, grad_ref_sq = _autograd.saved(ctx)
        if v.dtype == torch.float16:
            # Scale first: the gradient of a unit loss over a video latent (~1e-8 per element)
            # is below float16's normal range, so written in float16 and scaled afterwards
            # it would be flushed to zero -- the very loss of precision a GradScaler's scale
            # exists to prevent. bfloat16 has float32's range and keeps the cheaper order.
            factor = factor * grad_loss
            grad_ref_sq = None if grad_ref_sq is None else grad_ref_sq * grad_loss
            grad_loss = None
        # The step's backward is linear in its incoming gradients: run it on the gradient of a
        # unit loss and scale the (fresh, owned) result, rather than allocating factor * g, a
        # second [B, positions] float32 buffer.
        with torch._C._AutoDispatchBelowAutograd():
            grad_v = _backward_op(ctx.backend)(v, x, prev, ref, coefs, ctx.reduction, factor,
                                               None, grad_ref_sq)
        return (grad_v if grad_loss is None else grad_v.mul_(grad_loss),) + (None,) * 11


class _ElemLoss(torch.autograd.Function):
    """flow_grpo_loss with a per-element ViPO map, eager: one op computes the loss, the metrics
    and d loss / d model_output of a unit loss in one pass (flow_grpo_elem_loss), and the backward
    scales that gradient in place by the incoming one (one extra rounding of grad_v when that is
    not a power of two, as _MapLoss). So the loss's only latent-sized allocation is the gradient
    it returns, created in the forward instead of the backward; the unfused form kept a [B, N]
    float32 log-prob (two bf16 latents) from the forward to the backward as well.

    A second backward through a retained graph recomputes the gradient from the saved inputs
    (the first one hands its buffer to autograd).

    A float16 model output cannot keep a unit-loss gradient: over a video latent it is ~1e-8 per
    element, below float16's normal range, and would be flushed to zero before a GradScaler's
    scale reached it. So for float16 the forward writes no gradient, and the backward recomputes
    it with the incoming gradient g folded into the op's inputs: the loss is positively
    homogeneous in the clamped advantages and linear in the KL weight, so d(|g| loss)/dv is the
    op's gradient for advantages |g| clamp(A) (adv_clip_max then infinite) and KL weight
    |g| kl_weight, rounded to float16 once; the sign of g is applied after (exact). The cost is
    a second read of the inputs in the backward, the memory that of bfloat16 (the gradient
    only)."""

    @staticmethod
    def forward(ctx, v, x, prev, ref, coefs, kl_w, old_rows, adv, amap, consts, name):
        write_grad = v.dtype != torch.float16
        with torch._C._AutoDispatchBelowAutograd():
            loss, metrics, grad_v = _elem_loss_op(name)(v, x, prev, ref, coefs, kl_w, old_rows,
                                                        adv, amap, *consts, write_grad)
        ctx.mark_non_differentiable(metrics)
        ctx.set_materialize_grads(False)
        ctx.grad_v = grad_v if write_grad else None   # an intermediate: kept as is, not saved
        _autograd.save(ctx, v, x, prev, ref, coefs, kl_w, old_rows, adv, amap)
        ctx.consts, ctx.backend = consts, name
        return loss, metrics

    @staticmethod
    @_autograd.kernel_backward("flow_grpo_loss")
    def backward(ctx, grad_loss, grad_metrics):
        if grad_loss is None:
            return (None,) * 11
        grad_v, ctx.grad_v = ctx.grad_v, None
        v, x, prev, ref, coefs, kl_w, old_rows, adv, amap = _autograd.saved(ctx)
        if v.dtype == torch.float16:
            return (_ElemLoss._float16_grad(ctx, grad_loss, v, x, prev, ref, coefs, kl_w,
                                            old_rows, adv, amap),) + (None,) * 10
        if grad_v is None:                 # retain_graph: the first backward took the buffer
            with torch._C._AutoDispatchBelowAutograd():
                _, _, grad_v = _elem_loss_op(ctx.backend)(v, x, prev, ref, coefs, kl_w, old_rows,
                                                          adv, amap, *ctx.consts, True)
        return (grad_v.mul_(grad_loss),) + (None,) * 10

    @staticmethod
    def _float16_grad(ctx, grad_loss, v, x, prev, ref, coefs, kl_w, old_rows, adv, amap):
        """g * d loss / d v for a float16 v, computed at scale |g| in the op (class docstring)."""
        clip_range, adv_clip_max, beta, simple = ctx.consts
        scale = grad_loss.abs()
        adv = adv.clamp(-adv_clip_max, adv_clip_max) * scale       # [B], as the op clamps it
        kl_w = None if kl_w is None else kl_w * scale
        with torch._C._AutoDispatchBelowAutograd():
            _, _, grad_v = _elem_loss_op(ctx.backend)(v, x, prev, ref, coefs, kl_w, old_rows, adv,
                                                      amap, clip_range, math.inf, beta, simple,
                                                      True)
        # The sign: a pass over the gradient, skipped where reading g costs no device sync.
        if grad_loss.device.type != "cpu" or not float(grad_loss) > 0:
            grad_v.mul_(grad_loss.sign())
        return grad_v


def _policy_loss(logp, ref_sq, kl_w, old_log_prob, advantages, advantage_map, clip_range,
                 adv_clip_max, beta, vipo_form):
    """The surrogate in plain PyTorch: the reference backend, and the per-position (ViPO map)
    case, whose [B, T, H, W] arithmetic is real memory traffic rather than launch overhead."""
    acc = logp.dtype
    a = advantages.clamp(-adv_clip_max, adv_clip_max)
    delta = logp - old_log_prob
    ratio = torch.exp(delta)
    if advantage_map is not None:
        a = a.reshape((-1,) + (1,) * (logp.dim() - 1)) * advantage_map.detach().to(acc)
    if vipo_form == "simple":
        policy = -(a * logp).mean()
    else:
        policy = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    loss = policy
    kl = None
    if ref_sq is not None:
        kl = ref_sq * kl_w
        if beta != 0:
            loss = loss + beta * kl.mean()
    metrics = {
        "approx_kl": 0.5 * (delta.detach() ** 2).mean(),
        "clipfrac": ((ratio.detach() - 1).abs() > clip_range).to(acc).mean(),
        "kl": (kl.detach().mean() if kl is not None
               else torch.zeros((), dtype=acc, device=logp.device)),
        "ratio_mean": ratio.detach().mean(),
    }
    return loss, metrics
