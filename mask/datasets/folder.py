"""User galleries: a plain image folder (local or ``s3://``) or a list of image URIs, with optional captions.

* Folder: every file with an image extension, recursively (hidden files and folders skipped), in
  sorted order; ``image_id`` is the path relative to the folder without its extension
  (``beach/dog.jpg`` → ``beach/dog``).
* URI list: a text file with one local path or URI per line (blank lines and ``#`` comments
  skipped), or a CSV with a header that has a ``uri`` column and optionally ``image_id``, ``split``.
  Relative local paths are relative to the list file.  Default ``image_id``: the file name without
  extension.
* Captions (optional): a text file with one caption per line (free queries, ``image_id`` null,
  ``caption_id`` = line number), or a CSV with a header that has ``text`` and optionally
  ``image_id`` and ``caption_id`` columns.

Counted rules: duplicate image ids keep the first (later ones go to ``errors``); captions of unknown
images and empty captions go to ``errors``; with ``probe_sizes`` an unreadable image goes to ``errors``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

import fsspec

from mask.datasets.records import (
    DatasetError,
    DatasetTables,
    ErrorLog,
    captions_table,
    fingerprint,
    images_table,
    join_uri,
    open_binary,
)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _uri_of(fs: fsspec.AbstractFileSystem, p: str) -> str:
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return os.path.abspath(p)
    return fs.unstrip_protocol(p)


def _probe(uri: str, storage_options: dict | None) -> tuple[int, int]:
    """Width and height from the image header (PIL reads no pixels)."""
    from PIL import Image

    with open_binary(uri, storage_options) as f, Image.open(f) as im:
        return int(im.width), int(im.height)


def _finish_images(rows: list[dict[str, Any]], source: str, errors: ErrorLog, probe_sizes: bool,
                   limit: int | None, storage_options: dict | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for r in rows:
        if r["image_id"] in seen:
            errors.add(source, r["position"], "duplicate_image_id",
                       f"image_id {r['image_id']} ({r['uri']}) seen before; first kept")
            continue
        seen.add(r["image_id"])
        if limit is not None and len(out) >= limit:
            errors.count("images_not_selected")
            continue
        if probe_sizes:
            try:
                r["width"], r["height"] = _probe(r["uri"], storage_options)
            except Exception as e:  # any decoder failure: the image is unusable
                errors.add(source, r["position"], "unreadable_image", f"{r['uri']}: {type(e).__name__}: {e}")
                continue
        out.append(r)
    return out


def read_image_folder(path: str, *, name: str | None = None, split: str = "gallery", recursive: bool = True,
                      extensions: Iterable[str] = IMAGE_EXTENSIONS, captions: str | None = None,
                      limit: int | None = None, probe_sizes: bool = False,
                      storage_options: dict | None = None) -> DatasetTables:
    """Images of a folder (and optional captions) as normalised tables.

    Args:
        path: local folder or URI (``s3://bucket/prefix``).
        name: dataset name; default the folder's name.
        split: split label of every image.
        recursive: descend into sub-folders.
        extensions: file extensions counted as images (case-insensitive).
        captions: optional captions file (see module doc).
        limit: keep at most this many images (sorted order).
        probe_sizes: read width/height from each image header (else null).
        storage_options: fsspec options.

    Returns:
        :class:`DatasetTables` with ``images`` and, when given, ``captions``.

    Raises:
        DatasetError: the folder does not exist or holds no image.
    """
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if not fs.isdir(root):
        raise DatasetError(f"{path}: not a folder")
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    if recursive:
        files = fs.find(root, detail=True)
    else:
        files = {i["name"]: i for i in fs.ls(root, detail=True) if i.get("type") == "file"}
    root_s = root.rstrip("/")
    rows, listing = [], []
    for p in sorted(files):
        rel = p[len(root_s):].lstrip("/") if p.startswith(root_s) else os.path.basename(p)
        if any(part.startswith(".") for part in rel.split("/")) or not rel.lower().endswith(exts):
            continue
        rows.append({"image_id": os.path.splitext(rel)[0], "uri": _uri_of(fs, p), "split": split,
                     "position": rel})
        info = files[p]
        listing.append([rel, info.get("size"), str(info.get("mtime") or info.get("ETag") or "")])
    if not rows:
        raise DatasetError(f"{path}: no image files ({', '.join(exts)})")
    errors = ErrorLog()
    kept = _finish_images(rows, path, errors, probe_sizes, limit, storage_options)
    name = name or os.path.basename(root_s) or "folder"
    # The folder's fingerprint: names, sizes and modification stamps of its image files.
    inputs = {"folder": hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]}
    return _with_captions(name, kept, captions, split, errors, inputs, storage_options)


def read_uri_list(path: str, *, name: str | None = None, split: str = "gallery", captions: str | None = None,
                  limit: int | None = None, probe_sizes: bool = False,
                  storage_options: dict | None = None) -> DatasetTables:
    """Images named by a list file (text: one URI per line; CSV: a ``uri`` column).

    Args:
        path: the list file (local or URI).
        name: dataset name; default the list file's name without extension.
        split: split label of images without a ``split`` column value.
        captions: optional captions file (see module doc).
        limit: keep at most this many images (file order).
        probe_sizes: read width/height from each image header (else null).
        storage_options: fsspec options.

    Returns:
        :class:`DatasetTables` with ``images`` and, when given, ``captions``.

    Raises:
        DatasetError: missing file, a CSV without a ``uri`` column, or no image listed.
    """
    text = _read_text(path, storage_options)
    base = os.path.dirname(path) or "."
    errors = ErrorLog()
    rows: list[dict[str, Any]] = []
    records = _csv_records(path, text, required="uri")
    if records is None:
        records = [(f"line {n}", {"uri": line.strip()}) for n, line in enumerate(text.splitlines(), 1)
                   if line.strip() and not line.lstrip().startswith("#")]
    for pos, rec in records:
        uri = (rec.get("uri") or "").strip()
        if not uri:
            errors.add(path, pos, "missing_field", "empty 'uri'")
            continue
        if "://" not in uri:
            uri = join_uri(base, uri) if not os.path.isabs(uri) else uri
        image_id = (rec.get("image_id") or "").strip() or os.path.splitext(os.path.basename(uri.rstrip("/")))[0]
        rows.append({"image_id": image_id, "uri": uri, "split": (rec.get("split") or "").strip() or split,
                     "position": pos})
    if not rows:
        raise DatasetError(f"{path}: lists no image")
    kept = _finish_images(rows, path, errors, probe_sizes, limit, storage_options)
    name = name or os.path.splitext(os.path.basename(path))[0] or "list"
    inputs = {os.path.basename(path): fingerprint(path, storage_options)}
    return _with_captions(name, kept, captions, split, errors, inputs, storage_options)


def _read_text(path: str, storage_options: dict | None) -> str:
    try:
        with open_binary(path, storage_options) as f:
            data = f.read()
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: file not found") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _csv_records(path: str, text: str, required: str) -> list[tuple[str, dict[str, str]]] | None:
    """Rows of a CSV file with a header naming ``required``; None when the file is not such a CSV."""
    first = text.lstrip().split("\n", 1)[0]
    if not path.lower().endswith(".csv") and "," not in first:
        return None
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip() for f in reader.fieldnames or []]
    if required not in fields:
        if path.lower().endswith(".csv"):
            raise DatasetError(f"{path}: CSV header {fields} has no {required!r} column")
        return None
    reader.fieldnames = fields
    return [(f"line {reader.line_num}", {k: v for k, v in row.items() if k is not None})
            for row in reader]


def read_captions_file(path: str, split: str, known_image_ids: set[str] | None, errors: ErrorLog,
                       storage_options: dict | None = None) -> list[dict[str, Any]]:
    """Caption rows of a text file (one caption per line) or a CSV (``text``, ``image_id``, ``caption_id``).

    Args:
        path: the captions file.
        split: split label of the captions.
        known_image_ids: image ids a caption may refer to (None = accept any).
        errors: the reader's error log (empty captions, unknown images).
        storage_options: fsspec options.

    Returns:
        Rows for :func:`mask.datasets.records.captions_table`.
    """
    text = _read_text(path, storage_options)
    records = _csv_records(path, text, required="text")
    rows: list[dict[str, Any]] = []
    if records is None:
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                rows.append({"caption_id": str(n), "image_id": None, "text": " ".join(line.split()),
                             "split": split})
        return rows
    seen: set[str] = set()
    for k, (pos, rec) in enumerate(records):
        caption = " ".join((rec.get("text") or "").split())
        image_id = (rec.get("image_id") or "").strip() or None
        if not caption:
            errors.add(path, pos, "empty_caption", "empty 'text'")
            continue
        if image_id is not None and known_image_ids is not None and image_id not in known_image_ids:
            errors.add(path, pos, "unknown_image", f"caption of image {image_id!r}, which is not in the gallery")
            continue
        cid = (rec.get("caption_id") or "").strip() or str(k)
        if cid in seen:
            errors.add(path, pos, "duplicate_caption_id", f"caption_id {cid!r} seen before; first kept")
            continue
        seen.add(cid)
        rows.append({"caption_id": cid, "image_id": image_id, "text": caption, "split": split})
    return rows


def _with_captions(name: str, rows: list[dict[str, Any]], captions: str | None, split: str, errors: ErrorLog,
                   inputs: dict[str, str], storage_options: dict | None) -> DatasetTables:
    for r in rows:
        r.pop("position", None)
    images = images_table(rows)
    caps = None
    if captions is not None:
        ids = set(images.column("image_id").to_pylist())
        caps = captions_table(read_captions_file(captions, split, ids, errors, storage_options))
        inputs = {**inputs, os.path.basename(captions): fingerprint(captions, storage_options)}
    logger.info("gallery %s: %d images%s", name, images.num_rows,
                f", {caps.num_rows} captions" if caps is not None else "")
    return DatasetTables(name=name, images=images, captions=caps, errors=errors, inputs=inputs)
