"""The test-only masked game (``tests/masked_game.py``): specs, masks, seeding and resume."""

from __future__ import annotations

import pytest
import torch
from torchrl.envs.utils import ExplorationType, check_env_specs

from .conftest import NEEDS_CUDA, sampled_rollout, small_module
from .masked_game import MaskedGameEnv, MaskedGameOnDeviceEnv

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=NEEDS_CUDA, id="cuda")]
MASK, ALIVE, ACTION = ("agents", "action_mask"), ("agents", "alive"), ("agents", "action")


@pytest.mark.parametrize("cls", [MaskedGameEnv, MaskedGameOnDeviceEnv], ids=["cpu_sim", "device_sim"])
@pytest.mark.parametrize("device", DEVICES)
def test_specs_masks_deaths_and_episode_ends(cls: type[MaskedGameEnv], device: str) -> None:
    env = cls(num_envs=4, max_episode_steps=10, seed=0, device=device)
    check_env_specs(env)
    rollout = env.rollout(80, break_when_any_done=False)
    assert {t.device.type for t in rollout.values(True, True)} == {device}
    mask, alive = rollout[MASK], rollout[ALIVE]
    assert mask.gather(-1, rollout[ACTION].unsqueeze(-1)).all()  # env.rand_action respects the mask
    assert mask[..., 0].all() and 0.3 < mask[..., 1:].float().mean() < 0.9  # the mask changes
    assert (~alive).any() and not mask[~alive][:, 1:].any()  # the dead may only wait
    nxt = rollout["next"]
    for flag in ("won", "terminated", "truncated"):
        assert nxt[flag].any(), flag
    assert torch.equal(nxt["done"], nxt["terminated"] | nxt["truncated"])
    assert not (nxt["won"] & ~nxt["terminated"]).any() and not (nxt["truncated"] & nxt["terminated"]).any()
    assert (nxt["state"][nxt["truncated"].squeeze(-1)][:, -1] == 1).all()  # truncated at the step limit


def test_an_unavailable_or_out_of_range_action_raises() -> None:
    env = MaskedGameEnv(num_envs=2, seed=1)
    td = env.reset()
    env_index, agent, action = (~td[MASK]).nonzero()[0].tolist()
    td[ACTION] = torch.zeros(2, env.n_agents, dtype=torch.long)
    td[ACTION][env_index, agent] = action
    with pytest.raises(ValueError, match="unavailable action"):
        env.step(td)
    td[ACTION] = torch.full((2, env.n_agents), env.n_actions)
    with pytest.raises(ValueError, match="unavailable action"):
        env.step(td)


@pytest.mark.usefixtures("masked_game")
@pytest.mark.parametrize("exploration", [ExplorationType.RANDOM, ExplorationType.DETERMINISTIC])
def test_the_package_actor_samples_only_available_actions(exploration: ExplorationType) -> None:
    module = small_module(env={"name": "masked_game"}, sharing="paps")
    rollout = sampled_rollout(module, steps=60, exploration=exploration)  # the env raises otherwise
    assert rollout[MASK].gather(-1, rollout[ACTION].unsqueeze(-1)).all()
    assert not rollout[MASK].all()


def test_the_same_seed_replays_and_another_differs() -> None:
    def run(seed: int, env: MaskedGameEnv | None = None):
        env = env or MaskedGameEnv(num_envs=3, seed=0)
        env.set_seed(seed)
        return env.rollout(30, break_when_any_done=False)

    first = run(5)
    assert (first == run(5)).all()
    assert (first == run(5, MaskedGameOnDeviceEnv(num_envs=3))).all()
    assert not (first == run(6)).all()


def test_a_loaded_state_continues_exactly() -> None:
    env, other = MaskedGameEnv(num_envs=3, seed=2), MaskedGameEnv(num_envs=3, seed=9)
    carried = env.reset()
    for _ in range(7):
        _, carried = env.step_and_maybe_reset(env.rand_action(carried))
    other.load_state_dict(env.state_dict())
    continued = [
        e.rollout(25, auto_reset=False, break_when_any_done=False, tensordict=carried.clone())
        for e in (env, other)
    ]
    assert (continued[0] == continued[1]).all()
    with pytest.raises(ValueError, match="n_agents=3"):
        MaskedGameEnv(num_envs=3, n_agents=2).load_state_dict(env.state_dict())
