"""Caption datasets: Flickr30K / COCO in the Karpathy split format, and COCO's official captions JSON.

Karpathy split files (``dataset_flickr30k.json``, ``dataset_coco.json``)::

    {"images": [{"filepath": "val2014" (COCO only), "filename": "…jpg", "imgid": 0, "split": "test",
                 "sentids": [0, …], "sentences": [{"raw": "…", "tokens": […], "imgid": 0, "sentid": 0}],
                 "cocoid": 391895 (COCO only)}, …],
     "dataset": "flickr30k"}

The standard test galleries are ``splits=["test"]``: Flickr30K 1k (1,000 images × 5 captions) and
COCO 5k (5,000 images; its 1k folds are the five consecutive thousands of that order).

COCO official (``captions_val2014.json``)::

    {"images": [{"id", "file_name", "width", "height"}, …],
     "annotations": [{"id", "image_id", "caption"}, …]}

Image ids: ``cocoid`` when present, else the file name without extension (Flickr30K: the Flickr id),
and COCO's ``id`` for the official format.  Captions come image by image in file order, so with five
per image, image *i* owns captions 5i…5i+4 (the evaluation convention of DESIGN §4).

Counted rules (``DatasetTables.stats``):

* ``max_captions_per_image`` (default 5, the standard protocol; COCO has images with 6–7): extra
  captions are dropped (``captions_beyond_max``); images with fewer are kept
  (``images_with_fewer_captions``; zero: ``images_without_captions``);
* duplicate image ids: the first record is kept, later ones go to ``errors``;
* captions of unknown images (COCO official) and empty captions go to ``errors``.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from mask.datasets.records import (
    DatasetTables,
    ErrorLog,
    as_id,
    captions_table,
    exists,
    fingerprint,
    images_table,
    iter_json_items,
    join_uri,
)

logger = logging.getLogger(__name__)


def _default_name(path: str, pattern: str, fallback: str) -> str:
    m = re.match(pattern, os.path.basename(path))
    return m.group(1) if m else fallback


def _check(uri: str, check: bool) -> bool:
    return not check or "://" in uri or os.path.isfile(uri)


def _caption_text(value: Any) -> str | None:
    if isinstance(value, str):
        text = " ".join(value.split())
        return text or None
    return None


def read_karpathy(path: str, image_root: str | None = None, *, name: str | None = None,
                  splits: list[str] | None = None, limit: int | None = None,
                  max_captions_per_image: int | None = 5, check_files: bool = True,
                  storage_options: dict | None = None) -> DatasetTables:
    """Read a Karpathy split file (Flickr30K, COCO, or the demo world's gallery).

    Args:
        path: the JSON file (``dataset_flickr30k.json``, ``dataset_coco.json``, …).
        image_root: folder the ``filepath``/``filename`` are relative to; default the JSON's folder.
        name: dataset name; default from the file name (``dataset_coco.json`` → ``coco``).
        splits: keep only these splits, e.g. ``["test"]`` for the 1k / 5k test galleries.
        limit: keep at most this many images (after the split filter), in file order.
        max_captions_per_image: keep the first N sentences of each image (None = all).
        check_files: for local roots, drop images whose file is missing (error row).
        storage_options: fsspec options for remote paths.

    Returns:
        :class:`DatasetTables` with ``images`` (sizes null) and ``captions``.

    Raises:
        DatasetError: missing or malformed file (file and position named).
    """
    name = name or _default_name(path, r"dataset_(\w+)\.json$", "karpathy")
    root = image_root or os.path.dirname(path) or "."
    errors = ErrorLog()
    images: list[dict[str, Any]] = []
    captions: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, rec in enumerate(iter_json_items(path, "images.item", expect="{", storage_options=storage_options)):
        pos = f"images[{i}]"
        if not isinstance(rec, dict):
            errors.add(path, pos, "not_an_object", f"expected an object, got {type(rec).__name__}")
            continue
        filename, split = rec.get("filename"), rec.get("split")
        if not isinstance(filename, str) or not filename.strip():
            errors.add(path, pos, "missing_field", "no 'filename'")
            continue
        if not isinstance(split, str) or not split:
            errors.add(path, pos, "missing_field", f"{filename}: no 'split'")
            continue
        image_id = as_id(rec.get("cocoid")) or os.path.splitext(os.path.basename(filename.strip()))[0]
        if image_id in seen:
            errors.add(path, pos, "duplicate_image_id", f"image {image_id} seen before; first kept")
            continue
        seen.add(image_id)
        if (splits is not None and split not in splits) or (limit is not None and len(images) >= limit):
            errors.count("images_not_selected")
            continue
        filepath = rec.get("filepath") if isinstance(rec.get("filepath"), str) else ""
        uri = join_uri(root, filepath, filename.strip())
        if not _check(uri, check_files):
            errors.add(path, pos, "image_not_found", f"image {image_id}: {uri} does not exist")
            continue
        images.append({"image_id": image_id, "uri": uri, "split": split})
        sentences = rec.get("sentences") if isinstance(rec.get("sentences"), list) else []
        kept = 0
        for k, sent in enumerate(sentences):
            spos = f"{pos}.sentences[{k}]"
            text = None
            if isinstance(sent, dict):
                text = _caption_text(sent.get("raw"))
                if text is None and isinstance(sent.get("tokens"), list):
                    text = _caption_text(" ".join(t for t in sent["tokens"] if isinstance(t, str)))
            if text is None:
                errors.add(path, spos, "empty_caption", f"image {image_id}: sentence without 'raw' text")
                continue
            if max_captions_per_image is not None and kept >= max_captions_per_image:
                errors.count("captions_beyond_max")
                continue
            cid = as_id(sent.get("sentid")) or f"{image_id}#{k}"
            captions.append({"caption_id": cid, "image_id": image_id, "text": text, "split": split})
            kept += 1
        _count_fewer(errors, kept, max_captions_per_image)
    _dedupe_caption_ids(captions, errors)
    logger.info("Karpathy %s: %d images, %d captions", path, len(images), len(captions))
    return DatasetTables(name=name, images=images_table(images), captions=captions_table(captions),
                         errors=errors, inputs={os.path.basename(path): fingerprint(path, storage_options)})


def _count_fewer(errors: ErrorLog, kept: int, max_per_image: int | None) -> None:
    if kept == 0:
        errors.count("images_without_captions")
    elif max_per_image is not None and kept < max_per_image:
        errors.count("images_with_fewer_captions")


def _dedupe_caption_ids(captions: list[dict[str, Any]], errors: ErrorLog) -> None:
    """Caption ids must be unique: a repeated id gets ``#<n>`` appended (counted)."""
    seen: set[str] = set()
    for c in captions:
        if c["caption_id"] in seen:
            errors.count("duplicate_caption_id")
            n = 1
            while f"{c['caption_id']}#{n}" in seen:
                n += 1
            c["caption_id"] = f"{c['caption_id']}#{n}"
        seen.add(c["caption_id"])


def _coco_image_root(path: str, split: str, storage_options: dict | None) -> str:
    """The default image folder of a COCO captions file: ``<coco>/<split>/`` next to the ``annotations/`` folder
    when it exists, else the JSON's folder."""
    here = os.path.dirname(path) or "."
    guess = join_uri(os.path.dirname(here) if os.path.basename(here) == "annotations" else here, split)
    return guess if exists(guess, storage_options) else here


def _read_coco_images(path: str, image_root: str, split: str, selecting: bool, limit: int | None,
                      check_files: bool, errors: ErrorLog,
                      storage_options: dict | None) -> tuple[list[dict[str, Any]], set[str]]:
    """The selected image rows of a COCO captions file's ``images`` (bad entries to ``errors``) and the ids of
    every usable image, selected or not."""
    images: list[dict[str, Any]] = []
    known: set[str] = set()
    for i, rec in enumerate(iter_json_items(path, "images.item", expect="{", storage_options=storage_options)):
        pos = f"images[{i}]"
        if not isinstance(rec, dict):
            errors.add(path, pos, "not_an_object", f"expected an object, got {type(rec).__name__}")
            continue
        image_id, file_name = as_id(rec.get("id")), rec.get("file_name")
        if image_id is None or not isinstance(file_name, str) or not file_name.strip():
            errors.add(path, pos, "missing_field", "no usable 'id' or 'file_name'")
            continue
        if image_id in known:
            errors.add(path, pos, "duplicate_image_id", f"image {image_id} seen before; first kept")
            continue
        known.add(image_id)
        if not selecting or (limit is not None and len(images) >= limit):
            errors.count("images_not_selected")
            continue
        uri = join_uri(image_root, file_name.strip())
        if not _check(uri, check_files):
            errors.add(path, pos, "image_not_found", f"image {image_id}: {uri} does not exist")
            continue
        w, h = rec.get("width"), rec.get("height")
        images.append({"image_id": image_id, "uri": uri, "split": split,
                       "width": w if isinstance(w, int) and w > 0 else None,
                       "height": h if isinstance(h, int) and h > 0 else None})
    return images, known


def _read_coco_annotations(path: str, known: set[str], selected: list[str], errors: ErrorLog,
                           storage_options: dict | None) -> dict[str, list[tuple[str, str]]]:
    """The captions of the ``selected`` images from a COCO captions file's ``annotations``, in file order, as
    image id → [(caption id, text)]; bad entries and captions of unknown images to ``errors``."""
    by_image: dict[str, list[tuple[str, str]]] = {image_id: [] for image_id in selected}
    for i, ann in enumerate(iter_json_items(path, "annotations.item", expect="{",
                                            storage_options=storage_options)):
        pos = f"annotations[{i}]"
        if not isinstance(ann, dict):
            errors.add(path, pos, "not_an_object", f"expected an object, got {type(ann).__name__}")
            continue
        image_id, text = as_id(ann.get("image_id")), _caption_text(ann.get("caption"))
        if image_id is None:
            errors.add(path, pos, "missing_field", "no usable 'image_id'")
            continue
        if image_id not in known:
            errors.add(path, pos, "unknown_image", f"caption of image {image_id}, which is not in 'images'")
            continue
        if image_id not in by_image:
            errors.count("captions_not_selected")
            continue
        if text is None:
            errors.add(path, pos, "empty_caption", f"image {image_id}: no 'caption' text")
            continue
        cid = as_id(ann.get("id")) or f"{image_id}#{len(by_image[image_id])}"
        by_image[image_id].append((cid, text))
    return by_image


def read_coco_captions(path: str, image_root: str | None = None, *, name: str | None = None,
                       split: str | None = None, splits: list[str] | None = None, limit: int | None = None,
                       max_captions_per_image: int | None = 5, check_files: bool = True,
                       storage_options: dict | None = None) -> DatasetTables:
    """Read COCO's official ``captions_<split>.json``.

    Args:
        path: the annotation file.
        image_root: folder of the ``file_name`` images; default ``<coco>/<split>/`` next to the
            ``annotations/`` folder when it exists, else the JSON's folder.
        name: dataset name; default ``coco_<split>``.
        split: split label; default from the file name (``captions_val2014.json`` → ``val2014``).
        splits: keep only these splits (None = all).
        limit: keep at most this many images, in file order.
        max_captions_per_image: keep the first N captions of each image in file order (None = all).
        check_files: for local roots, drop images whose file is missing (error row).
        storage_options: fsspec options for remote paths.

    Returns:
        :class:`DatasetTables` with ``images`` (with sizes) and ``captions``.

    Raises:
        DatasetError: missing or malformed file (file and position named).
    """
    split = split or _default_name(path, r"captions_(\w+)\.json$", "all")
    name = name or f"coco_{split}"
    if image_root is None:
        image_root = _coco_image_root(path, split, storage_options)
    errors = ErrorLog()
    selecting = splits is None or split in splits
    images, known = _read_coco_images(path, image_root, split, selecting, limit, check_files, errors,
                                      storage_options)
    by_image = _read_coco_annotations(path, known, [im["image_id"] for im in images], errors, storage_options)
    captions: list[dict[str, Any]] = []
    for im in images:
        caps = by_image[im["image_id"]]
        if max_captions_per_image is not None and len(caps) > max_captions_per_image:
            errors.count("captions_beyond_max", len(caps) - max_captions_per_image)
            caps = caps[:max_captions_per_image]
        _count_fewer(errors, len(caps), max_captions_per_image)
        captions.extend({"caption_id": cid, "image_id": im["image_id"], "text": text, "split": split}
                        for cid, text in caps)
    _dedupe_caption_ids(captions, errors)
    logger.info("COCO captions %s: %d images, %d captions", path, len(images), len(captions))
    return DatasetTables(name=name, images=images_table(images), captions=captions_table(captions),
                         errors=errors, inputs={os.path.basename(path): fingerprint(path, storage_options)})

