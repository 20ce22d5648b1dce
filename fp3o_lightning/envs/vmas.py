"""Batched TorchRL environment over VMAS (the Vectorized Multi-Agent Simulator), simulated on the device.

:class:`VMASEnv` builds one TorchRL :class:`~torchrl.envs.libs.vmas.VmasEnv` (continuous actions, all agents
in one ``"agents"`` group, no VMAS horizon) and steps the VMAS simulator it owns directly: VMAS simulates all
``num_envs`` environments at once with PyTorch on ``device`` (CPU or CUDA), so observations, rewards and done
flags never leave that device. The data it produces (batch size ``[num_envs]``):

* ``("agents", "observation")`` float32 ``[num_envs, n_agents, max_obs_dim]``: agent ``i``'s VMAS observation
  in the first ``observation_sizes[i]`` entries, zeros after (scenarios such as ``simple_speaker_listener``
  give agents observations of different sizes).
* ``("agents", "action")`` float32 ``[num_envs, n_agents, max_action_dim]`` (input, ``Bounded`` by VMAS's
  action space: ``[-u_range, u_range]`` for the physical actions, ``[0, 1]`` for communication actions):
  clamped into the bounds before stepping (VMAS rejects actions out of range); padding entries are ignored.
* ``"state"`` float32 ``[num_envs, state_size]``: VMAS has no global state, so this is the concatenation of
  all agents' (unpadded) observations, agent 0 first; ``state_size = sum(observation_sizes)``.
* ``"reward"`` float32 ``[num_envs, 1]``: the team reward, the **mean over agents** of VMAS's per-agent
  rewards. In scenarios whose agents share one reward (``balance``, ``transport``, ``wheel``, ...) it equals
  that shared reward; in the others it is their average.
* ``"terminated"`` bool ``[num_envs, 1]``: VMAS's own ``done()`` (e.g. ``balance``'s package touching the
  floor or reaching its goal); ``"truncated"``: ``max_episode_steps`` steps since the episode began;
  ``"done"`` their disjunction. The VMAS horizon (``max_steps``) is not used: VMAS would report it as
  termination, which would stop value bootstrapping at the time limit.

Why not :meth:`VmasEnv._step`/``_reset``: the TorchRL wrapper builds one TensorDict per agent per step, and
its partial reset tests every sub-environment's flag in Python (one host sync per sub-environment on CUDA).
Here a step is a handful of tensor operations on the simulator's outputs. VMAS resets one index
(``reset_at``: Python calls per sub-environment, thousands per rollout at thousands of environments) or all of
them, so a partial reset (TorchRL's ``"_reset"`` key) is a full VMAS reset after which the sub-environments
that were not to be reset get their state back (see :meth:`VMASEnv._reset_where`): a reset sub-environment
starts where VMAS's full reset from the env's random streams puts it, the others do not change. It costs one
host sync (how many sub-environments to reset). VMAS itself also syncs once per step (it asserts that the
actions are finite and in range).

Randomness: VMAS draws initial states (and, in some scenarios, noise) from a random state that its
``Environment`` class shares between all its instances in the process, and its ``seed`` re-seeds the global
generators. :class:`VMASEnv` gives each instance its own streams instead: they are swapped in around every
call into VMAS, so an evaluation environment never shifts the training environment's episodes. ``seed`` (or
:meth:`~torchrl.envs.EnvBase.set_seed`) sets them as VMAS's ``seed`` would (PyTorch's, NumPy's and Python's
generators seeded with ``seed``; NumPy's with ``seed % 2**32``), so a :class:`VMASEnv` and a TorchRL
``VmasEnv`` built with the same seed start alike. On CUDA the device's generator is swapped in the same way.
An unseeded env draws its seed from PyTorch's global generator (reproducible after ``torch.manual_seed``).

Checkpoints: :meth:`VMASEnv.get_extra_state` holds the whole simulation (every tensor and number attribute of
the VMAS environment, its world, entities and scenario), the env's random streams and step counters, so
``load_state_dict`` resumes bit for bit (see its docstring for the limits).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded
from torchrl.envs import EnvBase

from fp3o_lightning.envs.specs import set_contract_specs
from fp3o_lightning.envs.state import check_saved_state

__all__ = ["VMASEnv", "vmas_scenarios"]


def vmas_scenarios() -> list[str]:
    """The VMAS scenarios that :class:`VMASEnv` can build (TorchRL's ``VmasEnv.available_envs``)."""
    from torchrl.envs.libs.vmas import VmasEnv

    return list(VmasEnv.available_envs)


def _seeded_states(seed: int) -> list[Any]:
    """VMAS's random-state triple ``[torch CPU state, NumPy state, Python state]`` seeded as VMAS seeds it."""
    return [
        torch.Generator().manual_seed(seed).get_state(),
        np.random.RandomState(seed % 2**32).get_state(),
        random.Random(seed).getstate(),
    ]


def _is_simulator_object(obj: Any, modules: tuple[str, ...]) -> bool:
    module = type(obj).__module__ or ""
    return (
        hasattr(obj, "__dict__")
        and not isinstance(obj, enum.Enum)
        and (module.startswith("vmas.") or module in modules)
    )


def _simulation_leaves(env: Any, modules: tuple[str, ...]) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """``(path, value)`` for every tensor, number, bool and ``None`` attribute of a VMAS simulation.

    A breadth-first walk from the VMAS ``Environment`` follows the attributes of VMAS objects (and of objects
    defined in ``modules``: the scenario's own file) and the items of lists, tuples and string-keyed dicts. A
    path is a tuple of steps: ``("a", name)`` for an attribute, ``("i", index)`` for a list or tuple item,
    ``("k", key)`` for a dict item under a string key, ``("o", "_agents.<i>")`` (or ``_landmarks``) for one
    under an agent or landmark (other keys are left out: caches keyed by tuples, ...). Each object is walked
    once, under its canonical path: the world's agents and landmarks under ``world._agents[i]`` /
    ``world._landmarks[j]``, the others where the walk first meets them.
    Where it meets an object again (e.g. a scenario's ``agent.goal = landmarks[k]``, chosen at random in some
    scenarios), the value is a :class:`_Ref` to the canonical path. Numbers inside tuples are constants and
    left out (they could not be set back); enums too.
    """
    world = (("a", "world"),)
    queue: collections.deque[tuple[tuple[Any, ...], Any, bool]] = collections.deque()
    canonical: dict[int, tuple[Any, ...]] = {}
    entity_keys: dict[int, str] = {}
    for name in ("_agents", "_landmarks"):
        entities = getattr(env.world, name)
        canonical[id(entities)] = world + (("a", name),)
        entity_keys.update((id(entity), f"{name}.{i}") for i, entity in enumerate(entities))
        queue.extend((world + (("a", name), ("i", i)), entity, False) for i, entity in enumerate(entities))
    queue.append(((), env, False))
    while queue:
        path, obj, in_tuple = queue.popleft()
        if isinstance(obj, torch.Tensor):
            yield path, obj
            continue
        if obj is None or isinstance(obj, (bool, int, float)):
            if path and not in_tuple:
                yield path, obj
            continue
        is_container = isinstance(obj, (list, tuple, dict))
        if not is_container and not _is_simulator_object(obj, modules):
            continue
        if id(obj) in canonical:
            if canonical[id(obj)] != path and not in_tuple:
                yield path, _Ref(canonical[id(obj)])
            continue
        canonical[id(obj)] = path
        if isinstance(obj, (list, tuple)):
            queue.extend((path + (("i", i),), item, isinstance(obj, tuple)) for i, item in enumerate(obj))
        elif isinstance(obj, dict):
            for key, value in obj.items():
                if isinstance(key, str):
                    queue.append((path + (("k", key),), value, False))
                elif id(key) in entity_keys:  # e.g. a scenario's {agent: tensor} dicts
                    queue.append((path + (("o", entity_keys[id(key)]),), value, False))
        else:
            queue.extend((path + (("a", k),), v, False) for k, v in vars(obj).items())


class _Ref:
    """A reference, in a simulation walk, to the object at another (canonical) path."""

    def __init__(self, path: tuple[Any, ...]) -> None:
        self.path = path


def _encode(path: tuple[tuple[Any, ...], ...]) -> str:
    return "/".join(f"{kind}:{key}" for kind, key in path)


def _decode(text: str) -> tuple[tuple[Any, ...], ...]:
    steps = []
    for part in text.split("/") if text else ():
        kind, key = part.split(":", 1)
        steps.append((kind, int(key) if kind == "i" else key))
    return tuple(steps)


def _get(obj: Any, step: tuple[Any, ...]) -> Any:
    kind, key = step
    if kind == "a":
        return vars(obj)[key]
    return obj[key]


def _set(obj: Any, step: tuple[Any, ...], value: Any) -> None:
    kind, key = step
    if kind == "a":
        vars(obj)[key] = value
    else:
        obj[key] = value


class VMASEnv(EnvBase):
    """``num_envs`` copies of a VMAS scenario as one batched TorchRL environment, simulated on ``device``.

    Args:
        scenario: VMAS scenario name, e.g. ``"balance"`` (see :func:`vmas_scenarios`).
        num_envs: number of environments simulated in parallel (the batch size).
        max_episode_steps: episodes are truncated after this many steps.
        seed: seeds the env's random streams (see the module docstring); ``None`` draws one from PyTorch's
            global generator.
        device: where VMAS simulates and where every tensor of the env lives (``"cpu"``, ``"cuda"``, ...).
        **scenario_kwargs: passed to the scenario, e.g. ``n_agents=4`` for ``balance``.

    Attributes:
        scenario, num_envs, max_episode_steps, scenario_kwargs: the constructor arguments.
        n_agents: number of (policy-controlled) agents; agent_names: their VMAS names.
        observation_sizes / action_sizes: per-agent unpadded observation / action sizes.
        max_obs_dim / max_action_dim: padded sizes; state_size: size of ``"state"``.
        observation_mask / action_mask: bool ``[n_agents, max_*_dim]``, True on the unpadded entries.
        simulates_on_device: ``True``: the simulation runs on ``device``, so trainers build this env on the
            training device and collect there.
    """

    simulates_on_device = True
    batch_locked = True

    def __init__(
        self,
        scenario: str = "balance",
        num_envs: int = 1,
        max_episode_steps: int = 100,
        seed: int | None = None,
        device: torch.device | str = "cpu",
        **scenario_kwargs: Any,
    ) -> None:
        if not isinstance(num_envs, int) or isinstance(num_envs, bool) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}.")
        if (
            not isinstance(max_episode_steps, int)
            or isinstance(max_episode_steps, bool)
            or max_episode_steps < 1
        ):
            raise ValueError(f"max_episode_steps must be an integer >= 1, got {max_episode_steps!r}.")
        valid = vmas_scenarios()
        if scenario not in valid:
            raise ValueError(f"Unknown VMAS scenario {scenario!r}; valid scenarios: {', '.join(valid)}.")
        for key in ("continuous_actions", "max_steps", "categorical_actions", "group_map"):
            if key in scenario_kwargs:
                raise ValueError(
                    f"{key!r} is set by {type(self).__name__} (continuous actions, one 'agents' group, "
                    "truncation by max_episode_steps) and cannot be passed as a scenario argument."
                )
        super().__init__(device=device, batch_size=torch.Size([num_envs]))
        self.scenario = scenario
        self.num_envs = num_envs
        self.max_episode_steps = max_episode_steps
        self.scenario_kwargs = dict(scenario_kwargs)
        self._cuda = self.device.type == "cuda"
        self._reseed(seed)

        from torchrl.envs.libs.vmas import VmasEnv
        from torchrl.envs.utils import MarlGroupMapType

        with self._own_rng():  # VMAS makes the world (some scenarios draw from the streams) and resets it
            inner = VmasEnv(
                scenario,
                num_envs=num_envs,
                device=self.device,
                continuous_actions=True,
                max_steps=None,
                seed=None,
                group_map=MarlGroupMapType.ALL_IN_ONE_GROUP,
                **scenario_kwargs,
            )
        # Kept out of the nn.Module tree: its (empty) state and device moves are handled here.
        self.__dict__["_inner"] = inner
        self._sim = inner._env
        # As VMAS's make_env(seed=seed): seeded after the world is made, then reset.
        self._reseed(self._seed_value)
        with self._own_rng():
            self._sim.reset(return_observations=False)
        self._scenario_modules = (type(self._sim.scenario).__module__ or "",)
        self.agent_names: list[str] = [agent.name for agent in self._sim.agents]
        self.n_agents = len(self.agent_names)
        with self._own_rng():
            observations = self._sim.get_from_scenario(
                get_observations=True, get_rewards=False, get_infos=False, get_dones=False
            )[0]
        for name, obs in zip(self.agent_names, observations, strict=True):
            if not isinstance(obs, torch.Tensor) or obs.dim() != 2:
                raise ValueError(
                    f"VMAS scenario {scenario!r} gives agent {name!r} a {type(obs).__name__} observation; "
                    f"{type(self).__name__} needs one flat tensor per agent (no dict observations)."
                )
        self.observation_sizes: list[int] = [int(obs.shape[-1]) for obs in observations]
        spaces = [self._sim.get_agent_action_space(agent) for agent in self._sim.agents]
        self.action_sizes: list[int] = [int(space.shape[0]) for space in spaces]
        self.max_obs_dim = max(self.observation_sizes)
        self.max_action_dim = max(self.action_sizes)
        self.state_size = sum(self.observation_sizes)
        self._pad_obs = [self.max_obs_dim - size for size in self.observation_sizes]
        self._needs_pad = any(self._pad_obs)

        a = self.n_agents
        low = -torch.ones(a, self.max_action_dim)
        high = torch.ones(a, self.max_action_dim)
        self.observation_mask = torch.zeros(a, self.max_obs_dim, dtype=torch.bool)
        self.action_mask = torch.zeros(a, self.max_action_dim, dtype=torch.bool)
        for i, (space, obs_size, act_size) in enumerate(
            zip(spaces, self.observation_sizes, self.action_sizes, strict=True)
        ):
            low[i, :act_size] = torch.from_numpy(np.asarray(space.low, dtype=np.float32))
            high[i, :act_size] = torch.from_numpy(np.asarray(space.high, dtype=np.float32))
            self.observation_mask[i, :obs_size] = True
            self.action_mask[i, :act_size] = True
        self._low, self._high = low.to(self.device), high.to(self.device)
        self._elapsed = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self._agents_batch = torch.Size([num_envs, a])
        self._make_specs(low, high)

    # ------------------------------------------------------------------ setup
    def _make_specs(self, low: torch.Tensor, high: torch.Tensor) -> None:
        shape = (self.num_envs, self.n_agents, self.max_action_dim)
        action = Bounded(
            low=low.expand(shape).clone(), high=high.expand(shape).clone(), shape=shape, device=self.device
        )
        set_contract_specs(self, self.max_obs_dim, self.state_size, action)

    # ------------------------------------------------------------------ randomness
    def _reseed(self, seed: int | None) -> None:
        """Set this env's random streams as VMAS's ``seed(seed)`` sets the global ones."""
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        self._seed_value = int(seed)
        self._rng = _seeded_states(self._seed_value)
        self._cuda_rng: torch.Tensor | None = None
        if self._cuda:
            outer = torch.cuda.get_rng_state(self.device)
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(self._seed_value)
            self._cuda_rng = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(outer, self.device)

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        """Swap this env's random streams into VMAS's shared random state (and the CUDA generator)."""
        from vmas.simulator.environment import Environment

        shared = Environment.vmas_random_state  # the list VMAS's calls read and write in place
        outer = list(shared)
        shared[:] = self._rng
        outer_cuda = None
        if self._cuda:
            outer_cuda = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self._cuda_rng, self.device)
        try:
            yield
        finally:
            self._rng = list(shared)
            shared[:] = outer
            if outer_cuda is not None:
                self._cuda_rng = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_cuda, self.device)

    def _set_seed(self, seed: int | None) -> None:
        self._reseed(seed)

    # ------------------------------------------------------------------ core
    def _observations(self, observations: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-agent VMAS observations -> padded ``[n, agents, max_obs_dim]`` and the ``[n, state]`` state."""
        state = torch.cat(observations, dim=-1)
        if self._needs_pad:
            observations = [
                F.pad(obs, (0, pad)) for obs, pad in zip(observations, self._pad_obs, strict=True)
            ]
        return torch.stack(observations, dim=1), state

    def _output(
        self,
        observations: list[torch.Tensor],
        terminated: torch.Tensor,
        truncated: torch.Tensor,
        reward: torch.Tensor | None = None,
    ) -> TensorDictBase:
        """Pack the outputs (built with the spec shapes and dtypes here: unchecked construction is safe)."""
        obs, state = self._observations(observations)
        data: dict[str, Any] = {
            "state": state,
            "done": terminated | truncated,
            "terminated": terminated,
            "truncated": truncated,
            "agents": TensorDict._new_unsafe(
                {"observation": obs}, batch_size=self._agents_batch, device=self.device
            ),
        }
        if reward is not None:
            data["reward"] = reward
        return TensorDict._new_unsafe(data, batch_size=self.batch_size, device=self.device)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get(("agents", "action")).detach().to(torch.float32)
        action = torch.clamp(action, self._low, self._high)
        actions = [action[:, i, :size] for i, size in enumerate(self.action_sizes)]
        with self._own_rng():
            observations, rewards, dones, _ = self._sim.step(actions)
        self._elapsed += 1
        reward = torch.stack(rewards, dim=-1).to(torch.float32).mean(-1, keepdim=True)
        terminated = dones.reshape(self.num_envs, 1).to(torch.bool)
        truncated = (self._elapsed >= self.max_episode_steps).unsqueeze(-1)
        return self._output(observations, terminated, truncated, reward)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        reset = None if tensordict is None else tensordict.get("_reset", None)
        with self._own_rng():
            if reset is None:
                self._sim.reset(return_observations=False)
                self._elapsed.zero_()
            else:
                mask = reset.reshape(self.num_envs).to(self._elapsed.device)
                count = int(mask.sum())  # one host sync
                if count == self.num_envs:
                    self._sim.reset(return_observations=False)
                elif count:
                    self._reset_where(mask)
                self._elapsed.masked_fill_(mask, 0)
            observations = self._sim.get_from_scenario(
                get_observations=True, get_rewards=False, get_infos=False, get_dones=False
            )[0]
        # Reset episodes start not done (VMAS's done() of a fresh state is not consulted).
        not_done = torch.zeros(self.num_envs, 1, dtype=torch.bool, device=self.device)
        return self._output(observations, not_done, not_done.clone())

    def _reset_where(self, mask: torch.Tensor) -> None:
        """Reset the sub-environments where ``mask`` (bool ``[num_envs]``) with batched tensor operations.

        VMAS resets one index (``reset_at``) or all of them, and a scenario's reset draws its random initial
        states for the whole batch at once only in the latter. So: every leaf of the simulation (tensors,
        numbers, references) is saved, VMAS's full reset runs (one vectorised call, drawing from the env's
        streams for every sub-environment), and then every leaf gets its saved value back, except the rows
        where ``mask`` is True of the per-environment tensors (first dimension ``num_envs``: entity states and
        actions, the scenario's per-environment tensors, VMAS's step counters), merged with ``torch.where``.
        A sub-environment that is not reset is left unchanged; state shared by all of them (numbers,
        references, tensors without the batch dimension, e.g. ``simple_push``'s goal landmark) too. All 41
        scenarios of VMAS 1.5.2 were checked: a full reset changes no path, shape or dtype of their leaves.
        """
        saved = []
        for path, value in _simulation_leaves(self._sim, self._scenario_modules):
            if isinstance(value, _Ref):
                value = self._resolve(value.path)
            elif isinstance(value, torch.Tensor):
                value = value.clone()
            saved.append((path, value))
        self._sim.reset(return_observations=False)
        for path, old in saved:
            parent, step = self._locate(path)
            new = _get(parent, step)
            if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
                if old.dim() and old.shape[0] == self.num_envs:
                    rows = mask.to(new.device).view(-1, *(1,) * (old.dim() - 1))  # a no-op on one device
                    old = torch.where(rows, new, old)
                if not _overlaps(new):  # written in place: other objects may hold the same tensor
                    new.copy_(old)
                    continue
            _set(parent, step, old)

    def _locate(self, path: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...] | None]:
        """The parent object of the simulation path ``path`` and its last step (``None`` for the root).

        Raises:
            KeyError, IndexError, TypeError: where ``path`` does not exist in the simulation.
        """
        steps = tuple(self._entity_key(step) for step in path)
        parent = self._sim
        for step in steps[:-1]:
            parent = _get(parent, step)
        return parent, (steps[-1] if steps else None)

    def _resolve(self, path: tuple[Any, ...]) -> Any:
        """The object at the simulation path ``path``."""
        parent, step = self._locate(path)
        return parent if step is None else _get(parent, step)

    # ------------------------------------------------------------------ checkpointing
    #: Version of the :meth:`get_extra_state` layout.
    _STATE_FORMAT = 1

    def _state_config(self) -> dict[str, Any]:
        """What a saved state must match to be loaded."""
        return {
            "scenario": self.scenario,
            "num_envs": self.num_envs,
            "agent_names": list(self.agent_names),
            "observation_sizes": list(self.observation_sizes),
            "action_sizes": list(self.action_sizes),
        }

    def get_extra_state(self) -> dict[str, Any]:
        """The full simulation state, stored by :meth:`state_dict` under the ``"_extra_state"`` key.

        ``env_b.load_state_dict(env_a.state_dict())``, with ``env_b`` built with the same ``scenario``,
        ``num_envs`` and scenario arguments (any ``seed``), makes ``env_b`` continue bit for bit like
        ``env_a``: the same steps, resets and outputs. It holds only tensors (on the CPU), numbers, strings
        and ``None`` in dicts, lists and tuples, so ``torch.load(..., weights_only=True)`` reads it:

        * ``"simulation"``: every tensor reachable from the VMAS environment through VMAS's objects (world,
          agents, landmarks, their states and actions, joints, sensors) and the scenario's own objects, by
          attribute path; ``"numbers"``: the int, float, bool and ``None`` attributes on such paths (scenario
          counters and flags); ``"references"``: which object an attribute points to where that is another
          path's object (e.g. the landmark a scenario picked at random as an agent's goal);
        * ``"rng"``: the env's random streams (PyTorch CPU, NumPy, Python, and the CUDA device's generator
          when simulating on CUDA) and ``"seed"``;
        * ``"elapsed"``: the steps since each episode began, for truncation;

        and ``"format"`` and ``"config"`` (scenario, ``num_envs``, agents' names and sizes,
        ``max_episode_steps``).

        Limits: state a scenario keeps outside such attributes (in closures or objects of other libraries) is
        not saved, and attributes that appear only once a scenario has stepped are set when loading, never
        removed. All 41 scenarios of VMAS 1.5.2 were checked to resume exactly (the tests keep three of them:
        ``balance``, ``simple_push``, ``football``). The current observation TensorDict (what the last
        ``reset`` or ``step_and_maybe_reset`` returned) is not included: the caller (a collector) keeps it.
        """
        simulation: dict[str, torch.Tensor] = {}
        numbers: dict[str, Any] = {}
        references: dict[str, str] = {}
        for path, value in _simulation_leaves(self._sim, self._scenario_modules):
            if isinstance(value, torch.Tensor):
                simulation[_encode(path)] = value.detach().to("cpu", copy=True)
            elif isinstance(value, _Ref):
                references[_encode(path)] = _encode(value.path)
            else:
                numbers[_encode(path)] = value
        torch_state, (name, keys, position, has_gauss, cached), python_state = self._rng
        return {
            "format": self._STATE_FORMAT,
            "config": {**self._state_config(), "max_episode_steps": self.max_episode_steps},
            "simulation": simulation,
            "numbers": numbers,
            "references": references,
            "rng": {
                "torch": torch_state.clone(),
                "numpy": (
                    name,
                    torch.from_numpy(keys.astype(np.int64)),
                    int(position),
                    int(has_gauss),
                    cached,
                ),
                "python": python_state,
                "cuda": None if self._cuda_rng is None else self._cuda_rng.clone(),
            },
            "seed": self._seed_value,
            "elapsed": self._elapsed.to("cpu", copy=True),
        }

    def set_extra_state(self, state: Any) -> None:
        """Restore a state made by :meth:`get_extra_state` (called by :meth:`load_state_dict`).

        The whole state is checked before anything is changed. A state saved on CUDA loads on the CPU and the
        other way round (the CUDA generator's stream is then derived from the saved seed).

        Raises:
            ValueError: if ``state`` is not such a state, comes from an env with a different scenario,
                ``num_envs`` or agents, or does not fit this env's simulation (other scenario arguments).
        """
        name = type(self).__name__
        check_saved_state(
            name,
            state,
            (self._STATE_FORMAT,),
            self._state_config(),
            "Build the env with the same scenario, num_envs and scenario arguments as the saved one.",
        )
        elapsed = state["elapsed"]
        if tuple(elapsed.shape) != (self.num_envs,):
            raise ValueError(
                f"Cannot load the {name} state: 'elapsed' has shape {tuple(elapsed.shape)}, "
                f"not {(self.num_envs,)}."
            )

        def resolve(text: str) -> tuple[Any, tuple[Any, ...] | None]:
            """The parent object of the path ``text`` and its last step (``None`` for the root)."""
            try:
                parent, step = self._locate(_decode(text))
            except (KeyError, IndexError, TypeError) as err:
                raise ValueError(
                    f"Cannot load the {name} state: {text!r} does not exist in this env's simulation "
                    "(built with other scenario arguments?)."
                ) from err
            if step is not None and isinstance(parent, tuple):
                current = _get(parent, step) if _has(parent, step) else None
                if not isinstance(current, torch.Tensor):
                    raise ValueError(
                        f"Cannot load the {name} state: {text!r} lies in a tuple and cannot be set."
                    )
            return parent, step

        # Resolve every path first: nothing changes unless all fit. Entries: (parent, step, value, is_object).
        plan: list[tuple[Any, tuple[Any, ...], Any, bool]] = []
        for text, value in state["simulation"].items():
            parent, step = resolve(text)
            current = _get(parent, step) if _has(parent, step) else None
            if isinstance(current, torch.Tensor) and (
                current.shape != value.shape or current.dtype != value.dtype
            ):
                raise ValueError(
                    f"Cannot load the {name} state: {text!r} is {value.dtype} {tuple(value.shape)} there, "
                    f"{current.dtype} {tuple(current.shape)} here (built with other scenario arguments?)."
                )
            plan.append((parent, step, value, False))
        for text, value in state["numbers"].items():
            plan.append((*resolve(text), value, False))
        for text, target in state["references"].items():
            parent, step = resolve(target)
            plan.append((*resolve(text), _get(parent, step) if step is not None else parent, True))

        for parent, step, value, is_object in plan:
            current = _get(parent, step) if _has(parent, step) else None
            if is_object or not isinstance(value, torch.Tensor):
                _set(parent, step, value)
            elif isinstance(current, torch.Tensor) and not _overlaps(current):
                current.copy_(value)
            elif not (isinstance(current, torch.Tensor) and torch.equal(current.cpu(), value)):
                _set(parent, step, value.to(self.device, copy=True))
        rng = state["rng"]
        name_, keys, position, has_gauss, cached = rng["numpy"]
        numpy_state = (name_, keys.numpy().astype(np.uint32), position, has_gauss, cached)
        cpu_rng = [rng["torch"].clone(), numpy_state, rng["python"]]
        self._reseed(int(state["seed"]))  # the CUDA stream when none was saved
        self._rng = cpu_rng
        if self._cuda and rng["cuda"] is not None:
            self._cuda_rng = rng["cuda"].clone()
        self._elapsed.copy_(elapsed)

    # ------------------------------------------------------------------ misc
    def _entity_key(self, step: tuple[Any, ...]) -> tuple[Any, ...]:
        """A path step, with an ``("o", "_agents.<i>")`` entity key turned into the dict step to it."""
        if step[0] != "o":
            return step
        name, index = step[1].split(".")
        return ("k", getattr(self._sim.world, name)[int(index)])

    def to(self, device: torch.device | str) -> VMASEnv:
        """VMAS simulates where it was built: moving to another device is refused."""
        if torch.device(device) != self.device:
            raise ValueError(
                f"{type(self).__name__} simulates on {self.device}; build it with device={str(device)!r} "
                "instead of moving it."
            )
        return self

    def close(self, *, raise_if_closed: bool = True) -> None:
        """Close the inner TorchRL ``VmasEnv`` (and VMAS's viewer, if any)."""
        inner = self.__dict__.get("_inner")
        if inner is not None and not inner.is_closed:
            inner.close()
        super().close(raise_if_closed=raise_if_closed)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(scenario={self.scenario!r}, num_envs={self.num_envs}, "
            f"n_agents={self.n_agents}, observation_sizes={self.observation_sizes}, "
            f"action_sizes={self.action_sizes}, state_size={self.state_size}, "
            f"max_episode_steps={self.max_episode_steps}, device={self.device})"
        )


def _overlaps(tensor: torch.Tensor) -> bool:
    """Whether elements of ``tensor`` share memory (an ``expand``-ed view): it cannot be written in place."""
    return any(stride == 0 and size > 1 for stride, size in zip(tensor.stride(), tensor.shape, strict=True))


def _has(obj: Any, step: tuple[Any, ...]) -> bool:
    kind, key = step
    if kind == "a":
        return key in vars(obj)
    if kind == "i":
        return -len(obj) <= key < len(obj)
    return key in obj
