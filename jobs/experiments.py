"""The paper's experiments as one command: Tables 3/4/5/6/15, the literal choices and a held-out-word OOD test.

    python jobs/experiments.py                          # embedded default: the demo world, 3 seeds
    python jobs/experiments.py --config my.yaml --plan plan.yaml --out docs/experiments
    python jobs/experiments.py --plan-set seeds=[0] --plan-set settings=[default] train.epochs=5

Runs (reusing committed work under <storage root>/experiments/<name>/) one training per setting and seed —
the default, Table 3's ablations (without L_cm / L_cl / KL), the other loss.ir_reduction, the paper-literal
losses, a fixed λ1 × λ2 grid — evaluates each on the whole gallery (OOD on/off, scoring.normalize both ways,
m grid, α grid, caption modes, OOD weighting, Appendix H fine-tuning), runs the held-out-word OOD test, and
writes the report (mean ± spread over seeds), then jobs/report.py on the logged runs.  Prints the time
per part.  Exit status 2 on a bad config or plan.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jobs._cli import job_parser, parse_job, print_summary, run  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = job_parser(__doc__)
    p.add_argument("--plan", default=None, metavar="FILE",
                   help="YAML plan (seeds, epochs, lambda_grid, m_grid, alpha_grid, …)")
    p.add_argument("--plan-set", action="append", default=[], metavar="KEY=VALUE",
                   help="plan override key=value (YAML value; repeatable)")
    p.add_argument("--out", default=None, metavar="DIR", help="report folder (default: reports/experiments-<name>)")
    p.add_argument("--name", default=None, help="experiments name (default: a hash of the config)")
    args, cfg = parse_job(p, argv)
    import yaml

    from mask.config import ConfigError
    from mask.pipeline.experiments import ExperimentError, Plan, run_experiments

    try:
        data = {}
        if args.plan:
            data = yaml.safe_load(Path(args.plan).read_text()) or {}
        for item in args.plan_set:
            key, _, raw = item.partition("=")
            data[key.strip()] = yaml.safe_load(raw)
        plan = Plan.model_validate(data)
        summary = run_experiments(cfg, plan, name=args.name, out_dir=args.out)
    except (ExperimentError, ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print_summary(summary)
    return summary


if __name__ == "__main__":
    run(main)
