"""Shared fixtures: a small FP3O module attached to a Trainer, and a real rollout batch."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from fp3o_lightning.envs import ENV_REGISTRY, EnvEntry
from fp3o_lightning.keys import LOG_PROB
from fp3o_lightning.module import FP3OModule

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
"""Skips a test, or a parameter, where torch sees no CUDA device."""
CUDA = pytest.param("cuda", marks=NEEDS_CUDA)
"""The ``"cuda"`` parameter of a test parametrised by device, skipped without CUDA."""

SMALL = {
    "env": {"name": "mamujoco", "scenario": "Hopper", "agent_conf": "3x1", "max_episode_steps": 100},
    "num_envs": 2,
    "rollout_length": 64,
    "num_minibatches": 4,
    "ppo_epochs": 2,
    "actor_lr": 1e-3,
    "critic_lr": 1e-3,
    "eval_interval": 0,  # evaluation has its own tests
}


def small_module(**overrides) -> FP3OModule:
    kwargs = {**SMALL, "total_frames": SMALL["num_envs"] * SMALL["rollout_length"], **overrides}
    return FP3OModule(**kwargs)


def fit_quietly(module: FP3OModule, logger=False, **trainer_kwargs) -> L.Trainer:
    """Fit on the CPU without progress bar, checkpoints or validation (unless ``trainer_kwargs`` say so)."""
    options = {
        "accelerator": "cpu",
        "max_epochs": 1,
        "logger": logger,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    trainer = L.Trainer(**(options | trainer_kwargs))
    trainer.fit(module)
    return trainer


@pytest.fixture
def fitted_module() -> FP3OModule:
    """A module after one real training iteration, still attached to its trainer and optimisers."""
    module = small_module(sharing="nops")
    fit_quietly(module)
    return module


@pytest.fixture
def masked_game(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registers the test-only masked discrete game (``tests/masked_game.py``, pure torch) for one test:
    env ``masked_game`` simulates on the CPU, ``masked_game_on_device`` on the training device."""
    monkeypatch.setitem(ENV_REGISTRY, "masked_game", EnvEntry("tests.masked_game:MaskedGameEnv"))
    monkeypatch.setitem(
        ENV_REGISTRY, "masked_game_on_device", EnvEntry("tests.masked_game:MaskedGameOnDeviceEnv")
    )


def sampled_rollout(module: FP3OModule, steps: int = 64, seed: int = 123, exploration=ExplorationType.RANDOM):
    """A fresh ``[num_envs, steps]`` rollout of the current policy (sampled actions, as in training)."""
    env = module.make_env(seed=seed)
    with torch.no_grad(), set_exploration_type(exploration):
        rollout = env.rollout(steps, module.make_actor(log_prob=True), break_when_any_done=False)
    env.close()
    return rollout


def rollout_batch(module: FP3OModule, steps: int = 64):
    """A fresh sampled rollout of the current policy as the flat update batch."""
    return module.learner.compute_advantages(sampled_rollout(module, steps))[0]


def assert_update_replays_the_rollout(module: FP3OModule, rollout) -> None:
    """The log-probs the update recomputes equal the collector's (for a recurrent actor: the hidden
    states were carried and replayed right), and the policy measured on the batch before the update is
    the batch's own, exactly: every agent's update starts at ratio 1 (which the schemes take as given)."""
    collected = rollout[LOG_PROB].reshape(-1, module.n_agents).clone()
    batch = module.learner.compute_advantages(rollout)[0]
    torch.testing.assert_close(batch[LOG_PROB], collected, rtol=0, atol=1e-4)
    log_prob, kl = module.learner.measure(batch)
    assert torch.equal(log_prob, batch[LOG_PROB]) and not kl.any()
    stats = module.scheme.update(module.learner, batch)
    assert all(torch.isfinite(value).all() for value in stats.values())
