"""Env-only throughput of :class:`~fp3o_lightning.envs.MaMuJoCoEnv` vs. a plain gymnasium-robotics loop.

One frame is one step of one sub-environment (agent-steps are not counted). Every variant steps with fixed
random in-bound actions, resets finished episodes and produces the same data (per-agent observations,
global state, team reward, terminated/truncated):

* ``MaMuJoCoEnv``: ``num_envs`` sub-envs in this process, through ``step_and_maybe_reset``;
* ``plain parallel_env loop``: a Python loop over ``num_envs`` gymnasium-robotics ``parallel_env`` instances
  in this process (``step`` and ``state()``), the baseline of the 1.5x target;
* ``ParallelEnv``: TorchRL's ``ParallelEnv`` of ``--workers`` processes, each a ``MaMuJoCoEnv`` of
  ``num_envs / workers`` sub-envs (the same total), to use several cores.

The variants are built once and timed in turns, ``--repeats`` times (so a change of machine load hits them
alike); the table gives the best and the median run::

    python benchmarks/env_throughput.py --scenario HalfCheetah --agent-conf 6x1 --num-envs 4 --steps 4000
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torchrl.envs import EnvBase


class _Variant:
    """One way of stepping ``num_envs`` sub-envs: ``iteration()`` steps each once."""

    def __init__(self, name: str, frames: int, iteration: Callable[[], None], close: Callable[[], None]):
        self.name, self.frames, self.iteration, self.close = name, frames, iteration, close
        self.fps: list[float] = []

    def run(self, steps: int, warmup: int = 20) -> None:
        iters = max(1, steps // self.frames)
        for _ in range(min(warmup, iters)):
            self.iteration()
        start = time.perf_counter()
        for _ in range(iters):
            self.iteration()
        self.fps.append(iters * self.frames / (time.perf_counter() - start))


def torchrl_variant(name: str, env: EnvBase, seed: int) -> _Variant:
    """``env.step_and_maybe_reset`` with a prebuilt random action tensor."""
    torch.manual_seed(seed)
    action = env.full_action_spec[("agents", "action")].rand()
    state = {"td": env.reset()}

    def iteration() -> None:
        td = state["td"]
        td.set(("agents", "action"), action)
        _, state["td"] = env.step_and_maybe_reset(td)

    return _Variant(name, env.batch_size.numel(), iteration, env.close)


def plain_variant(
    scenario: str, agent_conf: str | None, num_envs: int, seed: int, max_episode_steps: int
) -> _Variant:
    """A Python loop over ``num_envs`` gymnasium-robotics ``parallel_env`` instances."""
    from gymnasium_robotics import mamujoco_v1

    envs = [mamujoco_v1.parallel_env(scenario, agent_conf, agent_obsk=1) for _ in range(num_envs)]
    rng = np.random.default_rng(seed)
    actions = [
        {
            a: rng.uniform(e.action_space(a).low, e.action_space(a).high).astype(np.float32)
            for a in e.possible_agents
        }
        for e in envs
    ]
    elapsed_steps = [0] * num_envs
    for i, e in enumerate(envs):
        e.reset(seed=seed + i)

    def iteration() -> None:
        for i, e in enumerate(envs):
            _obs, _rew, term, trunc, _info = e.step(actions[i])
            _state = e.state()
            elapsed_steps[i] += 1
            agent = e.possible_agents[0]
            if term[agent] or trunc[agent] or elapsed_steps[i] >= max_episode_steps:
                e.reset()
                elapsed_steps[i] = 0

    def close() -> None:
        for e in envs:
            e.close()

    return _Variant("plain parallel_env loop", num_envs, iteration, close)


def parallel_variant(
    scenario: str, agent_conf: str | None, num_envs: int, workers: int, seed: int
) -> _Variant:
    """TorchRL ``ParallelEnv`` of ``workers`` processes with ``num_envs // workers`` sub-envs each."""
    from torchrl.envs import ParallelEnv

    from fp3o_lightning.envs import MaMuJoCoEnv

    per_worker = num_envs // workers
    env = ParallelEnv(
        workers,
        functools.partial(MaMuJoCoEnv, scenario, agent_conf, num_envs=per_worker),
        create_env_kwargs=[{"seed": seed + w * per_worker} for w in range(workers)],
        num_sub_threads=1,
    )
    return torchrl_variant(f"ParallelEnv {workers} workers x {per_worker}", env, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="HalfCheetah")
    parser.add_argument("--agent-conf", default="6x1", help="agent factorisation; 'none' for single-agent")
    parser.add_argument("--num-envs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4000, help="frames (sub-env steps) per timed run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant, taken in turns")
    parser.add_argument("--workers", type=int, default=2, help="ParallelEnv processes; 0 skips it")
    args = parser.parse_args()
    agent_conf = None if args.agent_conf.lower() == "none" else args.agent_conf
    torch.set_num_threads(1)
    from fp3o_lightning.envs import MaMuJoCoEnv

    env = MaMuJoCoEnv(args.scenario, agent_conf, num_envs=args.num_envs, seed=args.seed)
    variants = [
        torchrl_variant("MaMuJoCoEnv.step_and_maybe_reset", env, args.seed),
        plain_variant(args.scenario, agent_conf, args.num_envs, args.seed, 1000),
    ]
    if args.workers > 0:
        if args.num_envs % args.workers:
            parser.error(f"--num-envs {args.num_envs} is not a multiple of --workers {args.workers}")
        variants.append(parallel_variant(args.scenario, agent_conf, args.num_envs, args.workers, args.seed))

    load_before = os.getloadavg()
    try:
        for _ in range(args.repeats):
            for variant in variants:
                variant.run(args.steps)
    finally:
        for variant in variants:
            variant.close()
    load_after = os.getloadavg()

    print(
        f"\n{args.scenario} {agent_conf}, num_envs={args.num_envs}, {args.steps} frames per run, "
        f"{args.repeats} runs per variant (1 frame = 1 sub-env step); {os.cpu_count()} CPUs, "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    print(f"{'variant':<36} {'best f/s':>10} {'median f/s':>11} {'us/frame':>10}")
    print("-" * 70)
    for v in variants:
        best, median = max(v.fps), statistics.median(v.fps)
        print(f"{v.name:<36} {best:>10.0f} {median:>11.0f} {1e6 / best:>10.1f}")
    print("-" * 70)

    def ratio(label: str, a: _Variant, b: _Variant) -> None:
        median = statistics.median(x / y for x, y in zip(a.fps, b.fps, strict=True))  # same turn
        print(f"{label:<36} {max(a.fps) / max(b.fps):>10.2f} {median:>11.2f}")

    ratio("MaMuJoCoEnv / plain (target >= 1.5)", variants[0], variants[1])
    if len(variants) > 2:
        ratio("ParallelEnv / in-process MaMuJoCoEnv", variants[2], variants[0])


if __name__ == "__main__":
    main()
