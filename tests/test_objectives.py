"""FP3O maths against hand-computed values and brute-force definitions."""

import math

import pytest
import torch

from fp3o_lightning.objectives import (
    clipped_surrogate,
    dependence_factor,
    dependence_gate,
    huber_value_loss,
    non_overlapping_selection,
    normalize_advantage,
)


def test_dependence_factor_hand_computed():
    old = torch.log(torch.tensor([[1.0, 1.0, 1.0]]))
    mid = torch.log(torch.tensor([[2.0, 0.5, 3.0]]))
    # factor_j = product of the other agents' middle ratios
    expected = torch.tensor([[0.5 * 3.0, 2.0 * 3.0, 2.0 * 0.5]])
    torch.testing.assert_close(dependence_factor(mid, old), expected)


def test_dependence_factor_matches_brute_force_product():
    torch.manual_seed(0)
    mid, old = torch.randn(7, 5, 4), torch.randn(7, 5, 4)
    ratio = torch.exp(mid - old)
    brute = torch.stack([torch.cat([ratio[..., :j], ratio[..., j + 1 :]], -1).prod(-1) for j in range(4)], -1)
    torch.testing.assert_close(dependence_factor(mid, old), brute)


def test_dependence_factor_single_agent_is_one():
    mid, old = torch.randn(10, 1), torch.randn(10, 1)
    assert torch.equal(dependence_factor(mid, old), torch.ones(10, 1))


def test_clipped_surrogate_hand_computed():
    log_prob = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7]))
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -2.0, -2.0])
    # r=1.5,A=1 -> min(1.5, 1.2)=1.2; r=0.5,A=1 -> min(0.5, 0.8)=0.5
    # r=1.1,A=-2 -> min(-2.2, -2.2)=-2.2; r=0.7,A=-2 -> min(-1.4, -1.6)=-1.6
    expected = torch.tensor([1.2, 0.5, -2.2, -1.6])
    torch.testing.assert_close(clipped_surrogate(log_prob, old, adv, 0.2), expected)


def test_clipped_surrogate_factor_scales_and_is_detached():
    log_prob = torch.zeros(3, 2, requires_grad=True)
    factor = torch.tensor([[2.0, 0.5]] * 3, requires_grad=True)
    adv = torch.ones(3, 1)
    out = clipped_surrogate(log_prob, torch.zeros(3, 2), adv, 0.2, factor)
    torch.testing.assert_close(out, factor.detach())
    out.sum().backward()
    assert factor.grad is None
    # d/dlogp of r*A*f at r=1 is A*f
    torch.testing.assert_close(log_prob.grad, factor.detach())


def test_clipped_surrogate_no_gradient_outside_clip_region():
    log_prob = torch.log(torch.tensor([1.5])).requires_grad_()
    clipped_surrogate(log_prob, torch.zeros(1), torch.ones(1), 0.2).sum().backward()
    assert log_prob.grad.item() == 0.0


def test_dependence_gate_hand_computed():
    old = torch.zeros(2, 2)
    # ratios (2, 2) on sample 0 and (1, 1) on sample 1
    mid = torch.log(torch.tensor([[2.0, 2.0], [1.0, 1.0]]))
    positive = torch.tensor([[1.0], [1.0]])
    # factor*r = 4 per agent vs r = 2 on sample 0; sample 1 equal: 2*(4+1)=10 >= 2*(2+1)=6
    assert dependence_gate(mid, old, positive) is True
    negative = -positive
    assert dependence_gate(mid, old, negative) is False


def test_dependence_gate_all_reduce_is_applied():
    old, mid, adv = torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 1)
    assert dependence_gate(mid, old, adv) is True
    assert dependence_gate(mid, old, adv, all_reduce=lambda s: s * torch.tensor([1.0, 2.0])) is False


def test_non_overlapping_selection_is_a_derangement_covering_all_agents():
    gen = torch.Generator().manual_seed(3)
    for n in range(2, 9):
        separated, selected = non_overlapping_selection(n, gen)
        assert sorted(separated.tolist()) == list(range(n))
        assert sorted(selected.tolist()) == list(range(n))
        assert bool((separated != selected).all())
        assert selected.tolist() == [separated[(p + 1) % n].item() for p in range(n)]


def test_non_overlapping_selection_is_seeded():
    a = non_overlapping_selection(6, torch.Generator().manual_seed(1))
    b = non_overlapping_selection(6, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_huber_value_loss_with_and_without_clip():
    value, old, target = torch.tensor([3.0]), torch.tensor([0.0]), torch.tensor([0.0])
    assert huber_value_loss(value, old, target, delta=10.0).item() == pytest.approx(4.5)
    # delta=1: huber(3) = 1*(3-0.5) = 2.5
    assert huber_value_loss(value, old, target, delta=1.0).item() == pytest.approx(2.5)
    # clipped value is 0.2 -> loss 0.02, max(4.5, 0.02) = 4.5; moving away from the target is not rewarded
    target = torch.tensor([3.0])
    value = torch.tensor([0.0])
    old = torch.tensor([0.0])
    assert huber_value_loss(value, old, target, 10.0, clip_epsilon=0.2).item() == pytest.approx(4.5)


def test_normalize_advantage():
    adv = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(2, 2, 1)  # a team advantage [envs, steps, 1]
    out = normalize_advantage(adv)
    assert out.mean().abs().item() < 1e-6
    assert out.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert out.flatten()[0].item() == pytest.approx(-1.5 / math.sqrt(1.25), abs=1e-4)


def test_normalize_advantage_per_agent():
    adv = torch.randn(2, 50, 3) * torch.tensor([1.0, 10.0, 100.0]) + torch.tensor([5.0, -5.0, 0.0])
    out = normalize_advantage(adv)
    flat = out.reshape(-1, 3)
    torch.testing.assert_close(flat.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(0, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[..., 1], normalize_advantage(adv[..., 1:2]).squeeze(-1))


def test_gate_and_active_mean_leave_dead_agents_out():
    from fp3o_lightning.objectives import active_mean

    gen = torch.Generator().manual_seed(0)
    old = torch.randn(50, 3, generator=gen)
    middle = old + 0.1 * torch.randn(50, 3, generator=gen)
    advantage = torch.randn(50, 3, generator=gen)
    alive = torch.rand(50, 3, generator=gen) > 0.3
    flipped = torch.where(alive, advantage, -50.0 * advantage.abs() - 1.0)
    assert dependence_gate(middle, old, advantage, alive=alive) == dependence_gate(
        middle, old, flipped, alive=alive
    )
    assert dependence_gate(middle, old, advantage) != dependence_gate(middle, old, flipped)  # unmasked
    value = torch.where(alive, torch.randn(50, 3, generator=gen), 1e6)
    per_agent = active_mean(value, alive, shared=False)
    for i in range(3):
        assert per_agent[i].item() == pytest.approx(value[alive[:, i], i].mean().item(), rel=1e-5)
    shared = active_mean(value, alive, shared=True)
    assert shared.mean().item() == pytest.approx(value[alive].mean().item(), rel=1e-5)
    torch.testing.assert_close(active_mean(value, None, shared=True), value.mean(0))
