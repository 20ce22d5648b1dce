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

    with open(args.config) as file:
        model = yaml.safe_load(file)["model"]
    if args.sharing:
        model["sharing"] = args.sharing
    frames_per_batch = model.get("num_envs", 4) * model.get("rollout_length", 1000)
    model["total_frames"] = args.iterations * frames_per_batch
    model["compile_update"] = args.compile_update or model.get("compile_update", False)

    env = make_env(**model["env"], num_envs=model.get("num_envs", 4))
    env_fps = env_frames_per_second(env, steps=frames_per_batch, seed=0)
    env.close()

    recorder = MetricsRecorder()
    module = FP3OModule(**model)
    trainer = L.Trainer(
        accelerator=args.accelerator,
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
    train_fps = steady(recorder.series("train/fps"))

    env_name = f"{model['env']['name']} {task_name(model['env'])}"
    print(
        f"\n{env_name}, sharing={model.get('sharing', 'nops')}, num_envs={model.get('num_envs', 4)}, "
        f"{frames_per_batch} frames/iteration, {args.iterations} iterations on "
        f"{trainer.strategy.root_device}, torch threads={torch.get_num_threads()}, "
        f"compile_update={model['compile_update']}"
    )
    print(f"{'measure':<40} {'frames/s':>10}")
    print("-" * 52)
    print(f"{'env only (random actions)':<40} {env_fps:>10.0f}")
    print(f"{'training (steady state, per iteration)':<40} {train_fps:>10.0f}")
    print(f"{'training (whole fit incl. setup)':<40} {args.iterations * frames_per_batch / wall:>10.0f}")
    collect, update = (steady(recorder.series(f"train/{part}_seconds")) for part in ("collect", "update"))
    print(f"{'  per iteration: collection (s)':<40} {collect:>10.2f}")
    print(f"{'  per iteration: GAE + update (s)':<40} {update:>10.2f}")
    print("-" * 52)
    print(f"{'ratio training / env only':<40} {train_fps / env_fps:>10.2f}")


if __name__ == "__main__":
    main()
