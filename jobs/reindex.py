"""Re-index a gallery incrementally and switch indexes/<gallery>/CURRENT atomically (run it on a schedule).

    python jobs/reindex.py                                   # demo gallery, this config's knowledge
    python jobs/reindex.py --knowledge @champion gallery.kind=folder gallery.path=s3://bucket/photos
    ray job submit --working-dir . -- python jobs/reindex.py --config flickr30k storage.root=s3://bucket/mask

Only what is missing is computed (features, μ, score rows and columns). A second run while one holds
the gallery's lease exits 0 saying who holds it; a crashed run leaves the live index untouched.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jobs._cli import job_parser, parse_job, print_summary, run  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = job_parser(__doc__)
    p.add_argument("--knowledge", default=None,
                   help="knowledge path / URI, @alias or models:/name/version (default: index.knowledge, else "
                        "the version this config builds, else the newest registered)")
    args, cfg = parse_job(p, argv)
    from mask.pipeline.reindex import reindex

    summary = reindex(cfg, args.knowledge)
    if summary["status"] == "busy":
        print(f"re-index skipped: {summary['reason']}")
    print_summary(summary)
    return summary


if __name__ == "__main__":
    run(main)
