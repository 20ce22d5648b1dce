"""Issue 29's GPU benchmark: Multi-Agent MuJoCo simulated by MuJoCo Warp (``backend: warp``), on one GPU.

Prints one table and writes ``--json``, for each ``--tasks`` config of ``configs/mamujoco_gpu/``:

* **env**: physics steps/s and environment frames/s of the environment alone at each ``--worlds`` size,
  with the frame-skip loop captured as a CUDA graph and without (random actions, resets included);
* **train**: FP3O's training frames/s with the task's GPU config at each ``--train-worlds`` size (rollout, GAE
  and update; ``--train-iterations`` timed after a warm-up), and its ratio to the environment alone;
* **to the paper's return** (``--time-to-return MINUTES``): one run of the GPU config, evaluated every
  ``eval_interval`` iterations, stopped when the evaluation reaches the paper's NoPS FP3O return (HalfCheetah
  4795.6, Ant 2824.8, ...) or after the minutes given: the wall time to it, and the same trained policy's
  return on the Warp and on the CPU backend (``--compare-episodes`` episodes each) with 95% intervals.

Targets on one H100/H200: HalfCheetah 6x1 environment >= 500k frames/s at 8,192 worlds; training >= 0.5x the
environment alone; HalfCheetah reaching 4,795.6 in under 10 minutes, Ant 2,824.8; the two backends' returns
within each other's intervals. On the GPU machine::

    python benchmarks/warp_gpu.py --json warp_gpu.json --time-to-return 8

and a smoke test on the CPU (MuJoCo Warp runs there, slowly)::

    python benchmarks/warp_gpu.py --accelerator cpu --tasks hopper_3x1 --worlds 16 --train-worlds 16 \\
        --seconds 1 --train-iterations 1 --time-to-return 0.3 --compare-episodes 4
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch
from train_throughput import fit_throughput, read_model, synchronize

from fp3o_lightning.envs import make_env
from fp3o_lightning.loggers import MetricsRecorder
from fp3o_lightning.module import FP3OModule

ROOT = Path(__file__).resolve().parent.parent
#: The paper's Table 1 NoPS FP3O returns.
PAPER_RETURNS = {
    "HalfCheetah 6x1": 4795.6,
    "Hopper 3x1": 3565.1,
    "Walker2d 2x3": 3678.0,
    "Ant 2x4": 2824.8,
    "Reacher 2x1": -28.2,
    "ManySegmentSwimmer 8x2": 428.2,
}


def env_only(model: dict[str, Any], worlds: int, graph: bool, device: torch.device, seconds: float) -> dict:
    """Frames and physics steps per second of the Warp environment alone."""
    options = {k: v for k, v in model["env"].items() if k != "name"}
    env = make_env("mamujoco", **options, num_envs=worlds, seed=0, device=device, graph=graph)
    tensordict = env.reset()
    action = env.rand_action(tensordict)["agents", "action"].clone()
    for _ in range(3):  # compiles the kernels, captures the graph
        tensordict.set(("agents", "action"), action)
        _, tensordict = env.step_and_maybe_reset(tensordict)
    steps, start = 0, time.perf_counter()
    synchronize(device)
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            tensordict.set(("agents", "action"), action)
            _, tensordict = env.step_and_maybe_reset(tensordict)
        steps += 10
        synchronize(device)
    elapsed = time.perf_counter() - start
    env.close()
    frames = worlds * steps / elapsed
    return {
        "worlds": worlds,
        "graph": graph,
        "env_fps": frames,
        "physics_steps_per_s": frames * env._substeps,
    }


class StopAtReturn(L.Callback):
    """Records each evaluation's wall time and return; stops the fit at the first one reaching ``target``."""

    def __init__(self, target: float) -> None:
        self.target, self.start, self.evaluations, self.reached = target, time.perf_counter(), [], None

    def on_validation_end(self, trainer: L.Trainer, module: FP3OModule) -> None:
        value = trainer.callback_metrics.get("eval/return_mean")
        if value is None:
            return
        seconds = time.perf_counter() - self.start
        self.evaluations.append({"seconds": seconds, "frames": module.frames, "return": float(value)})
        if self.reached is None and float(value) >= self.target:
            self.reached = self.evaluations[-1]
            trainer.should_stop = True


def interval(returns: torch.Tensor) -> dict[str, float]:
    """Mean and 95% normal interval of episode returns."""
    mean, error = returns.mean().item(), 1.96 * returns.std().item() / math.sqrt(len(returns))
    return {"mean": mean, "low": mean - error, "high": mean + error, "episodes": len(returns)}


def time_to_return(model: dict[str, Any], task: str, accelerator: str, minutes: float, episodes: int) -> dict:
    """Train the GPU config until the paper's return or ``minutes``; the trained policy on both backends."""
    target = PAPER_RETURNS[task]
    module = FP3OModule(**model)
    stop = StopAtReturn(target)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=1,
        max_time={"seconds": minutes * 60},
        logger=MetricsRecorder(),
        callbacks=[stop],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module)
    result = {
        "target": target,
        "reached": stop.reached,
        "evaluations": stop.evaluations,
        "frames": module.frames,
    }
    module.to(trainer.strategy.root_device).hparams.eval_episodes = episodes
    result["warp_return"] = interval(module.evaluate()["returns"])
    cpu = FP3OModule(**(model | {"env": model["env"] | {"backend": "cpu"}, "eval_episodes": episodes}))
    cpu.load_state_dict(module.state_dict())
    cpu.trainer = trainer  # evaluate reads the trainer's world size only
    result["cpu_return"] = interval(cpu.cpu().evaluate()["returns"])
    return result


def run_task(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    model = read_model(str(ROOT / "configs" / "mamujoco_gpu" / f"{name}.yaml"))
    task = f"{model['env']['scenario']} {model['env']['agent_conf']}"
    rows: dict[str, Any] = {"task": task, "env": [], "train": []}
    for worlds in args.worlds:
        for graph in (True, False) if device.type == "cuda" else (False,):
            rows["env"].append(env_only(model, worlds, graph, device, args.seconds))
            print(f"{task} env {worlds} worlds graph={graph}: {rows['env'][-1]}", flush=True)
    for worlds in args.train_worlds:
        options = {"num_envs": worlds, "eval_interval": 0, "checkpoint_interval": 0}
        fit = fit_throughput(model | options, args.train_iterations + 1, args.accelerator)
        alone = next((r["env_fps"] for r in rows["env"] if r["worlds"] == worlds and r["graph"]), None)
        alone = alone or next((r["env_fps"] for r in rows["env"] if r["worlds"] == worlds), None)
        rows["train"].append(
            {
                "worlds": worlds,
                "train_fps": fit.train_fps,
                "ratio_to_env": fit.train_fps / alone if alone else None,
                "rollout_seconds": fit.rollout_seconds,
                "update_seconds": fit.update_seconds,
            }
        )
        print(f"{task} train {worlds} worlds: {rows['train'][-1]}", flush=True)
    if args.time_to_return > 0:
        rows["to_return"] = time_to_return(
            model, task, args.accelerator, args.time_to_return, args.compare_episodes
        )
        print(f"{task} to the paper's return: {rows['to_return']}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["halfcheetah_6x1", "ant_2x4"])
    parser.add_argument("--worlds", nargs="+", type=int, default=[1024, 4096, 8192, 16384])
    parser.add_argument("--train-worlds", nargs="+", type=int, default=[4096, 8192])
    parser.add_argument("--train-iterations", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds of each env-only measure")
    parser.add_argument("--time-to-return", type=float, default=0.0, metavar="MINUTES")
    parser.add_argument("--compare-episodes", type=int, default=64)
    parser.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    torch.set_float32_matmul_precision("high")
    results = []
    for name in args.tasks:
        try:
            results.append(run_task(name, args, device))
        except Exception:  # one task's failure must not lose the others' figures
            traceback.print_exc()
            results.append({"task": name, "error": traceback.format_exc()})
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
