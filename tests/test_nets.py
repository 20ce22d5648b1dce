"""Policy and critic networks: shapes, gradients and per-agent independence."""

import pytest
import torch

from fp3o_lightning.nets import AgentCritic, CentralCritic, MultiAgentPolicy, ValueNormalizer
from fp3o_lightning.optim import clip_grad_norm_per_agent, clip_gradients

N_AGENTS, OBS, ACT = 3, 7, 2


def make(sharing: str, **kw) -> MultiAgentPolicy:
    torch.manual_seed(0)
    return MultiAgentPolicy(N_AGENTS, OBS, ACT, sharing=sharing, **kw)


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
        for param in policy.stacked_parameters():
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
    weight = policy.trunk[1].weight  # the first linear layer's
    assert not torch.allclose(weight[0], weight[1])


def test_paps_only_heads_differ():
    policy = make("paps")
    trunk, heads = policy.trunk, policy.head
    trunk_params = list(trunk.parameters())
    head_params = list(heads.parameters())
    # the trunk is one shared copy (no agent dimension); heads are stacked per agent
    assert all(p.shape[0] != N_AGENTS or p.dim() == 1 for p in trunk_params)
    assert all(p.shape[0] == N_AGENTS for p in head_params)
    obs = torch.randn(4, 1, OBS).expand(4, N_AGENTS, OBS)  # same observation for every agent
    features = trunk(obs)
    assert torch.allclose(features[:, 0], features[:, 1])
    assert set(map(id, policy.stacked_parameters())) == set(map(id, [policy.log_std, *head_params]))
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
    policy = MultiAgentPolicy(2, OBS, 3, sharing="nops", action_sizes=[3, 1])
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


@pytest.mark.parametrize(
    ("critic", "per_agent"),
    [
        (AgentCritic(N_AGENTS, OBS, "nops"), True),  # one critic per agent: clipped per agent
        (AgentCritic(N_AGENTS, OBS, "nops", recurrent=True), True),
        (AgentCritic(N_AGENTS, OBS, "fups"), False),  # one shared critic: clipped as a whole
        (CentralCritic(OBS), False),
    ],
    ids=["nops", "nops-rnn", "fups", "team"],
)
def test_critic_gradients_are_clipped_per_agent_when_each_agent_has_its_own(critic, per_agent: bool) -> None:
    """As the paper's code clips each agent's separate critic: a large gradient on agent 0's critic
    does not shrink the others' (with a shared critic, the whole gradient is clipped)."""
    for p in critic.parameters():
        p.grad = torch.full_like(p, 1e-3 if per_agent else 1.0)
        if per_agent:
            p.grad[0] = 1.0  # agent 0's critic
    before = [p.grad.clone() for p in critic.parameters()]
    assert critic.per_agent_parameters == per_agent
    norms = clip_gradients(list(critic.parameters()), 1.0, critic.per_agent_parameters)
    assert norms.shape == ((N_AGENTS,) if per_agent else ())
    after = [p.grad for p in critic.parameters()]
    if per_agent:
        clipped = torch.cat([g[0].reshape(-1) for g in after]).norm()
        torch.testing.assert_close(clipped, torch.tensor(1.0), rtol=1e-4, atol=0)
        for b, a in zip(before, after, strict=True):
            torch.testing.assert_close(a[1:], b[1:])  # the other agents' gradients as they were
    else:
        torch.testing.assert_close(torch.cat([g.reshape(-1) for g in after]).norm(), torch.tensor(1.0))


def test_invalid_sharing():
    with pytest.raises(ValueError, match="fups, paps, nops"):
        MultiAgentPolicy(2, 3, 1, sharing="full")


def test_critic_and_value_normalizer():
    critic = CentralCritic(5)
    assert critic(torch.randn(4, 3, 5)).shape == (4, 3, 1)
    norm = ValueNormalizer(beta=0.9)
    x = torch.randn(1000) * 7 + 3
    for _ in range(200):
        norm.update(norm.moments(x.unsqueeze(-1)))
    mean, std = norm.mean_std()
    assert mean.item() == pytest.approx(x.mean().item(), rel=1e-3)
    assert std.item() == pytest.approx(x.std(unbiased=False).item(), rel=1e-3)
    torch.testing.assert_close(norm.denormalize(norm.normalize(x)), x)


def test_per_agent_value_normalizer_keeps_each_agents_statistics():
    values = torch.randn(500, 3) * torch.tensor([1.0, 5.0, 20.0]) + torch.tensor([-4.0, 0.0, 9.0])
    per_agent, shared = ValueNormalizer(3, beta=0.5), ValueNormalizer(1, beta=0.5)
    for _ in range(50):
        per_agent.update(per_agent.moments(values))
        shared.update(shared.moments(values))
    mean, std = per_agent.mean_std()
    torch.testing.assert_close(mean, values.mean(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(std, values.std(0, unbiased=False), rtol=1e-4, atol=1e-4)
    mean, std = shared.mean_std()  # one statistic over every agent's values
    assert mean.shape == (1,) and mean.item() == pytest.approx(values.mean().item(), rel=1e-4)
    assert std.item() == pytest.approx(values.std(unbiased=False).item(), rel=1e-4)


def test_value_normalizer_loads_checkpoints_with_scalar_statistics():
    old = {"running_mean": torch.tensor(2.0, dtype=torch.float64)}
    old |= {"running_mean_sq": torch.tensor(5.0, dtype=torch.float64)}
    old |= {"debiasing_term": torch.tensor(1.0, dtype=torch.float64)}
    norm = ValueNormalizer()
    norm.load_state_dict(old)
    assert norm.mean_std()[0].tolist() == [2.0]


@pytest.mark.parametrize("sharing", ["fups", "paps", "nops"])
@pytest.mark.parametrize("actor_network", ["mlp", "rnn"])
def test_networks_load_checkpoints_with_the_earlier_parameter_layout(sharing: str, actor_network: str):
    """Before the agent-major layout, linear layers held weight [stacks, out, in] and bias [stacks, out],
    LayerNorms weight and bias [stacks, features]: such state dicts load into the same networks."""
    policy = make(sharing, actor_network=actor_network)
    for parameter in policy.parameters():  # not the initial values, which many layers share
        parameter.data.normal_()
    old = {}
    for name, value in policy.state_dict().items():
        if name.endswith("weight") and value.dim() == 3 and value.shape[1] > 1:  # a linear layer
            value = value.transpose(1, 2)
        old[name] = value.squeeze(1) if value.dim() == 3 else value
    loaded = make(sharing, actor_network=actor_network)
    loaded.load_state_dict(old)
    expected = policy.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.parametrize("sharing", ["fups", "paps", "nops"])
@pytest.mark.parametrize("per_agent_input", [True, False])
def test_agent_critic_gives_each_agent_its_value(sharing: str, per_agent_input: bool):
    n_agents, features = 3, 5
    critic = AgentCritic(n_agents, features, sharing, per_agent_input=per_agent_input, agent_id=True)
    shape = (4, 2, n_agents, features) if per_agent_input else (4, 2, features)
    inputs = torch.randn(shape)
    values = critic(inputs)
    assert values.shape == (4, 2, n_agents)
    # The same input (a shared state) still gives each agent its own value: the id (or its own network).
    assert not torch.allclose(values[..., 0], values[..., 1])
    if sharing == "nops" and per_agent_input:  # agent 0's value reads agent 0's input only
        moved = inputs.clone()
        moved[..., 1, :] += 1.0
        torch.testing.assert_close(critic(moved)[..., 0], values[..., 0])


def test_invalid_actor_network_and_action_kind():
    with pytest.raises(ValueError, match="mlp"):
        MultiAgentPolicy(2, 3, 1, actor_network="lstm")
    with pytest.raises(ValueError, match="either action_size"):
        MultiAgentPolicy(2, 3, 1, n_actions=4)


N_ACTIONS = 6


def random_mask(*batch: int) -> torch.Tensor:
    mask = torch.rand(*batch, N_AGENTS, N_ACTIONS) < 0.4
    mask[..., 0] |= ~mask.any(-1)  # at least one valid action (SMAC's no-op for dead units)
    return mask


@pytest.mark.parametrize("sharing", ["fups", "paps", "nops"])
def test_masked_categorical_never_samples_invalid_actions(sharing):
    torch.manual_seed(0)
    policy = MultiAgentPolicy(N_AGENTS, OBS, sharing=sharing, n_actions=N_ACTIONS, gain=1.0)
    obs, mask = torch.randn(64, N_AGENTS, OBS), random_mask(64)
    dist = policy.distribution(obs, mask)
    actions = dist.sample((100,))  # 100 x 64 x 3 = 19,200 sampled actions
    assert mask.expand(100, *mask.shape).gather(-1, actions.unsqueeze(-1)).all()
    # deterministic evaluation takes the best valid action
    logits = policy(obs, mask)[0].masked_fill(~mask, float("-inf"))
    assert torch.equal(dist.deterministic_sample, logits.argmax(-1))
    assert mask.gather(-1, dist.deterministic_sample.unsqueeze(-1)).all()
    log_prob, entropy = dist.log_prob(actions[0]), dist.entropy()
    assert torch.isfinite(log_prob).all() and torch.isfinite(entropy).all()
    (log_prob.mean() + entropy.mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)
    kl = torch.distributions.kl_divergence(dist, policy.distribution(obs, mask))
    assert kl.shape == (64, N_AGENTS) and torch.isfinite(kl).all() and kl.abs().max() < 1e-5


@pytest.mark.parametrize("sharing", ["fups", "paps", "nops"])
@pytest.mark.parametrize("discrete", [False, True])
def test_recurrent_batch_replay_equals_step_by_step(sharing, discrete):
    """Replaying a rollout in chunks from the stored hidden states gives the step-by-step outputs,
    with the hidden state reset at episode starts."""
    torch.manual_seed(1)
    action = {"n_actions": N_ACTIONS} if discrete else {"action_size": ACT}
    policy = MultiAgentPolicy(N_AGENTS, OBS, sharing=sharing, actor_network="rnn", hidden_size=16, **action)
    envs, steps, chunk = 3, 8, 4
    obs = torch.randn(envs, steps, N_AGENTS, OBS)
    mask = random_mask(envs, steps) if discrete else None
    is_init = torch.rand(envs, steps, 1) < 0.2
    is_init[:, 0] = True
    hidden = torch.randn(envs, N_AGENTS, 16)  # garbage before the first reset must not matter
    hiddens, outputs = [], []
    for t in range(steps):
        hiddens.append(hidden)
        *params, hidden = policy(obs[:, t], None if mask is None else mask[:, t], hidden, is_init[:, t])
        outputs.append(params[0])
    stepwise = torch.stack(outputs, 1)
    flat = policy.batch_params(
        obs.flatten(0, 1),
        None if mask is None else mask.flatten(0, 1),
        torch.stack(hiddens, 1).flatten(0, 1),
        is_init.flatten(0, 1),
        chunk_length=chunk,
    )
    torch.testing.assert_close(flat[0], stepwise.flatten(0, 1), rtol=1e-5, atol=1e-6)
    # the hidden state matters: a zero state everywhere gives different outputs after the first step
    zero = policy.batch_params(
        obs.flatten(0, 1),
        None if mask is None else mask.flatten(0, 1),
        torch.zeros(envs * steps, N_AGENTS, 16),
        torch.ones(envs * steps, 1, dtype=torch.bool),
        chunk_length=chunk,
    )
    assert not torch.allclose(zero[0], flat[0])


def test_nops_recurrent_agents_are_independent():
    policy = MultiAgentPolicy(N_AGENTS, OBS, ACT, "nops", actor_network="rnn", hidden_size=8)
    obs, hidden = torch.randn(5, N_AGENTS, OBS), torch.randn(5, N_AGENTS, 8)
    is_init = torch.zeros(5, 1, dtype=torch.bool)
    before = policy(obs, None, hidden, is_init)
    with torch.no_grad():
        policy.rnn.recurrent.weight[1].add_(1.0)
    after = policy(obs, None, hidden, is_init)
    hidden_before, hidden_after = before[2], after[2]
    assert torch.equal(hidden_after[:, 0], hidden_before[:, 0])
    assert not torch.allclose(hidden_after[:, 1], hidden_before[:, 1])
