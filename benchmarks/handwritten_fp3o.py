"""FP3O in one file of plain PyTorch: the hand-written baseline that ``train_throughput.py`` is held to.

The same work as ``train_throughput.py --config configs/mamujoco/halfcheetah_6x1.yaml`` (issue 15): the
paper's HalfCheetah 6x1 (``agent_obsk`` 5, 4 envs x 1000 steps), NoPS, LayerNorm on the input and after every
hidden ReLU, 5 epochs x 32 minibatches per phase, a Huber critic, with the package's defaults (agent id on
every input, one ``V(s, i)`` and value normaliser per agent, per-minibatch value normalisation, value
clipping, per-agent gradient clipping of the actors). Only the learner differs: the environment is the
package's :class:`~fp3o_lightning.envs.MaMuJoCoEnv`, stepped through ``step_and_maybe_reset`` as the
package's collector steps it. What it leaves out: Lightning, TensorDict in the update, the non-finite guard,
diagnostics, logging and checkpoints.

How it is written for speed: every network holds its agents' weights stacked and keeps its activations
agent-major (``[n_agents, rows, features]``), so each layer is one ``baddbmm``; the whole update batch is laid
out agent-major once per iteration (inputs with the agent id appended), and minibatches are slices of it;
the Gaussian's log-probability and entropy are written out; one fused Adam steps actors and critics (two
parameter groups for their learning rates)::

    python benchmarks/handwritten_fp3o.py --iterations 4
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fp3o_lightning.envs import MaMuJoCoEnv

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class Config:
    """The paper's Table 4 values for HalfCheetah 6x1 (the package's defaults)."""

    num_envs: int = 4
    rollout_length: int = 1000
    agent_obsk: int = 5
    hidden: int = 64
    actor_lr: float = 1e-5
    critic_lr: float = 3e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    epochs: int = 5
    minibatches: int = 32
    entropy_coef: float = 0.001
    max_grad_norm: float = 10.0
    huber_delta: float = 10.0
    gain: float = 0.01
    std_x: float = 1.0
    std_y: float = 0.5


class StackedMLP(nn.Module):
    """An MLP per agent on ``[agents, rows, in]``: ``LayerNorm + 2 x (Linear, ReLU, LayerNorm) + Linear``.

    Weights ``[agents, in, out]`` (orthogonal, gain sqrt(2) hidden and ``out_gain`` last), zero biases,
    LayerNorm affines ``[agents, 1, features]``.
    """

    def __init__(self, agents: int, sizes: list[int], out_gain: float) -> None:
        super().__init__()
        self.norms = nn.ParameterList()
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            self.norms.extend(
                [nn.Parameter(torch.ones(agents, 1, fan_in)), nn.Parameter(torch.zeros(agents, 1, fan_in))]
            )
            weight = torch.empty(agents, fan_out, fan_in)
            gain = out_gain if i == len(sizes) - 2 else math.sqrt(2.0)
            for w in weight:
                nn.init.orthogonal_(w, gain=gain)
            self.weights.append(nn.Parameter(weight.transpose(1, 2).contiguous()))
            self.biases.append(nn.Parameter(torch.zeros(agents, 1, fan_out)))

    def forward(self, x: Tensor) -> Tensor:
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            if i:
                x = F.relu(x)
            x = torch.addcmul(self.norms[2 * i + 1], F.layer_norm(x, x.shape[-1:]), self.norms[2 * i])
            x = torch.baddbmm(bias, x, weight)
        return x


class Actor(nn.Module):
    """A Gaussian per agent with state-independent std ``sigmoid(log_std / x) * y``."""

    def __init__(self, agents: int, in_features: int, actions: int, config: Config) -> None:
        super().__init__()
        self.mlp = StackedMLP(agents, [in_features, config.hidden, config.hidden, actions], config.gain)
        self.log_std = nn.Parameter(torch.full((agents, 1, actions), config.std_x))
        self.std_x, self.std_y = config.std_x, config.std_y

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``[agents, rows, actions]`` and std ``[agents, 1, actions]``."""
        return self.mlp(x), torch.sigmoid(self.log_std / self.std_x) * self.std_y


def log_prob(mean: Tensor, std: Tensor, action: Tensor) -> Tensor:
    """Each agent's Gaussian log-probability ``[agents, rows]``."""
    return (-0.5 * ((action - mean) / std).square() - std.log() - LOG_SQRT_2PI).sum(-1)


class ValueNorm:
    """The paper code's ValueNorm per agent: debiased running mean and mean square, float64."""

    def __init__(self, agents: int, beta: float = 0.99999) -> None:
        self.beta = beta
        self.mean = torch.zeros(agents, 1, dtype=torch.float64)
        self.mean_sq = torch.zeros(agents, 1, dtype=torch.float64)
        self.debias = torch.zeros((), dtype=torch.float64)

    def update(self, target: Tensor) -> None:
        target = target.double()
        self.mean.mul_(self.beta).add_(target.mean(1, keepdim=True) * (1 - self.beta))
        self.mean_sq.mul_(self.beta).add_(target.square().mean(1, keepdim=True) * (1 - self.beta))
        self.debias.mul_(self.beta).add_(1 - self.beta)

    def mean_std(self) -> tuple[Tensor, Tensor]:
        debias = self.debias.clamp(min=1e-5)
        mean = self.mean / debias
        return mean.float(), (self.mean_sq / debias - mean.square()).clamp(min=1e-2).sqrt().float()


class FP3O:
    """The learner: NoPS actors, per-agent critics ``V(s, i)``, one fused Adam, FP3O's two phases."""

    def __init__(self, env: MaMuJoCoEnv, config: Config, seed: int) -> None:
        agents, self.config = env.n_agents, config
        self.ids = torch.eye(agents).unsqueeze(1)  # [agents, 1, agents], appended to every input
        self.actor = Actor(agents, env.max_obs_dim + agents, env.max_action_dim, config)
        self.critic = StackedMLP(agents, [env.state_size + agents, config.hidden, config.hidden, 1], 1.0)
        self.value_norm = ValueNorm(agents)
        self.optimizer = torch.optim.Adam(
            [
                {"params": list(self.actor.parameters()), "lr": config.actor_lr},
                {"params": list(self.critic.parameters()), "lr": config.critic_lr},
            ],
            eps=1e-5,
            fused=True,
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0  # minibatch steps taken

    def with_id(self, x: Tensor) -> Tensor:
        """``[rows, agents, f]`` (or ``[rows, f]``, alike for all agents) to ``[agents, rows, f + agents]``"""
        agents, rows = self.ids.shape[0], x.shape[0]
        x = x.transpose(0, 1) if x.dim() == 3 else x.expand(agents, *x.shape)
        return torch.cat([x, self.ids.expand(agents, rows, agents)], -1)

    @torch.no_grad()
    def act(self, observation: Tensor) -> Tensor:
        """Sampled actions ``[envs, agents, actions]`` for observations ``[envs, agents, obs]``."""
        mean, std = self.actor(self.with_id(observation))
        return torch.addcmul(mean, std, torch.randn(mean.shape)).transpose(0, 1)

    @torch.no_grad()
    def values(self, state: Tensor) -> Tensor:
        """Denormalised values ``[rows, agents]`` of states ``[rows, state]``."""
        mean, std = self.value_norm.mean_std()
        return (self.critic(self.with_id(state)).squeeze(-1) * std + mean).T

    @torch.no_grad()
    def batch(self, rollout: dict[str, Tensor]) -> dict[str, Tensor]:
        """The agent-major update batch: inputs, actions, GAE advantages (normalised per agent), targets."""
        c = self.config
        steps, envs = rollout["reward"].shape
        values = self.values(rollout["state"].flatten(0, 1)).reshape(steps + 1, envs, -1).numpy()
        reward, done = rollout["reward"].numpy(), rollout["done"].numpy()
        advantage = np.zeros_like(values[:-1])
        running = np.zeros_like(values[0])
        for t in reversed(range(steps)):  # "terminal" time limit: a truncation is not bootstrapped
            keep = 1.0 - done[t, :, None]
            delta = reward[t, :, None] + c.gamma * values[t + 1] * keep - values[t]
            running = delta + c.gamma * c.gae_lambda * keep * running
            advantage[t] = running
        target = torch.from_numpy(advantage + values[:-1]).flatten(0, 1).T  # [agents, rows]
        advantage = torch.from_numpy(advantage).flatten(0, 1).T
        mean, std = self.value_norm.mean_std()
        batch = {
            "actor_in": self.with_id(rollout["observation"].flatten(0, 1)),
            "critic_in": self.with_id(rollout["state"][:-1].flatten(0, 1)),
            "action": rollout["action"].flatten(0, 1).transpose(0, 1),
            "advantage": (advantage - advantage.mean(1, keepdim=True))
            / (advantage.std(1, unbiased=False, keepdim=True) + 1e-5),
            "value": (torch.from_numpy(values[:-1]).flatten(0, 1).T - mean) / std,
            "target": target,
        }
        batch["old_log_prob"] = log_prob(*self.actor(batch["actor_in"]), batch["action"])
        return batch

    def loss(self, mb: dict[str, Tensor], factor: Tensor | None) -> Tensor:
        """PPO-clip of every agent (Eq. 9, or Eq. 10 with ``factor``), entropy bonus and Huber value loss."""
        c = self.config
        mean, std = self.actor(mb["actor_in"])
        ratio = torch.exp(log_prob(mean, std, mb["action"]) - mb["old_log_prob"])
        advantage = mb["advantage"] if factor is None else mb["advantage"] * factor
        surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - c.clip, 1 + c.clip) * advantage)
        entropy = (0.5 + LOG_SQRT_2PI + std.log()).sum()  # each agent's, summed
        self.value_norm.update(mb["target"])
        norm_mean, norm_std = self.value_norm.mean_std()
        target = (mb["target"] - norm_mean) / norm_std
        value = self.critic(mb["critic_in"]).squeeze(-1)
        clipped = mb["value"] + (value - mb["value"]).clamp(-c.clip, c.clip)
        value_loss = torch.maximum(
            F.huber_loss(value, target, reduction="none", delta=c.huber_delta),
            F.huber_loss(clipped, target, reduction="none", delta=c.huber_delta),
        ).mean()
        return -surrogate.mean(1).sum() - c.entropy_coef * entropy + value_loss

    def step(self, mb: dict[str, Tensor], factor: Tensor | None) -> None:
        """One minibatch: backward, gradient clipping, Adam."""
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(mb, factor).backward()
        self.clip_gradients()
        self.optimizer.step()
        self.steps += 1

    def clip_gradients(self) -> None:
        """Per-agent clipping of the actors' gradients, global clipping of the critics'."""
        grads = [p.grad for p in self.actor.parameters()]
        agents = grads[0].shape[0]
        norm = torch.cat([g.reshape(agents, -1) for g in grads], 1).norm(dim=1)
        coef = (self.config.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, [coef.view(-1, *[1] * (g.dim() - 1)) for g in grads])
        nn.utils.clip_grad_norm_(self.critic.parameters(), self.config.max_grad_norm, foreach=True)

    def phase(self, batch: dict[str, Tensor], factor: Tensor | None) -> None:
        """``epochs x minibatches`` steps on shuffled slices of the batch."""
        c = self.config
        rows = batch["action"].shape[1]
        size = rows // c.minibatches
        data = dict(batch, factor=factor) if factor is not None else batch
        for _ in range(c.epochs):
            order = torch.randperm(rows, generator=self.generator)
            shuffled = {k: v.index_select(1, order) for k, v in data.items()}
            for start in range(0, rows, size):
                mb = {k: v[:, start : start + size] for k, v in shuffled.items()}
                self.step(mb, mb.get("factor"))

    def update(self, rollout: dict[str, Tensor]) -> None:
        """GAE, the independence phase, then the dependence phase where the gate allows it."""
        batch = self.batch(rollout)
        self.phase(batch, None)
        with torch.no_grad():
            log_ratio = log_prob(*self.actor(batch["actor_in"]), batch["action"]) - batch["old_log_prob"]
            factor = torch.exp(log_ratio.sum(0, keepdim=True) - log_ratio)  # the other agents' middle ratios
            ratio = torch.exp(log_ratio)
            gate = bool(
                (factor * ratio * batch["advantage"]).sum() + 1e-5 >= (ratio * batch["advantage"]).sum()
            )
        if gate:
            self.phase(batch, factor)


@dataclass
class Throughput:
    """Means over training iterations (without the first, warm-up, one when there are more)."""

    frames_per_second: float  # rollout, GAE and update
    collect_seconds: float
    update_seconds: float  # GAE and update
    policy_us_per_step: float  # the part of the collection spent in the policy, per step of all envs
    minibatch_steps: float  # per iteration: fewer than both phases' where FP3O's gate skipped one
    episode_return: float  # mean of the finished episodes, NaN if none finished


class Collector:
    """Steps the env with the learner's policy; keeps the observation and episode returns across rollouts."""

    def __init__(self, env: MaMuJoCoEnv, learner: FP3O) -> None:
        self.env, self.learner = env, learner
        self.td = env.reset()
        self.running = np.zeros(env.num_envs)

    def rollout(self, steps: int) -> tuple[dict[str, Tensor], float, list[float]]:
        """``steps`` steps: observations ``[T, envs, agents, obs]``, states ``[T + 1, envs, state]``, actions,
        rewards and dones ``[T, envs]``; the seconds spent in the policy; the returns of finished episodes."""
        env, td = self.env, self.td
        out = {
            "observation": torch.empty(steps, env.num_envs, env.n_agents, env.max_obs_dim),
            "state": torch.empty(steps + 1, env.num_envs, env.state_size),
            "action": torch.empty(steps, env.num_envs, env.n_agents, env.max_action_dim),
            "reward": torch.empty(steps, env.num_envs),
            "done": torch.empty(steps, env.num_envs),
        }
        policy, returns = 0.0, []
        for t in range(steps):
            start = time.perf_counter()
            observation = td.get(("agents", "observation"))
            action = self.learner.act(observation)
            td.set(("agents", "action"), action)
            policy += time.perf_counter() - start
            out["observation"][t], out["state"][t], out["action"][t] = observation, td.get("state"), action
            data, td = env.step_and_maybe_reset(td)
            reward, done = data.get(("next", "reward"))[:, 0], data.get(("next", "done"))[:, 0]
            out["reward"][t], out["done"][t] = reward, done
            self.running += reward.numpy()
            for i in np.flatnonzero(done.numpy()):
                returns.append(float(self.running[i]))
                self.running[i] = 0.0
        out["state"][steps] = td.get("state")
        self.td = td
        return out, policy, returns


def train(iterations: int, seed: int = 0, config: Config = Config()) -> Throughput:
    """Train for ``iterations`` iterations with one torch thread; the throughput of those after the first."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    env = MaMuJoCoEnv("HalfCheetah", "6x1", agent_obsk=config.agent_obsk, num_envs=config.num_envs, seed=seed)
    learner = FP3O(env, config, seed)
    collector = Collector(env, learner)
    times, returns, steps = [], [], [0]
    for _ in range(iterations):
        start = time.perf_counter()
        rollout, policy, finished = collector.rollout(config.rollout_length)
        collected = time.perf_counter()
        learner.update(rollout)
        times.append((collected - start, time.perf_counter() - collected, policy))
        steps.append(learner.steps)
        returns += finished
    env.close()
    collect, update, policy = (statistics.mean(t) for t in zip(*(times[1:] or times), strict=True))
    return Throughput(
        frames_per_second=config.num_envs * config.rollout_length / (collect + update),
        collect_seconds=collect,
        update_seconds=update,
        policy_us_per_step=1e6 * policy / config.rollout_length,
        minibatch_steps=(steps[-1] - steps[min(1, iterations - 1)]) / max(1, iterations - 1),
        episode_return=statistics.mean(returns) if returns else math.nan,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--iterations", type=int, default=4, help="training iterations (the first is warm-up)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = Config()
    result = train(args.iterations, args.seed, config)
    frames = config.num_envs * config.rollout_length
    print(f"\nhand-written FP3O, HalfCheetah 6x1 (agent_obsk {config.agent_obsk}), NoPS, torch threads=1")
    print(f"{args.iterations} iterations of {frames} frames, means without the first")
    print(f"{'training frames/s':<40} {result.frames_per_second:>10.0f}")
    print(f"{'  per iteration: collection (s)':<40} {result.collect_seconds:>10.2f}")
    print(f"{'  per iteration: GAE + update (s)':<40} {result.update_seconds:>10.2f}")
    print(f"{'  rollout policy (us per step)':<40} {result.policy_us_per_step:>10.0f}")
    print(f"{'  minibatch steps per iteration':<40} {result.minibatch_steps:>10.0f}")
    print(f"{'episode return (mean of finished)':<40} {result.episode_return:>10.1f}")


if __name__ == "__main__":
    main()
