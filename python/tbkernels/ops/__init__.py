"""One module per op family: public wrapper, torch.library registration and backend dispatch."""
from .flow_grpo import flow_grpo_loss, sde_step_with_logprob
from .group_advantages import group_advantages

__all__ = ["flow_grpo_loss", "group_advantages", "sde_step_with_logprob"]
