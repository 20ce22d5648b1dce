"""Policy and critic networks."""

from fp3o_lightning.nets.critic import AgentCritic, CentralCritic, Critic, ValueNormalizer
from fp3o_lightning.nets.mlp import StackedGRU, StackedLayerNorm, StackedLinear, paper_mlp
from fp3o_lightning.nets.policy import ACTOR_NETWORKS, SHARING, MultiAgentPolicy

__all__ = [
    "ACTOR_NETWORKS",
    "AgentCritic",
    "SHARING",
    "CentralCritic",
    "Critic",
    "MultiAgentPolicy",
    "StackedGRU",
    "StackedLayerNorm",
    "StackedLinear",
    "ValueNormalizer",
    "paper_mlp",
]
