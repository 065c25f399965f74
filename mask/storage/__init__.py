"""One storage API over local paths, ``file://`` and ``s3://`` (fsspec/s3fs for I/O, pyarrow.fs for Parquet).

By concern: :mod:`~mask.storage.paths` (layout constants, errors, URIs), :mod:`~mask.storage.redaction`
(credentials), :mod:`~mask.storage.fingerprints` and :mod:`~mask.storage.version` (identities),
:mod:`~mask.storage.store` (:class:`Store`), :mod:`~mask.storage.artifacts` (:class:`ArtifactWriter`,
the commit protocol).  ``from mask.storage import …`` serves all of them.

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

from mask.storage.artifacts import ArtifactWriter
from mask.storage.errors import ArtifactNotFound, StorageError
from mask.storage.fingerprints import fingerprint, fingerprint_files
from mask.storage.paths import FILES_DIR, MANIFEST, PARTS_DIR, SCHEMA_VERSION, parse_uri
from mask.storage.redaction import _CREDENTIAL_OPTION_KEYS, REDACTED, is_secret_key, redact, redact_text
from mask.storage.store import S3_MAX_ATTEMPTS, Store, sweep_parts
from mask.storage.version import code_version

__all__ = [
    "FILES_DIR", "MANIFEST", "PARTS_DIR", "REDACTED", "S3_MAX_ATTEMPTS", "SCHEMA_VERSION", "_CREDENTIAL_OPTION_KEYS",
    "ArtifactNotFound", "ArtifactWriter", "StorageError", "Store", "code_version", "fingerprint", "fingerprint_files",
    "is_secret_key", "parse_uri", "redact", "redact_text", "sweep_parts",
]
