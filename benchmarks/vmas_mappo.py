"""Throughput of MAPPO on VMAS ``balance`` with BenchMARL's default on-policy settings: ours, and BenchMARL's.

Ours is :class:`fp3o_lightning.module.FP3OModule` with ``algorithm="mappo"`` under a Lightning
``Trainer(accelerator="auto")``; it prints the device and the frames per second of every iteration (collection
plus update, the module's ``train/fps``, gathered by a small in-memory Lightning logger).

The settings are BenchMARL's defaults (``benchmarl/conf``: ``experiment/base_experiment.yaml``,
``algorithm/mappo.yaml``, ``model/layers/mlp.yaml``, ``task/vmas/balance.yaml``, BenchMARL 1.5):

====================================  ==================================  ==============================
BenchMARL                             value                               FP3OModule
====================================  ==================================  ==============================
on_policy_collected_frames_per_batch  6000 (10 envs x 600 steps)          num_envs 10, rollout 600
on_policy_minibatch_size              400                                 num_minibatches 15
on_policy_n_minibatch_iters           45 passes over the batch            ppo_epochs 45
gamma / mappo lmbda / clip_epsilon    0.99 / 0.9 / 0.2                    gamma, gae_lambda, clip
lr (actor and critic), adam_eps       5e-5, 1e-6                          actor_lr, critic_lr (eps 1e-5)
clip_grad_val (norm)                  5                                   max_grad_norm 5
entropy_coef                          0                                   entropy_coef 0
model                                 MLP 256 x 256 (Tanh)                hidden_size 256, depth 2
share_policy_params / critic          True, centralised critic            sharing fups, MAPPO's V(s)
balance                               n_agents 4, max_steps 100           same (max_episode_steps)
====================================  ==================================  ==============================

Differences that stay: our MLPs use ReLU and LayerNorm, the policy is an independent Gaussian (BenchMARL: a
tanh-Normal), the critic loss is a clipped Huber on normalised returns (BenchMARL: L2) and advantages are
normalised; BenchMARL's VMAS time limit counts as termination, ours truncates and bootstraps.

BenchMARL side by side (``--impl benchmarl`` or ``both``), when ``benchmarl`` is importable: its MAPPO on the
same task with its defaults (evaluation, loggers and checkpoints off), its frames per second per iteration
(from the end of one iteration's training to the next). BenchMARL 1.5 requires ``torchrl<0.12``, so it runs in
its own environment, e.g. ``python -m venv /tmp/bm && /tmp/bm/bin/pip install torch==2.13.0 benchmarl vmas``,
then ``/tmp/bm/bin/python benchmarks/vmas_mappo.py --impl benchmarl``.

Run: ``python benchmarks/vmas_mappo.py --iterations 3`` (``--ppo-epochs 5`` for 5 passes instead of 45;
``--threads 1`` on a CPU shared with other work, where PyTorch's threads contend and small operations slow
down by orders of magnitude).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "vmas" / "balance.yaml"
MODEL = yaml.safe_load(CONFIG.read_text())["model"]  # BenchMARL's on-policy defaults
NUM_ENVS = MODEL["num_envs"]
FRAMES_PER_BATCH = NUM_ENVS * MODEL["rollout_length"]
MINIBATCH_SIZE = FRAMES_PER_BATCH // MODEL["num_minibatches"]
TASK = {k: v for k, v in MODEL["env"].items() if k != "name"}


def run_ours(args: argparse.Namespace) -> list[float]:
    import lightning as L

    from fp3o_lightning.loggers import MetricsRecorder
    from fp3o_lightning.module import FP3OModule

    class Report(L.Callback):
        def on_train_start(self, trainer: L.Trainer, module: FP3OModule) -> None:
            collector = getattr(module, "_collector", None)
            env = getattr(collector, "env", None)
            where = getattr(env, "device", "?")
            print(f"ours: training on {module.device}, environment on {where}", flush=True)

        def on_train_batch_end(self, trainer: L.Trainer, module: FP3OModule, *args: Any) -> None:
            fps = logger.series("train/fps")[-1]
            ret = (logger.series("train/episode_return") or [float("nan")])[-1]
            print(f"ours: iteration {module.iteration}: {fps:,.0f} frames/s, return {ret:.2f}", flush=True)

    model = MODEL | {"algorithm": "mappo", "total_frames": args.iterations * FRAMES_PER_BATCH}
    model |= {"ppo_epochs": args.ppo_epochs, "gae_lambda": args.gae_lambda, "seed": args.seed}
    model |= {"eval_interval": 0, "diagnostics_interval": 0, "checkpoint_interval": 0}
    module = FP3OModule(**model)
    logger = MetricsRecorder()
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_epochs=1,
        logger=logger,
        callbacks=[Report()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module)
    return logger.series("train/fps")


class BenchmarlTimer:
    """A BenchMARL callback timing iterations (duck-typed, module-level: BenchMARL pickles callbacks).

    An iteration's frames per second: the frames collected over the time from the end of the previous
    iteration's training (or the experiment's setup) to the end of this one's.
    """

    def __init__(self, frames: int, device: str) -> None:
        self.frames, self.device = frames, device
        self.fps: list[float] = []
        self.experiment = None
        self.last = time.perf_counter()

    def on_setup(self) -> None:
        self.last = time.perf_counter()
        print(f"benchmarl: sampling and training on {self.device}", flush=True)

    def on_batch_collected(self, batch: Any) -> None:
        pass

    def on_train_step(self, batch: Any, group: str) -> None:
        return None

    def on_train_end(self, training_td: Any, group: str) -> None:
        now = time.perf_counter()
        self.fps.append(self.frames / (now - self.last))
        print(f"benchmarl: iteration {len(self.fps)}: {self.fps[-1]:,.0f} frames/s", flush=True)
        self.last = now

    def on_evaluation_end(self, rollouts: Any) -> None:
        pass


def run_benchmarl(args: argparse.Namespace) -> list[float]:
    from benchmarl.algorithms import MappoConfig
    from benchmarl.environments import VmasTask
    from benchmarl.experiment import Experiment, ExperimentConfig
    from benchmarl.models.mlp import MlpConfig

    device = "cuda" if args.accelerator != "cpu" and torch.cuda.is_available() else "cpu"
    config = ExperimentConfig.get_from_yaml()
    config.sampling_device = config.train_device = config.buffer_device = device
    config.max_n_frames = None
    config.max_n_iters = args.iterations
    config.evaluation = False
    config.render = False
    config.loggers = []
    config.create_json = False
    config.checkpoint_interval = 0
    config.checkpoint_at_end = False
    config.save_folder = tempfile.mkdtemp(prefix="benchmarl_")
    if args.ppo_epochs_given:
        config.on_policy_n_minibatch_iters = args.ppo_epochs
    algorithm = MappoConfig.get_from_yaml()
    if args.gae_lambda_given:
        algorithm.lmbda = args.gae_lambda
    timer = BenchmarlTimer(config.on_policy_collected_frames_per_batch, device)
    experiment = Experiment(
        task=VmasTask.BALANCE.get_from_yaml(),
        algorithm_config=algorithm,
        model_config=MlpConfig.get_from_yaml(),
        critic_model_config=MlpConfig.get_from_yaml(),
        seed=args.seed,
        config=config,
        callbacks=[timer],
    )
    experiment.run()
    return timer.fps


def summary(name: str, fps: list[float]) -> str:
    steady = fps[1:] or fps
    return (
        f"{name}: {len(fps)} iterations, frames/s per iteration "
        f"{', '.join(f'{f:,.0f}' for f in fps)}; mean after the first {sum(steady) / len(steady):,.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--ppo-epochs", type=int, default=None, help="passes per iteration (BenchMARL: 45)")
    parser.add_argument("--gae-lambda", type=float, default=None, help="GAE lambda (BenchMARL MAPPO: 0.9)")
    parser.add_argument("--impl", choices=("ours", "benchmarl", "both"), default="both")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 avoids contention on a busy machine)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.ppo_epochs_given, args.gae_lambda_given = args.ppo_epochs is not None, args.gae_lambda is not None
    args.ppo_epochs = MODEL["ppo_epochs"] if args.ppo_epochs is None else args.ppo_epochs
    args.gae_lambda = MODEL["gae_lambda"] if args.gae_lambda is None else args.gae_lambda
    print(
        f"MAPPO on VMAS balance (4 agents, 100 steps): {FRAMES_PER_BATCH} frames per iteration "
        f"({NUM_ENVS} envs), minibatches of {MINIBATCH_SIZE}, {args.ppo_epochs} passes, lambda "
        f"{args.gae_lambda}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results = []
    if args.impl in ("ours", "both"):
        results.append(summary("ours", run_ours(args)))
    if args.impl in ("benchmarl", "both"):
        if importlib.util.find_spec("benchmarl") is None:
            results.append("benchmarl: not importable here (it needs torchrl<0.12; see the module docstring)")
        else:
            results.append(summary("benchmarl", run_benchmarl(args)))
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("\n".join(results))


if __name__ == "__main__":
    main()
