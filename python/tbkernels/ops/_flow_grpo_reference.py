"""Plain-PyTorch reference of the flow-matching GRPO step (SPEC.md §1, §2, §5, §10).

Readable formulas, one branch per ``sde_type``, computed in float64 when given float64 (the ground
truth of the tests) and in float32 otherwise. The kernels do not follow this code path: they use
the per-sample coefficient form of ``_flow_grpo_coefs.py``; the tests hold the two together.

Shapes: latents ``[B, C, H, W]`` (image) or ``[B, C, T, H, W]`` (video); ``sigma``/``sigma_next``
``[B]`` (``sigma_next < sigma``, rectified flow: sampling goes from noise at 1 towards data at 0).
"""
from __future__ import annotations

import math

import torch

SDE_TYPES = ("flow_grpo", "dance_grpo", "wan", "cps", "ode")
REDUCTIONS = ("mean", "channel_sum", "none")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _per_sample(t, ndim):
    return t.reshape((-1,) + (1,) * (ndim - 1))


def reduce_logprob(logp, reduction):
    if reduction == "mean":
        return logp.mean(dim=tuple(range(1, logp.ndim)))          # [B]
    if reduction == "channel_sum":
        return logp.sum(dim=1)                                      # [B, (T,) H, W]
    if reduction == "none":
        return logp
    raise ValueError(reduction)


def sde_step_reference(model_output, sigma, sigma_next, sample, prev_sample=None, *,
                       sde_type="flow_grpo", noise_level=0.7, noise=None,
                       logprob_reduction="mean", sigma_max=None, sigma_min=None):
    """Returns ``(prev_sample, log_prob, prev_sample_mean, std_dev_t)``.

    ``noise`` is the standard normal draw used when ``prev_sample`` is None. ``std_dev_t`` is
    what each public system returns: Flow-GRPO and Wan return sigma_t (the diffusion coefficient,
    without sqrt(-dt)); DanceGRPO's ``std_dev_t`` is the whole transition std eta*sqrt(-dt); CPS
    returns its transition std; the ODE step returns 0.
    """
    acc = torch.float64 if model_output.dtype == torch.float64 else torch.float32
    v, x = model_output.to(acc), sample.to(acc)
    nd = x.ndim
    s = _per_sample(sigma.to(acc), nd)
    sn = _per_sample(sigma_next.to(acc), nd)
    dt = sn - s                                                     # < 0
    gaussian = True
    if sde_type in ("flow_grpo", "dance_grpo", "wan"):
        if sde_type == "flow_grpo":
            # Flow-GRPO avoids the pole of sqrt(t/(1-t)) at t = 1 with sigma_max = sigmas[1],
            # which is sigma_next of the first step.
            smax = sn if sigma_max is None else _per_sample(torch.as_tensor(sigma_max).to(x), nd)
            sig_t = noise_level * torch.sqrt(s / (1 - torch.where(s == 1, smax, s)))
        elif sde_type == "dance_grpo":
            sig_t = torch.full_like(s, noise_level)                 # eta, no t-dependence
        else:                                                       # Wan: linear in sigma
            sig_t = sigma_min + (sigma_max - sigma_min) * s
        mean = (x * (1 + sig_t ** 2 / (2 * s) * dt)
                + v * (1 + sig_t ** 2 * (1 - s) / (2 * s)) * dt)
        std = sig_t * torch.sqrt(-dt)
        ret_std = std if sde_type == "dance_grpo" else sig_t
    elif sde_type == "cps":
        std = sn * math.sin(noise_level * math.pi / 2)
        x0_hat, x1_hat = x - s * v, x + (1 - s) * v
        mean = (1 - sn) * x0_hat + torch.sqrt(sn ** 2 - std ** 2) * x1_hat
        ret_std, gaussian = std, False
    elif sde_type == "ode":
        mean = x + v * dt
        std = torch.zeros_like(s)
        ret_std, gaussian = std, False
    else:
        raise ValueError(sde_type)

    if prev_sample is None:
        prev = mean + std * noise.to(acc) if noise is not None else mean.clone()
    else:
        prev = prev_sample.to(acc)
    diff = prev.detach() - mean
    if gaussian:
        logp = -diff ** 2 / (2 * std ** 2) - torch.log(std) - _LOG_SQRT_2PI
    else:
        logp = -diff ** 2                                           # CPS / ODE: no constants
    return (prev, reduce_logprob(logp, logprob_reduction), mean,
            ret_std.reshape(-1).expand(x.shape[0]))


def kl_reference(mean, mean_ref, std_dev_t, transition_std, kl_form="flow_grpo"):
    """Per-sample KL to the reference policy, mean over latent elements → ``[B]``.

    ``flow_grpo``: the training script's ||Δμ||²/(2·std_dev_t²) (for the SDE this is |Δt| times
    the exact KL); ``exact``: the Gaussian KL ||Δμ||²/(2·s²) with s the transition std.
    """
    red = tuple(range(1, mean.ndim))
    sq = ((mean - mean_ref) ** 2).mean(red)
    denom = std_dev_t if kl_form == "flow_grpo" else transition_std
    return sq / (2 * denom.reshape(-1) ** 2)


def flow_grpo_loss_reference(log_prob, old_log_prob, advantages, *, clip_range=1e-4,
                             adv_clip_max=5.0, advantage_map=None, kl=None, beta=0.0,
                             vipo_form="clipped"):
    """Clipped surrogate (SPEC §1.5), optionally dense with a ViPO advantage map (§5).

    log_prob/old_log_prob: ``[B]`` (mean reduction), or per position ``[B, T, H, W]`` /
    per element ``[B, C, T, H, W]`` with a map of the same rank (dense ViPO form).
    """
    a = advantages.clamp(-adv_clip_max, adv_clip_max)
    delta = log_prob - old_log_prob
    if advantage_map is not None:
        a = _per_sample(a, log_prob.ndim) * advantage_map
    if vipo_form == "simple":                     # TeleBoost's simplified Σ M·A·log π
        policy = -(a * log_prob).mean()
        ratio = torch.exp(delta)
    else:
        ratio = torch.exp(delta)
        policy = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    loss = policy
    if kl is not None and beta != 0:
        loss = loss + beta * kl.mean()
    metrics = {
        "approx_kl": 0.5 * (delta.detach() ** 2).mean(),
        "clipfrac": ((ratio.detach() - 1).abs() > clip_range).to(ratio.dtype).mean(),
        "kl": kl.detach().mean() if kl is not None else torch.zeros((), dtype=ratio.dtype,
                                                                       device=ratio.device),
        "ratio_mean": ratio.detach().mean(),
    }
    return loss, metrics
