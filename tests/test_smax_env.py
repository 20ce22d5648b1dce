"""Tests for :class:`~fp3o_lightning.envs.smax.SMAXEnv`: specs, dones, wins, resets, seeds, checkpoints.

All on the small map ``3m`` with 3 sub-envs, whose compiled programs are cached per process (one compile
for the default settings, one for a short step limit).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Categorical
from torchrl.envs.utils import check_env_specs

pytest.importorskip("jaxmarl")

from fp3o_lightning.envs.smax import PAPER_MAPS, SMAC_ONLY_MAPS, SMAX_MAPS, SMAXEnv  # noqa: E402

N = 3  # sub-envs
STOP = 4  # SMAX's no-op


def _random_masked(td: TensorDict, gen: torch.Generator) -> torch.Tensor:
    """Actions drawn uniformly among the allowed ones, ``[num_envs, n_agents]``."""
    mask = td["agents", "action_mask"]
    probs = mask.reshape(-1, mask.shape[-1]).float()
    return torch.multinomial(probs, 1, generator=gen).reshape(mask.shape[:-1])


def _focus_fire(td: TensorDict) -> torch.Tensor:
    """Attack the first enemy in range, else move (action 1, towards the enemies' side), else stop."""
    mask = td["agents", "action_mask"]
    attack = mask[..., 5:]
    first = attack.float().argmax(-1) + 5
    return torch.where(attack.any(-1), first, torch.where(mask[..., 1], 1, STOP))


def _rollout(
    env: SMAXEnv, steps: int, seed: int, td: TensorDict | None = None
) -> tuple[TensorDict, TensorDict]:
    """``steps`` steps of random masked actions via ``step_and_maybe_reset``: (stacked data, last td)."""
    gen = torch.Generator().manual_seed(seed)
    td = env.reset() if td is None else td
    out = []
    for _ in range(steps):
        td.set(("agents", "action"), _random_masked(td, gen))
        data, td = env.step_and_maybe_reset(td)
        out.append(data)
    return torch.stack(out), td


def _leaves(env: SMAXEnv) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(env._states)]


def _alive_allies(env: SMAXEnv) -> np.ndarray:
    return np.asarray(env._states.state.unit_alive)[:, : env.n_agents]


def test_specs_shapes_and_attributes() -> None:
    env = SMAXEnv("3m", num_envs=N, seed=0)
    check_env_specs(env)
    assert (env.map_name, env.num_envs, env.n_agents, env.n_enemies, env.n_actions) == ("3m", N, 3, 3, 8)
    assert env.max_episode_steps == 100  # SMAX's default
    a, k = env.n_agents, env.n_actions
    spec = env.full_action_spec["agents", "action"]
    assert (
        isinstance(spec, Categorical) and spec.n == k and spec.shape == (N, a) and spec.dtype == torch.int64
    )
    td = env.reset()
    expected = {
        ("agents", "observation"): ((N, a, env.obs_size), torch.float32),
        ("agents", "action_mask"): ((N, a, k), torch.bool),
        ("agents", "alive"): ((N, a), torch.bool),
        "state": ((N, env.state_size), torch.float32),
        "won": ((N, 1), torch.bool),
        "done": ((N, 1), torch.bool),
        "terminated": ((N, 1), torch.bool),
        "truncated": ((N, 1), torch.bool),
    }
    assert set(td.keys(True, True)) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert td[key].shape == shape and td[key].dtype == dtype, key
    assert not td["done"].any() and not td["won"].any()
    td = env.rand_step(td)  # unmasked random actions: unavailable ones are ignored by SMAX
    nxt = td["next"]
    assert set(nxt.keys(True, True)) == set(expected) | {"reward"}
    for key, (shape, dtype) in expected.items():
        assert nxt[key].shape == shape and nxt[key].dtype == dtype, key
    assert nxt["reward"].shape == (N, 1) and nxt["reward"].dtype == torch.float32


def test_compiled_programs_are_reused() -> None:
    first = SMAXEnv("3m", num_envs=N, seed=0)
    second = SMAXEnv("3m", num_envs=N, seed=1)
    assert second.compile_time_s == 0.0
    assert second._program is first._program


def test_random_masked_rollout_ends_episodes() -> None:
    env = SMAXEnv("3m", num_envs=N, seed=1)
    gen = torch.Generator().manual_seed(1)
    td = env.reset()
    episodes = 0
    for _ in range(300):
        mask = td["agents", "action_mask"]
        assert mask.any(-1).all() and mask[..., STOP].all()  # stop is always allowed
        dead = torch.from_numpy(~_alive_allies(env))
        only_stop = torch.zeros(env.n_actions, dtype=torch.bool)
        only_stop[STOP] = True
        assert (mask[dead] == only_stop).all()  # a dead agent may only stop
        td.set(("agents", "action"), _random_masked(td, gen))
        data, td = env.step_and_maybe_reset(td)
        nxt = data["next"]
        assert torch.equal(nxt["done"], nxt["terminated"] | nxt["truncated"])
        assert not (nxt["terminated"] & nxt["truncated"]).any()
        assert torch.isfinite(nxt["reward"]).all() and torch.isfinite(nxt["agents", "observation"]).all()
        assert not (nxt["won"] & ~nxt["terminated"]).any()
        episodes += int(nxt["done"].sum())
        assert not td["done"].any()  # finished sub-envs were reset
    assert episodes >= N


def test_won_only_on_final_steps_of_won_battles() -> None:
    env = SMAXEnv("3m", num_envs=N, seed=0)
    td = env.reset()
    wins = losses = 0
    for _ in range(300):
        td.set(("agents", "action"), _focus_fire(td))
        data, td = env.step_and_maybe_reset(td)
        nxt = data["next"]
        won = nxt["won"].squeeze(-1)
        assert (nxt["terminated"].squeeze(-1)[won]).all()  # won only on the final step
        assert (nxt["reward"].squeeze(-1)[won] >= 1.0).all()  # SMAX's win bonus
        assert not td["won"].any()  # the auto-reset output
        wins += int(won.sum())
        losses += int((nxt["terminated"].squeeze(-1) & ~won).sum())
    assert wins > 0 and losses > 0


def test_truncation_at_max_episode_steps() -> None:
    env = SMAXEnv("3m", num_envs=N, max_episode_steps=3, seed=0)
    assert env.max_episode_steps == 3
    assert env._program is SMAXEnv("3m", num_envs=N)._program  # the limit is not compiled in
    td = env.reset()
    for step in range(1, 7):
        td.set(("agents", "action"), torch.full((N, env.n_agents), STOP))
        data, td = env.step_and_maybe_reset(td)
        nxt = data["next"]
        if step % 3:
            assert not nxt["done"].any()
        else:
            assert nxt["done"].all() and nxt["truncated"].all() and not nxt["terminated"].any()


def test_partial_reset_touches_only_requested_sub_envs() -> None:
    env = SMAXEnv("3m", num_envs=N, seed=2)
    _, td = _rollout(env, 5, seed=2)
    before, keys_before = _leaves(env), np.asarray(env._keys)
    steps_before = np.asarray(env._states.state.step)
    assert (steps_before > 0).all()
    reset = torch.tensor([False, True, False])
    out = env.reset(td.clone().set("_reset", reset.unsqueeze(-1)))
    after, keys_after = _leaves(env), np.asarray(env._keys)
    assert (np.asarray(env._states.state.step) == np.where(reset.numpy(), 0, steps_before)).all()
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(old[~reset.numpy()], new[~reset.numpy()])
    np.testing.assert_array_equal(keys_before[~reset.numpy()], keys_after[~reset.numpy()])
    assert not (keys_before[reset.numpy()] == keys_after[reset.numpy()]).all()
    for key in (("agents", "observation"), ("agents", "action_mask"), "state"):
        assert torch.equal(out[key][~reset], td[key][~reset]), key
    assert not torch.equal(out["state"][reset], td["state"][reset])
    # The env's own reset output for the kept sub-envs is their current data too.
    raw = env._reset(TensorDict({"_reset": torch.zeros(N, 1, dtype=torch.bool)}, batch_size=[N]))
    for key in (("agents", "observation"), ("agents", "action_mask"), "state"):
        assert torch.equal(raw[key], out[key]), key
    for old, new in zip(after, _leaves(env), strict=True):
        np.testing.assert_array_equal(old, new)


def test_same_seed_same_rollout() -> None:
    first, _ = _rollout(SMAXEnv("3m", num_envs=N, seed=5), 60, seed=0)
    second, _ = _rollout(SMAXEnv("3m", num_envs=N, seed=5), 60, seed=0)
    assert (first == second).all()
    other, _ = _rollout(SMAXEnv("3m", num_envs=N, seed=6), 60, seed=0)
    assert not torch.equal(first["next", "state"], other["next", "state"])
    # set_seed on a used env, then reset: as a fresh env with that seed.
    env = SMAXEnv("3m", num_envs=N, seed=9)
    _rollout(env, 7, seed=3)
    env.set_seed(5)
    again, _ = _rollout(env, 60, seed=0)
    assert (again == first).all()
    keys = np.asarray(env._keys)
    env.set_seed(None)  # changes nothing
    np.testing.assert_array_equal(np.asarray(env._keys), keys)


def test_state_dict_round_trip_continues_identically() -> None:
    env = SMAXEnv("3m", num_envs=N, seed=11)
    _, td = _rollout(env, 23, seed=4)
    buffer = io.BytesIO()
    torch.save(env.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    restored = SMAXEnv("3m", num_envs=N, seed=999)
    restored.load_state_dict(saved)
    assert restored.seed == env.seed
    expected, _ = _rollout(env, 80, seed=8, td=td.clone())
    got, _ = _rollout(restored, 80, seed=8, td=td.clone())
    assert expected["next", "done"].any()  # resets happened after the restore
    assert (expected == got).all()

    bad = dict(saved)
    bad["_extra_state"] = {
        **saved["_extra_state"],
        "config": {**saved["_extra_state"]["config"], "map_name": "8m"},
    }
    with pytest.raises(ValueError, match="map_name='8m'"):
        restored.load_state_dict(bad)


def test_out_of_range_actions_raise() -> None:
    env = SMAXEnv("3m", num_envs=N, seed=0)
    td = env.reset()
    for bad in (-1, env.n_actions):
        td.set(("agents", "action"), torch.full((N, env.n_agents), bad))
        with pytest.raises(ValueError, match=r"actions must be in \[0, 8\)"):
            env.step(td)


def test_unknown_map_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="Unknown SMAX map 'not_a_map'") as info:
        SMAXEnv("not_a_map")
    for name in SMAX_MAPS:
        assert name in str(info.value)


@pytest.mark.parametrize("map_name", ["bane_vs_bane", "2c_vs_64zg", "corridor", "MMM2", "protoss_5_vs_5"])
def test_maps_smax_lacks_need_starcraft(map_name: str) -> None:
    with pytest.raises(ValueError, match=r"StarCraft II.*`smacv2` env") as info:
        SMAXEnv(map_name)
    assert "3s5z" in str(info.value)


def test_map_lists_match_jaxmarl() -> None:
    from jaxmarl.environments.smax.smax_env import MAP_NAME_TO_SCENARIO

    assert set(SMAX_MAPS) == set(MAP_NAME_TO_SCENARIO)
    assert {"smacv2_5_units", "smacv2_10_units", "smacv2_20_units"} <= set(SMAX_MAPS)
    assert [m for m in PAPER_MAPS if m in SMAX_MAPS] == ["3s5z", "5m_vs_6m", "6h_vs_8z"]
    assert not set(SMAC_ONLY_MAPS) & set(SMAX_MAPS)
    assert set(PAPER_MAPS) <= set(SMAX_MAPS) | set(SMAC_ONLY_MAPS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scenario": None}, "use map_name"),
        ({"max_steps": 10}, "use max_episode_steps"),
        ({"action_type": "continuous"}, "discrete actions only"),
        ({"num_envs": 0}, "num_envs"),
        ({"max_episode_steps": 0}, "max_episode_steps"),
    ],
)
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SMAXEnv("3m", **kwargs)


def test_observations_carry_the_last_action_and_alive_flags() -> None:
    """As SMAC's ``obs_last_action`` in the paper's code: each ally's observation ends with the one-hot of
    its previous action (zeros after a reset); ``("agents", "alive")`` follows SMAX's ``unit_alive``."""
    env = SMAXEnv("3m", num_envs=N, seed=0)
    plain = SMAXEnv("3m", num_envs=N, seed=0, obs_last_action=False)
    assert env.obs_size == plain.obs_size + env.n_actions
    td, plain_td = env.reset(), plain.reset()
    k = env.n_actions
    assert (td["agents", "observation"][..., -k:] == 0).all() and td["agents", "alive"].all()
    gen = torch.Generator().manual_seed(0)
    deaths = resets = 0
    for _ in range(60):
        action = torch.randint(0, k, (N, env.n_agents), generator=gen)
        td["agents", "action"], plain_td["agents", "action"] = action, action.clone()
        data, td = env.step_and_maybe_reset(td)
        plain_data, plain_td = plain.step_and_maybe_reset(plain_td)
        obs = data["next", "agents", "observation"]
        torch.testing.assert_close(obs[..., :-k], plain_data["next", "agents", "observation"])
        assert torch.equal(obs[..., -k:], torch.nn.functional.one_hot(action, k).float())
        np.testing.assert_array_equal(td["agents", "alive"].numpy(), _alive_allies(env))
        deaths += int((~data["next", "agents", "alive"]).sum())
        done = data["next", "done"].squeeze(-1)
        if done.any():  # the auto-reset starts with no previous action
            resets += int(done.sum())
            assert (td["agents", "observation"][done][..., -k:] == 0).all()
    assert deaths > 0 and resets > 0
