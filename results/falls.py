"""How often a trained policy's episodes end early (on Hopper, Walker2d and Ant: the robot falls), with its
deterministic actions (as the evaluations score it) and with sampled ones (as it trains).

    python results/falls.py /work/runs/<run>/checkpoints/<id>/last.ckpt [more.ckpt ...] --episodes 128

Prints one line per checkpoint and mode: the return's mean and std, the mean length, and the share of
episodes shorter than the task's limit. The starts are seeded (``--seed``), the same for every checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fp3o_lightning.module import FP3OModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--episodes", type=int, default=128)
    parser.add_argument("--seed", type=int, default=12345, help="the evaluation's starts (and samples)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("checkpoint | frames | actions | return mean ± std | length mean | fell")
    for path in args.checkpoints:
        module = FP3OModule.load_from_checkpoint(path, map_location="cpu", eval_episodes=args.episodes)
        frames = torch.load(path, map_location="cpu", weights_only=False)["fp3o"]["frames"]
        for deterministic in (True, False):
            torch.manual_seed(args.seed)
            result = module.evaluate(deterministic, seed=args.seed)  # the same starts for all
            returns, lengths = result["returns"].float(), result["lengths"]
            limit = module._runtime["eval_env"].max_episode_steps
            print(
                f"{path} | {frames} | {'deterministic' if deterministic else 'sampled'} | "
                f"{returns.mean():.1f} ± {returns.std(unbiased=False):.1f} | {lengths.float().mean():.1f} | "
                f"{(lengths < limit).float().mean():.1%}"
            )
        module._runtime["eval_env"].close()


if __name__ == "__main__":
    main()
