"""Ad-hoc retrieval against a committed gallery index: text → top images, image → top captions.

    python jobs/query.py --text "a red car next to a dog" --image 1000092795
    python jobs/query.py --index indexes/demo_gallery/i-0123 --text "crimson vessel" --top 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jobs._cli import parse, print_summary  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--index", default=None, help="index path under the storage root (default: the newest)")
    p.add_argument("--text", action="append", default=[], help="a text query (repeatable)")
    p.add_argument("--image", action="append", default=[], help="a gallery image id (repeatable)")
    p.add_argument("--top", type=int, default=10, help="results per query")
    args, rest = p.parse_known_args(argv if argv is not None else sys.argv[1:])
    cfg = parse(rest, __doc__.splitlines()[0])
    from mask.pipeline.query import query_job

    out = query_job(cfg, args.index, args.text, args.image, args.top)
    for q in out["text"]:
        used = ", ".join(f"{w['word']} ({w['source']})" for w in q["words"]) or "none"
        print(f"\ntext: {q['query']!r}  words: {used}  [{q['seconds'] * 1000:.1f} ms]")
        for r, hit in enumerate(q["results"], 1):
            print(f"  {r:3d}. {hit['image_id']}  {hit['score']:.4f}")
    for q in out["image"]:
        print(f"\nimage: {q['query']}  [{q['seconds'] * 1000:.1f} ms]")
        for r, hit in enumerate(q["results"], 1):
            print(f"  {r:3d}. {hit['caption_id']}  {hit['score']:.4f}  {hit['text']}")
    print_summary({"index": out["index"], "load_seconds": round(out["load_seconds"], 3)})
    return out


if __name__ == "__main__":
    main()
