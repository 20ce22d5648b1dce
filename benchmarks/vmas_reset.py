"""A partial reset of VMAS sub-environments against one step of all of them, as a ratio of wall times.

Resets a random subset (half by default) of ``VMASEnv`` sub-environments through TorchRL's ``"_reset"`` key,
as a collector does when some episodes end, and steps all of them with random actions; prints the median
times and their ratio (issue 13's target: at most 3)::

    python benchmarks/vmas_reset.py                       # 1024 balance envs on the CPU, a random half
    python benchmarks/vmas_reset.py --device cuda --num-envs 4096
    python benchmarks/vmas_reset.py --reset-at            # also VMAS's reset_at per index (the old way)

Wall times depend on the machine's load: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from fp3o_lightning.envs.vmas import VMASEnv


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls (after one warm-up call), synchronised on CUDA."""

    def timed() -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()
    return statistics.median(timed() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="balance")
    parser.add_argument("--num-envs", type=int, default=1024)
    parser.add_argument("--fraction", type=float, default=0.5, help="share of sub-environments reset")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--reset-at", action="store_true", help="also time VMAS's reset_at per index (one call, slow)"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    env = VMASEnv(args.scenario, num_envs=args.num_envs, seed=0, device=args.device)
    td = env.reset()
    spec = env.full_action_spec["agents", "action"]

    def step() -> None:
        env.step(td.set(("agents", "action"), spec.rand()))

    def random_mask() -> torch.Tensor:
        return torch.rand(args.num_envs, device=env.device) < args.fraction

    def partial_reset() -> None:
        env.reset(td.set("_reset", random_mask().unsqueeze(-1)))

    def reset_at() -> None:
        with env._own_rng():
            for index in random_mask().nonzero().flatten().tolist():
                env._sim.reset_at(index, return_observations=False)

    step_s = median_seconds(step, args.repeats, env.device)
    reset_s = median_seconds(partial_reset, args.repeats, env.device)
    print(
        f"VMAS {args.scenario}, {args.num_envs} envs on {env.device}, reset share {args.fraction}, "
        f"median of {args.repeats}, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'one step of all envs (ms)':<36} {step_s * 1e3:>10.2f}")
    print(f"{'partial reset (ms)':<36} {reset_s * 1e3:>10.2f}")
    print(f"{'ratio partial reset / step':<36} {reset_s / step_s:>10.2f}")
    if args.reset_at:
        loop_s = median_seconds(reset_at, 1, env.device)
        print(f"{'reset_at per index (ms)':<36} {loop_s * 1e3:>10.2f}")
        print(f"{'ratio reset_at per index / step':<36} {loop_s / step_s:>10.2f}")


if __name__ == "__main__":
    main()
