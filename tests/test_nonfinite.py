"""A NaN or Inf never reaches the parameters: the update is skipped (or the run stops), saying where."""

from __future__ import annotations

import pytest
import torch

from fp3o_lightning.optim import skip_step_unless_finite

from .conftest import CUDA, fit_quietly, small_module


def parameters(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_a_step_with_nonfinite_gradients_changes_nothing(device: str):
    weight = torch.nn.Parameter(torch.ones(3, device=device))
    optimizer = torch.optim.Adam([weight], lr=0.1, fused=True)
    weight.grad = torch.ones(3, device=device)
    optimizer.step()  # Adam has moments and a step count now
    before = {"weight": weight.detach().clone()} | {k: v.clone() for k, v in optimizer.state[weight].items()}
    weight.grad = torch.tensor([1.0, float("nan"), 1.0], device=device)
    assert skip_step_unless_finite(optimizer, [weight.grad]).item() == 1.0
    optimizer.step()
    after = {"weight": weight.detach()} | optimizer.state[weight]
    assert all(torch.equal(after[key], value) for key, value in before.items())
    weight.grad = torch.ones(3, device=device)
    assert skip_step_unless_finite(optimizer, [weight.grad]).item() == 0.0
    optimizer.step()
    assert not torch.equal(weight.detach(), before["weight"])
    with pytest.raises(ValueError, match="fused=True"):
        skip_step_unless_finite(torch.optim.Adam([weight]), [weight.grad])


def corrupt_advantages(module, index: int = 5):
    """Make one sample's advantage NaN: every minibatch holding it gets non-finite losses and gradients."""
    original = module.learner.compute_advantages

    def corrupted(rollout):
        batch, explained = original(rollout)
        batch["advantage"][index] = float("nan")
        return batch, explained

    module.learner.compute_advantages = corrupted


def test_nonfinite_loss_skips_those_updates_and_warns():
    module = small_module()
    corrupt_advantages(module)
    before = parameters(module)
    with pytest.warns(
        RuntimeWarning, match=r"iteration 1: NaN or Inf in losses and gradients; skipped \d+ of \d+ minibatch"
    ):
        fit_quietly(module)
    after = parameters(module)
    assert torch.isfinite(after).all()
    assert not torch.equal(before, after)  # the other minibatches' updates went through


def test_nonfinite_observation_skips_the_iteration():
    module = small_module(total_frames=256)
    fit_quietly(module)  # attach a trainer; then feed a corrupted rollout through training_step
    env = module.make_env(seed=1)
    with torch.no_grad():
        data = env.rollout(64, module.make_actor(), break_when_any_done=False)
    data["agents", "observation"][0, 3, 1] = float("inf")
    module._rollouts = iter([data])
    before = parameters(module)
    with pytest.warns(RuntimeWarning, match=r"NaN or Inf in the rollout's \('agents', 'observation'\)"):
        module.training_step(0, 0)
    assert torch.equal(before, parameters(module))


def test_stop_mode_raises_naming_where():
    module = small_module(nonfinite="stop")
    corrupt_advantages(module)
    with pytest.raises(FloatingPointError, match="NaN or Inf in losses and gradients; stopping"):
        fit_quietly(module)


def test_invalid_mode_is_named():
    with pytest.raises(ValueError, match="model.nonfinite='ignore'"):
        small_module(nonfinite="ignore")


def test_episodes_cut_by_a_simulator_fault_do_not_count():
    from tensordict import TensorDict

    from fp3o_lightning.module import finished_episodes

    done = torch.tensor([[True], [True], [False]])
    faulted = torch.tensor([[False], [True], [False]])
    rollout = TensorDict(
        {"next": {"done": done, "episode_reward": torch.tensor([[5.0], [-99.0], [1.0]])}}, [3]
    )
    assert rollout["next", "episode_reward"][finished_episodes(rollout)].tolist() == [5.0, -99.0]
    rollout["next", "faulted"] = faulted
    assert rollout["next", "episode_reward"][finished_episodes(rollout)].tolist() == [5.0]
