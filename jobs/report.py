"""Paper-style report (tables, plots, prototype t-SNE) from the MLflow runs of an experiment or a list of runs.

    python jobs/report.py                                  # the runs of tracking.experiment (mask-itm)
    python jobs/report.py --experiment my-sweep --out reports/sweep
    python jobs/report.py --runs 3f2a… 9c1d… --groups my_groups.yaml storage.root=s3://bucket/mask \
        tracking.uri=http://mlflow:5000

Writes report.md, report.json and PNGs to --out and logs them as the artifacts of a new run
(tag job=report). Exit status 2 on an unknown experiment or run id, a missing store or a bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jobs._cli import job_config, job_parser, print_summary, run  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = job_parser(__doc__)
    p.add_argument("--experiment", action="append", default=None,
                   help="MLflow experiment name (repeatable; default: tracking.experiment)")
    p.add_argument("--runs", nargs="+", default=None, help="MLflow run ids (a Tune parent brings its trials)")
    p.add_argument("--out", default=None, help="report folder (default: reports/<experiment>-<UTC time>)")
    p.add_argument("--groups", default=None, help="YAML {group: [words]} for the prototype t-SNE map")
    p.add_argument("--tsne-run", default=None, help="run id whose knowledge to map (default: the best)")
    p.add_argument("--no-mlflow-run", action="store_true", help="do not log the report as an MLflow run")
    args = p.parse_intermixed_args(argv)
    if args.runs:  # `--runs a b key=value`: run ids never hold "=", so those are config overrides
        args.overrides += [r for r in args.runs if "=" in r]
        args.runs = [r for r in args.runs if "=" not in r] or None
    cfg = job_config(args)
    from mask.report import ReportError, make_report

    try:
        summary = make_report(cfg, args.experiment, args.runs, args.out, args.groups, args.tsne_run,
                              log_run=not args.no_mlflow_run)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print_summary(summary)
    return summary


if __name__ == "__main__":
    run(main)
