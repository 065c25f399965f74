"""Writing one artifact: parts and files first, the manifest last (the commit protocol of mask.storage)."""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mask.faults import kill_point
from mask.storage.errors import StorageError
from mask.storage.paths import (
    FILES_DIR,
    MANIFEST,
    PARTS_DIR,
    SCHEMA_VERSION,
    _split_rel,
    _validate_name,
)
from mask.storage.redaction import redact
from mask.storage.version import code_version

logger = logging.getLogger(__name__)


def _schema_to_b64(schema: pa.Schema) -> str:
    return base64.b64encode(schema.remove_metadata().serialize().to_pybytes()).decode()


def _schema_from_b64(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def _schema_diff(a: pa.Schema, b: pa.Schema) -> str:
    fa = {f.name: str(f.type) for f in a}
    fb = {f.name: str(f.type) for f in b}
    bits = []
    if only := sorted(set(fa) - set(fb)):
        bits.append(f"missing columns {only}")
    if extra := sorted(set(fb) - set(fa)):
        bits.append(f"extra columns {extra}")
    if changed := sorted(k for k in set(fa) & set(fb) if fa[k] != fb[k]):
        bits.append("type changes " + ", ".join(f"{k}: {fa[k]} -> {fb[k]}" for k in changed))
    if not bits:
        bits.append(f"column order or nullability differs ({a.names} vs {b.names})")
    return "; ".join(bits)


class ArtifactWriter:
    """Writes the parts and files of one artifact, then its manifest; use as a context manager.

    On a clean exit of the ``with`` block :meth:`commit` runs (unless already called); on an exception
    nothing is committed and the parts/files written by this writer are deleted (best effort — a
    killed process leaves them behind, and readers ignore them because no manifest lists them).
    """

    def __init__(self, store: Any, rel: str, *, kind: str, config_hash: str,
                 inputs: dict[str, Any] | None = None, append: bool = False):
        store.path(rel)  # validates rel
        for what, v in (("kind", kind), ("config_hash", config_hash)):
            if not isinstance(v, str) or not v:
                raise StorageError(f"artifact {store.uri(rel)}: {what} must be a non-empty string, got {v!r}")
        if inputs is not None and not isinstance(inputs, dict):
            raise StorageError(f"artifact {store.uri(rel)}: inputs must be a dict, got {type(inputs).__name__}")
        self.store = store
        self.rel = rel
        self.kind = kind
        self.config_hash = config_hash
        self.inputs = dict(inputs or {})
        self.append = append
        self.token = uuid.uuid4().hex[:12]
        self._parts: list[dict[str, Any]] = []
        self._files: list[dict[str, Any]] = []
        self._retire: list[tuple[list[str], Callable[[pa.Table], Any], str]] = []
        self._state = "open"
        self._previous = store.manifest(rel)
        self._schema: pa.Schema | None = None
        if append and self._previous is not None:
            self._check_compatible(self._previous)
            if self._previous.get("schema"):
                self._schema = _schema_from_b64(self._previous["schema"])

    @property
    def uri(self) -> str:
        """URI of the artifact folder."""
        return self.store.uri(self.rel)

    def _check_compatible(self, prev: dict[str, Any]) -> None:
        if prev.get("kind") != self.kind or prev.get("config_hash") != self.config_hash:
            raise StorageError(
                f"cannot append to {self.uri}: it is committed as kind={prev.get('kind')!r}, "
                f"config_hash={prev.get('config_hash')!r}; this writer has kind={self.kind!r}, "
                f"config_hash={self.config_hash!r} (write a new artifact, or delete the old one)")

    def _committed_part_names(self) -> set[str]:
        return {p["name"] for p in (self._previous or {}).get("parts") or []}

    def _check_open(self) -> None:
        if self._state != "open":
            raise StorageError(f"artifact writer for {self.uri} is already {self._state}")

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if self._state == "open":
                self.abort()
            return
        if self._state == "open":
            self.commit()

    def write_part(self, table: pa.Table | pa.RecordBatch, name: str | None = None) -> str:
        """Write one Parquet part, ``parts/<name>.parquet``.

        Args:
            table: the rows; every part of an artifact must have the same schema (metadata ignored).
            name: part name (a single safe name; ``.parquet`` is added); default a random hex name.

        Returns:
            The part name as listed in the manifest.

        Raises:
            StorageError: bad name, a name already written or committed, or a schema mismatch.
        """
        self._check_open()
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if not isinstance(table, pa.Table):
            raise StorageError(f"write_part({self.uri}): expected a pyarrow Table, got {type(table).__name__}")
        if name is None:
            name = uuid.uuid4().hex
        elif isinstance(name, str) and name.endswith(".parquet"):
            name = name[: -len(".parquet")]
        _validate_name(name, f"part name of {self.uri}")
        if name in self._committed_part_names() or any(p["name"] == name for p in self._parts):
            raise StorageError(f"part {name!r} already exists in {self.uri}; part names must be unique "
                               "(committed parts are never overwritten)")
        schema = table.schema.remove_metadata()
        if self._schema is None:
            self._schema = schema
        elif not schema.equals(self._schema):
            raise StorageError(f"part {name!r} of {self.uri} has a different schema from the artifact's: "
                               f"{_schema_diff(self._schema, schema)}")
        prel = f"{PARTS_DIR}/{name}.parquet"
        size = self.store.write_parquet(f"{self.rel}/{prel}", table)
        self._parts.append({"name": name, "path": prel, "rows": int(table.num_rows), "bytes": size})
        logger.debug("wrote part %s (%d rows, %d bytes)", self.store.uri(self.rel, prel), table.num_rows, size)
        return name

    def add_existing_part(self, name: str) -> str:
        """List a Parquet file that is already under ``<rel>/parts/`` (written by Ray Data workers).

        Workers write to ``store.path(rel, "parts", "<run>/<name>.parquet")`` through
        :meth:`Store.pyarrow_filesystem`; the driver then lists those files here and commits.  Rows,
        size and schema are read from the file's Parquet footer (no data is read).

        Args:
            name: path under ``parts/`` (``run-1/shard-0.parquet`` or ``run-1/shard-0``; sub-folders allowed).

        Returns:
            The part name as listed in the manifest (the path without ``.parquet``).

        Raises:
            StorageError: bad or duplicate name, missing file, or a schema mismatch.
        """
        self._check_open()
        if isinstance(name, str) and name.endswith(".parquet"):
            name = name[: -len(".parquet")]
        segs = _split_rel(name, f"part name of {self.uri}")
        name = "/".join(segs)
        if name in self._committed_part_names() or any(p["name"] == name for p in self._parts):
            raise StorageError(f"part {name!r} already exists in {self.uri}; part names must be unique")
        prel = f"{PARTS_DIR}/{name}.parquet"
        native = self.store.path(self.rel, prel)
        try:
            size = int(self.store.fs.info(native)["size"])
            meta = pq.read_metadata(native, filesystem=self.store.pyarrow_filesystem())
        except FileNotFoundError:
            raise StorageError(f"part {name!r} of {self.uri}: no file at {self.store.uri(self.rel, prel)}") from None
        schema = meta.schema.to_arrow_schema().remove_metadata()
        if self._schema is None:
            self._schema = schema
        elif not schema.equals(self._schema):
            raise StorageError(f"part {name!r} of {self.uri} has a different schema from the artifact's: "
                               f"{_schema_diff(self._schema, schema)}")
        self._parts.append({"name": name, "path": prel, "rows": int(meta.num_rows), "bytes": size})
        return name

    def write_file(self, name: str, data: bytes) -> None:
        """Write an extra file (weights, ``metrics.json``) that the manifest lists with its SHA-256.

        Stored at ``files/<writer token>/<name>``; read it back with :meth:`Store.read_file`.
        A later ``write_file`` with the same name in this writer replaces it.
        """
        self._check_open()
        _validate_name(name, f"file name of {self.uri}")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise StorageError(f"write_file({self.uri}, {name!r}): data must be bytes, got {type(data).__name__}")
        data = bytes(data)
        frel = f"{FILES_DIR}/{self.token}/{name}"
        self.store.write_bytes(f"{self.rel}/{frel}", data)
        self._files = [f for f in self._files if f["name"] != name]
        self._files.append({"name": name, "path": frel, "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})

    def retire_rows(self, columns: list[str], predicate: Callable[[pa.Table], Any], into: str = "") -> None:
        """At commit, drop the rows of already committed parts for which ``predicate`` is true.

        Used to replace superseded rows (an image re-extracted because its bytes changed): each committed
        part holding such rows is rewritten without them as a new part (under ``parts/<into>/``) and the
        manifest lists the rewritten part instead of the old one — one manifest write, so a reader sees
        either the old rows or the new ones, never both nor neither.  The old part files stay on storage,
        listed under the manifest's ``retired`` with the time, for readers that hold the previous manifest;
        :func:`sweep_parts` deletes them once older than its grace period.

        Args:
            columns: the columns ``predicate`` needs (only those are read from each part).
            predicate: Table (those columns) → boolean array, true for the rows to drop.
            into: sub-folder of ``parts/`` for the rewritten parts (the writer's run folder), or "".
        """
        self._check_open()
        if into:
            _split_rel(into, f"retire_rows(into) of {self.uri}")
        self._retire.append((list(columns), predicate, into))

    def _apply_retire(self, parts: list[dict[str, Any]], new_names: set[str]) -> tuple[list[dict], list[dict]]:
        """Apply :meth:`retire_rows` to the committed parts of ``parts`` → (parts, newly retired entries)."""
        if not self._retire:
            return parts, []
        import numpy as np

        fs = self.store.pyarrow_filesystem()
        now = time.time()
        out: list[dict[str, Any]] = []
        retired: list[dict[str, Any]] = []
        for p in parts:
            if p["name"] in new_names:
                out.append(p)
                continue
            native = self.store.path(self.rel, p["path"])
            drop = None
            for columns, predicate, _into in self._retire:
                t = pq.read_table(native, filesystem=fs, columns=columns)
                d = np.asarray(predicate(t), bool)
                drop = d if drop is None else drop | d
            if drop is None or not drop.any():
                out.append(p)
                continue
            retired.append({"path": p["path"], "retired_at": now, "rows": int(drop.sum())})
            if drop.all():
                continue
            keep = pq.read_table(native, filesystem=fs).filter(pa.array(~drop))
            into = self._retire[0][2]
            base = p["name"].rsplit("/", 1)[-1]
            name = f"{into}/{base}-r{self.token}" if into else f"{base}-r{self.token}"
            prel = f"{PARTS_DIR}/{name}.parquet"
            size = self.store.write_parquet(f"{self.rel}/{prel}", keep)
            self._parts.append({"name": name, "path": prel, "rows": int(keep.num_rows), "bytes": size})
            out.append({"name": name, "path": prel, "rows": int(keep.num_rows), "bytes": size})
        if retired:
            logger.info("artifact %s: %d superseded rows dropped from %d parts", self.uri,
                        sum(r["rows"] for r in retired), len(retired))
        return out, retired

    def abort(self) -> None:
        """Give up: nothing is committed; delete what this writer wrote (best effort)."""
        if self._state != "open":
            return
        self._state = "aborted"
        for p in self._parts:
            try:
                self.store.delete(f"{self.rel}/{p['path']}")
            except Exception as e:  # noqa: BLE001 - cleanup must not hide the original error
                logger.warning("could not remove uncommitted part %s: %s", p["path"], e)
        try:
            self.store.delete(f"{self.rel}/{FILES_DIR}/{self.token}")
        except Exception as e:  # noqa: BLE001
            logger.warning("could not remove uncommitted files of %s: %s", self.uri, e)
        logger.info("artifact %s: writer aborted, nothing committed", self.uri)

    def commit(self, *, mlflow_run_id: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write ``_MANIFEST.json`` (last), making the parts and files visible to readers.

        Args:
            mlflow_run_id: the MLflow run that produced the artifact.
            extra: more JSON-serialisable facts for the manifest (redacted like ``inputs``).

        Returns:
            The manifest written.
        """
        self._check_open()
        parts = list(self._parts)
        files = list(self._files)
        current = self.store.manifest(self.rel) if (self.append or self._retire) else None
        if self.append:  # current: re-read, another commit may have landed
            if current is not None:
                self._check_compatible(current)
                if current.get("schema") and self._schema is not None:
                    cur_schema = _schema_from_b64(current["schema"])
                    if not cur_schema.equals(self._schema):
                        raise StorageError(f"cannot append to {self.uri}: committed schema differs from "
                                           f"the new parts' ({_schema_diff(cur_schema, self._schema)})")
                elif current.get("schema"):
                    self._schema = _schema_from_b64(current["schema"])
                new_names = {p["name"] for p in parts}
                clash = sorted(new_names & {p["name"] for p in current.get("parts") or []})
                if clash:
                    raise StorageError(f"cannot append to {self.uri}: part(s) {clash} were committed meanwhile")
                parts = [*(current.get("parts") or []), *parts]
                new_files = {f["name"] for f in files}
                files = [*(f for f in current.get("files") or [] if f["name"] not in new_files), *files]
        parts, retired = self._apply_retire(parts, {p["name"] for p in self._parts})
        retired = [*((current or self._previous or {}).get("retired") or []), *retired]
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "kind": self.kind,
            "config_hash": self.config_hash,
            "code_version": code_version(),
            "inputs": redact(self.inputs),
            "parts": parts,
            "files": files,
            "row_count": int(sum(p["rows"] for p in parts)),
            "schema": _schema_to_b64(self._schema) if self._schema is not None else None,
            "columns": ({f.name: str(f.type) for f in self._schema} if self._schema is not None else {}),
            "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "mlflow_run_id": mlflow_run_id,
            "extra": redact(dict(extra or {})),
        }
        if retired:
            manifest["retired"] = retired
        kill_point(f"commit.{self.kind}")  # tests: the committing process dies before its manifest lands
        self.store.write_json(f"{self.rel}/{MANIFEST}", manifest)
        self._state = "committed"
        logger.info("committed artifact %s (%s, %d parts, %d rows)", self.uri, self.kind, len(parts),
                    manifest["row_count"])
        return manifest
