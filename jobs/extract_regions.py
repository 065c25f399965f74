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

from jobs._cli import parse, print_summary  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    target = "dataset"
    if "--target" in argv:
        i = argv.index("--target")
        target = argv[i + 1]
        del argv[i:i + 2]
    cfg = parse(argv, __doc__.splitlines()[0])
    from mask.pipeline.extract_regions import extract_dataset

    summary = extract_dataset(cfg, target)
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
