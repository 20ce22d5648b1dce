"""Recurrent (GRU) actors: hidden states carried through rollouts and replayed in the update."""

from __future__ import annotations

import pytest
import torch

from fp3o_lightning.module import HIDDEN
from fp3o_lightning.render import render_episode

from .conftest import assert_update_replays_the_rollout, fit_quietly, sampled_rollout, small_module

RNN = {"actor_network": "rnn", "data_chunk_length": 8, "hidden_size": 16}


@pytest.mark.parametrize("sharing", ["fups", "paps", "nops"])
def test_replayed_log_probs_equal_the_rollouts_and_start_at_ratio_one(sharing):
    module = small_module(sharing=sharing, **RNN)
    fit_quietly(module)  # one iteration: the GRU's parameters are no longer at their initial values
    rollout = sampled_rollout(module, 64, seed=7)
    assert rollout["next", "done"].any()  # episodes end inside the rollout: resets are replayed too
    assert rollout[HIDDEN][:, 1:].abs().sum() > 0  # carried from step to step, not re-primed
    assert_update_replays_the_rollout(module, rollout)


def test_recurrent_training_logs_and_validates_chunks():
    with pytest.raises(ValueError, match="data_chunk_length=7 does not divide model.rollout_length=64"):
        small_module(actor_network="rnn", data_chunk_length=7)
    with pytest.raises(ValueError, match="num_minibatches=3 does not divide the batch of 16 sequences"):
        small_module(actor_network="rnn", data_chunk_length=8, num_minibatches=3)
    with pytest.raises(ValueError, match="actor_network='gru' is unknown"):
        small_module(actor_network="gru")


def test_recurrent_policy_evaluates_and_renders_with_a_single_environment(tmp_path):
    module = small_module(**RNN, eval_num_envs=1, eval_episodes=2)
    result = module.evaluate()
    assert result["returns"].shape == (2,) and torch.isfinite(result["returns"]).all()
    path = render_episode(module, tmp_path / "episode.gif", steps=3, width=32, height=32)
    assert path.stat().st_size > 0
