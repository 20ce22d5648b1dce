"""Training frames/s against the environment alone, the machine's floor and a hand-written loop.

Builds the module from a training config, trains a few iterations, and reports the steady-state training
throughput (rollout + GAE + update, first iteration excluded as warm-up) beside:

* the env-only throughput of the same environment (random actions, same ``num_envs`` and env kwargs);
* the split of an iteration: collection (the environment, the rollout policy per step, the collector's
  remainder) and GAE + update. The policy is timed twice: alone (the same call repeated, its weights hot
  in the CPU's caches) and while collecting, between the environment's steps, as ``handwritten_fp3o``
  times its own; the remainder is what the collection spends outside both;
* the **floor** it cannot beat: the environment alone plus the minibatch arithmetic, i.e. the FLOPs of the
  actor's and critic's forward and backward passes per minibatch (counted from the layer shapes: 2 per
  multiply-add forward, twice that backward) times the minibatch steps of an iteration, at the GFLOP/s this
  machine reaches on the batched matmuls of those layers (measured here, one thread); our time is printed
  as a multiple of it;
* with ``--handwritten``, :mod:`handwritten_fp3o` (FP3O in one file of plain PyTorch on the same work, the
  paper's HalfCheetah 6x1 config only), run in turns with ours ``--repeats`` times::

    python benchmarks/train_throughput.py --config configs/mamujoco/halfcheetah_6x1.yaml --iterations 4
    python benchmarks/train_throughput.py --iterations 4 --handwritten --repeats 3

``--compile-update`` compiles the update (``model.compile_update``) and ``--compile-actor`` the rollout
policy's step (``model.compile_actor``); the compilation falls in the first, warm-up iteration.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import yaml
from env_throughput import env_frames_per_second
from tensordict import TensorDictBase
from torch import nn
from torchrl.envs.utils import ExplorationType, set_exploration_type

from fp3o_lightning.actor import RolloutActor
from fp3o_lightning.envs import make_env, task_name
from fp3o_lightning.loggers import MetricsRecorder
from fp3o_lightning.module import FP3OModule
from fp3o_lightning.nets import CentralCritic, StackedLinear


def steady(values: list[float]) -> float:
    """The mean without the first (warm-up) iteration, when there is more than one."""
    return statistics.mean(values[1:] if len(values) > 1 else values)


def read_model(path: str) -> dict[str, Any]:
    """The ``model`` section of a training config (the :class:`FP3OModule` arguments)."""
    with open(path) as file:
        return yaml.safe_load(file)["model"]


def frames_per_batch(model: dict[str, Any]) -> int:
    """Frames per training iteration of ``model`` (``num_envs x rollout_length``, the module's defaults)."""
    return model.get("num_envs", 4) * model.get("rollout_length", 1000)


@dataclass
class FitThroughput:
    """A few training iterations: means without the first (warm-up) iteration, unless there is only one."""

    device: str
    frames_per_batch: int
    train_fps: float  # the module's train/fps: rollout, GAE and update of an iteration
    fit_fps: float  # all frames over the whole fit's wall time, setup included
    rollout_seconds: float
    update_seconds: float
    policy_us_per_step: float  # the rollout policy alone, per step of all environments
    policy_in_situ_us_per_step: float  # the same, between the environment's steps while collecting
    update_gflop: float  # the minibatch arithmetic of an iteration's update (see update_flops)


def fit_throughput(model: dict[str, Any], iterations: int, accelerator: str) -> FitThroughput:
    """Train ``FP3OModule(**model)`` for ``iterations`` iterations on a ``Trainer(accelerator=...)``."""
    frames = frames_per_batch(model)
    module = FP3OModule(**(model | {"total_frames": iterations * frames}))
    make_actor, policy_seconds = module.make_actor, []

    def collectors_actor_timed(log_prob: bool = False) -> RolloutActor:
        module.make_actor = make_actor  # the first actor is the collector's (the evaluations make their own)
        return TimedActor(make_actor(log_prob), policy_seconds.append)

    module.make_actor = collectors_actor_timed
    recorder = MetricsRecorder()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=1,
        logger=recorder,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module)
    wall = time.perf_counter() - start
    module.to(trainer.strategy.root_device)  # Lightning's teardown moved it back to the CPU
    gate = recorder.series("update/gate")  # FP3O: whether the dependence phase ran
    return FitThroughput(
        device=str(trainer.strategy.root_device),
        frames_per_batch=frames,
        train_fps=steady(recorder.series("train/fps")),
        fit_fps=iterations * frames / wall,
        rollout_seconds=steady(recorder.series("train/rollout_seconds")),
        update_seconds=steady(recorder.series("train/update_seconds")),
        policy_us_per_step=policy_us_per_step(module),
        policy_in_situ_us_per_step=1e6 * steady_seconds(policy_seconds, option(model, "rollout_length")),
        update_gflop=update_flops(module, steady(gate) if gate else 1.0) / 1e9,
    )


class TimedActor(RolloutActor):
    """A rollout actor that times its calls: the policy in situ, between the environment's steps, where
    the simulation has evicted it from the CPU's caches (as ``handwritten_fp3o`` times its own). On CUDA
    the calls return before the kernels finish: there it times the host's part.

    Each call's seconds go to ``record`` (a list's ``append``), not to the actor: a collector whose policy
    runs on another device than the module's (a CPU environment beside a CUDA learner) runs a deep copy
    of the actor, and a builtin method is not copied with it, so the copy records into the same list."""

    def __init__(self, actor: RolloutActor, record: Callable[[float], None]) -> None:
        super().__init__(actor.policy, actor.masked, actor.log_prob, actor.compiled)
        self.record = record

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        start = time.perf_counter()
        tensordict = super().forward(tensordict)
        self.record(time.perf_counter() - start)
        return tensordict


def steady_seconds(seconds: list[float], calls_per_rollout: int) -> float:
    """Seconds per call, without the first (warm-up) rollout's calls when there are more."""
    return statistics.mean(seconds[calls_per_rollout:] or seconds)


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA runs asynchronously to the host)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def policy_us_per_step(module: FP3OModule, calls: int = 300) -> float:
    """Microseconds per call of the collector's actor (sampling) on a reset of the training environments,
    on the device the collector runs it on."""
    hp = module.hparams
    env = module.build_env(hp.num_envs)
    device = module.env_device if hp.rollout_device == "env" else module.device
    actor = copy.deepcopy(module.make_actor()).to(device)
    tensordict = env.reset().to(device)
    with set_exploration_type(ExplorationType.RANDOM):
        for _ in range(20):
            actor(tensordict)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            actor(tensordict)
        synchronize(device)
        elapsed = time.perf_counter() - start
    env.close()
    return 1e6 * elapsed / calls


def linear_flops(net: nn.Module, rows: int) -> int:
    """Forward FLOPs of ``net``'s linear layers on ``rows`` input rows (2 per multiply-add).

    A stacked layer (weight ``[stacks, in, out]``) applies each stack to its agent's rows, so the total is
    ``2 x rows x in x out`` whatever the stacking, ``rows`` counting every agent's.
    """
    layers = (m for m in net.modules() if isinstance(m, StackedLinear))
    return sum(2 * rows * layer.weight.shape[1] * layer.weight.shape[2] for layer in layers)


def update_flops(module: FP3OModule, dependence_share: float = 1.0) -> float:
    """FLOPs of an iteration's minibatch arithmetic: forward and backward (the input and weight gradients,
    twice the forward) of the networks each minibatch step trains, times the steps.

    The steps: every phase's ``ppo_epochs x num_minibatches``; FP3O's dependence phase in
    ``dependence_share`` of the iterations (where its gate lets it run); HAPPO's one actor phase per agent
    and one critic phase.
    """
    hp = module.hparams
    rows = module.frames_per_batch // hp.num_minibatches  # samples per minibatch
    actor = 3 * linear_flops(module.policy, rows * module.n_agents)
    critic_rows = rows if isinstance(module.critic, CentralCritic) else rows * module.n_agents
    critic = 3 * linear_flops(module.critic, critic_rows)
    per_phase = hp.ppo_epochs * hp.num_minibatches
    if hp.algorithm == "happo":
        return per_phase * (module.n_agents * actor + critic)
    phases = 1 + dependence_share if hp.algorithm == "fp3o" else 1
    return phases * per_phase * (actor + critic)


def matmul_gflops(stacks: int, rows: int, width: int, repeats: int = 5, calls: int = 100) -> float:
    """The best GFLOP/s of a hidden layer's batched matmuls at the paper's sizes: the forward
    ``[stacks, rows, width] @ [stacks, width, width]`` and the two backward products, on this thread."""
    x, weight, grad = (torch.randn(stacks, a, b) for a, b in ((rows, width), (width, width), (rows, width)))
    flops = 3 * 2 * stacks * rows * width * width * calls
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            torch.bmm(x, weight)
            torch.bmm(grad, weight.transpose(1, 2))
            torch.bmm(x.transpose(1, 2), grad)
        best = max(best, flops / (time.perf_counter() - start) / 1e9)
    return best


@dataclass
class Floor:
    """The least time an iteration can take on this machine: the environment plus the minibatch arithmetic."""

    env_seconds: float
    gflop: float
    gflops: float

    @property
    def arithmetic_seconds(self) -> float:
        return self.gflop / self.gflops

    @property
    def seconds(self) -> float:
        return self.env_seconds + self.arithmetic_seconds


#: What ``handwritten_fp3o`` runs: the paper's HalfCheetah 6x1 with the module's defaults otherwise.
HANDWRITTEN_MODEL = {
    "env": {
        "name": "mamujoco",
        "scenario": "HalfCheetah",
        "agent_conf": "6x1",
        "agent_obsk": 5,
        "max_episode_steps": 1000,
    },
    "algorithm": "fp3o",
    "sharing": "nops",
    "num_envs": 4,
    "rollout_length": 1000,
}
#: Model options that do not change the work of a training iteration.
WORKLESS = {
    "total_frames",
    "eval_interval",
    "checkpoint_interval",
    "seed",
    "compile_update",
    "compile_actor",
    "num_threads",
}


def option(model: dict[str, Any], name: str) -> Any:
    """``model``'s value of an :class:`FP3OModule` argument, or the module's default."""
    return model.get(name, inspect.signature(FP3OModule).parameters[name].default)


def handwritten_differences(model: dict[str, Any]) -> list[str]:
    """The options of ``model`` that make its work other than :mod:`handwritten_fp3o`'s."""
    names = (set(model) | set(HANDWRITTEN_MODEL)) - WORKLESS
    expected = {name: HANDWRITTEN_MODEL.get(name, option({}, name)) for name in names}
    return [f"{k}={option(model, k)!r}" for k, v in expected.items() if option(model, k) != v]


def row(label: str, value: float, digits: int = 0) -> None:
    print(f"{label:<52} {value:>10.{digits}f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mamujoco/halfcheetah_6x1.yaml")
    parser.add_argument(
        "--iterations", type=int, default=4, help="training iterations (the first is warm-up)"
    )
    parser.add_argument("--sharing", default=None, help="override the config's network type")
    parser.add_argument("--accelerator", default="cpu", help="cpu or gpu")
    parser.add_argument(
        "--compile-update", action="store_true", help="model.compile_update (compilation in warm-up)"
    )
    parser.add_argument(
        "--compile-actor", action="store_true", help="model.compile_actor (compilation in warm-up)"
    )
    parser.add_argument(
        "--handwritten", action="store_true", help="also run handwritten_fp3o.py, in turns with ours"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, in turns (median reported)")
    args = parser.parse_args()

    model = read_model(args.config)
    if args.sharing:
        model["sharing"] = args.sharing
    for name in ("compile_update", "compile_actor"):
        model[name] = getattr(args, name) or model.get(name, False)
    differences = handwritten_differences(model)
    if args.handwritten and differences:
        parser.error(f"--handwritten runs the paper's HalfCheetah 6x1 only, not {', '.join(differences)}")
    frames = frames_per_batch(model)
    load_before = os.getloadavg()[0]
    if option(model, "num_threads"):  # as the module sets it: the floor's matmuls on the training's threads
        torch.set_num_threads(option(model, "num_threads"))

    env = make_env(**model["env"], num_envs=option(model, "num_envs"))
    env_fps = env_frames_per_second(env, steps=frames, seed=0)
    gflops = matmul_gflops(
        env.n_agents, frames // option(model, "num_minibatches"), option(model, "hidden_size")
    )
    env.close()

    fits, handwritten = [], []
    for _ in range(args.repeats):
        fits.append(fit_throughput(model, args.iterations, args.accelerator))
        if args.handwritten:
            from handwritten_fp3o import train

            handwritten.append(train(args.iterations))

    def median(values: list[Any], field: str) -> float:
        return statistics.median(getattr(v, field) for v in values)

    fit = fits[0] if len(fits) == 1 else None
    train_fps, collect, update = (median(fits, f) for f in ("train_fps", "rollout_seconds", "update_seconds"))
    policy, in_situ = median(fits, "policy_us_per_step"), median(fits, "policy_in_situ_us_per_step")
    floor = Floor(frames / env_fps, median(fits, "update_gflop"), gflops)
    steps = option(model, "rollout_length")
    env_name = f"{model['env']['name']} {task_name(model['env'])}"
    print(
        f"\n{env_name}, sharing={model.get('sharing', 'nops')}, num_envs={model.get('num_envs', 4)}, "
        f"{frames} frames/iteration, {args.iterations} iterations x {args.repeats} runs on {fits[0].device}, "
        f"torch threads={torch.get_num_threads()}, compile_update={model['compile_update']}, "
        f"compile_actor={model['compile_actor']}; "
        f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} CPUs)"
    )
    print(f"{'measure (medians over runs)':<52} {'value':>10}")
    print("-" * 63)
    row("env only (random actions), frames/s", env_fps)
    row("training (steady state, per iteration), frames/s", train_fps)
    if fit is not None:
        row("training (whole fit incl. setup), frames/s", fit.fit_fps)
    row("  per iteration: collection (s)", collect, 2)
    row("    the env alone (s)", frames / env_fps, 2)
    row("    the rollout policy alone (us per step)", policy)
    row("    the policy while collecting (us per step)", in_situ)
    row("    the collector's remainder (us per step)", 1e6 * (collect - frames / env_fps) / steps - in_situ)
    row("  per iteration: GAE + update (s)", update, 2)
    row("floor: env alone + minibatch arithmetic (s)", floor.seconds, 2)
    arithmetic = f"  minibatch arithmetic: {floor.gflop:.1f} GFLOP at {gflops:.0f} GFLOP/s (s)"
    row(arithmetic, floor.arithmetic_seconds, 2)
    print("-" * 63)
    row("ratio training / env only", train_fps / env_fps, 2)
    row("training time / floor", frames / train_fps / floor.seconds, 2)
    row("GAE + update time / minibatch arithmetic", update / floor.arithmetic_seconds, 2)
    if handwritten:
        print("-" * 63)
        row("hand-written loop, frames/s", median(handwritten, "frames_per_second"))
        row("  per iteration: collection (s)", median(handwritten, "collect_seconds"), 2)
        row("    the policy while collecting (us per step)", median(handwritten, "policy_us_per_step"))
        row("  per iteration: GAE + update (s)", median(handwritten, "update_seconds"), 2)
        ratios = [f.train_fps / h.frames_per_second for f, h in zip(fits, handwritten, strict=True)]
        row("ratio training / hand-written (median of turns)", statistics.median(ratios), 2)


if __name__ == "__main__":
    main()
