"""tbkernels: fused kernels and memory tools for RL post-training of video generators.

    import tbkernels
    adv = tbkernels.group_advantages(rewards, group_size=8, preset="flow_grpo")
    tbkernels.backends()          # which implementations run here, and why the others do not
"""
from ._backend import BACKENDS, BackendStatus, backends
from . import memory  # peak-memory measurement: tbkernels.memory.peak_memory()
from . import mps  # MPS quota manager: tbkernels.mps.plan / profile_workers / run_plan
from .ops import (DPOInputError, NonFiniteLossError, diffusion_dpo_loss, diffusion_kto_loss,
                  dpo_backward, flow_dpo_loss, per_sample_mse)
from .ops import flow_grpo_loss, group_advantages, sde_step_with_logprob

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BackendStatus", "DPOInputError", "NonFiniteLossError", "backends",
           "diffusion_dpo_loss", "diffusion_kto_loss", "dpo_backward", "flow_dpo_loss",
           "flow_grpo_loss", "group_advantages", "memory", "mps", "per_sample_mse",
           "sde_step_with_logprob", "__version__"]
