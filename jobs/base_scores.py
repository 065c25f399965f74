"""CLIP base-model scores of a gallery on Ray Data: images × captions cosine matrix for re-ranking (eq. 15).

    python jobs/base_scores.py                                        # the demo gallery, ViT-B-32 / openai
    python jobs/base_scores.py --config flickr30k clip.model=ViT-L-14 clip.pretrained=openai
    python jobs/base_scores.py clip.pretrained=s3://bucket/models/clip.safetensors storage.root=s3://bucket/mask
    ray job submit --working-dir . -- python jobs/base_scores.py storage.root=s3://bucket/mask

Writes ``base_scores/<gallery>/<model-tag>/`` (``scores.npy`` + ``ids.json``; ``_errors/`` for images
that failed); point ``rerank.base_scores`` at it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jobs._cli import parse, print_summary, run  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(argv, __doc__)
    from mask.pipeline.base_scores import base_scores_job

    summary = base_scores_job(cfg)
    print_summary(summary)
    return summary


if __name__ == "__main__":
    run(main)
