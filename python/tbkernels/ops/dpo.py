"""Memory-lean DPO for video diffusion / flow-matching models (SPEC.md §7, §9, §11; issue 4).

Three layers, each usable alone:

* :func:`per_sample_mse` — the denoising error ``mean over non-batch dims of (pred - target)^2``
  per sample, the quantity every diffusion DPO/KTO loss is built on. A custom op with four
  backends (reference, C++ CPU, CUDA, Triton): the forward reads pred and target once and writes
  ``[B]`` float32; the backward is one elementwise pass. Eager code
  (``F.mse_loss(pred.float(), target.float(), reduction="none").mean(dims)``) materialises two
  float32 copies and a squared difference, and autograd keeps one alive until the backward.
* The losses on those errors — :func:`diffusion_dpo_loss` (Salesforce Diffusion-DPO),
  :func:`flow_dpo_loss` (Flow-DPO, constant or the paper's ``beta*(1-t)^2``; ``preset="teleboost"``
  for TeleBoost's reference-free, un-halved, clamped form) and :func:`diffusion_kto_loss` — with
  optional reference terms and the IPO NLL regularisers (chosen samples, real data). Each returns
  ``(loss, metrics)`` with TRL's metric names.
* :func:`dpo_backward` — runs the chosen / rejected (/ real) branches and leaves the gradient of
  the loss in ``.grad`` in one of three memory modes (``"standard"``, ``"decoupled"``,
  ``"recompute"``; see its docstring and docs/dpo.md).
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from .._backend import resolve_backend
from ._dpo_reference import per_sample_mse_reference
from . import _autograd, _compile

IMPLEMENTED = ("reference", "cpu", "cuda", "triton")
LOSSES = ("diffusion_dpo", "flow_dpo", "teleboost", "kto")
MODES = ("standard", "decoupled", "recompute")
BETA_SCHEDULES = ("constant", "paper")
_SUPPORTED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# TeleBoost clamps the margin to +-20 before the sigmoid weight (dpo_loss.py).
TELEBOOST_MARGIN_CLAMP = 20.0


class DPOInputError(ValueError):
    """Bad input to a DPO/KTO loss or to :func:`dpo_backward`: shapes, beta, options."""


class NonFiniteLossError(FloatingPointError):
    """The loss (or a branch's per-sample errors) is NaN or infinite; nothing was back-propagated
    (or, when found after a backward pass, the gradients were restored)."""


# --------------------------------------------------------------------------------------------
# per_sample_mse: the op, its fake implementations and autograd.

def _acc(*dtypes):
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _fake_forward(pred, target):
    return pred.new_empty((pred.shape[0],), dtype=_acc(pred.dtype, target.dtype))


def _fake_backward(grad_out, pred, target):
    return torch.empty_like(pred)


def _setup(ctx, inputs, output):
    pred, target = inputs
    _autograd.save(ctx, pred, target)


def _make_backward(backward_op):
    def backward(ctx, grad_out):
        _autograd.refuse_double_backward("per_sample_mse")
        pred, target = _autograd.saved(ctx)
        g = grad_out.to(_acc(pred.dtype, target.dtype)).contiguous()
        return backward_op(g, pred, target), None
    return backward


def _register_compiled():
    try:
        from .. import _C  # noqa: F401  (loads the tbkernels:: schemas, incl. per_sample_mse)
    except ImportError:
        return False
    if not hasattr(torch.ops.tbkernels, "per_sample_mse"):
        return False                        # an extension built before this op existed
    torch.library.register_fake("tbkernels::per_sample_mse")(_fake_forward)
    torch.library.register_fake("tbkernels::per_sample_mse_backward")(_fake_backward)
    torch.library.register_autograd("tbkernels::per_sample_mse",
                                    _make_backward(torch.ops.tbkernels.per_sample_mse_backward),
                                    setup_context=_setup)
    return True


_HAS_COMPILED = _register_compiled()


# The Triton backend (kernels/per_sample_mse.py, imported on first use).

@torch.library.custom_op("tbkernels::per_sample_mse_triton", mutates_args=())
def _per_sample_mse_triton(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from tbkernels.kernels.per_sample_mse import per_sample_mse_forward_triton
    return per_sample_mse_forward_triton(pred, target)


@torch.library.custom_op("tbkernels::per_sample_mse_backward_triton", mutates_args=())
def _per_sample_mse_backward_triton(grad_out: torch.Tensor, pred: torch.Tensor,
                                    target: torch.Tensor) -> torch.Tensor:
    from tbkernels.kernels.per_sample_mse import per_sample_mse_backward_triton
    return per_sample_mse_backward_triton(grad_out, pred, target)


_per_sample_mse_triton.register_fake(_fake_forward)
_per_sample_mse_backward_triton.register_fake(_fake_backward)
_per_sample_mse_triton.register_autograd(_make_backward(_per_sample_mse_backward_triton),
                                         setup_context=_setup)


def _op(name):
    if name == "reference":
        return per_sample_mse_reference
    if name == "triton":
        return _per_sample_mse_triton
    if not _HAS_COMPILED:
        raise RuntimeError("per_sample_mse: tbkernels._C has no per_sample_mse op (an extension "
                           "built before it existed); rebuild with `pip install "
                           "--no-build-isolation .`")
    return torch.ops.tbkernels.per_sample_mse


@torch.compiler.assume_constant_result
def _pick(device: torch.device, backend: str | None) -> str:
    # an extension built before this op existed has no per_sample_mse: never pick it by default
    implemented = IMPLEMENTED if _HAS_COMPILED else ("reference", "triton")
    return resolve_backend("per_sample_mse", implemented, device, backend)


def per_sample_mse(pred, target, *, backend=None):
    """Per-sample mean squared error over whole latents: ``[B]``.

    ``out[b] = mean over all non-batch elements of (pred[b] - target[b])^2``, the denoising error
    of diffusion (epsilon target) and flow-matching (velocity target ``noise - x0``) training.

    Parameters
    ----------
    pred : Tensor ``[B, ...]`` (e.g. ``[B, C, T, H, W]``), float32/bfloat16/float16/float64
        The model's prediction. Differentiable.
    target : Tensor, pred's shape and device; any of the four dtypes (may differ from pred's)
        Never differentiated (a target that requires grad raises).
    backend : ``"reference"`` | ``"cpu"`` | ``"cuda"`` | ``"triton"``, optional
        Default: the fastest available for the device (``TBK_BACKEND`` overrides).

    Returns
    -------
    Tensor ``[B]``, float32 (float64 when either input is float64). Accumulated in float32
    whatever the input dtype; per-sample totals combined in float64. Its gradient wrt pred is
    ``2 * g[b] / D * (pred - target)`` in pred's dtype, one elementwise pass.
    """
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"pred and target must be tensors, got {type(pred).__name__} and "
                        f"{type(target).__name__}")
    if pred.dim() < 1:
        raise ValueError("pred must have a batch dimension [B, ...], got a 0-d tensor")
    if target.shape != pred.shape:
        raise ValueError(f"target has shape {list(target.shape)} but pred has "
                         f"{list(pred.shape)}; they must match")
    if target.device != pred.device:
        raise ValueError(f"target is on {target.device} but pred is on {pred.device}")
    for name, t in (("pred", pred), ("target", target)):
        if t.dtype not in _SUPPORTED:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if target.requires_grad:
        raise ValueError("target requires grad, but per_sample_mse differentiates only pred "
                         "(the denoising target is data); pass target.detach()")
    name = _pick(pred.device, backend)
    if name == "reference":
        return per_sample_mse_reference(pred, target)
    return _op(name)(pred.contiguous(), target.detach().contiguous())


# --------------------------------------------------------------------------------------------
# Losses on per-sample errors.

@_compile.inline_only
def _compiling():
    return torch.compiler.is_compiling()


@_compile.inline_only
def _check_beta(beta, name="beta"):
    # numbers.Real: Python and NumPy scalars (numpy.float32 is not a float)
    if isinstance(beta, bool) or not isinstance(beta, (numbers.Real, torch.Tensor)):
        raise DPOInputError(f"{name} must be a positive number, got {type(beta).__name__}")
    if isinstance(beta, torch.Tensor):
        if beta.dim() > 0:
            raise DPOInputError(f"{name} must be a number or a 0-d tensor, got shape "
                                f"{list(beta.shape)}")
        if not _compiling() and not bool((beta > 0) & torch.isfinite(beta)):
            raise DPOInputError(f"{name} must be a finite number > 0, got {beta.item():g}")
    elif not 0 < beta < math.inf:   # (comparisons: math.isfinite does not trace a SymFloat)
        raise DPOInputError(f"{name} must be a finite number > 0, got {beta}")


def _check_errors(name, t, length=None, like=None, allow_empty=False):
    if not isinstance(t, torch.Tensor):
        raise DPOInputError(f"{name} must be a tensor of per-sample errors [B], got "
                            f"{type(t).__name__}")
    if t.dim() != 1:
        raise DPOInputError(f"{name} must be per-sample errors of shape [B] (reduce the latent "
                            f"dims first, e.g. with per_sample_mse), got shape {list(t.shape)}")
    if t.shape[0] == 0 and not allow_empty:
        raise DPOInputError(f"{name} is empty (B = 0): there is no pair to train on; skip the "
                            f"step instead")
    if not t.dtype.is_floating_point:
        raise DPOInputError(f"{name} must be floating, got {t.dtype}")
    if like is not None and t.shape != like[1].shape:
        raise DPOInputError(f"{name} has shape {list(t.shape)} but {like[0]} has "
                            f"{list(like[1].shape)}; they must match")


def _acc_of(*tensors):
    return _acc(*(t.dtype for t in tensors if t is not None))


@_compile.inline_only
def _finite_or_raise(loss, parts):
    """NaN/inf in the loss or in any per-sample error (an infinite error can hide behind a finite
    loss, e.g. a saturated sigmoid) raises, naming the first bad sample. One host sync."""
    if _compiling():
        return
    tensors = [loss.detach().reshape(1)] + [t.detach().reshape(-1).to(loss.dtype)
                                            for t in parts.values() if t is not None]
    if bool(torch.isfinite(torch.cat(tensors)).all()):
        return
    bad = []
    for name, t in parts.items():
        if t is not None and not bool(torch.isfinite(t).all()):
            idx = (~torch.isfinite(t.detach())).nonzero().flatten().tolist()
            bad.append(f"{name}[{idx[0]}] = {t.detach()[idx[0]].item()}"
                       + (f" (and {len(idx) - 1} more)" if len(idx) > 1 else ""))
    where = "; ".join(bad) if bad else "the inputs are finite (beta too large for the margins?)"
    raise NonFiniteLossError(f"the DPO loss is {loss.item()}: {where}")


@_compile.inline_only
def _beta_weight(beta_schedule, timesteps, batch):
    """Per-sample factor of beta (None: constant)."""
    if callable(beta_schedule):
        if timesteps is None:
            raise DPOInputError("a callable beta_schedule needs timesteps [B]")
        if not isinstance(timesteps, torch.Tensor) or timesteps.shape != (batch,):
            # a [B, 1, 1, 1, 1] view (as broadcast against latents) would make the loss a
            # mean over all B x B cross pairs, silently
            raise DPOInputError(f"timesteps must be a [B] = [{batch}] tensor, got "
                                f"{getattr(timesteps, 'shape', type(timesteps).__name__)}")
        weight = beta_schedule(timesteps.detach())
        if not isinstance(weight, torch.Tensor) or weight.shape not in ((batch,), ()):
            raise DPOInputError(f"beta_schedule(timesteps) must return a [B] = [{batch}] (or 0-d) "
                                f"tensor of per-pair beta factors, got "
                                f"{getattr(weight, 'shape', type(weight).__name__)}")
        if not _compiling() and not bool((torch.isfinite(weight) & (weight >= 0)).all()):
            raise DPOInputError("beta_schedule(timesteps) must be finite and >= 0 (a negative "
                                f"factor flips the objective), got min {weight.min().item():g}, "
                                f"max {weight.max().item():g}")
        return weight
    if beta_schedule not in BETA_SCHEDULES:
        raise DPOInputError(f"beta_schedule must be one of {BETA_SCHEDULES} or a callable, got "
                            f"{beta_schedule!r}")
    if beta_schedule == "constant":
        return None
    if timesteps is None:
        raise DPOInputError("beta_schedule='paper' (beta_t = beta * (1 - t)^2) needs timesteps, "
                            "the flow-matching noise level t in [0, 1] of each pair, shape [B]")
    if not isinstance(timesteps, torch.Tensor) or timesteps.shape != (batch,):
        raise DPOInputError(f"timesteps must be a [B] = [{batch}] tensor, got "
                            f"{getattr(timesteps, 'shape', type(timesteps).__name__)}")
    if not _compiling() and not bool(((timesteps >= 0) & (timesteps <= 1)).all()):
        raise DPOInputError("timesteps must be flow-matching noise levels in [0, 1] (divide "
                            "scheduler timesteps by num_train_timesteps)")
    return (1 - timesteps.detach()) ** 2


def _pair_metrics(b, chosen, rejected, logratio_c, logratio_r):
    rw, rl = (b * logratio_c).detach(), (b * logratio_r).detach()
    accuracy = ((rw > rl).to(rw.dtype) + 0.5 * (rw == rl).to(rw.dtype)).mean()
    return {"rewards/chosen": rw.mean(), "rewards/rejected": rl.mean(),
            "rewards/margins": (rw - rl).mean(), "rewards/accuracies": accuracy,
            "logps/chosen": -chosen.detach().mean(), "logps/rejected": -rejected.detach().mean()}


def _regularisers(loss, metrics, chosen, nll_chosen_weight, real, nll_real_weight):
    """IPO Eq. 5/6: ``+ lambda_1 * E[-log p(y_w)] + lambda_2 * E_real[-log p(y)]`` with the
    diffusion surrogate ``-log p = L`` (the per-sample denoising error)."""
    if nll_chosen_weight:
        loss = loss + nll_chosen_weight * chosen.mean()
        metrics["nll/chosen"] = chosen.detach().mean()
    if real is not None:
        _check_errors("real", real)
        real = real.to(loss.dtype)
        if nll_real_weight:
            loss = loss + nll_real_weight * real.mean()
        metrics["nll/real"] = real.detach().mean()
    elif nll_real_weight:
        raise DPOInputError("nll_real_weight needs real (the per-sample errors on real data)")
    return loss


def _dpo(chosen, rejected, ref_chosen, ref_rejected, *, beta, half, beta_weight, margin_clamp,
         nll_chosen_weight, real, nll_real_weight, check_finite):
    _check_beta(beta)
    _check_errors("chosen", chosen)
    _check_errors("rejected", rejected, like=("chosen", chosen))
    if (ref_chosen is None) != (ref_rejected is None):
        raise DPOInputError("give both ref_chosen and ref_rejected (reference-model errors) or "
                            "neither (reference-free); with one the margin would mix the two")
    if ref_chosen is not None:
        _check_errors("ref_chosen", ref_chosen, like=("chosen", chosen))
    if ref_rejected is not None:
        _check_errors("ref_rejected", ref_rejected, like=("rejected", rejected))
    if margin_clamp is not None and not margin_clamp > 0:
        raise DPOInputError(f"margin_clamp must be > 0 or None, got {margin_clamp}")
    acc = _acc_of(chosen, rejected, ref_chosen, ref_rejected)
    c, r = chosen.to(acc), rejected.to(acc)
    rc = ref_chosen.detach().to(acc) if ref_chosen is not None else None
    rr = ref_rejected.detach().to(acc) if ref_rejected is not None else None
    # log pi(y) - log pi_ref(y) with the diffusion surrogate log pi = -L; reference-free (as
    # TeleBoost's released code) when no reference errors are given.
    logratio_c = -c if rc is None else rc - c
    logratio_r = -r if rr is None else rr - r
    margin = logratio_c - logratio_r
    if margin_clamp is not None:
        # TeleBoost: coeff = beta * sigmoid(-beta * clamp(A, +-20)) multiplies the raw branch
        # gradients, i.e. a straight-through clamp (autograd through clamp would zero them).
        margin = margin + (margin.clamp(-margin_clamp, margin_clamp) - margin).detach()
    b = beta * (0.5 if half else 1.0)
    if beta_weight is not None:
        b = b * beta_weight.to(acc)
    inside = b * margin
    loss = -F.logsigmoid(inside).mean()
    metrics = _pair_metrics(b, c, r, logratio_c, logratio_r)
    metrics["loss/dpo"] = loss.detach()
    loss = _regularisers(loss, metrics, c, nll_chosen_weight, real, nll_real_weight)
    if check_finite:
        _finite_or_raise(loss, {"chosen": chosen, "rejected": rejected, "ref_chosen": ref_chosen,
                                "ref_rejected": ref_rejected, "real": real})
    return loss, metrics


def diffusion_dpo_loss(chosen, rejected, ref_chosen=None, ref_rejected=None, *, beta=5000.0,
                       half=True, nll_chosen_weight=0.0, real=None, nll_real_weight=0.0,
                       check_finite=True):
    """Diffusion-DPO (Salesforce ``train.py``, epsilon prediction) on per-sample errors.

    ``inside = -0.5 * beta * ((L_w - L_l) - (Lref_w - Lref_l))``,
    ``loss = -mean(logsigmoid(inside)) [+ nll_chosen_weight * mean(L_w)] [+ nll_real_weight *
    mean(L_real)]``.

    Parameters
    ----------
    chosen, rejected : Tensor ``[B]``
        Per-sample errors ``mean((eps_theta - eps)^2)`` of the preferred / dispreferred sample of
        each pair (same timestep and noise within a pair), e.g. from :func:`per_sample_mse`.
    ref_chosen, ref_rejected : Tensor ``[B]``, optional
        The frozen reference model's errors (never differentiated). Omitted: reference-free.
    beta : float > 0
        Salesforce's ``beta_dpo`` (default 5000, SD1.5/SDXL); ``T * omega(lambda_t)`` folded in.
    half : bool
        The 0.5 of the Salesforce code (``scale_term = -0.5 * beta_dpo``).
    nll_chosen_weight, real, nll_real_weight :
        IPO Eq. 5 regularisers: ``lambda_1`` on the chosen errors, ``lambda_2`` on ``real``, the
        per-sample errors ``[B_real]`` on real data (IPO uses 0.2 and 0.1).
    check_finite : bool
        Raise :class:`NonFiniteLossError` for a NaN/inf loss (one host sync; skipped under
        torch.compile).

    Returns
    -------
    loss : 0-d float32 tensor (float64 for float64 errors), differentiable in the errors
    metrics : dict of detached 0-d tensors, TRL's names: ``rewards/chosen``, ``rewards/rejected``
        (``beta_eff * (log pi - log pi_ref)`` with ``log pi = -L``, ``beta_eff = beta/2``),
        ``rewards/margins`` (= mean(inside)), ``rewards/accuracies`` (ties count 0.5),
        ``logps/chosen``, ``logps/rejected`` (mean ``-L``), ``loss/dpo`` (without the
        regularisers), and ``nll/chosen`` / ``nll/real`` when used.
    """
    return _dpo(chosen, rejected, ref_chosen, ref_rejected, beta=beta, half=half,
                beta_weight=None, margin_clamp=None, nll_chosen_weight=nll_chosen_weight,
                real=real, nll_real_weight=nll_real_weight, check_finite=check_finite)


def flow_dpo_loss(chosen, rejected, ref_chosen=None, ref_rejected=None, *, beta=100.0,
                  timesteps=None, beta_schedule="constant", half=None, margin_clamp=None,
                  preset="flow_grpo", nll_chosen_weight=0.0, real=None, nll_real_weight=0.0,
                  check_finite=True):
    """Flow-DPO (arXiv 2501.13918; Flow-GRPO's ``train_sd3_dpo.py``) on velocity errors.

    ``inside = -(beta_t / 2) * ((L_w - Lref_w) - (L_l - Lref_l))``,
    ``loss = -mean logsigmoid(inside)`` with ``L = mean((v_theta - (noise - x0))^2)`` per sample.

    Parameters
    ----------
    chosen, rejected, ref_chosen, ref_rejected : Tensor ``[B]``
        As :func:`diffusion_dpo_loss`, velocity-target errors (same t and noise within a pair).
    beta : float > 0
        Flow-GRPO's ``config.train.beta`` (default 100).
    timesteps : Tensor ``[B]`` in [0, 1], optional
        The pair's noise level t (``x_t = (1-t) x0 + t noise``); needed by ``beta_schedule``.
    beta_schedule : ``"constant"`` | ``"paper"`` | callable
        ``beta_t = beta`` (Flow-GRPO's code), ``beta * (1 - t)^2`` (the paper: Diffusion-DPO with
        constant omega in velocity space), or ``beta * f(timesteps)``.
    preset : ``"flow_grpo"`` | ``"teleboost"``
        Defaults of ``half`` and ``margin_clamp``: Flow-GRPO halves beta and does not clamp;
        TeleBoost (``dpo_loss.py``) does not halve and clamps the margin to +-20 inside the weight
        (its released code is reference-free: pass no ref errors).
    half, margin_clamp : optional overrides of the preset.
    nll_chosen_weight, real, nll_real_weight, check_finite : as :func:`diffusion_dpo_loss`.

    Returns
    -------
    (loss, metrics) as :func:`diffusion_dpo_loss`; rewards use ``beta_eff = beta_t (/ 2)``.
    """
    if preset not in ("flow_grpo", "teleboost"):
        raise DPOInputError(f"preset must be 'flow_grpo' or 'teleboost', got {preset!r}")
    if half is None:
        half = preset == "flow_grpo"
    if margin_clamp is None and preset == "teleboost":
        margin_clamp = TELEBOOST_MARGIN_CLAMP
    _check_errors("chosen", chosen)
    weight = _beta_weight(beta_schedule, timesteps, chosen.shape[0])
    return _dpo(chosen, rejected, ref_chosen, ref_rejected, beta=beta, half=half,
                beta_weight=weight, margin_clamp=margin_clamp,
                nll_chosen_weight=nll_chosen_weight, real=real, nll_real_weight=nll_real_weight,
                check_finite=check_finite)


def diffusion_kto_loss(desirable, undesirable, ref_desirable=None, ref_undesirable=None, *,
                       beta=1000.0, lambda_desirable=1.0, lambda_undesirable=1.0, z0=None,
                       nll_chosen_weight=0.0, real=None, nll_real_weight=0.0, check_finite=True):
    """Diffusion-KTO (jacklishufan/diffusion-kto, ``halo='sigmoid'``) on per-sample errors.

    Per sample: implicit reward ``g = Lref - L``, ``u = sgn * beta * (g - z0)`` (sgn +1 for
    desirable, -1 for undesirable), ``h = sigmoid(u)``; ``loss = mean_B(w_y * (1 - h))`` with
    ``w_y = lambda_desirable`` or ``lambda_undesirable``.

    Parameters
    ----------
    desirable, undesirable : Tensor ``[B_d]``, ``[B_u]``
        Errors of the samples labelled good / bad (unpaired: sizes may differ, one may be empty).
    ref_desirable, ref_undesirable : optional, like the above; omitted: reference-free.
    beta : float > 0 (``beta_dpo``, default 1000)
    z0 : float or 0-d tensor, optional
        KTO's reference point. Default: the batch estimate ``clamp(mean(g), min=0)``, detached
        (the code's ``'none'`` offset). Under data parallelism pass the all-reduced mean of ``g``
        over ranks, as the original code does.
    nll_chosen_weight, real, nll_real_weight : IPO Eq. 6 (KTO + ``lambda * E_real[-log p]``).

    Returns
    -------
    (loss, metrics): ``rewards/chosen`` / ``rewards/rejected`` are the mean ``beta * g`` of the
    desirable / undesirable samples, ``rewards/margins`` their difference, ``rewards/accuracies``
    the fraction of (desirable, undesirable) pairs ordered correctly (ties 0.5), ``logps/*`` mean
    ``-L``, plus ``kto/z0`` and ``loss/kto``.
    """
    _check_beta(beta)
    # KTO is unpaired: one side may be empty, not both
    _check_errors("desirable", desirable, allow_empty=True)
    _check_errors("undesirable", undesirable, allow_empty=True)
    if desirable.shape[0] + undesirable.shape[0] == 0:
        raise DPOInputError("desirable and undesirable are both empty: nothing to train on")
    if (ref_desirable is None) != (ref_undesirable is None):
        raise DPOInputError("give both ref_desirable and ref_undesirable (reference-model "
                            "errors) or neither (reference-free)")
    if ref_desirable is not None:
        _check_errors("ref_desirable", ref_desirable, like=("desirable", desirable))
    if ref_undesirable is not None:
        _check_errors("ref_undesirable", ref_undesirable, like=("undesirable", undesirable))
    nd, nu = desirable.shape[0], undesirable.shape[0]
    if nd + nu == 0:
        raise DPOInputError("diffusion_kto_loss needs at least one sample")
    acc = _acc_of(desirable, undesirable, ref_desirable, ref_undesirable)
    d, u = desirable.to(acc), undesirable.to(acc)
    gd = -d if ref_desirable is None else ref_desirable.detach().to(acc) - d
    gu = -u if ref_undesirable is None else ref_undesirable.detach().to(acc) - u
    g = torch.cat([gd, gu])
    if z0 is None:
        z = g.detach().mean().clamp(min=0)
    else:
        z = torch.as_tensor(z0, dtype=acc, device=g.device).detach()
    sgn = torch.cat([g.new_ones(nd), -g.new_ones(nu)])
    w = torch.cat([g.new_full((nd,), float(lambda_desirable)),
                   g.new_full((nu,), float(lambda_undesirable))])
    h = torch.sigmoid(sgn * beta * (g - z))
    loss = (w * (1 - h)).mean()
    rd, ru = (beta * gd).detach(), (beta * gu).detach()
    diff = rd[:, None] - ru[None, :]
    metrics = {"rewards/chosen": rd.mean(), "rewards/rejected": ru.mean(),
               "rewards/margins": rd.mean() - ru.mean(),
               "rewards/accuracies": ((diff > 0).to(acc) + 0.5 * (diff == 0).to(acc)).mean(),
               "logps/chosen": -d.detach().mean(), "logps/rejected": -u.detach().mean(),
               "kto/z0": z, "loss/kto": loss.detach()}
    loss = _regularisers(loss, metrics, d, nll_chosen_weight, real, nll_real_weight)
    if check_finite:
        _finite_or_raise(loss, {"desirable": desirable, "undesirable": undesirable,
                                "ref_desirable": ref_desirable, "ref_undesirable": ref_undesirable,
                                "real": real})
    return loss, metrics


# What dpo_backward passes to the loss itself, and the argument that supplies each instead.
_SET_BY_DPO_BACKWARD = {
    "beta": "beta=", "real": "real_fn=", "check_finite": "check_finite=",
    "chosen": "chosen_fn=", "rejected": "rejected_fn=", "desirable": "chosen_fn=",
    "undesirable": "rejected_fn=", "ref_chosen": "ref_chosen=", "ref_rejected": "ref_rejected=",
    "ref_desirable": "ref_chosen=", "ref_undesirable": "ref_rejected="}


def _loss_fn(loss, beta, options, check_finite):
    """(chosen, rejected, ref_c, ref_r, real) -> (loss, metrics), with the options bound."""
    reserved = {"beta", "real"} if callable(loss) else set(_SET_BY_DPO_BACKWARD)
    taken = sorted(set(options) & reserved)
    if taken:
        # said before any forward runs (the loss would raise only after both branches)
        name = taken[0]
        raise DPOInputError(f"loss option {name}= is set by dpo_backward itself: pass "
                            f"{_SET_BY_DPO_BACKWARD[name]} to dpo_backward instead")
    if callable(loss):
        return lambda c, r, rc, rr, real: loss(c, r, rc, rr, beta=beta, real=real, **options)
    if loss not in LOSSES:
        raise DPOInputError(f"loss must be one of {LOSSES} or a callable, got {loss!r}")
    options = dict(options, check_finite=check_finite)
    if loss == "diffusion_dpo":
        fn = diffusion_dpo_loss
    elif loss == "kto":
        fn = diffusion_kto_loss
    else:
        fn = flow_dpo_loss
        if loss == "teleboost":
            options = dict(options, preset="teleboost")
    return lambda c, r, rc, rr, real: fn(c, r, rc, rr, beta=beta, real=real, **options)


# --------------------------------------------------------------------------------------------
# dpo_backward: the memory modes.

def _is_ddp(model):
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


@contextlib.contextmanager
def _grad_sync(ddp, sync):
    """DDP decides at *forward* time whether the next backward all-reduces (the reducer is armed
    in ``_post_forward``), so this wraps the branch's forward, not its backward."""
    if ddp is None or sync:
        yield
    else:
        with ddp.no_sync():
            yield


def _allreduce_grads(ddp, params, bucket_bytes=25 * 2**20):
    """Average .grad over the DDP process group (what DDP's reducer does), bucketed by dtype and
    device. Used when no branch's backward could be the synced one (see dpo_backward)."""
    import torch.distributed as dist
    group = ddp.process_group
    world = dist.get_world_size(group)
    by_kind: dict = {}
    for p in params:
        if p.grad is not None:
            by_kind.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in by_kind.values():
        bucket, size = [], 0
        for g in grads + [None]:
            if g is not None:
                bucket.append(g)
                size += g.numel() * g.element_size()
            if bucket and (g is None or size >= bucket_bytes):
                flat = torch._utils._flatten_dense_tensors(bucket)
                dist.all_reduce(flat, group=group)
                flat.div_(world)
                for dst, src in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                    dst.copy_(src)
                bucket, size = [], 0


def _user_grad_hooks(params) -> bool:
    """Whether any of these parameters has a gradient hook of the program's own (a tensor hook
    or a post-accumulate-grad hook); torch's and tbkernels' own are not counted."""
    for p in params:
        for hooks in (getattr(p, "_backward_hooks", None),
                      getattr(p, "_post_accumulate_grad_hooks", None)):
            for fn in (hooks or {}).values():
                while isinstance(fn, functools.partial):     # FSDP1 registers partials
                    fn = fn.func
                fn = getattr(fn, "__func__", fn)             # a bound method
                module = getattr(fn, "__module__", None) or ""
                if not module.startswith(("torch", "tbkernels")):
                    return True
    return False


def _graph_leaves(*outputs, hidden=None):
    """Parameters (autograd leaves) reached from the outputs' graphs. ``hidden``, a list, gets
    the names of nodes whose parameters the graph cannot show: reentrant activation
    checkpointing (``use_reentrant=True``) records one node for the whole block and recomputes
    it in its backward, so the block's parameters are not leaves of this graph."""
    seen, leaves, stack = set(), {}, [o.grad_fn for o in outputs
                                      if o is not None and o.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if isinstance(var, torch.Tensor):
            leaves[id(var)] = var
        if hidden is not None and fn.name().startswith("CheckpointFunction"):
            hidden.append(fn.name())
        stack.extend(f for f, _ in fn.next_functions)
    return list(leaves.values())


def _grad_written_by_sharding(p) -> bool:
    """FSDP2 parameters are DTensors, FSDP1's (use_orig_params=False) are FlatParameters."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:                               # torch without distributed
        return False
    return isinstance(p, DTensor) or bool(getattr(p, "_is_flat_param", False))


def _fsdp_types() -> tuple:
    """(FSDP2's FSDPModule, FSDP1's FullyShardedDataParallel), or () where torch has neither."""
    if not torch.distributed.is_available():
        return ()
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:
        return ()
    return FSDPModule, FullyShardedDataParallel


def _has_fsdp(model) -> bool:
    """Does ``model`` contain an FSDP1 (FullyShardedDataParallel) or FSDP2 (fully_shard) module?
    Their hooks write ``.grad`` themselves (FSDP1 also into its original parameters' views)."""
    types = _fsdp_types()
    return model is not None and bool(types) and any(isinstance(m, types)
                                                     for m in model.modules())


def _fsdp1_in(model, leaves=()) -> bool:
    """Is there an FSDP1 (``FullyShardedDataParallel``) module in ``model``, or an FSDP1 flat
    parameter among the graph ``leaves`` (with or without ``use_orig_params``, the autograd
    leaf is the flat parameter)?

    FSDP1 runs one backward per forward. Decoupled's second backward over the same forwards
    breaks it: under a sharded strategy the first backward reshards (frees the unsharded
    parameters the graph saved) and the second backward's unshard is skipped, so it reads freed
    storage; under ``NO_SHARD`` it runs but the gradients come out wrong (measured: 60 % relative
    error against standard on the 2-rank test). FSDP2 (``fully_shard``) re-unshards per backward
    and gives the standard gradients in every mode (tested)."""
    types = _fsdp_types()
    if model is not None and types and any(isinstance(m, types[1]) for m in model.modules()):
        return True
    return any(getattr(p, "_is_flat_param", False) for p in leaves)


def _refuse_decoupled_under_fsdp1(found: bool) -> None:
    if found:
        raise DPOInputError(
            "mode='decoupled' cannot run under FSDP1 (FullyShardedDataParallel): FSDP1 supports "
            "one backward per forward, and decoupled runs two backwards over the same forwards "
            "(under a sharded strategy the second reads parameters FSDP1 has freed; under "
            "NO_SHARD its gradients are wrong). Use mode='recompute' (the mode that lowers peak "
            "memory), mode='standard', or FSDP2 (torch.distributed.fsdp.fully_shard).")


class _GradSnapshot:
    """Restores .grad of the given parameters after a failed step.

    Parameters whose .grad was None go back to None (free). An existing gradient (gradient
    accumulation) must be copied before this call first adds to it; with ``lazy`` the copy is
    taken by a tensor hook just before the parameter's first accumulation (leaf hooks run before
    AccumulateGrad), i.e. during the backward, while the activations are being freed, so it does
    not add to the step's peak the way copying every gradient up front would (one full gradient
    copy on top of both branches' activations). ``lazy=False`` (DDP, whose reducer also writes
    gradients of parameters that received none, and tracing) copies up front, and so does every
    parameter whose gradient is written outside autograd's AccumulateGrad (FSDP2's DTensor
    parameters, FSDP1's flat parameters: the sharded gradient arrives by reduce-scatter, after
    any hook on the parameter could have fired -- if one fires at all).
    """

    def __init__(self, lazy=True):
        self.saved = {}
        self.lazy = lazy
        self.handles = []

    def add(self, params):
        for p in params:
            if id(p) in self.saved or not p.requires_grad:
                continue
            g = p.grad
            entry = [p, g, None]                   # parameter, .grad at entry, its copy
            self.saved[id(p)] = entry
            if g is None:
                continue
            if self.lazy and p.is_leaf and not _grad_written_by_sharding(p):
                def copy_before_first_accumulation(grad, entry=entry):
                    if entry[2] is None:
                        entry[2] = entry[1].detach().clone()
                    return None
                self.handles.append(p.register_hook(copy_before_first_accumulation))
            else:
                entry[2] = g.detach().clone()

    def restore(self):
        for p, g, copy in self.saved.values():
            if g is None:
                p.grad = None
            elif copy is None:
                continue                            # never accumulated into by this call
            elif p.grad is g and g.layout == torch.strided:
                g.detach().copy_(copy)              # keeps DDP's gradient bucket views intact
            else:
                # (a sparse gradient's detach() is a new tensor: copying into it restores
                # nothing, so the saved copy takes its place)
                p.grad = copy

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()


class _RNG:
    """CPU and CUDA RNG state of a branch's first call, replayed for its recomputation (as
    torch.utils.checkpoint does), so dropout and noise drawn inside chosen_fn match."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def replay(self):
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def _call_branch(fn, name, grad=True):
    with torch.set_grad_enabled(grad):
        out = fn()
    if not isinstance(out, torch.Tensor) or out.dim() != 1 or not out.dtype.is_floating_point:
        raise DPOInputError(f"{name}() must return the per-sample errors, a floating [B] tensor, "
                            f"got {getattr(out, 'shape', type(out).__name__)}")
    if grad and not out.requires_grad:
        raise DPOInputError(f"{name}() returned errors that do not require grad: compute them "
                            "from the trainable model's prediction, without torch.no_grad()")
    return out


def _surrogate_backward(weights, values, scale, scaler):
    """Back-propagate sum_b weights[b] * values[b] (weights detached): the branch's share of the
    loss gradient."""
    # in float32 at least, as standard mode's loss is: float16 errors times a GradScaler's
    # 65536 would overflow float16 (65504) in the product and seed the backward with inf
    acc = torch.promote_types(values.dtype, torch.float32)
    s = (weights.to(acc) * values.to(acc)).sum()
    if scale != 1.0:
        s = s * scale
    if scaler is not None:
        s = scaler.scale(s)
    try:
        s.backward()
    except RuntimeError as e:
        if "backward through the graph a second time" not in str(e):
            raise
        # the two branches share part of their graph (a trainable conditioning computed once
        # outside the fns, one concatenated forward sliced into both): the first branch's
        # backward freed it
        raise DPOInputError(
            "the chosen and rejected branches share part of their autograd graph, which the "
            "first branch's backward freed; in 'decoupled' and 'recompute' modes each fn must "
            "compute its errors from its own forward (compute shared trainable inputs inside "
            "both fns), or use mode='standard'") from e


def _weights(loss_fn, chosen, rejected, ref_c, ref_r):
    """loss value, metrics and d loss / d (chosen, rejected) from the branch values alone."""
    c = chosen.detach().requires_grad_(True)
    r = rejected.detach().requires_grad_(True)
    with torch.enable_grad():
        loss, metrics = loss_fn(c, r, ref_c, ref_r, None)
    gc, gr = torch.autograd.grad(loss, (c, r), allow_unused=True)
    gc = torch.zeros_like(c) if gc is None else gc
    gr = torch.zeros_like(r) if gr is None else gr
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, gc, gr


def dpo_backward(chosen_fn: Callable[[], torch.Tensor], rejected_fn: Callable[[], torch.Tensor],
                 *, beta, loss="flow_dpo", ref_chosen=None, ref_rejected=None, mode="decoupled",
                 real_fn: Callable[[], torch.Tensor] | None = None, nll_real_weight=0.0,
                 scale=1.0, scaler=None, model=None, params=None, atomic=True,
                 check_finite=True, **loss_options):
    """Forward the DPO branches and leave the loss gradient in ``.grad``, in a chosen memory mode.

    The DPO gradient is ``dL/dL_w * grad L_w + dL/dL_l * grad L_l`` and the two scalars per sample
    (``eta`` and ``-eta`` for DPO, SPEC.md §9) depend only on the branches' *values*. So the
    backward can be split per branch, with each branch's activations freed before the next:

    ``"standard"``
        chosen and rejected (and real) forwards, one ``loss.backward()`` over all of them: both
        branches' activations are alive together (peak ~ A_w + A_l).
    ``"decoupled"`` (TeleBoost's gradient-decoupled DPO)
        both forwards, the weights from the forward values, then ``(g_w * L_w).sum().backward()``
        and ``(g_l * L_l).sum().backward()``: no extra FLOPs. On one device the activations of
        both branches exist after the forwards, so in a first micro-batch the peak is that of
        standard. When ``.grad`` is already filled (gradient accumulation) it is lower by up to
        one copy of the parameter gradients: standard's single backward holds one branch's
        gradient of each shared parameter in autograd's buffers until the other branch reaches
        it, while each decoupled backward adds into ``.grad`` in place. Under FSDP2 the first
        branch's gradients are reduce-scattered (and freed) before the second backward; measured
        per rank, that did not lower the peak (docs/dpo.md).
    ``"recompute"``
        a no-grad forward of chosen for its values, then rejected forward+backward, then chosen
        forward+backward: only one branch's graph is ever alive (peak ~ max(A_w, A_l)), for one
        extra forward. chosen_fn is replayed with the RNG state of its first call.

    The real-data NLL regulariser (``real_fn``, ``nll_real_weight``, IPO Eq. 5/6) enters the loss
    additively with a constant weight; outside standard mode it is its own branch (forward and
    backward after the preference branches), so it never adds to their peak.

    Parameters
    ----------
    chosen_fn, rejected_fn : callables returning Tensor ``[B]`` with grad
        Per-sample errors of the trainable model on the preferred / dispreferred sample of each
        pair (for ``loss="kto"``: on the desirable / undesirable samples, sizes may differ), e.g.
        ``lambda: tbkernels.per_sample_mse(model(x_t_w, t, c), v_target_w)``. In recompute mode
        chosen_fn is called twice (once without grad); it must compute the same values.
    beta : float > 0
    loss : ``"flow_dpo"`` | ``"diffusion_dpo"`` | ``"teleboost"`` | ``"kto"`` | callable
        A callable is called as ``loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta,
        real=None, **loss_options)`` and returns ``(loss, metrics)``.
    ref_chosen, ref_rejected : Tensor ``[B]``, optional
        The reference model's errors (computed beforehand under no_grad). Omitted: reference-free.
    mode : ``"standard"`` | ``"decoupled"`` | ``"recompute"``
    real_fn : callable returning Tensor ``[B_real]`` with grad, optional; with ``nll_real_weight``.
    scale : float
        Multiplies the loss (and so the gradients), e.g. ``1 / accumulation_steps``. Gradients are
        *added* to ``.grad``, as ``backward()`` does, so gradient accumulation works as usual.
    scaler : torch.amp.GradScaler, optional
        Each backward runs on ``scaler.scale(surrogate)``; call ``scaler.step``/``update`` after.
    model : nn.Module, optional
        Its parameters are the ones ``atomic`` protects. A ``DistributedDataParallel`` model gets
        one gradient all-reduce per step (``no_sync()`` for every other branch): standard and
        recompute sync in their last backward (overlapped with it); decoupled (whose two
        backwards both follow both forwards, while DDP arms its reducer at forward time) syncs in
        the real-data branch when there is one, else with one bucketed all-reduce after the last
        backward. Build the branches' forwards through ``model`` itself. An FSDP2
        (``fully_shard``) model needs nothing special (each branch's backward reduce-scatters
        into the sharded ``.grad``); pass it so that ``atomic`` protects its sharded gradients.
        An FSDP1 (``FullyShardedDataParallel``) model works in standard and recompute modes;
        decoupled raises :class:`DPOInputError` before any forward (FSDP1 supports one backward
        per forward; without ``model`` the refusal comes after the forwards, from the graph).
    params : iterable of tensors, optional
        The parameters ``atomic`` protects (default: ``model``'s, else those found in the
        branches' autograd graphs).
    atomic : bool
        A failure in any forward or backward (including a NaN loss found after the first backward
        in recompute mode, or in the real branch) restores ``.grad`` to what it was before the
        call, then re-raises. When accumulating, each existing gradient is copied just before
        this call first adds to it (during the backward, as activations are freed, so the copy
        mostly does not raise the peak; with DDP or FSDP, all up front, since their hooks write
        the gradients); free when ``.grad`` is None.
    check_finite : bool
        Raise :class:`NonFiniteLossError` for a non-finite loss before any backward.
    **loss_options
        Passed to the loss: ``timesteps``, ``beta_schedule``, ``half``, ``margin_clamp``,
        ``nll_chosen_weight`` (IPO's lambda_1), ``lambda_desirable``, ``lambda_undesirable``,
        ``z0``, ...

    Returns
    -------
    loss : detached 0-d tensor (the preference loss plus the regularisers; not multiplied by
        ``scale``)
    metrics : dict of detached 0-d tensors (the loss function's, TRL names)
    """
    if mode not in MODES:
        raise DPOInputError(f"mode must be one of {MODES}, got {mode!r}")
    if not callable(chosen_fn) or not callable(rejected_fn):
        raise DPOInputError("chosen_fn and rejected_fn must be callables returning per-sample "
                            "errors [B]")
    if real_fn is not None and not callable(real_fn):
        raise DPOInputError("real_fn must be a callable returning per-sample errors")
    if nll_real_weight and real_fn is None:
        raise DPOInputError("nll_real_weight needs real_fn (the per-sample errors on real data)")
    if not callable(loss):
        _check_beta(beta)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and not scale.requires_grad:
        scale = scale.item()                  # (as beta: a 0-d tensor or a NumPy scalar)
    if not (isinstance(scale, numbers.Real) and not isinstance(scale, bool)
            and 0 < scale < math.inf):
        raise DPOInputError(f"scale must be a finite number > 0, got {scale!r}")
    scale = float(scale)
    loss_fn = _loss_fn(loss, beta, loss_options, check_finite)
    if mode == "decoupled":
        _refuse_decoupled_under_fsdp1(_fsdp1_in(model))
    pair = not callable(loss) and loss != "kto"      # KTO's halves are unpaired
    ddp = model if _is_ddp(model) else None
    lazy = ddp is None and not _compiling() and not _has_fsdp(model)
    snapshot = _GradSnapshot(lazy=lazy) if atomic else None
    if params is not None:
        params = list(params)                       # (a generator is read once)
    elif model is not None:
        params = list(model.parameters())
    if snapshot is not None and params is not None:
        snapshot.add(params)
    explicit_params = params is not None

    @_compile.inline_only
    def warn_hooks(*outs):
        # before the first of this mode's two backwards, and before protect() adds ours (not
        # while torch.compile traces: hook dictionaries are not graph material)
        if _compiling():
            return
        if _user_grad_hooks(params if explicit_params else _graph_leaves(*outs)):
            warnings.warn(
                f"dpo_backward(mode={mode!r}): parameters have gradient hooks (register_hook / "
                "register_post_accumulate_grad_hook). This mode runs one backward per branch, so "
                "each hook runs once per branch: a tensor hook sees each branch's share of the "
                "gradient, a post-accumulate hook first a .grad holding one branch's share. A "
                "hook that steps an optimizer or clips the gradient then acts on partial "
                "gradients: use mode='standard' (one backward) with such hooks.",
                RuntimeWarning, stacklevel=3)
    # real_fn without a weight only logs nll/real: one forward without grad at the end, no
    # backward of zeros (and no part in the gradient synchronisation)
    has_real = real_fn is not None and bool(nll_real_weight)
    metric_real = real_fn is not None and not nll_real_weight

    def protect(*outs):
        if snapshot is not None and not explicit_params:
            hidden = []
            snapshot.add(_graph_leaves(*outs, hidden=hidden))
            if hidden:
                warnings.warn(
                    "dpo_backward(atomic=True): the branch's graph holds reentrant activation "
                    "checkpoints (use_reentrant=True), whose parameters the graph does not show, "
                    "so a failure could not restore their .grad; pass model= or params= (or "
                    "checkpoint with use_reentrant=False)", stacklevel=3)

    def check_pair(c, r):
        if pair and c.shape != r.shape:
            raise DPOInputError(f"chosen_fn() returned shape {list(c.shape)} but rejected_fn() "
                                f"{list(r.shape)}: DPO needs one rejected sample per chosen one")

    def real_branch(sync):
        with _grad_sync(ddp, sync):
            real = _call_branch(real_fn, "real_fn")
        protect(real)
        if check_finite and not bool(torch.isfinite(real.detach()).all()):
            raise NonFiniteLossError("real_fn() returned non-finite errors: "
                                     f"{real.detach().tolist()[:8]}")
        w = torch.full_like(real.detach(), nll_real_weight / real.shape[0])
        _surrogate_backward(w, real, scale, scaler)
        return real.detach()

    def with_real(value, metrics, real_values):
        # the loss value and metrics as the loss function reports them with the real term
        if metric_real:
            real_values = _call_branch(real_fn, "real_fn", grad=False).detach()
            if check_finite and not bool(torch.isfinite(real_values).all()):
                raise NonFiniteLossError("real_fn() returned non-finite errors: "
                                         f"{real_values.tolist()[:8]}")
        if real_values is None:
            return value, metrics
        metrics = dict(metrics, **{"nll/real": real_values.to(value.dtype).mean()})
        if not nll_real_weight:
            return value, metrics
        return value + nll_real_weight * real_values.to(value.dtype).mean(), metrics

    try:
        if mode == "standard":
            last = "real" if has_real else "rejected"
            with _grad_sync(ddp, False):
                c = _call_branch(chosen_fn, "chosen_fn")
            with _grad_sync(ddp, last == "rejected"):
                r = _call_branch(rejected_fn, "rejected_fn")
            check_pair(c, r)
            real = None
            if has_real:
                with _grad_sync(ddp, True):
                    real = _call_branch(real_fn, "real_fn")
            protect(c, r, real)
            total, metrics = loss_fn(c, r, ref_chosen, ref_rejected, None)
            if has_real:
                total = total + nll_real_weight * real.to(total.dtype).mean()
                metrics = dict(metrics, **{"nll/real": real.detach().to(total.dtype).mean()})
            if check_finite:
                _finite_or_raise(total, {"chosen": c, "rejected": r, "real": real})
            s = total * scale if scale != 1.0 else total
            (scaler.scale(s) if scaler is not None else s).backward()
            return with_real(total.detach(), {k: v.detach() for k, v in metrics.items()}, None)

        if mode == "decoupled":
            with _grad_sync(ddp, False):
                c = _call_branch(chosen_fn, "chosen_fn")
                r = _call_branch(rejected_fn, "rejected_fn")
            check_pair(c, r)
            warn_hooks(c, r)
            protect(c, r)
            if model is None:                         # FSDP1 found only through the graph
                _refuse_decoupled_under_fsdp1(_fsdp1_in(None, _graph_leaves(c, r)))
            value, metrics, gc, gr = _weights(loss_fn, c, r, ref_chosen, ref_rejected)
            if check_finite:
                _finite_or_raise(value, {"chosen": c, "rejected": r})
            _surrogate_backward(gc, c, scale, scaler)
            del c                                     # chosen's graph is freed by its backward
            _surrogate_backward(gr, r, scale, scaler)
            del r
            real_values = real_branch(sync=True) if has_real else None
            if ddp is not None and not has_real:
                _allreduce_grads(ddp, [p for p in ddp.parameters() if p.requires_grad])
            return with_real(value, metrics, real_values)

        # recompute
        rng = _RNG()
        c0 = _call_branch(chosen_fn, "chosen_fn", grad=False)
        with _grad_sync(ddp, False):
            r = _call_branch(rejected_fn, "rejected_fn")
        check_pair(c0, r)
        warn_hooks(r)
        protect(r)
        value, metrics, gc, gr = _weights(loss_fn, c0, r, ref_chosen, ref_rejected)
        if check_finite:
            _finite_or_raise(value, {"chosen": c0, "rejected": r})
        _surrogate_backward(gr, r, scale, scaler)
        del r
        with rng.replay(), _grad_sync(ddp, not has_real):
            c = _call_branch(chosen_fn, "chosen_fn (recomputed)")
        if c.shape != c0.shape:
            raise DPOInputError(f"chosen_fn() returned shape {list(c.shape)} when recomputed, "
                                f"{list(c0.shape)} the first time")
        protect(c)
        if not _compiling() and not c0.is_meta:           # meta: no values to compare
            drift = (c.detach() - c0).abs().max().item() if c.numel() else 0.0
            tol = 1e-3 * (c0.abs().max().item() if c0.numel() else 0.0) + 1e-6
            if not drift <= tol:
                if check_finite and not bool(torch.isfinite(c.detach()).all()):
                    # the weights came from the first call's finite values, but a backward
                    # through non-finite recomputed errors would put NaN in every gradient
                    # (found by audit: this warning was the only signal); raise, and the
                    # gradients are restored. (Checked here: non-finite values always drift.)
                    bad = (~torch.isfinite(c.detach())).nonzero().flatten().tolist()
                    raise NonFiniteLossError(
                        f"chosen_fn() (recomputed) returned a non-finite error: "
                        f"chosen[{bad[0]}] = {c.detach()[bad[0]].item()}, where the first call "
                        f"gave {c0[bad[0]].item()}; make chosen_fn deterministic or use "
                        "mode='decoupled'")
                warnings.warn(f"recompute mode: chosen_fn() gave different values the second "
                              f"time (max |diff| {drift:.3g}); the weights were computed from the "
                              "first call. Make chosen_fn deterministic (same noise, timesteps, "
                              "dropout) or use mode='decoupled'.", RuntimeWarning, stacklevel=2)
        _surrogate_backward(gc, c, scale, scaler)
        del c
        real_values = real_branch(sync=True) if has_real else None
        return with_real(value, metrics, real_values)
    except BaseException:
        if snapshot is not None:
            snapshot.restore()
        raise
    finally:
        if snapshot is not None:
            snapshot.close()
