"""Batched TorchRL environment over gymnasium-robotics' Multi-Agent MuJoCo (MaMuJoCo).

:class:`MaMuJoCoEnv` owns ``num_envs`` copies of ``gymnasium_robotics.mamujoco_v1.parallel_env`` and
steps them sequentially inside one :meth:`~MaMuJoCoEnv._step`. The data it produces (batch size
``[num_envs]``):

* ``("agents", "observation")`` float32 ``[num_envs, n_agents, max_obs_dim]``: agent ``i``'s raw
  gymnasium-robotics observation in the first ``observation_sizes[i]`` entries, zeros after.
* ``("agents", "action")`` float32 ``[num_envs, n_agents, max_action_dim]`` (input, ``Bounded``): clipped
  into the actuator bounds before stepping; padding entries are ignored.
* ``"state"`` float32 ``[num_envs, state_size]``: gymnasium-robotics' ``env.state()`` (the single-agent
  Gymnasium observation).
* ``"reward"`` float32 ``[num_envs, 1]``: the team reward.
* ``"done"``, ``"terminated"``, ``"truncated"`` bool ``[num_envs, 1]``.

Time limit: Gymnasium's ``gymnasium.make`` wraps the single-agent env in a ``TimeLimit`` with the registered
length (1000 for most tasks, but 50 for Reacher and 100 for Pusher), which gymnasium-robotics keeps. This
env steps the *unwrapped* MuJoCo env instead and applies its own limit, so an episode is truncated exactly
once, after ``max_episode_steps`` steps, for every scenario. Termination (the unhealthy condition of
Hopper, Walker2d, Ant, ...) comes from the simulator and is reported separately.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

__all__ = ["MaMuJoCoEnv", "VALID_AGENT_CONFS", "MANY_SEGMENT_SCENARIOS"]

#: Agent factorisations known to gymnasium-robotics 1.4 (``obsk.get_parts_and_edges``), per scenario.
#: ``None`` is the single-agent, fully observable version. ``CoupledHalfCheetah`` is left out: its
#: observation code fails with the installed MuJoCo (``data.ten_J`` indexing raises ``IndexError``).
VALID_AGENT_CONFS: dict[str, tuple[str | None, ...]] = {
    "Ant": (None, "2x4", "2x4d", "4x2"),
    "HalfCheetah": (None, "2x3", "6x1"),
    "Hopper": (None, "3x1"),
    "Humanoid": (None, "9|8"),
    "HumanoidStandup": (None, "9|8"),
    "InvertedDoublePendulum": (None,),
    "InvertedPendulum": (None,),
    "Pusher": (None, "3p"),
    "Reacher": (None, "2x1"),
    "Swimmer": (None, "2x1"),
    "Walker2d": (None, "2x3"),
}
#: Scenarios taking any ``"<n_agents>x<segments_per_agent>"`` conf (e.g. ``"8x2"``); no ``None`` conf.
MANY_SEGMENT_SCENARIOS: dict[str, str] = {"ManySegmentSwimmer": "Swimmer-v5", "ManySegmentAnt": "Ant-v5"}
_MANY_SEGMENT_CONF = re.compile(r"^([1-9][0-9]*)x([1-9][0-9]*)$")


def _valid_scenarios_text() -> str:
    lines = [f"{name}: {', '.join(repr(c) for c in confs)}" for name, confs in VALID_AGENT_CONFS.items()]
    lines += [f"{name}: '<n_agents>x<segments_per_agent>' (e.g. '8x2')" for name in MANY_SEGMENT_SCENARIOS]
    return "; ".join(lines)


def _check_scenario(scenario: str, agent_conf: str | None) -> None:
    """Raise a ``ValueError`` listing the valid options if ``(scenario, agent_conf)`` is unsupported."""
    if scenario in MANY_SEGMENT_SCENARIOS:
        if agent_conf is None or not _MANY_SEGMENT_CONF.match(agent_conf):
            raise ValueError(
                f"agent_conf {agent_conf!r} is not valid for scenario {scenario!r}: expected "
                f"'<n_agents>x<segments_per_agent>' with positive integers, e.g. '8x2'."
            )
    elif scenario in VALID_AGENT_CONFS:
        if agent_conf not in VALID_AGENT_CONFS[scenario]:
            valid = ", ".join(repr(c) for c in VALID_AGENT_CONFS[scenario])
            raise ValueError(
                f"agent_conf {agent_conf!r} is not valid for scenario {scenario!r}; "
                f"valid agent_confs: {valid}."
            )
    else:
        raise ValueError(
            f"Unknown MaMuJoCo scenario {scenario!r}. "
            f"Valid scenarios and agent_confs: {_valid_scenarios_text()}."
        )


def _mujoco_warning(message: str) -> None:
    """Route MuJoCo's C-level warnings through Python's ``warnings`` (no ``MUJOCO_LOG.TXT`` file).

    The deprecation of ``settotalmass`` in gymnasium's own model files is dropped: it is printed once
    per simulator built, says nothing about this package's use, and gymnasium must fix it.
    """
    if "settotalmass" not in message:
        warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=2)


def _import_mamujoco() -> Any:
    """Import gymnasium-robotics' ``mamujoco_v1`` quietly.

    Its import prints a notice about the Adroit hand environments' rewards, unrelated to MaMuJoCo.
    """
    import farama_notifications
    import mujoco

    farama_notifications.notifications.pop("gymnasium_robotics", None)
    mujoco.set_mju_user_warning(_mujoco_warning)
    from gymnasium_robotics import mamujoco_v1

    return mamujoco_v1


def _make_parallel_envs(scenario: str, agent_conf: str | None, agent_obsk: int, count: int) -> list[Any]:
    """Build ``count`` gymnasium-robotics ``parallel_env`` instances.

    For the many-segment scenarios the MuJoCo XML is generated once into a private temporary directory
    (gymnasium-robotics writes it into its own package directory and deletes it afterwards, which races
    between processes building the same scenario and fails on read-only installs).
    """
    mamujoco_v1 = _import_mamujoco()

    if scenario not in MANY_SEGMENT_SCENARIOS:
        return [mamujoco_v1.parallel_env(scenario, agent_conf, agent_obsk=agent_obsk) for _ in range(count)]

    import gymnasium
    from gymnasium_robotics.envs.multiagent_mujoco import many_segment_ant, many_segment_swimmer

    gen_asset = (
        many_segment_swimmer.gen_asset if scenario == "ManySegmentSwimmer" else many_segment_ant.gen_asset
    )
    n_agents, per_agent = (int(x) for x in agent_conf.split("x"))
    with tempfile.TemporaryDirectory(prefix="fp3o_mamujoco_") as tmp:
        asset_path = os.path.join(tmp, f"{scenario}_{n_agents * per_agent}_segments.xml")
        gen_asset(n_segs=n_agents * per_agent, asset_path=asset_path)
        return [
            mamujoco_v1.parallel_env(
                scenario,
                agent_conf,
                agent_obsk=agent_obsk,
                gym_env=gymnasium.make(MANY_SEGMENT_SCENARIOS[scenario], xml_file=asset_path),
            )
            for _ in range(count)
        ]


class MaMuJoCoEnv(EnvBase):
    """``num_envs`` gymnasium-robotics MaMuJoCo tasks as one batched TorchRL environment.

    Args:
        scenario: MaMuJoCo task, e.g. ``"HalfCheetah"`` (see :data:`VALID_AGENT_CONFS`).
        agent_conf: agent factorisation, e.g. ``"6x1"``; ``None`` gives one fully observing agent.
        agent_obsk: observation depth ``k`` (joints up to ``k`` hops away are observed), ``>= 0``.
        num_envs: number of independent sub-environments (the batch size).
        max_episode_steps: episodes are truncated after this many steps.
        seed: if given, sub-env ``i`` is seeded with ``seed + i`` at its first reset.
        device: device of the produced tensors (simulation runs on CPU).

    Attributes:
        scenario, agent_conf, agent_obsk, num_envs, max_episode_steps: the constructor arguments.
        n_agents: number of agents; agent_names: gymnasium-robotics agent names (``"agent_0"``, ...).
        observation_sizes / action_sizes: per-agent unpadded observation / action sizes.
        max_obs_dim / max_action_dim: padded sizes; state_size: size of ``"state"``.
        observation_mask / action_mask: bool ``[n_agents, max_*_dim]``, True on the unpadded entries.
    """

    batch_locked = True

    def __init__(
        self,
        scenario: str,
        agent_conf: str | None,
        agent_obsk: int = 1,
        num_envs: int = 1,
        max_episode_steps: int = 1000,
        seed: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if not isinstance(agent_obsk, int) or isinstance(agent_obsk, bool) or agent_obsk < 0:
            raise ValueError(f"agent_obsk must be an integer >= 0, got {agent_obsk!r}.")
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}.")
        if not isinstance(max_episode_steps, int) or max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be an integer >= 1, got {max_episode_steps!r}.")
        _check_scenario(scenario, agent_conf)
        super().__init__(device=device, batch_size=torch.Size([num_envs]))

        self.scenario = scenario
        self.agent_conf = agent_conf
        self.agent_obsk = agent_obsk
        self.num_envs = num_envs
        self.max_episode_steps = max_episode_steps

        self._penvs = _make_parallel_envs(scenario, agent_conf, agent_obsk, num_envs)
        penv = self._penvs[0]
        # Stepping the unwrapped MuJoCo env skips Gymnasium's TimeLimit (we apply our own) and checkers.
        self._sims = [p.single_agent_env.unwrapped for p in self._penvs]
        self.agent_names: list[str] = list(penv.possible_agents)
        self.n_agents = len(self.agent_names)
        self.observation_sizes: list[int] = [
            int(penv.observation_space(a).shape[0]) for a in self.agent_names
        ]
        self.action_sizes: list[int] = [len(part) for part in penv.agent_action_partitions]
        self.state_size = int(penv.single_agent_env.observation_space.shape[0])
        self.max_obs_dim = max(self.observation_sizes)
        self.max_action_dim = max(self.action_sizes)

        self._build_action_mapping(penv)
        self._make_specs()

        n, a = num_envs, self.n_agents
        self.observation_mask = torch.zeros(a, self.max_obs_dim, dtype=torch.bool)
        for i, d in enumerate(self.observation_sizes):
            self.observation_mask[i, :d] = True
        self.action_mask = torch.from_numpy(self._act_valid.copy())
        # Preallocated per-step buffers (padding entries are never written, so they stay zero).
        self._obs = np.zeros((n, a, self.max_obs_dim), dtype=np.float32)
        self._state = np.zeros((n, self.state_size), dtype=np.float32)
        self._reward = np.zeros((n, 1), dtype=np.float32)
        self._terminated = np.zeros((n, 1), dtype=bool)
        self._truncated = np.zeros((n, 1), dtype=bool)
        self._elapsed = np.zeros(n, dtype=np.int64)
        self._pending_seeds: list[int | None] = [None] * n
        self._agents_batch = torch.Size([n, a])
        self._to_device = self.device.type != "cpu"
        if seed is not None:
            self.set_seed(seed)

    # ------------------------------------------------------------------ setup
    def _build_action_mapping(self, penv: Any) -> None:
        """Precompute the padded-agent-action -> global-action gather and the per-entry bounds."""
        global_space = penv.single_agent_env.action_space
        n_global = int(global_space.shape[0])
        agent_idx = np.full(n_global, -1, dtype=np.int64)
        slot_idx = np.full(n_global, -1, dtype=np.int64)
        low = -np.ones((self.n_agents, self.max_action_dim), dtype=np.float32)
        high = np.ones((self.n_agents, self.max_action_dim), dtype=np.float32)
        valid = np.zeros((self.n_agents, self.max_action_dim), dtype=bool)
        for i, part in enumerate(penv.agent_action_partitions):
            for j, node in enumerate(part):
                for g in np.atleast_1d(node.act_ids):
                    if agent_idx[g] != -1:
                        raise RuntimeError(
                            f"Global action {g} is mapped twice in {self.scenario} {self.agent_conf}."
                        )
                    agent_idx[g], slot_idx[g] = i, j
                    low[i, j], high[i, j] = global_space.low[g], global_space.high[g]
                valid[i, j] = True
        if (agent_idx < 0).any():
            raise RuntimeError(f"Some global actions are unmapped in {self.scenario} {self.agent_conf}.")
        self._act_agent, self._act_slot = agent_idx, slot_idx
        self._act_low, self._act_high, self._act_valid = low, high, valid

    def _make_specs(self) -> None:
        n, a = self.num_envs, self.n_agents
        low = torch.from_numpy(self._act_low).expand(n, a, self.max_action_dim).clone()
        high = torch.from_numpy(self._act_high).expand(n, a, self.max_action_dim).clone()
        self.observation_spec = Composite(
            agents=Composite(
                observation=Unbounded(
                    shape=(n, a, self.max_obs_dim), dtype=torch.float32, device=self.device
                ),
                shape=(n, a),
                device=self.device,
            ),
            state=Unbounded(shape=(n, self.state_size), dtype=torch.float32, device=self.device),
            shape=(n,),
            device=self.device,
        )
        self.action_spec = Composite(
            agents=Composite(
                action=Bounded(low=low, high=high, shape=(n, a, self.max_action_dim), device=self.device),
                shape=(n, a),
                device=self.device,
            ),
            shape=(n,),
            device=self.device,
        )
        self.reward_spec = Unbounded(shape=(n, 1), dtype=torch.float32, device=self.device)
        done = Categorical(2, shape=(n, 1), dtype=torch.bool, device=self.device)
        self.done_spec = Composite(
            done=done.clone(), terminated=done.clone(), truncated=done.clone(), shape=(n,), device=self.device
        )

    # ------------------------------------------------------------------ core
    def _write_obs(self, i: int, state: np.ndarray) -> None:
        """Write sub-env ``i``'s per-agent observations and state into the buffers."""
        penv, obs = self._penvs[i], self._obs[i]
        for a, d in enumerate(self.observation_sizes):
            obs[a, :d] = penv._get_obs_agent(a)
        self._state[i] = state

    def _output(self, reward: bool) -> TensorDictBase:
        """Pack copies of the buffers into the output TensorDict (one ``from_numpy`` per key).

        The tensors are built here with the spec shapes and dtypes, so the unchecked (and much cheaper)
        ``TensorDict._new_unsafe`` constructor is used.
        """
        terminated = torch.from_numpy(self._terminated.copy())
        truncated = torch.from_numpy(self._truncated.copy())
        data = {
            "state": torch.from_numpy(self._state.copy()),
            "done": terminated | truncated,
            "terminated": terminated,
            "truncated": truncated,
        }
        if reward:
            data["reward"] = torch.from_numpy(self._reward.copy())
        obs = torch.from_numpy(self._obs.copy())
        if self._to_device:
            data = {key: value.to(self.device, non_blocking=True) for key, value in data.items()}
            obs = obs.to(self.device, non_blocking=True)
        data["agents"] = TensorDict._new_unsafe(
            {"observation": obs}, batch_size=self._agents_batch, device=self.device
        )
        return TensorDict._new_unsafe(data, batch_size=self.batch_size, device=self.device)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get(("agents", "action")).detach()
        action = action.cpu().numpy() if action.device.type != "cpu" else action.numpy()
        action = np.clip(action, self._act_low, self._act_high, dtype=np.float32)
        # float32 agent actions -> float64 global actions, as gymnasium-robotics does.
        global_action = action[:, self._act_agent, self._act_slot].astype(np.float64)
        for i, sim in enumerate(self._sims):
            state, reward, terminated, truncated, _ = sim.step(global_action[i])
            self._elapsed[i] += 1
            self._reward[i, 0] = reward
            self._terminated[i, 0] = terminated
            self._truncated[i, 0] = truncated or self._elapsed[i] >= self.max_episode_steps
            self._write_obs(i, state)
        return self._output(reward=True)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        reset = None if tensordict is None else tensordict.get("_reset", None)
        if reset is None:
            indices: Sequence[int] = range(self.num_envs)
        else:
            indices = np.flatnonzero(reset.reshape(self.num_envs).cpu().numpy()).tolist()
        for i in indices:
            seed, self._pending_seeds[i] = self._pending_seeds[i], None
            state, _ = self._sims[i].reset(seed=seed)
            self._elapsed[i] = 0
            self._terminated[i, 0] = self._truncated[i, 0] = False
            self._write_obs(i, state)
        return self._output(reward=False)

    def _set_seed(self, seed: int | None) -> None:
        """Seed sub-env ``i`` with ``seed + i`` at its next reset (``None`` clears pending seeds)."""
        self._pending_seeds = [None if seed is None else int(seed) + i for i in range(self.num_envs)]

    def close(self, *, raise_if_closed: bool = True) -> None:
        """Close the underlying gymnasium-robotics environments."""
        for penv in self.__dict__.get("_penvs", []):
            penv.close()
        super().close(raise_if_closed=raise_if_closed)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(scenario={self.scenario!r}, agent_conf={self.agent_conf!r}, "
            f"agent_obsk={self.agent_obsk}, num_envs={self.num_envs}, n_agents={self.n_agents}, "
            f"observation_sizes={self.observation_sizes}, action_sizes={self.action_sizes}, "
            f"state_size={self.state_size}, max_episode_steps={self.max_episode_steps}, device={self.device})"
        )
