"""Ray Tune sweep: λ1, λ2, τ retrained per trial; m, α, k evaluated as a grid on each trained model.

    python tune/sweep.py                                   # the demo space on the embedded default
    python tune/sweep.py --space tune/spaces/demo.yaml train.lr=5e-4
    python tune/sweep.py --resume                          # continue this config+space's sweep after a crash
    python tune/sweep.py --name lambda-scan --resume       # continue the sweep in sweeps/lambda-scan/
    ray job submit --working-dir . -- python tune/sweep.py storage.root=s3://bucket/mask

Options: --space FILE (YAML search space, default tune/spaces/demo.yaml), --name NAME (sweep folder
sweeps/<NAME>/, default sweep-<hash of config and space>), --resume (restore the sweep's Tune
experiment, sweeps/<NAME>/tune, and fail when there is none), then the usual --config FILE and dotted
overrides.  A rerun of a finished sweep prints its summary; a rerun of an interrupted one restores it
(Tuner.restore) also without --resume.  Prints the best trial, the best config file (a full
config for jobs/*.py), the registered knowledge and the held-out test metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jobs._cli import job_parser, parse_job, print_summary, run  # noqa: E402

DEFAULT_SPACE = Path(__file__).resolve().parent / "spaces" / "demo.yaml"


def main(argv: list[str] | None = None) -> dict:
    p = job_parser(__doc__)
    p.add_argument("--space", default=str(DEFAULT_SPACE), metavar="FILE",
                   help="YAML search space (default: tune/spaces/demo.yaml)")
    p.add_argument("--name", default=None, help="sweep folder sweeps/<NAME>/ (default: sweep-<hash of config "
                                                "and space>)")
    p.add_argument("--resume", action="store_true",
                   help="restore the sweep's Tune experiment (sweeps/<NAME>/tune); fail when there is none")
    args, cfg = parse_job(p, argv)
    from mask.sweep import SpaceError, load_space

    try:
        spec = load_space(args.space)
    except SpaceError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from mask.pipeline.tune import SweepError, run_sweep

    try:
        summary = run_sweep(cfg, spec, space_text=Path(args.space).read_text(), name=args.name,
                            resume=args.resume)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    b = summary["best"]
    print(f"best trial {b['trial_id']}: val Rs {b['val_rsum']:.2f} (m={b['m']}, alpha={b['alpha']}, k={b['k']}; "
          f"{b['epochs']} epochs) config {b['config']}")
    print(f"best config: {summary['best_config']}")
    print(f"knowledge: {summary['knowledge']['uri']} (model version {summary['knowledge'].get('model_version')})")
    print_summary(summary)
    return summary


if __name__ == "__main__":
    run(main)
