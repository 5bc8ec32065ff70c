"""Group-normalized advantages (GRPO): one call for every group, four interchangeable backends.

Public entry point: :func:`group_advantages`. The backend-level contract and the exact math are in
``_group_advantages_reference.py``; the C++ CPU kernel is ``csrc/cpu/group_advantages.cpp``, the
CUDA kernel ``csrc/cuda/group_advantages_kernels.cu`` (binding ``group_advantages_cuda.cpp``), the
Triton kernel ``kernels/group_advantages.py``. All compiled backends are ``torch.library`` ops with
fake implementations registered here, so the op traces under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .._backend import resolve_backend
from . import _compile
from ._group_advantages_reference import STD_MODES, group_advantages_reference, stats_dtype

IMPLEMENTED = ("reference", "cpu", "cuda", "triton")

# Conventions of the systems users come from (SPEC.md §1.4, §2.1, §10). Flow-GRPO: population std
# (np.std), eps added to the std; `std="global"` reproduces its `global_std=True`. DanceGRPO:
# torch.std (unbiased), eps 1e-8. Both clamp advantages to ±5 (adv_clip_max) in the loss.
# TeleBoost: unbiased std, eps 1e-4, no clamp.
PRESETS = {
    "flow_grpo": dict(std="group", ddof=0, eps=1e-4, clip=5.0),
    "dance_grpo": dict(std="group", ddof=1, eps=1e-8, clip=5.0),
    "teleboost": dict(std="group", ddof=1, eps=1e-4, clip=None),
}
_DEFAULTS = dict(std="group", ddof=0, eps=1e-4, clip=None)


# --------------------------------------------------------------------------------------------
# torch.library registration: fake (shape) functions for the compiled ops, and the Triton op.

def _fake_outputs(rewards, num_groups):
    k = rewards.shape[1]
    sdt = stats_dtype(rewards.dtype)
    return (torch.empty_like(rewards),
            rewards.new_empty((num_groups, k), dtype=sdt),
            rewards.new_empty((num_groups, k), dtype=sdt),
            rewards.new_empty((num_groups,), dtype=torch.int64))


def _register_compiled_fake():
    try:
        from .. import _C  # noqa: F401  (loading it defines the tbkernels:: schemas)
    except ImportError:
        return

    @torch.library.register_fake("tbkernels::group_advantages")
    def _(rewards, group_index, group_size, num_groups, std_mode, ddof, eps, clip, check_finite):
        return _fake_outputs(rewards, num_groups)


_register_compiled_fake()


@torch.library.custom_op("tbkernels::group_advantages_triton", mutates_args=())
def _group_advantages_triton(rewards: torch.Tensor, group_index: torch.Tensor | None,
                             group_size: int, num_groups: int, std_mode: int, ddof: int,
                             eps: float, clip: float, check_finite: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from tbkernels.kernels.group_advantages import group_advantages_triton
    return group_advantages_triton(rewards, group_index, group_size, num_groups, std_mode, ddof,
                                   eps, clip, check_finite)


@_group_advantages_triton.register_fake
def _(rewards, group_index, group_size, num_groups, std_mode, ddof, eps, clip, check_finite):
    return _fake_outputs(rewards, num_groups)


@_compile.inline_only
def _run_backend(name, *args):
    if name == "reference":
        rewards, *rest = args
        # The finiteness check is data-dependent Python control flow; under torch.compile the
        # reference skips it (the compiled backends check inside their kernels).
        check = rest[-1] and not torch.compiler.is_compiling()
        return group_advantages_reference(rewards, *rest[:-1], check_finite=check)
    if name == "triton":
        return _group_advantages_triton(*args)
    return torch.ops.tbkernels.group_advantages(*args)  # cpu and cuda: dispatch on device


@torch.compiler.assume_constant_result
def _pick(device: torch.device, backend: str | None) -> str:
    return resolve_backend("group_advantages", IMPLEMENTED, device, backend)


# --------------------------------------------------------------------------------------------
# Argument handling.

def _resolve_options(preset, std, ddof, eps, clip):
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"group_advantages: preset must be one of {sorted(PRESETS)}, "
                             f"got {preset!r}")
        base = PRESETS[preset]
    else:
        base = _DEFAULTS
    std = base["std"] if std is None else std
    ddof = base["ddof"] if ddof is None else ddof
    eps = base["eps"] if eps is None else eps
    clip = base["clip"] if clip is None else clip
    if std not in STD_MODES:
        raise ValueError(f"group_advantages: std must be one of {tuple(STD_MODES)}, got {std!r}")
    if isinstance(ddof, bool) or ddof not in (0, 1):
        raise ValueError(f"group_advantages: ddof must be 0 (population std, Flow-GRPO) or 1 "
                         f"(unbiased std, DanceGRPO), got {ddof!r}")
    ddof = int(ddof)                       # 1.0 passes the check; the kernels take an int
    eps = float(eps)
    # comparisons only: after a recompile Dynamo may trace these floats symbolically, and
    # math.isfinite / math.isinf do not trace a SymFloat
    if not 0 <= eps < math.inf:
        raise ValueError(f"group_advantages: eps must be a finite number >= 0, got {eps!r}")
    if clip is not None:
        clip = float(clip)
        if not clip > 0:
            raise ValueError(f"group_advantages: clip must be > 0 (or None / inf for no clamp), "
                             f"got {clip!r}")
    clip = -1.0 if clip is None or clip == math.inf else clip
    return STD_MODES[std], ddof, eps, clip


def _dense_group_index(group_ids, batch, device):
    """(group_index [B] int64 dense, num_groups, unique ids) from user group ids."""
    if isinstance(group_ids, torch.Tensor):
        if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex:
            raise TypeError(f"group_advantages: group_ids must hold integers, got {group_ids.dtype}")
        if group_ids.dim() != 1 or group_ids.shape[0] != batch:
            raise ValueError(f"group_advantages: group_ids must have shape [B] = [{batch}], got "
                             f"{list(group_ids.shape)}")
        unique, index = torch.unique(group_ids.to(device), sorted=True, return_inverse=True)
        return index.to(torch.int64), unique.shape[0], unique
    if type(group_ids).__module__ == "numpy" and hasattr(group_ids, "dtype"):
        # a NumPy array, as trainers often hold prompts: integers as a tensor, anything else
        # (strings, objects) as a sequence of ids
        if group_ids.dtype.kind in "iub":
            return _dense_group_index(torch.as_tensor(group_ids), batch, device)
        if group_ids.dtype.kind in "fc":
            raise TypeError(f"group_advantages: group_ids must hold integers or hashable ids, "
                            f"got a NumPy array of {group_ids.dtype}")
        if group_ids.ndim != 1:
            raise ValueError(f"group_advantages: group_ids must have shape [B] = [{batch}], "
                             f"got {list(group_ids.shape)}")
        group_ids = group_ids.tolist()
    if isinstance(group_ids, (str, bytes)) or not isinstance(group_ids, Sequence):
        raise TypeError("group_advantages: group_ids must be a [B] integer tensor or a sequence of "
                        f"B hashable ids (e.g. prompts), got {type(group_ids).__name__}")
    if len(group_ids) != batch:
        raise ValueError(f"group_advantages: group_ids has {len(group_ids)} ids for B = {batch} "
                         "rewards")
    # Prompts as ids, like Flow-GRPO's PerPromptStatTracker: groups in order of first appearance.
    order: dict = {}
    index = [order.setdefault(_hashable_id(g, i), len(order)) for i, g in enumerate(group_ids)]
    return (torch.tensor(index, dtype=torch.int64, device=device), len(order), list(order))


def _hashable_id(g, i):
    """One id of a group_ids sequence as a dict key. A tensor hashes by identity, not value:
    list(ids_tensor) or a list of prompt-token tensors would make every sample its own group and
    every advantage 0, silently. A one-value tensor counts as its value; a larger one, or an
    array, is refused with what to pass instead."""
    if isinstance(g, torch.Tensor) or (type(g).__module__ == "numpy" and hasattr(g, "ndim")):
        if g.ndim == 0:
            return g.item()
        raise TypeError(f"group_advantages: group_ids[{i}] is a {type(g).__name__} of shape "
                        f"{list(g.shape)}; ids are compared by value, so pass ints or strings "
                        "(e.g. the prompt, or tuple(token_ids.tolist()))")
    return g


def _trl_diagnostics(count, mean, std, batch):
    """TRL GRPOTrainer's logged names; per-sample averages, as TRL averages repeated group stats."""
    w = count.to(mean.dtype).unsqueeze(1) / batch                          # [G, 1]
    return {
        "reward": (w * mean).sum(0),
        "reward_std": (w * std).sum(0),
        # TRL: torch.isclose(std, 0) with its default atol.
        "frac_reward_zero_std": (w * torch.isclose(std, torch.zeros_like(std))).sum(0),
    }


def group_advantages(rewards: torch.Tensor, group_size: int | None = None, group_ids=None, *,
                     std: str | None = None, ddof: int | None = None, eps: float | None = None,
                     clip: float | None = None, preset: str | None = None,
                     return_stats: bool = False, backend: str | None = None,
                     check_finite: bool = True):
    """Normalise rewards within each group of samples (the GRPO advantage).

    ``A_i = (r_i - mean_g) / (std + eps)`` for sample ``i`` of group ``g``, per reward head.

    Parameters
    ----------
    rewards : Tensor ``[B]`` or ``[B, K]``, floating (fp32/fp64/fp16/bf16), any device
        One reward per sample, or K reward heads normalised independently (DanceGRPO's VQ/MQ,
        MixGRPO's ``advantage_aggr``). Advantages are constants of the loss: no gradient flows.
    group_size : int, optional
        Contiguous groups: samples ``[g*G, (g+1)*G)`` share a prompt. ``B`` must divide by it.
    group_ids : ``[B]`` integer tensor or sequence of B hashables (e.g. prompt strings; compared
        by value: 0-d tensors count as their values, larger tensors are refused), optional
        Arbitrary group membership: unsorted, variable group sizes. Give exactly one of
        ``group_size`` and ``group_ids``.
    std : ``"group"`` | ``"global"`` | ``"none"``
        Divide by the group's std, by the std of all B rewards of that head (Flow-GRPO's
        ``global_std=True``), or only subtract the group mean. Default ``"group"``.
    ddof : 0 | 1
        0: population std (``np.std``, Flow-GRPO); 1: unbiased (``torch.std``, DanceGRPO). Default 0.
    eps : float >= 0
        Added to the std (not the variance). Default 1e-4.
    clip : float > 0, optional
        Clamp advantages to ``[-clip, clip]``; ``None``: no clamp (or the preset's), ``inf``: no
        clamp even under a preset.
    preset : ``"flow_grpo"`` | ``"dance_grpo"`` | ``"teleboost"``, optional
        Conventions of that system (see ``PRESETS``); any option given explicitly overrides it.
    return_stats : bool
        Also return a dict of per-group ``mean`` ``[G(, K)]``, ``std`` (the group std whatever
        ``std`` is), ``count`` ``[G]``, ``group_ids`` (the id of each group: ``arange(G)`` for
        contiguous groups, sorted unique ids for an id tensor, order of first appearance for a
        sequence) and TRL's logged diagnostics ``reward``, ``reward_std``,
        ``frac_reward_zero_std`` (scalars, or ``[K]``; averaged over samples as TRL does).
    backend : ``"reference"`` | ``"cpu"`` | ``"cuda"`` | ``"triton"``, optional
        Force an implementation (else ``TBK_BACKEND``, else the fastest for the device).
    check_finite : bool
        Raise ``ValueError`` naming the first NaN/inf reward. On CUDA this costs one device sync.

    Returns
    -------
    advantages : Tensor shaped like ``rewards``, same dtype and device
        A group whose rewards are all equal (a group of one included) gets advantage exactly 0:
        it carries no preference signal, and this holds even with ``eps=0``.
    stats : dict, only with ``return_stats=True``
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"group_advantages: rewards must be a torch.Tensor, got "
                        f"{type(rewards).__name__}")
    if not rewards.dtype.is_floating_point:
        raise TypeError(f"group_advantages: rewards must be floating (float32/float64/float16/"
                        f"bfloat16), got {rewards.dtype}; convert with rewards.float()")
    if rewards.dim() not in (1, 2):
        raise ValueError(f"group_advantages: rewards must be [B] or [B, K], got shape "
                         f"{list(rewards.shape)}")
    batch = rewards.shape[0]
    if batch == 0 or (rewards.dim() == 2 and rewards.shape[1] == 0):
        raise ValueError(f"group_advantages: rewards is empty (shape {list(rewards.shape)})")
    std_mode, ddof, eps, clip = _resolve_options(preset, std, ddof, eps, clip)

    if (group_size is None) == (group_ids is None):
        raise ValueError("group_advantages: give exactly one of group_size (contiguous groups) "
                         "and group_ids (arbitrary groups)")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_advantages: group_size must be a positive int, got "
                             f"{group_size!r}")
        if batch % group_size != 0:
            raise ValueError(f"group_advantages: B = {batch} rewards do not split into groups of "
                             f"group_size = {group_size} (B % group_size = {batch % group_size})")
        group_index, num_groups, unique = None, batch // group_size, None
    else:
        group_index, num_groups, unique = _dense_group_index(group_ids, batch, rewards.device)

    r2 = rewards.detach().reshape(batch, -1).contiguous()
    name = _pick(rewards.device, backend)
    adv, mean, std_g, count = _run_backend(name, r2, group_index, group_size or 0, num_groups,
                                           std_mode, ddof, eps, clip, check_finite)
    adv = adv.reshape(rewards.shape)
    if not return_stats:
        return adv
    stats = _trl_diagnostics(count, mean, std_g, batch)
    if unique is None:
        unique = torch.arange(num_groups, device=rewards.device)
    squeeze = rewards.dim() == 1
    stats.update(mean=mean, std=std_g, count=count, group_ids=unique)
    if squeeze:
        for key in ("reward", "reward_std", "frac_reward_zero_std"):
            stats[key] = stats[key].squeeze(0)
        stats["mean"], stats["std"] = mean.squeeze(1), std_g.squeeze(1)
    return adv, stats
