"""``SMACv2TaskEnv``: map names, missing smacv2 / StarCraft II, the key conversion and fault recovery (on a
fake StarCraft II game behind TorchRL's real ``SMACv2Wrapper``) and, where StarCraft II is installed, real
battles."""

from __future__ import annotations

import importlib.util
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tensordict import TensorDictBase
from torchrl.envs.libs.smacv2 import SMACv2Wrapper
from torchrl.envs.utils import check_env_specs

from fp3o_lightning.envs import smacv2 as smacv2_module
from fp3o_lightning.envs.faults import EnvFaultWarning
from fp3o_lightning.envs.smacv2 import (
    SMAC_MAPS,
    SMACv2TaskEnv,
    _seed_scenario_generators,
    check_sc2_installed,
    parse_map_name,
)


# ------------------------------------------------------------------ the fake
class SimulatedCrash(RuntimeError):
    """Stands for a StarCraft II crash."""


class FakeStarCraft:
    """A tiny deterministic battle with the API of smacv2's ``StarCraft2Env`` (what TorchRL's wrapper calls).

    Allies (health 3) attack enemies (health 1-3, drawn from ``seed``); each step the living enemies hit the
    first living ally once. Actions as in SMAC: 0 no-op (only for the dead), 1 stop, 2-5 moves, 6 + e attack
    enemy e (only while alive). Crashes are injected with ``crash_on_step`` / ``crash_on_reset`` (the call
    number that raises, from 1; ``0`` for every call) and smacv2's own restart with ``restart_on_step``.
    """

    def __init__(
        self, seed: int | None = None, n_agents: int = 3, n_enemies: int = 2, episode_limit: int = 7
    ):
        self.seed_value = seed
        self.n_agents, self.n_enemies = n_agents, n_enemies
        self.n_actions = 6 + n_enemies
        self.episode_limit = episode_limit
        self.continuing_episode = True
        self.force_restarts = 0
        self.resets = self.steps = 0
        self.closed = False
        self.crash_on_step: int | None = None
        self.crash_on_reset: int | None = None
        self.restart_on_step: int | None = None
        self.rng = np.random.default_rng(seed)

    def get_obs_size(self) -> int:
        return self.n_enemies + 2

    def get_state_size(self) -> int:
        return self.n_agents + self.n_enemies

    def reset(self) -> tuple[np.ndarray, np.ndarray]:
        self.resets += 1
        if self.crash_on_reset is not None and self.crash_on_reset in (0, self.resets):
            raise SimulatedCrash("reset crashed")
        self.t = 0
        self.ally = np.full(self.n_agents, 3.0)
        self.enemy = self.rng.integers(1, 4, self.n_enemies).astype(np.float64)
        return self.get_obs(), self.get_state()

    def get_avail_agent_actions(self, agent: int) -> np.ndarray:
        avail = np.zeros(self.n_actions, dtype=np.int64)
        if self.ally[agent] <= 0:
            avail[0] = 1
        else:
            avail[1:6] = 1
            avail[6:] = self.enemy > 0
        return avail

    def get_avail_actions(self) -> np.ndarray:
        return np.stack([self.get_avail_agent_actions(a) for a in range(self.n_agents)])

    def get_obs(self) -> np.ndarray:
        t = np.full(1, self.t / self.episode_limit)
        return np.stack([np.concatenate([self.ally[a : a + 1], self.enemy, t]) for a in range(self.n_agents)])

    def get_state(self) -> np.ndarray:
        return np.concatenate([self.ally, self.enemy])

    def step(self, actions: np.ndarray) -> tuple[float, bool, dict[str, Any]]:
        self.steps += 1
        if self.crash_on_step is not None and self.crash_on_step in (0, self.steps):
            raise SimulatedCrash("step crashed")
        if self.restart_on_step == self.steps:  # smacv2's step after a protocol error: full_restart()
            self.force_restarts += 1
            return 0, True, {}
        for agent, action in enumerate(int(a) for a in actions):
            assert self.get_avail_agent_actions(agent)[action] == 1, f"Agent {agent} cannot perform action"
        reward = 0.0
        for action in (int(a) for a in actions):
            if action >= 6 and self.enemy[action - 6] > 0:
                self.enemy[action - 6] -= 1
                reward += 1.0
        alive = np.flatnonzero(self.ally > 0)
        if (self.enemy > 0).any() and alive.size:
            self.ally[alive[0]] -= 1
        self.t += 1
        info: dict[str, Any] = {"battle_won": False}
        info["dead_allies"], info["dead_enemies"] = int((self.ally <= 0).sum()), int((self.enemy <= 0).sum())
        terminated = False
        if (self.enemy <= 0).all():
            terminated, info["battle_won"] = True, True
            reward += 10.0
        elif (self.ally <= 0).all():
            terminated = True
        elif self.t >= self.episode_limit:
            terminated = True
            info["episode_limit"] = True
        return reward, terminated, info

    def close(self) -> None:
        self.closed = True


class FakeSMACv2Env(SMACv2Wrapper):
    """TorchRL's ``SMACv2Wrapper`` over a :class:`FakeStarCraft`, deferring its reset as the real ones do."""

    def _check_kwargs(self, kwargs: dict) -> None:
        pass

    def _init_env(self) -> None:
        pass


class FakeFactory:
    """``env_factory`` building :class:`FakeSMACv2Env` instances; remembers them and the seeds given."""

    def __init__(self, **game_kwargs: Any):
        self.game_kwargs = game_kwargs
        self.built: list[FakeSMACv2Env] = []

    def __call__(self, seed: int | None) -> FakeSMACv2Env:
        env = FakeSMACv2Env(env=FakeStarCraft(seed=seed, **self.game_kwargs))
        self.built.append(env)
        return env


def game(env: SMACv2TaskEnv, index: int) -> FakeStarCraft:
    return env._envs[index]._env


def make(num_envs: int = 3, **kwargs: Any) -> tuple[SMACv2TaskEnv, FakeFactory]:
    factory = FakeFactory(**kwargs.pop("game", {}))
    env = SMACv2TaskEnv("3m", num_envs=num_envs, env_factory=factory, **kwargs)
    return env, factory


def first_valid_actions(td: TensorDictBase) -> torch.Tensor:
    """For each agent the highest available action (an attack when there is one)."""
    mask = td.get(("agents", "action_mask"))
    idx = torch.arange(mask.shape[-1]).expand_as(mask)
    return torch.where(mask, idx, -1).max(-1).values


def sometimes_attack(p: float, seed: int = 0) -> Any:
    """A policy attacking (the highest available action) with probability ``p``, else stopping."""
    gen = torch.Generator().manual_seed(seed)

    def policy(td: TensorDictBase) -> torch.Tensor:
        attack = first_valid_actions(td)
        stop = torch.where(attack > 0, 1, 0)
        return torch.where(torch.rand(attack.shape, generator=gen) < p, attack, stop)

    return policy


def run(env: SMACv2TaskEnv, steps: int, policy: Any = first_valid_actions) -> TensorDictBase:
    td = env.reset()
    out = []
    for _ in range(steps):
        td.set(("agents", "action"), policy(td))
        data, td = env.step_and_maybe_reset(td)
        out.append(data)
    return torch.stack(out, dim=1)


# ------------------------------------------------------------------ names and checks
@pytest.mark.parametrize("name", ["3m", "3s5z", "corridor", "6h_vs_8z", "bane_vs_bane", "2c_vs_64zg"])
def test_smac_map_names(name: str) -> None:
    assert parse_map_name(name) == (name, None)


@pytest.mark.parametrize(
    ("name", "smac_map", "units", "enemies"),
    [("protoss_5_vs_5", "10gen_protoss", 5, 5), ("terran_10_vs_10", "10gen_terran", 10, 10)]
    + [("zerg_10_vs_11", "10gen_zerg", 10, 11), ("zerg_20_vs_23", "10gen_zerg", 20, 23)],
)
def test_smacv2_scenario_names(name: str, smac_map: str, units: int, enemies: int) -> None:
    got_map, config = parse_map_name(name)
    assert got_map == smac_map
    assert (config["n_units"], config["n_enemies"]) == (units, enemies)
    team = config["team_gen"]
    assert team["dist_type"] == "weighted_teams" and team["observe"] is True
    assert sum(team["weights"]) == pytest.approx(1.0) and len(team["weights"]) == len(team["unit_types"])
    assert config["start_positions"] == {
        "dist_type": "surrounded_and_reflect",
        "p": 0.5,
        "map_x": 32,
        "map_y": 32,
    }
    race = name.split("_")[0]
    assert (
        set(team["unit_types"])
        == {
            "protoss": {"stalker", "zealot", "colossus"},
            "terran": {"marine", "marauder", "medivac"},
            "zerg": {"zergling", "baneling", "hydralisk"},
        }[race]
    )
    assert (
        team.get("exception_unit_types")
        == {"protoss": None, "terran": ["medivac"], "zerg": ["baneling"]}[race]
    )
    # every call builds a fresh config (smacv2 writes into the one it gets)
    assert parse_map_name(name)[1] is not config


@pytest.mark.parametrize("name", ["3s6z", "protoss_0_vs_5", "elves_5_vs_5", "protoss_5v5", "", "10gen_orcs"])
def test_unknown_map_names_list_the_valid_ones(name: str) -> None:
    with pytest.raises(ValueError, match="Valid names: SMAC maps: 3m, 8m.*protoss_5_vs_5"):
        parse_map_name(name)
    with pytest.raises(ValueError, match="Valid names"):
        SMACv2TaskEnv(name, env_factory=FakeFactory())


def test_capability_configs() -> None:
    config = {"n_units": 3, "n_enemies": 3}
    assert parse_map_name("10gen_terran", config) == ("10gen_terran", config)
    with pytest.raises(ValueError, match="needs a capability_config"):
        parse_map_name("10gen_terran")
    with pytest.raises(ValueError, match="builds its own capability_config.*10gen_zerg"):
        parse_map_name("zerg_5_vs_5", config)


def test_episode_limits_of_the_paper_maps() -> None:
    limits = {"bane_vs_bane": 200, "2c_vs_64zg": 400, "3s5z": 150, "5m_vs_6m": 70, "corridor": 400}
    limits |= {"6h_vs_8z": 150, "10m_vs_11m": 150, "3s5z_vs_3s6z": 170}
    assert {name: SMAC_MAPS[name] for name in limits} == limits


def _pretend_installed(monkeypatch: pytest.MonkeyPatch, installed: bool) -> None:
    """Make ``find_spec`` say smacv2 and PySC2 are (or are not) importable."""
    find_spec = importlib.util.find_spec

    def fake(name: str, *args: Any, **kwargs: Any) -> Any:
        if name in ("smacv2", "pysc2"):
            return importlib.util.spec_from_loader(name, loader=None) if installed else None
        return find_spec(name, *args, **kwargs)

    monkeypatch.setattr(smacv2_module.importlib.util, "find_spec", fake)


def test_missing_smacv2_says_how_to_install_it_before_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _pretend_installed(monkeypatch, installed=False)
    monkeypatch.setenv("SC2PATH", str(tmp_path / "nowhere"))  # a missing StarCraft II is reported second
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'fp3o-lightning\[smacv2\]'") as info:
        SMACv2TaskEnv("3m")
    assert info.value.name == "smacv2"
    assert "iagreetotheeula" in str(info.value)  # and how to get StarCraft II


@pytest.mark.skipif(platform.system() != "Linux", reason="the default StarCraft II path is Linux's")
def test_missing_starcraft_gives_the_install_steps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _pretend_installed(monkeypatch, installed=True)
    monkeypatch.delenv("SC2PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="StarCraft II was not found at .*StarCraftII") as info:
        SMACv2TaskEnv("3s5z", num_envs=2)
    message = str(info.value)
    for needed in ("SC2PATH is not set", "SC2.4.10.zip", "unzip -P iagreetotheeula", "Maps/SMAC_Maps"):
        assert needed in message
    monkeypatch.setenv("SC2PATH", str(tmp_path / "sc2"))
    with pytest.raises(RuntimeError, match=f"StarCraft II was not found at {tmp_path / 'sc2'}.*SC2PATH="):
        SMACv2TaskEnv("protoss_5_vs_5")


def test_missing_map_gives_the_install_steps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _pretend_installed(monkeypatch, installed=True)
    (tmp_path / "Versions").mkdir()
    monkeypatch.setenv("SC2PATH", str(tmp_path))
    maps = tmp_path / "Maps" / "SMAC_Maps"
    with pytest.raises(RuntimeError, match=f"the map {maps / '32x32_flat.SC2Map'} is missing.*SMAC_Maps.zip"):
        SMACv2TaskEnv("zerg_5_vs_5")
    with pytest.raises(RuntimeError, match="corridor.SC2Map is missing"):
        SMACv2TaskEnv("corridor")
    maps.mkdir(parents=True)
    (maps / "corridor.SC2Map").touch()
    assert check_sc2_installed("corridor") == tmp_path


# ------------------------------------------------------------------ the contract
def test_keys_specs_and_lazy_start() -> None:
    env, factory = make(num_envs=3, seed=0)
    assert (env.n_agents, env.n_actions, env.obs_size, env.state_size) == (3, 8, 4, 5)
    assert (env.num_envs, env.max_episode_steps, env.map_name, env.smac_map) == (3, 7, "3m", "3m")
    assert all(e._env.resets == 0 for e in factory.built)  # nothing started by the constructor
    assert [e._env.seed_value for e in factory.built] == [env.sub_seed(i) for i in range(3)]
    assert len(set(env.sub_seed(i) for i in range(3))) == 3

    check_env_specs(env)
    td = env.reset()
    expected = {
        ("agents", "observation"): (torch.float32, (3, 3, 4)),
        ("agents", "action_mask"): (torch.bool, (3, 3, 8)),
        "state": (torch.float32, (3, 5)),
        "done": (torch.bool, (3, 1)),
        "terminated": (torch.bool, (3, 1)),
        "truncated": (torch.bool, (3, 1)),
        "won": (torch.bool, (3, 1)),
        "faulted": (torch.bool, (3, 1)),
    }
    for key, (dtype, shape) in expected.items():
        assert (td.get(key).dtype, tuple(td.get(key).shape)) == (dtype, shape), key
    action = env.full_action_spec[("agents", "action")]
    assert (action.dtype, tuple(action.shape), action.space.n) == (torch.int64, (3, 3), 8)
    assert (env.reward_spec.dtype, tuple(env.reward_spec.shape)) == (torch.float32, (3, 1))
    assert not td.get("done").any() and not td.get("won").any()

    rollout = env.rollout(40, break_when_any_done=False)  # random actions from the masked spec
    nxt = rollout.get("next")
    assert nxt.get("reward").dtype == torch.float32 and tuple(nxt.get("reward").shape) == (3, 40, 1)
    assert rollout.get(("agents", "action")).dtype == torch.int64
    done, term, trunc, won = (nxt.get(k) for k in ("done", "terminated", "truncated", "won"))
    assert torch.equal(done, term | trunc) and not (term & trunc).any()
    assert not (won & ~term).any() and done.any()
    assert not nxt.get("faulted").any()
    env.close()
    assert all(e._env.closed for e in factory.built)


@pytest.mark.parametrize(
    ("limit", "p", "kinds"), [(5, 0.2, {"won", "truncated"}), (20, 0.12, {"won", "lost"})]
)
def test_outputs_match_the_games_step_by_step(limit: int, p: float, kinds: set[str]) -> None:
    """Every key of every step equals what a reference game with the sub-env's seed gives."""
    env, _ = make(num_envs=2, seed=3, game={"episode_limit": limit})
    refs = [FakeStarCraft(seed=env.sub_seed(i), episode_limit=limit) for i in range(2)]
    for ref in refs:
        ref.reset()
    steps = 60
    data = run(env, steps, sometimes_attack(p))
    seen = set()
    for t in range(steps):
        for i, ref in enumerate(refs):
            step = data[i, t]
            np.testing.assert_array_equal(
                step.get(("agents", "action_mask")).numpy(), ref.get_avail_actions() == 1
            )
            reward, terminated, info = ref.step(step.get(("agents", "action")).numpy())
            nxt = step.get("next")
            won, limited = info["battle_won"], info.get("episode_limit", False)
            assert nxt.get("reward").item() == pytest.approx(reward)
            assert nxt.get("won").item() == won
            assert nxt.get("truncated").item() == limited
            assert nxt.get("terminated").item() == (terminated and not limited)
            assert nxt.get("done").item() == terminated
            assert not nxt.get("faulted").item()
            np.testing.assert_allclose(nxt.get(("agents", "observation")).numpy(), ref.get_obs(), rtol=1e-6)
            np.testing.assert_allclose(nxt.get("state").numpy(), ref.get_state(), rtol=1e-6)
            if terminated:
                seen.add("won" if won else "truncated" if limited else "lost")
                ref.reset()  # the env's auto-reset: the next step starts the new episode
    assert seen == kinds


def test_parallel_and_serial_agree() -> None:
    a, _ = make(num_envs=3, seed=11, parallel=True)
    b, _ = make(num_envs=3, seed=11, parallel=False)
    assert (run(a, 15) == run(b, 15)).all()
    assert a._pool is not None and b._pool is None
    a.close()
    assert a._pool is None


def test_unavailable_actions_raise() -> None:
    env, _ = make(num_envs=2, seed=0)
    td = env.reset()
    td.set(("agents", "action"), torch.zeros(2, 3, dtype=torch.int64))  # no-op: only for the dead
    with pytest.raises(ValueError, match="Agent 0 of sub-env 0 cannot take action 0"):
        env.step(td)
    td.set(("agents", "action"), torch.full((2, 3), 8))
    with pytest.raises(ValueError, match=r"actions must lie in \[0, 8\)"):
        env.step(td)


def test_a_step_before_any_reset_starts_the_episodes() -> None:
    env, factory = make(num_envs=2, seed=0)
    td = env.full_action_spec.rand()  # only the no-op is known to be available before a reset
    out = env.step(td).get("next")
    assert out.get("faulted").all() and out.get("truncated").all() and (out.get("reward") == 0).all()
    assert env.faults == 0 and all(e._env.resets == 1 and e._env.steps == 0 for e in factory.built)


def test_set_seed_rebuilds_without_starting_twice() -> None:
    env, factory = make(num_envs=2)
    assert [e._env.seed_value for e in factory.built] == [None, None]
    env.set_seed(5)
    first = factory.built[2:]
    assert [e._env.seed_value for e in first] == [env.sub_seed(0), env.sub_seed(1)]
    assert not any(e._env.closed for e in factory.built)  # never started: nothing to close
    env.reset()
    assert all(e._env.resets == 1 for e in first) and all(e._env.resets == 0 for e in factory.built[:2])
    env.set_seed(6)
    assert all(e._env.closed for e in first)  # started: closed and replaced
    env.set_seed(None)  # keeps them
    assert len(factory.built) == 6
    reference, _ = make(num_envs=2, seed=6)
    assert (run(env, 10) == run(reference, 10)).all()


def test_scenario_generators_are_seeded() -> None:
    """The generators of smacv2's distributions (nested ones too) are replaced by seeded ones."""
    inner = type("Distribution", (), {"__module__": "smacv2.env.starcraft2.distributions"})
    outer = type("Outer", (), {"__module__": "smacv2.env.starcraft2.distributions"})

    def wrapper_env() -> Any:
        nested = outer()
        nested.rng, nested.child, nested.unrelated = np.random.default_rng(), inner(), object()
        nested.child.rng = np.random.default_rng()
        team = inner()
        team.rng = np.random.default_rng()
        return type("Wrapper", (), {"env_key_to_distribution_map": {"team_gen": team, "start": nested}})()

    a, b = wrapper_env(), wrapper_env()
    assert _seed_scenario_generators(a, 7) == 3 and _seed_scenario_generators(b, 7) == 3
    draws = [
        [
            d.rng.random()
            for d in (w.env_key_to_distribution_map["team_gen"], w.env_key_to_distribution_map["start"])
        ]
        + [w.env_key_to_distribution_map["start"].child.rng.random()]
        for w in (a, b)
    ]
    assert draws[0] == draws[1] and len(set(draws[0])) == 3
    assert _seed_scenario_generators(object(), 7) == 0  # a plain StarCraft2Env has none


# ------------------------------------------------------------------ faults
def test_step_fault_rebuilds_and_drops_the_episode() -> None:
    env, factory = make(num_envs=3, seed=1)
    td = env.reset()
    game(env, 1).crash_on_step = 2
    old = env._envs[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(3):
            td.set(("agents", "action"), first_valid_actions(td))
            data, td = env.step_and_maybe_reset(td)
            if t == 1:
                nxt = data.get("next")
                assert nxt.get("faulted").squeeze(-1).tolist() == [False, True, False]
                assert nxt.get("truncated")[1].item() and nxt.get("done")[1].item()
                assert not nxt.get("terminated")[1].item() and not nxt.get("won")[1].item()
                assert nxt.get("reward")[1].item() == 0.0
                new = game(env, 1)
                assert new.seed_value == env.sub_seed(1, 1) and new.resets == 1
                # the rebuilt game's reset is the next episode's start: the auto-reset keeps it
                np.testing.assert_allclose(td.get(("agents", "observation"))[1].numpy(), new.get_obs())
                assert not td.get("faulted").any()
            elif t == 2:
                assert not data.get(("next", "faulted")).any()
    faults = [w for w in caught if issubclass(w.category, EnvFaultWarning)]
    assert len(faults) == 1 and "sub-env 1 raised during step (SimulatedCrash: step crashed)" in str(
        faults[0].message
    )
    assert env.faults == 1 and old._env.closed and game(env, 1).resets == 1
    assert len(factory.built) == 4


def test_smacv2_internal_restart_counts_as_a_fault() -> None:
    env, _ = make(num_envs=2, seed=1)
    td = env.reset()
    game(env, 0).restart_on_step = 1
    td.set(("agents", "action"), first_valid_actions(td))
    with pytest.warns(EnvFaultWarning, match="smacv2 restarted StarCraft II during the step"):
        out = env.step(td).get("next")
    assert out.get("faulted").squeeze(-1).tolist() == [True, False] and out.get("truncated")[0].item()
    assert env.faults == 1


def test_reset_fault_is_retried_on_a_rebuilt_env() -> None:
    env, factory = make(num_envs=2, seed=1)
    game(env, 1).crash_on_reset = 1
    with pytest.warns(EnvFaultWarning, match="sub-env 1 raised during reset"):
        td = env.reset()
    assert td.get("faulted").squeeze(-1).tolist() == [False, True] and not td.get("done").any()
    assert env.faults == 1 and game(env, 1).resets == 1 and len(factory.built) == 3
    assert not env.reset().get("faulted").any()


def test_max_faults() -> None:
    env, _ = make(num_envs=2, seed=1, max_faults=1, game={"episode_limit": 50})
    td = env.reset()
    for i in range(2):
        game(env, i).crash_on_step = 1
    td.set(("agents", "action"), first_valid_actions(td))
    with pytest.warns(EnvFaultWarning), pytest.raises(RuntimeError, match="max_faults=1") as info:
        env.step(td)
    assert isinstance(info.value.__cause__, SimulatedCrash)

    env, _ = make(num_envs=1, seed=1, max_faults=0)
    td = env.reset()
    game(env, 0).crash_on_step = 1
    td.set(("agents", "action"), first_valid_actions(td))
    with pytest.raises(SimulatedCrash, match="step crashed"):
        env.step(td)


def test_a_rebuild_that_fails_is_another_fault() -> None:
    factory = FakeFactory()
    env = SMACv2TaskEnv("3m", num_envs=1, seed=2, max_faults=3, env_factory=factory)
    env.reset()
    game(env, 0).crash_on_step = 1
    original = factory.__call__
    calls = []

    def flaky(seed: int | None) -> FakeSMACv2Env:
        built = original(seed)
        calls.append(seed)
        if len(calls) == 1:
            built._env.crash_on_reset = 0
        return built

    env._factory = flaky
    td = env.reset()
    td.set(("agents", "action"), first_valid_actions(td))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = env.step(td).get("next")
    messages = [str(w.message) for w in caught if issubclass(w.category, EnvFaultWarning)]
    assert len(messages) == 2 and "during its rebuild after a fault" in messages[1]
    assert out.get("faulted").item() and env.faults == 2
    assert calls == [env.sub_seed(0, 1), env.sub_seed(0, 2)]


# ------------------------------------------------------------------ checkpoints
def test_state_dict_keeps_faults_and_seed_and_restarts_the_episodes() -> None:
    env, _ = make(num_envs=2, seed=4)
    env.reset()
    env._faults = 2
    state = env.state_dict()
    other, _ = make(num_envs=2, seed=9)
    td = other.reset()
    other.load_state_dict(state)
    assert other.faults == 2 and other.sub_seed(1, 3) == env.sub_seed(1, 3)
    td.set(("agents", "action"), first_valid_actions(td))
    out = other.step(td).get("next")  # the interrupted episodes are reported as cut, not stepped
    assert out.get("faulted").all() and out.get("truncated").all() and (out.get("reward") == 0).all()
    assert other.faults == 2
    with pytest.raises(ValueError, match="num_envs=2 .this env: 3."):
        make(num_envs=3)[0].load_state_dict(state)


# ------------------------------------------------------------------ StarCraft II
def _sc2_installed() -> bool:
    if importlib.util.find_spec("smacv2") is None:
        return False
    try:
        check_sc2_installed("3m")
    except RuntimeError:
        return False
    return True


needs_sc2 = pytest.mark.skipif(
    not _sc2_installed(), reason="StarCraft II binary not found (set SC2PATH); see README"
)


@needs_sc2
def test_3m_passes_check_env_specs() -> None:
    env = SMACv2TaskEnv("3m", num_envs=2, seed=0)
    try:
        assert (env.n_agents, env.n_actions, env.max_episode_steps) == (3, 9, 60)
        check_env_specs(env)
    finally:
        env.close()


@needs_sc2
def test_3m_random_masked_actions() -> None:
    env = SMACv2TaskEnv("3m", num_envs=2, seed=1)
    try:
        rollout = env.rollout(150, break_when_any_done=False)
        nxt = rollout.get("next")
        assert tuple(rollout.get(("agents", "observation")).shape[:3]) == (2, 150, 3)
        assert nxt.get("done").any() and not nxt.get("faulted").any()
        assert not (nxt.get("won") & ~nxt.get("terminated")).any()
        assert torch.equal(nxt.get("done"), nxt.get("terminated") | nxt.get("truncated"))
        chosen = rollout.get(("agents", "action_mask")).gather(
            -1, rollout.get(("agents", "action")).unsqueeze(-1)
        )
        assert chosen.all()
    finally:
        env.close()


def test_sc2_path_follows_sc2path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SC2PATH", str(tmp_path))
    assert smacv2_module.sc2_path() == tmp_path
    monkeypatch.delenv("SC2PATH")
    if platform.system() == "Linux":
        assert smacv2_module.sc2_path() == Path(os.path.expanduser("~/StarCraftII"))
