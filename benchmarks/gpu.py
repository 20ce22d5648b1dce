"""The GPU benchmark of issue 13: HalfCheetah 6x1 on ``gpu`` and ``cpu``, VMAS balance from 10 to 16384 envs.

Prints one table, in one run:

* the paper's HalfCheetah 6x1 config (``configs/mamujoco/halfcheetah_6x1.yaml``): training frames/s with the
  learner on ``gpu`` and on ``cpu`` (the environment simulates on the CPU in both);
* VMAS ``balance`` (``configs/vmas/balance.yaml``, everything on the training device) with MAPPO and FP3O at
  each ``--vmas-envs`` size, ``--rollout-length`` steps per iteration, ``--ppo-epochs`` x
  ``--num-minibatches``: env-only frames/s (``step_and_maybe_reset`` with one fixed random action, resets
  included), collection frames/s (the module's rollout: policy and environment), training frames/s (rollout,
  GAE and update) and the peak GPU memory of the training (``torch.cuda.max_memory_allocated``).

Every training run has ``--iterations`` timed iterations after one warm-up iteration; evaluation and
checkpoints are off. Issue 13's targets on an H100/H200: at 4096+ VMAS environments training >= 0.5x env-only;
HalfCheetah on ``gpu`` no slower than on ``cpu``. On the GPU machine (about 4 minutes on an H100)::

    python benchmarks/gpu.py --json gpu.json

and a smoke test on the CPU::

    python benchmarks/gpu.py --accelerator cpu --vmas-envs 10 64 --iterations 1
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from train_throughput import fit_throughput, read_model, synchronize

from fp3o_lightning.envs.vmas import VMASEnv

ROOT = Path(__file__).resolve().parent.parent
HALFCHEETAH = ROOT / "configs" / "mamujoco" / "halfcheetah_6x1.yaml"
BALANCE = ROOT / "configs" / "vmas" / "balance.yaml"
NO_EVALUATION = {"eval_interval": 0, "checkpoint_interval": 0}


def vmas_env_only(
    model: dict[str, Any], device: torch.device, steps: int, repeats: int = 3
) -> dict[str, Any]:
    """``env_fps``: frames/s of the VMAS env of ``model`` alone on ``device``, the median of ``repeats`` runs
    of ``steps`` steps after a warm-up (single runs of the same size varied by 20% on an H200).

    Written here, not ``env_throughput.env_frames_per_second``: that one takes its actions as NumPy arrays
    (for CPU environments), which would copy them to the device at every step.
    """
    env_kwargs = {k: v for k, v in model["env"].items() if k != "name"}
    env = VMASEnv(num_envs=model["num_envs"], seed=0, device=device, **env_kwargs)
    td = env.reset()
    td.set(("agents", "action"), env.full_action_spec["agents", "action"].rand())
    for _ in range(max(1, steps // 10)):
        _, td = env.step_and_maybe_reset(td)
    rates = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            _, td = env.step_and_maybe_reset(td)
        synchronize(device)
        rates.append(steps * env.num_envs / (time.perf_counter() - start))
    env.close()
    return {"env_fps": statistics.median(rates)}


def measured_fit(model: dict[str, Any], iterations: int, accelerator: str) -> dict[str, Any]:
    """:func:`fit_throughput` of one warm-up and ``iterations`` timed iterations, with the peak GPU memory."""
    cuda = accelerator == "gpu"
    if cuda:
        gc.collect()  # the previous runs' modules and trainers (reference cycles) free their GPU memory
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    fit = fit_throughput(model, iterations + 1, accelerator)
    figures = asdict(fit) | {"collect_fps": fit.frames_per_batch / fit.rollout_seconds}
    figures["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return figures


def runs(args: argparse.Namespace) -> Iterator[tuple[dict[str, Any], Callable[[], dict[str, Any]]]]:
    """``(row, measure)`` for every run: the row's labels, and what measures its figures."""
    if not args.no_halfcheetah:
        cheetah = read_model(str(HALFCHEETAH)) | NO_EVALUATION | speed_options(args)
        for accelerator in ["gpu", "cpu"] if args.accelerator == "gpu" else ["cpu"]:
            row = {
                "run": "HalfCheetah 6x1 (paper)",
                "accelerator": accelerator,
                "num_envs": cheetah["num_envs"],
            }
            yield row, functools.partial(measured_fit, cheetah, args.iterations, accelerator)
    base = read_model(str(BALANCE)) | NO_EVALUATION | {"diagnostics_interval": 0}
    base |= {
        "rollout_length": args.rollout_length,
        "ppo_epochs": args.ppo_epochs,
        "num_minibatches": args.num_minibatches,
    } | speed_options(args)
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    for num_envs in args.vmas_envs:
        row = {"run": "VMAS balance env only", "accelerator": args.accelerator, "num_envs": num_envs}
        yield (
            row,
            functools.partial(vmas_env_only, base | {"num_envs": num_envs}, device, args.rollout_length),
        )
        for algorithm in args.algorithms:
            model = base | {"num_envs": num_envs, "algorithm": algorithm}
            row = {"run": f"VMAS balance {algorithm}", "accelerator": args.accelerator, "num_envs": num_envs}
            yield row, functools.partial(measured_fit, model, args.iterations, args.accelerator)


def speed_options(args: argparse.Namespace) -> dict[str, Any]:
    """The model options of every run that change its speed, not what it learns."""
    return {"compile_update": args.compile_update, "matmul_precision": args.matmul_precision}


def measured(row: dict[str, Any], measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``row`` with the figures of ``measure()``, or with its error."""
    try:
        return row | measure()
    except Exception as err:  # a one-shot GPU session: one failed run must not lose the others' figures
        traceback.print_exc()
        return row | {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}


def add_train_per_env(row: dict[str, Any], env_fps: dict[int, float]) -> None:
    """A VMAS training row's training frames/s over the env-only frames/s at its size (``env_fps``)."""
    if row["run"].startswith("VMAS") and row.get("train_fps") and env_fps.get(row["num_envs"]):
        row["train_per_env"] = row["train_fps"] / env_fps[row["num_envs"]]


COLUMNS = (  # (key, heading, width, format)
    ("env_fps", "env f/s", 9, ".0f"),
    ("collect_fps", "collect f/s", 11, ".0f"),
    ("train_fps", "train f/s", 9, ".0f"),
    ("train_per_env", "train/env", 9, ".2f"),
    ("rollout_seconds", "rollout s", 9, ".2f"),
    ("update_seconds", "update s", 8, ".2f"),
    ("peak_gpu_mib", "peak MiB", 8, ".0f"),
)


def header() -> str:
    cells = "".join(f" {heading:>{width}}" for _, heading, width, _ in COLUMNS)
    return f"{'run':<26} {'device':>6} {'envs':>6}{cells}"


def line(row: dict[str, Any]) -> str:
    """One table line: a ``-`` where a figure does not apply, the error where the run failed."""
    labels = f"{row['run']:<26} {row['accelerator']:>6} {row['num_envs']:>6}"
    if row.get("error"):
        return f"{labels} failed: {row['error']}"
    cells = "".join(
        f" {row[key]:>{width}{spec}}" if row.get(key) is not None else f" {'-':>{width}}"
        for key, _, width, spec in COLUMNS
    )
    return labels + cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="gpu", help="gpu (HalfCheetah on gpu and cpu) or cpu")
    parser.add_argument("--vmas-envs", type=int, nargs="+", default=[10, 1024, 4096, 16384])
    parser.add_argument("--algorithms", nargs="+", default=["mappo", "fp3o"])
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations (after 1 warm-up)")
    parser.add_argument("--rollout-length", type=int, default=100, help="VMAS steps per iteration")
    parser.add_argument("--ppo-epochs", type=int, default=5, help="VMAS PPO epochs")
    parser.add_argument("--num-minibatches", type=int, default=8, help="VMAS minibatches per epoch")
    parser.add_argument("--compile-update", action="store_true", help="model.compile_update everywhere")
    parser.add_argument(
        "--matmul-precision", default="highest", help="model.matmul_precision everywhere (high: TF32)"
    )
    parser.add_argument("--no-halfcheetah", action="store_true", help="VMAS only")
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the figures here (after each run)"
    )
    args = parser.parse_args()
    if args.accelerator not in ("gpu", "cpu"):
        parser.error("--accelerator is gpu or cpu")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)

    machine = {
        "device": torch.cuda.get_device_name() if args.accelerator == "gpu" else "CPU only",
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_before": os.getloadavg()[0],
        "iterations": args.iterations,
    } | speed_options(args)
    rows: list[dict[str, Any]] = []
    env_fps: dict[int, float] = {}
    start = time.perf_counter()
    for row, measure in runs(args):
        row = measured(row, measure)
        if "env_fps" in row:
            env_fps[row["num_envs"]] = row["env_fps"]
        add_train_per_env(row, env_fps)
        rows.append(row | {"seconds": time.perf_counter() - start})
        print(f"[{rows[-1]['seconds']:.0f} s] {line(row)}", flush=True)
        machine["load_after"] = os.getloadavg()[0]
        if args.json:
            args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))

    print(
        f"\n{machine['device']}, {machine['cpus']} CPUs, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), load average {machine['load_before']:.2f} before, "
        f"{machine['load_after']:.2f} after, {time.perf_counter() - start:.0f} s; {args.iterations} timed "
        f"iterations after 1 warm-up; compile_update={args.compile_update}, "
        f"matmul_precision={args.matmul_precision}"
    )
    print(header())
    print("-" * len(header()))
    for row in rows:
        print(line(row))
    cheetah = {
        row["accelerator"]: row.get("train_fps") for row in rows if row["run"].startswith("HalfCheetah")
    }
    if cheetah.get("gpu") and cheetah.get("cpu"):
        print(f"HalfCheetah training gpu / cpu: {cheetah['gpu'] / cheetah['cpu']:.2f} (target >= 1)")
    print("VMAS target: train/env >= 0.5 at 4096+ environments")


if __name__ == "__main__":
    main()
