"""Run the planned ``fp3o sweep`` on Ray: one Ray task per run, a progress table, clean Ctrl-C.

Each task runs one ``fp3o fit`` command as a child process of a Ray worker, its output appended to
the run's log file, and returns how it ended (exit code, wall time, the log's last lines). The
driver keeps at most as many tasks in flight as the cluster's CPUs (and GPUs) allow, and on Ctrl-C
(or ``--fail_fast``) asks every running fit to stop at the end of its iteration with a checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Exit code reported for a run stopped by Ctrl-C or ``--fail_fast``.
INTERRUPTED = 130
#: How long stopped fits get to finish their iteration and write their checkpoint.
STOP_TIMEOUT_S = 300.0
TAIL_LINES = 20
POLL_S = 0.5


@dataclass(frozen=True)
class Resources:
    """Where and with what each run executes; ``address=None`` starts Ray on this machine."""

    address: str | None = None
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    max_concurrent: int | None = None
    num_cpus: int | None = None  # embedded Ray only: the CPUs it may use (default: all)


@dataclass(frozen=True)
class Job:
    """One command to run, named by its key (as in MLflow), and its log file."""

    key: str
    command: tuple[str, ...]
    log: str


@dataclass(frozen=True)
class Outcome:
    """How one job ended: exit code (``INTERRUPTED`` when stopped), wall time, the log's last lines."""

    job: Job
    returncode: int
    seconds: float
    tail: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


# ---------------------------------------------------------------------------------- the Ray task


def log_tail(path: str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist)."""
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except FileNotFoundError:
        return ""


def execute(job: Job, cwd: str, stop: str | None = None) -> tuple[int, float, str]:
    """Run ``job.command`` in ``cwd``, appending its output to ``job.log`` (runs inside a Ray worker).

    The fit runs in its own session, so that a terminal's Ctrl-C does not reach it. When the driver
    stops this task (the file ``stop`` appears, or Ray's cancel raises ``KeyboardInterrupt`` here), a
    SIGTERM makes ``fp3o fit`` finish its iteration, save ``last.ckpt`` and exit, and the task reports
    ``INTERRUPTED``. (SIGTERM, not SIGINT: Ray workers block SIGINT, and their children inherit the
    mask. The file as well as the cancel: Ray's interrupt of a running task is not delivered in every
    state of the worker.) Returns (exit code, seconds, the log's last lines).
    """
    if not os.path.isdir(cwd):
        message = f"fp3o sweep: the sweep's directory {cwd} does not exist on this Ray node; run sweeps "
        message += "from a directory shared by every node (same path), e.g. NFS.\n"
        return 1, 0.0, message
    Path(job.log).parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, *job.command[1:]]  # this node's Python for the planned interpreter
    start = time.perf_counter()
    with open(job.log, "a") as log:
        log.write(f"$ {' '.join(job.command)}\n")
        log.flush()
        child = subprocess.Popen(
            command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        stopped = False
        try:
            # polling: Ray's cancel interrupts Python code, not a blocking wait
            while child.poll() is None and not (stopped := stop is not None and os.path.exists(stop)):
                time.sleep(POLL_S)
        except KeyboardInterrupt:  # ray.cancel
            stopped = True
        if stopped:  # stop the fit cleanly and wait for its checkpoint
            child.send_signal(signal.SIGTERM)
            _wait_through_interrupts(child)
        stopped = stopped or (stop is not None and os.path.exists(stop))
    return INTERRUPTED if stopped else child.returncode, time.perf_counter() - start, log_tail(job.log)


def _wait_through_interrupts(child: subprocess.Popen) -> None:
    while child.poll() is None:
        try:
            time.sleep(POLL_S)
        except KeyboardInterrupt:  # a repeated cancel must not abandon the child mid-checkpoint
            continue


# ------------------------------------------------------------------------------------- the driver


def start_ray(resources: Resources) -> None:
    """Connect to ``resources.address`` or start Ray on this machine (never joining one by accident)."""
    try:
        import ray
    except ImportError:
        raise RuntimeError(
            "fp3o sweep runs on Ray, which is not installed: pip install -e '.[ray]' (or pip install ray)"
        ) from None
    options = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if resources.address is None:
        ray.init(address="local", num_cpus=resources.num_cpus, **options)
    else:
        ray.init(address=resources.address, **options)


def capacity(resources: Resources, cluster: dict[str, float]) -> int:
    """How many runs fit at once in the cluster's CPUs and GPUs, capped by ``max_concurrent``."""
    fits = [cluster.get("CPU", 0.0) / resources.cpus_per_run] if resources.cpus_per_run else []
    if resources.gpus_per_run:
        fits.append(cluster.get("GPU", 0.0) / resources.gpus_per_run)
    slots = int(min(fits)) if fits else len(cluster) or 1
    if slots < 1:
        raise RuntimeError(
            f"The Ray cluster ({cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs) cannot hold "
            f"one run of {resources.cpus_per_run:g} CPUs and {resources.gpus_per_run:g} GPUs; lower "
            "--cpus_per_run / --gpus_per_run or add nodes."
        )
    return min(slots, resources.max_concurrent) if resources.max_concurrent else slots


def run_jobs(
    jobs: Sequence[Job],
    resources: Resources,
    on_start: Callable[[Job], None],
    on_end: Callable[[Outcome], None],
    on_tick: Callable[[dict[Job, float]], None],
    tick_s: float,
    fail_fast: bool = False,
) -> tuple[list[Outcome], bool]:
    """Run the jobs as Ray tasks, at most ``capacity`` at once; returns the outcomes in finishing order
    and whether Ctrl-C stopped the sweep. A failure with ``fail_fast`` stops the running jobs too.

    ``on_tick`` gets the running jobs and their start times every ``tick_s`` seconds.
    """
    import ray

    token = f"{os.getpid()}-{time.time_ns()}"  # this sweep's stop files: stale ones stop nothing
    start_ray(resources)
    try:
        slots = capacity(resources, ray.cluster_resources())
        task = ray.remote(execute).options(
            num_cpus=resources.cpus_per_run, num_gpus=resources.gpus_per_run, max_retries=0
        )
        queue, running, outcomes = deque(jobs), {}, []
        cwd, next_tick, stopped, interrupted = os.getcwd(), time.monotonic() + tick_s, False, False
        try:
            while (queue and not stopped) or running:
                while queue and not stopped and len(running) < slots:
                    job = queue.popleft()
                    running[task.remote(job, cwd, stop_file(job, token))] = (job, time.monotonic())
                    on_start(job)
                ready, _ = ray.wait(
                    list(running), num_returns=1, timeout=max(0.0, next_tick - time.monotonic())
                )
                for ref in ready:
                    job, _ = running.pop(ref)
                    outcomes.append(Outcome(job, *ray.get(ref)))
                    on_end(outcomes[-1])
                    if fail_fast and not outcomes[-1].ok and not stopped:
                        stopped = True
                        _cancel(running, token)
                if time.monotonic() >= next_tick:
                    on_tick({job: started for job, started in running.values()})
                    next_tick = time.monotonic() + tick_s
        except KeyboardInterrupt:
            interrupted = True
            outcomes += _stop(running, on_end, token)
        return outcomes, interrupted
    finally:
        ray.shutdown()
        for job in jobs:
            Path(stop_file(job, token)).unlink(missing_ok=True)


def stop_file(job: Job, token: str) -> str:
    """The file whose appearance stops ``job``'s running fit (next to its log, in the shared directory)."""
    return f"{job.log}.stop-{token}"


def _cancel(running: dict, token: str) -> None:
    """Stop the running tasks (their fits save a checkpoint and exit) and drop the pending ones."""
    import ray

    for ref, (job, _) in running.items():
        Path(stop_file(job, token)).parent.mkdir(parents=True, exist_ok=True)
        Path(stop_file(job, token)).touch()
        ray.cancel(ref)


def _stop(running: dict, on_end: Callable[[Outcome], None], token: str) -> list[Outcome]:
    """Cancel the running tasks (each fit saves a checkpoint and exits) and wait for them."""
    import ray

    print(
        f"\nCtrl-C: stopping {len(running)} running run(s) at the end of their iteration "
        "(they save last.ckpt; the same sweep command resumes them)…",
        flush=True,
    )
    _cancel(running, token)
    outcomes = []
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for ref, (job, started) in running.items():
        while True:
            try:
                result = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                outcome = Outcome(job, *result)
            except KeyboardInterrupt:
                continue  # keep waiting: the fits are writing their checkpoints
            except Exception as error:  # noqa: BLE001 - a timeout or a task lost with its node
                outcome = Outcome(job, INTERRUPTED, time.monotonic() - started, f"{type(error).__name__}\n")
            break
        outcomes.append(outcome)
        on_end(outcome)
    return outcomes
