"""The LightningModule: one ``training_step`` is one policy iteration (rollout, GAE, update)."""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Literal, get_args

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.strategies import DDPStrategy
from tensordict import TensorDict, TensorDictBase
from torch import Tensor
from torchrl.collectors import Collector
from torchrl.data import Categorical, Unbounded
from torchrl.envs import Compose, EnvBase, InitTracker, TensorDictPrimer, TransformedEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type

from fp3o_lightning import diagnostics
from fp3o_lightning.actor import RolloutActor
from fp3o_lightning.callbacks import BestEvalCheckpoint, GracefulStop, IterationCheckpoint
from fp3o_lightning.envs import env_class, make_env, task_name
from fp3o_lightning.envs.options import validate_env
from fp3o_lightning.errors import ConfigError
from fp3o_lightning.keys import (
    ACTION,
    ACTION_MASK,
    ALIVE,
    HIDDEN,
    LOC,
    LOGITS,
    OBSERVATION,
    SCALE,
)
from fp3o_lightning.learner import PPOLearner
from fp3o_lightning.nets import (
    AgentCritic,
    CentralCritic,
    MultiAgentPolicy,
    ValueNormalizer,
)
from fp3o_lightning.schemes import make_scheme

# The enumerated options, as types: the parser rejects other values and `fp3o fit --help` lists them.
Algorithm = Literal["fp3o", "happo", "mappo", "ippo"]  # SCHEMES' names
Sharing = Literal["fups", "paps", "nops"]  # nets.SHARING
ActorNetwork = Literal["mlp", "rnn"]  # nets.ACTOR_NETWORKS
CriticNetwork = Literal["auto", "mlp", "rnn"]
TimeLimit = Literal["terminal", "bootstrap"]
CriticKind = Literal["agent", "team"]
CriticInput = Literal["auto", "state", "state_and_observation"]
ValueNormUpdate = Literal["auto", "value_loss", "minibatch", "iteration"]
DependenceAdvantage = Literal["recompute", "reuse"]
EvalStarts = Literal["fresh", "fixed"]
Nonfinite = Literal["skip", "stop"]
MatmulPrecision = Literal["highest", "high", "medium"]
RolloutDevice = Literal["env", "trainer"]
#: Each enumerated option's choices.
CHOICES: dict[str, tuple[str, ...]] = {
    "algorithm": get_args(Algorithm),
    "sharing": get_args(Sharing),
    "actor_network": get_args(ActorNetwork),
    "critic_network": get_args(CriticNetwork),
    "time_limit": get_args(TimeLimit),
    "critic": get_args(CriticKind),
    "critic_input": get_args(CriticInput),
    "value_norm_update": get_args(ValueNormUpdate),
    "dependence_advantage": get_args(DependenceAdvantage),
    "eval_starts": get_args(EvalStarts),
    "nonfinite": get_args(Nonfinite),
    "matmul_precision": get_args(MatmulPrecision),
    "rollout_device": get_args(RolloutDevice),
}
#: What a checkpoint written before an option existed was trained with (the package's behaviour then,
#: before the paper code's defaults): ``legacy_hparams`` gives them to the options it lacks.
LEGACY_HPARAMS: dict[str, Any] = {
    "time_limit": "bootstrap",
    "critic": "team",
    "critic_input": "state",
    "active_masks": False,
    "agent_id": False,
    "value_norm_update": "iteration",
    "dependence_advantage": "reuse",
    "eval_starts": "fixed",
    "paps_head_lr_scale": False,
    "critic_network": "mlp",
}
LEGACY_ENV_OPTIONS: dict[str, dict[str, Any]] = {
    "mamujoco": {"clip_actions": True},
    "smax": {"obs_last_action": False},
}
EVAL_SEED_OFFSET = 1_000_000  # evaluation environments never share seeds with training ones
AGENT_ORDERS = ("separated_agent", "selected_agent", "update_order")
# The iteration statistics logged under train/ (the run's progress); the update's go under update/.
TRAIN_METRICS = (
    "episode_return",
    "episodes",
    "win_rate",
    "fps",
    "rollout_seconds",
    "update_seconds",
    "skipped_updates",
)
DEFAULT_ENV: dict[str, Any] = {
    "name": "mamujoco",
    "scenario": "HalfCheetah",
    "agent_conf": "6x1",
    "agent_obsk": 1,
}


def check_hparams(hp: Mapping[str, Any]) -> None:
    """Reject invalid model options (``hp``: the module's hyperparameters, or a parsed ``model`` config)
    with the option, the value and the fix, without building anything.

    Raises:
        ConfigError: for the first invalid option.
    """
    positive = ("num_envs", "rollout_length", "total_frames", "actor_lr", "critic_lr", "clip_epsilon")
    positive += ("ppo_epochs", "num_minibatches", "max_grad_norm", "huber_delta", "hidden_size")
    positive += ("eval_episodes", "eval_num_envs", "data_chunk_length")
    for name in positive:
        if not hp[name] > 0:
            raise ConfigError(f"model.{name}={hp[name]!r} must be > 0")
    non_negative = ("entropy_coef", "depth", "diagnostics_interval", "eval_interval")
    for name in (*non_negative, "checkpoint_interval", "num_threads"):
        if hp[name] < 0:
            raise ConfigError(f"model.{name}={hp[name]!r} must be >= 0")
    for name in ("gamma", "gae_lambda"):
        if not 0.0 <= hp[name] <= 1.0:
            raise ConfigError(f"model.{name}={hp[name]!r} must lie in [0, 1]")
    for name, options in CHOICES.items():
        if hp[name] not in options:
            raise ConfigError(f"model.{name}={hp[name]!r} is unknown; choose one of {options}")
    recurrent = hp["actor_network"] == "rnn" or hp["critic_network"] == "rnn"
    recurrent |= hp["critic_network"] == "auto" and hp["actor_network"] == "rnn"
    if recurrent and hp["rollout_length"] % hp["data_chunk_length"]:
        raise ConfigError(
            f"model.data_chunk_length={hp['data_chunk_length']} does not divide model.rollout_length="
            f"{hp['rollout_length']}; pick a divisor of {hp['rollout_length']}"
        )
    chunk = hp["data_chunk_length"] if recurrent else 1
    sequences = hp["num_envs"] * hp["rollout_length"] // chunk
    if sequences % hp["num_minibatches"]:
        what = "sequences of data_chunk_length steps" if chunk > 1 else "num_envs x rollout_length"
        raise ConfigError(
            f"model.num_minibatches={hp['num_minibatches']} does not divide the batch of {sequences} "
            f"{what}; pick a divisor of {sequences}"
        )


class _Iterations:
    """The training 'dataloader': iteration indices, with a length so Lightning never prefetches.

    A length-less iterable makes Lightning fetch one item ahead; the rollout is collected inside
    ``training_step`` instead, so update ``k`` always trains on data from the policy after update ``k - 1``.
    """

    def __init__(self, module: FP3OModule) -> None:
        self.module = module

    def __len__(self) -> int:
        # The total: on resume Lightning counts the iterations already done as consumed batches.
        return self.module.num_iterations

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
        time_limit: how GAE treats an episode cut by the time limit: ``terminal`` (the paper's code,
            ``use_proper_time_limits=False``: like a termination, no bootstrap) or ``bootstrap``
            (bootstrap from the critic's value of the last observation).
        critic: ``agent`` (the paper's code): one value per agent, ``V(s, i)`` on the state with the
            agent's one-hot id (NoPS: one critic and value normaliser per agent; FuPS/PaPS: one
            shared critic and normaliser), so GAE gives each agent its own advantage, normalised
            per agent; ``team``: one ``V(s)`` and one advantage for the team. IPPO's critic reads
            each agent's observation either way; ``team`` gives it one normaliser for all agents.
        critic_input: what the per-agent critic (``critic="agent"``) reads: ``state``, or
            ``state_and_observation`` (MAPPO's agent-specific global state: the state and the agent's
            own observation, as the paper's code uses on SMAC); ``auto`` (default) takes the
            agent-specific state on SMAC-style maps (SMAX, SMAC/SMACv2) and the state elsewhere.
        active_masks: where the environment says which agents are alive (``("agents", "alive")``,
            SMAC-style maps), leave dead agents out of the policy loss, the entropy bonus and FP3O's
            gate (the paper code's ``use_policy_active_masks``).
        agent_id: append the agent's one-hot id to every agent's observation and to the critic's
            input, for every network type (the paper's code); ``False``: FuPS only (which needs it).
        value_norm_update: when the value normaliser folds in new value targets: ``value_loss`` (the
            paper's code, and HAPPO's: its value loss normalises each minibatch's targets twice, for
            the clipped and the unclipped error, and each normalisation folds them in, so the
            statistics move twice per minibatch; with PaPS, whose loss is computed agent by agent,
            2 x n_agents times, here in one closed-form fold of the whole minibatch), ``minibatch``
            (MAPPO's code: once before every minibatch's value loss), in every phase that trains the
            critic, or ``iteration`` (once per iteration, on the whole batch); ``auto`` (default):
            ``value_loss`` for FP3O and HAPPO, ``minibatch`` for MAPPO and IPPO, as their codes do.
        dependence_advantage: FP3O's dependence phase uses advantages computed again from the returns
            and the rollout's values under the value normaliser as the independence phase left it,
            normalised again (``recompute``, the paper's code); ``reuse``: the independence phase's.
        paps_head_lr_scale: with PaPS, the per-agent output layers and log-stds learn at
            ``actor_lr x n_agents`` (the paper code's optimiser); ``False``: at ``actor_lr``.
        hidden_size, depth: width and number of hidden layers of actor and critic.
        gain: orthogonal-init gain of the policy's output layer.
        actor_network: ``mlp`` or ``rnn`` (a GRU of width ``hidden_size`` after the MLP trunk, with
            the hidden state carried through rollouts and reset at episode starts; Table 7).
        critic_network: ``mlp``, ``rnn`` (the critic's MLP trunk, a GRU with its hidden state carried
            from rollout to rollout, a linear head) or ``auto`` (default): the actor's type, as in the
            paper's code, whose recurrent policy has a recurrent critic.
        data_chunk_length: with a recurrent actor or critic, the update replays the rollout in
            sequences of this many steps from the hidden state the rollout had at each sequence's
            start; minibatches are made of whole sequences.
        std_x_coef, std_y_coef: the policy std is ``sigmoid(log_std / x) * y``.
        seed: seeds parameters, environments (offset by process rank) and the scheme's generator.
        diagnostics_interval: every this many iterations, log the per-agent ratio/KL distributions
            (the paper's Figures 1, 2 and 4) as an MLflow figure; 0 never.
        eval_interval: evaluate every this many iterations (Lightning validation; the module sets the
            Trainer's ``val_check_interval`` to it) and once more at the end of training; 0 never.
        eval_episodes: deterministic episodes per evaluation (32 in the paper).
        eval_num_envs: environments stepped in parallel during evaluation.
        eval_starts: ``fresh`` (default, as the paper's code): each evaluation starts its episodes from
            new initial states, seeded from the run's seed and the iteration (so a run, and a resumed
            run, evaluates the same states at the same iteration); ``fixed``: every evaluation uses the
            same initial states, so a fixed policy always scores the same.
        checkpoint_interval: save ``checkpoints/<run>/iteration=<k>.ckpt`` (and ``last.ckpt``) every
            this many iterations, and keep the best evaluation in ``best-iteration=<k>.ckpt``; 0
            never. Only when the Trainer's checkpointing is enabled.
        nonfinite: what to do when a NaN or Inf appears in the rollout (observations, state,
            rewards), a loss or a gradient: ``skip`` the affected update (the parameters never see
            it; a warning names where, and ``train/skipped_updates`` counts them) or ``stop`` the run
            with an error naming where.
        num_threads: torch's CPU threads in this process from when the module is built
            (``torch.set_num_threads``, so that every fit in the process rounds alike);
            the paper's small networks run fastest on one thread, and more threads than free cores
            slow everything down many times over. 0 leaves torch's setting as it is.
        matmul_precision: ``torch.set_float32_matmul_precision`` while it runs (the process's own
            setting is given back at the end): ``highest`` (default,
            full float32 as the paper's code), ``high`` (TF32 tensor cores on NVIDIA Ampere and later:
            faster float32 matrix products with a 10-bit mantissa) or ``medium`` (bfloat16 products).
            Worth trying on a GPU with large batches (VMAS with thousands of environments); it
            changes nothing on the CPU.
        rollout_device: where the collector runs the policy: ``env`` (default), where the environment
            simulates (a CPU copy of the policy, synchronised after every update, for MaMuJoCo, SMAX
            and SMACv2, so that a GPU learner costs no host-device round trip per step; the
            training device for VMAS), or ``trainer``, the Trainer's device. The rollout is stored
            where the environment steps and moved to the Trainer's device once per iteration;
            everything after it runs there either way.
        compile_update: compile each minibatch's loss (the networks' forward and backward) with
            ``torch.compile``. It pays on long runs: on HalfCheetah 6x1 (CPU) a minibatch step takes
            about half the time, for 10-30 s of compilation at the start of each process.
        compile_actor: compile the collector's policy step (the networks' forward and the Gaussian's
            sample) with ``torch.compile``: on HalfCheetah 6x1 (CPU) it takes about half the time of the
            eager step, for a few seconds of compilation per input shape (the training and the
            evaluation environments'). Same random draws; the actions equal the eager ones to float
            rounding.
    """

    def __init__(
        self,
        env: dict[str, Any] | None = None,
        num_envs: int = 4,
        rollout_length: int = 1000,
        total_frames: int = 10_000_000,
        algorithm: Algorithm = "fp3o",
        sharing: Sharing = "nops",
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
        time_limit: TimeLimit = "terminal",
        critic: CriticKind = "agent",
        critic_input: CriticInput = "auto",
        active_masks: bool = True,
        agent_id: bool = True,
        value_norm_update: ValueNormUpdate = "auto",
        dependence_advantage: DependenceAdvantage = "recompute",
        paps_head_lr_scale: bool = True,
        hidden_size: int = 64,
        depth: int = 2,
        gain: float = 0.01,
        actor_network: ActorNetwork = "mlp",
        critic_network: CriticNetwork = "auto",
        data_chunk_length: int = 10,
        std_x_coef: float = 1.0,
        std_y_coef: float = 0.5,
        seed: int = 0,
        diagnostics_interval: int = 10,
        eval_interval: int = 25,
        eval_episodes: int = 32,
        eval_num_envs: int = 8,
        eval_starts: EvalStarts = "fresh",
        checkpoint_interval: int = 50,
        nonfinite: Nonfinite = "skip",
        num_threads: int = 1,
        matmul_precision: MatmulPrecision = "highest",
        compile_update: bool = False,
        compile_actor: bool = False,
        rollout_device: RolloutDevice = "env",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hparams.env = env = validate_env(DEFAULT_ENV if env is None else env)
        check_hparams(self.hparams)
        if num_threads:  # before anything is computed, so that every fit in a process rounds alike
            torch.set_num_threads(num_threads)
        self.automatic_optimization = False
        L.seed_everything(seed, verbose=False)
        try:
            probe = make_env(**env, num_envs=1)
        except ConfigError:
            raise
        except ValueError as error:  # the environment's own checks (an unknown scenario or map, ...)
            raise ConfigError(f"model.env: {error}") from error
        self.n_agents = probe.n_agents
        observation_size = probe.observation_spec[OBSERVATION].shape[-1]
        action_spec = probe.full_action_spec[ACTION]
        state_size = probe.observation_spec["state"].shape[-1]
        self.masked = ACTION_MASK in probe.observation_spec.keys(True)
        discrete = isinstance(action_spec, Categorical)
        if discrete and not self.masked:
            raise ValueError(f"env {env['name']!r} has discrete actions but no {ACTION_MASK} observation")
        has_alive = ALIVE in probe.observation_spec.keys(True)
        agent_specific_state = getattr(probe, "agent_specific_state", False)
        action_sizes = getattr(probe, "action_sizes", None)
        probe.close()
        self.policy = MultiAgentPolicy(
            self.n_agents,
            observation_size,
            None if discrete else action_spec.shape[-1],
            sharing,
            n_actions=action_spec.space.n if discrete else None,
            actor_network=actor_network,
            hidden_size=hidden_size,
            depth=depth,
            gain=gain,
            std_x_coef=std_x_coef,
            std_y_coef=std_y_coef,
            action_sizes=action_sizes,
            agent_id=agent_id,
        )
        self.param_keys = (LOGITS,) if discrete else (LOC, SCALE)
        self.scheme = make_scheme(algorithm)
        self.alive = active_masks and has_alive
        self.critic_keys = self.resolve_critic_keys(agent_specific_state)
        if self.scheme.local_critic or critic == "agent":
            sizes = {OBSERVATION: observation_size, "state": state_size}
            self.critic = AgentCritic(
                self.n_agents,
                sum(sizes[key] for key in self.critic_keys),
                sharing,
                hidden_size,
                depth,
                per_agent_input=OBSERVATION in self.critic_keys,
                agent_id=agent_id,
                recurrent=self.recurrent_critic,
            )
        else:
            self.critic = CentralCritic(state_size, hidden_size, depth, recurrent=self.recurrent_critic)
        # One normaliser per agent where every agent has its own critic (the paper code's NoPS).
        per_agent = critic == "agent" and sharing == "nops"
        self.value_normalizer = ValueNormalizer(self.n_agents if per_agent else 1)
        self.generator = torch.Generator().manual_seed(seed)
        self.learner = PPOLearner(
            self.policy,
            self.critic,
            self.value_normalizer,
            self.hparams,
            param_keys=self.param_keys,
            critic_keys=self.critic_keys,
            alive=self.alive,
            masked=self.masked,
            chunk_length=self.chunk_length,
            value_norm_folds=self.value_norm_folds,
            generator=self.generator,
            optimizer=self.optimizers,
            backward=self.manual_backward,
            all_reduce_sum=self.all_reduce_sum,
            world_size=lambda: self.trainer.world_size,
        )
        self.iteration = 0
        self.frames = 0
        self.interrupted: str | None = None  # "SIGTERM" or "Ctrl-C" when fit stopped early
        self._collector: Collector | None = None
        # Runtime objects, kept out of the module's state_dict (environments are nn.Modules too).
        self._runtime: dict[str, Any] = {}

    def resolve_critic_keys(self, agent_specific_state: bool) -> tuple[Any, ...]:
        """The inputs of the critic, concatenated per agent: IPPO's observation, the state, or the state
        and each agent's observation (``critic_input``; ``auto`` follows the environment)."""
        hp = self.hparams
        if self.scheme.local_critic:
            return (OBSERVATION,)
        auto = hp.critic_input == "auto" and agent_specific_state
        both = hp.critic_input == "state_and_observation" or auto
        return ("state", OBSERVATION) if both and hp.critic == "agent" else ("state",)

    # ------------------------------------------------------------------ setup

    @property
    def frames_per_batch(self) -> int:
        return self.hparams.num_envs * self.hparams.rollout_length

    @property
    def recurrent_critic(self) -> bool:
        """Whether the critic is recurrent (``critic_network``; ``auto`` follows the actor)."""
        hp = self.hparams
        return hp.critic_network == "rnn" or (hp.critic_network == "auto" and hp.actor_network == "rnn")

    @property
    def value_norm_folds(self) -> int:
        """How many times the value normaliser folds in each minibatch's targets (``value_norm_update``;
        0: once per iteration instead)."""
        hp = self.hparams
        mode = hp.value_norm_update
        if mode == "auto":
            mode = "value_loss" if hp.algorithm in ("fp3o", "happo") else "minibatch"
        per_loss = 2 * (self.n_agents if hp.sharing == "paps" else 1)
        return {"iteration": 0, "minibatch": 1, "value_loss": per_loss}[mode]

    @property
    def chunk_length(self) -> int:
        """Steps per sequence in the update: ``data_chunk_length`` for a recurrent actor or critic, else 1."""
        recurrent = self.hparams.actor_network == "rnn" or self.recurrent_critic
        return self.hparams.data_chunk_length if recurrent else 1

    @property
    def num_iterations(self) -> int:
        """Iterations needed for ``total_frames`` frames, collected by every process."""
        world = self.trainer.world_size if self._trainer is not None else 1
        return math.ceil(self.hparams.total_frames / (self.frames_per_batch * world))

    def make_actor(self, log_prob: bool = False) -> RolloutActor:
        """The policy as the collector's actor (see ``RolloutActor``); ``log_prob`` also writes each
        action's log-probability (``("agents", "action_log_prob")``), which training does not need."""
        return RolloutActor(self.policy, self.masked, log_prob, compile=self.hparams.compile_actor)

    def build_env(self, num_envs: int, **env_options: Any) -> EnvBase:
        """The configured environment with the transforms the actor needs.

        A recurrent actor gets TorchRL's ``InitTracker`` (``is_init``) and a primer that puts a zero
        hidden state in every reset; a recurrent critic gets the ``InitTracker``. Environments that
        simulate on a device (VMAS) are built on the module's device; the others simulate on the CPU.
        ``env_options`` add to the configured environment's options (e.g. ``render_mode``).
        """
        hp = self.hparams
        device = self.env_device
        env = make_env(**hp.env, **env_options, num_envs=num_envs, device=device)
        if not self.policy.recurrent:
            # Untransformed without recurrence: the collector then takes the env's step_and_maybe_reset.
            return TransformedEnv(env, InitTracker()) if self.critic.recurrent else env
        hidden = Unbounded(shape=(self.n_agents, hp.hidden_size), device=device)
        return TransformedEnv(
            env, Compose(InitTracker(), TensorDictPrimer({HIDDEN: hidden}, expand_specs=True))
        )

    @property
    def env_device(self) -> torch.device:
        """Where the environment simulates: the module's device for VMAS, the CPU for the others."""
        env = self.hparams.env
        on_device = getattr(env_class(env["name"], backend=env.get("backend")), "simulates_on_device", False)
        return self.device if on_device else torch.device("cpu")

    def make_env(self, seed: int) -> EnvBase:
        env = self.build_env(self.hparams.num_envs)
        env.set_seed(seed)
        return env

    def setup(self, stage: str) -> None:
        self._runtime["matmul_precision_before"] = torch.get_float32_matmul_precision()
        if self.hparams.num_threads:
            torch.set_num_threads(self.hparams.num_threads)
        torch.set_float32_matmul_precision(self.hparams.matmul_precision)
        strategy = self.trainer.strategy
        if isinstance(strategy, DDPStrategy):
            # HAPPO's actor-only and critic-only phases (and frozen networks in general) leave
            # parameters without gradients in some backward passes, which DDP rejects unless told to
            # look for them. Lightning's hook runs before the strategy wraps the module, so the user's
            # plain ``--trainer.strategy ddp`` works; the option has no public setter after construction.
            strategy._ddp_kwargs["find_unused_parameters"] = True

    def teardown(self, stage: str) -> None:
        """Give the process back the matmul precision ``setup`` found."""
        if "matmul_precision_before" in self._runtime:
            torch.set_float32_matmul_precision(self._runtime.pop("matmul_precision_before"))

    def on_fit_start(self) -> None:
        """Build the collector once the module is on its device; seeds are offset by global rank.

        When resuming, the environments, the observation they carry over and every random
        generator are restored from the checkpoint, so the run continues exactly as if it had
        not stopped.
        """
        seed = self.hparams.seed + 1000 * self.global_rank
        L.seed_everything(seed, verbose=False)  # action sampling draws from the global generator
        self.schedule_evaluation()
        # The return so far of each environment's current episode (see episode_returns).
        self._runtime["running_return"] = torch.zeros(
            self.hparams.num_envs, dtype=torch.float64, device=self.device
        )
        env = self.make_env(seed)
        self._collector = Collector(
            env,
            self.make_actor(),
            frames_per_batch=self.frames_per_batch,
            total_frames=-1,
            # The environment's own device, named: with None, TorchRL compares the policy's device
            # with None, finds them different, and sends every step's TensorDict to the policy's
            # device and back (no copies on one device, but two calls of TensorDict.to per step).
            env_device=env.device,
            # A copy on the environment's device, whose weights update_policy_weights_ refreshes.
            policy_device=self.env_device if self.hparams.rollout_device == "env" else self.device,
            # Stored where the environment steps and moved to the module's device once per rollout
            # (training_step): a GPU store costs one copy and one CUDA sync per step otherwise.
            storing_device=self.env_device,
            no_cuda_sync=True,  # copies onto a GPU are stream-ordered; copies off it stay blocking
            track_traj_ids=False,
            auto_register_policy_transforms=False,
        )
        resume = self._runtime.pop("resume", None)
        if resume is not None:
            self.load_collector_state(resume["collector"])
            set_rng_states(resume["rng"])
        self._rollouts = iter(self._collector)
        self.tag_runs()

    @property
    def base_env(self) -> EnvBase:
        """The collector's environment without its transforms."""
        env = self._collector.env
        return env.base_env if isinstance(env, TransformedEnv) else env

    def collector_state(self) -> dict[str, Any]:
        """The environments' state, the observation the collector carries into the next rollout and
        the running episode returns.

        TorchRL's ``Collector.state_dict()`` keeps neither a ``TransformedEnv``'s base environment
        nor the carried observation (``_carrier``), both needed to continue bit-exactly.
        """
        carrier = self._collector._carrier
        return {
            "env": self.base_env.state_dict(),
            "carrier": carrier.cpu().to_dict(),
            "batch_size": list(carrier.batch_size),
            "running_return": self._runtime["running_return"].cpu(),
            "critic_hidden": None if self.learner.critic_hidden is None else self.learner.critic_hidden.cpu(),
        }

    def load_collector_state(self, state: dict[str, Any]) -> None:
        self.base_env.load_state_dict(state["env"])
        carrier = TensorDict(state["carrier"], batch_size=state["batch_size"])
        # Older checkpoints carry the running returns in the carrier (TorchRL's RewardSum wrote them).
        legacy = carrier.pop("episode_reward", None)
        running = state.get("running_return", None if legacy is None else legacy.squeeze(-1))
        if running is not None:
            self._runtime["running_return"] = running.to(self.device, torch.float64)
        current = self._collector._carrier
        # Older checkpoints' carriers also hold the distribution's parameters, no longer written.
        current.update(carrier.select(*current.keys(True, True), strict=False).to(current.device))
        if state.get("critic_hidden") is not None:
            self.learner.critic_hidden = state["critic_hidden"].to(self.device)

    def tag_runs(self) -> None:
        """Tag MLflow runs with what reports group by: task, env, algorithm, sharing and seed."""
        hp = self.hparams
        tags = {"task": task_name(hp.env), "env": hp.env["name"], "algorithm": hp.algorithm}
        tags |= {"sharing": hp.sharing, "seed": str(hp.seed)}
        for logger in self.loggers:
            if isinstance(logger, MLFlowLogger) and self.global_rank == 0:
                for key, value in tags.items():
                    logger.experiment.set_tag(logger.run_id, key, value)

    def on_fit_end(self) -> None:
        if self._collector is not None:
            self._collector.shutdown()
            self._collector = None

    def on_train_epoch_end(self) -> None:
        """``total_frames`` ends training, whatever the Trainer's epochs (its iterations fill one epoch)."""
        if self.iteration >= self.num_iterations:
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        """A final evaluation, unless the last iteration was just evaluated (Lightning also validates
        when a time limit or a callback stops the run)."""
        evaluated = self._runtime.get("evaluated_at") == self.iteration
        if self.hparams.eval_interval and not evaluated and not self.interrupted:
            self.log_evaluation("eval", self.evaluate())

    def train_dataloader(self) -> _Iterations:
        return _Iterations(self)

    def val_dataloader(self) -> list[int]:
        return [0]  # one validation batch = one evaluation of eval_episodes episodes

    def test_dataloader(self) -> list[int]:
        return [0]

    def schedule_evaluation(self) -> None:
        """Validation every ``eval_interval`` iterations across the run (which is one long epoch)."""
        if self.hparams.eval_interval:
            self.trainer.val_check_interval = self.hparams.eval_interval
            self.trainer.check_val_every_n_epoch = None
        else:
            self.trainer.limit_val_batches = 0

    def configure_callbacks(self) -> list[L.Callback]:
        """Checkpoints by iteration and by evaluation return (replacing Lightning's default one), and
        a clean stop with a checkpoint on SIGTERM or Ctrl-C."""
        if not (self.hparams.checkpoint_interval and self.trainer.checkpoint_callbacks):
            return []
        callbacks: list[L.Callback] = [
            IterationCheckpoint(every_n_iterations=self.hparams.checkpoint_interval),
            GracefulStop(),
        ]
        if self.hparams.eval_interval:
            callbacks.append(BestEvalCheckpoint())
        return callbacks

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One Adam (eps 1e-5) with a parameter group for the actors and one for the critic at their own
        learning rates: a minibatch costs one optimiser step, and a phase that trains one network leaves
        the other's gradients ``None``, which Adam skips. With PaPS and ``paps_head_lr_scale``, the
        per-agent heads and log-stds form a further group at ``actor_lr x n_agents``, as in the paper's
        code (whose loss averages the agents' heads). Fused: one kernel per group, and it can skip a
        non-finite step without a host sync."""
        hp = self.hparams
        groups: list[dict[str, Any]] = [{"params": list(self.policy.parameters())}]
        if hp.sharing == "paps" and hp.paps_head_lr_scale:
            heads = {id(p) for p in self.policy.head_parameters()}
            groups = [
                {"params": [p for p in self.policy.parameters() if id(p) not in heads]},
                {"params": self.policy.head_parameters(), "lr": hp.actor_lr * self.n_agents},
            ]
        groups.append({"params": list(self.critic.parameters()), "lr": hp.critic_lr})
        return torch.optim.Adam(groups, lr=hp.actor_lr, eps=1e-5, fused=True)

    # ------------------------------------------------------------------ iteration

    def training_step(self, iteration: int, batch_idx: int) -> None:
        start = time.perf_counter()
        rollout = next(self._rollouts).to(self.device, non_blocking=True)
        collected = time.perf_counter()
        returns_so_far, self._runtime["running_return"] = episode_returns(
            rollout["next", "reward"], rollout["next", "done"], self._runtime["running_return"]
        )
        self.learner.reset_counters()
        bad = self.nonfinite_keys(rollout)
        if bad:
            self.handle_nonfinite(
                f"the rollout's {', '.join(map(str, bad))}", skipped="this iteration's update"
            )
            self.frames += rollout.numel() * self.trainer.world_size
            self.iteration += 1
            return
        batch, value_explained = self.learner.compute_advantages(rollout)
        stats = self.scheme.update(self.learner, batch)
        stats["skipped_updates"] = self.check_skipped_updates()
        self._collector.update_policy_weights_()
        self.iteration += 1
        self.frames += rollout.numel() * self.trainer.world_size
        start_ratio, end_kl = stats.pop("start_ratio"), stats.pop("end_kl")
        stats.update(diagnostics.summaries(start_ratio, end_kl, self.hparams.clip_epsilon))
        stats["explained_variance"] = value_explained
        end = time.perf_counter()
        stats["fps"] = torch.tensor(rollout.numel() / (end - start))
        stats["rollout_seconds"] = torch.tensor(collected - start)
        stats["update_seconds"] = torch.tensor(end - collected)  # host time (CUDA may still be busy)
        self.log_iteration(rollout, returns_so_far, stats)
        interval = self.hparams.diagnostics_interval
        if interval and (self.iteration % interval == 0 or self.iteration == 1):
            self.log_diagnostics_figure(start_ratio, end_kl, stats.get("update_order"))

    def nonfinite_keys(self, rollout: TensorDictBase) -> list[Any]:
        """The rollout keys holding a NaN or Inf (one host sync; agreed across DDP processes)."""
        keys = [OBSERVATION, "state", ("next", "reward"), ("next", OBSERVATION), ("next", "state")]
        flags = torch.stack([(~torch.isfinite(rollout[key])).any() for key in keys]).float()
        flags = self.all_reduce_sum(flags)
        return [key for key, flag in zip(keys, flags.tolist(), strict=True) if flag]

    def check_skipped_updates(self) -> Tensor:
        """Warn about (or stop on) minibatch updates skipped as non-finite in this iteration."""
        losses, gradients = self.learner.skipped.tolist()
        if gradients:
            where = "losses and gradients" if losses else "gradients"
            self.handle_nonfinite(
                where, skipped=f"{int(gradients)} of {self.learner.steps} minibatch updates"
            )
        return torch.tensor(gradients)

    def handle_nonfinite(self, where: str, skipped: str) -> None:
        message = f"iteration {self.iteration + 1}: NaN or Inf in {where}"
        if self.hparams.nonfinite == "stop":
            raise FloatingPointError(f"{message}; stopping (model.nonfinite=stop; 'skip' skips such updates)")
        warnings.warn(f"{message}; skipped {skipped} (model.nonfinite=skip)", RuntimeWarning, stacklevel=2)
        for logger in self.loggers:
            logger.log_metrics({"train/skipped_nonfinite": 1.0}, step=self.frames)

    def validation_step(self, batch: int, batch_idx: int) -> None:
        if not self.trainer.sanity_checking:
            self.log_evaluation("eval", self.evaluate())
            self._runtime["evaluated_at"] = self.iteration

    def test_step(self, batch: int, batch_idx: int) -> None:
        self.log_evaluation("test", self.evaluate())

    @torch.no_grad()
    def evaluate(self, deterministic: bool = True, seed: int | None = None) -> dict[str, Tensor]:
        """``eval_episodes`` deterministic episodes (``deterministic=False``: actions sampled from the
        policy, as in training) on a separate environment with its own seed.

        The evaluation environment is reseeded every time, with ``seed`` where given (e.g. the same starts
        for several checkpoints), else with :meth:`eval_seed` (the same starts at the same iteration, new
        ones at each iteration unless ``eval_starts="fixed"``). It is rebuilt when the module has moved to
        another device since (for those that simulate there).
        Returns each episode's return and length and, where the environment reports wins (a ``"won"``
        key), whether it was won.
        """
        hp = self.hparams
        cached = self._runtime.get("eval_env")
        if cached is None or cached.device != self.env_device:
            if cached is not None:
                cached.close()
            num_envs = min(hp.eval_num_envs, hp.eval_episodes)
            self._runtime["eval_env"] = self.build_env(num_envs)
        env, actor = self._runtime["eval_env"], self.make_actor()
        env.set_seed(self.eval_seed() if seed is None else seed)
        returns, lengths, wins = [], [], []
        exploration = ExplorationType.DETERMINISTIC if deterministic else ExplorationType.RANDOM
        with set_exploration_type(exploration):
            while sum(r.numel() for r in returns) < hp.eval_episodes:
                rollout = env.rollout(
                    env.max_episode_steps, actor, break_when_any_done=False, auto_cast_to_device=True
                )
                done = rollout["next", "done"].squeeze(-1)
                in_first_episode = (done.cumsum(-1) - done.long()) == 0
                returns.append((rollout["next", "reward"].squeeze(-1) * in_first_episode).sum(-1))
                lengths.append(in_first_episode.sum(-1))
                if ("next", "won") in rollout.keys(True):
                    first_done = done & in_first_episode
                    wins.append((rollout["next", "won"].squeeze(-1) & first_done).any(-1))
        result = {
            "returns": torch.cat(returns)[: hp.eval_episodes],
            "lengths": torch.cat(lengths)[: hp.eval_episodes],
        }
        if wins:
            result["wins"] = torch.cat(wins)[: hp.eval_episodes]
        return result

    def eval_seed(self) -> int:
        """The evaluation environment's seed: the run's, offset from every training seed, and with
        ``eval_starts="fresh"`` drawn anew for each iteration (from the run's seed and the iteration)."""
        seed = self.hparams.seed + EVAL_SEED_OFFSET
        if self.hparams.eval_starts == "fixed":
            return seed
        # 31 bits: sub-environment i takes the seed plus i, which every simulator must accept.
        return int(np.random.SeedSequence((seed, self.iteration)).generate_state(1)[0] >> 1)

    def log_evaluation(self, stage: str, result: dict[str, Tensor]) -> None:
        """Log ``<stage>/return_mean``, ``return_std``, ``length_mean``, ``episodes`` and ``win_rate`` at the
        frame count."""
        returns = result["returns"].float()
        metrics = {"return_mean": returns.mean(), "return_std": returns.std(unbiased=False)}
        metrics["length_mean"] = result["lengths"].float().mean()
        metrics["episodes"] = torch.tensor(float(returns.numel()))
        if "wins" in result:
            metrics["win_rate"] = result["wins"].float().mean()
        metrics = {f"{stage}/{k}": float(v) for k, v in metrics.items()}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.frames)
        if self.trainer.validating or self.trainer.testing:  # for progress bar and checkpoint monitors
            self.log(
                f"{stage}/return_mean",
                metrics[f"{stage}/return_mean"],
                prog_bar=True,
                logger=False,
                batch_size=1,
            )

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum across DDP processes (identity on one device)."""
        if self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    # ------------------------------------------------------------------ logging

    def log_iteration(
        self, rollout: TensorDictBase, returns_so_far: Tensor, stats: dict[str, Tensor]
    ) -> None:
        """Log one iteration to every logger, with the environment frame count as the step.

        The run's progress (``TRAIN_METRICS``: returns, frames, time) goes under ``train/``, the update's
        statistics under ``update/``: per-agent vectors under ``update/agent_<i>/`` and their mean under
        ``update/``, agent orders (FP3O's selection, HAPPO's update order) under ``update/selection/``.
        MLflow's run page shows its sections in name order: ``eval/``, ``train/``, then ``update/``.
        Everything reaches the host in one transfer. ``returns_so_far`` are the rollout's returns
        from ``episode_returns``; those where an episode finished are logged.
        """
        finished = finished_episodes(rollout)
        returns = returns_so_far[finished]
        stats = {**stats, "episode_return": returns.mean(), "episodes": torch.tensor(returns.numel())}
        if ("next", "won") in rollout.keys(True):  # SMAC-style tasks: the share of finished episodes won
            stats["win_rate"] = rollout["next", "won"][finished].float().mean()
        names, values = zip(*stats.items(), strict=True)
        flat = torch.cat([v.detach().float().reshape(-1).to(self.device) for v in values]).cpu()
        metrics = {"train/frames": float(self.frames), "train/iteration": float(self.iteration)}
        for name, value in zip(names, flat.split([v.numel() for v in values]), strict=True):
            if name in TRAIN_METRICS:
                metrics[f"train/{name}"] = float(value)
            elif name in AGENT_ORDERS:
                metrics |= {f"update/selection/{name}_{p}": float(v) for p, v in enumerate(value)}
            elif stats[name].dim() == 0:
                metrics[f"update/{name}"] = float(value)
            else:
                metrics |= {f"update/agent_{i}/{name}": float(v) for i, v in enumerate(value)}
                metrics[f"update/{name}"] = float(value.mean())
        if not returns.numel():  # no episode ended in this rollout
            for name in ("train/episode_return", "train/win_rate"):
                metrics.pop(name, None)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.frames)
        if "train/episode_return" in metrics:
            self.log("return", metrics["train/episode_return"], prog_bar=True, logger=False, batch_size=1)
        self.log("frames", float(self.frames), prog_bar=True, logger=False, batch_size=1)
        self.log("iteration", float(self.iteration), logger=False, batch_size=1)  # checkpoint names

    def log_diagnostics_figure(
        self, start_ratio: Tensor, end_kl: Tensor, order: Tensor | None = None
    ) -> None:
        """Log the per-agent ratio/KL distributions of this iteration as an MLflow figure (agents in
        ``order``, HAPPO's update order, when given)."""
        hp = self.hparams
        for logger in self.loggers:
            if isinstance(logger, MLFlowLogger) and self.global_rank == 0:
                title = f"{hp.algorithm} {hp.sharing} {task_name(hp.env)}, iteration {self.iteration}"
                figure = diagnostics.ratio_kl_figure(start_ratio, end_kl, hp.clip_epsilon, title, order)
                path = f"diagnostics/ratio_kl_iteration_{self.iteration:06d}.png"
                logger.experiment.log_figure(logger.run_id, figure, path)

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["fp3o"] = {
            "iteration": self.iteration,
            "frames": self.frames,
            "generator": self.generator.get_state(),
            "rng": rng_states(),
        }
        if self._collector is not None:
            checkpoint["fp3o"]["collector"] = self.collector_state()
        for logger in self.loggers:
            if isinstance(logger, MLFlowLogger):  # where `fp3o render` and resumed runs log to
                checkpoint["fp3o"]["mlflow"] = {
                    "run_id": logger.run_id,
                    "tracking_uri": logger.experiment.tracking_uri,
                }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("optimizer_states")
        if states and len(states) == 2:  # written before the actor's and critic's Adams became one
            checkpoint["optimizer_states"] = [merge_optimizer_states(states)]
        state = checkpoint.get("fp3o", {})
        self.iteration = state.get("iteration", 0)
        self.frames = state.get("frames", 0)
        if "generator" in state:
            self.generator.set_state(state["generator"])
        if "collector" in state:  # applied when the collector is rebuilt, in on_fit_start
            self._runtime["resume"] = {"collector": state["collector"], "rng": state["rng"]}
        # The epoch ends at num_iterations, which a resumed run may have raised (a larger total_frames),
        # not where the checkpoint's epoch ended: Lightning restores that from "is_last_batch".
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
        progress["is_last_batch"] = False


def merge_optimizer_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One optimiser's ``state_dict`` from several, in order: their groups one after another, with the
    parameter indices of each shifted past the ones before (as ``torch.optim`` numbers them)."""
    merged: dict[str, Any] = {"state": {}, "param_groups": []}
    offset = 0
    for state in states:
        count = sum(len(group["params"]) for group in state["param_groups"])
        for group in state["param_groups"]:
            merged["param_groups"].append({**group, "params": [i + offset for i in group["params"]]})
        merged["state"].update({i + offset: value for i, value in state["state"].items()})
        offset += count
    return merged


def legacy_hparams(saved: dict[str, Any]) -> dict[str, Any]:
    """The options a checkpoint's hyperparameters ``saved`` lack, with the values it was trained with
    (``LEGACY_HPARAMS``; its environment's ``LEGACY_ENV_OPTIONS`` too), so that checkpoints written
    before the paper code's defaults still load, evaluate and resume as they were."""
    missing = {name: value for name, value in LEGACY_HPARAMS.items() if name not in saved}
    if missing and isinstance(saved.get("env"), dict):
        env = saved["env"]
        extra = LEGACY_ENV_OPTIONS.get(env.get("name"), {})
        missing["env"] = {**env, **{k: v for k, v in extra.items() if k not in env}}
    return missing


def rng_states() -> dict[str, Any]:
    """Every global random generator's state (Python, NumPy, torch CPU and CUDA).

    Plain tensors, tuples and numbers only, so checkpoints load with ``weights_only=True``.
    """
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (
            name,
            torch.from_numpy(keys.astype(np.int64)),
            int(position),
            int(has_gauss),
            float(cached),
        ),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def finished_episodes(rollout: TensorDictBase) -> Tensor:
    """Where episodes ended in this rollout (``[..., 1]``), except those a simulator fault cut short."""
    finished = rollout["next", "done"]
    if ("next", "faulted") in rollout.keys(True):
        finished = finished & ~rollout["next", "faulted"]
    return finished


def episode_returns(reward: Tensor, done: Tensor, running: Tensor) -> tuple[Tensor, Tensor]:
    """Every step's return of its episode so far, and the running returns a rollout leaves.

    Args:
        reward: the team rewards ``[num_envs, T, 1]`` of a rollout (``("next", "reward")``).
        done: bool ``[num_envs, T, 1]`` (``("next", "done")``); the sum restarts after each.
        running: float64 ``[num_envs]``, each environment's return so far when the rollout starts.

    Returns ``[num_envs, T, 1]`` float64 returns so far (at a done, the episode's return) and the
    running returns ``[num_envs]`` at the rollout's end. Cumulative sums over the whole rollout
    replace TorchRL's ``RewardSum`` transform, so that the collector steps the environment itself,
    without a ``TransformedEnv`` around it.
    """
    total = reward.squeeze(-1).double().cumsum(-1) + running.unsqueeze(-1)
    done = done.squeeze(-1)
    steps = torch.arange(done.shape[-1], device=done.device).expand_as(done)
    last_end = torch.where(done, steps, -1).cummax(-1).values  # the last done at or before each step
    previous_end = torch.cat([torch.full_like(last_end[:, :1], -1), last_end[:, :-1]], dim=-1)
    offset = torch.where(previous_end >= 0, total.gather(-1, previous_end.clamp(min=0)), 0.0)
    so_far = total - offset
    return so_far.unsqueeze(-1), torch.where(done[:, -1], 0.0, so_far[:, -1])
