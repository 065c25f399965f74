"""Storage URIs and artifact paths: the layout constants, the errors, URI parsing and safe relative names."""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import urlsplit

from mask.storage.errors import StorageError
from mask.storage.redaction import redact_text

logger = logging.getLogger(__name__)


#: Version of the manifest layout written by this module.
SCHEMA_VERSION = 1


#: Name of the commit marker inside an artifact folder.
MANIFEST = "_MANIFEST.json"


#: Folder of the Parquet parts inside an artifact folder.
PARTS_DIR = "parts"


#: Folder of the extra files inside an artifact folder.
FILES_DIR = "files"


_TMP_MARK = ".tmp-"


_SUPPORTED = ("local path", "file://", "s3://")


def parse_uri(uri: str) -> tuple[str, str]:
    """Split a storage URI into ``(protocol, fs-native path)``.

    ``./a`` and ``/a`` and ``file:///a`` → ``("file", "/abs/a")``; ``s3://bucket/prefix`` →
    ``("s3", "bucket/prefix")`` (``s3a://`` is accepted as ``s3``).  Trailing slashes are dropped.

    Args:
        uri: a local path, ``file://`` URI or ``s3://`` URI.

    Returns:
        ``(protocol, path)`` with protocol ``"file"`` or ``"s3"``.

    Raises:
        StorageError: empty, credentials in the URI, unsupported scheme, missing bucket, ``..``.
    """
    if not isinstance(uri, str | os.PathLike):
        raise StorageError(f"storage URI must be a string, got {type(uri).__name__}")
    uri = os.fspath(uri)
    if not uri.strip():
        raise StorageError("storage URI is empty")
    if "\x00" in uri:
        raise StorageError(f"storage URI {uri!r} contains a NUL character")
    if "://" not in uri:
        return "file", os.path.abspath(os.path.expanduser(uri))
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    shown = redact_text(uri)
    if "@" in parts.netloc:
        raise StorageError(f"storage URI {shown} carries credentials; use the AWS environment variables "
                           "or credential chain instead")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"file URI {shown}: host {parts.netloc!r} is not supported (use file:///abs/path)")
        if not parts.path.startswith("/"):
            raise StorageError(f"file URI {shown} must be absolute (file:///abs/path)")
        path = os.path.normpath(parts.path)
        if ".." in parts.path.split("/"):
            raise StorageError(f"file URI {shown} contains '..' (path traversal)")
        return "file", path
    if scheme in ("s3", "s3a"):
        bucket = parts.netloc
        if not bucket:
            raise StorageError(f"S3 URI {shown} has no bucket (expected s3://bucket/prefix)")
        key = uri.split("://", 1)[1][len(bucket):].strip("/")
        segs = [s for s in key.split("/") if s]
        if any(s in (".", "..") for s in segs):
            raise StorageError(f"S3 URI {shown} contains '.' or '..' (path traversal)")
        return "s3", "/".join([bucket, *segs])
    raise StorageError(f"storage URI {shown}: scheme {scheme!r} is not supported (use one of {', '.join(_SUPPORTED)})")


def _split_rel(part: str, what: str = "path part") -> list[str]:
    """Validate one relative part (may contain '/') and return its segments."""
    if not isinstance(part, str):
        raise StorageError(f"{what} must be a string, got {type(part).__name__}: {part!r}")
    if part == "":
        raise StorageError(f"{what} is empty")
    if "\x00" in part or "\\" in part:
        raise StorageError(f"{what} {part!r} contains a NUL or backslash character")
    if part.startswith("/") or "://" in part or re.match(r"^[A-Za-z]:", part):
        raise StorageError(f"{what} {part!r} is absolute; only paths relative to the storage root are allowed "
                           "(path traversal)")
    segs = part.split("/")
    for s in segs:
        if s in ("", ".", ".."):
            raise StorageError(f"{what} {part!r} has an empty, '.' or '..' segment (path traversal)")
    return segs


def _validate_name(name: str, what: str) -> str:
    """A single file name: no '/', not '.'/'..', not our temp pattern."""
    segs = _split_rel(name, what)
    if len(segs) != 1:
        raise StorageError(f"{what} {name!r} must be a single name without '/' (path traversal)")
    if _TMP_MARK in name and name.startswith("."):
        raise StorageError(f"{what} {name!r} looks like a temporary file name")
    return name
