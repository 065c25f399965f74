"""Ad-hoc retrieval against a committed gallery index: text → top images, image → top captions.

    python jobs/query.py --text "a red car next to a dog" --image 1000092795
    python jobs/query.py --index indexes/demo_gallery/i-0123 --text "crimson vessel" --top 5
    python jobs/query.py --text "a red car" --show why.png      # the top images, each word's region boxed

A text with no usable word (only stopwords, unknown words, empty) is an error (exit 2) that lists the
words dropped and why.  Each result line ends with its evidence: word@region score (eq. 10's arg-max).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jobs._cli import job_parser, parse_job, positive_int, print_summary, run  # noqa: E402


def _evidence(hit: dict) -> str:
    return " ".join(f"{m['word']}@r{m['region']} {m['score']:.3f}" for m in hit.get("regions", []))


def main(argv: list[str] | None = None) -> dict:
    p = job_parser(__doc__)
    p.add_argument("--index", default=None, help="index path under the storage root (default: the newest)")
    p.add_argument("--text", action="append", default=[], help="a text query (repeatable)")
    p.add_argument("--image", action="append", default=[], help="a gallery image id (repeatable)")
    p.add_argument("--top", type=positive_int, default=10, help="results per query (default: %(default)s)")
    p.add_argument("--show", default=None, metavar="FILE",
                   help="draw each query's top results into FILE (.png or .html): every caption word's best "
                        "region (eq. 10's arg-max) boxed and labelled with the word and its score")
    args, cfg = parse_job(p, argv)
    if not args.text and not args.image:
        p.error("give at least one --text or --image query")
    from mask.pipeline.query import query_job

    out = query_job(cfg, args.index, args.text, args.image, args.top, show=args.show)
    for q in out["text"]:
        used = ", ".join(f"{w['word']} ({w['source']})" for w in q["words"]) or "none"
        print(f"\ntext: {q['query']!r}  words: {used}  [{q['seconds'] * 1000:.1f} ms]")
        for r, hit in enumerate(q["results"], 1):
            print(f"  {r:3d}. {hit['image_id']}  {hit['score']:.4f}  {_evidence(hit)}")
    for q in out["image"]:
        print(f"\nimage: {q['query']}  [{q['seconds'] * 1000:.1f} ms]")
        for r, hit in enumerate(q["results"], 1):
            print(f"  {r:3d}. {hit['caption_id']}  {hit['score']:.4f}  {hit['text']}  [{_evidence(hit)}]")
    print_summary({"index": out["index"], "load_seconds": round(out["load_seconds"], 3)}
                  | ({"shown": out["shown"]} if "shown" in out else {}))
    return out


if __name__ == "__main__":
    run(main)
