"""Which COCO / Flickr images a gallery holds, so that knowledge building can leave them out (leakage).

Visual Genome's ``image_data.json`` gives each VG image its ``coco_id`` / ``flickr_id`` when it is also a
COCO or Flickr image; about 50k VG images are COCO images, some of them in the Karpathy COCO 5k test split,
and some VG images are Flickr30K images.  Knowledge learned from those regions would have seen the test
gallery.  :func:`gallery_source_ids` reads the gallery's own file (Karpathy split JSON: ``cocoid`` for COCO
entries, the numeric file name — the Flickr photo id — for Flickr30K entries; COCO captions JSON: the image
``id``), restricted to the gallery's splits, and :func:`mask.datasets.vg.read_vg` drops VG images whose ids
are in these sets (counted as ``excluded_overlap``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from mask.datasets.records import DatasetError, as_int, iter_json_items, join_uri

logger = logging.getLogger(__name__)


def gallery_source_ids(gallery: Any, storage_options: dict | None = None, demo_root: str | None = None
                       ) -> tuple[set[int], set[int]]:
    """``(coco_ids, flickr_ids)`` of the images of a gallery :class:`mask.config.DatasetConfig`.

    Kinds: ``karpathy`` and ``demo`` (its Karpathy-format gallery) read the split file; ``coco`` reads the
    COCO captions JSON's ``images``; ``vg`` and ``folder`` galleries have no such ids (empty sets).

    Raises:
        DatasetError: the gallery file is missing or malformed (named).
    """
    kind = gallery.kind
    coco: set[int] = set()
    flickr: set[int] = set()
    if kind in ("karpathy", "demo"):
        path = gallery.path
        if kind == "demo":
            root = gallery.path or demo_root
            if root is None:
                return coco, flickr
            path = join_uri(str(root), "karpathy", "dataset_demo.json")
        if path is None:
            raise DatasetError(f"gallery {gallery.name!r}: kind {kind!r} needs gallery.path")
        splits = None if kind == "demo" else gallery.splits
        for rec in iter_json_items(path, "images.item", expect="{", storage_options=storage_options):
            if not isinstance(rec, dict) or (splits is not None and rec.get("split") not in splits):
                continue
            cid = as_int(rec.get("cocoid"))
            if cid is not None:
                coco.add(cid)
                continue
            stem = os.path.splitext(os.path.basename(str(rec.get("filename") or "")))[0]
            if stem.isdigit():
                flickr.add(int(stem))
    elif kind == "coco":
        if gallery.path is None:
            raise DatasetError(f"gallery {gallery.name!r}: kind 'coco' needs gallery.path")
        for rec in iter_json_items(gallery.path, "images.item", expect="{", storage_options=storage_options):
            cid = as_int(rec.get("id")) if isinstance(rec, dict) else None
            if cid is not None:
                coco.add(cid)
    logger.info("gallery %s: %d COCO ids and %d Flickr ids to exclude from knowledge building",
                gallery.name, len(coco), len(flickr))
    return coco, flickr
