"""Env-only throughput of :class:`~fp3o_lightning.envs.MaMuJoCoEnv` vs. a plain gymnasium-robotics loop.

One frame is one step of one sub-environment (agent-steps are not counted). Both variants run in this
process with fixed random in-bound actions, reset finished episodes and produce the same data (per-agent
observations, global state, team reward, terminated/truncated)::

    python benchmarks/env_throughput.py --scenario HalfCheetah --agent-conf 6x1 --num-envs 4 --steps 4000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torchrl.envs import EnvBase


def env_frames_per_second(env: EnvBase, steps: int, seed: int) -> float:
    """Frames/s of ``env.step_and_maybe_reset`` with a prebuilt random action tensor (20 warm-up steps)."""
    torch.manual_seed(seed)
    action = env.full_action_spec[("agents", "action")].rand()
    td = env.reset()
    iters = max(1, steps // env.batch_size.numel())
    for _ in range(min(20, iters)):  # warm-up
        td.set(("agents", "action"), action)
        _, td = env.step_and_maybe_reset(td)
    start = time.perf_counter()
    for _ in range(iters):
        td.set(("agents", "action"), action)
        _, td = env.step_and_maybe_reset(td)
    return iters * env.batch_size.numel() / (time.perf_counter() - start)


def bench_torchrl(scenario: str, agent_conf: str | None, num_envs: int, steps: int, seed: int) -> float:
    """Return frames/s of ``MaMuJoCoEnv`` stepped with random actions."""
    from fp3o_lightning.envs import MaMuJoCoEnv

    env = MaMuJoCoEnv(scenario, agent_conf, num_envs=num_envs, seed=seed)
    try:
        return env_frames_per_second(env, steps, seed)
    finally:
        env.close()


def bench_plain(
    scenario: str, agent_conf: str | None, num_envs: int, steps: int, seed: int, max_episode_steps: int
) -> float:
    """Return frames/s of a Python loop over ``num_envs`` gymnasium-robotics ``parallel_env`` instances."""
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

    def one_iteration() -> None:
        for i, e in enumerate(envs):
            _obs, rew, term, trunc, _info = e.step(actions[i])
            _state = e.state()
            elapsed_steps[i] += 1
            agent = e.possible_agents[0]
            if term[agent] or trunc[agent] or elapsed_steps[i] >= max_episode_steps:
                e.reset()
                elapsed_steps[i] = 0

    iters = max(1, steps // num_envs)
    for _ in range(min(20, iters)):  # warm-up
        one_iteration()
    start = time.perf_counter()
    for _ in range(iters):
        one_iteration()
    elapsed = time.perf_counter() - start
    for e in envs:
        e.close()
    return iters * num_envs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="HalfCheetah")
    parser.add_argument("--agent-conf", default="6x1", help="agent factorisation; 'none' for single-agent")
    parser.add_argument("--num-envs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4000, help="frames (sub-env steps) per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="best-of-N timing per variant")
    args = parser.parse_args()
    agent_conf = None if args.agent_conf.lower() == "none" else args.agent_conf
    torch.set_num_threads(1)

    rows = []
    for name, fn in (
        (
            "MaMuJoCoEnv.step_and_maybe_reset",
            lambda: bench_torchrl(args.scenario, agent_conf, args.num_envs, args.steps, args.seed),
        ),
        (
            "plain parallel_env loop",
            lambda: bench_plain(args.scenario, agent_conf, args.num_envs, args.steps, args.seed, 1000),
        ),
    ):
        rows.append((name, max(fn() for _ in range(args.repeats))))

    print(
        f"\n{args.scenario} {agent_conf}, num_envs={args.num_envs}, {args.steps} frames per run, "
        f"best of {args.repeats} (1 frame = 1 sub-env step)"
    )
    print(f"{'variant':<36} {'frames/s':>10} {'us/frame':>10}")
    print("-" * 58)
    for name, fps in rows:
        print(f"{name:<36} {fps:>10.0f} {1e6 / fps:>10.1f}")
    print("-" * 58)
    print(f"{'ratio MaMuJoCoEnv / plain':<36} {rows[0][1] / rows[1][1]:>10.2f}")


if __name__ == "__main__":
    main()
