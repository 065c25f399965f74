"""Benchmark: training throughput (region–word pairs/s) through Ray Train vs a bare PyTorch loop.

    python bench/train.py                          # 2,000 images × 20 regions × 2048-d, Z=512, N=300
    python bench/train.py --images 600 --epochs 4  # quicker

One process, side by side, on the same synthetic training rows (seeded; the format the features
artifact joined with VG region words gives), the same model (PAE + FRM + MTM at the paper's sizes,
eq. 14 loss, Adam) and the same batch size:

1. bare PyTorch: a plain loop over the Arrow table (shuffled, converted to numpy per batch like
   Ray Data does), the same ``collate`` and ``train_step``, torch's default threads; before Ray starts;
2. Ray Train, 1 worker (all CPUs of the machine, so the same threads): ``run_training`` as the
   jobs call it, data through Ray Data ``get_dataset_shard``;
3. Ray Train, 2 workers (DDP over gloo, the CPUs split between them);
4. bare PyTorch again (Ray idle); 2–4 are repeated ``--repeats`` times.  Each Ray 1-worker run is
   compared with the better of the bare runs just before and after it (the machine may be shared,
   and its load changes between runs), and the median over repeats is printed.

Steady state: the first epoch of each is warm-up and left out; the rate is total pairs / total
seconds of the other epochs (measured inside the loop, data loading included).  Startup = fit()
wall time − the epochs' time (worker group start, dataset split, checkpoint, shutdown).  Also
printed: CPU seconds per epoch of the training process(es) (less sensitive to other load than wall
time, not immune to it), and pairs per CPU-second.
Target: Ray Train (1 worker) / bare ≥ 0.85.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mask.config import load_config  # noqa: E402


def make_table(images: int, regions: int, dim: int, vocab: int, seed: int = 0) -> pa.Table:
    """Training rows: ``regions`` ±25 % regions per image, 1–2 words per region (≈1.5 pairs/region)."""
    rng = np.random.default_rng(seed)
    counts = np.clip(rng.integers(int(regions * 0.75), int(regions * 1.25) + 1, images), 1, None)
    feats, slots, words = [], [], []
    for c in counts:
        feats.append(rng.standard_normal(c * dim, dtype=np.float32).astype(np.float16))
        per = rng.integers(1, 3, c)
        slots.append(np.repeat(np.arange(c, dtype=np.int32), per))
        words.append(rng.integers(0, vocab, per.sum()).astype(np.int32))
    return pa.table({"image_id": [f"img{i}" for i in range(images)],
                     "features": pa.array(feats, pa.list_(pa.float16())),
                     "num_boxes": pa.array(counts, pa.int32()), "feature_dim": pa.array([dim] * images, pa.int32()),
                     "pair_slot": pa.array(slots, pa.list_(pa.int32())),
                     "pair_word": pa.array(words, pa.list_(pa.int32())),
                     "num_pairs": pa.array([len(w) for w in words], pa.int64())})


def _numpy_batch(t: pa.Table) -> dict[str, np.ndarray]:
    return {name: t.column(name).to_numpy(zero_copy_only=False) for name in t.column_names}


def bare_loop(cfg, table: pa.Table, word_vectors: np.ndarray, epochs: int) -> list[dict[str, float]]:
    """The bare PyTorch loop; returns per-epoch pairs, seconds, CPU seconds."""
    from mask.pipeline.train import TrainModule, collate, images_per_batch, loss_weights, train_step

    torch.manual_seed(cfg.train.seed)
    module = TrainModule(cfg, word_vectors.shape[0])
    opt = torch.optim.Adam(module.parameters(), lr=cfg.train.lr)
    wv = torch.from_numpy(word_vectors)
    ppi = float(np.sum(table.column("num_pairs").to_numpy())) / table.num_rows
    weights = loss_weights(cfg)
    rng = np.random.default_rng(0)
    out, step = [], 0
    for epoch in range(epochs):
        per = images_per_batch(cfg.train, epoch, ppi)
        order = rng.permutation(table.num_rows)
        t0, c0, pairs = time.perf_counter(), time.process_time(), 0
        module.train()
        for i in range(0, len(order), per):
            b = collate(_numpy_batch(table.take(order[i:i + per])), torch.device("cpu"))
            step += 1
            train_step(module, module, opt, b, wv, weights, step)
            pairs += int(b["pair_word"].numel())
        out.append({"pairs": pairs, "seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0})
    return out


def ray_train(cfg, table: pa.Table, word_vectors: np.ndarray, workers: int, root: str) -> tuple[list[dict], float]:
    """Ray Train through ``run_training``; per-epoch numbers come back through MLflow (rank 0)."""
    import mlflow
    import ray.data

    from mask import tracking
    from mask.pipeline.runtime import JobContext
    from mask.pipeline.train import run_training

    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_workers": workers}),
                                 "storage": cfg.storage.model_copy(update={"root": root})})
    ctx = JobContext.from_config(cfg)
    ds = ray.data.from_arrow(table).materialize()
    stats = {"images": table.num_rows, "pairs": int(np.sum(table.column("num_pairs").to_numpy()))}
    with tracking.start_run(cfg.tracking, root, f"bench-{workers}") as run:
        uri = tracking.tracking_uri(cfg.tracking, root)
        t0 = time.perf_counter()
        run_training(ctx, ds, stats, word_vectors, run.run_id, uri, f"bench-{workers}w")
        wall = time.perf_counter() - t0
    client = mlflow.MlflowClient(tracking_uri=uri)

    def hist(key):
        return [m.value for m in sorted(client.get_metric_history(run.run_id, key), key=lambda m: m.step)]

    epochs = [{"pairs": p, "seconds": s, "cpu": c} for p, s, c in
              zip(hist("epoch_pairs"), hist("epoch_seconds"), hist("epoch_cpu_seconds"), strict=True)]
    return epochs, wall


def steady(epochs: list[dict]) -> dict[str, float]:
    rest = epochs[1:] or epochs
    pairs = sum(e["pairs"] for e in rest)
    secs = sum(e["seconds"] for e in rest)
    cpu = sum(e["cpu"] for e in rest)
    return {"pairs_per_s": pairs / secs, "pairs_per_cpu_s": pairs / cpu, "epoch_s": statistics.median(e["seconds"] for e in rest),
            "epoch_cpu_s": statistics.median(e["cpu"] for e in rest), "warmup_s": epochs[0]["seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--regions", type=int, default=20)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=2048, help="region–word pairs per global batch")
    p.add_argument("--repeats", type=int, default=2, help="rounds of (Ray 1 worker, Ray 2 workers, bare)")
    args = p.parse_args()

    import ray

    cpus = os.cpu_count() or 1
    cfg = load_config("vg", [f"train.epochs={args.epochs}", f"train.batch_size={args.batch}", "train.batch_size_late=null",
                             "train.late_epoch=null", "train.use_gpu=false", "train.cpus_per_worker=null",
                             f"train.checkpoint_every={args.epochs}", "train.log_every=1000000",
                             "tracking.enabled=true"])
    table = make_table(args.images, args.regions, cfg.model.feature_dim, args.vocab)
    wv = np.random.default_rng(1).standard_normal((args.vocab, cfg.model.word_dim)).astype(np.float32)
    pairs = int(np.sum(table.column("num_pairs").to_numpy()))
    print(f"data: {args.images} images, {pairs} pairs/epoch, features {table.nbytes / 2**20:.0f} MiB; "
          f"model M={cfg.model.feature_dim} Z={cfg.model.latent_dim} N={cfg.model.word_dim}; batch {args.batch} pairs; "
          f"{args.epochs} epochs (first = warm-up); {cpus} CPUs, torch threads {torch.get_num_threads()}")
    bare_runs: list[dict] = []
    ray_runs: dict[int, list[dict]] = {1: [], 2: []}

    def bare() -> None:
        bare_runs.append(steady(bare_loop(cfg, table, wv, args.epochs)))
        print(f"bare PyTorch #{len(bare_runs)}        ", _fmt(bare_runs[-1]), flush=True)

    with tempfile.TemporaryDirectory() as root:
        # first bare run before Ray starts: its daemons and pre-started workers use CPU after ray.init
        bare()
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", num_cpus=cpus, include_dashboard=False,
                 log_to_driver=False)
        for rep in range(args.repeats):
            for w in (1, 2):
                epochs, wall = ray_train(cfg, table, wv, w, os.path.join(root, f"r{rep}w{w}"))
                s = steady(epochs)
                s["startup_s"] = wall - sum(e["seconds"] for e in epochs)
                ray_runs[w].append(s)
                print(f"Ray Train {w} worker{'s' if w > 1 else ' '} #{rep + 1}", _fmt(s),
                      f"startup+teardown {s['startup_s']:.1f} s", flush=True)
            bare()
        ray.shutdown()
    # Each Ray run against the better of the bare runs just before and after it (a shared machine's
    # load changes between runs; the slower neighbour was the disturbed one); the median over repeats.
    for key, label in (("pairs_per_s", "wall"), ("pairs_per_cpu_s", "per CPU-second")):
        r1 = [ray_runs[1][i][key] / max(bare_runs[i][key], bare_runs[i + 1][key]) for i in range(args.repeats)]
        r21 = [ray_runs[2][i][key] / ray_runs[1][i][key] for i in range(args.repeats)]
        print(f"Ray Train (1 worker) / bare PyTorch, {label}: median {statistics.median(r1):.3f} "
              f"(each: {', '.join(f'{x:.3f}' for x in r1)}){'; target >= 0.85' if key == 'pairs_per_s' else ''}")
        print(f"Ray Train 2 workers / 1 worker, {label}:     median {statistics.median(r21):.3f} "
              f"(each: {', '.join(f'{x:.3f}' for x in r21)})")


def _fmt(s: dict[str, float]) -> str:
    return (f"{s['pairs_per_s']:9.0f} pairs/s  {s['pairs_per_cpu_s']:8.0f} pairs/CPU-s  epoch {s['epoch_s']:.2f} s "
            f"(CPU {s['epoch_cpu_s']:.2f} s)  warm-up epoch {s['warmup_s']:.2f} s")


if __name__ == "__main__":
    main()
