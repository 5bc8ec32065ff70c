"""One module per op family: public wrapper, torch.library registration and backend dispatch."""
from .dpo import (DPOInputError, NonFiniteLossError, diffusion_dpo_loss, diffusion_kto_loss,
                  dpo_backward, flow_dpo_loss, per_sample_mse)
from .flow_grpo import flow_grpo_loss, sde_step_with_logprob
from .group_advantages import group_advantages

__all__ = ["DPOInputError", "NonFiniteLossError", "diffusion_dpo_loss", "diffusion_kto_loss",
           "dpo_backward", "flow_dpo_loss", "flow_grpo_loss", "group_advantages",
           "per_sample_mse", "sde_step_with_logprob"]
