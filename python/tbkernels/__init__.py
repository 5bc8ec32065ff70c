"""tbkernels: fused kernels and memory tools for RL post-training of video generators.

    import tbkernels
    adv = tbkernels.group_advantages(rewards, group_size=8, preset="flow_grpo")
    tbkernels.backends()          # which implementations run here, and why the others do not
"""
from ._backend import BACKENDS, BackendStatus, backends
from .ops import group_advantages

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BackendStatus", "backends", "group_advantages", "__version__"]
