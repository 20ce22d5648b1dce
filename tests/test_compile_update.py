"""``compile_update``: the minibatch loss compiled by ``torch.compile`` trains as the eager one does."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from .conftest import fit_quietly, small_module

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
@pytest.mark.parametrize(
    "accelerator",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))],
)
def test_compiled_update_trains_like_the_eager_one(overrides: dict, accelerator: str) -> None:
    """Same seed, one iteration: every parameter ends where the eager update puts it (to float
    rounding; the compiled kernels sum in other orders), and every parameter moved. On CUDA the
    compiled update replays CUDA graphs (``reduce-overhead``)."""
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
