"""``MaMuJoCoEnv.rand_action``: the env's own seeded random actions, as ``rollout`` without a policy uses."""

from __future__ import annotations

import io

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import check_env_specs

from fp3o_lightning.envs import MaMuJoCoEnv

ACTION = ("agents", "action")


def _env(seed: int | None = 0, scenario: str = "HalfCheetah", agent_conf: str = "6x1") -> MaMuJoCoEnv:
    return MaMuJoCoEnv(scenario, agent_conf, num_envs=3, seed=seed)


def _draw(env: MaMuJoCoEnv, n: int) -> torch.Tensor:
    return torch.stack([env.rand_action()[ACTION] for _ in range(n)])


@pytest.mark.parametrize(("scenario", "agent_conf"), [("HalfCheetah", "6x1"), ("Humanoid", "9|8")])
def test_actions_fill_the_spec_bounds_with_its_shape_and_dtype(scenario: str, agent_conf: str) -> None:
    env = _env(scenario=scenario, agent_conf=agent_conf)
    spec = env.full_action_spec[ACTION]
    actions = _draw(env, 200)
    assert actions.shape == (200, *spec.shape) and actions.dtype == spec.dtype == torch.float32
    assert actions.device == env.device
    assert all(spec.is_in(a) for a in actions)
    low, high = spec.space.low, spec.space.high
    # Uniform over the whole box: every entry comes near both bounds, and the mean is the midpoint.
    span = high - low
    assert ((actions.amin(0) - low) < 0.05 * span).all() and ((high - actions.amax(0)) < 0.05 * span).all()
    assert (actions.mean(0) - (low + high) / 2).abs().max() < 0.15 * span.max()


def test_writes_into_the_given_tensordict_or_a_new_one() -> None:
    env = _env()
    td = env.reset()
    observation = td["agents", "observation"]
    assert env.rand_action(td) is td
    assert td["agents", "observation"] is observation and td[ACTION].shape == (3, env.n_agents, 1)
    fresh = env.rand_action()
    assert isinstance(fresh, TensorDict) and fresh.batch_size == env.batch_size
    assert set(fresh.keys(True, True)) == {ACTION}


def test_seeded_actions_replay_and_ignore_the_global_generator() -> None:
    first = _draw(_env(seed=7), 5)
    env = _env(seed=7)
    actions = []
    for _ in range(5):
        torch.rand(10)  # other users of torch's global generator
        actions.append(env.rand_action()[ACTION])
    assert torch.equal(torch.stack(actions), first)
    assert not torch.equal(_draw(_env(seed=8), 5), first)
    env.set_seed(7)
    assert torch.equal(_draw(env, 5), first)


def test_unseeded_actions_follow_torch_manual_seed() -> None:
    env = _env(seed=None)
    torch.manual_seed(3)
    first = _draw(env, 3)
    torch.manual_seed(3)
    assert torch.equal(_draw(env, 3), first)
    env.set_seed(1)
    env.set_seed(None)  # back to the global generator
    torch.manual_seed(3)
    assert torch.equal(_draw(env, 3), first)


def test_rollout_without_policy_steps_the_envs_actions() -> None:
    env = _env(seed=4)
    rollout = env.rollout(20)
    assert rollout.batch_size == (3, 20)
    assert torch.equal(rollout[ACTION].transpose(0, 1), _draw(_env(seed=4), 20))
    assert torch.equal(_env(seed=4).rollout(20)[ACTION], rollout[ACTION])


def test_state_dict_carries_the_generator() -> None:
    env = _env(seed=5)
    _draw(env, 4)
    buffer = io.BytesIO()
    torch.save(env.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other = _env(seed=6)
    other.load_state_dict(state)
    assert torch.equal(_draw(other, 3), _draw(env, 3))

    # A state saved before the generator was kept leaves the loading env's own generator as it was.
    del state["_extra_state"]["action_generator"]
    third, reference = _env(seed=6), _env(seed=6)
    third.load_state_dict(state)
    assert torch.equal(_draw(third, 3), _draw(reference, 3))


def test_unseeded_state_round_trip_stays_unseeded() -> None:
    state = _env(seed=None).state_dict()
    assert state["_extra_state"]["action_generator"] is None
    env = _env(seed=2)
    env.load_state_dict(state)
    torch.manual_seed(0)
    first = _draw(env, 2)
    torch.manual_seed(0)
    assert torch.equal(_draw(env, 2), first)


def test_check_env_specs_passes() -> None:
    check_env_specs(_env())
