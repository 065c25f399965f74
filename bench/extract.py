"""Ray Data extraction vs a bare single-process loop: images/s side by side, in one run, and peak memory.

Plain script (not a test): ``python bench/extract.py [--images 80] [--threads 2] [--repeats 2]``.

Both sides run the same detector (configs/demo.yaml: depth 14, 256/320 px, 7×7 pooler, 72 proposals,
36 boxes; seeded random weights, BN-calibrated once and shipped to both as the same safetensors
bytes) on the same demo-world gallery images, with the same torch thread count:

- bare: one process, a plain loop — read bytes, decode, resize, then ``extract_prepared`` on batches of
  ``detector.batch_size`` (what the actor does), features to float16; nothing is written;
- ray: :func:`mask.pipeline.extract.run_extraction` on a local Ray with ``--threads`` CPUs — decode
  tasks → one detector actor (``cpu_threads = --threads``) → Parquet parts + manifests.

Each side is warmed up once (Ray started, worker processes up, first torch calls done), then the two
sides alternate ``--repeats`` times (the machine may be shared; best and all runs are printed).
Ray's time is ``run_extraction``'s wall time: it includes creating the detector actor and loading its
weights, and writing the artifact; the bare loop's time includes building its extractor from the
same bytes.  Every 100 ms a monitor samples this process (bare) or this process and all its
descendants (Ray: GCS, raylet, agents, workers): peak summed RSS (and RSS minus shared pages) and
CPU seconds used (see :class:`TreeMonitor`).  Images per CPU-second is printed next to images/s because on a shared,
overloaded machine wall time says more about the neighbours than about the pipeline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.sampling import Sampler  # noqa: E402


class TreeMonitor(Sampler):
    """Peak summed memory and CPU seconds of this process (and its descendants, with ``tree``).

    Sampled every ``interval`` s in a thread from cheap counters (``/proc/<pid>/statm`` and ``stat``;
    PSS would need a page-table walk costing ~15 ms per process per sample).  Memory: the sum of RSS,
    and of RSS minus shared pages ("private", which counts Ray's shared-memory object store and
    shared libraries nowhere).  CPU seconds are summed over every process seen, from its value when
    the monitor started (a process that exits loses at most one interval), less the monitor's own.
    """

    def __init__(self, tree: bool, interval: float = 0.1):
        self.tree, self.interval = tree, interval

    def _procs(self) -> list[psutil.Process]:
        me = psutil.Process()
        return [me, *(me.children(recursive=True) if self.tree else [])]

    def _sample(self) -> None:
        rss = private = 0
        parts: list[tuple[str, int]] = []
        for p in self._procs():
            try:
                with p.oneshot():
                    m = p.memory_info()
                    c = p.cpu_times()
                    name = p.name() if p.pid != os.getpid() else "driver"
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += m.rss
            private += m.rss - getattr(m, "shared", 0)
            parts.append((name, m.rss))
            self._cpu_last[p.pid] = c.user + c.system
            self._cpu_first.setdefault(p.pid, 0.0)
        if rss > self.peak_rss:
            self.peak_rss, self.at_peak = rss, parts
        self.peak_private = max(self.peak_private, private)

    @property
    def cpu_seconds(self) -> float:
        return sum(v - self._cpu_first[k] for k, v in self._cpu_last.items()) - self._own_cpu

    def __enter__(self) -> TreeMonitor:
        self.peak_rss = self.peak_private = 0
        self.at_peak: list[tuple[str, int]] = []
        self._cpu_first, self._cpu_last = {}, {}
        for p in self._procs():  # baseline: CPU already used before the run
            try:
                c = p.cpu_times()
                self._cpu_first[p.pid] = c.user + c.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        self._start()
        return self


def bare_loop(det, weights: bytes, uris: list[str]) -> int:
    """Read, decode, resize and extract every image in this process; returns the number of feature rows."""
    from mask.features.extractor import RegionExtractor
    from mask.features.images import decode_image, resize_for_detector
    from mask.pipeline.extract import read_uri

    ext = RegionExtractor.from_config(det, state_dict_bytes=weights)
    mean = ext.model.spec.pixel_mean_bgr
    rows = 0
    for i in range(0, len(uris), det.batch_size):
        blobs, scales, sizes = [], [], []
        for u in uris[i:i + det.batch_size]:
            img = decode_image(read_uri(u, {}), max_pixels=det.max_pixels, source=u)
            blob, scale = resize_for_detector(img, det.min_size, det.max_size, mean)
            blobs.append(blob)
            scales.append(scale)
            sizes.append(img.shape[:2])
        for out in ext.extract_prepared(blobs, scales, sizes):
            rows += int(np.asarray(out["features"], np.float16).shape[0] > 0)
    return rows


def _print_summary(runs: dict[str, list[float]], per_cpu: dict[str, list[float]], peak: dict[str, list[int]],
                   at_peak: list[tuple[str, int]]) -> None:
    """Images/s and images per CPU-second of both sides with their ratios, peak memory, the Ray side's
    processes at its peak and the load average."""
    def fmt(v: list[float]) -> str:
        return f"best {max(v):6.2f}  median {statistics.median(v):6.2f}  (runs: {', '.join(f'{x:.2f}' for x in v)})"

    print(f"bare loop   images/s: {fmt(runs['bare'])}")
    print(f"Ray Data    images/s: {fmt(runs['ray'])}")
    print(f"ratio Ray/bare (wall): best {max(runs['ray']) / max(runs['bare']):.3f}, "
          f"median {statistics.median(runs['ray']) / statistics.median(runs['bare']):.3f}  (target >= 0.9)")
    print(f"bare loop   images per CPU-second: {fmt(per_cpu['bare'])}")
    print(f"Ray Data    images per CPU-second: {fmt(per_cpu['ray'])}  (driver + every Ray process)")
    print(f"ratio Ray/bare (CPU): best {max(per_cpu['ray']) / max(per_cpu['bare']):.3f}, "
          f"median {statistics.median(per_cpu['ray']) / statistics.median(per_cpu['bare']):.3f}")
    gib = 2 ** 30
    for k in ("bare", "ray"):
        print(f"peak memory {k:4s}: RSS sum {peak[k][0] / gib:.2f} GiB, private (RSS - shared) sum {peak[k][1] / gib:.2f} GiB"
              f" ({'this process' if k == 'bare' else 'driver + Ray processes'})")
    groups: dict[str, list[int]] = {}
    for name, rss in at_peak:
        groups.setdefault(name, []).append(rss)
    print("  Ray side at its peak (RSS by process name): " + ", ".join(
        f"{k} {len(v)}x {sum(v) / gib:.2f} GiB" for k, v in sorted(groups.items(), key=lambda kv: -sum(kv[1]))))
    print(f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=80)
    ap.add_argument("--threads", type=int, default=2, help="torch threads on both sides (= Ray's CPUs)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    import ray
    import torch

    from mask.config import load_config
    from mask.datasets import generate_demo_world
    from mask.pipeline.extract import DETECTOR_FILE, run_extraction
    from mask.pipeline.runtime import JobContext
    from mask.pipeline.steps import ensure_detector

    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="bench-extract-")
    world = generate_demo_world(Path(tmp, "world"), seed=0, n_train=1, n_gallery=args.images)
    uris = sorted(str(p) for p in (world.karpathy_root / "images").iterdir())[: args.images]
    cfg = load_config("demo", [f"storage.root={tmp}/art", "tracking.enabled=false", "detector.device=cpu",
                               "detector.num_actors=1", f"detector.cpu_threads={args.threads}",
                               f"ray.num_cpus={args.threads}"])
    det = cfg.detector
    ctx = JobContext.from_config(cfg)
    rel = ensure_detector(ctx, uris[:16])
    weights = ctx.store.read_file(rel, DETECTOR_FILE)
    images = pa.table({"image_id": [Path(u).stem for u in uris], "uri": uris})

    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    n = len(uris)
    print(f"{n} demo images ({world.image_size} px), detector depth {det.depth}, {det.min_size}/{det.max_size} px, "
          f"batch {det.batch_size}, torch threads {args.threads} on both sides, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    runs: dict[str, list[float]] = {"bare": [], "ray": []}
    per_cpu: dict[str, list[float]] = {"bare": [], "ray": []}
    peak = {"bare": [0, 0], "ray": [0, 0]}
    at_peak: list[tuple[str, int]] = []

    def run_bare(uris_: list[str]) -> float:
        t0 = time.perf_counter()
        rows = bare_loop(det, weights, uris_)
        assert rows == len(uris_), f"bare loop: {rows} feature rows for {len(uris_)} images"
        return time.perf_counter() - t0

    def run_ray(uris_: list[str], name: str) -> float:
        t0 = time.perf_counter()
        s = run_extraction(cfg, ctx.store, name, images.slice(0, len(uris_)), None, rel)
        assert s["extracted"] == len(uris_), s
        return time.perf_counter() - t0

    run_bare(uris[:8])  # warm-up: torch's first calls
    run_ray(uris[:8], "warmup")  # warm-up: Ray's worker processes and imports
    for r in range(args.repeats):
        for side in ("bare", "ray"):
            with TreeMonitor(tree=side == "ray") as mon:
                secs = run_bare(uris) if side == "bare" else run_ray(uris, f"bench-{r}")
            runs[side].append(n / secs)
            per_cpu[side].append(n / mon.cpu_seconds)
            if side == "ray" and mon.peak_rss > peak["ray"][0]:
                at_peak = mon.at_peak
            peak[side] = [max(peak[side][0], mon.peak_rss), max(peak[side][1], mon.peak_private)]
    ray.shutdown()

    _print_summary(runs, per_cpu, peak, at_peak)


if __name__ == "__main__":
    main()
