"""Change stamps of input files: what tells a rerun that an image's bytes changed under the same id.

A stamp is ``<size>-<mtime ns>`` for a local file and ``<size>-<ETag>`` for an object store (S3's ETag is
the MD5 of the bytes for a single-part upload, a digest of the parts' MD5s otherwise): both change when
the file is rewritten with other bytes.  Stamps come from one listing per folder (S3: one LIST per 1,000
keys) or one ``stat`` per local file — no image is read.  The extraction records each image's stamp and
the SHA-256 of the bytes it decoded next to its features; a rerun re-extracts an image whose stamp
differs from the recorded one (:func:`mask.pipeline.extract.run_extraction`).

Limits: a file replaced by one of the same size with its modification time preserved (``cp -p``,
``rsync -t``) keeps its local stamp; ``http(s)://`` images have no stamp (None: never re-extracted).
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)


def _local(uri: str) -> str | None:
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if "://" not in uri:
        return uri
    return None


def source_stamps(uris: Sequence[str], storage_options: dict[str, Any] | None = None) -> list[str | None]:
    """The change stamp of each URI (None: missing, or a scheme without stamps).

    Args:
        uris: local paths, ``file://`` or ``s3://`` URIs.
        storage_options: fsspec options for ``s3://`` (endpoint; never credentials).

    Returns:
        One stamp per URI, in order.
    """
    out: list[str | None] = [None] * len(uris)
    remote: dict[str, list[int]] = {}
    for i, uri in enumerate(uris):
        uri = str(uri)
        path = _local(uri)
        if path is not None:
            try:
                st = os.stat(path)
                out[i] = f"{st.st_size}-{st.st_mtime_ns}"
            except OSError:
                out[i] = None
        elif uri.startswith(("s3://", "s3a://")):
            remote.setdefault(posixpath.dirname(uri.split("://", 1)[1]), []).append(i)
    if remote:
        from mask.storage import Store

        fs = Store._make_fs("s3", dict(storage_options or {}))
        for folder, idx in remote.items():
            try:
                listing = {str(k).rstrip("/"): v for k, v in fs.find(folder, maxdepth=1, detail=True).items()}
            except (OSError, ValueError) as e:
                logger.warning("cannot list s3://%s for change stamps (%s); its images are not checked for changes",
                               folder, e)
                continue
            for i in idx:
                info = listing.get(str(uris[i]).split("://", 1)[1])
                if info is not None:
                    etag = str(info.get("ETag") or info.get("etag") or info.get("LastModified") or "").strip('"')
                    out[i] = f"{int(info.get('size') or 0)}-{etag}"
    return out
