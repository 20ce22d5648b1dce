"""A short seeded FP3O run on a small task improves its return (about 15 s on two CPU cores)."""

from __future__ import annotations

import pytest

from fp3o_lightning.loggers import MetricsRecorder
from fp3o_lightning.module import FP3OModule

from .conftest import fit_quietly


@pytest.mark.parametrize("sharing", ["fups", "nops"])
def test_fp3o_improves_halfcheetah_return(sharing):
    module = FP3OModule(
        env={"name": "mamujoco", "scenario": "HalfCheetah", "agent_conf": "6x1", "max_episode_steps": 100},
        num_envs=4,
        rollout_length=100,
        total_frames=16_000,
        actor_lr=5e-4,
        critic_lr=1e-3,
        num_minibatches=4,
        sharing=sharing,
        seed=0,
    )
    recorder = MetricsRecorder()
    fit_quietly(module, logger=recorder)
    returns = recorder.series("train/episode_return")
    assert len(returns) == 40  # one 4-episode batch of returns per iteration
    first, last = sum(returns[:3]) / 3, sum(returns[-3:]) / 3
    # random HalfCheetah policies score about -15 over 100 steps; seeded runs reach +20 to +45
    assert last > first + 15.0, (first, last)
