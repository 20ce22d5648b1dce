"""End-to-end FP3O training frames/s against env-only frames/s of the same environment configuration.

Builds the module from a training config, trains a few iterations, and reports the steady-state
training throughput (rollout + GAE + both FP3O phases, first iteration excluded as warm-up) beside
the env-only throughput of the same environment (random actions, same ``num_envs`` and env kwargs)::

    python benchmarks/train_throughput.py --config configs/mamujoco/halfcheetah_6x1.yaml --iterations 4

``--compile-update`` compiles the update (``model.compile_update``); the compilation falls in the first,
warm-up iteration.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import yaml
from env_throughput import env_frames_per_second

from fp3o_lightning.envs import make_env, task_name
from fp3o_lightning.loggers import MetricsRecorder
from fp3o_lightning.module import FP3OModule


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


def fit_throughput(model: dict[str, Any], iterations: int, accelerator: str) -> FitThroughput:
    """Train ``FP3OModule(**model)`` for ``iterations`` iterations on a ``Trainer(accelerator=...)``."""
    frames = frames_per_batch(model)
    module = FP3OModule(**(model | {"total_frames": iterations * frames}))
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
    return FitThroughput(
        device=str(trainer.strategy.root_device),
        frames_per_batch=frames,
        train_fps=steady(recorder.series("train/fps")),
        fit_fps=iterations * frames / wall,
        rollout_seconds=steady(recorder.series("train/rollout_seconds")),
        update_seconds=steady(recorder.series("train/update_seconds")),
    )


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
    args = parser.parse_args()

    model = read_model(args.config)
    if args.sharing:
        model["sharing"] = args.sharing
    model["compile_update"] = args.compile_update or model.get("compile_update", False)
    frames = frames_per_batch(model)

    env = make_env(**model["env"], num_envs=model.get("num_envs", 4))
    env_fps = env_frames_per_second(env, steps=frames, seed=0)
    env.close()

    fit = fit_throughput(model, args.iterations, args.accelerator)

    env_name = f"{model['env']['name']} {task_name(model['env'])}"
    print(
        f"\n{env_name}, sharing={model.get('sharing', 'nops')}, num_envs={model.get('num_envs', 4)}, "
        f"{frames} frames/iteration, {args.iterations} iterations on {fit.device}, "
        f"torch threads={torch.get_num_threads()}, compile_update={model['compile_update']}"
    )
    print(f"{'measure':<40} {'frames/s':>10}")
    print("-" * 52)
    print(f"{'env only (random actions)':<40} {env_fps:>10.0f}")
    print(f"{'training (steady state, per iteration)':<40} {fit.train_fps:>10.0f}")
    print(f"{'training (whole fit incl. setup)':<40} {fit.fit_fps:>10.0f}")
    print(f"{'  per iteration: collection (s)':<40} {fit.rollout_seconds:>10.2f}")
    print(f"{'  per iteration: GAE + update (s)':<40} {fit.update_seconds:>10.2f}")
    print("-" * 52)
    print(f"{'ratio training / env only':<40} {fit.train_fps / env_fps:>10.2f}")


if __name__ == "__main__":
    main()
