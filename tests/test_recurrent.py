"""Recurrent (GRU) actors and critics: hidden states carried through rollouts and replayed in the update."""

from __future__ import annotations

import pytest
import torch

from fp3o_lightning.keys import CRITIC_HIDDEN, HIDDEN, IS_INIT
from fp3o_lightning.module import LEGACY_HPARAMS
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


def test_the_critic_is_recurrent_with_a_recurrent_actor_unless_told_otherwise():
    assert small_module(**RNN).critic.recurrent  # the paper's code: a recurrent policy, a recurrent critic
    assert not small_module(**RNN, critic_network="mlp").critic.recurrent
    assert not small_module().critic.recurrent
    module = small_module(critic_network="rnn", data_chunk_length=8)  # an MLP actor, a recurrent critic
    assert module.critic.recurrent and not module.policy.recurrent and module.chunk_length == 8
    assert IS_INIT in module.build_env(1).observation_spec.keys(True)
    with pytest.raises(ValueError, match="critic_network='gru' is unknown"):
        small_module(critic_network="gru")
    assert LEGACY_HPARAMS["critic_network"] == "mlp"  # checkpoints from before it had MLP critics


def step_by_step(module, rollout, start):
    """The paper code's way: the critic stepped through the rollout while collecting, its hidden state
    zeroed at episode starts. Returns the values, the next observations' values and the hidden states
    entering each step (before the reset), ``[num_envs, T, ...]``."""
    learner, hidden = module.learner, start
    values, next_values, entering = [], [], []
    for t in range(rollout.shape[1]):
        step = rollout[:, t]
        entering.append(hidden)
        hidden = torch.where(step[IS_INIT].unsqueeze(-1), 0.0, hidden)
        value, hidden = module.critic(learner.critic_inputs(step), hidden)
        values.append(value)
        next_values.append(module.critic(learner.critic_inputs(step["next"]), hidden)[0])
    return torch.stack(values, 1), torch.stack(next_values, 1), torch.stack(entering, 1), hidden


@pytest.mark.parametrize(
    "options",
    [{"sharing": "nops"}, {"sharing": "fups", "critic": "team"}, {"sharing": "paps", "algorithm": "ippo"}],
    ids=["agent-nops", "team-fups", "ippo-paps"],
)
def test_recurrent_critic_values_are_the_step_by_step_ones_and_the_update_replays_them(options):
    module = small_module(**RNN, **options)
    fit_quietly(module)  # the critic has trained, and carries a hidden state into the next rollout
    carried = module.learner.critic_hidden
    assert carried.shape == (2, module.critic.n_rows, 16) and carried.abs().sum() > 0
    rollout = sampled_rollout(module, 64, seed=3)
    assert rollout["next", "done"].any()  # resets inside the rollout are replayed too
    rollout[IS_INIT][:, 0] = False  # so that the carried hidden state is used at the first step
    expected = step_by_step(module, rollout, carried)
    batch, _ = module.learner.compute_advantages(rollout)
    torch.testing.assert_close(module.learner.critic_hidden, expected[-1], rtol=0, atol=1e-5)
    module.learner.critic_hidden = carried
    value, next_value, entering = module.learner.rollout_values(rollout)
    for got, want in zip((value, next_value, entering), expected, strict=False):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(batch["value"], value.flatten(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(batch[CRITIC_HIDDEN], entering.flatten(0, 1), rtol=0, atol=0)
    # The update replays whole chunks from the hidden state stored at their first step.
    torch.testing.assert_close(module.learner.values(batch), batch["value"], rtol=0, atol=1e-5)
