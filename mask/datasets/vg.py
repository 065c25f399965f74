"""Visual Genome reader: ``image_data.json``, ``objects.json``, ``attributes.json`` + image folders.

Formats (VG v1.2 / v1.4, top-level JSON arrays, one entry per image in the same order):

* ``image_data.json``: ``{"image_id" (or "id"), "url", "width", "height", "coco_id", "flickr_id"}``;
* ``objects.json``: ``{"image_id", "objects": [{"object_id", "x", "y", "w", "h", "names": [...]
  (older files: "name"), "synsets", "merged_object_ids" (v1.4)}]}``;
* ``attributes.json``: ``{"image_id", "attributes": [{"object_id", "x", "y", "w", "h", "names",
  "attributes": [...] (absent when none)}]}``.

Regions are the objects of ``objects.json``; attributes are joined to them by ``object_id`` within
an image (also through ``merged_object_ids``, so v1.2 attributes reach their merged v1.4 object).
Both files are streamed with ijson image by image, so memory holds one batch of images, never the
~3.8M boxes.  ``attributes.json`` is read in lockstep; entries that come out of order wait in a small
buffer until their image arrives.

Counted rules (``DatasetTables.stats``; dropped records also get an ``errors`` row):

* duplicate image ids (in ``image_data.json`` or ``objects.json``): keep the first, error row;
* boxes with ``w <= 0`` or ``h <= 0``: dropped (``degenerate_box``);
* boxes partly outside the image: clipped to it (``boxes_clipped``); boxes with less than one pixel
  of width or height left inside: dropped (``box_outside_image``);
* objects with no name, or whose names and attributes give no word: dropped (``missing_name`` /
  ``no_words``);
* images with no ground-truth box: kept in ``images`` with zero regions (``images_without_regions``);
* objects of images that are not in ``image_data.json``: dropped (``unknown_image``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa

from mask.datasets.records import (
    DatasetError,
    DatasetTables,
    ErrorLog,
    as_id,
    as_int,
    exists,
    fingerprint,
    images_table,
    iter_json_items,
    join_uri,
    regions_table,
)
from mask.datasets.vocabulary import region_words

logger = logging.getLogger(__name__)

VG_FILES = ("image_data.json", "objects.json", "attributes.json")
_VG_FOLDER = re.compile(r"^VG_100K(_\d+)?$")
# Out-of-order attribute entries buffered before a warning (they are kept regardless).
_PENDING_WARN = 10_000


def read_vg(path: str, image_root: str | None = None, *, name: str = "vg", split: str = "train",
            splits: list[str] | None = None, limit: int | None = None, use_attributes: bool = True,
            batch_images: int = 1000, exclude_coco_ids: Iterable[int] | None = None,
            exclude_flickr_ids: Iterable[int] | None = None, check_files: bool = True,
            storage_options: dict | None = None) -> DatasetTables:
    """Read a Visual Genome folder into normalised tables (regions streamed lazily).

    Args:
        path: folder with ``image_data.json``, ``objects.json`` and (optional) ``attributes.json``.
        image_root: folder holding the images (``VG_100K/``, ``VG_100K_2/`` or flat); default ``path``.
        name: dataset name.
        split: split label of every VG image (VG has no official split).
        splits: keep only these splits (None = all); a list without ``split`` selects nothing.
        limit: keep at most this many images (the first in ``image_data.json`` order).
        use_attributes: join ``attributes.json`` when present.
        batch_images: images per regions batch (bounds memory).
        exclude_coco_ids, exclude_flickr_ids: drop VG images that are these COCO / Flickr images
            (e.g. a test gallery, to keep it unseen); counted as ``excluded_overlap``.
        check_files: for local image roots, drop images whose file is missing (error row).
        storage_options: fsspec options for remote paths.

    Returns:
        :class:`DatasetTables` with ``images`` and a lazy ``regions`` iterator of tables.

    Raises:
        DatasetError: a required file is missing or malformed (file and position named).
    """
    if batch_images < 1:
        raise ValueError(f"batch_images must be >= 1, got {batch_images}")
    files = {f: join_uri(path, f) for f in VG_FILES}
    for f in ("image_data.json", "objects.json"):
        if not exists(files[f], storage_options):
            raise DatasetError(f"{files[f]}: file not found (a Visual Genome folder needs {f})")
    has_attrs = use_attributes and exists(files["attributes.json"], storage_options)
    errors = ErrorLog()
    root = image_root or path
    local_root = "://" not in root or root.startswith("file://")
    excl_coco = {int(i) for i in exclude_coco_ids or ()}
    excl_flickr = {int(i) for i in exclude_flickr_ids or ()}
    if exclude_coco_ids is not None or exclude_flickr_ids is not None:
        errors.count("excluded_overlap", 0)  # asked for: the count is reported even when it is 0
    selecting = splits is None or split in splits

    rows, sizes, known = _read_vg_images(files["image_data.json"], root, split=split, selecting=selecting,
                                         limit=limit, exclude=(excl_coco, excl_flickr),
                                         check=local_root and check_files, errors=errors,
                                         storage_options=storage_options)
    images = images_table(rows)
    inputs = {f: fingerprint(files[f], storage_options) for f in VG_FILES
              if f != "attributes.json" or has_attrs}
    regions = _iter_regions(files["objects.json"], files["attributes.json"] if has_attrs else None,
                            sizes, known, errors, batch_images, storage_options)
    logger.info("VG %s: %d images selected of %d", path, images.num_rows, len(known))
    return DatasetTables(name=name, images=images, regions=regions, errors=errors, inputs=inputs)


def _read_vg_images(src: str, root: str, *, split: str, selecting: bool, limit: int | None,
                    exclude: tuple[set[int], set[int]], check: bool, errors: ErrorLog,
                    storage_options: dict | None) -> tuple[list[dict[str, Any]], dict[str, tuple], set[str]]:
    """The selected image rows of ``image_data.json`` (bad entries, missing files and images that are one of
    the ``exclude`` (COCO ids, Flickr ids) to ``errors``), their (width, height) by image id and the ids of
    every usable image, selected or not."""
    excl_coco, excl_flickr = exclude
    rows: list[dict[str, Any]] = []
    sizes: dict[str, tuple[int | None, int | None]] = {}
    known: set[str] = set()
    for i, rec in enumerate(iter_json_items(src, "item", expect="[", storage_options=storage_options)):
        pos = f"item {i}"
        if not isinstance(rec, dict):
            errors.add(src, pos, "not_an_object", f"expected an object, got {type(rec).__name__}")
            continue
        image_id = as_id(rec.get("image_id", rec.get("id")))
        if image_id is None:
            errors.add(src, pos, "missing_field", "no usable 'image_id' (or 'id')")
            continue
        if image_id in known:
            errors.add(src, pos, "duplicate_image_id", f"image_id {image_id} seen before; first kept")
            continue
        known.add(image_id)
        if not selecting or (limit is not None and len(rows) >= limit):
            errors.count("images_not_selected")
            continue
        if as_int(rec.get("coco_id")) in excl_coco or as_int(rec.get("flickr_id")) in excl_flickr:
            errors.count("excluded_overlap")
            continue
        width, height = as_int(rec.get("width")), as_int(rec.get("height"))
        if (rec.get("width") is not None and not width) or (rec.get("height") is not None and not height):
            errors.count("bad_image_size")
            width = height = None
        uri = _resolve_image(root, rec.get("url"), image_id, check)
        if uri is None:
            errors.add(src, pos, "image_not_found",
                       f"image {image_id}: no file under {root} for url {rec.get('url')!r}")
            continue
        rows.append({"image_id": image_id, "uri": uri, "split": split, "width": width, "height": height})
        sizes[image_id] = (width, height)
    return rows, sizes, known


def _resolve_image(root: str, url: Any, image_id: str, check: bool) -> str | None:
    """Image file of a VG record: ``root/<VG_100K folder>/<file>`` or ``root/<file>``."""
    rel = None
    if isinstance(url, str) and url.strip():
        u = urlparse(url.strip())
        rel = u.path if not u.scheme else None  # a relative url is a path under the root
        parts = [p for p in u.path.split("/") if p]
        base = parts[-1] if parts else f"{image_id}.jpg"
        parent = parts[-2] if len(parts) >= 2 else ""
    else:
        base, parent = f"{image_id}.jpg", ""
    candidates: list[str] = []
    if rel:
        candidates.append(rel)
    if parent and _VG_FOLDER.match(parent):
        candidates.append(f"{parent}/{base}")
    candidates.append(base)
    if not check:
        return join_uri(root, candidates[0])
    candidates += [f"VG_100K/{base}", f"VG_100K_2/{base}"]
    local = root[len("file://"):] if root.startswith("file://") else root
    for c in candidates:
        p = join_uri(local, c)
        if os.path.isfile(p):
            return p
    return None


def _box(obj: dict[str, Any], size: tuple[int | None, int | None], errors: ErrorLog, src: str,
         pos: str) -> list[float] | None:
    """VG x, y, w, h → clipped x1, y1, x2, y2, or None (dropped, with an error row)."""
    vals = []
    for k in ("x", "y", "w", "h"):
        v = obj.get(k)
        if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
            errors.add(src, pos, "bad_box", f"'{k}' is {v!r}, not a number")
            return None
        vals.append(float(v))
    x, y, w, h = vals
    if w <= 0 or h <= 0:
        errors.add(src, pos, "degenerate_box", f"box x={x:g} y={y:g} w={w:g} h={h:g} has no area")
        return None
    x1, y1, x2, y2 = x, y, x + w, y + h
    width, height = size
    cx1, cy1 = max(x1, 0.0), max(y1, 0.0)
    cx2 = min(x2, float(width)) if width else x2
    cy2 = min(y2, float(height)) if height else y2
    if cx2 - cx1 < 1.0 or cy2 - cy1 < 1.0:
        errors.add(src, pos, "box_outside_image",
                   f"box x={x:g} y={y:g} w={w:g} h={h:g} lies outside the {width}x{height} image")
        return None
    if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
        errors.count("boxes_clipped")
    return [cx1, cy1, cx2, cy2]


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return []
    return [s.strip() for s in value if isinstance(s, str) and s.strip()]


class _Attributes:
    """attributes.json read in lockstep with objects.json; out-of-order images wait in a buffer."""

    def __init__(self, path: str | None, errors: ErrorLog, storage_options: dict | None):
        self.path = path
        self.errors = errors
        self.it = iter_json_items(path, "item", expect="[", storage_options=storage_options) if path else None
        self.pending: dict[str, dict[str, list[str]]] = {}
        self.index = 0
        self.warned = False

    def _parse(self, entry: Any, pos: str) -> tuple[str | None, dict[str, list[str]]]:
        if not isinstance(entry, dict):
            self.errors.add(self.path, pos, "not_an_object", f"expected an object, got {type(entry).__name__}")
            return None, {}
        image_id = as_id(entry.get("image_id", entry.get("id")))
        if image_id is None:
            self.errors.add(self.path, pos, "missing_field", "no usable 'image_id'")
            return None, {}
        out: dict[str, list[str]] = {}
        objs = entry.get("attributes")
        for j, obj in enumerate(objs if isinstance(objs, list) else []):
            oid = as_id(obj.get("object_id", obj.get("id"))) if isinstance(obj, dict) else None
            if oid is None:
                self.errors.add(self.path, f"{pos}.attributes[{j}]", "missing_field", "no usable 'object_id'")
                continue
            attrs = _strings(obj.get("attributes"))
            if attrs:
                out.setdefault(oid, []).extend(attrs)
        return image_id, out

    def get(self, image_id: str) -> dict[str, list[str]]:
        """object_id → attribute strings of one image (empty when the image has none)."""
        if image_id in self.pending:
            return self.pending.pop(image_id)
        while self.it is not None:
            try:
                entry = next(self.it)
            except StopIteration:
                self.it = None
                break
            iid, attrs = self._parse(entry, f"item {self.index}")
            self.index += 1
            if iid is None:
                continue
            if iid == image_id:
                return attrs
            self.pending[iid] = attrs
            if len(self.pending) > _PENDING_WARN and not self.warned:
                self.warned = True
                logger.warning("%s is not in the order of objects.json; buffering %d images",
                               self.path, len(self.pending))
        return {}

    def close(self, known: set[str]) -> None:
        """Count attribute entries that matched no objects.json image."""
        unmatched = len(self.pending)
        if unmatched:
            self.errors.count("attribute_images_unmatched", unmatched)
        self.pending.clear()


def _iter_regions(objects_path: str, attributes_path: str | None, sizes: dict[str, tuple],
                  known: set[str], errors: ErrorLog, batch_images: int,
                  storage_options: dict | None) -> Iterator[pa.Table]:
    """Stream objects.json (+ attributes) into regions tables of ``batch_images`` images each."""
    attributes = _Attributes(attributes_path, errors, storage_options)
    selected = set(sizes)
    done: set[str] = set()
    with_regions: set[str] = set()
    rows: list[dict[str, Any]] = []
    in_batch = 0
    # With a limit or a split filter, stop reading once every selected image was seen.
    partial = len(selected) < len(known)
    complete = not (partial and not selected)
    entries = iter_json_items(objects_path, "item", expect="[", storage_options=storage_options)
    for i, entry in enumerate(entries if complete else ()):
        pos = f"item {i}"
        if not isinstance(entry, dict):
            errors.add(objects_path, pos, "not_an_object", f"expected an object, got {type(entry).__name__}")
            continue
        image_id = as_id(entry.get("image_id", entry.get("id")))
        if image_id is None:
            errors.add(objects_path, pos, "missing_field", "no usable 'image_id'")
            continue
        objs = entry.get("objects")
        if not isinstance(objs, list):
            errors.add(objects_path, pos, "missing_field", f"image {image_id}: 'objects' is not a list")
            continue
        if image_id not in known:
            errors.add(objects_path, pos, "unknown_image",
                       f"image {image_id} is not in image_data.json; its {len(objs)} objects dropped")
            continue
        if image_id not in selected:
            errors.count("regions_not_selected", len(objs))
            attributes.pending.pop(image_id, None)
            continue
        if image_id in done:
            errors.add(objects_path, pos, "duplicate_image_id", f"image {image_id} seen before; first kept")
            continue
        done.add(image_id)
        attrs = attributes.get(image_id) if attributes_path else {}
        n_before = len(rows)
        _image_regions(image_id, objs, attrs, sizes[image_id], rows, errors, objects_path, pos)
        if len(rows) > n_before:
            with_regions.add(image_id)
        in_batch += 1
        if in_batch >= batch_images:
            yield regions_table(rows)
            rows, in_batch = [], 0
        if partial and len(done) == len(selected):
            complete = False
            break
    if rows:
        yield regions_table(rows)
    if complete:
        attributes.close(known)
    errors.count("images_without_regions", len(selected - with_regions))
    errors.count("regions_images", len(with_regions))


def _image_regions(image_id: str, objs: list, attrs: dict[str, list[str]], size: tuple,
                   rows: list[dict[str, Any]], errors: ErrorLog, src: str, pos: str) -> None:
    """Append the regions of one image to ``rows`` (dropped objects go to ``errors``)."""
    seen_ids: set[str] = set()
    for j, obj in enumerate(objs):
        opos = f"{pos}.objects[{j}]"
        if not isinstance(obj, dict):
            errors.add(src, opos, "not_an_object", f"expected an object, got {type(obj).__name__}")
            continue
        names = _strings(obj.get("names", obj.get("name")))
        if not names:
            errors.add(src, opos, "missing_name", f"image {image_id}: object without 'names'/'name'")
            continue
        box = _box(obj, size, errors, src, opos)
        if box is None:
            continue
        oid = as_id(obj.get("object_id", obj.get("id")))
        if oid is None:
            oid = f"{image_id}:{j}"
            errors.count("regions_without_object_id")
        elif oid in seen_ids:
            errors.count("duplicate_object_id")
            oid = f"{oid}:{j}"
        seen_ids.add(oid)
        attributes = list(attrs.get(oid, []))
        for m in obj.get("merged_object_ids") or []:
            mid = as_id(m)
            if mid is not None:
                attributes.extend(attrs.get(mid, []))
        attributes = list(dict.fromkeys(attributes))
        words = region_words(names, attributes)
        if not words:
            errors.add(src, opos, "no_words", f"names {names} and attributes {attributes} give no word")
            continue
        rows.append({"image_id": image_id, "region_id": oid, "box": box, "words": words,
                     "names": names, "attributes": attributes})
        errors.count("regions")
