"""MLflow helpers: one run per job, flattened and redacted params, metrics, artifacts, registered knowledge.

Everything goes through :class:`mlflow.MlflowClient` with an explicit tracking URI: no global MLflow
state is set, so the helpers behave the same in a job driver, a Ray worker and a test.  Nesting
(``nested=True``) uses this module's own stack of open runs (tag ``mlflow.parentRunId``).

Where the tracking store lives (:func:`tracking_uri`):

* ``tracking.uri`` when set (an MLflow server, ``sqlite:///…``, databricks, …);
* otherwise, for a local storage root, ``sqlite:///<abs root>/mlflow.db`` with run artifacts under
  ``<root>/mlartifacts`` (the embedded default keeps everything under ``./artifacts``);
* otherwise (remote root, no URI) ``./mlflow.db`` — made absolute (``sqlite:////<cwd>/mlflow.db``) so
  that Ray workers in other working directories reach the same file — with one WARNING per root and
  the run param ``tracking.fallback`` recording it; artifacts then go to ``./mlartifacts``.

The knowledge table in the model registry (:func:`register_knowledge`): the registered model
``tracking.registered_model`` gets one version per knowledge artifact, with **source = the artifact's
URI** (MLflow 3 accepts any URI as a version source; the knowledge stays where the pipeline committed
it, nothing is copied) and tags holding the lineage plus ``knowledge_uri``.  An MLflow *server*
refuses local-path sources that are not inside a run's artifact folder; for that case only, the
artifact's manifest is logged to the run as ``knowledge/_MANIFEST.json`` and the version's source is
``runs:/<run_id>/knowledge``, while the ``knowledge_uri`` tag still names the artifact.  Resolution
(:func:`resolve_knowledge`) always returns the ``knowledge_uri`` tag (falling back to the source).
``latest`` is MLflow's built-in alias for the newest version; it cannot be set, and needs not be.

Credentials: params, tags, dicts and texts pass through :func:`mask.storage.redact` — keys that name
a credential lose their value, and AWS key ids, tokens and ``user:password@`` in URIs become ``***``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import numbers
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mask.config import TrackingConfig, flatten
from mask.errors import MaskError
from mask.storage import REDACTED, StorageError, Store, code_version, parse_uri, redact, redact_text

logger = logging.getLogger(__name__)

#: Tracking URI used when the storage root is remote and no ``tracking.uri`` is configured.
FALLBACK_URI = "sqlite:///./mlflow.db"
#: Version tag that holds the knowledge artifact's URI.
KNOWLEDGE_URI_TAG = "knowledge_uri"

# MLflow's limits (mlflow.utils.validation); copied so that importing this module stays light.
_MAX_PARAM_VAL = 6000
_MAX_TAG_VAL = 8000
_MAX_KEY = 250
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_TRUNC = "...[truncated]"

_WARNED: set[str] = set()  # remote roots already warned about (one WARNING per root and process)
_ACTIVE: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("mask_tracking_runs", default=())


class TrackingError(MaskError, ValueError):
    """A tracking/registry request that cannot be served; the message names what was asked."""


class KnowledgeNotFound(TrackingError):
    """No registered knowledge version for a reference (unknown model, alias or version)."""


# --------------------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------------------


def _local_root(storage_root: str) -> str | None:
    """Absolute path of a local storage root, None for a remote one."""
    protocol, path = parse_uri(storage_root)
    return path if protocol == "file" else None


def tracking_uri(cfg: TrackingConfig, storage_root: str) -> str:
    """The MLflow tracking (and registry) URI for a config and a storage root.

    Args:
        cfg: the tracking config.
        storage_root: the storage root URI (``./artifacts``, ``s3://bucket/prefix``).

    Returns:
        ``cfg.uri`` if set; ``sqlite:///<abs root>/mlflow.db`` for a local root;
        ``./mlflow.db`` as an absolute SQLite URI (with a WARNING) for a remote root.
    """
    if cfg.uri:
        return cfg.uri
    root = _local_root(storage_root)
    if root is not None:
        return f"sqlite:///{root}/mlflow.db"
    # Made absolute here, in the driver: Ray workers run in other working directories.
    uri = f"sqlite:///{os.path.abspath('mlflow.db')}"
    if storage_root not in _WARNED:
        _WARNED.add(storage_root)
        logger.warning("storage root %s is remote and tracking.uri is not set: MLflow runs go to the local "
                       "%s = %s (set tracking.uri to an MLflow server to share them)",
                       redact_text(storage_root), FALLBACK_URI, uri)
    return uri


def _is_fallback(cfg: TrackingConfig, storage_root: str) -> bool:
    return not cfg.uri and _local_root(storage_root) is None


def _artifact_location(cfg: TrackingConfig, storage_root: str) -> str | None:
    """Artifact location of a newly created experiment: under a local root; else the store's default."""
    if cfg.uri and not cfg.uri.startswith(("sqlite:", "file:", "/", ".")):
        return None  # an MLflow server decides (proxied artifacts, its own default root)
    root = _local_root(storage_root)
    if root is not None:
        return Path(root, "mlartifacts").as_uri()
    return Path(os.path.abspath("mlartifacts")).as_uri()


def _client(cfg: TrackingConfig, storage_root: str):
    from mlflow import MlflowClient

    uri = tracking_uri(cfg, storage_root)
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        folder = os.path.dirname(os.path.abspath(db))
        os.makedirs(folder, exist_ok=True)  # SQLite cannot create a file in a missing folder
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _experiment_id(client, cfg: TrackingConfig, storage_root: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        try:
            return client.create_experiment(cfg.experiment,
                                            artifact_location=_artifact_location(cfg, storage_root))
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(cfg.experiment)  # created meanwhile by another process
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(f"MLflow experiment {cfg.experiment!r} is deleted; restore it "
                            "(mlflow experiments restore) or set tracking.experiment to another name")
    return exp.experiment_id


# --------------------------------------------------------------------------------------------------
# Sanitising params/tags/metrics
# --------------------------------------------------------------------------------------------------


def _clean_key(key: str) -> str:
    key = re.sub(r"[^/\w.\- :]", "_", str(key))
    key = re.sub(r"/+", "/", key).strip("/") or "_"
    return key[:_MAX_KEY]


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNC)] + _TRUNC


def _as_text(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list | tuple | dict):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def sanitize_params(params: Mapping[str, Any] | None, limit: int = _MAX_PARAM_VAL) -> dict[str, str]:
    """Flatten (``a.b``), redact credentials, stringify and truncate params for MLflow.

    Args:
        params: nested or flat mapping (e.g. ``cfg.model_dump(mode="json")``).
        limit: maximum value length (MLflow's param limit by default).

    Returns:
        ``{dotted key: string value}``, safe to log.
    """
    if not params:
        return {}
    flat = flatten(dict(params))
    out: dict[str, str] = {}
    for k, v in flat.items():
        v = redact(v, str(k))
        out[_clean_key(k)] = _truncate(redact_text(_as_text(v)), limit)
    return out


def _metric_value(key: str, v: Any) -> float:
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
        v = v.item()  # numpy / torch scalars
    if isinstance(v, bool):
        return float(v)
    if not isinstance(v, numbers.Real):
        raise TrackingError(f"metric {key!r}: expected a number, got {type(v).__name__} {v!r}")
    return float(v)


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


class Run:
    """An open MLflow run (through :class:`mlflow.MlflowClient`); see :func:`start_run`.

    Attributes:
        run_id: the MLflow run id.
        tracking_uri: where the run lives (hand it to Ray workers with ``run_id``).
    """

    def __init__(self, client, run_id: str, tracking_uri: str):
        self._client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri

    def __repr__(self) -> str:
        return f"Run({self.run_id!r})"

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (flattened, redacted, truncated); re-logging a key with another value fails in MLflow."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sanitize_params(params).items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i:i + _PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics at ``step`` (0 when None); NaN/inf are logged as they are.

        Raises:
            TrackingError: a value that is not a number (the message names the key).
        """
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(_clean_key(k), _metric_value(k, v), ts, int(step or 0)) for k, v in metrics.items()]
        if any(math.isnan(m.value) for m in items):
            logger.warning("run %s: NaN metric(s) %s at step %s", self.run_id,
                           [m.key for m in items if math.isnan(m.value)], step)
        for i in range(0, len(items), _METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=items[i:i + _METRICS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (redacted, truncated to MLflow's tag limit)."""
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in sanitize_params(tags, _MAX_TAG_VAL).items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=items[i:i + _PARAMS_PER_BATCH])

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Log a JSON/YAML-serialisable object as a run artifact (credentials redacted)."""
        self._client.log_dict(self.run_id, redact(obj), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log text as a run artifact (credential-looking substrings redacted)."""
        self._client.log_text(self.run_id, redact_text(text), artifact_file)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a local file or folder to the run's artifacts."""
        self._client.log_artifact(self.run_id, os.fspath(local_path), artifact_path)


class BufferedRun:
    """A run whose params, tags and step-less metrics are kept in memory and logged by :meth:`flush` in
    as few ``log_batch`` calls as MLflow allows (each call is a database transaction, ~0.05–0.1 s on a
    SQLite store): for short jobs that log many small groups (``jobs/reindex.py``).  Metrics with a step,
    artifacts and dicts go through at once.  Use ``with BufferedRun(run) as run:`` so that what was
    buffered is logged also when the job fails.
    """

    def __init__(self, run):
        self._run = run
        self.run_id = run.run_id
        self.tracking_uri = getattr(run, "tracking_uri", None)
        self._params: dict[str, Any] = {}
        self._metrics: dict[str, Any] = {}
        self._tags: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"BufferedRun({self._run!r})"

    def __enter__(self) -> BufferedRun:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._params.update(params)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if step is not None:
            self._run.log_metrics(metrics, step)
            return
        for k, v in metrics.items():
            _metric_value(k, v)  # a non-number fails here, where it was logged
        self._metrics.update(metrics)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._tags.update(tags)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self._run.log_dict(obj, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._run.log_text(text, artifact_file)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._run.log_artifact(local_path, artifact_path)

    def flush(self) -> None:
        """Log what was buffered (params, then tags, then metrics) and empty the buffers."""
        params, metrics, tags = self._params, self._metrics, self._tags
        self._params, self._metrics, self._tags = {}, {}, {}
        if params:
            self._run.log_params(params)
        if tags:
            self._run.set_tags(tags)
        if metrics:
            self._run.log_metrics(metrics)


class NullRun:
    """The run of a job with tracking disabled: same methods, nothing logged, ``run_id`` None."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def __repr__(self) -> str:
        return "NullRun()"

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass


@contextmanager
def start_run(cfg: TrackingConfig, storage_root: str, run_name: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, Any] | None = None, nested: bool = False) -> Iterator[Run | NullRun]:
    """Open an MLflow run for a job; it ends FINISHED, FAILED (exception) or KILLED (Ctrl-C).

    Creates the experiment ``cfg.experiment`` if missing (artifacts under ``<root>/mlartifacts`` for
    a local store).

    Args:
        cfg: tracking config (``enabled=False`` yields a :class:`NullRun`).
        storage_root: the storage root URI.
        run_name: the run's name (``build_knowledge``, ``score_gallery``, …).
        params: the config (nested or flat); logged flattened, redacted, truncated.
        tags: extra run tags.
        nested: make it a child of the innermost run open through this module.

    Yields:
        A :class:`Run` (or :class:`NullRun`).
    """
    if not cfg.enabled:
        yield NullRun()
        return
    client, uri = _client(cfg, storage_root)
    exp_id = _experiment_id(client, cfg, storage_root)
    stack = _ACTIVE.get()
    run_tags = {"mask.code_version": code_version(), "mask.storage_root": storage_root}
    if nested and stack:
        run_tags["mlflow.parentRunId"] = stack[-1]
    elif nested:
        logger.warning("start_run(%s, nested=True): no open parent run; starting a top-level run", run_name)
    run_tags.update(tags or {})
    safe_tags = sanitize_params(run_tags, _MAX_TAG_VAL)
    mlrun = client.create_run(exp_id, run_name=run_name, tags=safe_tags)
    run = Run(client, mlrun.info.run_id, uri)
    token = _ACTIVE.set((*stack, run.run_id))
    status = "FAILED"
    try:
        if _is_fallback(cfg, storage_root):
            run.log_params({"tracking.fallback": f"{uri} (remote storage root, tracking.uri unset)"})
        if params:
            run.log_params(params)
        logger.info("MLflow run %s (%s) in experiment %s at %s", run.run_id, run_name, cfg.experiment,
                    redact_text(uri))
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _ACTIVE.reset(token)
        try:
            client.set_terminated(run.run_id, status)
        except Exception as e:  # noqa: BLE001 - never hide the job's own error
            logger.warning("could not end MLflow run %s as %s: %s", run.run_id, status, e)


# --------------------------------------------------------------------------------------------------
# Registry: the knowledge table
# --------------------------------------------------------------------------------------------------


def _knowledge_uri(storage_root: str, ref: str) -> str:
    """A knowledge location as a URI: absolute/URI kept (normalised), relative joined to the root."""
    if "://" in ref or os.path.isabs(ref):
        protocol, path = parse_uri(ref)
        return path if protocol == "file" else f"{protocol}://{path}"
    return Store(storage_root).uri(ref.rstrip("/"))


def _version_tags(lineage: Mapping[str, Any], knowledge_uri: str) -> dict[str, str]:
    tags = sanitize_params(lineage, _MAX_TAG_VAL)
    tags[KNOWLEDGE_URI_TAG] = redact_text(knowledge_uri)
    tags.setdefault("mask.code_version", code_version())
    return tags


def _knowledge_manifest(knowledge_uri: str) -> dict[str, Any]:
    try:
        m = Store(knowledge_uri).read_json("_MANIFEST.json")
        return redact(m) if isinstance(m, dict) else {"manifest": redact(m)}
    except (FileNotFoundError, StorageError) as e:
        logger.warning("knowledge %s has no readable manifest (%s); registering its URI only", knowledge_uri, e)
        return {}


def register_knowledge(cfg: TrackingConfig, storage_root: str, knowledge_uri: str, run_id: str | None,
                       lineage: Mapping[str, Any], aliases: list[str] | tuple[str, ...] = ("latest",)) -> str | None:
    """Register a committed knowledge artifact as a new version of ``cfg.registered_model``.

    Args:
        cfg: tracking config; when disabled nothing is registered and None is returned.
        storage_root: the storage root (a relative ``knowledge_uri`` is joined to it).
        knowledge_uri: URI of the knowledge artifact folder (``s3://b/p/knowledge/v1``, ``/abs/...``).
        run_id: the MLflow run that built it (recorded on the version), or None.
        lineage: version tags, e.g. ``{"features_uri": …, "training_run_id": …, "config_hash": …}``.
        aliases: aliases to point at the new version (``champion``, …); ``latest`` is MLflow's
            built-in alias for the newest version and is not set explicitly.

    Returns:
        The new model version (a string such as ``"3"``), or None when tracking is disabled.

    Raises:
        TrackingError: an alias MLflow refuses (bad characters, ``v<digits>``).
    """
    if not cfg.enabled:
        logger.info("tracking disabled: knowledge %s is not registered", knowledge_uri)
        return None
    from mlflow.exceptions import MlflowException

    uri = _knowledge_uri(storage_root, knowledge_uri)
    for alias in aliases:
        bad_chars = alias.lower() != "latest" and not re.fullmatch(r"[\w\-]+", alias)
        if bad_chars or re.fullmatch(r"[vV]\d+", alias):
            raise TrackingError(f"alias {alias!r} is not allowed (letters, digits, '_' and '-'; "
                                "'v<digits>' is reserved for versions)")
    client, _ = _client(cfg, storage_root)
    name = cfg.registered_model
    try:
        client.create_registered_model(name, description="MASK knowledge tables (word, word vector, prototype)")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = _version_tags(lineage, uri)
    try:
        mv = client.create_model_version(name, source=uri, run_id=run_id, tags=tags)
    except MlflowException as e:
        if e.error_code != "INVALID_PARAMETER_VALUE" or "source" not in str(e).lower():
            raise
        # An MLflow server refuses a local path outside the run's artifacts: keep the knowledge where
        # it is, log its manifest into the run and register that (the tag still names the artifact).
        logger.info("registry refused source %s (%s); registering the run's copy of its manifest instead",
                    uri, e.message)
        if run_id is None:
            exp_id = _experiment_id(client, cfg, storage_root)
            run_id = client.create_run(exp_id, run_name="register_knowledge",
                                       tags={KNOWLEDGE_URI_TAG: tags[KNOWLEDGE_URI_TAG]}).info.run_id
            client.set_terminated(run_id, "FINISHED")
        client.log_dict(run_id, {KNOWLEDGE_URI_TAG: tags[KNOWLEDGE_URI_TAG], **_knowledge_manifest(uri)},
                        "knowledge/_MANIFEST.json")
        mv = client.create_model_version(name, source=f"runs:/{run_id}/knowledge", run_id=run_id, tags=tags)
    for alias in aliases:
        if alias.lower() == "latest":
            continue
        client.set_registered_model_alias(name, alias, mv.version)
    logger.info("registered %s version %s -> %s (aliases %s)", name, mv.version, uri, list(aliases))
    return str(mv.version)


_MODELS_RE = re.compile(r"^models:/(?P<name>[^@/]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))$")


def resolve_knowledge(cfg: TrackingConfig, storage_root: str, ref: str) -> str:
    """Turn a knowledge reference into the artifact's URI.

    Args:
        cfg: tracking config (its ``registered_model`` serves ``@alias``).
        storage_root: the storage root (relative paths are joined to it).
        ref: ``knowledge/v1`` (relative), ``/abs/path``, ``s3://b/p/knowledge/v1``,
            ``@champion`` / ``@latest``, ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.

    Returns:
        The knowledge artifact's URI (absolute local path or ``s3://…``).

    Raises:
        KnowledgeNotFound: unknown registered model, alias or version (named in the message).
        TrackingError: a malformed ``models:/`` reference, or a registry reference with tracking disabled.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise TrackingError(f"knowledge reference must be a non-empty string, got {ref!r}")
    ref = ref.strip()
    name = alias = version = None
    if ref.startswith("@"):
        name, alias = cfg.registered_model, ref[1:]
    elif ref.startswith("models:"):
        m = _MODELS_RE.match(ref)
        if not m:
            raise TrackingError(f"knowledge reference {ref!r}: expected models:/<name>@<alias> or "
                                "models:/<name>/<version>")
        name, alias, version = m["name"], m["alias"], m["version"]
        if version is not None and not version.isdigit():
            if version.lower() != "latest":
                raise TrackingError(f"knowledge reference {ref!r}: version {version!r} is not a number")
            alias, version = "latest", None
    else:
        try:
            return _knowledge_uri(storage_root, ref)
        except StorageError as e:
            raise TrackingError(f"knowledge reference {ref!r}: {e}") from None
    if not alias and version is None:
        raise TrackingError(f"knowledge reference {ref!r}: empty alias")
    if not cfg.enabled:
        raise TrackingError(f"cannot resolve knowledge reference {ref!r}: tracking is disabled "
                            "(give the knowledge artifact's path or URI instead)")
    from mlflow.exceptions import MlflowException

    client, _ = _client(cfg, storage_root)
    try:
        if version is not None:
            mv = client.get_model_version(name, version)
        else:
            mv = client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise
        what = f"version {version}" if version is not None else f"alias {alias!r}"
        raise KnowledgeNotFound(f"knowledge reference {ref!r}: registered model {name!r} has no {what} "
                                f"({e.message})") from None
    uri = (mv.tags or {}).get(KNOWLEDGE_URI_TAG) or mv.source
    if REDACTED in uri:
        raise TrackingError(f"knowledge reference {ref!r}: version {mv.version} has a redacted URI {uri!r}")
    logger.info("knowledge %s -> %s version %s: %s", ref, name, mv.version, uri)
    return uri
