"""Policy and critic networks: shapes, gradients and per-agent independence."""

import pytest
import torch

from fp3o_lightning.nets import CentralCritic, GaussianPolicy, ValueNormalizer
from fp3o_lightning.optim import clip_grad_norm_per_agent

N_AGENTS, OBS, ACT = 3, 7, 2


def make(sharing: str, **kw) -> GaussianPolicy:
    torch.manual_seed(0)
    return GaussianPolicy(N_AGENTS, OBS, ACT, sharing=sharing, **kw)


@pytest.mark.parametrize("sharing", ["fups", "paps", "nops"])
def test_forward_backward_shapes(sharing):
    policy = make(sharing)
    obs = torch.randn(5, 4, N_AGENTS, OBS)
    loc, scale = policy(obs)
    assert loc.shape == scale.shape == (5, 4, N_AGENTS, ACT)
    dist = policy.distribution(obs)
    action = dist.sample()
    log_prob = dist.log_prob(action)
    assert log_prob.shape == dist.entropy().shape == (5, 4, N_AGENTS)
    log_prob.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in policy.parameters())


@pytest.mark.parametrize("sharing", ["fups", "paps", "nops"])
def test_initial_std_and_small_mean(sharing):
    policy = make(sharing)
    loc, scale = policy(torch.randn(100, N_AGENTS, OBS))
    # std = sigmoid(x / x) * y = sigmoid(1) * 0.5; output gain 0.01 keeps the initial mean near 0
    torch.testing.assert_close(scale, torch.full_like(scale, torch.sigmoid(torch.tensor(1.0)).item() * 0.5))
    assert loc.abs().max() < 0.1


def test_nops_agents_are_independent():
    policy = make("nops")
    obs = torch.randn(8, N_AGENTS, OBS)
    before = policy(obs)[0].detach()
    with torch.no_grad():
        for param in policy.net.params.values(include_nested=True, leaves_only=True):
            param[1].add_(torch.randn_like(param[1]))  # agent 2 (index 1) only
    after = policy(obs)[0].detach()
    assert torch.equal(after[:, 0], before[:, 0]) and torch.equal(after[:, 2], before[:, 2])
    assert not torch.allclose(after[:, 1], before[:, 1])


def test_nops_agent_input_only_affects_that_agent():
    policy = make("nops")
    obs = torch.randn(8, N_AGENTS, OBS)
    changed = obs.clone()
    changed[:, 1] += torch.randn(8, OBS)  # (a constant shift would vanish in the input LayerNorm)
    a, b = policy(obs)[0], policy(changed)[0]
    assert torch.equal(a[:, 0], b[:, 0]) and not torch.allclose(a[:, 1], b[:, 1])


def test_nops_agents_start_different():
    policy = make("nops")
    params = dict(policy.net.params.items(include_nested=True, leaves_only=True))
    weight = next(v for k, v in params.items() if v.dim() == 3)
    assert not torch.allclose(weight[0], weight[1])


def test_paps_only_heads_differ():
    policy = make("paps")
    trunk, heads = policy.net
    trunk_params = list(trunk.parameters())
    head_params = list(heads.parameters())
    # the trunk is one shared copy (no agent dimension); heads are stacked per agent
    assert all(p.shape[0] != N_AGENTS or p.dim() == 1 for p in trunk_params)
    assert all(p.shape[0] == N_AGENTS for p in head_params)
    obs = torch.randn(4, 1, OBS).expand(4, N_AGENTS, OBS)  # same observation for every agent
    features = trunk(obs)
    assert torch.allclose(features[:, 0], features[:, 1])
    loc = policy(obs)[0]
    assert not torch.allclose(loc[:, 0], loc[:, 1])
    with torch.no_grad():
        for p in head_params:
            p[1].add_(1.0)
    after = policy(obs)[0]
    assert torch.equal(after[:, 0], loc[:, 0]) and not torch.allclose(after[:, 1], loc[:, 1])


def test_fups_uses_agent_id():
    policy = make("fups")
    obs = torch.randn(4, 1, OBS).expand(4, N_AGENTS, OBS)
    loc = policy(obs)[0]
    assert not torch.allclose(loc[:, 0], loc[:, 1])
    assert sum(p.numel() for p in policy.parameters()) < sum(p.numel() for p in make("nops").parameters())


def test_padded_action_dims_do_not_change_ratios():
    policy = GaussianPolicy(2, OBS, 3, sharing="nops", action_sizes=[3, 1])
    obs = torch.randn(6, 2, OBS)
    dist = policy.distribution(obs)
    action = dist.sample()
    before = dist.log_prob(action)
    padded = action.clone()
    padded[:, 1, 1:] = 0.0
    with torch.no_grad():
        policy.log_std.add_(0.3)  # the policy changes, the padding's N(0, 1) does not
    after_real = policy.distribution(obs).log_prob(action)
    loc, scale = policy(obs)
    assert torch.equal(loc[:, 1, 1:], torch.zeros(6, 2)) and torch.equal(scale[:, 1, 1:], torch.ones(6, 2))
    # ratio of agent 1 depends only on its real dimension
    real = torch.distributions.Normal(loc[:, 1, 0], scale[:, 1, 0]).log_prob(action[:, 1, 0])
    old_real = torch.distributions.Normal(dist.mean[:, 1, 0], dist.stddev[:, 1, 0]).log_prob(action[:, 1, 0])
    torch.testing.assert_close(after_real[:, 1] - before[:, 1], real - old_real)


def test_clip_grad_norm_per_agent():
    grads = [torch.tensor([[3.0, 4.0], [0.3, 0.4]]), torch.zeros(2, 1)]
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    norms = clip_grad_norm_per_agent(params, max_norm=1.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5]))
    torch.testing.assert_close(params[0].grad, torch.tensor([[0.6, 0.8], [0.3, 0.4]]), atol=1e-5, rtol=0)


def test_invalid_sharing():
    with pytest.raises(ValueError, match="fups, paps, nops"):
        GaussianPolicy(2, 3, 1, sharing="full")


def test_critic_and_value_normalizer():
    critic = CentralCritic(5)
    assert critic(torch.randn(4, 3, 5)).shape == (4, 3, 1)
    norm = ValueNormalizer(beta=0.9)
    x = torch.randn(1000) * 7 + 3
    for _ in range(200):
        norm.update(x.mean(), x.pow(2).mean())
    mean, std = norm.mean_std()
    assert mean.item() == pytest.approx(x.mean().item(), rel=1e-3)
    assert std.item() == pytest.approx(x.std(unbiased=False).item(), rel=1e-3)
    torch.testing.assert_close(norm.denormalize(norm.normalize(x)), x)
