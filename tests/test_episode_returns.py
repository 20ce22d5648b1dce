"""``episode_returns``: the training returns, summed over rollouts without TorchRL's ``RewardSum``."""

from __future__ import annotations

import torch
from torchrl.collectors import Collector
from torchrl.envs import RewardSum, TransformedEnv

from fp3o_lightning.envs import MaMuJoCoEnv
from fp3o_lightning.module import episode_returns


def _reference(reward: torch.Tensor, done: torch.Tensor, running: list[float]) -> list[list[float]]:
    """Step by step, per environment: the return at every done."""
    ended: list[list[float]] = [[] for _ in running]
    for i in range(reward.shape[0]):
        for t in range(reward.shape[1]):
            running[i] += float(reward[i, t, 0])
            if done[i, t, 0]:
                ended[i].append(running[i])
                running[i] = 0.0
    return ended


def test_returns_equal_a_step_by_step_sum_across_rollouts() -> None:
    generator = torch.Generator().manual_seed(0)
    running = torch.zeros(4, dtype=torch.float64)
    reference_running = [0.0] * 4
    for rollout in range(5):
        reward = torch.randn(4, 30, 1, generator=generator)
        done = torch.rand(4, 30, 1, generator=generator) < 0.1
        done[0, -1] = True  # an episode ending with the rollout
        done[1, 0] = rollout > 0  # and one ending at a rollout's first step
        done[3] = False  # an episode spanning every rollout
        so_far, running = episode_returns(reward, done, running)
        expected = _reference(reward, done, reference_running)
        for i in range(4):
            torch.testing.assert_close(so_far[i][done[i]], torch.tensor(expected[i], dtype=torch.float64))
        assert torch.allclose(running, torch.tensor(reference_running, dtype=torch.float64))
    assert running[0] == 0.0 and running[3] != 0.0


def test_returns_equal_torchrl_reward_sum_on_a_real_env() -> None:
    """Hopper with episodes shorter and longer than a rollout, terminations included."""
    env = TransformedEnv(
        MaMuJoCoEnv("Hopper", "3x1", num_envs=2, max_episode_steps=25, seed=0),
        RewardSum(in_keys=["reward"], out_keys=["episode_reward"]),
    )
    torch.manual_seed(0)
    collector = Collector(env, policy=None, frames_per_batch=2 * 20, total_frames=2 * 20 * 6)
    running = torch.zeros(2, dtype=torch.float64)
    ended = 0
    for rollout in collector:
        so_far, running = episode_returns(rollout["next", "reward"], rollout["next", "done"], running)
        done = rollout["next", "done"]
        ended += int(done.sum())
        expected = rollout["next", "episode_reward"][done].double()
        torch.testing.assert_close(so_far[done], expected, rtol=1e-5, atol=1e-4)
    collector.shutdown()
    assert ended >= 8
