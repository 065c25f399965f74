"""Region features on Ray Data: images → decode (CPU) → detector (actor pool) → Parquet parts.

Stages are callable classes (the model is loaded once per actor in ``__init__``); resources are
declared where ``map_batches`` is called.  The write stage writes one Parquet part per batch, named
by the hash of the batch's image ids, so a retried batch overwrites its own part and never duplicates
an image.  Parts go to ``parts/run-<id>/`` and only enter the artifact when the driver commits the
manifest (last), so a crashed run leaves nothing a reader takes; a rerun skips committed images.
When the pipeline fails part-way, the driver first commits the parts that were finished, so the
rerun resumes from them.

Fault tolerance is Ray's own: a detector actor that dies is restarted (``detector.max_restarts``)
and its in-flight batches are retried on the new actor (``max_task_retries``); decode and write
tasks are retried by Ray's task retries.  Tests kill an actor through :mod:`mask.faults` (``detect_batch``).

On CPU-only clusters each detector actor reserves one CPU in Ray (so decode and write tasks keep
CPUs to run on), but runs torch with ``detector.cpu_threads`` threads (default: the cluster's CPUs
shared among the actors); left alone, Ray would pin it to ``OMP_NUM_THREADS=1``.

Artifact: ``features/<dataset>/<extractor>/`` with one row per image:
``image_id, boxes (list<float32>, n×4 xyxy original pixels), features (list<float16>, n×D),
num_boxes, feature_dim, image_h, image_w, object_labels, object_scores, attr_labels, attr_scores``
and, for given boxes, ``region_ids`` (the kept boxes' ids).  Failures: ``…/_errors/`` with
``image_id, uri, stage, error, message``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from mask.config import DetectorConfig, MaskConfig
from mask.faults import driver_spec, exit_point
from mask.features.extractor import RegionExtractor, spec_from_config
from mask.features.images import ImageError, decode_image, resize_for_detector
from mask.lease import Lease, holder_alive
from mask.pipeline.identity import extractor_name, features_rel
from mask.pipeline.resources import actor_device, ensure_gpus, node_id, pool_args
from mask.sources import source_stamps
from mask.storage import Store, sweep_parts

logger = logging.getLogger(__name__)

#: Folder (inside the features artifact) of the per-run leases that tell a live run's parts from a dead one's.
RUNS_DIR = "_runs"

FEATURES_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("boxes", pa.list_(pa.float32())),
    ("features", pa.list_(pa.float16())),
    ("num_boxes", pa.int32()),
    ("feature_dim", pa.int32()),
    ("image_h", pa.int32()),
    ("image_w", pa.int32()),
    ("object_labels", pa.list_(pa.int32())),
    ("object_scores", pa.list_(pa.float32())),
    ("attr_labels", pa.list_(pa.int32())),
    ("attr_scores", pa.list_(pa.float32())),
    ("region_ids", pa.list_(pa.string())),
    ("source_stamp", pa.string()),
    ("content_sha256", pa.string()),
])
#: Columns of a features row that describe the image's source, not its features (kept on error rows too).
SOURCE_COLUMNS = ("source_stamp", "content_sha256")

DETECTOR_FILE = "detector.safetensors"

ERRORS_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("uri", pa.string()),
    ("stage", pa.string()),
    ("error", pa.string()),
    ("message", pa.string()),
    ("source_stamp", pa.string()),
    ("content_sha256", pa.string()),
])


def _batch_part_name(image_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(image_ids)).encode()).hexdigest()[:24]


def decode_batch(batch: dict[str, np.ndarray], storage_options: dict[str, Any],
                 det_cfg: dict[str, Any]) -> dict[str, Any]:
    """CPU stage (Ray tasks): read image bytes from any URI, decode, resize + normalise for the detector.

    Failures become error rows (``stage``, ``error``, ``message``), never exceptions.
    """
    det = DetectorConfig.model_validate(det_cfg)
    pixel_mean = spec_from_config(det).pixel_mean_bgr
    n = len(batch["image_id"])
    blobs: list[np.ndarray] = []
    cols: dict[str, list] = {"scale": [], "image_h": [], "image_w": [], "stage": [], "error": [], "message": [],
                             "content_sha256": []}
    for i in range(n):
        uri = str(batch["uri"][i])
        digest = ""
        try:
            data = read_uri(uri, storage_options)
            digest = hashlib.sha256(data).hexdigest()
            img = decode_image(data, max_pixels=det.max_pixels, source=uri)
            blob, scale = resize_for_detector(img, det.min_size, det.max_size, pixel_mean)
            blobs.append(blob)
            vals = [scale, img.shape[0], img.shape[1], "", "", "", digest]
        except ImageError as e:
            blobs.append(np.zeros((3, 1, 1), np.float32))
            vals = [1.0, 0, 0, e.stage, type(e).__name__, str(e), digest]
        for k, v in zip(cols, vals, strict=True):
            cols[k].append(v)
    out = dict(batch)
    if "region_ids" in out:
        # numpy batches hold list<string> as object arrays of object arrays, which Ray Data cannot turn back
        # into Arrow (it pickles the column, with a warning); Python lists convert to list<string>
        out["region_ids"] = _object_array([[str(x) for x in r] for r in out["region_ids"]])
    out["blob"] = _object_array(blobs)
    for k, v in cols.items():
        out[k] = np.array(v, dtype=object if k in ("stage", "error", "message", "content_sha256") else None)
    return out


def read_uri(uri: str, options: dict[str, Any]) -> bytes:
    """Bytes of a local path or URI; a missing or unreadable file raises ImageError (stage ``read``)."""
    import fsspec

    try:
        with fsspec.open(uri, "rb", **(options if uri.startswith("s3://") else {})) as f:
            return f.read()
    except FileNotFoundError as e:
        raise ImageError("read", f"{uri}: file not found", source=uri) from e
    except (OSError, ValueError) as e:
        raise ImageError("read", f"{uri}: cannot read: {e}", source=uri) from e


def _object_array(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        arr[i] = x
    return arr


class DetectStage:
    """Actor stage: one detector per actor, batched forward over the decoded images.

    Args:
        det_cfg: the detector config (dumped).
        weights: (storage root, options, artifact) of committed detector weights, or None.
        cpu_threads: torch threads of this actor (None: leave torch's/Ray's setting).
        fault: a :mod:`mask.faults` spec (tests), or "".
    """
    def __init__(self, det_cfg: dict[str, Any], weights: tuple[str, dict, str] | None,
                 cpu_threads: int | None = None, fault: str = ""):
        self.fault = fault
        self.batches = 0
        cfg = DetectorConfig.model_validate(det_cfg)
        device = actor_device(cfg.device, "detector", cpu_threads or cfg.cpu_threads, cfg.pool_sizes()[1])
        cfg = cfg.model_copy(update={"device": device.type})
        self.node = node_id()
        state = None
        if weights is not None:  # (storage root, options, artifact) of committed detector weights
            root, options, rel = weights
            state = Store(root, options).read_file(rel, DETECTOR_FILE)
        self.extractor = RegionExtractor.from_config(cfg, state_dict_bytes=state)
        self.given = cfg.mode == "given"

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        self.batches += 1
        exit_point("detect_batch", self.batches, self.fault)
        n = len(batch["image_id"])
        ok = [i for i in range(n) if not batch["error"][i]]
        results: dict[int, dict] = {}
        if ok:
            blobs = [np.asarray(batch["blob"][i], np.float32) for i in ok]
            scales = [float(batch["scale"][i]) for i in ok]
            sizes = [(int(batch["image_h"][i]), int(batch["image_w"][i])) for i in ok]
            boxes = None
            if self.given:
                boxes = [np.asarray(batch["boxes_in"][i], np.float32).reshape(-1, 4) for i in ok]
            try:
                outs = self.extractor.extract_prepared(blobs, scales, sizes, boxes)
                results = dict(zip(ok, outs, strict=True))
            except Exception as e:  # a batch that fails whole: retry one by one to isolate the culprit
                logger.warning("detector batch failed (%s); retrying images one by one", e)
                for j, i in enumerate(ok):
                    try:
                        b = None if boxes is None else [boxes[j]]
                        results[i] = self.extractor.extract_prepared([blobs[j]], [scales[j]], [sizes[j]], b)[0]
                    except Exception as e1:  # recorded as this image's error
                        results[i] = {"error": f"{type(e1).__name__}: {e1}"}
        out = _detect_columns(batch, results, self.given)
        # provenance: the node this batch was detected on (not a features column; the write stage reports it)
        return out.append_column("detect_node", pa.array([self.node] * out.num_rows, pa.string()))


def _detect_columns(batch: dict[str, Any], results: dict[int, dict], given: bool) -> pa.Table:
    """The detector's output batch as an Arrow table: the features columns + ``uri, stage, error, message``.

    Arrow straight away (list columns built from flat numpy buffers), so neither Ray Data nor the
    write stage converts the features element by element.
    """
    n = len(batch["image_id"])
    cols: dict[str, list] = {k: [] for k in FEATURES_SCHEMA.names}
    cols.update(uri=[], stage=[], error=[], message=[])
    for i in range(n):
        cols["image_id"].append(str(batch["image_id"][i]))
        cols["uri"].append(str(batch["uri"][i]))
        for k in SOURCE_COLUMNS:
            v = batch[k][i] if k in batch else None
            cols[k].append(None if v is None or v == "" else str(v))
        res = results.get(i)
        err = batch["error"][i]
        if res is not None and "error" in res:
            cols["stage"].append("detect")
            cols["error"].append("DetectorError")
            cols["message"].append(f"{batch['uri'][i]}: {res['error']}")
            res = None
        elif res is None:
            cols["stage"].append(batch["stage"][i])
            cols["error"].append(err)
            cols["message"].append(batch["message"][i])
        elif len(res["boxes"]) == 0:
            cols["stage"].append("boxes")
            cols["error"].append("NoValidBoxes" if given else "NoBoxes")
            cols["message"].append(
                f"{batch['uri'][i]}: none of its {len(batch['boxes_in'][i]) // 4} ground-truth boxes is valid "
                "inside the image" if given else f"{batch['uri'][i]}: the detector found no box in the image")
            res = None
        else:
            cols["stage"].append("")
            cols["error"].append("")
            cols["message"].append("")
        if res is None:
            for k in FEATURES_SCHEMA.names[1:]:
                if k not in SOURCE_COLUMNS:
                    cols[k].append(None)
            continue
        feats = np.asarray(res["features"], np.float16)
        cols["boxes"].append(np.asarray(res["boxes"], np.float32).reshape(-1))
        cols["features"].append(feats.reshape(-1))
        cols["num_boxes"].append(int(feats.shape[0]))
        cols["feature_dim"].append(int(feats.shape[1]) if feats.ndim == 2 else 0)
        h, w = res["image_size"]
        cols["image_h"].append(int(h))
        cols["image_w"].append(int(w))
        for k in ("object_labels", "attr_labels"):
            cols[k].append(np.asarray(res.get(k, []), np.int32))
        for k in ("object_scores", "attr_scores"):
            cols[k].append(np.asarray(res.get(k, []), np.float32))
        if given:
            ids = np.asarray(batch["region_ids"][i], dtype=object)
            kept = res.get("kept_indices")
            if kept is None:
                kept = np.arange(len(ids))
            cols["region_ids"].append([str(ids[k]) for k in kept])
        else:
            cols["region_ids"].append([])
    arrays = {}
    for k in FEATURES_SCHEMA.names:
        t = FEATURES_SCHEMA.field(k).type
        arrays[k] = _list_array(cols[k], t) if pa.types.is_list(t) else pa.array(cols[k], type=t)
    for k in ("uri", "stage", "error", "message"):
        arrays[k] = pa.array([str(x) for x in cols[k]], type=pa.string())
    return pa.table(arrays)


def _list_array(rows: list, typ: pa.ListType) -> pa.Array:
    """A ``list<…>`` array from per-row sequences (None = a null row) via one flat buffer and offsets."""
    lengths = np.array([0 if r is None else r.size if isinstance(r, np.ndarray) else len(r) for r in rows], np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    vt = typ.value_type
    if pa.types.is_string(vt):
        flat = pa.array([x for r in rows if r is not None for x in r], type=vt)
    else:
        parts = [np.asarray(r).reshape(-1) for r in rows if r is not None]
        dtype = vt.to_pandas_dtype()
        values = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
        if pa.types.is_float16(vt):  # pyarrow converts float16 numpy arrays value by value; reinterpret the bits
            flat = pa.array(values.view(np.uint16), type=pa.uint16()).view(vt)
        else:
            flat = pa.array(values, type=vt)
    mask = pa.array(np.array([r is None for r in rows], bool))
    return pa.ListArray.from_arrays(offsets, flat, type=typ, mask=mask)


def write_batch(batch: pa.Table, root: str, options: dict[str, Any], rel: str, run_dir: str) -> dict[str, Any]:
    """Write stage (Ray tasks, Arrow batches): one batch as a Parquet part (+ an errors part).

    Returns:
        Its metadata row: part names, row counts and the errors counted by ``stage.error`` (JSON).
    """
    import pyarrow.compute as pc

    store = Store(root, options)
    failed = pc.not_equal(batch["error"], "")
    good = batch.filter(pc.invert(failed)).select(FEATURES_SCHEMA.names).cast(FEATURES_SCHEMA)
    bad = batch.filter(failed).select(ERRORS_SCHEMA.names).cast(ERRORS_SCHEMA)
    name = _batch_part_name([str(x) for x in batch["image_id"].to_pylist()])
    out_name = err_name = ""
    if good.num_rows:
        out_name = f"{run_dir}/{name}.parquet"
        store.write_parquet(f"{rel}/parts/{out_name}", good)
    if bad.num_rows:
        err_name = f"{run_dir}/{name}.parquet"
        store.write_parquet(f"{rel}/_errors/parts/{err_name}", bad)
    node = batch["detect_node"][0].as_py() if "detect_node" in batch.column_names and batch.num_rows else ""
    kinds: dict[str, int] = {}
    for st, er in zip(bad["stage"].to_pylist(), bad["error"].to_pylist(), strict=True):
        kinds[f"{st}.{er}"] = kinds.get(f"{st}.{er}", 0) + 1
    return {"part": np.array([out_name]), "rows": np.array([good.num_rows]),
            "errors_part": np.array([err_name]), "error_rows": np.array([bad.num_rows]),
            "error_kinds": np.array([json.dumps(kinds, sort_keys=True)]),
            "image_ids": np.array([json.dumps([str(x) for x in batch["image_id"].to_pylist()])]),
            "node": np.array([node])}


def committed_image_ids(store: Store, rel: str) -> set[str]:
    """Image ids already in the committed features (and errors) of an artifact."""
    done: set[str] = set()
    for r in (rel, f"{rel}/_errors"):
        if store.manifest(r) is not None:
            done.update(store.read_table(r, columns=["image_id"]).column("image_id").to_pylist())
    return done


def committed_stamps(store: Store, rel: str) -> dict[str, set[str | None]]:
    """Image id → the source stamps its committed rows (features and errors) were extracted from."""
    out: dict[str, set[str | None]] = {}
    for r in (rel, f"{rel}/_errors"):
        if store.manifest(r) is not None:
            t = store.read_table(r, columns=["image_id", "source_stamp"])
            for i, st in zip(t.column("image_id").to_pylist(), t.column("source_stamp").to_pylist(), strict=True):
                out.setdefault(i, set()).add(st)
    return out


def _stale_rows(current: dict[str, str | None]):
    """Predicate for :meth:`ArtifactWriter.retire_rows`: rows of the images of ``current`` whose recorded
    stamp is not the current one (the image's bytes changed and it was extracted again)."""
    def stale(t: pa.Table) -> np.ndarray:
        ids = t.column("image_id").to_pylist()
        stamps = t.column("source_stamp").to_pylist()
        return np.fromiter((i in current and current[i] is not None and s is not None and s != current[i]
                            for i, s in zip(ids, stamps, strict=True)), bool, len(ids))
    return stale


def sweep_dead_runs(store: Store, rel: str, ttl_s: float) -> dict[str, int]:
    """Delete the uncommitted parts of extraction runs that died (features and errors), and their leases.

    A run is dead when its lease (``<rel>/_runs/<run>``, :mod:`mask.lease`) is released or expired, or
    its holder was a process of this host that is gone; runs without a lease (written before leases
    existed) when their newest part is older than ``ttl_s``.  A live run's parts are never touched.
    """
    verdict: dict[str, bool] = {}

    def dead(run: str, newest: float) -> bool:
        if run not in verdict:
            alive = holder_alive(store, f"{rel}/{RUNS_DIR}/{run}")
            verdict[run] = (time.time() - newest > ttl_s) if alive is None else not alive
        return verdict[run]

    total = {"orphans": 0, "retired": 0, "runs": 0}
    for r in (rel, f"{rel}/_errors"):
        for k, v in sweep_parts(store, r, dead, grace_s=ttl_s).items():
            total[k] += v
    for run in store.list(f"{rel}/{RUNS_DIR}"):
        alive = holder_alive(store, f"{rel}/{RUNS_DIR}/{run}")
        if alive is False:
            store.delete(f"{rel}/{RUNS_DIR}/{run}")
    if total["orphans"]:
        logger.warning("features %s: swept %d part files that runs killed before their commit left behind "
                       "(%d runs)", store.uri(rel), total["orphans"], total["runs"])
    return total


def run_extraction(cfg: MaskConfig, store: Store, dataset: str, images: pa.Table,
                   regions: pa.Table | Callable[[list[str]], pa.Table] | None = None,
                   detector_weights: str | None = None,
                   det: DetectorConfig | None = None, tracker: Any = None) -> dict[str, Any]:
    """Extract region features for every image of ``images`` not yet committed, or changed since.

    Progress is committed as it goes: the finished batches are appended to the artifacts' manifests
    every ``detector.commit_every_batches`` batches or ``detector.commit_every_s`` seconds (each append
    one atomic manifest write, after its parts are complete), so a rerun after the driver was killed
    skips every committed image.  Each run holds a lease (``<artifact>/_runs/<run>``); a run first
    sweeps the uncommitted parts of dead runs (:func:`sweep_dead_runs`).

    Change detection (:mod:`mask.sources`): each row records its image's source stamp (size + mtime /
    ETag) and the SHA-256 of the bytes decoded.  An image whose current stamp differs from every
    committed row's is extracted again, and its old rows (features or ``_errors``) are dropped in the
    same commit that adds the new one: a repaired file leaves ``_errors``, a replaced photo gets new
    features.

    Args:
        cfg: the job config (ray, storage, detector).
        store: storage root.
        dataset: dataset name (artifact folder).
        images: table with ``image_id``, ``uri``.
        regions: ground-truth regions (``image_id, region_id, box``) for mode "given".
        detector_weights: artifact holding the detector's safetensors (None: the config's weights).
        det: detector config overriding ``cfg.detector`` (e.g. mode "given" for VG).
        tracker: an open tracking run (``log_metrics``, ``log_dict``) or None.

    Returns:
        Summary: artifact URI, counts (images, done before, changed, extracted, errors and errors by
        ``stage.error``, commits, swept parts), actors and threads, seconds, images/s.

    Raises:
        Whatever the Ray Data pipeline raised (after committing the batches that had finished).
    """
    det = det or cfg.detector
    rel = features_rel(dataset, det)
    swept = sweep_dead_runs(store, rel, det.run_ttl_s)
    plan = _plan_extraction(cfg, store, rel, images)
    todo = plan.todo
    if det.mode == "given":
        if regions is None:
            raise ValueError(f"detector mode 'given' needs ground-truth regions for dataset {dataset!r}")
        if callable(regions):  # read only the regions of the images still to extract
            regions = regions(todo.column("image_id").to_pylist()) if todo.num_rows else None
        todo = _attach_boxes(todo, regions) if regions is not None else todo
    if plan.changed:
        logger.info("features %s: %d images changed since they were extracted (new source stamp); extracting "
                    "them again", dataset, len(plan.changed))
    summary: dict[str, Any] = {"features_uri": store.uri(rel), "images": len(plan.ids),
                               "done_before": len(plan.ids) - todo.num_rows, "changed": len(plan.changed),
                               "swept_parts": swept["orphans"], "commits": 0}
    t0 = time.perf_counter()
    commits = _ExtractionCommits(store, rel, dataset, det, plan, summary, tracker)
    if todo.num_rows:
        ensure_gpus(cfg, "detector.num_gpus", det.num_gpus)
        lo, hi = det.pool_sizes()
        summary.update(min_actors=lo, max_actors=hi, gpus_per_actor=det.num_gpus, cpus_per_actor=det.num_cpus)
        _run_pipeline(cfg, det, store, rel, dataset, todo, detector_weights, commits)
    secs = time.perf_counter() - t0
    metas = commits.metas
    if not todo.num_rows:
        commits.commit()  # creates empty artifacts on a first run with nothing to do; drops settled stale rows
    kinds = _error_kinds(metas)
    summary.update(_batch_summary(metas, kinds, secs))
    _log_extraction(tracker, dataset, summary, kinds)
    return summary


class _ExtractionPlan:
    """Which images of a run are still to extract: ``todo`` (with its ``source_stamp`` column), the
    ``changed`` ones (committed from another source stamp), and ``settled_stale`` ones (a current row
    and a stale one: a run that died between its two commits)."""

    def __init__(self, ids: list[str], current: dict[str, str | None], todo: pa.Table,
                 changed: set[str], settled_stale: set[str]):
        self.ids = ids
        self.current = current
        self.todo = todo
        self.changed = changed
        self.settled_stale = settled_stale


def _plan_extraction(cfg: MaskConfig, store: Store, rel: str, images: pa.Table) -> _ExtractionPlan:
    """Compare ``images``' current source stamps with the committed rows of ``rel``: what is left to do."""
    have = committed_stamps(store, rel)
    ids = images.column("image_id").to_pylist()
    stamps = source_stamps([str(u) for u in images.column("uri").to_pylist()], cfg.storage.options)
    current = dict(zip(ids, stamps, strict=True))

    def done(i: str) -> bool:
        got = have.get(i)
        return got is not None and (current[i] is None or current[i] in got or None in got)

    todo_mask = np.array([not done(i) for i in ids], dtype=bool)
    changed = {i for i, t in zip(ids, todo_mask, strict=True) if t and i in have}
    # images with a current row and a stale one (a run that died between its two commits): cleaned now
    settled_stale = {i for i in ids if i in have and done(i) and current[i] is not None and len(have[i]) > 1}
    todo = images.filter(pa.array(todo_mask)).append_column(
        "source_stamp", pa.array([s for s, t in zip(stamps, todo_mask, strict=True) if t], pa.string()))
    return _ExtractionPlan(ids, current, todo, changed, settled_stale)


class _ExtractionCommits:
    """The driver's commit state: the metadata rows of the finished batches (``metas``), how many of
    them are committed, and :meth:`commit`, which appends the rest to the features and ``_errors``
    artifacts (one atomic manifest write each) and retires the rows they supersede."""

    def __init__(self, store: Store, rel: str, dataset: str, det: DetectorConfig, plan: _ExtractionPlan,
                 summary: dict[str, Any], tracker: Any):
        self.store, self.rel, self.dataset, self.det = store, rel, dataset, det
        self.plan, self.summary, self.tracker = plan, summary, tracker
        self.metas: list[dict] = []
        self.committed_upto = 0
        self.settled_stale = plan.settled_stale
        self.run_dir = f"run-{uuid.uuid4().hex[:12]}"

    def pending(self) -> int:
        """Finished batches not committed yet."""
        return len(self.metas) - self.committed_upto

    def commit(self) -> None:
        new = self.metas[self.committed_upto:]
        parts = sorted({m["part"] for m in new if m["part"]})
        err_parts = sorted({m["errors_part"] for m in new if m["errors_part"]})
        settled = {i for m in new for i in json.loads(m["image_ids"]) if i in self.plan.changed} | self.settled_stale
        retire = _stale_rows({i: self.plan.current[i] for i in settled}) if settled else None
        store, rel, det, tracker, run_dir = self.store, self.rel, self.det, self.tracker, self.run_dir
        _commit(store, rel, parts, kind="features", config_hash=extractor_name(det), schema=FEATURES_SCHEMA,
                inputs={"dataset": self.dataset, "images": len(self.plan.ids)}, tracker=tracker, retire=retire,
                into=run_dir)
        _commit(store, f"{rel}/_errors", err_parts, kind="features.errors", config_hash=extractor_name(det),
                schema=ERRORS_SCHEMA, inputs={"dataset": self.dataset}, tracker=tracker, retire=retire,
                into=run_dir)
        self.committed_upto = len(self.metas)
        self.settled_stale = set()
        self.summary["commits"] += 1


def _run_pipeline(cfg: MaskConfig, det: DetectorConfig, store: Store, rel: str, dataset: str, todo: pa.Table,
                  detector_weights: str | None, commits: _ExtractionCommits) -> None:
    """Run the Ray Data pipeline over ``todo`` under this run's lease, committing as batches finish (and
    the finished ones when it fails)."""
    weights = None if detector_weights is None else (cfg.storage.root, cfg.storage.options, detector_weights)
    run_dir = commits.run_dir
    lease = Lease(store, f"{rel}/{RUNS_DIR}/{run_dir}", det.run_ttl_s).acquire()
    finished = False
    try:
        ds = _features_pipeline(cfg, det, rel, todo, weights, run_dir)
        last = time.monotonic()
        try:
            for row in ds.iter_rows():
                commits.metas.append(row)
                if (commits.pending() >= det.commit_every_batches
                        or time.monotonic() - last >= det.commit_every_s):
                    commits.commit()
                    last = time.monotonic()
        except BaseException:
            logger.error("features %s: the pipeline failed after %d finished batches; committing those so a "
                         "rerun resumes from them", dataset, len(commits.metas))
            commits.commit()
            raise
        commits.commit()
        finished = True
    finally:
        lease.release()
        if finished:  # every part of this run is committed: nothing for a sweep, the lease goes
            store.delete(f"{rel}/{RUNS_DIR}/{run_dir}")


def _features_pipeline(cfg: MaskConfig, det: DetectorConfig, rel: str, todo: pa.Table,
                       weights: tuple[str, dict, str] | None, run_dir: str) -> Any:
    """The lazy Ray Data pipeline decode → detect (actor pool) → write over ``todo``; yields one metadata
    row per batch (:func:`write_batch`)."""
    import ray

    bs = det.batch_size
    retries = {"max_restarts": det.max_restarts}
    if det.max_restarts != 0:
        # A batch is retried for as long as its actor can be restarted (Ray Data's own default): retries
        # stay bounded by max_restarts, since a task on an actor that is dead for good fails.  A fixed
        # count is spent in seconds on a lost node ("actor unavailable" until Ray notices the node is
        # gone and restarts the actor elsewhere), which failed the job on the simulated cluster.
        retries["max_task_retries"] = -1
    # one block per batch, so decode and detection overlap and a retried block is one batch
    ds = ray.data.from_arrow([todo.slice(i, bs) for i in range(0, todo.num_rows, bs)])
    ds = ds.map_batches(decode_batch, fn_kwargs={"storage_options": cfg.storage.options,
                                                 "det_cfg": det.model_dump()},
                        batch_size=bs, num_cpus=0.5)
    with warnings.catch_warnings():
        # max_restarts / max_task_retries have no named map_batches parameter in Ray 2.60; the
        # remote-args kwargs that carry them are deprecated (removal announced for Ray 2.64).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        ds = ds.map_batches(DetectStage,
                            fn_constructor_args=(det.model_dump(), weights, None, driver_spec()),
                            batch_size=bs, **pool_args(det), **retries)
    return ds.map_batches(write_batch, fn_kwargs={"root": cfg.storage.root, "options": cfg.storage.options,
                                                  "rel": rel, "run_dir": run_dir},
                          batch_size=bs, batch_format="pyarrow", num_cpus=0.25)


def _error_kinds(metas: list[dict]) -> dict[str, int]:
    """Errors counted by ``stage.error`` over the batches' metadata rows."""
    kinds: dict[str, int] = {}
    for m in metas:
        for k, v in json.loads(m["error_kinds"]).items():
            kinds[k] = kinds.get(k, 0) + v
    return kinds


def _batch_summary(metas: list[dict], kinds: dict[str, int], secs: float) -> dict[str, Any]:
    """The summary's counts over the batches' metadata rows: extracted, errors, nodes, throughput."""
    by_node: dict[str, int] = {}
    for m in metas:
        by_node[str(m.get("node", ""))] = by_node.get(str(m.get("node", "")), 0) + 1
    n_ok = int(sum(m["rows"] for m in metas))
    n_err = int(sum(m["error_rows"] for m in metas))
    return dict(extracted=n_ok, errors=n_err, errors_by_kind=dict(sorted(kinds.items())),
                batches_by_node=dict(sorted(by_node.items())), nodes=len(by_node),
                batch_nodes=[{"node": str(m.get("node", "")), "part": str(m["part"] or m["errors_part"]),
                              "images": int(m["rows"]) + int(m["error_rows"])} for m in metas],
                seconds=round(secs, 3),
                images_per_s=round((n_ok + n_err) / secs, 3) if secs > 0 and metas else 0.0)


def _log_extraction(tracker: Any, dataset: str, summary: dict[str, Any], kinds: dict[str, int]) -> None:
    """The run's summary to the tracker (numbers as metrics, the whole as ``extract_<dataset>.json``) and the log."""
    if tracker is not None:
        metrics = {f"extract.{dataset}.{k}": float(v) for k, v in summary.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        metrics.update({f"extract.{dataset}.errors.{k}": float(v) for k, v in kinds.items()})
        tracker.log_metrics(metrics)
        if hasattr(tracker, "log_dict"):
            tracker.log_dict(summary, f"extract_{dataset}.json")
    logger.info("features %s: %s", dataset, {k: v for k, v in summary.items() if k != "batch_nodes"})


def _commit(store: Store, rel: str, parts: list[str], *, kind: str, config_hash: str, schema: pa.Schema,
            inputs: dict, tracker: Any, retire=None, into: str = "") -> None:
    """Append the parts written by this run to the artifact and commit its manifest (last); ``retire``
    drops superseded rows of committed parts in the same manifest write."""
    if not parts and retire is None and store.manifest(rel) is not None:
        return
    with store.open_artifact(rel, kind=kind, config_hash=config_hash, inputs=inputs, append=True) as w:
        for p in parts:
            w.add_existing_part(p)
        if retire is not None:
            w.retire_rows(["image_id", "source_stamp"], retire, into=into)
        if not parts and store.manifest(rel) is None:
            w.write_part(schema.empty_table(), name="empty")
        w.commit(mlflow_run_id=getattr(tracker, "run_id", None))


def _attach_boxes(images: pa.Table, regions: pa.Table) -> pa.Table:
    """Group ground-truth regions per image: ``boxes_in`` (flattened xyxy) and ``region_ids``."""
    by_image: dict[str, tuple[list, list]] = {}
    rid = regions.column("region_id").to_pylist()
    img = regions.column("image_id").to_pylist()
    box = regions.column("box").to_pylist()
    for r, i, b in zip(rid, img, box, strict=True):
        entry = by_image.setdefault(i, ([], []))
        entry[0].append(r)
        entry[1].extend(b)
    ids = images.column("image_id").to_pylist()
    return images.append_column("region_ids", pa.array([by_image.get(i, ([], []))[0] for i in ids],
                                                       pa.list_(pa.string()))) \
                 .append_column("boxes_in", pa.array([by_image.get(i, ([], []))[1] for i in ids],
                                                     pa.list_(pa.float32())))


def load_features(store: Store, rel: str, columns: list[str] | None = None) -> pa.Table:
    """The committed features table of an artifact."""
    return store.read_table(rel, columns=columns)


def features_of(row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Decode one features row → (features (n, D) float32, boxes (n, 4))."""
    n, d = int(row["num_boxes"]), int(row["feature_dim"])
    feats = np.asarray(row["features"], np.float32).reshape(n, d)  # (n, D)
    boxes = np.asarray(row["boxes"], np.float32).reshape(n, 4)  # (n, 4)
    return feats, boxes
