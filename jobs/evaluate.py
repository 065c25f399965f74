"""R@1/5/10 both ways and Rs for a committed gallery index (or a dense score file), as a paper-style table.

    python jobs/evaluate.py                                   # the newest index of the configured gallery
    python jobs/evaluate.py --index indexes/demo_gallery/i-0123 --protocol coco-5fold-1k
    python jobs/evaluate.py --scores clip_scores.npy          # a base model's (N, T) matrix in the index order
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jobs._cli import job_parser, parse_job, print_summary, run  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = job_parser(__doc__)
    p.add_argument("--index", default=None, help="index path under the storage root (default: the newest)")
    p.add_argument("--scores", default=None, help="dense .npy (images × captions) in the index's order")
    p.add_argument("--protocol", default="all", choices=["all", "flickr30k-1k", "coco-5k", "coco-5fold-1k"])
    args, cfg = parse_job(p, argv)
    from mask.pipeline.evaluate import evaluate_job

    summary = evaluate_job(cfg, args.index, args.scores, args.protocol)
    print(summary["table"])
    print_summary({k: v for k, v in summary.items() if k != "table"})
    return summary


if __name__ == "__main__":
    run(main)
