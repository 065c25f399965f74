"""The main job: build the MASK knowledge table (and evaluate it when the config names a gallery).

    python jobs/build_knowledge.py                       # embedded default: local Ray, ./artifacts, demo world
    python jobs/build_knowledge.py --config vg storage.root=s3://bucket/mask
    ray job submit --working-dir . -- python jobs/build_knowledge.py storage.root=s3://bucket/mask
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jobs._cli import parse, print_summary, run  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(argv, __doc__)
    from mask.pipeline.build import build_knowledge

    summary = build_knowledge(cfg)
    if "evaluation" in summary:
        print(summary["evaluation"]["table"])
    print_summary({k: v for k, v in summary.items() if k != "evaluation"}
                  | ({"evaluation": {k: v for k, v in summary["evaluation"].items() if k != "table"}}
                     if "evaluation" in summary else {}))
    return summary


if __name__ == "__main__":
    run(main)
