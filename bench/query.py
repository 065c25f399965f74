"""Query latency against a Flickr30K-sized synthetic index (1000 images × 36 regions, 5000 captions).

Not a test: prints the one-time load cost and per-query latencies (median, p95, max) of
``mask.pipeline.query.QueryEngine`` after loading, for text → images and image → captions.
The knowledge has 2000 real GloVe 6B 50d words with random 512-d prototypes; caption and query
words outside it get OOD prototypes (eq. 11–13, m = 10), as in a real run.

    .venv/bin/python bench/query.py [--images 1000] [--regions 36] [--latent 512] [--queries 30]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mask.config import MaskConfig  # noqa: E402
from mask.knowledge import KnowledgeTable  # noqa: E402
from mask.pipeline.query import QueryEngine  # noqa: E402
from mask.text import ContentWordParser  # noqa: E402
from mask.vectors import load_vectors, vectors_for  # noqa: E402

NOUNS = ["dog", "cat", "man", "woman", "child", "car", "bus", "tree", "street", "beach", "ball", "shirt", "horse",
         "bike", "table", "boat", "building", "grass", "water", "hat", "puppy", "automobile", "vessel", "lad"]
ADJS = ["red", "blue", "green", "small", "large", "young", "old", "white", "black", "crimson", "tiny", "striped"]
PREPS = ["on", "near", "in front of", "next to", "behind"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--latent", type=int, default=512)
    p.add_argument("--queries", type=int, default=30)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    cfg = MaskConfig.model_validate({"model": {"word_dim": 50, "latent_dim": a.latent, "num_heads": 2}})
    kv = load_vectors(cfg.vectors.source)
    words = [w for w in kv.index_to_key[:4000] if w.isalpha() and w not in ("automobile", "vessel", "crimson",
                                                                              "lad", "puppy", "tiny")][:2000]
    vecs, _ = vectors_for(kv, words)
    table = KnowledgeTable(words=words, counts=np.ones(len(words)), word_vectors=vecs,
                           prototypes=rng.standard_normal((len(words), a.latent)).astype(np.float32),
                           source=["vg"] * len(words))
    n, r, z = a.images, a.regions, a.latent
    mu = rng.standard_normal((n, r, z)).astype(np.float32)
    mu_table = pa.table({"image_id": [f"img{i}" for i in range(n)],
                         "mu": pa.array(list(mu.reshape(n, r * z)), pa.list_(pa.float32())),
                         "num_boxes": pa.array([r] * n, pa.int32()), "latent_dim": pa.array([z] * n, pa.int32())})

    def caption() -> str:
        return (f"a {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(PREPS)} the {rng.choice(ADJS)} "
                f"{rng.choice(NOUNS)}")

    texts = [caption() for _ in range(5 * n)]
    parser = ContentWordParser.from_config(cfg.text)
    t0 = time.perf_counter()
    cap_words = parser.parse_batch(texts)
    parse_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine = QueryEngine(cfg, table, mu_table, [f"img{i}" for i in range(n)], [f"c{j}" for j in range(5 * n)],
                         texts, cap_words, parser=parser, kv=kv)
    load_s = time.perf_counter() - t0
    engine.text_to_images("a dog", 10)  # warm-up (spaCy, torch first call)
    engine.image_to_captions("img0", 10)
    text_ms = [engine.text_to_images(caption(), 10)["seconds"] * 1000 for _ in range(a.queries)]
    image_ms = [engine.image_to_captions(f"img{rng.integers(n)}", 10)["seconds"] * 1000 for _ in range(a.queries)]
    print(f"index: {n} images × {r} regions × Z={z}, {5 * n} captions; knowledge {len(words)} words")
    print(f"caption parsing (index build, not per query): {parse_s:.2f} s; engine load: {load_s:.2f} s")
    for name, ms in (("text → images", text_ms), ("image → captions", image_ms)):
        ms = np.asarray(ms)
        print(f"{name:17s} median {np.median(ms):7.1f} ms  p95 {np.percentile(ms, 95):7.1f} ms  max {ms.max():7.1f} ms "
              f"({len(ms)} queries; target < 1000 ms)")


if __name__ == "__main__":
    main()
