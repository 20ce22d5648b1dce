"""The LightningModule: one ``training_step`` is one policy iteration (rollout, GAE, update)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule
from torch import Tensor
from torch.distributions import kl_divergence
from torchrl.collectors import Collector
from torchrl.envs import EnvBase, RewardSum, TransformedEnv
from torchrl.modules import IndependentNormal, ProbabilisticActor
from torchrl.objectives.value.functional import vec_generalized_advantage_estimate

from fp3o_lightning.envs import make_env
from fp3o_lightning.nets import (
    SHARING,
    CentralCritic,
    GaussianPolicy,
    ValueNormalizer,
    clip_grad_norm_per_agent,
)
from fp3o_lightning.objectives import (
    clipped_surrogate,
    explained_variance,
    huber_value_loss,
    normalize_advantage,
)
from fp3o_lightning.schemes import SCHEMES, make_scheme

OBSERVATION = ("agents", "observation")
ACTION = ("agents", "action")
LOG_PROB = ("agents", "action_log_prob")
LOC, SCALE = ("agents", "loc"), ("agents", "scale")
DEFAULT_ENV: dict[str, Any] = {
    "name": "mamujoco",
    "scenario": "HalfCheetah",
    "agent_conf": "6x1",
    "agent_obsk": 1,
}


class _Iterations:
    """The training 'dataloader': iteration indices, with a length so Lightning never prefetches.

    A length-less iterable makes Lightning fetch one item ahead; the rollout is collected inside
    ``training_step`` instead, so update ``k`` always trains on data from the policy after update ``k - 1``.
    """

    def __init__(self, module: FP3OModule) -> None:
        self.module = module

    def __len__(self) -> int:
        return max(self.module.num_iterations - self.module.iteration, 0)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.module.iteration, self.module.num_iterations))


class FP3OModule(L.LightningModule):
    """Cooperative multi-agent PPO with the FP3O update (or a baseline scheme) in manual optimisation.

    Args:
        env: environment name and keyword arguments for ``fp3o_lightning.envs.make_env``.
        num_envs: environments stepped in parallel (the paper's rollout threads).
        rollout_length: steps per environment per iteration (the paper's episode length).
        total_frames: environment frames to train for (summed over all DDP processes).
        algorithm: the update scheme, one of ``SCHEMES``.
        sharing: network type, ``fups`` (full), ``paps`` (partial) or ``nops`` (no parameter sharing).
        actor_lr, critic_lr: Adam learning rates (eps 1e-5).
        gamma, gae_lambda: discount and GAE lambda.
        clip_epsilon: PPO clip range (also the value clip range when ``value_clip``).
        ppo_epochs, num_minibatches: passes over the batch and minibatches per pass, per phase.
        entropy_coef: entropy bonus weight.
        max_grad_norm: gradient-norm clip (per agent network with ``nops``).
        huber_delta: delta of the critic's Huber loss.
        value_clip: clip the value update around the rollout's value, as the paper's code does.
        hidden_size, depth: width and number of hidden layers of actor and critic.
        gain: orthogonal-init gain of the policy's output layer.
        std_x_coef, std_y_coef: the policy std is ``sigmoid(log_std / x) * y``.
        seed: seeds parameters, environments (offset by process rank) and the scheme's generator.
    """

    def __init__(
        self,
        env: dict[str, Any] | None = None,
        num_envs: int = 4,
        rollout_length: int = 1000,
        total_frames: int = 10_000_000,
        algorithm: str = "fp3o",
        sharing: str = "nops",
        actor_lr: float = 1e-5,
        critic_lr: float = 3e-4,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        clip_epsilon: float = 0.2,
        ppo_epochs: int = 5,
        num_minibatches: int = 32,
        entropy_coef: float = 0.001,
        max_grad_norm: float = 10.0,
        huber_delta: float = 10.0,
        value_clip: bool = True,
        hidden_size: int = 64,
        depth: int = 2,
        gain: float = 0.01,
        std_x_coef: float = 1.0,
        std_y_coef: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hparams.env = env = dict(DEFAULT_ENV if env is None else env)
        self._validate()
        self.automatic_optimization = False
        L.seed_everything(seed, verbose=False)
        probe = make_env(**env, num_envs=1)
        self.n_agents = probe.n_agents
        observation_size = probe.observation_spec[OBSERVATION].shape[-1]
        action_size = probe.full_action_spec[ACTION].shape[-1]
        state_size = probe.observation_spec["state"].shape[-1]
        action_sizes = probe.action_sizes
        probe.close()
        self.policy = GaussianPolicy(
            self.n_agents,
            observation_size,
            action_size,
            sharing=sharing,
            hidden_size=hidden_size,
            depth=depth,
            gain=gain,
            std_x_coef=std_x_coef,
            std_y_coef=std_y_coef,
            action_sizes=action_sizes,
        )
        self.critic = CentralCritic(state_size, hidden_size=hidden_size, depth=depth)
        self.value_normalizer = ValueNormalizer()
        self.scheme = make_scheme(algorithm)
        self.generator = torch.Generator().manual_seed(seed)
        self.iteration = 0
        self.frames = 0
        self._collector: Collector | None = None

    def _validate(self) -> None:
        """Reject invalid hyperparameters with the field, the value and the fix."""
        hp = self.hparams
        positive = ("num_envs", "rollout_length", "total_frames", "actor_lr", "critic_lr", "clip_epsilon")
        positive += ("ppo_epochs", "num_minibatches", "max_grad_norm", "huber_delta", "hidden_size")
        for name in positive:
            if not hp[name] > 0:
                raise ValueError(f"model.{name}={hp[name]!r} must be > 0")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= hp[name] <= 1.0:
                raise ValueError(f"model.{name}={hp[name]!r} must lie in [0, 1]")
        if hp.sharing not in SHARING:
            raise ValueError(f"model.sharing={hp.sharing!r} is not a network type; choose one of {SHARING}")
        if hp.algorithm not in SCHEMES:
            raise ValueError(f"model.algorithm={hp.algorithm!r} is unknown; choose one of {tuple(SCHEMES)}")
        batch = hp.num_envs * hp.rollout_length
        if batch % hp.num_minibatches:
            raise ValueError(
                f"model.num_minibatches={hp.num_minibatches} does not divide the batch of "
                f"num_envs x rollout_length = {batch}; pick a divisor of {batch}"
            )

    # ------------------------------------------------------------------ setup

    @property
    def frames_per_batch(self) -> int:
        return self.hparams.num_envs * self.hparams.rollout_length

    @property
    def num_iterations(self) -> int:
        """Iterations needed for ``total_frames`` frames, collected by every process."""
        world = self.trainer.world_size if self._trainer is not None else 1
        return math.ceil(self.hparams.total_frames / (self.frames_per_batch * world))

    def make_actor(self) -> ProbabilisticActor:
        """The policy as a TorchRL actor: writes action, its log-prob and the Gaussian's loc/scale."""
        module = TensorDictModule(self.policy, in_keys=[OBSERVATION], out_keys=[LOC, SCALE])
        return ProbabilisticActor(
            module,
            in_keys={"loc": LOC, "scale": SCALE},
            out_keys=[ACTION],
            distribution_class=IndependentNormal,
            return_log_prob=True,
            log_prob_key=LOG_PROB,
        )

    def make_env(self, seed: int) -> EnvBase:
        env = make_env(**self.hparams.env, num_envs=self.hparams.num_envs)
        env = TransformedEnv(env, RewardSum(in_keys=["reward"], out_keys=["episode_reward"]))
        env.set_seed(seed)
        return env

    def on_fit_start(self) -> None:
        """Build the collector once the module is on its device; seeds are offset by global rank."""
        seed = self.hparams.seed + 1000 * self.global_rank
        L.seed_everything(seed, verbose=False)  # action sampling draws from the global generator
        env = self.make_env(seed)
        self._collector = Collector(
            env,
            self.make_actor(),
            frames_per_batch=self.frames_per_batch,
            total_frames=-1,
            env_device="cpu",
            policy_device=self.device,
            storing_device=self.device,
            auto_register_policy_transforms=False,
        )
        self._rollouts = iter(self._collector)

    def on_fit_end(self) -> None:
        if self._collector is not None:
            self._collector.shutdown()
            self._collector = None

    def train_dataloader(self) -> _Iterations:
        return _Iterations(self)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.Adam(self.policy.parameters(), lr=self.hparams.actor_lr, eps=1e-5),
            torch.optim.Adam(self.critic.parameters(), lr=self.hparams.critic_lr, eps=1e-5),
        ]

    # ------------------------------------------------------------------ iteration

    def training_step(self, iteration: int, batch_idx: int) -> None:
        start = time.perf_counter()
        rollout = next(self._rollouts)
        batch, value_explained = self.compute_advantages(rollout)
        stats = self.scheme.update(self, batch)
        stats["explained_variance"] = value_explained
        self._collector.update_policy_weights_()
        self.iteration += 1
        self.frames += rollout.numel() * self.trainer.world_size
        stats["kl_old_new"] = self.kl_from_rollout(batch, self.policy.distribution(batch[OBSERVATION]))
        stats["fps"] = torch.tensor(rollout.numel() / (time.perf_counter() - start))
        self.log_iteration(rollout, stats)

    @torch.no_grad()
    def compute_advantages(self, rollout: TensorDictBase) -> tuple[TensorDictBase, Tensor]:
        """GAE on the team reward with value-normaliser-aware values; bootstraps on truncation.

        Returns the flat batch the update schemes consume (see ``UpdateScheme``) and the
        explained variance of the critic's values before the update.
        """
        value = self.critic(rollout["state"])
        denormalized_value = self.value_normalizer.denormalize(value)
        next_value = self.value_normalizer.denormalize(self.critic(rollout["next", "state"]))
        advantage, target = vec_generalized_advantage_estimate(
            self.hparams.gamma,
            self.hparams.gae_lambda,
            denormalized_value,
            next_value,
            rollout["next", "reward"],
            done=rollout["next", "done"],
            terminated=rollout["next", "terminated"],
        )
        moments = (
            self.all_reduce_sum(torch.stack([target.mean(), target.pow(2).mean()])) / self.trainer.world_size
        )
        self.value_normalizer.update(*moments)
        batch = TensorDict(
            {
                OBSERVATION: rollout[OBSERVATION],
                ACTION: rollout[ACTION],
                LOG_PROB: rollout[LOG_PROB],
                LOC: rollout[LOC],
                SCALE: rollout[SCALE],
                "state": rollout["state"],
                "advantage": normalize_advantage(advantage),
                "value": value,
                "value_target": self.value_normalizer.normalize(target),
            },
            batch_size=rollout.batch_size,
        )
        return batch.reshape(-1), explained_variance(denormalized_value, target)

    def ppo_phase(self, batch: TensorDictBase, factor: Tensor | None = None) -> dict[str, Tensor]:
        """``ppo_epochs x num_minibatches`` steps of PPO-clip on every agent, and of the critic.

        ``factor`` (``[B, n_agents]``, detached) weights each agent's clipped surrogate; ``None``
        is factor 1. Returns, without host syncs: per agent, the mean ``|r - 1|`` over the batch when
        the phase starts (``ratio_deviation_start``; 0 means the phase starts at the rollout policy)
        and the clip fraction; and the mean losses and entropy.
        """
        hp = self.hparams
        with torch.no_grad():
            start_log_prob = self.policy.distribution(batch[OBSERVATION]).log_prob(batch[ACTION])
            ratio_deviation_start = (torch.exp(start_log_prob - batch[LOG_PROB]) - 1.0).abs().mean(0)
        actor_optimizer, critic_optimizer = self.optimizers()
        size = batch.numel() // hp.num_minibatches
        # Mean over agents for shared networks (as the paper's code concatenates agents), sum of
        # per-agent means for NoPS (each agent's gradient equals that of its own PPO loss).
        agent_weight = 1.0 if self.policy.per_agent_parameters else 1.0 / self.n_agents
        totals = torch.zeros(3, device=self.device)
        clipped = torch.zeros(self.n_agents, device=self.device)
        for _ in range(hp.ppo_epochs):
            order = torch.randperm(batch.numel(), generator=self.generator).to(self.device)
            for index in order.view(hp.num_minibatches, size):
                minibatch = batch[index]
                distribution = self.policy.distribution(minibatch[OBSERVATION])
                log_prob = distribution.log_prob(minibatch[ACTION])
                surrogate = clipped_surrogate(
                    log_prob,
                    minibatch[LOG_PROB],
                    minibatch["advantage"],
                    hp.clip_epsilon,
                    None if factor is None else factor[index],
                )
                entropy = distribution.entropy().mean(0).sum() * agent_weight
                policy_loss = -surrogate.mean(0).sum() * agent_weight
                value_loss = huber_value_loss(
                    self.critic(minibatch["state"]),
                    minibatch["value"],
                    minibatch["value_target"],
                    hp.huber_delta,
                    hp.clip_epsilon if hp.value_clip else None,
                )
                actor_optimizer.zero_grad()
                critic_optimizer.zero_grad()
                # Actor and critic graphs are disjoint: one backward serves both optimisers.
                self.manual_backward(policy_loss - hp.entropy_coef * entropy + value_loss)
                if self.policy.per_agent_parameters:
                    clip_grad_norm_per_agent(self.policy.parameters(), hp.max_grad_norm)
                else:
                    torch.nn.utils.clip_grad_norm_(self.policy.parameters(), hp.max_grad_norm)
                torch.nn.utils.clip_grad_norm_(self.critic.parameters(), hp.max_grad_norm)
                actor_optimizer.step()
                critic_optimizer.step()
                with torch.no_grad():
                    ratio = torch.exp(log_prob - minibatch[LOG_PROB])
                    clipped += ((ratio - 1.0).abs() > hp.clip_epsilon).float().mean(0)
                    totals += torch.stack([policy_loss, value_loss, entropy]).detach()
        steps = hp.ppo_epochs * hp.num_minibatches
        policy_loss, value_loss, entropy = totals / steps
        return {
            "ratio_deviation_start": ratio_deviation_start,
            "clip_fraction": clipped / steps,
            "policy_loss": policy_loss,
            "value_loss": value_loss,
            "entropy": entropy,
        }

    @torch.no_grad()
    def kl_from_rollout(self, batch: TensorDictBase, distribution: IndependentNormal) -> Tensor:
        """Per-agent mean KL(rollout policy || ``distribution``) over the batch, exact for Gaussians."""
        old = IndependentNormal(batch[LOC], batch[SCALE])
        return kl_divergence(old, distribution).mean(0)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum across DDP processes (identity on one device)."""
        if self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    # ------------------------------------------------------------------ logging

    def log_iteration(self, rollout: TensorDictBase, stats: dict[str, Tensor]) -> None:
        """Log one iteration to every logger, with the environment frame count as the step.

        Scalars go under ``train/``; per-agent vectors under ``agent_<i>/``; the non-overlapping
        selection under ``selection/``. One host sync for everything.
        """
        done = rollout["next", "done"]
        returns = rollout["next", "episode_reward"][done]
        metrics: dict[str, float] = {
            "train/frames": float(self.frames),
            "train/iteration": float(self.iteration),
        }
        if returns.numel():
            metrics["train/episode_return"] = returns.mean().item()
            metrics["train/episodes"] = float(returns.numel())
        for key, value in stats.items():
            value = value.detach().float().cpu()
            if key in ("separated_agent", "selected_agent"):
                metrics.update({f"selection/{key}_{p}": float(v) for p, v in enumerate(value)})
            elif value.dim() == 0:
                metrics[f"train/{key}"] = float(value)
            else:
                metrics.update({f"agent_{i}/{key}": float(v) for i, v in enumerate(value)})
                metrics[f"train/{key}"] = float(value.mean())
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.frames)
        if "train/episode_return" in metrics:
            self.log("return", metrics["train/episode_return"], prog_bar=True, logger=False)
        self.log("frames", float(self.frames), prog_bar=True, logger=False)

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["fp3o"] = {
            "iteration": self.iteration,
            "frames": self.frames,
            "generator": self.generator.get_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("fp3o", {})
        self.iteration = state.get("iteration", 0)
        self.frames = state.get("frames", 0)
        if "generator" in state:
            self.generator.set_state(state["generator"])
