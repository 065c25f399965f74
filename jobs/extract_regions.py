"""Region features for a dataset on Ray Data: images → decode (CPU) → BUTD detector (actors) → Parquet.

    python jobs/extract_regions.py                                   # the demo training set, ground-truth boxes
    python jobs/extract_regions.py --target gallery                  # the demo gallery, detected boxes
    python jobs/extract_regions.py --config vg detector.weights=/models/bua-caffe-frcn-r101-k36.pth
    ray job submit --working-dir . -- python jobs/extract_regions.py storage.root=s3://bucket/mask
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jobs._cli import job_parser, parse_job, print_summary, run  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = job_parser(__doc__)
    p.add_argument("--target", choices=("dataset", "gallery"), default="dataset",
                   help="what to extract: the training dataset (its ground-truth boxes when it has regions) or "
                        "the gallery (detector.mode boxes) (default: %(default)s)")
    args, cfg = parse_job(p, argv)
    from mask.pipeline.extract_regions import extract_dataset

    summary = extract_dataset(cfg, args.target)
    print_summary(summary)
    return summary


if __name__ == "__main__":
    run(main)
