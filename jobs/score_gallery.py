"""Score a gallery with a knowledge version: a committed index, R@K, optional re-ranking (eq. 15).

    python jobs/score_gallery.py                                  # demo gallery, this config's knowledge
    python jobs/score_gallery.py --knowledge @champion gallery.limit=100
    python jobs/score_gallery.py --knowledge models:/mask-knowledge/3 rerank.base_scores=clip.npy rerank.alpha=0.15
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jobs._cli import parse, print_summary  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--knowledge", default=None,
                   help="knowledge path (under the storage root) / URI, @alias or models:/name/version "
                        "(default: the version this config builds, else the newest registered)")
    args, rest = p.parse_known_args(argv if argv is not None else sys.argv[1:])
    cfg = parse(rest, __doc__.splitlines()[0])
    from mask.pipeline.score import score_gallery

    summary = score_gallery(cfg, args.knowledge)
    print(summary["table"])
    print_summary({k: v for k, v in summary.items() if k != "table"})
    return summary


if __name__ == "__main__":
    main()
