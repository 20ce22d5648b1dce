"""Policy and critic networks."""

from fp3o_lightning.nets.critic import CentralCritic, LocalCritic, ValueNormalizer
from fp3o_lightning.nets.mlp import AgentMLP, paper_mlp
from fp3o_lightning.nets.policy import SHARING, GaussianPolicy

__all__ = [
    "SHARING",
    "AgentMLP",
    "CentralCritic",
    "GaussianPolicy",
    "LocalCritic",
    "ValueNormalizer",
    "paper_mlp",
]
