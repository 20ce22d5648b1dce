"""The paper's comparison on one task: FP3O, HAPPO, MAPPO and IPPO for a frame budget and a list of seeds.

Runs ``fp3o sweep`` (every algorithm x seed, same config otherwise) into its own MLflow store, then
prints ``fp3o report``'s table in the paper's layout (mean ± std over seeds of the final evaluation
return; best in bold) and writes it, with the learning curves, to ``--out``::

    python benchmarks/compare_algorithms.py --config configs/mamujoco/halfcheetah_6x1.yaml \\
        --sharing nops --frames 150000 --seeds 0 1 2 -- --model.actor_lr 5e-4

Arguments after ``--`` go to every ``fp3o fit`` (e.g. shorter budgets need larger learning rates
than the paper's 10M-frame settings).
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid

from fp3o_lightning import report, sweep

ALGORITHMS = ("fp3o", "happo", "mappo", "ippo")


def main() -> int:
    own, extra = sweep.split_passthrough(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True, help="task config (repeatable)")
    parser.add_argument("--sharing", default="nops", choices=("fups", "paps", "nops"))
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--frames", type=int, default=150_000, help="training frames per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="reports/compare_algorithms", help="MLflow store, tables, curves")
    args = parser.parse_args(own)

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    store = f"sqlite:///{os.path.join(out, 'mlflow.db')}"
    comparison = uuid.uuid4().hex[:8]
    configs = [arg for config in args.config for arg in ("--config", config)]
    fit_args = [
        f"--model.total_frames={args.frames}",
        f"--trainer.logger.init_args.tracking_uri={store}",
        f"--trainer.logger.init_args.artifact_location={os.path.join(out, 'mlartifacts')}",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]
    code = sweep.main(
        [
            *configs,
            "--seeds",
            *map(str, args.seeds),
            "--grid",
            f"model.algorithm={','.join(args.algorithms)}",
            "--grid",
            f"model.sharing={args.sharing}",
            "--tag",
            f"comparison={comparison}",
            "--",
            *fit_args,
        ]
    )
    if code:
        return code
    return report.main(
        ["--tracking_uri", store, "--filter", f"tags.comparison = '{comparison}'", "--out", out]
    )


if __name__ == "__main__":
    sys.exit(main())
