"""``evaluate()``: each environment's first episode, its return and whether it was won, against an
independent step-by-step computation with the policy's deterministic actions."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType, set_exploration_type

from fp3o_lightning.envs import ENV_REGISTRY, EnvEntry
from fp3o_lightning.envs.specs import set_contract_specs
from fp3o_lightning.module import EVAL_SEED_OFFSET, FP3OModule


class TallyEnv(EnvBase):
    """A tiny seeded two-agent task with wins and episodes of several lengths.

    Each episode starts at a random position and lasts 2 to 4 steps; the agents' actions move the
    position, every step pays the position, and an episode is won when it ends above zero. Episodes
    end (``terminated``) before ``max_episode_steps``, so a rollout as long as that holds one to three
    episodes per environment, won or lost independently. An episode's start is drawn from its own
    generator, seeded with (seed, full resets so far, environment, episode of that environment since
    the full reset), so it does not depend on how many partial resets came before.
    """

    def __init__(self, num_envs: int = 1, max_episode_steps: int = 8, device=None, **_) -> None:
        super().__init__(device="cpu", batch_size=[num_envs])
        self.num_envs, self.n_agents, self.max_episode_steps = num_envs, 2, max_episode_steps
        action = Bounded(-1.0, 1.0, shape=(num_envs, 2, 1), device="cpu")
        set_contract_specs(self, observation_size=3, state_size=3, action=action, flags=("won",))
        self.seed_, self.full_resets = 0, 0
        self.episode = torch.zeros(num_envs, dtype=torch.long)
        self.position = torch.zeros(num_envs)
        self.steps = torch.zeros(num_envs, dtype=torch.long)
        self.length = torch.zeros(num_envs, dtype=torch.long)

    def _output(self, terminated: torch.Tensor, won: torch.Tensor) -> TensorDict:
        state = torch.stack([self.position, self.steps.float(), self.length.float()], -1)
        false = torch.zeros(self.num_envs, 1, dtype=torch.bool)
        return TensorDict(
            {
                "agents": {"observation": state.unsqueeze(1).expand(-1, 2, -1).clone()},
                "state": state,
                "done": terminated,
                "terminated": terminated,
                "truncated": false,
                "won": won,
            },
            batch_size=self.batch_size,
        )

    def _reset(self, tensordict=None, **kwargs) -> TensorDict:
        reset = None if tensordict is None else tensordict.get("_reset", None)
        if reset is None:  # a full reset
            self.full_resets += 1
            self.episode.fill_(-1)
            reset = torch.ones(self.num_envs, dtype=torch.bool)
        for i in reset.reshape(-1).nonzero().flatten().tolist():
            self.episode[i] += 1
            key = (self.seed_, self.full_resets, i, int(self.episode[i]))
            generator = torch.Generator().manual_seed(hash(key) % 2**62)
            self.position[i] = torch.randn((), generator=generator)
            self.length[i] = torch.randint(2, 5, (), generator=generator)
            self.steps[i] = 0
        false = torch.zeros(self.num_envs, 1, dtype=torch.bool)
        return self._output(false, false)

    def _step(self, tensordict) -> TensorDict:
        self.position = self.position + 0.1 * tensordict["agents", "action"].sum((-2, -1))
        self.steps = self.steps + 1
        terminated = (self.steps >= self.length).unsqueeze(-1)
        output = self._output(terminated, terminated & (self.position > 0).unsqueeze(-1))
        output["reward"] = self.position.unsqueeze(-1).clone()
        return output

    def _set_seed(self, seed: int | None) -> None:
        self.seed_, self.full_resets = seed, 0


@pytest.fixture
def tally(monkeypatch) -> FP3OModule:
    monkeypatch.setitem(ENV_REGISTRY, "tally", EnvEntry(f"{__name__}:TallyEnv"))
    return FP3OModule(
        env={"name": "tally"},
        num_envs=2,
        rollout_length=8,
        num_minibatches=1,
        eval_interval=0,
        eval_episodes=10,
        eval_num_envs=4,  # three rounds of four environments, the last one cut to two episodes
        seed=0,
    )


def first_episodes_step_by_step(
    module: FP3OModule, rounds: int
) -> tuple[list[float], list[int], list[bool], int]:
    """Each environment's first episode in each round, followed step by step: the rewards summed up to
    and including its first ``done``, its steps, and ``won`` on that step; and how many environments
    lost their first episode and won a later one."""
    env = module.build_env(module.hparams.eval_num_envs)
    env.set_seed(module.eval_seed())
    actor = module.make_actor()
    returns, lengths, wins, won_later = [], [], [], 0
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        for _ in range(rounds):
            tensordict = env.reset()
            total, won, finished = [0.0] * env.num_envs, [False] * env.num_envs, [False] * env.num_envs
            steps = [0] * env.num_envs
            later = [False] * env.num_envs
            for _ in range(env.max_episode_steps):
                tensordict, following = env.step_and_maybe_reset(actor(tensordict))
                for i in range(env.num_envs):
                    if finished[i]:
                        later[i] |= tensordict["next", "won"][i].item()
                        continue
                    total[i] += tensordict["next", "reward"][i].item()
                    steps[i] += 1
                    if tensordict["next", "done"][i].item():
                        finished[i], won[i] = True, tensordict["next", "won"][i].item()
                tensordict = following
            assert all(finished)
            returns += total
            lengths += steps
            wins += won
            won_later += sum(lt and not w for lt, w in zip(later, won, strict=True))
    env.close()
    return returns, lengths, wins, won_later


def test_evaluation_scores_each_environments_first_episode(tally) -> None:
    """``evaluate()`` returns, for ``eval_episodes`` environments in rounds of ``eval_num_envs``, the return
    and length of each one's first episode (its last reward included, later episodes left out) and
    whether that episode was won, with the policy's deterministic actions."""
    returns, lengths, wins, won_later = first_episodes_step_by_step(tally, rounds=3)
    result = tally.evaluate()
    torch.testing.assert_close(result["returns"], torch.tensor(returns[:10]), rtol=1e-5, atol=1e-5)
    assert result["lengths"].tolist() == lengths[:10] and len(set(lengths)) > 1
    assert result["wins"].tolist() == wins[:10]
    assert 0 < sum(wins[:10]) < 10 and won_later > 0  # won and lost first episodes, lost then won
    again = tally.evaluate()
    assert torch.equal(again["returns"], result["returns"])  # the evaluation env is reseeded each time


def test_evaluation_with_sampled_actions(tally) -> None:
    """``evaluate(deterministic=False)`` samples the policy's actions (as training does): from the same
    starts, the episodes are as long (this task's lengths do not depend on the actions) and the returns
    differ from the deterministic ones and between two draws."""
    deterministic = tally.evaluate()
    sampled, again = tally.evaluate(deterministic=False), tally.evaluate(deterministic=False)
    assert torch.equal(sampled["lengths"], deterministic["lengths"])
    assert not torch.allclose(sampled["returns"], deterministic["returns"])
    assert not torch.allclose(sampled["returns"], again["returns"])


@pytest.mark.parametrize("starts", ["fresh", "fixed"])
def test_evaluation_starts_fresh_at_each_iteration_unless_fixed(tally, starts: str) -> None:
    """``eval_starts="fresh"`` (the paper's code) seeds each iteration's evaluation anew, from the run's
    seed and the iteration, away from the training seeds; ``fixed`` reuses one seed."""
    tally.hparams.eval_starts = starts
    seeds = []
    for iteration in (0, 1, 2, 1):
        tally.iteration = iteration
        seeds.append(tally.eval_seed())
        tally.evaluate()
        assert tally._runtime["eval_env"].seed_ == seeds[-1]
    if starts == "fixed":
        assert set(seeds) == {tally.hparams.seed + EVAL_SEED_OFFSET}
    else:
        assert len(set(seeds[:3])) == 3 and seeds[3] == seeds[1]  # new per iteration, the same when repeated
        assert all(EVAL_SEED_OFFSET < seed < 2**31 - tally.hparams.eval_num_envs for seed in seeds)


def test_evaluation_from_given_starts(tally) -> None:
    """``evaluate(seed=...)`` plays from the starts that seed gives, whatever the iteration: the same
    episodes for the same seed, other ones for another."""
    tally.iteration = 1
    given = tally.evaluate(seed=7)
    assert tally._runtime["eval_env"].seed_ == 7
    tally.iteration = 2
    assert torch.equal(tally.evaluate(seed=7)["returns"], given["returns"])
    assert not torch.equal(tally.evaluate(seed=8)["returns"], given["returns"])
    assert not torch.equal(tally.evaluate()["returns"], given["returns"])
