"""One storage API over local paths, ``file://`` and ``s3://`` (fsspec/s3fs for I/O, pyarrow.fs for Parquet).

Every dataset-like artifact (DESIGN.md §3) is a folder under the storage root::

    <rel>/parts/<name>.parquet          Parquet parts (one schema per artifact)
    <rel>/files/<token>/<name>          extra files (weights, metrics.json), one folder per writer
    <rel>/_MANIFEST.json                the commit marker, written LAST

Readers trust only what ``_MANIFEST.json`` lists: a crashed writer leaves files that no reader takes.
A rerun with the same config hash finds the committed manifest (:meth:`Store.committed`) and skips
the work.  Extra files live under a per-writer folder so that rewriting an artifact never touches a
file that the currently committed manifest points at.

Writes are atomic: locally a temporary file in the same folder and ``os.replace``; on S3 a single
object upload (an object only appears once its upload completes).

Credentials never come from configuration: s3fs and pyarrow take them from the environment / AWS
credential chain.  The endpoint comes from ``options={"client_kwargs": {"endpoint_url": …}}`` or
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; the region from the options or
``AWS_REGION`` / ``AWS_DEFAULT_REGION``.  URIs carrying ``user:password@`` are refused, and
:func:`redact` scrubs anything that looks like a credential before it reaches a manifest.

Concurrency: one writer per artifact at a time.  ``append=True`` re-reads the committed manifest at
commit time and takes the union, which narrows (but does not close) the window of a lost update.
"""

from __future__ import annotations

import base64
import copy
import datetime as _dt
import functools
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import mask
from mask.errors import MaskError

logger = logging.getLogger(__name__)

#: Version of the manifest layout written by this module.
SCHEMA_VERSION = 1
#: Name of the commit marker inside an artifact folder.
MANIFEST = "_MANIFEST.json"
#: Folder of the Parquet parts inside an artifact folder.
PARTS_DIR = "parts"
#: Folder of the extra files inside an artifact folder.
FILES_DIR = "files"

#: Attempts per S3 request, the first included, for both clients: botocore's "standard" retry mode (s3fs) and
#: pyarrow's ``AwsStandardS3RetryStrategy``, both with exponential backoff and jitter.  The clients' defaults
#: (botocore legacy 5, pyarrow 3) give up on a burst of three 503 SlowDown / dropped connections.  Override with
#: ``options={"config_kwargs": {"retries": {"max_attempts": n}}}`` (used for both clients).
S3_MAX_ATTEMPTS = 10

_TMP_MARK = ".tmp-"
_SUPPORTED = ("local path", "file://", "s3://")
# Option keys that would carry credentials; refused (the AWS chain provides them).
_CREDENTIAL_OPTION_KEYS = frozenset({
    "key", "secret", "token", "password", "username", "aws_access_key_id", "aws_secret_access_key",
    "aws_session_token", "access_key", "secret_key", "session_token",
})


class StorageError(MaskError, ValueError):
    """Bad URI, path traversal, damaged or inconsistent artifact; the message names the path."""


class ArtifactNotFound(StorageError):
    """No committed ``_MANIFEST.json`` at an artifact; the message names the URI."""


# --------------------------------------------------------------------------------------------------
# Credentials: detection and redaction (also used by mask.tracking)
# --------------------------------------------------------------------------------------------------

# Words that make a key name a credential ("aws_secret_access_key", "MLFLOW_TRACKING_TOKEN", "dbPassword"),
# matched on whole words so that "tokenizer", "max_tokens" or "author" stay visible.
_SECRET_WORDS = frozenset({"secret", "secrets", "password", "passwd", "pwd", "passphrase", "token", "credential",
                           "credentials", "apikey", "auth", "authorization", "signature", "cookie"})
_SECRET_WORD_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"),
                                ("session", "key"), ("account", "key"), ("sas", "token"),
                                ("customer", "key")})  # SSE-C: s3_additional_kwargs.SSECustomerKey
_SECRET_VALUE_RES = (
    re.compile(r"\b(AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[A-Z0-9]{16}\b"),  # AWS access key ids
    re.compile(r"\b(ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{20,}\b"),  # GitHub tokens
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}\b"),
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"),  # Slack tokens
    re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b"),  # API secret keys of the "sk-" family
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"),
)
# scheme://user:password@host → scheme://***@host (and scheme://token@host for http(s)).
_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s:]*:[^/@\s]*)@")
REDACTED = "***"


def is_secret_key(key: str) -> bool:
    """Whether a (possibly dotted) key names a credential, e.g. ``storage.options.secret``.

    Args:
        key: a key such as ``aws_secret_access_key`` or ``tracking.password``.

    Returns:
        True when the last dotted segment looks like a credential name.
    """
    last = str(key).rsplit(".", 1)[-1]
    if last.lower() in _CREDENTIAL_OPTION_KEYS:
        return True
    words = [w.lower() for w in re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", last)]
    return any(w in _SECRET_WORDS for w in words) or any(p in _SECRET_WORD_PAIRS for p in zip(words, words[1:], strict=False))


def redact_text(text: str) -> str:
    """Replace credential-looking substrings of ``text`` (AWS key ids, tokens, ``user:pass@``) by ``***``."""
    out = _USERINFO_RE.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    for rx in _SECRET_VALUE_RES:
        out = rx.sub(REDACTED, out)
    return out


def redact(obj: Any, key: str = "") -> Any:
    """Deep copy of ``obj`` with credential-looking keys' values and substrings replaced by ``***``.

    Args:
        obj: JSON-like value (dicts, lists, scalars).
        key: key under which ``obj`` sits (used for the key-name rule).

    Returns:
        The redacted copy; non-string scalars are kept as they are unless their key is secret.
    """
    if key and is_secret_key(key) and obj not in (None, "", {}, []):
        return REDACTED
    if isinstance(obj, dict):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def _check_options(options: dict[str, Any]) -> None:
    def walk(d: Any) -> Iterable[str]:
        if isinstance(d, dict):
            for k, v in d.items():
                yield str(k)
                yield from walk(v)

    bad = sorted(k for k in walk(options) if k.lower() in _CREDENTIAL_OPTION_KEYS)
    if bad:
        raise StorageError(f"storage options carry credentials ({', '.join(bad)}); they are not accepted "
                           "here: use the AWS environment variables or credential chain")


# --------------------------------------------------------------------------------------------------
# URIs and paths
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Small helpers: fingerprints, code version
# --------------------------------------------------------------------------------------------------


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


def _git_sha(repo: Path) -> str | None:
    """HEAD commit of the checkout at ``repo`` by reading .git directly (no subprocess)."""
    try:
        git = repo / ".git"
        if git.is_file():  # worktree / submodule: "gitdir: <path>"
            text = git.read_text().strip()
            if not text.startswith("gitdir:"):
                return None
            git = (repo / text.split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head if re.fullmatch(r"[0-9a-f]{40}", head) else None
        ref = head.split(":", 1)[1].strip()
        common = git
        if (git / "commondir").is_file():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        for base in (git, common):
            f = base / ref
            if f.is_file():
                return f.read_text().strip()
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split(" ", 1)[0]
    except OSError:
        return None
    return None


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``mask.__version__``, plus ``+g<sha12>`` when the package runs from a git checkout with commits."""

    version = mask.__version__
    sha = _git_sha(Path(mask.__file__).resolve().parent.parent)
    return f"{version}+g{sha[:12]}" if sha else version


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


# --------------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------------


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
        ``ray.data.read_parquet(store.path(...), filesystem=...)`` (it pickles).
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

    def part_uris(self, rel: str) -> list[str]:
        """URIs of the committed parts (for ``ray.data.read_parquet``); ArtifactNotFound if not committed."""
        m = self._require(rel)
        return [self.uri(rel, p.get("path") or f"{PARTS_DIR}/{p['name']}.parquet") for p in m.get("parts") or []]

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


# --------------------------------------------------------------------------------------------------
# ArtifactWriter
# --------------------------------------------------------------------------------------------------


class ArtifactWriter:
    """Writes the parts and files of one artifact, then its manifest; use as a context manager.

    On a clean exit of the ``with`` block :meth:`commit` runs (unless already called); on an exception
    nothing is committed and the parts/files written by this writer are deleted (best effort — a
    killed process leaves them behind, and readers ignore them because no manifest lists them).
    """

    def __init__(self, store: Store, rel: str, *, kind: str, config_hash: str,
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
        self.store.write_json(f"{self.rel}/{MANIFEST}", manifest)
        self._state = "committed"
        logger.info("committed artifact %s (%s, %d parts, %d rows)", self.uri, self.kind, len(parts),
                    manifest["row_count"])
        return manifest


# --------------------------------------------------------------------------------------------------
# Sweeping the parts no manifest lists
# --------------------------------------------------------------------------------------------------


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
