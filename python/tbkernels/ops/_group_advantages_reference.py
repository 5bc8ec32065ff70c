"""Plain-PyTorch reference for group-normalized advantages: the ground truth every backend matches.

This is the backend-level contract shared by all four implementations (reference, cpu, cuda,
triton). The public wrapper :func:`tbkernels.group_advantages` validates arguments, resolves
presets and group ids, and then calls one implementation with exactly these arguments:

    rewards      [B, K] floating, contiguous      K reward heads, each normalised independently
    group_index  [B] int64 or None                dense group of each sample, values in [0, G)
                                                  (None: contiguous groups of ``group_size``)
    group_size   int                              used only when group_index is None; B % group_size == 0
    num_groups   int G                            G = B // group_size for contiguous groups
    std_mode     0 "group" | 1 "global" | 2 "none"
    ddof         0 (population std) or 1 (unbiased std)
    eps          float >= 0, added to the std (Flow-GRPO / DanceGRPO convention, not to the variance)
    clip         float; > 0 clamps advantages to [-clip, clip], <= 0 means no clamp
    check_finite bool; a NaN/inf reward raises ValueError naming the first bad flat index of rewards

and returns ``(adv [B, K] rewards.dtype, mean [G, K], std [G, K], count [G] int64)`` where mean/std
are float64 for float64 rewards and float32 otherwise.

Math, per head k and group g with n_g members (two-pass, so large offsets do not cancel):
    mean_g = sum(r) / n_g
    std_g  = sqrt( sum((r - mean_g)^2) / (n_g - ddof) )          (0 when n_g - ddof <= 0)
    denom  = std_g (group) | std over all B rewards of head k with the same ddof (global) | -
    adv    = (r - mean_g) / (denom + eps)                        (group, global)
           = r - mean_g                                          (none)
    adv    = 0 for every member of a group whose rewards are all equal (this covers n_g = 1):
             such a group carries no preference signal, and the rule keeps 0/0 from ever
             producing NaN when eps = 0, and gives an exact 0 rather than rounding noise / eps.
    adv    = clamp(adv, -clip, clip) when clip > 0
The reported std is the group std whatever std_mode is (it is what users log).
"""
from __future__ import annotations

import torch

STD_MODES = {"group": 0, "global": 1, "none": 2}


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def first_nonfinite_index(rewards: torch.Tensor) -> int:
    """Flat index of the first NaN/inf element, or -1."""
    bad = ~torch.isfinite(rewards.reshape(-1))
    if not bool(bad.any()):
        return -1
    return int(bad.nonzero()[0, 0])


def raise_nonfinite(rewards: torch.Tensor, index: int) -> None:
    k = rewards.shape[1]
    value = rewards.reshape(-1)[index].item()
    where = f"rewards[{index // k}, {index % k}]" if k > 1 else f"rewards[{index // k}]"
    raise ValueError(
        f"rewards must be finite: {where} is {value} (first non-finite element; "
        f"flat index {index}). Filter or replace failed reward evaluations before normalising.")


def group_advantages_reference(rewards, group_index, group_size, num_groups, std_mode, ddof, eps,
                               clip, check_finite=True):
    if check_finite:
        bad = first_nonfinite_index(rewards)
        if bad >= 0:
            raise_nonfinite(rewards, bad)
    B, K = rewards.shape
    # The ground truth accumulates in float64 whatever the input dtype; stats are returned in
    # the contract's dtype.
    acc = torch.float64
    r = rewards.to(acc)
    if group_index is None:
        group_index = torch.arange(B, device=r.device) // group_size
    gi = group_index.to(torch.int64)
    G = num_groups

    count = torch.zeros(G, dtype=torch.int64, device=r.device).index_add_(
        0, gi, torch.ones_like(gi))
    cnt = count.to(acc).unsqueeze(1)                                     # [G, 1]
    sums = torch.zeros(G, K, dtype=acc, device=r.device).index_add_(0, gi, r)
    mean = sums / cnt.clamp_min(1)
    dev = r - mean[gi]                                                   # [B, K]
    ss = torch.zeros(G, K, dtype=acc, device=r.device).index_add_(0, gi, dev * dev)
    dof = cnt - ddof
    std = torch.where(dof > 0, torch.sqrt(ss / dof.clamp_min(1)), torch.zeros_like(ss))

    # "all members equal" per (group, head), exactly, from min == max.
    rows = gi.unsqueeze(1).expand(B, K)
    gmax = torch.full((G, K), -torch.inf, dtype=acc, device=r.device).scatter_reduce_(
        0, rows, r, "amax")
    gmin = torch.full((G, K), torch.inf, dtype=acc, device=r.device).scatter_reduce_(
        0, rows, r, "amin")
    flat = (gmax == gmin)[gi]                                            # [B, K]

    if std_mode == 0:
        adv = dev / (std[gi] + eps)
    elif std_mode == 1:
        gmean = r.mean(0, keepdim=True)
        gdof = B - ddof
        gstd = (torch.sqrt(((r - gmean) ** 2).sum(0, keepdim=True) / gdof) if gdof > 0
                else torch.zeros_like(gmean))
        adv = dev / (gstd + eps)
    elif std_mode == 2:
        adv = dev
    else:
        raise ValueError(f"std_mode must be 0, 1 or 2, got {std_mode}")
    adv = torch.where(flat, torch.zeros_like(adv), adv)
    if clip > 0:
        adv = adv.clamp(-clip, clip)
    sdt = stats_dtype(rewards.dtype)
    return adv.to(rewards.dtype), mean.to(sdt), std.to(sdt), count
