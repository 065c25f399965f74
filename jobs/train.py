"""Training job: dataset → features → vocabulary → Ray Train (PAE + FRM + MTM, eq. 14), in its own MLflow run.

    python jobs/train.py                                  # embedded default: local Ray, ./artifacts, demo world
    python jobs/train.py --config vg storage.root=s3://bucket/mask train.num_workers=8
    python jobs/train.py train.epochs=80                  # a longer rerun continues the same run
    ray job submit --working-dir . -- python jobs/train.py --config vg storage.root=s3://bucket/mask

Prints the checkpoint location and the final losses.  Reruns resume the run from its latest
checkpoint (see mask.pipeline.identity.train_run_name); a worker failure restarts from it as well.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jobs._cli import parse, print_summary, run  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(argv, __doc__)
    from mask.pipeline.train import train_job

    summary = train_job(cfg)
    t = summary["training"]
    print(f"checkpoint: {t['checkpoint']} (epoch {t['final_epoch'] + 1}, step {t['steps']}, resumes {t['resumes']})")
    losses = {k: round(v, 4) for k, v in t.items() if k.startswith("epoch.loss")}
    if losses:
        print("final losses: " + ", ".join(f"{k[len('epoch.'):]}={v}" for k, v in sorted(losses.items())))
    print_summary(summary)
    return summary


if __name__ == "__main__":
    run(main)
