"""Collection with both cores? TorchRL's ``MultiSyncCollector`` against the in-process ``Collector``.

Collects rollouts of the module's policy (the paper's HalfCheetah 6x1 config by default) with the
trainer's in-process ``Collector`` over ``num_envs`` environments, and with a ``MultiSyncCollector`` of
``--workers`` processes, each stepping ``num_envs / workers`` environments and running the policy itself.
Prints seconds per batch (best and median of ``--batches`` after a warm-up batch)::

    python benchmarks/collector_throughput.py --config configs/mamujoco/halfcheetah_6x1.yaml --workers 2
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import torch
import yaml
from torchrl.collectors import Collector, MultiSyncCollector
from torchrl.envs import EnvBase

from fp3o_lightning.envs import make_env
from fp3o_lightning.module import FP3OModule


def build_env(env: dict, num_envs: int, seed: int) -> EnvBase:
    """The training environment as the module builds it for an MLP actor (in a worker process too)."""
    torch.set_num_threads(1)
    built = make_env(**env, num_envs=num_envs)
    built.set_seed(seed)
    return built


def seconds_per_batch(collector, batches: int) -> list[float]:
    iterator = iter(collector)
    next(iterator)  # warm-up
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        next(iterator)
        times.append(time.perf_counter() - start)
    collector.shutdown()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mamujoco/halfcheetah_6x1.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with open(args.config) as file:
        model = yaml.safe_load(file)["model"]
    module = FP3OModule(**model)
    num_envs, frames = module.hparams.num_envs, module.frames_per_batch
    env = module.hparams.env
    common = {"frames_per_batch": frames, "total_frames": -1, "env_device": "cpu", "policy_device": "cpu"}
    single = Collector(build_env(env, num_envs, 0), module.make_actor(), track_traj_ids=False, **common)
    in_process = seconds_per_batch(single, args.batches)
    per_worker = num_envs // args.workers
    makers = [functools.partial(build_env, env, per_worker, w * per_worker) for w in range(args.workers)]
    multi = seconds_per_batch(MultiSyncCollector(makers, module.make_actor(), **common), args.batches)
    print(f"\n{frames} frames per batch, {num_envs} environments, load average {os.getloadavg()[0]:.2f}")
    print(f"{'collector':<44} {'best s':>8} {'median s':>9} {'frames/s':>9}")
    for name, times in (
        ("Collector (in process)", in_process),
        (f"MultiSyncCollector {args.workers} workers x {per_worker} envs", multi),
    ):
        print(f"{name:<44} {min(times):>8.2f} {statistics.median(times):>9.2f} {frames / min(times):>9.0f}")
    print(f"{'ratio multi / in process (best)':<44} {min(in_process) / min(multi):>8.2f}")


if __name__ == "__main__":
    main()
