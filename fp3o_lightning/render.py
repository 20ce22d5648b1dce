"""``fp3o render``: a deterministic evaluation episode of a trained policy, written to mp4 or gif.

``fp3o render --ckpt_path last.ckpt --output episode.mp4`` loads the checkpoint's :class:`FP3OModule`,
runs one episode of its environment (one sub-env, the policy's mean action), renders every step
off-screen (EGL or OSMesa, see :func:`fp3o_lightning.envs.mamujoco.configure_headless_gl`) and writes
the frames: ``.mp4`` with imageio's ffmpeg plugin (H.264), ``.gif`` with Pillow. When the checkpoint
was written by a run logging to MLflow, the file is then logged to that run under ``videos/``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type, step_mdp

from fp3o_lightning.envs import ENV_REGISTRY

__all__ = ["render_episode", "main", "FORMATS"]

#: Output formats by file suffix.
FORMATS = (".mp4", ".gif")
#: Pillow stores GIF frame durations in hundredths of a second and viewers slow down frames shorter
#: than 20 ms, so GIFs keep every k-th frame to stay at or below this rate.
MAX_GIF_FPS = 50.0


def _gif_stride(fps: float) -> int:
    """Keep every k-th frame in a GIF: the smallest k at or below :data:`MAX_GIF_FPS`, preferring a k
    whose frame duration is a whole number of hundredths of a second (GIF's resolution)."""
    first = max(1, math.ceil(fps / MAX_GIF_FPS - 1e-9))
    for k in range(first, 2 * first + 1):
        centiseconds = 100 * k / fps
        if abs(centiseconds - round(centiseconds)) < 1e-6:
            return k
    return first


def _check_output(output: str | Path) -> Path:
    path = Path(output)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"Unsupported video format {path.suffix!r} for {path}; use one of {FORMATS}.")
    return path


def _check_renderable(env: dict[str, Any]) -> None:
    """Raise a ``ValueError`` if the env named in ``env`` cannot render frames."""
    name = env.get("name")
    entry = ENV_REGISTRY.get(name)
    if entry is None or not entry.renders:
        renderable = ", ".join(sorted(n for n, e in ENV_REGISTRY.items() if e.renders))
        raise ValueError(f"Environment {name!r} cannot render videos; `fp3o render` supports: {renderable}.")


@contextmanager
def _frame_writer(path: Path, fps: float) -> Iterator[Callable[[np.ndarray], None]]:
    """Yield a function that appends one RGB frame to the video at ``path``, written on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".mp4":
        try:
            import imageio.v2 as imageio
            import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary imageio's plugin runs)
        except ImportError as err:
            raise RuntimeError(
                "Writing mp4 needs imageio's ffmpeg plugin: `pip install 'imageio[ffmpeg]'` "
                "(or write a .gif instead)."
            ) from err
        # 16-pixel macro blocks: frames whose sides are not multiples of 16 are resized by imageio.
        writer = imageio.get_writer(
            path, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p", quality=7
        )
        try:
            yield writer.append_data
        finally:
            writer.close()
    else:
        from PIL import Image

        frames: list[Image.Image] = []  # palette images, a third of the memory of RGB frames
        yield lambda frame: frames.append(Image.fromarray(frame).quantize(colors=256))
        if frames:
            # Pillow merges identical consecutive frames into one longer frame.
            frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)


def _render(
    module: Any,
    output: str | Path,
    steps: int | None = None,
    seed: int = 0,
    fps: float | None = None,
    width: int = 480,
    height: int = 480,
) -> tuple[Path, int, float]:
    """:func:`render_episode`, returning the path, the number of frames written and their rate."""
    path = _check_output(output)
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be None or an integer >= 1, got {steps!r}.")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}.")
    _check_renderable(module.hparams.env)
    env = module.build_env(1, render_mode="rgb_array", width=width, height=height)
    try:
        env.set_seed(seed)
        fps = float(fps or env.render_fps)
        stride = _gif_stride(fps) if path.suffix.lower() == ".gif" else 1
        limit = env.max_episode_steps if steps is None else steps
        actor = module.make_actor()
        device = next(module.parameters()).device
        with (
            _frame_writer(path, fps / stride) as write,
            torch.no_grad(),
            set_exploration_type(ExplorationType.DETERMINISTIC),
        ):
            tensordict = env.reset()
            write(env.render())
            count = 1
            for step in range(1, limit + 1):
                tensordict = env.step(actor(tensordict.to(device)).to(env.device))
                last = step == limit or bool(tensordict["next", "done"].any())
                if step % stride == 0 or last:  # a GIF's stride never drops the final state
                    write(env.render())
                    count += 1
                if last:
                    break
                tensordict = step_mdp(tensordict)
    finally:
        env.close()
    return path, count, fps / stride


def render_episode(
    module: Any,
    output: str | Path,
    steps: int | None = None,
    seed: int = 0,
    fps: float | None = None,
    width: int = 480,
    height: int = 480,
) -> Path:
    """Render one deterministic episode of ``module``'s policy to ``output`` (``.mp4`` or ``.gif``).

    One environment built from ``module.hparams.env`` (seeded with ``seed``) is stepped with the
    policy's mean action until the episode ends or after ``steps`` steps. The video holds the reset
    state and the state after every step (``steps + 1`` frames for an episode that does not end
    first), at ``fps`` frames per second (default: the simulator's real time, ``1 / dt``); a GIF keeps
    every k-th frame when that rate is above :data:`MAX_GIF_FPS` (and always the last one).

    Args:
        module: an ``FP3OModule`` (anything with ``hparams.env``, ``build_env()``, ``make_actor()`` and
            parameters).
        output: the file to write; its suffix picks the format.
        steps: step limit; ``None`` runs to the end of the episode (``max_episode_steps`` at most).
        seed: environment seed.
        fps: frame rate of the video.
        width, height: frame size in pixels (mp4 wants multiples of 16).

    Returns:
        The path written.

    Raises:
        ValueError: for an unsupported suffix or an environment that cannot render.
        RuntimeError: if off-screen rendering or the mp4 encoder is unavailable (says what to install).
    """
    return _render(module, output, steps, seed, fps, width, height)[0]


def _local_store_missing(tracking_uri: str) -> bool:
    """True for a ``sqlite:///`` store whose file does not exist (MLflow would create an empty one)."""
    prefix = "sqlite:///"
    return tracking_uri.startswith(prefix) and not Path(tracking_uri[len(prefix) :]).exists()


def log_video(path: Path, mlflow_info: dict[str, str]) -> str:
    """Log ``path`` to the MLflow run in ``mlflow_info`` under ``videos/``; return the artifact URI."""
    import mlflow

    run_id, tracking_uri = mlflow_info["run_id"], mlflow_info["tracking_uri"]
    if _local_store_missing(tracking_uri):
        raise FileNotFoundError(
            f"the MLflow store {tracking_uri} of run {run_id} does not exist here "
            "(a relative sqlite path is resolved against the working directory)"
        )
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    client.log_artifact(run_id, str(path), "videos")
    return f"{run.info.artifact_uri.rstrip('/')}/videos/{path.name}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fp3o render",
        description="Render a deterministic evaluation episode of a checkpoint's policy to mp4 or gif "
        "and log it to the checkpoint's MLflow run.",
    )
    parser.add_argument("--ckpt_path", required=True, type=Path, help="Lightning checkpoint of an FP3OModule")
    parser.add_argument("--output", type=Path, default=Path("episode.mp4"), help="video file, .mp4 or .gif")
    parser.add_argument("--steps", type=int, default=None, help="step limit (default: the whole episode)")
    parser.add_argument("--seed", type=int, default=0, help="environment seed")
    parser.add_argument("--fps", type=float, default=None, help="frame rate (default: real time, 1 / dt)")
    parser.add_argument("--width", type=int, default=480, help="frame width in pixels")
    parser.add_argument("--height", type=int, default=480, help="frame height in pixels")
    parser.add_argument("--no_mlflow", action="store_true", help="do not log the video to the MLflow run")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``fp3o render`` (see ``fp3o render --help``)."""
    from fp3o_lightning.errors import ConfigError
    from fp3o_lightning.module import DEFAULT_ENV, FP3OModule, legacy_hparams

    parser = _parser()
    args = parser.parse_args(argv)
    if not args.ckpt_path.is_file():
        parser.error(f"checkpoint file not found: {args.ckpt_path}")
    try:
        _check_output(args.output)
    except ValueError as err:
        parser.error(str(err))
    # A full Lightning checkpoint (optimiser and loop states) is not a weights-only file.
    checkpoint = torch.load(args.ckpt_path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "hyper_parameters" not in checkpoint:
        parser.error(f"{args.ckpt_path} is not a Lightning checkpoint of an FP3OModule (no hyper_parameters)")
    try:
        _check_renderable(checkpoint["hyper_parameters"].get("env") or DEFAULT_ENV)
    except ValueError as err:
        parser.error(str(err))
    legacy = legacy_hparams(checkpoint["hyper_parameters"])  # options newer than the checkpoint
    try:
        module = FP3OModule.load_from_checkpoint(
            args.ckpt_path, map_location="cpu", weights_only=False, **legacy
        )
    except ConfigError as err:  # its options do not check any more (e.g. an environment's option renamed)
        print(f"fp3o render: error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        path, count, fps = _render(
            module, args.output, args.steps, args.seed, args.fps, args.width, args.height
        )
    except ValueError as err:  # bad --steps, --fps, --width or --height
        parser.error(str(err))
    print(f"Wrote {count} frames ({args.width}x{args.height}, {fps:g} fps) to {path}")
    mlflow_info = checkpoint.get("fp3o", {}).get("mlflow")
    if args.no_mlflow:
        return
    if not mlflow_info:
        print("The checkpoint has no MLflow run; the video was not logged.")
        return
    try:
        uri = log_video(path, mlflow_info)
    except Exception as err:  # the video is written either way: say so, and fail
        sys.exit(f"Could not log {path} to MLflow run {mlflow_info.get('run_id')}: {err}")
    print(f"Logged to MLflow run {mlflow_info['run_id']} ({mlflow_info['tracking_uri']}): {uri}")


if __name__ == "__main__":
    main()
