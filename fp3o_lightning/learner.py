"""The PPO mechanics every update scheme uses: GAE, the policy on an update batch, the minibatch loss and
the ``ppo_epochs x num_minibatches`` optimiser steps of one phase.

The LightningModule owns the networks, the optimisers and the Lightning glue (backward under the
Trainer's strategy and precision, the DDP all-reduce); it hands them to a :class:`PPOLearner`, which the
schemes (FP3O's phases, HAPPO's sequence, MAPPO's single phase) drive. Nothing here imports the module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from tensordict import TensorDictBase
from torch import Tensor
from torch.distributions import kl_divergence
from torchrl.objectives.value.functional import vec_generalized_advantage_estimate

from fp3o_lightning.keys import (
    ACTION,
    ACTION_MASK,
    ALIVE,
    CRITIC_HIDDEN,
    HIDDEN,
    IS_INIT,
    LOG_PROB,
    OBSERVATION,
)
from fp3o_lightning.nets import Critic, MultiAgentPolicy, ValueNormalizer
from fp3o_lightning.objectives import (
    active_mean,
    clipped_surrogate,
    explained_variance,
    huber_value_loss,
    normalize_advantage,
)
from fp3o_lightning.optim import AgentFreezer, clip_gradients, skip_step_unless_finite

Minibatch = Mapping[Any, Tensor]
"""A minibatch as a plain mapping of the update batch's leaf keys (nested ones as tuples) to tensors."""


def split_minibatches(batch: TensorDictBase, index: Tensor, size: int) -> list[Minibatch]:
    """``batch``'s rows at ``index``, in slices of ``size`` rows, as plain mappings.

    One gather per key and epoch. Plain mappings rather than TensorDicts because a minibatch step reads
    a dozen keys: a TensorDict lookup costs microseconds each, and under ``torch.compile`` its structure
    adds guards that every call checks, against a dict's handful.
    """
    leaves = {key: value[index].split(size) for key, value in batch.items(True, True)}
    return [dict(zip(leaves, parts, strict=True)) for parts in zip(*leaves.values(), strict=True)]


def compile_options(device: torch.device) -> dict[str, bool] | None:
    """``torch.compile``'s options for the minibatch loss on ``device``: the defaults on the CPU. On CUDA,
    CUDA graphs (the ``reduce-overhead`` mode's one option): the forward and backward graphs are captured
    and replayed, one launch each instead of dozens of kernels of the paper's small networks. And no
    mix-order reduction, Inductor's fused kernel for a norm's backward (on by default since torch 2.10):
    it returned a [256] gradient for a [1, 1, 256] parameter (FuPS MAPPO on VMAS balance, 51,200 rows a
    minibatch, torch 2.11 on an H200; pytorch/pytorch#178080), and it has computed wrong gradients
    silently (pytorch/pytorch#193061). A flag, not a mode: ``torch.compile`` takes one or the other.
    """
    if device.type != "cuda":
        return None
    from torch._inductor import config  # torch.compile's own, imported when it compiles anyway

    options = {"triton.cudagraphs": True}
    if hasattr(config.triton, "mix_order_reduction"):  # torch >= 2.10
        options["triton.mix_order_reduction"] = False
    return options


class PPOLearner:
    """PPO-clip on the agents' policy and the critic, for one module's networks and optimisers.

    Args:
        policy, critic, value_normalizer: the networks (owned, and checkpointed, by the module).
        hparams: the module's hyperparameters (the update's: ``clip_epsilon``, ``ppo_epochs``,
            ``num_minibatches``, ``entropy_coef``, ``max_grad_norm``, ``huber_delta``, ``value_clip``,
            ``compile_update``, ``gamma``, ``gae_lambda``, ``time_limit``).
        param_keys: the rollout's keys of the action distribution's parameters.
        critic_keys: the critic's inputs, concatenated per agent (``"state"`` and/or the observation).
        alive: leave dead agents (``("agents", "alive")``) out of the policy loss and entropy.
        masked: the batch carries an action mask.
        chunk_length: steps per replayed sequence (1 unless a network is recurrent).
        value_norm_folds: how many times the value normaliser folds in each minibatch's targets before
            its value loss (2 as the paper's code, whose value loss normalises the targets twice); 0: once
            per iteration, on the whole batch, in :meth:`compute_advantages`.
        generator: the seeded generator of minibatch orders (and of the schemes' agent orders).
        optimizer: the one optimiser of the actors and the critic (Lightning's wrapper).
        backward: backpropagates a loss under the Trainer's strategy and precision.
        all_reduce_sum, world_size: the sum over DDP processes and their number.
    """

    def __init__(
        self,
        policy: MultiAgentPolicy,
        critic: Critic,
        value_normalizer: ValueNormalizer,
        hparams: Any,
        *,
        param_keys: Sequence[Any],
        critic_keys: Sequence[Any],
        alive: bool,
        masked: bool,
        chunk_length: int,
        value_norm_folds: int,
        generator: torch.Generator,
        optimizer: Callable[[], LightningOptimizer],
        backward: Callable[[Tensor], None],
        all_reduce_sum: Callable[[Tensor], Tensor],
        world_size: Callable[[], int],
    ) -> None:
        self.policy, self.critic, self.value_normalizer = policy, critic, value_normalizer
        self.hparams = hparams
        self.param_keys, self.critic_keys = tuple(param_keys), tuple(critic_keys)
        self.alive, self.masked, self.chunk_length, self.generator = alive, masked, chunk_length, generator
        self.value_norm_folds = value_norm_folds
        self.optimizer, self.backward = optimizer, backward
        self.all_reduce_sum, self.world_size = all_reduce_sum, world_size
        self.n_agents = policy.n_agents
        # Parameter lists taken once (they keep their identity when the module changes device).
        self.clipped = {
            network: (list(network.parameters()), network.per_agent_parameters)
            for network in (policy, critic)
        }
        self._compiled_loss: Any = None
        #: A recurrent critic's hidden state after the last rollout ``[num_envs, rows, hidden]``.
        self.critic_hidden: Tensor | None = None
        self.reset_counters()

    @property
    def device(self) -> torch.device:
        return self.policy.agent_id.device

    def reset_counters(self) -> None:
        """Zero the counts of minibatch steps and of skipped non-finite ones (once per iteration)."""
        self.skipped = torch.zeros(2, device=self.device)  # non-finite [losses, gradients]
        self.steps = 0

    def critic_inputs(self, tensordict: TensorDictBase | Minibatch) -> Tensor:
        """The critic's input: its one key, or the state beside each agent's observation."""
        if len(self.critic_keys) == 1:
            return tensordict[self.critic_keys[0]]
        state, observation = tensordict["state"], tensordict[OBSERVATION]
        state = state.unsqueeze(-2).expand(*observation.shape[:-1], state.shape[-1])
        return torch.cat([state, observation], -1)

    def values(self, tensordict: TensorDictBase | Minibatch) -> Tensor:
        """Critic values in normalised units, ``[..., 1]`` (team) or ``[..., n_agents]`` (per agent).

        A recurrent critic reads a flat update batch (or minibatch) as sequences of ``chunk_length``
        steps and replays each from the hidden state stored at its first step, as the actor does.
        """
        inputs = self.critic_inputs(tensordict)
        if not self.critic.recurrent:
            return self.critic(inputs)

        def chunks(x: Tensor) -> Tensor:
            return x.reshape(-1, self.chunk_length, *x.shape[1:])

        hidden = chunks(tensordict[CRITIC_HIDDEN])[:, 0]
        value, _ = self.critic.sequence(chunks(inputs), hidden, chunks(tensordict[IS_INIT]))
        return value.flatten(0, 1)

    def rollout_values(self, rollout: TensorDictBase) -> tuple[Tensor, Tensor, Tensor]:
        """A recurrent critic along a rollout ``[num_envs, T]``, from the hidden state the previous
        rollout left (as the paper's code steps it while collecting): the values, the values of each
        step's next observation (from the hidden state after the step) and the hidden state entering
        each step. The hidden state after the last step is kept for the next rollout
        (``critic_hidden``, checkpointed with the collector's state)."""
        shape = (rollout.shape[0], self.critic.n_rows, self.critic.hidden_size)
        start = self.critic_hidden
        if start is None or start.shape != shape:  # the first rollout (it starts with a reset)
            start = torch.zeros(shape, device=self.device)
        value, after = self.critic.sequence(self.critic_inputs(rollout), start, rollout[IS_INIT])
        next_value, _ = self.critic(self.critic_inputs(rollout["next"]), after)
        self.critic_hidden = after[:, -1]
        return value, next_value, torch.cat([start.unsqueeze(1), after[:, :-1]], 1)

    @torch.no_grad()
    def compute_advantages(self, rollout: TensorDictBase) -> tuple[TensorDictBase, Tensor]:
        """GAE on the team reward with value-normaliser-aware values, per value the critic gives
        (one for the team, or one per agent).

        The time limit ends an episode like a termination with ``time_limit="terminal"`` and is
        bootstrapped from the next value with ``"bootstrap"``; a termination never is. Returns the
        flat batch the update schemes consume (see ``UpdateScheme``) and the explained variance of
        the critic's values before the update.
        """
        if self.critic.recurrent:
            value, next_value, critic_hidden = self.rollout_values(rollout)
        else:
            value, next_value = self.values(rollout), self.values(rollout["next"])
        denormalized_value = self.value_normalizer.denormalize(value)
        next_value = self.value_normalizer.denormalize(next_value)
        width = value.shape[-1]  # one team value, or one value per agent
        done = rollout["next", "done"]
        terminated = done if self.hparams.time_limit == "terminal" else rollout["next", "terminated"]
        advantage, target = vec_generalized_advantage_estimate(
            self.hparams.gamma,
            self.hparams.gae_lambda,
            denormalized_value,
            next_value,
            rollout["next", "reward"].expand_as(value),
            done=done.expand(*value.shape[:-1], width),
            terminated=terminated.expand(*value.shape[:-1], width),
        )
        if not self.value_norm_folds:
            self.update_value_normalizer(target)
        keys = [OBSERVATION, ACTION, "state"] + [ACTION_MASK] * self.masked + [ALIVE] * self.alive
        recurrent = self.policy.recurrent or self.critic.recurrent
        keys += [HIDDEN] * self.policy.recurrent + [IS_INIT] * recurrent
        batch = rollout.select(*keys)
        if self.critic.recurrent:
            batch[CRITIC_HIDDEN] = critic_hidden
        batch["advantage"] = normalize_advantage(advantage)  # = normalised target - denormalized_value
        batch["value"] = value
        batch["value_target"] = target
        # [num_envs, rollout_length] -> flat, environment-major: consecutive runs of chunk_length
        # samples are the sequences a recurrent actor (and critic) replays.
        batch = batch.reshape(-1)
        # As the paper's code does, the old policy's log-probs are recomputed on the whole flat
        # batch: the collector computed them step by step, in other batch shapes, which rounds
        # differently (~1e-7). Every update then starts from a ratio of exactly 1.
        params = self.distribution_params(batch)
        batch.update(dict(zip(self.param_keys, params, strict=True)))
        batch[LOG_PROB] = self.policy.log_prob(params, batch[ACTION], batch.get(ACTION_MASK))
        return batch, explained_variance(denormalized_value, target)

    def update_value_normalizer(self, target: Tensor, times: int = 1) -> None:
        """Fold value targets (denormalised) into the value normaliser ``times`` times, averaged over DDP
        processes."""
        moments = self.value_normalizer.moments(target)
        world_size = self.world_size()
        if world_size > 1:
            moments = self.all_reduce_sum(moments) / world_size
        self.value_normalizer.update(moments, times)

    @torch.no_grad()
    def recompute_advantages(self, batch: TensorDictBase) -> None:
        """The batch's advantages again, from its returns and rollout values under the value normaliser
        as it is now, normalised per agent: ``normalize(value_target - denormalize(value))``, as the
        paper's code computes them at the start of each phase (its statistics move while the critic
        trains)."""
        advantage = batch["value_target"] - self.value_normalizer.denormalize(batch["value"])
        batch["advantage"] = normalize_advantage(advantage)

    def distribution_params(self, batch: TensorDictBase | Minibatch) -> tuple[Tensor, ...]:
        """The current policy's distribution parameters on a flat update batch (or a minibatch of
        whole sequences)."""
        return self.policy.batch_params(
            batch[OBSERVATION],
            batch.get(ACTION_MASK),
            batch.get(HIDDEN),
            batch.get(IS_INIT),
            self.chunk_length,
        )

    @torch.no_grad()
    def measure(self, batch: TensorDictBase) -> tuple[Tensor, Tensor]:
        """The current policy's log-probs of the batch's actions and KL(rollout policy || current).

        Both ``[B, n_agents]``, on the whole batch, without gradients (KL exact for Gaussians).
        """
        params, mask = self.distribution_params(batch), batch.get(ACTION_MASK)
        old = self.policy.make_distribution([batch[k] for k in self.param_keys], mask)
        kl = kl_divergence(old, self.policy.make_distribution(params, mask))
        return self.policy.log_prob(params, batch[ACTION], mask), kl

    def minibatch_loss(
        self,
        minibatch: Minibatch,
        factor: Tensor | None,
        agent_weight: Tensor | None,
        train_actor: bool,
        train_critic: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """The loss of one minibatch step of :meth:`ppo_phase` and its parts.

        ``agent_weight [n_agents]`` weighs each agent's policy loss and entropy (``None``: 1 each).
        Returns the loss to minimise (policy loss, minus the entropy bonus, plus the value loss) and
        its policy loss, entropy and value loss (0 for a network not trained), and the current
        log-probs ``[B, n_agents]`` (``None`` when the actors are not trained).
        """
        hp = self.hparams
        zero = torch.zeros((), device=self.device)
        policy_loss = entropy = value_loss = zero
        log_prob = None
        if train_actor:
            params, mask = self.distribution_params(minibatch), minibatch.get(ACTION_MASK)
            log_prob = self.policy.log_prob(params, minibatch[ACTION], mask)
            surrogate = clipped_surrogate(
                log_prob, minibatch[LOG_PROB], minibatch["advantage"], hp.clip_epsilon, factor
            )
            alive = minibatch.get(ALIVE) if self.alive else None
            shared = not self.policy.per_agent_parameters
            surrogate = active_mean(surrogate, alive, shared)
            entropy = active_mean(self.policy.entropy(params, mask), alive, shared)
            if agent_weight is not None:
                surrogate, entropy = surrogate * agent_weight, entropy * agent_weight
            policy_loss, entropy = -surrogate.sum(), entropy.sum()
        if train_critic:
            value_loss = huber_value_loss(
                self.values(minibatch),
                minibatch["value"],
                self.value_normalizer.normalize(minibatch["value_target"]),
                hp.huber_delta,
                hp.clip_epsilon if hp.value_clip else None,
            )
        loss = policy_loss - hp.entropy_coef * entropy + value_loss
        return loss, policy_loss, entropy, value_loss, log_prob

    def compiled_minibatch_loss(self) -> Any:
        """:meth:`minibatch_loss` compiled by ``torch.compile`` (once per process, at first use), with
        :func:`compile_options` for the device."""
        if self._compiled_loss is None:
            options = compile_options(self.device)
            self._compiled_loss = torch.compile(self.minibatch_loss, dynamic=False, options=options)
        return self._compiled_loss

    def ppo_phase(
        self,
        batch: TensorDictBase,
        factor: Tensor | None = None,
        agents: Tensor | None = None,
        train_actor: bool = True,
        train_critic: bool = True,
    ) -> dict[str, Tensor]:
        """``ppo_epochs x num_minibatches`` steps of PPO-clip on the agents, and of the critic.

        Args:
            batch: the flat update batch (see ``UpdateScheme``).
            factor: ``[B, n_agents]``, detached, weights each agent's clipped surrogate; ``None`` is 1.
            agents: bool ``[n_agents]``, the agents whose surrogate is optimised (``None``: all).
                With stacked per-agent parameters the others do not move, Adam moments included.
            train_actor, train_critic: which networks this phase trains.

        Returns the per-agent clip fractions, mean policy loss and entropy (when training the
        actors) and the mean value loss (when training the critic), without host syncs.
        """
        hp = self.hparams
        optimizer = self.optimizer()
        chunk = self.chunk_length
        sequences = batch.numel() // chunk
        steps = torch.arange(chunk, device=self.device)
        # Mean over agents for shared networks (as the paper's code concatenates agents), sum of
        # per-agent means for NoPS (each agent's gradient equals that of its own PPO loss).
        # (None: 1 for every agent, two multiplications less per minibatch.)
        agent_weight = None
        if agents is not None or not self.policy.per_agent_parameters:
            mask = torch.ones(self.n_agents, device=self.device) if agents is None else agents.float()
            agent_weight = mask if self.policy.per_agent_parameters else mask / mask.sum()
        freezer = None
        if train_actor and agents is not None and not bool(agents.all()):
            freezer = AgentFreezer(self.policy.stacked_parameters(), optimizer.optimizer, ~agents)
        if self.skipped.device != self.device:  # the module moved since the last reset
            self.reset_counters()
        minibatch_loss = self.compiled_minibatch_loss() if hp.compile_update else self.minibatch_loss
        # The parameters (and whether clipped per agent) of each network this phase trains.
        trained = [
            self.clipped[network] for network in [self.policy] * train_actor + [self.critic] * train_critic
        ]
        # Every step's statistics, reduced once at the end of the phase rather than step by step.
        losses, found_infs, log_ratios = [], [], []
        size = batch.numel() // hp.num_minibatches
        for _ in range(hp.ppo_epochs):
            order = torch.randperm(sequences, generator=self.generator).to(self.device)
            # Shuffled whole sequences, gathered once per epoch; minibatches are slices of them.
            index = (order.unsqueeze(-1) * chunk + steps).reshape(-1)
            minibatches = split_minibatches(batch, index, size)
            factors = [None] * len(minibatches) if factor is None else factor[index].split(size)
            for minibatch, minibatch_factor in zip(minibatches, factors, strict=True):
                if train_critic and self.value_norm_folds:
                    self.update_value_normalizer(minibatch["value_target"], self.value_norm_folds)
                if hp.compile_update and self.device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
                loss, policy_loss, entropy, value_loss, log_prob = minibatch_loss(
                    minibatch,
                    minibatch_factor,
                    agent_weight,
                    train_actor,
                    train_critic,
                )
                # The network a phase does not train keeps gradients of None, which Adam skips.
                optimizer.zero_grad()
                self.backward(loss)
                norms = [
                    clip_gradients(parameters, hp.max_grad_norm, per_agent)
                    for parameters, per_agent in trained
                ]
                # A non-finite gradient has a non-finite norm: such a step changes nothing. Gradients are
                # all-reduced under DDP, so every process takes the same decision.
                found_infs.append(skip_step_unless_finite(optimizer.optimizer, norms))
                optimizer.step()
                if freezer is not None:
                    freezer.restore()
                if train_actor:
                    log_ratios.append(log_prob.detach() - minibatch[LOG_PROB])
                losses.append(torch.stack([loss, policy_loss, value_loss, entropy]).detach())
        self.steps += len(losses)
        parts = torch.stack(losses)
        self.skipped += torch.stack([(~parts[:, 0].isfinite()).sum(), torch.stack(found_infs).sum()])
        policy_loss, value_loss, entropy = parts[:, 1:].nan_to_num().mean(0)
        stats: dict[str, Tensor] = {}
        if train_actor:
            outside = (torch.stack(log_ratios).exp() - 1.0).abs() > hp.clip_epsilon
            stats |= {"clip_fraction": outside.float().mean((0, 1))}
            stats |= {"policy_loss": policy_loss, "entropy": entropy}
        if train_critic:
            stats["value_loss"] = value_loss
        return stats
