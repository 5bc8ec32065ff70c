"""Per-sample coefficients that turn every ``sde_type`` into one elementwise kernel.

Every supported transition has the form (per sample b, element e)

    mean_e = cx_b * x_e + cv_b * v_e                  (x = sample, v = model_output)
    logp_e = alpha_b * (prev_e - mean_e)^2 + gamma_b
    prev_e = mean_e + s_b * noise_e                   (when sampling)

so the kernels (cpu, cuda, triton) only ever see a ``[B, 5]`` table ``(cx, cv, alpha, gamma, s)``
computed here in float64 from sigma, sigma_next and the convention. The Gaussian branches have
alpha = -1/(2 s^2), gamma = -log s - log sqrt(2 pi); CPS and the ODE step use Flow-GRPO's
constant-free ``-(prev - mean)^2`` (alpha = -1, gamma = 0).

Derivations (SPEC.md §1.1, §1.2, §2.1), with dt = sigma_next - sigma < 0:
* flow_grpo / dance_grpo / wan: mean = x (1 + sig_t^2 dt / (2 sigma))
                                      + v (1 + sig_t^2 (1 - sigma) / (2 sigma)) dt,  s = sig_t sqrt(-dt)
  with sig_t = a sqrt(sigma / (1 - sigma)) (sigma_max replaces sigma in the denominator at sigma = 1),
  eta (DanceGRPO), or sigma_min + (sigma_max - sigma_min) sigma (Wan).
* cps: mean = (1 - sn)(x - sigma v) + c (x + (1 - sigma) v), c = sqrt(sn^2 - s^2), s = sn sin(a pi/2)
  => cx = (1 - sn) + c, cv = -sigma (1 - sn) + c (1 - sigma).
* ode: cx = 1, cv = dt, s = 0.
"""
from __future__ import annotations

import math

import torch

COLUMNS = ("cx", "cv", "alpha", "gamma", "s")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def step_coefficients(sigma, sigma_next, sde_type, noise_level, sigma_max=None, sigma_min=None):
    """``(coefs [B, 5] float64, std_dev_t [B] float64)`` for sigma, sigma_next ``[B]`` float64.

    ``std_dev_t`` is the value each public system returns (see sde_step_reference).
    """
    s, sn = sigma.double(), sigma_next.double()
    dt = sn - s
    if sde_type in ("flow_grpo", "dance_grpo", "wan"):
        if sde_type == "flow_grpo":
            smax = sn if sigma_max is None else torch.as_tensor(sigma_max, dtype=s.dtype,
                                                                device=s.device).expand_as(s)
            sig_t = noise_level * torch.sqrt(s / (1 - torch.where(s == 1, smax, s)))
        elif sde_type == "dance_grpo":
            sig_t = torch.full_like(s, float(noise_level))
        else:
            sig_t = sigma_min + (sigma_max - sigma_min) * s
        cx = 1 + sig_t ** 2 * dt / (2 * s)
        cv = (1 + sig_t ** 2 * (1 - s) / (2 * s)) * dt
        std = sig_t * torch.sqrt(-dt)
        alpha = -1.0 / (2 * std ** 2)
        gamma = -torch.log(std) - _LOG_SQRT_2PI
        ret = std if sde_type == "dance_grpo" else sig_t
    elif sde_type == "cps":
        std = sn * math.sin(noise_level * math.pi / 2)
        c = torch.sqrt(sn ** 2 - std ** 2)
        cx = (1 - sn) + c
        cv = -s * (1 - sn) + c * (1 - s)
        alpha, gamma, ret = -torch.ones_like(s), torch.zeros_like(s), std
    elif sde_type == "ode":
        cx, cv, std = torch.ones_like(s), dt, torch.zeros_like(s)
        alpha, gamma, ret = -torch.ones_like(s), torch.zeros_like(s), std
    else:
        raise ValueError(sde_type)
    return torch.stack([cx, cv, alpha, gamma, std], dim=1), ret
