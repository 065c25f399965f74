"""Detector throughput on this machine: images/s of the BUTD extractor per config, and batched vs one-by-one.

Plain script (not a test): ``python bench/detector_speed.py [--quick]``.  Rates are images per CPU-second
of this process with one torch thread by default (the test machine is shared; CPU time is what stays
comparable).  Every row runs the same
seeded, calibrated extractor on the same synthetic 256 px scenes (the demo world's size), side by side:

- tiny (depth 14, 7×7 pooler, 72 RPN proposals — configs/demo.yaml) and R101 with the same demo
  settings, in modes fixed-36 and given (4 boxes per image);
- R101 with the reference settings (600/1000 resize, 14×14 pooler, 300 proposals) on one image;
- equal-sized images as one batch vs one call per image (the extractor batches only equal shapes).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mask.config import DetectorConfig
from mask.features.extractor import RegionExtractor, synthetic_scenes

DEMO = dict(min_size=256, max_size=320, pooler_resolution=7, rpn_pre_nms_topk=1000, rpn_post_nms_topk=72,
            calibration_images=4, device="cpu")


def images_per_s(ext: RegionExtractor, imgs: list[np.ndarray], boxes: list[np.ndarray] | None,
                 one_by_one: bool = False, repeats: int = 1) -> float:
    """Images per CPU-second of this process (best of ``repeats``); robust to other load on the machine."""
    ext(imgs[:1], boxes[:1] if boxes else None)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        if one_by_one:
            for i in range(len(imgs)):
                ext(imgs[i:i + 1], boxes[i:i + 1] if boxes else None)
        else:
            ext(imgs, boxes)
        best = min(best, time.process_time() - t0)
    return len(imgs) / best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the reference-size R101 row")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time = wall time)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu; rates are per CPU-second")
    scenes = synthetic_scenes(args.images, (256, 256), seed=11)
    imgs = [s[0] for s in scenes]
    gboxes = [s[1][:4] for s in scenes]
    rows = []
    for depth in (14, 101):
        fixed = RegionExtractor.from_config(DetectorConfig(depth=depth, mode="fixed", **DEMO))
        given = RegionExtractor(fixed.model, mode="given", min_size=256, max_size=320)
        batched = images_per_s(given, imgs, gboxes, repeats=3)
        single = images_per_s(given, imgs, gboxes, one_by_one=True, repeats=3)
        rows.append((f"depth {depth} demo size, given 4 boxes, batched", batched))
        rows.append((f"depth {depth} demo size, given 4 boxes, one by one", single))
        rows.append((f"depth {depth} demo size, fixed 36 of 72 proposals", images_per_s(fixed, imgs[:4], None)))
        print(f"depth {depth}: batched/one-by-one = {batched / single:.2f}", flush=True)
    if not args.quick:
        ref = RegionExtractor.from_config(DetectorConfig(depth=101, mode="fixed", calibration_images=1,
                                                         device="cpu"))
        big = synthetic_scenes(1, (600, 800), seed=12)[0][0]
        rows.append(("depth 101 reference (600/1000, 14x14, 300 proposals), fixed 36",
                     images_per_s(ref, [big], None)))
    for name, v in rows:
        print(f"{name:70s} {v:8.3f} images/CPU-s")


if __name__ == "__main__":
    main()
