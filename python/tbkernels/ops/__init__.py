"""One module per op family: public wrapper, torch.library registration and backend dispatch."""
from .group_advantages import group_advantages

__all__ = ["group_advantages"]
