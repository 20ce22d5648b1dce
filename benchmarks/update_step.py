"""One minibatch step of the update, ours against the hand-written loop's: where the update's time goes.

``train_throughput.py`` times whole iterations; this times the update alone, per minibatch step, on the
paper's HalfCheetah 6x1 (the work of ``handwritten_fp3o.py``). Each side trains one iteration to get a real
update batch, then:

* a whole PPO phase (``ppo_epochs x num_minibatches`` steps, the factor 1), ours and the hand-written one
  in turns, ``--turns`` times: the median and the least time per step. The VM this was written on moves
  from run to run by 10-20%, so compare figures of one run, and prefer the least times;
* the parts of a step in the loop: the same phases in turns again, with each part's calls timed (the
  forward, i.e. the loss, the backward, ``zero_grad``, the clipping, the non-finite guard, Adam, our value
  normaliser's update, which the hand-written loop makes inside its loss) and the rest of the step (the
  minibatch gather, the statistics, Python);
* the parts of a step alone, each repeated on one minibatch: the forward (the loss), the forward and
  backward, the gradient clipping, the Adam step. Alone, the weights and activations stay in the CPU's
  caches: the sum of the parts is less than the step in the loop.

    python benchmarks/update_step.py --turns 15
    python benchmarks/update_step.py --turns 15 --compile-update
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any
from unittest import mock

import torch
from handwritten_fp3o import FP3O, train
from train_throughput import fit_throughput, read_model

from fp3o_lightning import learner as learner_module
from fp3o_lightning.learner import PPOLearner, split_minibatches
from fp3o_lightning.optim import clip_gradients


def captured(cls: type, method: str, run: Callable[[], Any]) -> tuple[Any, Any]:
    """The instance and first argument of the first call of ``cls.method`` while ``run`` runs."""
    original, calls = getattr(cls, method), []

    def capture(self: Any, first: Any, *args: Any, **kwargs: Any) -> Any:
        if not calls:
            calls.append((self, first))
        return original(self, first, *args, **kwargs)

    setattr(cls, method, capture)
    try:
        run()
    finally:
        setattr(cls, method, original)
    return calls[0]


def microseconds(run: Callable[[], Any], calls: int, per: int = 1, warm_up: int = 3) -> float:
    """Microseconds per ``per`` of one call of ``run``, after ``warm_up`` calls."""
    for _ in range(warm_up):
        run()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return 1e6 * (time.perf_counter() - start) / calls / per


def our_parts(learner: PPOLearner, batch: Any) -> dict[str, Callable[[], Any]]:
    """The parts of one of our minibatch steps, on the batch's first minibatch."""
    hp, optimizer = learner.hparams, learner.optimizer().optimizer
    minibatch = split_minibatches(batch, torch.arange(batch.numel()), batch.numel() // hp.num_minibatches)[0]
    loss = learner.compiled_minibatch_loss() if hp.compile_update else learner.minibatch_loss

    def backward() -> None:
        optimizer.zero_grad()
        loss(minibatch, None, None, True, True)[0].backward()

    def clip() -> None:
        for parameters, per_agent in learner.clipped.values():
            clip_gradients(parameters, hp.max_grad_norm, per_agent)

    return {
        "forward": lambda: loss(minibatch, None, None, True, True),
        "forward + backward": backward,
        "clipping": clip,
        "Adam": optimizer.step,
    }


def hand_parts(learner: FP3O, batch: dict[str, torch.Tensor]) -> dict[str, Callable[[], Any]]:
    """The parts of one of the hand-written loop's minibatch steps, on its batch's first minibatch."""
    size = batch["action"].shape[1] // learner.config.minibatches
    minibatch = {key: value[:, :size] for key, value in batch.items()}

    def backward() -> None:
        learner.optimizer.zero_grad()
        learner.loss(minibatch, None).backward()

    return {
        "forward": lambda: learner.loss(minibatch, None),
        "forward + backward": backward,
        "clipping": learner.clip_gradients,
        "Adam": learner.optimizer.step,
    }


class PartTimer:
    """Seconds spent in wrapped calls, by part."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()

    def wrap(self, part: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start

        return timed


class TimedOptimizer:
    """An optimiser (or Lightning's wrapper of one) whose ``zero_grad`` and ``step`` are timed."""

    def __init__(self, optimizer: Any, timer: PartTimer) -> None:
        self.wrapped = optimizer
        self.zero_grad = timer.wrap("zero_grad", optimizer.zero_grad)
        self.step = timer.wrap("Adam", optimizer.step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


def timing(timer: PartTimer, parts: list[tuple[Any, str, str]]) -> ExitStack:
    """Patches ``getattr(target, name)`` with a call timed as ``part``, for each ``(target, name, part)``
    (undone when the stack closes)."""
    stack = ExitStack()
    for target, name, part in parts:
        timed = timer.wrap(part, getattr(target, name))
        stack.enter_context(mock.patch.object(target, name, timed))
    return stack


def timing_our_parts(learner: PPOLearner, timer: PartTimer) -> ExitStack:
    """Patches that time the parts of our minibatch steps."""
    loss = "minibatch_loss"
    if learner.hparams.compile_update:
        learner.compiled_minibatch_loss()  # made before it is patched
        loss = "_compiled_loss"
    stack = timing(
        timer,
        [
            (learner, loss, "forward (the loss)"),
            (learner, "backward", "backward"),
            (learner, "update_value_normalizer", "value normaliser"),
            (learner_module, "clip_gradients", "clipping"),
            (learner_module, "skip_step_unless_finite", "non-finite guard"),
        ],
    )
    optimizer = learner.optimizer
    stack.enter_context(mock.patch.object(learner, "optimizer", lambda: TimedOptimizer(optimizer(), timer)))
    return stack


def timing_hand_parts(hand: FP3O, timer: PartTimer) -> ExitStack:
    """Patches that time the parts of the hand-written loop's minibatch steps."""
    parts = [(hand, "loss", "forward (the loss)"), (torch.Tensor, "backward", "backward")]
    stack = timing(timer, [*parts, (hand, "clip_gradients", "clipping")])
    stack.enter_context(mock.patch.object(hand, "optimizer", TimedOptimizer(hand.optimizer, timer)))
    return stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mamujoco/halfcheetah_6x1.yaml")
    parser.add_argument("--turns", type=int, default=9, help="phases of each, in turns")
    parser.add_argument("--calls", type=int, default=300, help="calls of each part alone")
    parser.add_argument("--compile-update", action="store_true", help="our model.compile_update")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = read_model(args.config) | {"compile_update": args.compile_update}
    learner, batch = captured(PPOLearner, "ppo_phase", lambda: fit_throughput(model, 1, "cpu"))
    hand, hand_batch = captured(FP3O, "phase", lambda: train(1))
    steps = learner.hparams.ppo_epochs * learner.hparams.num_minibatches
    phases = {"ours": lambda: learner.ppo_phase(batch), "hand-written": lambda: hand.phase(hand_batch, None)}
    times: dict[str, list[float]] = {name: [] for name in phases}
    for phase in phases.values():
        phase()
    for _ in range(args.turns):
        for name, phase in phases.items():
            times[name].append(microseconds(phase, 1, steps, warm_up=0))
    print(f"\nper minibatch step (us), compile_update={args.compile_update}, one torch thread")
    print(f"{'':<34}{'ours':>10}{'hand-written':>14}")
    for label, reduce in (("a whole phase: median", statistics.median), ("a whole phase: least", min)):
        print(f"{label:<34}{reduce(times['ours']):>10.0f}{reduce(times['hand-written']):>14.0f}")
    timers = {name: PartTimer() for name in phases}
    timing = {"ours": lambda: timing_our_parts(learner, timers["ours"])}
    timing["hand-written"] = lambda: timing_hand_parts(hand, timers["hand-written"])
    totals = dict.fromkeys(phases, 0.0)
    for _ in range(args.turns):
        for name, phase in phases.items():
            with timing[name]():
                start = time.perf_counter()
                phase()
                totals[name] += time.perf_counter() - start
    per_step = 1e6 / (args.turns * steps)
    parts = list(dict.fromkeys([*timers["ours"].seconds, *timers["hand-written"].seconds]))
    for part in [*parts, "the rest"]:
        row = []
        for name, timer in timers.items():
            seconds = timer.seconds.get(part)
            if part == "the rest":
                seconds = totals[name] - sum(timer.seconds.values())
            row.append("-" if seconds is None else f"{seconds * per_step:.0f}")
        print(f"{'  in the loop: ' + part:<34}{row[0]:>10}{row[1]:>14}")
    ours, theirs = our_parts(learner, batch), hand_parts(hand, hand_batch)
    for part in ours:
        first, second = microseconds(ours[part], args.calls), microseconds(theirs[part], args.calls)
        print(f"{'  alone: ' + part:<34}{first:>10.0f}{second:>14.0f}")


if __name__ == "__main__":
    main()
