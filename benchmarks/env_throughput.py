"""Env-only throughput of :class:`~fp3o_lightning.envs.MaMuJoCoEnv` vs. a plain gymnasium-robotics loop.

One frame is one step of one sub-environment (agent-steps are not counted). Every variant steps with the same
fixed random in-bound actions from the same seeds (so the same trajectories: MuJoCo's cost depends on the
contacts), resets finished episodes and produces the same data (per-agent observations, global state, team
reward, terminated/truncated):

* ``MaMuJoCoEnv``: ``num_envs`` sub-envs in this process, through ``step_and_maybe_reset``;
* ``plain parallel_env loop``: a Python loop over ``num_envs`` gymnasium-robotics ``parallel_env`` instances
  in this process (``step`` and ``state()``), the baseline of the 1.5x target;
* ``ParallelEnv``: TorchRL's ``ParallelEnv`` of ``--workers`` processes, each a ``MaMuJoCoEnv`` of
  ``num_envs / workers`` sub-envs (the same total), to use several cores.

The variants are built once and timed in turns, ``--repeats`` times (so a change of machine load hits them
alike); the table gives the best and the median run by wall clock, and, for the in-process variants, the
frames per second of this process's CPU time, which other processes on a shared machine disturb less::

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

    def __init__(
        self,
        name: str,
        frames: int,
        iteration: Callable[[], None],
        close: Callable[[], None],
        in_process: bool = True,
    ):
        self.name, self.frames, self.iteration, self.close = name, frames, iteration, close
        self.in_process = in_process  # False: the work runs in other processes (CPU time meaningless)
        self.fps: list[float] = []  # wall clock
        self.cpu_fps: list[float] = []  # CPU time of this process

    def run(self, steps: int, warmup: int = 20) -> None:
        iters = max(1, steps // self.frames)
        for _ in range(min(warmup, iters)):
            self.iteration()
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(iters):
            self.iteration()
        frames = iters * self.frames
        self.fps.append(frames / (time.perf_counter() - start))
        self.cpu_fps.append(frames / max(time.process_time() - cpu_start, 1e-9))


def random_actions(env: EnvBase, seed: int) -> np.ndarray:
    """Fixed in-bound float32 actions ``[num_envs, n_agents, max_action_dim]`` of a ``MaMuJoCoEnv``."""
    space = env.full_action_spec[("agents", "action")].space
    low, high = space.low.numpy(), space.high.numpy()
    rng = np.random.default_rng(seed)
    return (low + (high - low) * rng.uniform(size=low.shape)).astype(np.float32)


def torchrl_variant(name: str, env: EnvBase, actions: np.ndarray, in_workers: bool = False) -> _Variant:
    """``env.step_and_maybe_reset`` with the fixed ``actions`` (reshaped to the env's batch)."""
    action = torch.from_numpy(actions).reshape(env.full_action_spec[("agents", "action")].shape)
    state = {"td": env.reset()}

    def iteration() -> None:
        td = state["td"]
        td.set(("agents", "action"), action)
        _, state["td"] = env.step_and_maybe_reset(td)

    return _Variant(name, env.batch_size.numel(), iteration, env.close, in_process=not in_workers)


def env_frames_per_second(env: EnvBase, steps: int, seed: int) -> float:
    """Frames/s of any of the package's environments stepped with one fixed random action from its spec."""
    torch.manual_seed(seed)
    variant = torchrl_variant("env", env, env.full_action_spec[("agents", "action")].rand().numpy())
    variant.run(steps)
    return variant.fps[0]


def plain_variant(
    scenario: str,
    agent_conf: str | None,
    actions: np.ndarray,
    action_sizes: list[int],
    seed: int,
    max_episode_steps: int,
) -> _Variant:
    """A Python loop over ``len(actions)`` gymnasium-robotics ``parallel_env`` instances."""
    from gymnasium_robotics import mamujoco_v1

    num_envs = len(actions)
    envs = [mamujoco_v1.parallel_env(scenario, agent_conf, agent_obsk=1) for _ in range(num_envs)]
    agent_actions = [
        {agent: actions[i, a, : action_sizes[a]] for a, agent in enumerate(e.possible_agents)}
        for i, e in enumerate(envs)
    ]
    elapsed_steps = [0] * num_envs
    for i, e in enumerate(envs):
        e.reset(seed=seed + i)

    def iteration() -> None:
        for i, e in enumerate(envs):
            _obs, _rew, term, trunc, _info = e.step(agent_actions[i])
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
    scenario: str, agent_conf: str | None, actions: np.ndarray, workers: int, seed: int
) -> _Variant:
    """TorchRL ``ParallelEnv`` of ``workers`` processes with ``len(actions) // workers`` sub-envs each."""
    from torchrl.envs import ParallelEnv

    from fp3o_lightning.envs import MaMuJoCoEnv

    per_worker = len(actions) // workers
    env = ParallelEnv(
        workers,
        functools.partial(MaMuJoCoEnv, scenario, agent_conf, num_envs=per_worker),
        create_env_kwargs=[{"seed": seed + w * per_worker} for w in range(workers)],  # as in-process
        num_sub_threads=1,
    )
    return torchrl_variant(f"ParallelEnv {workers} workers x {per_worker}", env, actions, in_workers=True)


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

    if args.workers > 0 and args.num_envs % args.workers:
        parser.error(f"--num-envs {args.num_envs} is not a multiple of --workers {args.workers}")
    env = MaMuJoCoEnv(args.scenario, agent_conf, num_envs=args.num_envs, seed=args.seed)
    actions = random_actions(env, args.seed)
    variants = [
        torchrl_variant("MaMuJoCoEnv.step_and_maybe_reset", env, actions),
        plain_variant(args.scenario, agent_conf, actions, env.action_sizes, args.seed, env.max_episode_steps),
    ]
    if args.workers > 0:
        variants.append(parallel_variant(args.scenario, agent_conf, actions, args.workers, args.seed))

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
    print("frames/s by wall clock (best and median run), and by this process's CPU time (median run)")
    print(f"{'variant':<38} {'best f/s':>9} {'median f/s':>11} {'us/frame':>9} {'CPU f/s':>9}")
    print("-" * 80)
    for v in variants:
        best, median = max(v.fps), statistics.median(v.fps)
        cpu = f"{statistics.median(v.cpu_fps):>9.0f}" if v.in_process else f"{'-':>9}"
        print(f"{v.name:<38} {best:>9.0f} {median:>11.0f} {1e6 / best:>9.1f} {cpu}")
    print("-" * 80)

    def ratio(label: str, a: _Variant, b: _Variant) -> None:
        median = statistics.median(x / y for x, y in zip(a.fps, b.fps, strict=True))  # same turn
        cpu = statistics.median(a.cpu_fps) / statistics.median(b.cpu_fps)
        cpu_text = f"{cpu:>9.2f}" if a.in_process and b.in_process else f"{'-':>9}"
        print(f"{label:<38} {max(a.fps) / max(b.fps):>9.2f} {median:>11.2f} {'':>9} {cpu_text}")

    ratio("MaMuJoCoEnv / plain (target >= 1.5)", variants[0], variants[1])
    if len(variants) > 2:
        ratio("ParallelEnv / in-process MaMuJoCoEnv", variants[2], variants[0])


if __name__ == "__main__":
    main()
