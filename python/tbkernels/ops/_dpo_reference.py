"""Plain-PyTorch reference of the DPO family on per-sample denoising errors (SPEC.md §7, §9).

Readable formulas, in float64 when given float64 (the ground truth of the tests), float32
otherwise. The public functions in ``dpo.py`` compute the same numbers; the tests hold them
together, and hold both against independent re-implementations of the Salesforce Diffusion-DPO
and Flow-GRPO Flow-DPO training code.

Conventions (all inputs are per-sample errors ``L = mean over non-batch dims of (pred - target)^2``,
``[B]``; the diffusion "log-likelihood" surrogate is ``log pi = -L``, as TeleBoost and every
Diffusion-DPO port use):

* Diffusion-DPO (Salesforce ``train.py``):
  ``inside = -0.5 * beta * ((L_w - L_l) - (Lref_w - Lref_l))``, ``loss = -mean logsigmoid(inside)``.
* Flow-DPO (Flow-GRPO ``train_sd3_dpo.py``): the same algebra on velocity errors; the paper's
  ``beta_t = beta * (1 - t)^2`` per sample.
* TeleBoost (``dpo_loss.py``): no 0.5, no reference, the margin clamped to +-20 for the weight
  only (the gradient is ``beta * sigmoid(-beta * clamp(A)) * dA``).
* Diffusion-KTO: ``g = Lref - L``, ``z0 = clamp(mean(g), min=0)`` (detached),
  ``h = sigmoid(sgn * beta * (g - z0))``, ``loss = mean(w_y * (1 - h))``.
* IPO regularisers (Eq. 5, 6): ``+ lambda_1 * mean(L_w) + lambda_2 * mean(L_real)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_mse_reference(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[B]``: mean over the non-batch dims of ``(pred - target)^2``, float32 math (float64 if
    either input is float64); differentiable in pred (and target, if it requires grad)."""
    acc = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    d = pred.to(acc) - target.to(acc)
    if d.dim() == 1:
        return d * d
    return (d * d).mean(dim=tuple(range(1, d.dim())))


def _zeros_like(x, ref):
    return torch.zeros_like(x) if ref is None else ref.to(x)


def dpo_reference(chosen, rejected, ref_chosen=None, ref_rejected=None, *, beta, half=True,
                  beta_weight=None, margin_clamp=None, nll_chosen_weight=0.0, real=None,
                  nll_real_weight=0.0):
    """Diffusion-DPO / Flow-DPO / TeleBoost on errors; returns (loss, dict of plain values)."""
    rc, rr = _zeros_like(chosen, ref_chosen), _zeros_like(rejected, ref_rejected)
    b = beta * (0.5 if half else 1.0)
    if beta_weight is not None:
        b = b * beta_weight.to(chosen)
    logratio_c = -(chosen - rc)                        # log pi(w) - log pi_ref(w)
    logratio_r = -(rejected - rr)
    margin = logratio_c - logratio_r
    if margin_clamp is not None:
        # TeleBoost: the clamp shapes the weight sigmoid(-beta*A), not the gradient's direction.
        margin = margin + (margin.clamp(-margin_clamp, margin_clamp) - margin).detach()
    loss = -F.logsigmoid(b * margin).mean()
    if nll_chosen_weight:
        loss = loss + nll_chosen_weight * chosen.mean()
    if real is not None and nll_real_weight:
        loss = loss + nll_real_weight * real.mean()
    rw, rl = (b * logratio_c).detach(), (b * logratio_r).detach()
    acc = ((rw > rl).to(rw.dtype) + 0.5 * (rw == rl).to(rw.dtype)).mean()
    metrics = {"rewards/chosen": rw.mean(), "rewards/rejected": rl.mean(),
               "rewards/margins": (rw - rl).mean(), "rewards/accuracies": acc,
               "logps/chosen": -chosen.detach().mean(), "logps/rejected": -rejected.detach().mean()}
    return loss, metrics


def kto_reference(desirable, undesirable, ref_desirable=None, ref_undesirable=None, *, beta,
                  lambda_desirable=1.0, lambda_undesirable=1.0, z0=None, nll_chosen_weight=0.0,
                  real=None, nll_real_weight=0.0):
    """Diffusion-KTO as SPEC.md §7.3's snippet, on the two labelled halves of a batch."""
    L = torch.cat([desirable, undesirable])
    L_ref = torch.cat([_zeros_like(desirable, ref_desirable),
                       _zeros_like(undesirable, ref_undesirable)])
    y = torch.cat([torch.ones_like(desirable), torch.zeros_like(undesirable)])
    g = L_ref - L
    if z0 is None:
        z0 = g.mean().detach().clamp(min=0)
    else:
        z0 = torch.as_tensor(z0).to(g)
    h = torch.sigmoid((2 * y - 1) * beta * (g - z0))
    w = torch.where(y.bool(), torch.full_like(g, lambda_desirable),
                    torch.full_like(g, lambda_undesirable))
    loss = (w * (1 - h)).mean()
    if nll_chosen_weight:
        loss = loss + nll_chosen_weight * desirable.mean()
    if real is not None and nll_real_weight:
        loss = loss + nll_real_weight * real.mean()
    r = (beta * g).detach()
    rd, ru = r[: desirable.numel()], r[desirable.numel():]
    diff = rd[:, None] - ru[None, :]
    acc = ((diff > 0).to(r.dtype) + 0.5 * (diff == 0).to(r.dtype)).mean()
    metrics = {"rewards/chosen": rd.mean(), "rewards/rejected": ru.mean(),
               "rewards/margins": rd.mean() - ru.mean(), "rewards/accuracies": acc,
               "logps/chosen": -desirable.detach().mean(),
               "logps/rejected": -undesirable.detach().mean(), "kto/z0": z0.detach()}
    return loss, metrics
