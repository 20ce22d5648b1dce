"""GAE and value targets against a step-by-step reference written with plain Python loops.

A hand-made rollout of two environments holds a termination, a truncation (the time limit) and the
reset after each, in the middle of the rollout, and an episode still running at its end. Every
critic the module builds (the team ``V(s)``, the per-agent ``V(s, i)`` with a shared or per-agent
value normaliser, IPPO's ``V(o^i)``) is checked in both time-limit modes, with a value normaliser far
from the identity so that mixing normalised and denormalised values shows.
"""

from __future__ import annotations

import statistics

import pytest
import torch
from tensordict import TensorDict

from fp3o_lightning.envs import make_env
from fp3o_lightning.keys import ACTION, OBSERVATION
from fp3o_lightning.nets import CentralCritic

from .conftest import SMALL, small_module

N_ENVS, STEPS = 2, 10
# (environment, step) -> "terminated" or "truncated"; the other steps go on.
ENDS = {(0, 2): "terminated", (0, 6): "truncated", (1, 4): "truncated", (1, 9): "terminated"}


def synthetic_rollout(n_agents: int, observation_size: int, action_size: int, state_size: int) -> TensorDict:
    """A ``[N_ENVS, STEPS]`` rollout with the episode ends of ``ENDS``.

    Between steps the next observation is the following step's observation, except at an episode's
    end: there the next observation is the last one of the finished episode and the following step
    starts from a fresh reset, so a critic that bootstraps from the wrong one is caught.
    """
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    state = randn(N_ENVS, STEPS + 1, state_size)
    observation = randn(N_ENVS, STEPS + 1, n_agents, observation_size)
    next_state, next_observation = state[:, 1:].clone(), observation[:, 1:].clone()
    flags = {name: torch.zeros(N_ENVS, STEPS, 1, dtype=torch.bool) for name in ("terminated", "truncated")}
    for (env, step), kind in ENDS.items():
        flags[kind][env, step] = True
        next_state[env, step] = randn(state_size)  # the finished episode's last state, not the reset
        next_observation[env, step] = randn(n_agents, observation_size)
    done = flags["terminated"] | flags["truncated"]
    return TensorDict(
        {
            "agents": {
                "observation": observation[:, :-1],
                "action": randn(N_ENVS, STEPS, n_agents, action_size),
            },
            "state": state[:, :-1],
            "next": {
                "agents": {"observation": next_observation},
                "state": next_state,
                "reward": randn(N_ENVS, STEPS, 1),
                "done": done,
                **flags,
            },
        },
        batch_size=[N_ENVS, STEPS],
    )


def reference_gae(reward, value, next_value, terminated, truncated, gamma, lam, bootstrap_time_limit):
    """Advantages and returns ``[env][step][k]`` by the textbook backward recursion, one value column
    ``k`` at a time: ``delta_t = r_t + gamma V(s'_t) [not cut] - V(s_t)``, ``A_t = delta_t + gamma lam
    A_(t+1) [not done]``, return ``A_t + V(s_t)``. A termination never bootstraps; a truncation does only
    with ``bootstrap_time_limit``."""
    advantages, returns = [], []
    for env in range(len(reward)):
        steps, width = len(reward[env]), len(value[env][0])
        env_advantages = [[0.0] * width for _ in range(steps)]
        for k in range(width):
            following = 0.0
            for t in reversed(range(steps)):
                done = terminated[env][t] or truncated[env][t]
                bootstrap = not terminated[env][t] and (bootstrap_time_limit or not truncated[env][t])
                delta = reward[env][t] - value[env][t][k]
                if bootstrap:
                    delta += gamma * next_value[env][t][k]
                following = delta + (0.0 if done else gamma * lam * following)
                env_advantages[t][k] = following
        advantages.append(env_advantages)
        returns.append(
            [[a + v for a, v in zip(env_advantages[t], value[env][t], strict=True)] for t in range(steps)]
        )
    return advantages, returns


def normalized_columns(rows):
    """Each column minus its mean over the rows, divided by its population std plus 1e-5."""
    columns = list(zip(*rows, strict=True))
    stats = [(statistics.fmean(c), statistics.pstdev(c)) for c in columns]
    return [[(x - m) / (s + 1e-5) for x, (m, s) in zip(row, stats, strict=True)] for row in rows]


def far_from_identity(normalizer) -> None:
    """Value-normaliser statistics with a mean and a std far from 0 and 1 (different per agent)."""
    size = normalizer.running_mean.numel()
    mean = torch.linspace(2.0, -3.0, size, dtype=torch.float64)
    std = torch.linspace(4.0, 0.5, size, dtype=torch.float64)
    normalizer.running_mean.copy_(mean)
    normalizer.running_mean_sq.copy_(mean**2 + std**2)
    normalizer.debiasing_term.fill_(1.0)


@pytest.fixture(scope="module")
def sizes() -> tuple[int, int, int]:
    """The small task's observation, action and state sizes."""
    env = make_env(**SMALL["env"], num_envs=1)
    spec = env.observation_spec
    result = (spec[OBSERVATION].shape[-1], env.full_action_spec[ACTION].shape[-1], spec["state"].shape[-1])
    env.close()
    return result


def critic_inputs(options: dict, data: TensorDict) -> torch.Tensor:
    """What the critic reads: IPPO each agent's observation, the agent-specific critic the state with
    each agent's observation, the others the state."""
    if options["algorithm"] == "ippo":
        return data[OBSERVATION]
    if options.get("critic_input") == "state_and_observation":
        observation = data[OBSERVATION]
        state = data["state"].unsqueeze(-2).expand(*observation.shape[:-1], -1)
        return torch.cat([state, observation], -1)
    return data["state"]


CRITICS = {
    "team V(s)": {"algorithm": "mappo", "critic": "team", "sharing": "nops"},
    "V(s, i), one normaliser per agent": {"algorithm": "fp3o", "critic": "agent", "sharing": "nops"},
    "V(s, i), one shared normaliser": {"algorithm": "happo", "critic": "agent", "sharing": "fups"},
    "V(s, o_i), agent-specific state": {
        "algorithm": "mappo",
        "critic": "agent",
        "sharing": "paps",
        "critic_input": "state_and_observation",
    },
    "IPPO V(o_i)": {"algorithm": "ippo", "critic": "agent", "sharing": "nops"},
    "IPPO V(o_i), one normaliser": {"algorithm": "ippo", "critic": "team", "sharing": "paps"},
}


@pytest.mark.parametrize("time_limit", ["terminal", "bootstrap"])
@pytest.mark.parametrize("options", CRITICS.values(), ids=CRITICS.keys())
def test_advantages_and_value_targets_match_a_step_by_step_reference(sizes, options, time_limit) -> None:
    """``compute_advantages``: the advantages (normalised per value column), the critic's normalised
    values and the denormalised value targets equal the reference on a rollout with a termination, a
    truncation and resets in the middle, for every critic and both time-limit modes."""
    module = small_module(**options, time_limit=time_limit, gamma=0.9, gae_lambda=0.8)
    far_from_identity(module.value_normalizer)
    rollout = synthetic_rollout(module.n_agents, *sizes)
    with torch.no_grad():
        critic = module.critic
        raw_value, raw_next_value = (
            critic(critic_inputs(options, data)) for data in (rollout, rollout["next"])
        )
        value = module.value_normalizer.denormalize(raw_value)
        next_value = module.value_normalizer.denormalize(raw_next_value)
    width = value.shape[-1]
    assert width == (1 if isinstance(critic, CentralCritic) else module.n_agents)

    advantages, returns = reference_gae(
        rollout["next", "reward"].squeeze(-1).tolist(),
        value.tolist(),
        next_value.tolist(),
        rollout["next", "terminated"].squeeze(-1).tolist(),
        rollout["next", "truncated"].squeeze(-1).tolist(),
        gamma=0.9,
        lam=0.8,
        bootstrap_time_limit=time_limit == "bootstrap",
    )
    flat_returns = [row for env in returns for row in env]  # environment-major, as the batch
    flat_advantages = normalized_columns([row for env in advantages for row in env])

    batch, _ = module.learner.compute_advantages(rollout)
    assert batch.batch_size == (N_ENVS * STEPS,)
    torch.testing.assert_close(batch["value_target"], torch.tensor(flat_returns), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch["advantage"], torch.tensor(flat_advantages), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batch["value"], raw_value.reshape(-1, width), rtol=0, atol=0)
    torch.testing.assert_close(batch[ACTION], rollout[ACTION].reshape(-1, module.n_agents, 1), rtol=0, atol=0)
