"""Env-only throughput of :class:`~fp3o_lightning.envs.smax.SMAXEnv` (JaxMARL's SMAX, no StarCraft II).

One frame is one step of one sub-environment (agent-steps are not counted). Each setting builds the env
(compiling its reset and step programs; the compile time is printed separately), runs warm-up steps, then
times ``step_and_maybe_reset`` with random valid actions (uniform among each agent's available actions,
drawn from the action mask at every step; the drawing is timed too). The load average is printed next to
each figure, as the machine may be shared::

    python benchmarks/smax_throughput.py --map 3s5z --num-envs 1 8 64 --iters 300
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def random_valid_actions(mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One action per agent, uniform among the allowed ones of ``mask`` ``[..., n_actions]``."""
    scores = torch.rand(mask.shape, generator=gen) * mask
    return scores.argmax(-1)


def bench(map_name: str, num_envs: int, iters: int, warmup: int, seed: int) -> dict[str, float]:
    """Compile time (s) and frames/s of ``SMAXEnv(map_name, num_envs)`` with random valid actions."""
    from fp3o_lightning.envs.smax import SMAXEnv

    start = time.perf_counter()
    env = SMAXEnv(map_name, num_envs=num_envs, seed=seed)
    build_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(seed)
    td = env.reset()
    for _ in range(warmup):
        td.set(("agents", "action"), random_valid_actions(td["agents", "action_mask"], gen))
        _, td = env.step_and_maybe_reset(td)
    episodes = 0
    start = time.perf_counter()
    for _ in range(iters):
        td.set(("agents", "action"), random_valid_actions(td["agents", "action_mask"], gen))
        data, td = env.step_and_maybe_reset(td)
        episodes += int(data["next", "done"].sum())
    elapsed = time.perf_counter() - start
    return {
        "compile_s": env.compile_time_s,
        "build_s": build_s,
        "fps": iters * num_envs / elapsed,
        "episodes": episodes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--map", default="3s5z", help="SMAX map name")
    parser.add_argument("--num-envs", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--iters", type=int, default=300, help="timed steps of the batched env per setting")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps before timing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"SMAXEnv {args.map}: env-only frames/s with random valid actions ({os.cpu_count()} CPUs)")
    header = f"{'num_envs':>8} {'compile s':>10} {'build s':>8} {'frames/s':>10} {'episodes':>8}"
    print(f"{header}  load (1/5/15 min)")
    for num_envs in args.num_envs:
        result = bench(args.map, num_envs, args.iters, args.warmup, args.seed)
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(
            f"{num_envs:>8} {result['compile_s']:>10.2f} {result['build_s']:>8.2f} {result['fps']:>10.0f} "
            f"{result['episodes']:>8}  {load}",
            flush=True,
        )


if __name__ == "__main__":
    main()
