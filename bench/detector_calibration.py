"""Do random-weight BUTD features carry a scene's content?  Before vs after BN calibration, side by side.

Plain script (not a test): ``python bench/detector_calibration.py [--sizes 128 224] [--depths 14 26]``.
Synthetic images hold two shapes each (4 colours × 3 shapes = 12 classes, chance 1/12); region
features of the ground-truth boxes come from seeded random extractors with and without
:func:`mask.features.extractor.calibrate_batchnorm` (calibrated on separate synthetic scenes).  The
metric is nearest-centroid accuracy (centred, L2-normalised features; centroids from a training set,
accuracy on a separate test set) for the 12 classes, for colour only (chance 1/4) and shape only
(chance 1/3).  "overflow" means the float16 features were not finite.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image, ImageDraw

from mask.config import DetectorConfig
from mask.features.extractor import FeatureOverflow, RegionExtractor, render_shape
from mask.metrics import nearest_centroid_accuracy as accuracy

COLOURS = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (240, 200, 40)]
SHAPES = ["rect", "ellipse", "triangle"]


def shape_images(n: int, seed: int, size: int):
    rng = np.random.default_rng(seed)
    imgs, boxes, labels = [], [], []
    for _ in range(n):
        bg = rng.integers(90, 170, 3)
        im = Image.fromarray(np.clip(bg + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        bs = []
        for half in range(2):
            c, s = int(rng.integers(4)), int(rng.integers(3))
            bw, bh = int(rng.integers(size // 4, size // 2 - 4)), int(rng.integers(size // 4, size // 2))
            x1, y1 = int(rng.integers(0, size // 2 - bw)) + half * size // 2, int(rng.integers(0, size - bh))
            render_shape(d, SHAPES[s], (x1, y1, x1 + bw, y1 + bh), COLOURS[c])
            bs.append([x1, y1, x1 + bw, y1 + bh])
            labels.append(3 * c + s)
        imgs.append(np.asarray(im))
        boxes.append(np.array(bs, np.float32))
    return imgs, boxes, np.array(labels)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    ap.add_argument("--depths", type=int, nargs="+", default=[14, 26, 50, 101])
    ap.add_argument("--pooler", type=int, default=7)
    ap.add_argument("--images", type=int, default=48)
    args = ap.parse_args(argv)
    print(f"{'size':>5} {'depth':>5} {'calibrated':>10} {'all(1/12)':>9} {'colour(1/4)':>11} "
          f"{'shape(1/3)':>10} {'max|f|':>9} {'s':>6}")
    for size in args.sizes:
        tr, te = shape_images(args.images, 1, size), shape_images(args.images, 2, size)
        for depth in args.depths:
            for cal in (False, True):
                t0 = time.perf_counter()
                cfg = DetectorConfig(depth=depth, mode="given", min_size=size, max_size=2 * size,
                                     pooler_resolution=args.pooler, calibrate_random=cal, calibration_images=8,
                                     device="cpu")
                ext = RegionExtractor.from_config(cfg)
                try:
                    ftr = np.concatenate([o["features"] for o in ext(tr[0], tr[1])]).astype(np.float32)
                    fte = np.concatenate([o["features"] for o in ext(te[0], te[1])]).astype(np.float32)
                except FeatureOverflow:
                    print(f"{size:5d} {depth:5d} {str(cal):>10} {'overflow':>9}")
                    continue
                y1, y2 = tr[2], te[2]
                print(f"{size:5d} {depth:5d} {str(cal):>10} {accuracy(ftr, y1, fte, y2):9.2f} "
                      f"{accuracy(ftr, y1 // 3, fte, y2 // 3):11.2f} {accuracy(ftr, y1 % 3, fte, y2 % 3):10.2f} "
                      f"{np.abs(ftr).max():9.3g} {time.perf_counter() - t0:6.1f}", flush=True)


if __name__ == "__main__":
    main()
