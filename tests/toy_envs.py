"""Small TorchRL multi-agent environments (batch ``[]``) for the adapter's tests (``name: torchrl``)."""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torchrl.data import Binary, Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase


def _flags(n: int) -> dict[str, Categorical]:
    return {k: Categorical(2, (n, 1), dtype=torch.bool) for k in ("done", "terminated", "truncated")}


class Rendezvous(EnvBase):
    """Cooperative: ``n`` agents push one point on a line towards a target; every agent is paid
    ``-|x - target|`` (one shared reward); episodes last ``length`` steps (``truncated``). Each agent sees
    the point and the target; its action in ``[-1, 1]`` moves the point by ``0.1 x action``."""

    def __init__(self, n: int = 2, length: int = 20) -> None:
        super().__init__(batch_size=[])
        self.n, self.length = n, length
        self.observation_spec = Composite(agents=Composite(observation=Unbounded((n, 2)), shape=(n,)))
        self.action_spec = Composite(agents=Composite(action=Bounded(-1.0, 1.0, (n, 1)), shape=(n,)))
        self.reward_spec = Composite(agents=Composite(reward=Unbounded((n, 1)), shape=(n,)))
        self.done_spec = Composite(_flags(1))
        self.generator = torch.Generator()

    def _observe(self) -> TensorDict:
        seen = torch.stack([self.x, self.target]).expand(self.n, 2).clone()
        return TensorDict({"agents": TensorDict({"observation": seen}, [self.n])}, [])

    def _reset(self, tensordict=None, **kwargs) -> TensorDict:
        self.x = torch.rand((), generator=self.generator) * 4 - 2
        self.target = torch.rand((), generator=self.generator) * 4 - 2
        self.steps = 0
        return self._observe().update(
            dict.fromkeys(("done", "terminated", "truncated"), torch.zeros(1, dtype=torch.bool))
        )

    def _step(self, tensordict) -> TensorDict:
        self.x = self.x + 0.1 * tensordict["agents", "action"].sum()
        self.steps += 1
        out = self._observe()
        out["agents", "reward"] = (-(self.x - self.target).abs()).expand(self.n, 1).clone()
        ended = torch.tensor([self.steps >= self.length])
        return out.update({"done": ended, "terminated": torch.zeros(1, dtype=torch.bool), "truncated": ended})

    def _set_seed(self, seed: int | None) -> None:
        self.generator.manual_seed(0 if seed is None else seed)


class TwoGroups(EnvBase):
    """Heterogeneous agents in two groups, with no root done flags and no team reward:

    * ``"scout"``: 1 agent, observation 3, action 2 (continuous) or 4 actions (discrete);
    * ``"workers"``: 2 agents, observation ``[2, 2]`` (flattened to 4), action 1 or 2 actions, and a
      ``mask``: worker 1 leaves the episode after 2 steps.

    Observations encode the step and the agent; rewards are ``step + agent`` (agent 0, 1, 2 across the
    groups), so that every output can be checked. Each group's agents terminate after ``length`` steps.
    With ``discrete``, the scout's ``action_mask`` forbids action 3.
    """

    def __init__(self, discrete: bool = False, length: int = 4) -> None:
        super().__init__(batch_size=[])
        self.discrete, self.length, self.steps = discrete, length, 0
        scout_obs = {"observation": Unbounded((1, 3))}
        if discrete:
            scout_obs["action_mask"] = Binary(n=4, shape=(1, 4), dtype=torch.bool)
        self.observation_spec = Composite(
            scout=Composite(scout_obs, shape=(1,)),
            workers=Composite(
                observation=Unbounded((2, 2, 2)), mask=Categorical(2, (2,), dtype=torch.bool), shape=(2,)
            ),
        )
        if discrete:
            actions = {"scout": Categorical(4, (1,)), "workers": Categorical(2, (2,))}
        else:
            actions = {"scout": Bounded(-2.0, 2.0, (1, 2)), "workers": Bounded(-1.0, 1.0, (2, 1))}
        self.action_spec = Composite(
            scout=Composite(action=actions["scout"], shape=(1,)),
            workers=Composite(action=actions["workers"], shape=(2,)),
        )
        self.reward_spec = Composite(
            scout=Composite(reward=Unbounded((1, 1)), shape=(1,)),
            workers=Composite(reward=Unbounded((2, 1)), shape=(2,)),
        )
        self.done_spec = Composite(
            scout=Composite(_flags(1), shape=(1,)), workers=Composite(_flags(2), shape=(2,))
        )

    def _outputs(self) -> TensorDict:
        t = float(self.steps)
        ended = torch.tensor(self.steps >= self.length)
        scout = {"observation": torch.tensor([[t, 0.0, 1.0]])}
        if self.discrete:
            scout["action_mask"] = torch.tensor([[True, True, True, False]])
        workers = {
            "observation": torch.tensor([[[t, 1.0], [2.0, 3.0]], [[t, 2.0], [4.0, 5.0]]]),
            "mask": torch.tensor([True, self.steps < 2]),
        }
        out = TensorDict({"scout": TensorDict(scout, [1]), "workers": TensorDict(workers, [2])}, [])
        for group, n in (("scout", 1), ("workers", 2)):
            for key in ("done", "terminated"):
                out[group, key] = ended.expand(n, 1).clone()
            out[group, "truncated"] = torch.zeros(n, 1, dtype=torch.bool)
        return out

    def _reset(self, tensordict=None, **kwargs) -> TensorDict:
        self.steps = 0
        return self._outputs()

    def _step(self, tensordict) -> TensorDict:
        self.last_action = tensordict.select(("scout", "action"), ("workers", "action")).clone()
        self.steps += 1
        out = self._outputs()
        out["scout", "reward"] = torch.tensor([[self.steps + 0.0]])
        out["workers", "reward"] = torch.tensor([[self.steps + 1.0], [self.steps + 2.0]])
        return out

    def _set_seed(self, seed: int | None) -> None:
        pass
