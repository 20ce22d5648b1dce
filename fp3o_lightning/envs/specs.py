"""The specs every environment of the package shares (see :mod:`fp3o_lightning.envs`)."""

from __future__ import annotations

import torch
from torchrl.data import Binary, Categorical, Composite, TensorSpec, Unbounded
from torchrl.envs import EnvBase


def set_contract_specs(
    env: EnvBase,
    observation_size: int,
    state_size: int,
    action: TensorSpec,
    n_actions: int | None = None,
    flags: tuple[str, ...] = (),
    agent_flags: tuple[str, ...] = (),
) -> None:
    """Set ``env``'s specs to the package's contract, batch ``[num_envs]`` with ``n_agents`` agents.

    ``("agents", "observation")`` ``[n, a, observation_size]``, ``"state"`` ``[n, state_size]``,
    ``("agents", "action")`` = ``action`` (shaped ``[n, a, ...]``), a team ``"reward"`` ``[n, 1]``,
    ``"done"``/``"terminated"``/``"truncated"`` ``[n, 1]``; with ``n_actions``, the observation
    ``("agents", "action_mask")`` ``[n, a, n_actions]``; ``flags`` are more bool ``[n, 1]``
    observations (``"won"``, ``"faulted"``); ``agent_flags`` are per-agent bool ``[n, a]`` observations
    under ``"agents"`` (``"alive"``).
    """
    n, a, device = env.num_envs, env.n_agents, env.device
    flag = Categorical(2, shape=(n, 1), dtype=torch.bool, device=device)
    agents = {"observation": Unbounded(shape=(n, a, observation_size), dtype=torch.float32, device=device)}
    if n_actions is not None:
        agents["action_mask"] = Binary(n=n_actions, shape=(n, a, n_actions), dtype=torch.bool, device=device)
    for name in agent_flags:
        agents[name] = Categorical(2, shape=(n, a), dtype=torch.bool, device=device)
    env.observation_spec = Composite(
        agents=Composite(agents, shape=(n, a), device=device),
        state=Unbounded(shape=(n, state_size), dtype=torch.float32, device=device),
        **{name: flag.clone() for name in flags},
        shape=(n,),
        device=device,
    )
    env.action_spec = Composite(
        agents=Composite(action=action, shape=(n, a), device=device), shape=(n,), device=device
    )
    env.reward_spec = Unbounded(shape=(n, 1), dtype=torch.float32, device=device)
    env.done_spec = Composite(
        done=flag.clone(), terminated=flag.clone(), truncated=flag.clone(), shape=(n,), device=device
    )
