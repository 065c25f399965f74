"""Score a gallery with a knowledge version: a committed index, R@K, optional re-ranking (eq. 15).

    python jobs/score_gallery.py                                  # demo gallery, this config's knowledge
    python jobs/score_gallery.py --knowledge @champion gallery.limit=100
    python jobs/score_gallery.py --knowledge models:/mask-knowledge/3 rerank.base_scores=clip.npy rerank.alpha=0.15
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jobs._cli import job_parser, parse_job, print_summary, run  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = job_parser(__doc__)
    p.add_argument("--knowledge", default=None,
                   help="knowledge path (under the storage root) / URI, @alias or models:/name/version "
                        "(default: the version this config builds, else the newest registered)")
    args, cfg = parse_job(p, argv)
    from mask.pipeline.score import score_gallery

    summary = score_gallery(cfg, args.knowledge)
    print(summary["table"])
    print_summary({k: v for k, v in summary.items() if k != "table"})
    return summary


if __name__ == "__main__":
    run(main)
