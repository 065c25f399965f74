"""Fingerprints: of JSON-able values, and of input files from their sizes and mtimes/ETags."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import fsspec

from mask.storage.errors import StorageError
from mask.storage.paths import parse_uri
from mask.storage.store import Store

logger = logging.getLogger(__name__)


def fingerprint(obj: Any) -> str:
    """Stable short hash (16 hex) of a JSON-serialisable value (sorted keys).

    Args:
        obj: dicts/lists/scalars; anything else is stringified.

    Returns:
        The first 16 hex digits of the SHA-256 of the canonical JSON.
    """
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _stamp(info: dict[str, Any]) -> str:
    for k in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(k) is not None:
            return str(info[k])
    return ""


def fingerprint_files(store_or_fs: Store | fsspec.AbstractFileSystem | None, paths: Sequence[str]) -> str:
    """Fingerprint input files from their sizes and mtimes/ETags (no content is read).

    Folders are fingerprinted by every file below them (names relative to the folder).

    Args:
        store_or_fs: a :class:`Store` (``paths`` are relative to its root), an fsspec filesystem
            (``paths`` are its native paths), or None (``paths`` are local paths or URIs).
        paths: the inputs.

    Returns:
        16 hex digits; changes when a file is added, removed, resized or rewritten.

    Raises:
        StorageError: an input does not exist (the message names it).
    """
    if isinstance(paths, str):
        paths = [paths]
    entries: list[list[Any]] = []
    for p in paths:
        if isinstance(store_or_fs, Store):
            fs, native = store_or_fs.fs, store_or_fs.path(p)
        elif store_or_fs is None:
            proto, native = parse_uri(p)
            fs = Store._make_fs(proto, {})
        else:
            fs, native = store_or_fs, p
        try:
            info = fs.info(native)
        except FileNotFoundError:
            raise StorageError(f"input {p!r} does not exist; cannot fingerprint it") from None
        if info.get("type") == "directory":
            found = fs.find(native, detail=True)
            base = native.rstrip("/") + "/"
            for name in sorted(found):
                fi = found[name]
                rel = name[len(base):] if name.startswith(base) else name
                entries.append([str(p), rel, int(fi.get("size") or 0), _stamp(fi)])
            if not found:
                entries.append([str(p), "", 0, "empty-dir"])
        else:
            entries.append([str(p), "", int(info.get("size") or 0), _stamp(info)])
    return fingerprint(entries)
