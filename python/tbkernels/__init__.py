"""tbkernels: fused kernels and memory tools for RL post-training of video generators.

    import tbkernels
    adv = tbkernels.group_advantages(rewards, group_size=8, preset="flow_grpo")
    tbkernels.backends()          # which implementations run here, and why the others do not
"""
from ._backend import BACKENDS, BackendStatus, backends
from . import mps  # MPS quota manager: tbkernels.mps.plan / profile_workers / run_plan
from .ops import flow_grpo_loss, group_advantages, sde_step_with_logprob

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BackendStatus", "backends", "flow_grpo_loss", "group_advantages", "mps",
           "sde_step_with_logprob", "__version__"]
