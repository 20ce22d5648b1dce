"""Wall time of an ``fp3o sweep`` of N seeds on Ray against one ``fp3o fit`` of the same config.

Runs ``fp3o fit`` once (seed 0), then ``fp3o sweep --seeds 0 … N-1`` with the same fit arguments,
each in a fresh directory under ``--out`` (its own MLflow store and checkpoints), and prints both wall
times (process start to exit, start-up included) and their ratio. On a machine with N free cores the
target is a ratio under 1.6 for N = 2 (Ray runs the seeds at once, one core each)::

    python benchmarks/sweep_scaling.py --config configs/quickstart.yaml --seeds 2 --frames 60000

Check that nothing else is using the cores first (``uptime``): the ratio means little otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time


def timed(command: list[str], cwd: str) -> float:
    """Run ``command`` in ``cwd`` (output to ``cwd/log.txt``); its wall time in seconds; fail loudly."""
    os.makedirs(cwd)
    start = time.perf_counter()
    with open(os.path.join(cwd, "log.txt"), "w") as log:
        code = subprocess.run(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if code:
        sys.exit(f"{' '.join(command)} exited with {code}; see {cwd}/log.txt")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--seeds", type=int, default=2, help="seeds in the sweep (default: 2)")
    parser.add_argument("--frames", type=int, default=60000, help="--model.total_frames of every run")
    parser.add_argument("--out", default="/tmp/sweep_scaling", help="scratch directory (replaced)")
    args = parser.parse_args()

    config = os.path.abspath(args.config)
    fit_args = ["--model.total_frames", str(args.frames), "--trainer.enable_progress_bar", "false"]
    shutil.rmtree(args.out, ignore_errors=True)
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    one = timed(
        ["fp3o", "fit", "--config", config, "--model.seed", "0", *fit_args], os.path.join(args.out, "one")
    )
    print(f"one fp3o fit ({args.frames} frames): {one:.1f}s", flush=True)
    seeds = [str(s) for s in range(args.seeds)]
    sweep = timed(
        ["fp3o", "sweep", "--config", config, "--seeds", *seeds, "--", *fit_args],
        os.path.join(args.out, "sweep"),
    )
    print(f"fp3o sweep of {args.seeds} seeds: {sweep:.1f}s")
    print(f"ratio sweep / one run: {sweep / one:.2f} (sequential would be about {args.seeds})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
