"""One Store over local paths, file:// and s3:// (fsspec/s3fs for I/O, pyarrow.fs for Parquet)."""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mask.storage.artifacts import ArtifactWriter, _schema_from_b64
from mask.storage.errors import ArtifactNotFound, StorageError
from mask.storage.paths import (
    _TMP_MARK,
    MANIFEST,
    PARTS_DIR,
    SCHEMA_VERSION,
    _split_rel,
    parse_uri,
)
from mask.storage.redaction import _check_options
from mask.storage.version import code_version

logger = logging.getLogger(__name__)


#: Attempts per S3 request, the first included, for both clients: botocore's "standard" retry mode (s3fs) and
#: pyarrow's ``AwsStandardS3RetryStrategy``, both with exponential backoff and jitter.  The clients' defaults
#: (botocore legacy 5, pyarrow 3) give up on a burst of three 503 SlowDown / dropped connections.  Override with
#: ``options={"config_kwargs": {"retries": {"max_attempts": n}}}`` (used for both clients).
S3_MAX_ATTEMPTS = 10


class Store:
    """A storage root (local folder or S3 prefix) with atomic writes and committed artifacts.

    Args:
        root: ``./artifacts``, ``/abs``, ``file:///abs`` or ``s3://bucket/prefix``.
        options: extra fsspec options (``{"client_kwargs": {"endpoint_url": …}}``); no credentials.

    Attributes:
        root: normalised root — an absolute local path, or ``s3://bucket/prefix``.
        protocol: ``"file"`` or ``"s3"``.
        fs: the fsspec filesystem; its native paths come from :meth:`path`.
    """

    def __init__(self, root: str, options: dict[str, Any] | None = None):
        options = dict(options or {})
        _check_options(options)
        self.protocol, self._root_path = parse_uri(root)
        self.options = options
        self.root = self._root_path if self.protocol == "file" else f"s3://{self._root_path}"
        self.fs = self._make_fs(self.protocol, options)
        self._pa_fs: pafs.FileSystem | None = None

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    # ---- filesystems ------------------------------------------------------------------------------

    @staticmethod
    def _s3_settings(options: dict[str, Any]) -> tuple[str | None, str | None]:
        ck = options.get("client_kwargs") or {}
        endpoint = (ck.get("endpoint_url") or options.get("endpoint_url")
                    or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None)
        region = (ck.get("region_name") or options.get("region_name")
                  or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None)
        return endpoint, region

    @classmethod
    def _make_fs(cls, protocol: str, options: dict[str, Any]) -> fsspec.AbstractFileSystem:
        if protocol == "file":
            return fsspec.filesystem("file")
        opts = copy.deepcopy(options)
        endpoint, region = cls._s3_settings(opts)
        opts.pop("endpoint_url", None)
        opts.pop("region_name", None)
        ck = dict(opts.get("client_kwargs") or {})
        if endpoint:
            ck["endpoint_url"] = endpoint
        if region:
            ck["region_name"] = region
        if ck:
            opts["client_kwargs"] = ck
        # Other processes (Ray workers) write too: never trust a cached listing.
        opts.setdefault("use_listings_cache", False)
        config_kwargs = dict(opts.get("config_kwargs") or {})
        config_kwargs["retries"] = {"mode": "standard", "max_attempts": cls._max_attempts(options),
                                    **(config_kwargs.get("retries") or {})}
        opts["config_kwargs"] = config_kwargs
        return fsspec.filesystem("s3", **opts)

    @staticmethod
    def _max_attempts(options: dict[str, Any]) -> int:
        retries = (options.get("config_kwargs") or {}).get("retries") or {}
        return int(retries.get("max_attempts") or S3_MAX_ATTEMPTS)

    def pyarrow_filesystem(self) -> pafs.FileSystem:
        """A pyarrow filesystem for the same location; pair it with :meth:`path` (native paths).

        Usable with ``pq.read_table(store.path(...), filesystem=...)`` and
        Ray Data read tasks (it pickles; :mod:`mask.pipeline.parts_source`).
        """
        if self._pa_fs is None:
            if self.protocol == "file":
                self._pa_fs = pafs.LocalFileSystem()
            else:
                endpoint, region = self._s3_settings(self.options)
                kw: dict[str, Any] = {}
                if endpoint:
                    kw["endpoint_override"] = endpoint
                    if endpoint.startswith("http://"):
                        kw["scheme"] = "http"
                if region:
                    kw["region"] = region
                if self.options.get("anon"):
                    kw["anonymous"] = True
                # NB: pyarrow does not pickle retry_strategy: a copy shipped to a Ray worker retries 3 times.
                kw["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=self._max_attempts(self.options))
                self._pa_fs = pafs.S3FileSystem(**kw)
        return self._pa_fs

    # ---- paths ------------------------------------------------------------------------------------

    def _segments(self, parts: Sequence[str]) -> list[str]:
        segs: list[str] = []
        for p in parts:
            segs.extend(_split_rel(p))
        return segs

    def path(self, *parts: str) -> str:
        """fs-native path under the root (``/abs/root/a/b`` or ``bucket/prefix/a/b``).

        Raises:
            StorageError: an absolute part, a ``..``/``.``/empty segment (path traversal).
        """
        segs = self._segments(parts)
        return "/".join([self._root_path.rstrip("/") or "", *segs]) if segs else self._root_path

    def uri(self, *parts: str) -> str:
        """Full location under the root: an absolute local path, or ``s3://bucket/key`` — for Ray Data / users."""
        p = self.path(*parts)
        return p if self.protocol == "file" else f"s3://{p}"

    # ---- plain files ------------------------------------------------------------------------------

    def exists(self, *parts: str) -> bool:
        """Whether a file or folder exists under the root."""
        return bool(self.fs.exists(self.path(*parts)))

    def read_bytes(self, rel: str) -> bytes:
        """Bytes of the file at ``rel``.

        Raises:
            FileNotFoundError: no such file (the message names its URI).
        """
        try:
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            raise FileNotFoundError(f"no file at {self.uri(rel)}") from None

    def _write_local_atomic(self, native: str, writer) -> None:
        folder = os.path.dirname(native)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(native)}{_TMP_MARK}{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "wb") as f:
                writer(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, native)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` at ``rel`` atomically (temp file + rename locally; a single upload on S3)."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise StorageError(f"write_bytes({self.uri(rel)}): data must be bytes, got {type(data).__name__}")
        native = self.path(rel)
        if self.protocol == "file":
            self._write_local_atomic(native, lambda f: f.write(data))
        else:
            self.fs.pipe_file(native, bytes(data))

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create the file at ``rel`` with ``data`` only if nothing is there yet, atomically.

        Locally: a complete temp file hard-linked into place (the link fails if the name exists).
        On S3: a conditional PUT (``If-None-Match: *``), which S3 (and moto) answer with 412 when the
        key exists. Used for leases, where two writers must never both succeed.

        Returns:
            True if this call created the file, False if it already existed.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise StorageError(f"create_exclusive({self.uri(rel)}): data must be bytes, got {type(data).__name__}")
        native = self.path(rel)
        if self.protocol == "file":
            folder = os.path.dirname(native)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{os.path.basename(native)}{_TMP_MARK}{uuid.uuid4().hex[:12]}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, native)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        try:
            self.fs.pipe_file(native, bytes(data), mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if "PreconditionFailed" in str(e) or "412" in str(e):
                return False
            raise

    def write_parquet(self, rel: str, table: pa.Table) -> int:
        """Write ``table`` as one Parquet file at ``rel`` (folders created; atomic like :meth:`write_bytes`).

        Ray Data workers use it for ``<artifact>/parts/<run>/<name>.parquet``; the driver then lists the
        files with :meth:`ArtifactWriter.add_existing_part`.  S3 uploads stream (multipart for large
        files); an interrupted upload never completes an object, and an uncommitted part is ignored.

        Returns:
            The file size in bytes.
        """
        if not isinstance(table, pa.Table):
            raise StorageError(f"write_parquet({self.uri(rel)}): expected a pyarrow Table, got {type(table).__name__}")
        native = self.path(rel)
        if self.protocol == "file":
            self._write_local_atomic(native, lambda f: pq.write_table(table, f))
            return os.path.getsize(native)
        with self.fs.open(native, "wb") as f:
            pq.write_table(table, f)
        return int(self.fs.info(native)["size"])

    def read_json(self, rel: str) -> Any:
        """Parsed JSON at ``rel`` (FileNotFoundError if absent, StorageError if not JSON)."""
        raw = self.read_bytes(rel)
        try:
            return json.loads(raw)
        except ValueError as e:
            raise StorageError(f"{self.uri(rel)} is not valid JSON: {e}") from None

    def write_json(self, rel: str, obj: Any) -> None:
        """Write ``obj`` as indented, key-sorted JSON at ``rel``, atomically."""
        try:
            text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise StorageError(f"write_json({self.uri(rel)}): value is not JSON-serialisable: {e}") from None
        self.write_bytes(rel, (text + "\n").encode())

    def list(self, rel: str) -> list[str]:
        """Sorted names directly under ``rel`` (``[]`` if absent); temporary files are hidden."""
        native = self.path(rel)
        try:
            entries = self.fs.ls(native, detail=False)
        except FileNotFoundError:
            return []
        names = []
        for e in entries:
            name = str(e).rstrip("/").rsplit("/", 1)[-1]
            if name and not (name.startswith(".") and _TMP_MARK in name) and str(e).rstrip("/") != native:
                names.append(name)
        return sorted(set(names))

    def delete(self, rel: str) -> None:
        """Delete ``rel`` recursively; no error if it does not exist."""
        native = self.path(rel)
        try:
            if self.fs.exists(native):
                self.fs.rm(native, recursive=True)
        except FileNotFoundError:
            pass

    # ---- artifacts --------------------------------------------------------------------------------

    def open_artifact(self, rel: str, *, kind: str, config_hash: str, inputs: dict[str, Any] | None = None,
                      append: bool = False) -> ArtifactWriter:
        """Start writing the artifact at ``rel``; commit on clean exit of the ``with`` block.

        Args:
            rel: artifact folder relative to the root (``features/demo/butd``).
            kind: artifact kind (``features``, ``knowledge``, …), recorded in the manifest.
            config_hash: hash of the config that determines the content.
            inputs: input fingerprints (``{"images": fingerprint_files(...)}``).
            append: keep the committed parts and add new ones (resumable work); the committed
                manifest must have the same kind and config hash.

        Returns:
            An :class:`ArtifactWriter`.
        """
        return ArtifactWriter(self, rel, kind=kind, config_hash=config_hash, inputs=inputs, append=append)

    def manifest(self, rel: str) -> dict[str, Any] | None:
        """The committed ``_MANIFEST.json`` of the artifact at ``rel``, or None.

        Raises:
            StorageError: the manifest exists but is unreadable or of a newer schema version.
        """
        mrel = f"{rel}/{MANIFEST}"
        try:
            m = self.read_json(mrel)
        except FileNotFoundError:
            return None
        if not isinstance(m, dict) or not isinstance(m.get("schema_version"), int):
            raise StorageError(f"{self.uri(mrel)} is not an artifact manifest (no integer schema_version)")
        if m["schema_version"] > SCHEMA_VERSION:
            raise StorageError(f"{self.uri(mrel)} has schema_version {m['schema_version']}; this mask "
                               f"({code_version()}) reads up to {SCHEMA_VERSION}: upgrade mask")
        return m

    def committed(self, rel: str, config_hash: str | None = None) -> dict[str, Any] | None:
        """The manifest if the artifact is committed (and was built with ``config_hash``, when given).

        The skip-work pattern::

            if store.committed(rel, h) is None:
                with store.open_artifact(rel, kind="knowledge", config_hash=h) as w: ...
        """
        m = self.manifest(rel)
        if m is None:
            return None
        if config_hash is not None and m.get("config_hash") != config_hash:
            logger.info("artifact %s is committed with config hash %s, not %s", self.uri(rel),
                        m.get("config_hash"), config_hash)
            return None
        return m

    def _require(self, rel: str) -> dict[str, Any]:
        m = self.manifest(rel)
        if m is None:
            raise ArtifactNotFound(f"no committed artifact at {self.uri(rel)} (no {MANIFEST}; "
                                   "it was never written, or its writer did not finish)")
        return m

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        """Concatenate the committed parts of the artifact at ``rel`` (manifest order).

        Args:
            rel: artifact folder.
            columns: subset of columns to read (None = all).

        Returns:
            A pyarrow Table (empty, with the artifact's schema, when it has no parts).

        Raises:
            ArtifactNotFound: nothing committed at ``rel``.
            StorageError: an unknown column, or a listed part is missing.
        """
        m = self._require(rel)
        schema = _schema_from_b64(m["schema"]) if m.get("schema") else None
        if columns is not None:
            columns = list(columns)
            if schema is not None:
                missing = [c for c in columns if c not in schema.names]
                if missing:
                    raise StorageError(f"artifact {self.uri(rel)} has no column(s) {missing}; "
                                       f"columns: {schema.names}")
        parts = m.get("parts") or []
        if not parts:
            if schema is None:
                return pa.table({})
            empty = schema.empty_table()
            return empty.select(columns) if columns is not None else empty
        paths = [self.path(rel, p.get("path") or f"{PARTS_DIR}/{p['name']}.parquet") for p in parts]
        try:
            return pq.read_table(paths, filesystem=self.pyarrow_filesystem(), columns=columns,
                                 partitioning=None)
        except FileNotFoundError as e:
            raise StorageError(f"artifact {self.uri(rel)} is damaged: a committed part is missing ({e})") from None

    def committed_parts(self, rel: str) -> tuple[list[dict[str, Any]], pa.Schema | None]:
        """The committed parts as the manifest lists them, each with its fs-native ``native`` path (for
        :meth:`pyarrow_filesystem`) and ``uri``, and the artifact's schema (None if not recorded).

        Raises:
            ArtifactNotFound: nothing committed at ``rel``.
        """
        m = self._require(rel)
        parts = []
        for p in m.get("parts") or []:
            rel_part = p.get("path") or f"{PARTS_DIR}/{p['name']}.parquet"
            parts.append({**p, "native": self.path(rel, rel_part), "uri": self.uri(rel, rel_part)})
        return parts, (_schema_from_b64(m["schema"]) if m.get("schema") else None)

    def part_uris(self, rel: str) -> list[str]:
        """URIs of the committed parts, in manifest order; ArtifactNotFound if not committed."""
        return [e["uri"] for e in self.committed_parts(rel)[0]]

    def read_file(self, rel: str, name: str) -> bytes:
        """An extra file listed in the manifest (e.g. ``pae.safetensors``), checked against its SHA-256.

        Raises:
            ArtifactNotFound: nothing committed at ``rel``.
            StorageError: ``name`` is not listed, or its content does not match the manifest.
        """
        m = self._require(rel)
        entry = next((f for f in m.get("files") or [] if f["name"] == name), None)
        if entry is None:
            listed = [f["name"] for f in m.get("files") or []]
            raise StorageError(f"artifact {self.uri(rel)} lists no file {name!r} (files: {listed})")
        frel = f"{rel}/{entry['path']}"
        try:
            data = self.read_bytes(frel)
        except FileNotFoundError:
            raise StorageError(f"artifact {self.uri(rel)} is damaged: file {name!r} is missing "
                               f"at {self.uri(frel)}") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise StorageError(f"artifact {self.uri(rel)}: file {name!r} does not match its manifest "
                               "SHA-256 (damaged or overwritten)")
        return data


def _mtime(info: dict[str, Any]) -> float:
    for k in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(k)
        if v is None:
            continue
        if isinstance(v, _dt.datetime):
            return v.timestamp()
        try:
            return float(v)
        except (TypeError, ValueError):
            continue
    return 0.0


def sweep_parts(store: Store, rel: str, run_dead: Callable[[str, float], bool], grace_s: float = 3600.0,
                ) -> dict[str, int]:
    """Delete the part files of dead writers that no committed manifest lists (and retired parts).

    Writers that place their parts in a run folder (``<rel>/parts/run-<id>/…``, the extraction) leave
    them behind when killed before their commit; no reader takes them (no manifest lists them) and
    nothing else would ever delete them.  A run folder is swept only when ``run_dead(run, newest_mtime)``
    says its writer is gone (the caller decides, e.g. from the run's lease), so a live run's parts,
    written but not committed yet, are never touched.  Parts the manifest ``retired`` (rows superseded
    by :meth:`ArtifactWriter.retire_rows`) are deleted once retired for more than ``grace_s`` seconds,
    so a reader holding the previous manifest can still finish.

    Args:
        store: the storage root.
        rel: the artifact folder.
        run_dead: ``(run folder name, newest file mtime in Unix seconds) → bool``.
        grace_s: seconds a retired part is kept.

    Returns:
        ``{"orphans": files of dead runs deleted, "retired": retired parts deleted, "runs": dead run
        folders swept}``.
    """
    m = store.manifest(rel) or {}
    listed = {p.get("path") or f"{PARTS_DIR}/{p['name']}.parquet" for p in m.get("parts") or []}
    base = store.path(rel, PARTS_DIR)
    try:
        found = store.fs.find(base, detail=True)
    except FileNotFoundError:
        found = {}
    runs: dict[str, list[tuple[str, float]]] = {}
    prefix = store.path(rel) + "/"
    for native, info in found.items():
        if info.get("type") == "directory":
            continue
        relpath = native[len(prefix):] if native.startswith(prefix) else native
        segs = relpath.split("/")
        if len(segs) >= 3 and segs[1].startswith("run-"):
            runs.setdefault(segs[1], []).append((relpath, _mtime(info)))
    out = {"orphans": 0, "retired": 0, "runs": 0}
    for run, files in sorted(runs.items()):
        orphans = [f for f, _ in files if f not in listed]
        if not orphans or not run_dead(run, max(t for _, t in files)):
            continue
        out["runs"] += 1
        for f in orphans:
            store.delete(f"{rel}/{f}")
            out["orphans"] += 1
    now = time.time()
    for r in m.get("retired") or []:
        path = r.get("path")
        if path and path not in listed and now - float(r.get("retired_at") or now) > grace_s \
                and store.exists(rel, path):
            store.delete(f"{rel}/{path}")
            out["retired"] += 1
    if out["orphans"] or out["retired"]:
        logger.info("artifact %s: swept %d uncommitted part files of %d dead runs and %d retired parts",
                    store.uri(rel), out["orphans"], out["runs"], out["retired"])
    return out
