"""FP3O on SMAX (SMAC-style maps without StarCraft II): masked discrete actions, GRU actors, learning."""

from __future__ import annotations

import pytest
from torchrl.envs.utils import ExplorationType

from fp3o_lightning.loggers import MetricsRecorder
from fp3o_lightning.module import ACTION, ACTION_MASK, FP3OModule

from .conftest import assert_update_replays_the_rollout, fit_quietly, sampled_rollout

pytest.importorskip("jaxmarl", reason="the SMAX env needs `pip install -e '.[smax]'`")

SMAX = {
    "env": {"name": "smax", "map_name": "3m"},
    "num_envs": 8,
    "rollout_length": 100,
    "actor_lr": 5e-4,
    "critic_lr": 5e-4,
    "num_minibatches": 1,
    "entropy_coef": 0.01,
    "eval_interval": 0,
    "seed": 0,
}


@pytest.mark.parametrize("sharing", ["fups", "paps", "nops"])
def test_sampled_and_greedy_actions_respect_the_action_mask(sharing):
    module = FP3OModule(**SMAX, sharing=sharing, total_frames=800, gain=1.0)  # gain 1: far from uniform
    for exploration in (ExplorationType.RANDOM, ExplorationType.DETERMINISTIC):
        data = sampled_rollout(module, 100, seed=11, exploration=exploration)
        mask, action = data[ACTION_MASK], data[ACTION]
        assert action.numel() == 8 * 100 * 3  # 2,400 actions per exploration type
        assert (~mask).any()  # some actions are really masked (dead units, out of range)
        assert mask.gather(-1, action.unsqueeze(-1)).all()
    assert data["next", "done"].any()


def test_recurrent_actor_replays_the_rollouts_log_probs_and_starts_at_ratio_one():
    module = FP3OModule(**SMAX, sharing="paps", actor_network="rnn", data_chunk_length=10, total_frames=800)
    fit_quietly(module)
    data = sampled_rollout(module, 100, seed=11)
    assert data["next", "done"].any()
    assert_update_replays_the_rollout(module, data)


def test_fp3o_improves_the_return_on_3m():
    recorder = MetricsRecorder()
    module = FP3OModule(**SMAX, sharing="fups", total_frames=8000)
    fit_quietly(module, logger=recorder)
    returns = recorder.series("train/episode_return")
    assert len(returns) == 10 and len(recorder.series("train/win_rate")) == 10
    first, last = sum(returns[:2]) / 2, sum(returns[-2:]) / 2
    assert last > first + 0.15, returns  # seeded: about 0.2 -> 0.5 (the maximum is about 1.5 with a win)
    result = module.evaluate()
    assert result["returns"].shape == result["wins"].shape == (module.hparams.eval_episodes,)
