"""A tiny pure-torch multi-agent game with masked discrete actions, for tests (no JAX, no simulator).

Every step each sub-env shows a target action ``1 .. n_actions - 1``; every live agent may pick it, action
``0`` (wait) or one of the other actions that happen to be available (each with probability 1/2), so the
mask changes at every step. The team reward is the share of agents that picked the target, plus 1 on the
step that wins. Agents die at random (``death_prob`` per step); a dead agent may only wait. The episode
terminates, won, after ``goal`` steps in which every live agent picked the target, or lost when every
agent is dead, and is truncated after ``max_episode_steps`` steps. An unavailable action raises a
``ValueError`` (as StarCraft II does), so training on this env checks that the mask is respected.
Keys and specs are the package's (:mod:`fp3o_lightning.envs`), SMAX's discrete conventions included.
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Categorical
from torchrl.envs import EnvBase

from fp3o_lightning.envs.specs import set_contract_specs
from fp3o_lightning.envs.state import check_saved_state

#: The simulation's tensors, saved by ``get_extra_state``.
_FIELDS = ("elapsed", "score", "target", "mask", "alive")


class MaskedGameEnv(EnvBase):
    """``num_envs`` copies of the game, simulated on the CPU, outputs on ``device``."""

    simulates_on_device = False
    batch_locked = True

    def __init__(
        self,
        num_envs: int = 1,
        n_agents: int = 3,
        n_actions: int = 5,
        max_episode_steps: int = 20,
        goal: int = 3,
        death_prob: float = 0.05,
        seed: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(device=device, batch_size=torch.Size([num_envs]))
        self.num_envs, self.n_agents, self.n_actions = num_envs, n_agents, n_actions
        self.max_episode_steps, self.goal, self.death_prob = max_episode_steps, goal, death_prob
        self._sim = torch.device(self.device if self.simulates_on_device else "cpu")
        self._generator = torch.Generator()
        self._seed = self._generator.seed()
        self._set_seed(seed)
        zeros = torch.zeros(num_envs, dtype=torch.long, device=self._sim)
        self.elapsed, self.score, self.target = zeros, zeros.clone(), zeros.clone()
        self.mask = torch.ones(num_envs, n_agents, n_actions, dtype=torch.bool, device=self._sim)
        self.alive = torch.ones(num_envs, n_agents, dtype=torch.bool, device=self._sim)
        action = Categorical(n_actions, shape=(num_envs, n_agents), dtype=torch.int64, device=self.device)
        state_size = n_actions + n_agents * (n_actions + 1) + 1
        set_contract_specs(
            self, 2 * n_actions + 2, state_size, action, n_actions, flags=("won",), agent_flags=("alive",)
        )

    def _uniform(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self._generator).to(self._sim)

    def _draw(self, where: torch.Tensor) -> None:
        """A new target and mask for the sub-envs ``where`` (the draw is made for all: replayable)."""
        target = 1 + (self._uniform(self.num_envs) * (self.n_actions - 1)).long()
        mask = self._uniform(self.num_envs, self.n_agents, self.n_actions) < 0.5
        mask[..., 0] = True
        mask |= torch.nn.functional.one_hot(target, self.n_actions).bool().unsqueeze(1)
        mask &= self.alive.unsqueeze(-1) | (torch.arange(self.n_actions, device=self._sim) == 0)
        self.target = torch.where(where, target, self.target)
        self.mask = torch.where(where.view(-1, 1, 1), mask, self.mask)

    def _output(self, won: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor) -> TensorDictBase:
        target = torch.nn.functional.one_hot(self.target, self.n_actions).float()
        time = (self.elapsed.float() / self.max_episode_steps).view(-1, 1, 1).expand(-1, self.n_agents, 1)
        alive = self.alive.unsqueeze(-1).float()
        shown = target.unsqueeze(1).expand(-1, self.n_agents, -1)
        obs = torch.cat([shown, self.mask.float(), alive, time], -1)
        state = torch.cat([target, torch.cat([self.mask.float(), alive], -1).flatten(1), time[:, 0]], -1)
        agents = {"observation": obs, "action_mask": self.mask.clone(), "alive": self.alive.clone()}
        flags = {"done": terminated | truncated, "terminated": terminated, "truncated": truncated, "won": won}
        data = TensorDict({"state": state, **{k: v.unsqueeze(-1) for k, v in flags.items()}}, self.batch_size)
        data["agents"] = TensorDict(agents, [self.num_envs, self.n_agents])
        return data.to(self.device)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get(("agents", "action")).to(self._sim)
        valid = (action >= 0) & (action < self.n_actions)
        if not valid.all() or not self.mask.gather(-1, action.unsqueeze(-1)).all():
            raise ValueError(f"{type(self).__name__}: an unavailable action was taken: {action.tolist()}")
        hit = (action == self.target.unsqueeze(-1)) & self.alive
        reward = hit.float().mean(-1)
        self.score += ((hit | ~self.alive).all(-1) & self.alive.any(-1)).long()
        self.alive &= self._uniform(self.num_envs, self.n_agents) >= self.death_prob
        self.elapsed += 1
        won = self.score >= self.goal
        terminated = won | ~self.alive.any(-1)
        truncated = (self.elapsed >= self.max_episode_steps) & ~terminated
        self._draw(torch.ones_like(won))
        data = self._output(won, terminated, truncated)
        data["reward"] = (reward + won.float()).unsqueeze(-1).to(self.device)
        return data

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        reset = None if tensordict is None else tensordict.get("_reset", None)
        where = torch.ones(self.num_envs, dtype=torch.bool, device=self._sim)
        if reset is not None:
            where = reset.reshape(self.num_envs, -1).any(-1).to(self._sim)
        self.elapsed = self.elapsed.masked_fill(where, 0)
        self.score = self.score.masked_fill(where, 0)
        self.alive = self.alive | where.unsqueeze(-1)
        self._draw(where)
        false = torch.zeros_like(where)
        return self._output(false, false, false)

    def _set_seed(self, seed: int | None) -> None:
        if seed is not None:
            self._seed = self._generator.manual_seed(seed).initial_seed()

    def rand_action(self, tensordict: TensorDictBase | None = None) -> TensorDictBase:
        """Uniform among the available actions, from the env's generator (``rollout`` without a policy)."""
        weights = self.mask.float().flatten(0, 1).cpu()
        action = torch.multinomial(weights, 1, generator=self._generator).view(self.num_envs, self.n_agents)
        out = TensorDict({("agents", "action"): action.to(self.device)}, self.batch_size, device=self.device)
        return out if tensordict is None else tensordict.update(out)

    def _config(self) -> dict[str, Any]:
        return {"num_envs": self.num_envs, "n_agents": self.n_agents, "n_actions": self.n_actions}

    def get_extra_state(self) -> dict[str, Any]:
        """The game's tensors (on the CPU), its generator's state and seed: a resume continues exactly."""
        state = {name: getattr(self, name).to("cpu", copy=True) for name in _FIELDS}
        state |= {"rng": self._generator.get_state(), "seed": self._seed}
        return {"format": 1, "config": self._config(), **state}

    def set_extra_state(self, state: Any) -> None:
        check_saved_state(type(self).__name__, state, (1,), self._config(), "Build it with the same sizes.")
        for name in _FIELDS:
            setattr(self, name, state[name].to(self._sim, copy=True))
        self._generator.set_state(state["rng"])
        self._seed = state["seed"]


class MaskedGameOnDeviceEnv(MaskedGameEnv):
    """The same game simulated on ``device`` (as VMAS is): masks and flags are made on the training device."""

    simulates_on_device = True
