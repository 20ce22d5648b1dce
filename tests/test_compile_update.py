"""``compile_update`` and ``compile_actor``: the minibatch loss and the rollout policy's step compiled by
``torch.compile`` train and act as the eager ones do."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._inductor import config as inductor_config
from torchrl.envs.utils import ExplorationType, set_exploration_type

from fp3o_lightning.keys import ACTION, LOG_PROB
from fp3o_lightning.learner import compile_options

from .conftest import CUDA, NEEDS_CUDA, fit_quietly, small_module

SMAX_3M = {"name": "smax", "map_name": "3m"}


def _trained_parameters(accelerator: str = "cpu", **overrides) -> dict[str, torch.Tensor]:
    module = small_module(**overrides)
    fit_quietly(module, accelerator=accelerator)
    return {name: p.detach().cpu().clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize(
    "overrides",
    [
        {"algorithm": "fp3o", "sharing": "nops"},
        {"algorithm": "happo", "sharing": "paps"},
        {"algorithm": "ippo", "sharing": "fups"},
        pytest.param(
            {"algorithm": "fp3o", "sharing": "fups", "env": SMAX_3M, "actor_network": "rnn"}
            | {"rollout_length": 40},
            marks=pytest.mark.slow,
            id="fp3o-fups-smax-rnn",
        ),
    ],
    ids=lambda o: o if isinstance(o, str) else f"{o['algorithm']}-{o['sharing']}",
)
@pytest.mark.parametrize("accelerator", ["cpu", CUDA])
def test_compiled_update_trains_like_the_eager_one(overrides: dict, accelerator: str) -> None:
    """Same seed, one iteration: every parameter ends where the eager update puts it (to float
    rounding; the compiled kernels sum in other orders), and every parameter moved. On CUDA the
    compiled update replays CUDA graphs (``reduce-overhead``)."""
    _assert_compiled_trains_like_eager(accelerator, overrides)


@NEEDS_CUDA
def test_compiled_update_trains_like_the_eager_one_at_large_minibatches_on_cuda() -> None:
    """VMAS balance with FuPS MAPPO, 2 x 256 units and 51,200 rows a minibatch (4096 environments), where
    Inductor's mix-order reduction made the compiled backward return a [256] gradient for a [1, 1, 256]
    parameter (torch 2.11): the compiled update trains like the eager one there too."""
    pytest.importorskip("vmas")
    env = {"name": "vmas", "scenario": "balance", "n_agents": 4, "max_episode_steps": 100}
    overrides = {"env": env, "algorithm": "mappo", "sharing": "fups", "hidden_size": 256, "depth": 2}
    overrides |= {"num_envs": 4096, "rollout_length": 25, "num_minibatches": 2, "ppo_epochs": 1}
    _assert_compiled_trains_like_eager("cuda", overrides)


def test_cuda_compile_options_capture_graphs_without_mix_order_reduction() -> None:
    """On CUDA the minibatch loss compiles with CUDA graphs and, where torch has it, without Inductor's
    mix-order reduction (its backward broke at large minibatches on torch 2.11); on the CPU with the
    defaults. ``torch.compile`` accepts them and the compiled function computes what the eager one does."""
    options = compile_options(torch.device("cuda"))
    assert options is not None and options["triton.cudagraphs"] is True
    assert options.get("triton.mix_order_reduction", False) is False
    assert ("triton.mix_order_reduction" in options) == hasattr(inductor_config.triton, "mix_order_reduction")
    assert compile_options(torch.device("cpu")) is None
    x = torch.linspace(-1.0, 1.0, 8)
    torch.testing.assert_close(torch.compile(torch.sin, dynamic=False, options=options)(x), x.sin())


def _assert_compiled_trains_like_eager(accelerator: str, overrides: dict) -> None:
    """One iteration eager and one compiled from the same seed end with the same parameters, all moved."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    start = {name: p.detach().clone() for name, p in small_module(**overrides).named_parameters()}
    eager = _trained_parameters(accelerator, **overrides)
    compiled = _trained_parameters(accelerator, **overrides, compile_update=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the compiled path ran
    assert not torch._dynamo.utils.counters["graph_break"]  # and as whole graphs
    assert eager.keys() == compiled.keys()
    for name, value in eager.items():
        torch.testing.assert_close(compiled[name], value, rtol=1e-4, atol=1e-5, msg=name)
        if "log_std" not in name:  # the std moves too little to check against rounding
            assert not torch.equal(value, start[name]), f"{name} did not train"


@pytest.mark.parametrize(
    "overrides",
    [
        {"sharing": "nops"},
        {"sharing": "paps", "actor_network": "rnn", "data_chunk_length": 8},
        {"sharing": "fups", "env": {"name": "masked_game", "n_agents": 3}},
    ],
    ids=["nops-mlp", "paps-rnn", "fups-masked-discrete"],
)
@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.usefixtures("masked_game")
def test_compiled_actor_acts_like_the_eager_one(overrides: dict, device: str) -> None:
    """The compiled step draws the eager step's random numbers and gives its actions (to float rounding
    for a Gaussian), sampled and deterministic, and the same log-probabilities (on CUDA: the policy
    there, the environment's observations moved to it)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    module = small_module(**overrides).to(device)
    env = module.build_env(3)
    start = env.reset().to(device)
    actors = {compile: module.make_actor(log_prob=True) for compile in (False, True)}
    actors[True].compiled = True
    for exploration in (ExplorationType.RANDOM, ExplorationType.DETERMINISTIC):
        acted, after = {}, {}
        for compile, actor in actors.items():
            torch.manual_seed(0)
            with torch.no_grad(), set_exploration_type(exploration):
                acted[compile] = actor(start.clone())
            after[compile] = torch.rand(4, device=device)  # the generator where the step left it
        torch.testing.assert_close(acted[True][ACTION], acted[False][ACTION], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(acted[True][LOG_PROB], acted[False][LOG_PROB], rtol=1e-4, atol=1e-5)
        assert torch.equal(after[True], after[False])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the compiled path ran
    assert not torch._dynamo.utils.counters["graph_break"]
    env.close()


def test_a_fit_with_a_compiled_actor_trains_and_evaluates() -> None:
    """``compile_actor``: the collector's and the evaluation's actors run compiled, and the fit trains."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    module = small_module(compile_actor=True, eval_episodes=2, eval_num_envs=2)
    start = {name: p.detach().clone() for name, p in module.named_parameters()}
    fit_quietly(module)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert not torch._dynamo.utils.counters["graph_break"]
    moved = [name for name, p in module.named_parameters() if not torch.equal(p.detach(), start[name])]
    assert len(moved) > len(start) // 2
    returns = module.evaluate()["returns"]
    assert returns.shape == (2,) and returns.isfinite().all()
