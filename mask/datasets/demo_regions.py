"""The demo world's ground-truth object regions, for measuring what region features know.

Read from the world's own Visual Genome files (``objects.json`` / ``attributes.json``): per image, the boxes
of its whole objects (the classes of :data:`mask.datasets.demo.OBJECT_ASPECT`, not parts such as an apple's
leaf), each with its class and its colour (the object's first attribute).  ``bench/demo_features.py`` and
the feature tests measure nearest-centroid accuracy of the class and the colour on these regions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mask.datasets.demo import OBJECT_ASPECT, DemoWorld


@dataclass
class GroundTruthRegions:
    """Images, their object boxes (xyxy, image pixels), and per region its class, colour and image index."""

    images: list[np.ndarray]
    boxes: list[np.ndarray]
    classes: np.ndarray
    colours: np.ndarray
    image_of: np.ndarray

    def split_by_image(self, seed: int = 0) -> np.ndarray:
        """A boolean mask over the regions: True for those of a seeded half of the images (the centroids'
        half), False for the rest (the measured half), so no image is on both sides."""
        perm = np.random.default_rng(seed).permutation(len(self.images))
        return np.isin(self.image_of, perm[: len(perm) // 2])


def ground_truth_regions(world: DemoWorld, n_images: int) -> GroundTruthRegions:
    """The whole objects of the first ``n_images`` images of the world's VG part (module docstring)."""
    objects = json.loads((world.vg_dir / "objects.json").read_text())[:n_images]
    attributes = json.loads((world.vg_dir / "attributes.json").read_text())[:n_images]
    images, boxes, cls, col, img_of = [], [], [], [], []
    for k, (o, a) in enumerate(zip(objects, attributes, strict=True)):
        keep = [(ob, at) for ob, at in zip(o["objects"], a["attributes"], strict=True)
                if ob["names"][0] in OBJECT_ASPECT and at["attributes"]]
        images.append(np.asarray(Image.open(world.vg_dir / "images" / f"{o['image_id']}.jpg").convert("RGB")))
        boxes.append(np.array([[ob["x"], ob["y"], ob["x"] + ob["w"], ob["y"] + ob["h"]] for ob, _ in keep],
                              np.float32).reshape(-1, 4))
        cls += [ob["names"][0] for ob, _ in keep]
        col += [at["attributes"][0] for _, at in keep]
        img_of += [k] * len(keep)
    return GroundTruthRegions(images, boxes, np.array(cls), np.array(col), np.array(img_of, np.int64))
