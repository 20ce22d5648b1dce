"""Policy and critic networks."""

from fp3o_lightning.nets.critic import CentralCritic, LocalCritic, ValueNormalizer
from fp3o_lightning.nets.mlp import StackedGRU, StackedLayerNorm, StackedLinear, paper_mlp
from fp3o_lightning.nets.policy import ACTOR_NETWORKS, SHARING, MultiAgentPolicy

__all__ = [
    "ACTOR_NETWORKS",
    "SHARING",
    "CentralCritic",
    "MultiAgentPolicy",
    "LocalCritic",
    "StackedGRU",
    "StackedLayerNorm",
    "StackedLinear",
    "ValueNormalizer",
    "paper_mlp",
]
