"""Benchmark: how memory and time grow with the training data (issue 15, "memory that stays flat").

    python bench/scale.py --images 1000 10000 50000
    python bench/scale.py --images 500 2000 --gallery 1000      # a quick look

Per size N, in a fresh process (so a size never inherits the previous one's heap) with its own local
Ray and storage root:

1. synthetic VG-format annotations (``image_data.json``, ``objects.json``; ``--regions`` objects per
   image, words from GloVe 6B) and a committed features artifact on those ground-truth boxes with a
   small feature size (``--dim``, default 64) — the detector is not run;
2. **ingest**: the VG reader → the dataset artifact;
3. **train**: one epoch of PAE + FRM + MTM through Ray Train (the training inputs: vocabulary,
   region → words join, Ray Data materialisation);
4. **knowledge**: the eq. 2 pass over every region (μ through Ray Data) → the knowledge artifact;
5. **gallery**: a ``--gallery``-image index (the same size at every N, 5 captions per image,
   features given) scored with that knowledge by the re-index job;
6. **trial**: one epoch of a Tune trial's in-process training (eq. 14) on the same rows, read part by
   part by :class:`mask.pipeline.trial_rows.TrialRows` (``--window`` images at a time) — in the driver
   process, so its memory is the driver's.

Printed: a table with, per size, the wall time per stage and the peak RSS of the driver and of the
largest single Ray worker process (sampled every 0.1 s), then
``driver_peak_rss_ratio=<peak at the largest size / peak at the smallest>`` (target ≤ 1.5).
Timings on a shared machine are noisy: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.sampling import Sampler  # noqa: E402

STAGES = ("ingest", "train", "knowledge", "gallery", "trial")


class PeakRss(Sampler):
    """Peak RSS of this process (the driver) and of the largest single descendant named ``ray::…``."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.driver = self.worker = 0
        self.worker_name = ""

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        self.driver = max(self.driver, me.memory_info().rss)
        for p in me.children(recursive=True):
            try:
                name = p.name()
                if not name.startswith("ray::"):
                    continue
                rss = p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if rss > self.worker:
                self.worker, self.worker_name = rss, name

    def __enter__(self) -> PeakRss:
        self._start()
        return self


def vg_words(n: int = 400) -> list[str]:
    from bench.gallery import glove_words

    _, words = glove_words()
    return words[200:200 + n]  # inside the gallery benchmark's knowledge words (its captions use them)


def write_vg(folder: str, n: int, regions: int, words: list[str], seed: int = 0) -> None:
    """``image_data.json`` + ``objects.json`` for ``n`` images (empty image files: features are given)."""
    rng = np.random.default_rng(seed)
    imgs = os.path.join(folder, "images")
    os.makedirs(imgs, exist_ok=True)
    with open(os.path.join(folder, "image_data.json"), "w") as f:
        f.write("[")
        for i in range(n):
            name = f"{i + 1}.jpg"
            p = os.path.join(imgs, name)
            if not os.path.exists(p):
                open(p, "wb").close()
            f.write(("," if i else "") + json.dumps({"image_id": i + 1, "url": f"images/{name}",
                                                     "width": 500, "height": 400}))
        f.write("]")
    with open(os.path.join(folder, "objects.json"), "w") as f:
        f.write("[")
        oid = 0
        for i in range(n):
            objs = []
            for _ in range(regions):
                oid += 1
                x, y = (int(v) for v in rng.integers(0, 300, 2))
                objs.append({"object_id": oid, "x": x, "y": y, "w": int(rng.integers(20, 150)),
                             "h": int(rng.integers(20, 150)), "names": [str(rng.choice(words))]})
            f.write(("," if i else "") + json.dumps({"image_id": i + 1, "objects": objs}))
        f.write("]")


def write_features(cfg, dim: int, seed: int = 0) -> None:
    """Committed features on the ingested ground-truth boxes (as the extraction would have written)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from mask.datasets import dataset_rel
    from mask.pipeline.extract import ERRORS_SCHEMA, FEATURES_SCHEMA
    from mask.pipeline.identity import extractor_name, features_rel
    from mask.storage import Store

    store = Store(cfg.storage.root)
    det = cfg.detector.model_copy(update={"mode": "given"})
    rel = features_rel(cfg.dataset.name, det)
    rng = np.random.default_rng(seed)
    regions = store.read_table(dataset_rel(cfg.dataset.name, "regions"), columns=["image_id", "region_id"])
    images = store.read_table(dataset_rel(cfg.dataset.name, "images"), columns=["image_id"])
    ids = images.column("image_id").to_pylist()
    chunk = 2000
    with store.open_artifact(rel, kind="features", config_hash=extractor_name(det)) as w:
        for i0 in range(0, len(ids), chunk):
            part_ids = ids[i0:i0 + chunk]
            sub = regions.filter(pc.is_in(regions["image_id"], pa.array(part_ids, pa.string())))
            by_img: dict[str, list[str]] = {}
            for im, rid in zip(sub["image_id"].to_pylist(), sub["region_id"].to_pylist(), strict=True):
                by_img.setdefault(im, []).append(rid)
            rids = [by_img.get(i, []) for i in part_ids]
            counts = [len(r) for r in rids]
            feats = [np.abs(rng.standard_normal(c * dim)).astype(np.float16) for c in counts]
            cols = {"image_id": pa.array(part_ids, pa.string()),
                    "boxes": pa.array([rng.uniform(0, 300, c * 4).astype(np.float32) for c in counts],
                                      pa.list_(pa.float32())),
                    "features": pa.array(feats, pa.list_(pa.float16())),
                    "num_boxes": pa.array(counts, pa.int32()), "feature_dim": pa.array([dim] * len(part_ids), pa.int32()),
                    "image_h": pa.array([400] * len(part_ids), pa.int32()),
                    "image_w": pa.array([500] * len(part_ids), pa.int32()),
                    "region_ids": pa.array(rids, pa.list_(pa.string()))}
            for name in FEATURES_SCHEMA.names:
                if name not in cols:
                    cols[name] = pa.nulls(len(part_ids), FEATURES_SCHEMA.field(name).type)
            w.write_part(pa.table(cols, schema=FEATURES_SCHEMA), name=f"bench-{i0}")
        w.commit()
    with store.open_artifact(f"{rel}/_errors", kind="features.errors", config_hash=extractor_name(det)) as w:
        w.write_part(ERRORS_SCHEMA.empty_table(), name="empty")
        w.commit()


def trial_epoch(cfg, window: int) -> dict:
    """One epoch of a Tune trial's training (:func:`mask.pipeline.tune_trial.train_epoch`) on streamed rows."""
    import torch

    from mask.pipeline.runtime import JobContext
    from mask.pipeline.steps import prepare_training_inputs
    from mask.pipeline.train import TrainModule
    from mask.pipeline.trial_rows import TrialRows
    from mask.pipeline.tune_trial import train_epoch
    from mask.tracking import NullRun

    ctx = JobContext.from_config(cfg)
    inputs = prepare_training_inputs(ctx, NullRun())  # every input is committed: nothing recomputed
    rows = TrialRows(ctx.store, inputs.features_rel, inputs.region_words, window=window)
    torch.manual_seed(0)
    module = TrainModule(cfg, len(inputs.vocab["words"]))
    opt = torch.optim.Adam(module.parameters(), lr=cfg.train.lr)
    wv = torch.tensor(inputs.vocab["vectors"])
    losses, _ = train_epoch(module, opt, rows, wv, cfg, 0, torch.device("cpu"), 0)
    return {**rows.describe(), "loss": losses["loss"]}


def one_size(n: int, args) -> dict:
    """Run every stage at one size in this process; returns timings and peaks."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from bench.gallery import add_features, make_world, write_gallery
    from mask.config import load_config
    from mask.pipeline.build import build_knowledge
    from mask.pipeline.reindex import reindex
    from mask.pipeline.runtime import JobContext, init_ray
    from mask.pipeline.steps import ensure_dataset
    from mask.pipeline.train import train_job

    tmp = tempfile.mkdtemp(prefix=f"bench-scale-{n}-")
    vg = os.path.join(tmp, "vg")
    os.makedirs(vg)
    write_vg(vg, n, args.regions, vg_words())
    spec = make_world(os.path.join(tmp, "gworld"), args.gallery)
    gjson = write_gallery(os.path.join(tmp, "gallery"), spec, args.gallery)
    root = os.path.join(tmp, "root")
    cfg = load_config("demo", [
        f"storage.root={root}", "tracking.enabled=false", f"dataset.name=scale{n}", "dataset.kind=vg",
        f"dataset.path={vg}", "dataset.splits=null", "vocabulary.min_count=1", "detector.weights=given-features",
        f"model.feature_dim={args.dim}", "model.latent_dim=64", "model.word_dim=50", "model.num_heads=2",
        "model.pae_layers=1", "train.epochs=1", f"train.batch_size={args.batch}", "train.checkpoint_every=1",
        "gallery.name=g", "gallery.kind=karpathy", f"gallery.path={gjson}", "gallery.splits=[test]",
        f"gallery.limit={args.gallery}", "represent.batch_size=256"])
    for attempt in range(4):  # a loaded machine can miss Ray's fixed 30 s raylet start-up window
        try:
            init_ray(cfg)
            break
        except Exception as e:  # noqa: BLE001
            if attempt == 3:
                raise
            print(f"ray start failed ({e}); retrying", flush=True)
            import ray

            ray.shutdown()
            time.sleep(10)
    out: dict = {"images": n, "regions_per_image": args.regions, "seconds": {}, "driver_rss": {}, "worker_rss": {}}

    def stage(name, fn, *a):
        with PeakRss() as m:
            t0 = time.perf_counter()
            res = fn(*a)
            out["seconds"][name] = round(time.perf_counter() - t0, 2)
        out["driver_rss"][name], out["worker_rss"][name] = m.driver, m.worker
        out.setdefault("worker_name", {})[name] = m.worker_name
        return res

    nog = cfg.model_copy(update={"gallery": None})
    stage("ingest", lambda: ensure_dataset(JobContext.from_config(nog), nog.dataset, None))
    write_features(cfg, args.dim)
    stage("train", train_job, nog)
    k = stage("knowledge", build_knowledge, nog)
    add_features(cfg, [r["filename"][:-4] for r in spec["images"][:args.gallery]], seed=1, r=args.regions,
                 m=args.dim)
    stage("gallery", reindex, cfg, k["knowledge"]["uri"])
    out["trial_rows"] = stage("trial", trial_epoch, nog, args.window)
    out["load_average"] = round(os.getloadavg()[0], 1)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, nargs="+", default=[1000, 10000, 50000])
    p.add_argument("--regions", type=int, default=20, help="objects per image (VG: ~35)")
    p.add_argument("--dim", type=int, default=64, help="feature size M (BUTD: 2048)")
    p.add_argument("--gallery", type=int, default=5000, help="gallery images of the index stage")
    p.add_argument("--batch", type=int, default=2048, help="region-word pairs per training batch")
    p.add_argument("--window", type=int, default=2048, help="images a trial holds at once (TrialRows)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--report", nargs="+", metavar="JSON",
                   help="print the table again from the per-size results files of an earlier run")
    args = p.parse_args(argv)
    if args.report:
        results = []
        for path in args.report:
            with open(path) as f:
                results.append(json.load(f))
        report(sorted(results, key=lambda r: r["images"]))
        return
    if args.one:
        res = one_size(args.one, args)
        with open(args.out, "w") as f:
            json.dump(res, f)
        return
    results = []
    for n in sorted(args.images):
        out = os.path.join(tempfile.gettempdir(), f"bench-scale-{n}-{os.getpid()}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--one", str(n), "--out", out, "--regions",
               str(args.regions), "--dim", str(args.dim), "--gallery", str(args.gallery), "--batch", str(args.batch),
               "--window", str(args.window)]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, env=env).returncode
        if rc != 0:
            print(f"size {n}: failed (exit {rc}); sizes done so far are reported", flush=True)
            break
        with open(out) as f:
            results.append(json.load(f))
        print(f"size {n}: done in {time.perf_counter() - t0:.0f} s (results: {out}; --report reprints them)",
              flush=True)
    if not results:
        return
    report(results)


def report(results: list[dict]) -> None:
    """The table, the per-stage peaks and the two ratios (smallest vs largest size run)."""
    gib = 2 ** 30
    print(f"\n{'images':>8} {'regions':>9} " + " ".join(f"{s + ' s':>12}" for s in STAGES)
          + f" {'driver peak':>12} {'worker peak':>12} {'load':>6}")
    for r in results:
        drv = max(r["driver_rss"].values())
        wrk = max(r["worker_rss"].values())
        print(f"{r['images']:>8} {r['images'] * r['regions_per_image']:>9} "
              + " ".join(f"{r['seconds'][s]:>12.1f}" for s in STAGES)
              + f" {drv / gib:>10.2f}Gi {wrk / gib:>10.2f}Gi {r['load_average']:>6}")
    print("\ndriver peak RSS per stage (GiB): " + "; ".join(
        f"{r['images']}: " + ", ".join(f"{s} {r['driver_rss'][s] / gib:.2f}" for s in STAGES) for r in results))
    print("largest worker per stage (GiB): " + "; ".join(
        f"{r['images']}: " + ", ".join(f"{s} {r['worker_rss'][s] / gib:.2f} ({r['worker_name'][s]})" for s in STAGES)
        for r in results))
    small, large = results[0], results[-1]
    ratio = max(large["driver_rss"].values()) / max(small["driver_rss"].values())
    wratio = max(large["worker_rss"].values()) / max(max(small["worker_rss"].values()), 1)
    print(f"worker_peak_rss_ratio={wratio:.2f}")
    print(f"driver_peak_rss_ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
