"""The factor inside ``ppo_phase``: each sample's surrogate is weighted by its own factor after the
batch is shuffled and sliced into minibatches, and a factor of ones is the independence phase."""

from __future__ import annotations

import copy

import pytest
import torch

from fp3o_lightning.keys import ACTION, LOG_PROB, OBSERVATION

from .conftest import fit_quietly, rollout_batch, small_module


@pytest.fixture(scope="module", params=["fups", "nops"])
def trained(request):
    """A module after one iteration (Adam has state, the critic is trained) and a fresh batch. The
    gradient clip is off so that recorded gradients are the loss's own."""
    module = small_module(sharing=request.param, max_grad_norm=1e9, entropy_coef=0.01)
    fit_quietly(module)
    return module, rollout_batch(module)


def record_actor_steps(module) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Record the actor's parameters and gradients right before every optimiser step."""
    optimizer = module.trainer.optimizers[0]
    params = list(module.policy.parameters())
    records = []

    def hook(*_):
        records.append(([p.detach().clone() for p in params], [p.grad.detach().clone() for p in params]))

    handle = optimizer.register_step_pre_hook(hook)
    return records, handle


def expected_minibatches(module, batch_size: int, generator_state: torch.Tensor) -> list[torch.Tensor]:
    """The sample indices of every minibatch, in step order, from a copy of the scheme's generator."""
    hp = module.hparams
    generator = torch.Generator().set_state(generator_state)
    size = batch_size // hp.num_minibatches
    minibatches = []
    for _ in range(hp.ppo_epochs):
        order = torch.randperm(batch_size, generator=generator)
        minibatches += [order[start : start + size] for start in range(0, batch_size, size)]
    return minibatches


def hand_loss(module, minibatch, factor: torch.Tensor) -> torch.Tensor:
    """The actor's loss on one minibatch written out: ``-sum_i w_i mean_b min(r A f, clip(r) A f)``
    minus the entropy bonus, with ``w_i = 1`` per agent for NoPS and ``1 / n`` for shared networks."""
    hp = module.hparams
    distribution = module.policy.distribution(minibatch[OBSERVATION])
    ratio = torch.exp(distribution.log_prob(minibatch[ACTION]) - minibatch[LOG_PROB])
    advantage = minibatch["advantage"]
    clipped = ratio.clamp(1 - hp.clip_epsilon, 1 + hp.clip_epsilon)
    surrogate = torch.minimum(ratio * advantage * factor, clipped * advantage * factor)
    weight = 1.0 if hp.sharing == "nops" else 1.0 / module.n_agents
    return (
        -(surrogate.mean(0) * weight).sum()
        - hp.entropy_coef * (distribution.entropy().mean(0) * weight).sum()
    )


@pytest.mark.parametrize("num_minibatches", [1, 4])
def test_every_minibatch_step_follows_its_own_samples_factors(trained, num_minibatches: int) -> None:
    """The actor's gradient at every step of a factor-weighted phase (two epochs) equals the gradient
    of the hand-written loss on that step's shuffled samples, each weighted by its own factor."""
    module, batch = trained
    module.hparams.num_minibatches = num_minibatches
    factor = torch.exp(
        0.5 * torch.randn(batch.numel(), module.n_agents, generator=torch.Generator().manual_seed(1))
    )
    minibatches = expected_minibatches(module, batch.numel(), module.generator.get_state())
    records, handle = record_actor_steps(module)
    try:
        module.learner.ppo_phase(batch, factor=factor)
    finally:
        handle.remove()
    assert len(records) == len(minibatches) == 2 * num_minibatches
    params = list(module.policy.parameters())
    for (values, gradients), index in zip(records, minibatches, strict=True):
        with torch.no_grad():
            for p, value in zip(params, values, strict=True):
                p.copy_(value)
        expected = torch.autograd.grad(hand_loss(module, batch[index], factor[index]), params)
        for got, want in zip(gradients, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def training_state(module) -> dict:
    return {
        "module": copy.deepcopy(module.state_dict()),
        "optimizers": [copy.deepcopy(o.state_dict()) for o in module.trainer.optimizers],
        "generator": module.generator.get_state(),
    }


def load_training_state(module, state: dict) -> None:
    module.load_state_dict(state["module"])
    for optimizer, saved in zip(module.trainer.optimizers, state["optimizers"], strict=True):
        optimizer.load_state_dict(copy.deepcopy(saved))
    module.generator.set_state(state["generator"])


def test_a_factor_of_ones_is_the_independence_phase_bit_for_bit(trained) -> None:
    """From the same state, a phase with a factor of ones leaves actors, critic, value normaliser and
    optimiser states exactly as a phase without a factor."""
    module, batch = trained
    module.hparams.num_minibatches = 4
    start = training_state(module)
    module.learner.ppo_phase(batch)
    independence = training_state(module)
    load_training_state(module, start)
    module.learner.ppo_phase(batch, factor=torch.ones(batch.numel(), module.n_agents))
    ones = training_state(module)
    assert not torch.equal(
        start["module"]["policy.head.0.weight"], independence["module"]["policy.head.0.weight"]
    )
    for name, value in independence["module"].items():
        assert torch.equal(ones["module"][name], value), name
    for saved, other in zip(independence["optimizers"], ones["optimizers"], strict=True):
        for key, state in saved["state"].items():
            for name, value in state.items():
                assert torch.equal(other["state"][key][name], value), (key, name)
