"""Recurrent (GRU) actors: hidden states carried through rollouts and replayed in the update."""

from __future__ import annotations

import pytest
import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from fp3o_lightning.module import HIDDEN, LOG_PROB
from fp3o_lightning.render import render_episode

from .conftest import fit_quietly, small_module

RNN = {"actor_network": "rnn", "data_chunk_length": 8, "hidden_size": 16}


@pytest.mark.parametrize("sharing", ["fups", "paps", "nops"])
def test_replayed_log_probs_equal_the_rollouts_and_start_at_ratio_one(sharing):
    module = small_module(sharing=sharing, **RNN)
    fit_quietly(module)  # one iteration: the GRU's parameters are no longer at their initial values
    env = module.make_env(seed=7)
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        rollout = env.rollout(64, module.make_actor(), break_when_any_done=False)
    env.close()
    assert rollout["next", "done"].any()  # episodes end inside the rollout: resets are replayed too
    hidden = rollout[HIDDEN]
    assert hidden[:, 1:].abs().sum() > 0  # carried from step to step, not re-primed
    collected = rollout[LOG_PROB].reshape(-1, module.n_agents).clone()
    batch = module.compute_advantages(rollout)[0]
    torch.testing.assert_close(batch[LOG_PROB], collected, rtol=0, atol=1e-4)
    stats = module.scheme.update(module, batch)
    assert torch.equal(stats["start_ratio"], torch.ones_like(stats["start_ratio"]))


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
