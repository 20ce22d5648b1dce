"""Policy and critic networks."""

from fp3o_lightning.nets.critic import CentralCritic, ValueNormalizer
from fp3o_lightning.nets.mlp import AgentMLP, paper_mlp
from fp3o_lightning.nets.policy import SHARING, GaussianPolicy, clip_grad_norm_per_agent

__all__ = [
    "SHARING",
    "AgentMLP",
    "CentralCritic",
    "GaussianPolicy",
    "ValueNormalizer",
    "clip_grad_norm_per_agent",
    "paper_mlp",
]
