"""The normalised dataset tables, the error log every reader shares, streaming JSON, and the writer.

Every reader (Visual Genome, Karpathy splits, COCO captions, image folders, the demo world) turns its
raw files into the same four Arrow tables:

* ``images``   — ``image_id, uri, split, width, height`` (one row per image; sizes may be null);
* ``regions``  — ground-truth regions (VG only): ``image_id, region_id, box`` (xyxy pixels, float32),
  ``words`` (the normalised words of the region), ``names`` and ``attributes`` (raw strings);
* ``captions`` — ``caption_id, image_id, text, split`` in gallery order (image by image);
* ``errors``   — one row per input record that did not make it into the other tables:
  ``source`` (file), ``position`` (record path such as ``item 17.objects[3]``), ``error`` (a short
  kind), ``message``.

Bad *records* go to ``errors`` and the reader continues, so every input ends in output or errors.
A file that cannot be parsed at all (malformed JSON) raises :class:`DatasetError`, naming the file
and the position (byte offset, line and column) of the syntax error.

:func:`write_dataset` stores the tables as ``datasets/<name>/{images,regions,captions,_errors}/``,
each a committed artifact of :mod:`mask.storage` (Parquet parts, ``_MANIFEST.json`` last).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
import ijson
import pyarrow as pa

from mask.errors import MaskError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

IMAGES_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    # Absolute local path or URI (s3://, https://) of the image file.
    pa.field("uri", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
])

REGIONS_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("region_id", pa.string(), nullable=False),
    # x1, y1, x2, y2 in pixels of the original image (VG's x, y, w, h converted and clipped).
    pa.field("box", pa.list_(pa.float32(), 4), nullable=False),
    # Normalised words: lowercased, split on whitespace and punctuation, de-duplicated in order.
    pa.field("words", pa.list_(pa.string()), nullable=False),
    pa.field("names", pa.list_(pa.string()), nullable=False),
    pa.field("attributes", pa.list_(pa.string()), nullable=False),
])

CAPTIONS_SCHEMA = pa.schema([
    pa.field("caption_id", pa.string(), nullable=False),
    # Null for free-text queries that belong to no known image (user galleries).
    pa.field("image_id", pa.string()),
    pa.field("text", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
])

ERRORS_SCHEMA = pa.schema([
    pa.field("source", pa.string(), nullable=False),
    pa.field("position", pa.string(), nullable=False),
    pa.field("error", pa.string(), nullable=False),
    pa.field("message", pa.string(), nullable=False),
])

SCHEMAS = {"images": IMAGES_SCHEMA, "regions": REGIONS_SCHEMA, "captions": CAPTIONS_SCHEMA,
           "_errors": ERRORS_SCHEMA}

# Files up to this size get an exact syntax-error position from Python's json module.
_EXACT_LOCATE_MAX_BYTES = 64 * 2**20
_BOM = b"\xef\xbb\xbf"
# Read size handed to ijson; the syntax-error locator keeps the last two chunks.
_JSON_BUF = 64 * 1024


class DatasetError(MaskError, ValueError):
    """A dataset input that cannot be read at all; the message names the file and what is wrong."""


# --------------------------------------------------------------------------- error log and counters

@dataclass
class ErrorLog:
    """Rows of the ``errors`` table plus named counters of documented, counted rules.

    Readers append one row per dropped input record (:meth:`add`) and bump counters for rules that
    keep or alter a record (:meth:`count`, e.g. ``boxes_clipped``).
    """

    rows: list[dict[str, str]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def add(self, source: str, position: str, error: str, message: str) -> None:
        """Record a dropped input record (also counted under ``error``)."""
        self.rows.append({"source": str(source), "position": str(position), "error": error,
                          "message": message})
        self.counts[error] += 1

    def count(self, rule: str, n: int = 1) -> None:
        """Bump the counter of a documented rule."""
        self.counts[rule] += n

    def extend(self, other: ErrorLog) -> None:
        """Append another log's rows and counters."""
        self.rows.extend(other.rows)
        self.counts.update(other.counts)

    def __len__(self) -> int:
        return len(self.rows)

    def to_table(self) -> pa.Table:
        """The ``errors`` table."""
        return pa.Table.from_pylist(self.rows, schema=ERRORS_SCHEMA)


@dataclass
class DatasetTables:
    """What a reader produces, before it is written.

    ``regions`` may be a lazy iterator of tables (VG streams its ~3.8M boxes); it is consumed once
    by :func:`write_dataset`, and ``errors`` / ``stats`` are complete only after that.
    """

    name: str
    images: pa.Table
    regions: pa.Table | Iterable[pa.Table] | None = None
    captions: pa.Table | None = None
    errors: ErrorLog = field(default_factory=ErrorLog)
    # Input file → fingerprint (see :func:`fingerprint`).
    inputs: dict[str, str] = field(default_factory=dict)

    @property
    def stats(self) -> dict[str, int]:
        """Counters of errors and counted rules (complete after the regions were consumed)."""
        return dict(sorted(self.errors.counts.items()))


# --------------------------------------------------------------------------- tables from rows

def images_table(rows: list[dict[str, Any]]) -> pa.Table:
    """``images`` table from dicts with ``image_id, uri, split`` and optional ``width, height``."""
    return pa.Table.from_pylist(
        [{"image_id": r["image_id"], "uri": r["uri"], "split": r["split"],
          "width": r.get("width"), "height": r.get("height")} for r in rows], schema=IMAGES_SCHEMA)


def captions_table(rows: list[dict[str, Any]]) -> pa.Table:
    """``captions`` table from dicts with ``caption_id, image_id, text, split``."""
    return pa.Table.from_pylist(rows, schema=CAPTIONS_SCHEMA)


def regions_table(rows: list[dict[str, Any]]) -> pa.Table:
    """``regions`` table from dicts with the :data:`REGIONS_SCHEMA` columns."""
    return pa.Table.from_pylist(rows, schema=REGIONS_SCHEMA)


def as_int(value: Any) -> int | None:
    """A non-negative whole number from JSON (int, integral float or digit string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    if f != f or f < 0 or f != int(f) or f > 2**31 - 1:
        return None
    return int(f)


def as_id(value: Any) -> str | None:
    """A record id (int or non-empty string) as a string, else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value == int(value):
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


# --------------------------------------------------------------------------- files and fingerprints

def open_binary(path: str, storage_options: dict | None = None) -> IO[bytes]:
    """Open a local path or URI (``s3://…``, ``file://…``) for binary reading."""
    return fsspec.open(path, "rb", **(storage_options or {})).open()


def join_uri(root: str, *parts: str) -> str:
    """Join a local folder or URI with relative parts; local results are absolute paths."""
    parts = tuple(p.strip("/") for p in parts if p)
    if "://" in root:
        return "/".join([root.rstrip("/"), *parts])
    return os.path.abspath(os.path.join(root, *parts))


def exists(path: str, storage_options: dict | None = None) -> bool:
    """Whether a local path or URI names an existing file or folder."""
    fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
    return bool(fs.exists(p))


def fingerprint(path: str, storage_options: dict | None = None) -> str:
    """Fingerprint of an input file: its size and SHA-256 (first+last 8 MiB for files over 256 MiB).

    The partial hash keeps a rerun over the real VG files (≈1 GiB of JSON) cheap; together with the
    size it still changes whenever a file is replaced by another release.
    """
    fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
    size = int(fs.size(p))
    h = hashlib.sha256()
    chunk = 8 * 2**20
    with fs.open(p, "rb") as f:
        if size <= 256 * 2**20:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
            kind = "sha256"
        else:
            h.update(f.read(chunk))
            f.seek(size - chunk)
            h.update(f.read(chunk))
            kind = "sha256-head-tail"
    return f"size={size};{kind}={h.hexdigest()}"


# --------------------------------------------------------------------------- streaming JSON

class _CountingReader:
    """File wrapper (``read`` only) that remembers how many bytes were read and the last two chunks."""

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.offset = 0
        self.prev = b""
        self.last = b""

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if self.offset == 0 and data.startswith(_BOM):  # yajl rejects a UTF-8 byte order mark
            self.offset = len(_BOM)
            data = data[len(_BOM):]
        self.prev, self.last = self.last, data
        self.offset += len(data)
        return data


def _first_byte(path: str, storage_options: dict | None) -> bytes:
    with open_binary(path, storage_options) as f:
        while True:
            block = f.read(4096)
            if not block:
                return b""
            stripped = block.lstrip()
            if stripped.startswith(_BOM):
                stripped = stripped[len(_BOM):].lstrip()
            if stripped:
                return stripped[:1]


def iter_json_items(path: str, prefix: str, *, expect: str, storage_options: dict | None = None
                    ) -> Iterator[Any]:
    """Stream the items under ``prefix`` of a JSON file (``"item"``: a top-level array).

    Memory stays at one item, so the ~3.8M-box ``objects.json`` is never loaded whole.

    Args:
        path: local path or URI.
        prefix: ijson prefix, e.g. ``"item"`` or ``"images.item"``.
        expect: ``"["`` or ``"{"`` — the required top-level container.
        storage_options: fsspec options.

    Yields:
        Decoded items (dicts, lists, …; numbers as int/float).

    Raises:
        DatasetError: the file is missing, has the wrong top-level container, or is malformed JSON
            (the message gives the byte offset, line and column of the syntax error).
    """
    try:
        first = _first_byte(path, storage_options)
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: file not found") from e
    if first != expect.encode():
        what = "empty file" if not first else f"starts with {first.decode(errors='replace')!r}"
        raise DatasetError(f"{path}: expected a JSON {'array' if expect == '[' else 'object'} "
                           f"at the top level ({what})")
    with open_binary(path, storage_options) as raw:
        reader = _CountingReader(raw)
        it = ijson.items(reader, prefix, use_float=True, buf_size=_JSON_BUF)
        n = 0
        while True:
            try:
                item = next(it)
            except StopIteration:
                return
            except (ijson.JSONError, UnicodeDecodeError, ValueError) as e:
                where = _locate_syntax_error(path, storage_options, e, reader)
                raise DatasetError(f"{path}: malformed JSON {where} (after {n} complete records "
                                   f"under {prefix!r}): {_first_line(e)}") from None
            n += 1
            yield item


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _locate_syntax_error(path: str, storage_options: dict | None, err: Exception,
                         reader: _CountingReader) -> str:
    """Best position of a JSON syntax error: exact for files ≤ 64 MiB, else from ijson's context."""
    fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
    size = int(fs.size(p))
    if size <= _EXACT_LOCATE_MAX_BYTES:
        with fs.open(p, "rb") as f:
            data = f.read()
        skip = len(_BOM) if data.startswith(_BOM) else 0
        try:
            json.loads(data[skip:].decode("utf-8"))
        except json.JSONDecodeError as je:
            byte = skip + len(je.doc[:je.pos].encode())
            return f"at byte {byte} (line {je.lineno}, column {je.colno})"
        except UnicodeDecodeError as ue:
            return _line_col(fs, p, skip + int(ue.start)) + " (not UTF-8)"
    # Large file: find ijson's context snippet ("...text\n (right here) ---^") in the chunks it read.
    lines = str(err).split("\n")
    if "premature EOF" in lines[0]:
        return f"at end of file (byte {size}, file truncated)"
    if len(lines) >= 3 and "^" in lines[2]:
        caret = lines[2].index("^")
        before, after = lines[1][:caret].lstrip(), lines[1][caret:]
        buf = reader.prev + reader.last
        norm = re.sub(rb"[\r\n\t]", b" ", buf).decode("latin-1")
        needle = before + after
        hits = [m.start() for m in re.finditer(re.escape(needle), norm)] if needle else []
        if len(hits) == 1:
            offset = reader.offset - len(buf) + hits[0] + len(before)
            return _line_col(fs, p, offset)
    return f"between bytes {max(0, reader.offset - len(reader.last))} and {reader.offset}"


def _line_col(fs: Any, p: str, offset: int) -> str:
    line, col_start, pos = 1, 0, 0
    with fs.open(p, "rb") as f:
        while pos < offset:
            block = f.read(min(8 * 2**20, offset - pos))
            if not block:
                break
            nl = block.count(b"\n")
            if nl:
                line += nl
                col_start = pos + block.rindex(b"\n") + 1
            pos += len(block)
    return f"at byte {offset} (line {line}, column {offset - col_start + 1})"


# --------------------------------------------------------------------------- writer

def dataset_rel(name: str, table: str) -> str:
    """Relative artifact path of one table of a dataset: ``datasets/<name>/<table>``."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"dataset name {name!r}: must be a non-empty folder name without '/'")
    if table not in SCHEMAS:
        raise ValueError(f"unknown dataset table {table!r} (one of {sorted(SCHEMAS)})")
    return f"datasets/{name}/{table}"


def dataset_hash(config_hash: str, inputs: dict[str, str]) -> str:
    """Hash under which a dataset is committed: the reader config plus the input fingerprints."""
    blob = json.dumps({"config": config_hash, "inputs": inputs, "schema": SCHEMA_VERSION},
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _conform(t: pa.Table | pa.RecordBatch, schema: pa.Schema, what: str) -> pa.Table:
    if isinstance(t, pa.RecordBatch):
        t = pa.Table.from_batches([t])
    missing = [n for n in schema.names if n not in t.column_names]
    if missing:
        raise ValueError(f"{what} table lacks columns {missing} (schema: {schema.names})")
    try:
        return t.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as e:
        raise ValueError(f"{what} table does not fit the schema: {e}") from e


def write_dataset(store: Any, name: str, images: pa.Table, regions: pa.Table | Iterable[pa.Table] | None = None,
                  captions: pa.Table | None = None, errors: ErrorLog | pa.Table | None = None,
                  inputs: dict[str, str] | None = None, config_hash: str = "",
                  stats: dict[str, int] | None = None, mlflow_run_id: str | None = None) -> dict[str, Any]:
    """Write ``datasets/<name>/{images,regions,captions,_errors}/`` as committed artifacts.

    Regions may be an iterator of tables; each becomes one Parquet part, so VG's boxes stream
    through with bounded memory.  They are written first, so a stream that fails half-way (a
    malformed ``objects.json``) leaves the other tables as they were.  ``_errors`` is written last
    (it is complete only after the regions were consumed) and always exists, possibly empty.
    Tables that are None are not written.

    Args:
        store: a :class:`mask.storage.Store`.
        name: dataset name (folder under ``datasets/``).
        images, regions, captions: tables in the schemas of this module.
        errors: the reader's :class:`ErrorLog` (or an errors table).
        inputs: input file → fingerprint, recorded in every manifest.
        config_hash: hash of the reader configuration (see :func:`dataset_hash`).
        stats: counters to record in the ``_errors`` manifest (default: the error log's counters).
        mlflow_run_id: recorded in the manifests when given.

    Returns:
        ``{"name", "config_hash", "tables": {table: {"uri", "rows", "parts"}}, "stats"}``.
    """
    inputs = dict(inputs or {})
    out: dict[str, Any] = {"name": name, "config_hash": config_hash, "tables": {}}

    def write(table: str, parts: Iterable[pa.Table | pa.RecordBatch], extra: dict | None = None) -> None:
        rel = dataset_rel(name, table)
        schema = SCHEMAS[table]
        rows = n_parts = 0
        with store.open_artifact(rel, kind=f"dataset.{table.strip('_')}", config_hash=config_hash,
                                 inputs=inputs) as w:
            for part in parts:
                t = _conform(part, schema, table)
                if t.num_rows == 0:
                    continue
                w.write_part(t)  # random part names: a rewrite never collides with committed parts
                rows += t.num_rows
                n_parts += 1
            if n_parts == 0:
                w.write_part(schema.empty_table())
                n_parts = 1
            w.commit(extra={"dataset_schema_version": SCHEMA_VERSION, **(extra or {})},
                     **({"mlflow_run_id": mlflow_run_id} if mlflow_run_id else {}))
        out["tables"][table] = {"uri": store.uri(rel), "rows": rows, "parts": n_parts}
        logger.info("dataset %s/%s: %d rows in %d parts", name, table, rows, n_parts)

    # Regions first: their stream is what can fail (malformed objects.json); then nothing else is rewritten.
    if regions is not None:
        write("regions", [regions] if isinstance(regions, pa.Table | pa.RecordBatch) else regions)
    if captions is not None:
        write("captions", [captions])
    write("images", [images])
    if isinstance(errors, ErrorLog):
        counts = dict(sorted(errors.counts.items())) if stats is None else stats
        err_table = errors.to_table()
    else:
        counts = stats or {}
        err_table = errors if errors is not None else ERRORS_SCHEMA.empty_table()
    write("_errors", [err_table], extra={"stats": counts})
    out["stats"] = counts
    return out

