"""Saving and restoring :class:`fp3o_lightning.envs.MaMuJoCoEnv`'s full state through ``state_dict``."""

from __future__ import annotations

import io

import pytest
import torch
from tensordict import TensorDictBase

from fp3o_lightning.envs import MaMuJoCoEnv

#: HalfCheetah never terminates; Hopper terminates (random initial states on reset); Ant has contact
#: forces in its observations and reads body positions before simulating; Reacher steps through Gymnasium's
#: ``step`` and computes its observations with gymnasium-robotics' code (not gathers).
TASKS = [("HalfCheetah", "6x1"), ("Hopper", "3x1"), ("Ant", "2x4"), ("Reacher", "2x1")]
MAX_STEPS = 30  # truncations (and resets) inside both windows
BEFORE, AFTER = 37, 60


def _random_actions(env: MaMuJoCoEnv, steps: int, seed: int) -> torch.Tensor:
    """In-bound float32 actions ``[steps, num_envs, n_agents, max_action_dim]``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (steps, env.num_envs, env.n_agents, env.max_action_dim)
    spec = env.full_action_spec[("agents", "action")]
    return spec.space.low + (spec.space.high - spec.space.low) * torch.rand(shape, generator=gen)


def _run(env: MaMuJoCoEnv, td: TensorDictBase, actions: torch.Tensor) -> tuple[list, TensorDictBase]:
    """Step with ``step_and_maybe_reset``; return the step outputs and the carried-over TensorDict."""
    out = []
    for action in actions:
        td = td.clone()
        td.set(("agents", "action"), action)
        data, td = env.step_and_maybe_reset(td)
        out.append(data)
    return out, td


def _round_trip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(("scenario", "agent_conf"), TASKS)
def test_state_dict_resume_is_bit_exact(scenario: str, agent_conf: str) -> None:
    kwargs = {"scenario": scenario, "agent_conf": agent_conf, "num_envs": 2, "max_episode_steps": MAX_STEPS}
    env_a = MaMuJoCoEnv(**kwargs, seed=0)
    _, carried = _run(env_a, env_a.reset(), _random_actions(env_a, BEFORE, seed=1))
    state = _round_trip(env_a.state_dict())
    assert set(state) == {"_extra_state"}

    actions = _random_actions(env_a, AFTER, seed=2)
    out_a, _ = _run(env_a, carried, actions)
    env_a.close()

    env_b = MaMuJoCoEnv(**kwargs, seed=123)
    env_b.load_state_dict(state)
    out_b, _ = _run(env_b, carried, actions)
    env_b.close()

    resets = 0
    for step, (data_a, data_b) in enumerate(zip(out_a, out_b, strict=True)):
        assert set(data_a.keys(True, True)) == set(data_b.keys(True, True))
        for key in data_a.keys(True, True):
            assert torch.equal(data_a[key], data_b[key]), f"step {step}: {key} differs"
        resets += int(data_a["next", "done"].sum())
    # Both the truncation limit and (for Hopper) terminations reset sub-envs inside the window.
    assert resets >= 2


def test_state_dict_restores_a_fresh_unreset_env() -> None:
    """A state saved before the first reset carries the pending seeds: the first resets match."""
    env_a = MaMuJoCoEnv("Hopper", "3x1", num_envs=2, seed=5)
    env_b = MaMuJoCoEnv("Hopper", "3x1", num_envs=2, seed=6)
    env_b.load_state_dict(_round_trip(env_a.state_dict()))
    td_a, td_b = env_a.reset(), env_b.reset()
    for key in td_a.keys(True, True):
        assert torch.equal(td_a[key], td_b[key]), key


@pytest.mark.parametrize(
    "other",
    [
        {"scenario": "HalfCheetah", "agent_conf": "2x3", "num_envs": 2},
        {"scenario": "Hopper", "agent_conf": "3x1", "num_envs": 2},
        {"scenario": "HalfCheetah", "agent_conf": "6x1", "num_envs": 3},
        {"scenario": "HalfCheetah", "agent_conf": "6x1", "num_envs": 2, "agent_obsk": 0},
    ],
)
def test_load_state_dict_rejects_other_config(other: dict) -> None:
    state = MaMuJoCoEnv("HalfCheetah", "6x1", num_envs=2, seed=0).state_dict()
    env = MaMuJoCoEnv(**other)
    with pytest.raises(ValueError, match="saved from an env with"):
        env.load_state_dict(state)


def test_load_state_dict_rejects_foreign_state() -> None:
    env = MaMuJoCoEnv("HalfCheetah", "6x1", num_envs=2)
    with pytest.raises(ValueError, match="state of format"):
        env.load_state_dict({"_extra_state": {"qpos": torch.zeros(9)}})
