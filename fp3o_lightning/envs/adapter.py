"""Any TorchRL multi-agent environment on the package's contract (:mod:`fp3o_lightning.envs.specs`).

:class:`MultiAgentAdapter` takes a factory of one TorchRL multi-agent environment (one copy, batch ``[]``:
a user's ``EnvBase``, TorchRL's ``PettingZooWrapper``, ...), runs ``num_envs`` copies in TorchRL's
``SerialEnv`` and maps its agent groups onto the contract (batch ``[num_envs]``):

* **agents**: the groups' agents one after another (in the order of ``groups``, default: every group in
  the order of its action spec), as one ``"agents"`` dimension of ``n_agents``;
* ``("agents", "observation")``: each agent's ``(group, "observation")``, flattened and zero-padded to the
  largest agent's (``observation_sizes``), as MaMuJoCo's;
* ``("agents", "action")``: continuous actions padded to the largest agent's action (``action_sizes``; the
  padding is ignored) and clipped into the task's bounds before the task sees them, or discrete actions
  as indices, with ``("agents", "action_mask")``: the group's own ``(group, "action_mask")`` where the
  task gives one, and False on the padding of agents with fewer actions;
* ``("agents", "alive")`` where the task says which agents act (TorchRL's ``(group, "mask")``, e.g. agents
  that left the episode): False for them;
* ``"state"``: the task's own root ``"state"`` (flattened) where it has one, else every agent's
  observation (unpadded) joined;
* ``"reward"``: the task's root ``"reward"`` where it gives a team reward, else the ``reward`` reduction
  (``"mean"`` or ``"sum"``) of every agent's ``(group, "reward")``;
* ``"done"``/``"terminated"``/``"truncated"``: the task's root flags where it has a root ``"done"`` (a root
  ``"done"`` alone terminates), else whether every agent is done (terminated, truncated); and ``truncated``
  after ``max_episode_steps`` steps.

What it does not take (each a ``ValueError`` naming the problem and the fix, before anything runs): no
agent group, continuous and discrete agents together, one-hot or multi-dimensional discrete actions,
vector rewards (several per agent), non-vector observations of unknown layout are flattened.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, TensorSpec
from torchrl.envs import EnvBase, SerialEnv

from fp3o_lightning.envs.specs import set_contract_specs

Reduction = Literal["mean", "sum"]


@dataclass(frozen=True)
class Group:
    """One agent group of the wrapped environment: its key and sizes."""

    name: str
    n_agents: int
    observation_size: int
    action_size: int  # continuous: the action's size; discrete: the number of actions
    has_action_mask: bool
    has_alive: bool


def _agent_groups(env: EnvBase, groups: Sequence[str] | None) -> list[str]:
    """The names of the groups whose agents are ours: every group with an ``action`` (or ``groups``)."""
    found = [
        key for key, spec in env.full_action_spec.items() if isinstance(spec, Composite) and "action" in spec
    ]
    if not found:
        keys = [str(k) for k in env.full_action_spec.keys(True, True)]
        raise ValueError(
            f"the environment has no agent group: its actions are {keys}, not (group, 'action') as TorchRL's "
            "multi-agent environments give them; wrap it so that its agents' actions are under a group, "
            "e.g. ('agents', 'action') of shape [n_agents, ...]"
        )
    if groups is None:
        return found
    missing = [g for g in groups if g not in found]
    if missing:
        raise ValueError(f"group(s) {missing} are not agent groups of the environment; its groups: {found}")
    return list(groups)


def _describe(env: EnvBase, name: str, skip: int) -> Group:
    """Group ``name``'s sizes, checked: vector observations and one kind of action (the specs' first
    ``skip`` dimensions are the environment's batch)."""
    observation = env.full_observation_spec.get((name, "observation"), None)
    if observation is None:
        keys = list(env.full_observation_spec.get(name, Composite()).keys())
        raise ValueError(
            f"group {name!r} has no 'observation' (its keys: {keys}); the adapter reads its agents' "
            "observations from (group, 'observation')"
        )
    action = env.full_action_spec[name, "action"]
    n_agents = action.shape[skip]
    if isinstance(action, Categorical):
        if action.shape[skip:] != (n_agents,):
            raise ValueError(
                f"group {name!r}: discrete actions of shape {tuple(action.shape)} (several per "
                "agent) are not supported; one index per agent is"
            )
        action_size = int(action.space.n)
    elif action.domain == "continuous":
        action_size = int(torch.Size(action.shape[skip + 1 :]).numel())
    else:
        raise ValueError(
            f"group {name!r}: actions of type {type(action).__name__} are not supported; give index actions "
            "(TorchRL's Categorical: PettingZooWrapper(..., categorical_actions=True)) or continuous ones"
        )
    reward = env.full_reward_spec.get((name, "reward"), None)
    if reward is not None and reward.shape[skip + 1 :].numel() != 1:
        raise ValueError(
            f"group {name!r}: rewards of shape {tuple(reward.shape)} (several per agent) cannot be combined "
            "into one team reward; give each agent one reward"
        )
    return Group(
        name,
        n_agents,
        int(observation.shape[skip + 1 :].numel()),
        action_size,
        (name, "action_mask") in env.full_observation_spec.keys(True, True),
        (name, "mask") in env.full_observation_spec.keys(True, True),
    )


class MultiAgentAdapter(EnvBase):
    """``num_envs`` copies of a TorchRL multi-agent environment on the package's contract (see the module
    docstring).

    Args:
        make_env: builds one copy (batch ``[]``); called once per copy, and once more to read the specs. With
            ``batched``, ``make_env(num_envs)`` builds all the copies at once, as one environment of batch
            ``[num_envs]`` (e.g. TorchRL's ``VmasEnv``).
        num_envs: copies, stepped one after another (TorchRL's ``SerialEnv``) unless ``batched``.
        max_episode_steps: episodes are truncated after this many steps (the task's own limit may come first).
        reward: ``mean`` or ``sum`` of the agents' rewards, where the task gives no team reward.
        groups: the agent groups, in order (default: every group with actions).
        seed: seeds copy ``i`` with ``seed + i``.
        device: device of the produced tensors.

    Attributes:
        groups: each group's :class:`Group`; n_agents, observation_sizes, action_sizes, max_obs_dim,
            max_action_dim, state_size, discrete, max_episode_steps: as the other environments'.
    """

    batch_locked = True

    def __init__(
        self,
        make_env: Callable[[], EnvBase],
        num_envs: int = 1,
        max_episode_steps: int = 1000,
        reward: Reduction = "mean",
        groups: Sequence[str] | None = None,
        seed: int | None = None,
        device: torch.device | str = "cpu",
        batched: bool = False,
    ) -> None:
        if not isinstance(max_episode_steps, int) or max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be an integer >= 1, got {max_episode_steps!r}")
        if reward not in ("mean", "sum"):
            raise ValueError(f"reward must be 'mean' or 'sum', got {reward!r}")
        super().__init__(device=device, batch_size=torch.Size([num_envs]))
        probe, skip = (make_env(num_envs), 1) if batched else (make_env(), 0)
        expected = torch.Size([num_envs] if batched else [])
        if probe.batch_size != expected:
            raise ValueError(
                f"the environment built has batch size {tuple(probe.batch_size)}, not {tuple(expected)}: "
                + (
                    "give the keyword that builds the copies at once"
                    if batched
                    else "build one copy (the "
                    "adapter makes num_envs of them), or give the keyword that builds num_envs at once"
                )
            )
        self.groups = [_describe(probe, name, skip) for name in _agent_groups(probe, groups)]
        discrete = {isinstance(probe.full_action_spec[g.name, "action"], Categorical) for g in self.groups}
        if len(discrete) > 1:
            raise ValueError("the agent groups mix continuous and discrete actions; train them separately")
        self.discrete = discrete.pop()
        self._team_reward = "reward" in probe.full_reward_spec
        if not self._team_reward and any(
            (g.name, "reward") not in probe.full_reward_spec.keys(True) for g in self.groups
        ):
            raise ValueError(
                "the environment gives neither a team 'reward' nor every group a (group, 'reward')"
            )
        self._root_flags = [k for k in ("done", "terminated", "truncated") if k in probe.full_done_spec]
        self._has_state = "state" in probe.full_observation_spec
        self._bounds = [
            tuple(
                getattr(probe.full_action_spec[g.name, "action"].space, bound, None)
                for bound in ("low", "high")
            )
            for g in self.groups
        ]
        self.num_envs, self.max_episode_steps, self.reward_reduction = num_envs, max_episode_steps, reward
        self.observation_sizes = [g.observation_size for g in self.groups for _ in range(g.n_agents)]
        self.action_sizes = [g.action_size for g in self.groups for _ in range(g.n_agents)]
        self.n_agents = len(self.observation_sizes)
        self.max_obs_dim, self.max_action_dim = max(self.observation_sizes), max(self.action_sizes)
        state = probe.full_observation_spec["state"].shape[skip:].numel() if self._has_state else None
        self.state_size = int(state) if state is not None else sum(self.observation_sizes)
        if not batched:
            probe.close()
            probe = _SerialEnv(num_envs, make_env, device="cpu")
        # A plain attribute: the copies are not submodules, so that state_dict holds this env's own state.
        object.__setattr__(self, "_inner", probe)
        self._elapsed = torch.zeros(num_envs, dtype=torch.long)
        self._make_specs()
        if seed is not None:
            self.set_seed(seed)

    # ------------------------------------------------------------------ specs
    def _make_specs(self) -> None:
        n, a = self.num_envs, self.n_agents
        alive = ("alive",) if any(g.has_alive for g in self.groups) else ()
        if self.discrete:
            action: TensorSpec = Categorical(
                self.max_action_dim, shape=(n, a), dtype=torch.int64, device=self.device
            )
            set_contract_specs(
                self, self.max_obs_dim, self.state_size, action, self.max_action_dim, agent_flags=alive
            )
            return
        low = -torch.ones(a, self.max_action_dim)
        high = torch.ones(a, self.max_action_dim)
        row = 0
        for group, (group_low, group_high) in zip(self.groups, self._bounds, strict=True):
            size, rows = group.action_size, slice(row, row + group.n_agents)
            low[rows, :size] = group_low.reshape(-1, group.n_agents, size)[0]  # (the first copy's)
            high[rows, :size] = group_high.reshape(-1, group.n_agents, size)[0]
            row += group.n_agents
        action = Bounded(
            low.expand(n, -1, -1),
            high.expand(n, -1, -1),
            shape=(n, a, self.max_action_dim),
            device=self.device,
        )
        set_contract_specs(self, self.max_obs_dim, self.state_size, action, agent_flags=alive)

    # ------------------------------------------------------------------ data
    def _inner_action(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Our padded ``("agents", "action")`` as each group's own actions; continuous ones clipped into
        the task's bounds (the policy's Gaussian samples beyond them, and TorchRL's environments, VMAS's for
        one, may refuse actions out of bounds)."""
        action = tensordict["agents", "action"].cpu()
        if not self.discrete:
            bounds = self.full_action_spec["agents", "action"].space
            action = torch.minimum(torch.maximum(action, bounds.low.cpu()), bounds.high.cpu())
        out = TensorDict({}, batch_size=[self.num_envs])
        row = 0
        for group in self.groups:
            part = action[:, row : row + group.n_agents]
            if not self.discrete:
                shape = self._inner.full_action_spec[group.name, "action"].shape
                part = part[..., : group.action_size].reshape(shape)
            out[group.name, "action"] = part
            row += group.n_agents
        return out

    def _output(self, data: TensorDictBase, with_reward: bool) -> TensorDictBase:
        """The inner environments' outputs (reset or step) on the contract."""
        n = self.num_envs
        observation = torch.zeros(n, self.n_agents, self.max_obs_dim)
        pieces, alive, masks, rewards, dones = [], [], [], [], []
        row = 0
        for group in self.groups:
            obs = data[group.name, "observation"].reshape(n, group.n_agents, -1).float()
            observation[:, row : row + group.n_agents, : group.observation_size] = obs
            pieces.append(obs.reshape(n, -1))
            if group.has_alive or any(g.has_alive for g in self.groups):
                own = data.get((group.name, "mask"), None)
                alive.append(
                    torch.ones(n, group.n_agents, dtype=torch.bool)
                    if own is None
                    else own.reshape(n, -1).bool()
                )
            if self.discrete:
                mask = torch.zeros(n, group.n_agents, self.max_action_dim, dtype=torch.bool)
                own = data.get((group.name, "action_mask"), None)
                mask[..., : group.action_size] = (
                    True if own is None else own.reshape(n, group.n_agents, -1).bool()
                )
                masks.append(mask)
            if with_reward and not self._team_reward:
                rewards.append(data[group.name, "reward"].reshape(n, group.n_agents))
            if "done" not in self._root_flags:
                dones.append(
                    {
                        k: data[group.name, k].reshape(n, group.n_agents)
                        for k in ("done", "terminated", "truncated")
                    }
                )
            row += group.n_agents
        state = data["state"].reshape(n, -1).float() if self._has_state else torch.cat(pieces, -1)
        agents = TensorDict({"observation": observation}, batch_size=[n, self.n_agents])
        out = TensorDict({"agents": agents, "state": state}, batch_size=[n])
        if alive:
            out["agents", "alive"] = torch.cat(alive, 1)
        if masks:
            out["agents", "action_mask"] = torch.cat(masks, 1)
        if with_reward:
            if self._team_reward:
                reward = data["reward"].reshape(n, 1).float()
            else:
                every = torch.cat(rewards, 1).float()
                reward = (every.mean if self.reward_reduction == "mean" else every.sum)(1, keepdim=True)
            out["reward"] = reward
        if "done" in self._root_flags:  # a root "done" alone: it terminates
            flags = {
                k: data[k if k in self._root_flags else "done"].reshape(n, 1).bool()
                for k in ("done", "terminated")
            }
            truncated = data["truncated"] if "truncated" in self._root_flags else torch.zeros(n, 1)
            flags["truncated"] = truncated.reshape(n, 1).bool()
        else:
            flags = {k: torch.cat([d[k] for d in dones], 1).bool().all(1, keepdim=True) for k in dones[0]}
        out.update(flags)
        return out.to(self.device)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        inner = self._inner.step(self._inner_action(tensordict))["next"]
        out = self._output(inner, with_reward=True)
        self._elapsed += 1
        limit = (self._elapsed >= self.max_episode_steps).unsqueeze(-1).to(self.device)
        out["truncated"] = out["truncated"] | (limit & ~out["terminated"])
        out["done"] = out["done"] | out["truncated"]
        return out

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        reset = None if tensordict is None else tensordict.get("_reset", None)
        if reset is None:
            self._elapsed.zero_()
            return self._output(self._inner.reset(), with_reward=False)
        rows = reset.reshape(-1).cpu()
        self._elapsed[rows] = 0
        keys = TensorDict({}, batch_size=[self.num_envs])
        for key in self._inner.reset_keys:
            shape = self._inner.full_done_spec[
                key[:-1] + ("done",) if isinstance(key, tuple) else "done"
            ].shape
            keys[key] = rows.reshape(-1, *([1] * (len(shape) - 1))).expand(shape).clone()
        return self._output(self._inner.reset(keys), with_reward=False)

    def _set_seed(self, seed: int | None) -> None:
        self._inner.set_seed(seed)

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> dict[str, Any]:
        """The copies' state for an exact resume (see :func:`_copy_state`) and the step counts."""
        copies = getattr(self._inner, "_envs", None) or []
        return {"format": 1, "elapsed": self._elapsed.clone(), "copies": [_copy_state(c) for c in copies]}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("format") != 1:
            raise ValueError(
                "Not a MultiAgentAdapter state: it must come from MultiAgentAdapter.state_dict()"
            )
        self._elapsed = state["elapsed"].clone()
        if not state["copies"]:
            return
        if not getattr(self._inner, "_envs", None):
            self._inner.reset()  # start the copies, then overwrite them
        for copy, saved in zip(self._inner._envs, state["copies"], strict=True):
            _load_copy_state(copy, saved)

    def close(self, *, raise_if_closed: bool = True) -> None:
        if not self._inner.is_closed:
            self._inner.close(raise_if_closed=raise_if_closed)
        super().close(raise_if_closed=raise_if_closed)


class _SerialEnv(SerialEnv):
    """TorchRL's ``SerialEnv``, which leaves the process's torch threads as they were when it closes (also
    when the garbage collector closes it): TorchRL's raises them by the number of copies, so the trainer's
    setting (``model.num_threads``, one thread) would become several, and a change while ``torch.compile``
    traces stops the compilation."""

    def close(self, *, raise_if_closed: bool = True) -> None:
        threads = torch.get_num_threads()
        try:
            super().close(raise_if_closed=raise_if_closed)
        finally:
            torch.set_num_threads(threads)


#: The attributes through which PettingZoo's wrappers hold the environment they wrap.
_WRAPPED = ("aec_env", "env")


def _pettingzoo_layers(task: Any) -> list[Any]:
    """A PettingZoo task and every environment under it (its wrappers' ``aec_env`` or ``env``)."""
    layers = [task]
    while (
        inner := next((getattr(layers[-1], a) for a in _WRAPPED if a in vars(layers[-1])), None)
    ) is not None:
        layers.append(inner)
    return layers


def _copy_state(env: EnvBase) -> dict[str, Any]:
    """One copy's state: a PettingZoo task's (inside TorchRL's ``PettingZooWrapper``) as every layer's
    attributes, pickled one by one (PettingZoo's own pickling, ``EzPickle``, rebuilds a task from its
    arguments and loses its state); a TorchRL environment's ``state_dict()``."""
    task = getattr(env, "_env", None)
    if task is None or type(env).__name__ != "PettingZooWrapper":
        return {"state_dict": env.state_dict()}
    return {"pettingzoo": [_picklable(layer) for layer in _pettingzoo_layers(task)]}


def _picklable(layer: Any) -> dict[str, bytes]:
    """A layer's attributes, each pickled, but the wrapped layer's and those that cannot be (a renderer's
    surfaces and fonts, which hold no simulation state; the live copy keeps its own)."""
    kept = {}
    for name, value in vars(layer).items():
        if name not in _WRAPPED:
            with contextlib.suppress(Exception):
                kept[name] = pickle.dumps(value)
    return kept


def _load_copy_state(env: EnvBase, saved: dict[str, Any]) -> None:
    if "state_dict" in saved:
        env.load_state_dict(saved["state_dict"])
        return
    for layer, attributes in zip(_pettingzoo_layers(env._env), saved["pettingzoo"], strict=True):
        vars(layer).update({name: pickle.loads(value) for name, value in attributes.items()})
