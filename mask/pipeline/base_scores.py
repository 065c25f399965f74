"""Base-model scores for re-ranking (eq. 15): a CLIP similarity matrix of a gallery, on Ray Data.

Images: read + decode + CLIP preprocessing in CPU tasks → CLIP image tower in an actor pool (one
model per actor; each actor asks for ``clip.num_gpus`` / ``clip.num_cpus``, the pool grows from
``clip.min_actors`` to ``clip.max_actors``).  Captions: the
text tower, batched, in the same pass and the same actors (rows carry a ``kind``), so each actor loads
the model once.  The driver gathers the L2-normalised embeddings and writes the cosine-similarity
matrix (a dense matrix: ~0.5 GB for COCO 5k × 25k).

Artifact ``base_scores/<gallery>/<model-tag>/`` (manifest written last, through :mod:`mask.storage`):

* ``scores.npy``: float32 ``(n_images, n_captions)`` cosine similarities of the normalised image and
  text embeddings (CLIP's ``logit_scale`` is left out: it does not change rankings, and eq. 15 z-scores
  the scores anyway);
* ``ids.json``: ``image_ids`` (row order: the gallery's image order), ``caption_ids`` (column order:
  captions sorted by (image row, original order), the order :func:`mask.evaluation.evaluate`
  uses), ``caption_image`` (row of each column's image), ``excluded_image_ids`` and
  ``excluded_caption_ids``, the model and the similarity used;
* ``_errors/``: one row per image that failed (``image_id, uri, stage, error, message``), as in the
  extraction job.

Rule for images that fail (unreadable, corrupt, too large): they are **excluded** from the matrix —
no row — and so are their captions — no column — so that rows and columns stay grouped by image like
the evaluation's ``caption_to_image``; ``ids.json`` lists both exclusions and ``_errors`` says why.
The same decoding rules as the detector's (:func:`mask.features.images.decode_image`) apply, so an
image that fails here also fails region extraction.

A rerun with the same model, weights and gallery (ids, URIs and caption texts) reuses the committed
artifact; batch size and actor count are left out of that identity.  Image content rewritten under
an unchanged URI is not detected (as for the features artifact).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from mask.config import ClipConfig, MaskConfig
from mask.errors import MaskError
from mask.features.images import ImageError, decode_image
from mask.pipeline.extract import ERRORS_SCHEMA, read_uri
from mask.pipeline.identity import CLIP_EXECUTION_FIELDS, WEIGHT_SUFFIXES, base_scores_rel, weights_label
from mask.pipeline.resources import actor_device, ensure_gpus, pool_args
from mask.pipeline.runtime import JobContext, init_ray, job_run
from mask.pipeline.steps import ensure_dataset, require_gallery
from mask.preflight import check_inputs
from mask.storage import Store, fingerprint, fingerprint_files, parse_uri, redact_text

logger = logging.getLogger(__name__)

SCORES_FILE = "scores.npy"
IDS_FILE = "ids.json"


class BaseScoresError(MaskError, ValueError):
    """A CLIP configuration or base-scores artifact that cannot be used; the message names it."""


# ---------------------------------------------------------------- naming and identity


def _is_weights_file(pretrained: str) -> bool:
    return "://" in pretrained or os.path.exists(pretrained) or os.sep in pretrained \
        or pretrained.endswith(WEIGHT_SUFFIXES)


def weights_fingerprint(pretrained: str | None, storage_options: dict[str, Any]) -> str | None:
    """Identity of the weights: the tag itself, or size + mtime/ETag of a file or object (not its bytes).

    Raises:
        BaseScoresError: a weights file or object that does not exist.
    """
    if pretrained is None or not _is_weights_file(pretrained):
        return pretrained
    import fsspec

    try:
        if pretrained.startswith(("s3://", "s3a://")):
            fs, path = fsspec.core.url_to_fs(pretrained, **storage_options)
            return fingerprint_files(fs, [path])
        return fingerprint_files(None, [pretrained])
    except (OSError, ValueError) as e:
        raise BaseScoresError(f"clip.pretrained {pretrained}: cannot read the weights ({e})") from None


# ---------------------------------------------------------------- open_clip: model, weights, preprocessing


def _open_clip():
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - the dev extra installs it
        raise ImportError("CLIP base scores need open_clip: pip install 'mask-itm[clip]' "
                          "(or pip install open_clip_torch)") from e
    return open_clip


def register_architecture(clip: ClipConfig) -> str:
    """Register ``clip.architecture`` with open_clip under ``clip.model`` (once per process).

    open_clip reads model configs from JSON files; the dict is written to a file in the temp folder
    and added through ``open_clip.add_model_config``.

    Returns:
        The model name to pass to open_clip.

    Raises:
        BaseScoresError: the architecture lacks ``embed_dim``/``vision_cfg``/``text_cfg``, or would
            shadow a different built-in config of the same name.
    """
    open_clip = _open_clip()
    if clip.architecture is None:
        return clip.model
    arch = clip.architecture
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in arch]
    if missing:
        raise BaseScoresError(f"clip.architecture: missing key(s) {missing} (an open_clip model config has "
                              "embed_dim, vision_cfg and text_cfg)")
    if ":" in clip.model or "/" in clip.model:
        raise BaseScoresError(f"clip.model {clip.model!r}: a custom architecture needs a plain name")
    current = open_clip.get_model_config(clip.model)
    if current is not None:
        if current == json.loads(json.dumps(arch)):
            return clip.model
        registered_here = getattr(register_architecture, "_names", set())
        if clip.model not in registered_here:
            raise BaseScoresError(f"clip.model {clip.model!r} is a built-in open_clip model with another "
                                  "config; give the custom architecture a new name")
    folder = os.path.join(tempfile.gettempdir(), "mask-itm-clip", "configs", fingerprint(arch))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{clip.model}.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(arch, f)
    os.replace(tmp, path)
    open_clip.add_model_config(path)
    register_architecture._names = getattr(register_architecture, "_names", set()) | {clip.model}  # type: ignore[attr-defined]
    return clip.model


def resolve_weights(pretrained: str | None, storage_options: dict[str, Any]) -> str | None:
    """What to pass as open_clip's ``pretrained``: a tag, a local file, or a fetched copy of a URI.

    Object-storage URIs are copied once per node into the temp folder (named by the object's
    fingerprint; written atomically, so actors on one node share the copy).

    Raises:
        BaseScoresError: a local path or URI that does not exist.
    """
    if pretrained is None or not _is_weights_file(pretrained):
        return pretrained
    if pretrained.startswith("file://") or "://" not in pretrained:
        _, path = parse_uri(pretrained)
        if not os.path.isfile(path):
            raise BaseScoresError(f"clip.pretrained {pretrained}: no such weights file")
        return path
    import fsspec

    fp = weights_fingerprint(pretrained, storage_options)
    folder = os.path.join(tempfile.gettempdir(), "mask-itm-clip", "weights", fp or "x")
    local = os.path.join(folder, os.path.basename(pretrained.rstrip("/")) or "weights.bin")
    if not os.path.isfile(local):
        os.makedirs(folder, exist_ok=True)
        tmp = f"{local}.{os.getpid()}.tmp"
        opts = storage_options if pretrained.startswith(("s3://", "s3a://")) else {}
        logger.info("fetching CLIP weights %s to %s", pretrained, local)
        with fsspec.open(pretrained, "rb", **opts) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        os.replace(tmp, local)
    return local


def preprocess_config(clip: ClipConfig) -> dict[str, Any]:
    """open_clip's image preprocessing for this model and weights, without building real weights.

    The architecture is instantiated on PyTorch's ``meta`` device (no memory, no download); a
    pretrained tag's mean/std/interpolation are merged as open_clip does.  Each CLIP actor checks
    this against the preprocessing of the model it loads (:class:`ClipStage`).
    """
    import torch

    open_clip = _open_clip()
    from open_clip.transform import merge_preprocess_dict

    name = register_architecture(clip)
    with torch.device("meta"):
        model = open_clip.create_model(name, pretrained=None, load_weights=False, device="meta")
    cfg = dict(model.visual.preprocess_cfg)
    if clip.pretrained is not None and not _is_weights_file(clip.pretrained):
        tag_cfg = open_clip.get_pretrained_cfg(name, clip.pretrained)
        if not tag_cfg:
            raise BaseScoresError(f"clip.pretrained {clip.pretrained!r}: not a tag of {name} and not a file; "
                                  f"tags: {open_clip.list_pretrained_tags_by_model(name)}")
        cfg = {**merge_preprocess_dict(cfg, tag_cfg), "size": cfg["size"]}
    return _jsonable(cfg)


def _jsonable(cfg: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(cfg))


def load_clip(clip: ClipConfig, seed: int, storage_options: dict[str, Any], device: str = "cpu"):
    """Build the open_clip model (weights as configured; seeded random init when ``pretrained`` is None).

    Returns:
        ``(model in eval mode, preprocess transform, tokenizer)``.
    """
    import torch

    open_clip = _open_clip()
    name = register_architecture(clip)
    weights = resolve_weights(clip.pretrained, storage_options)
    precision = clip.precision
    if not device.startswith("cuda") and precision != "fp32":
        logger.warning("clip.precision=%s needs a GPU; this CPU actor runs fp32", precision)
        precision = "fp32"
    if weights is None:
        logger.warning("CLIP %s: no weights (clip.pretrained is None); seeded random initialisation, "
                       "the scores are meaningless", name)
    torch.manual_seed(seed)  # identical random init in every actor and both towers
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, precision=precision,
                                                                 device=device)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


# ---------------------------------------------------------------- Ray Data stages

#: Rows of the one pass through the actors: images and captions side by side (``kind``), so a single
#: actor pool (one model load per actor) runs both towers.  Pixels travel as a flat float32 list
#: (empty for captions), embeddings likewise.
INPUT_SCHEMA = pa.schema([("kind", pa.string()), ("id", pa.string()), ("uri", pa.string()), ("text", pa.string())])
DECODED_SCHEMA = pa.schema([*INPUT_SCHEMA, ("pixels", pa.list_(pa.float32())), ("stage", pa.string()),
                            ("error", pa.string()), ("message", pa.string())])
ENCODED_SCHEMA = pa.schema([("kind", pa.string()), ("id", pa.string()), ("uri", pa.string()),
                            ("embedding", pa.list_(pa.float32())), ("stage", pa.string()),
                            ("error", pa.string()), ("message", pa.string())])


def decode_clip_batch(batch: pa.Table, storage_options: dict[str, Any], preprocess_cfg: dict[str, Any],
                      max_pixels: int) -> pa.Table:
    """CPU stage (Ray tasks): read, decode and CLIP-preprocess the image rows; captions pass through.

    Failures become error rows (``stage``, ``error``, ``message``; no pixels), never exceptions.

    Returns:
        The rows with ``pixels`` (3·H·W floats of the (3, H, W) input, empty for captions and
        failures), ``stage``, ``error``, ``message`` (empty strings for good rows).
    """
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    pcfg = PreprocessCfg(**{k: tuple(v) if isinstance(v, list) else v for k, v in preprocess_cfg.items()})
    transform = image_transform_v2(pcfg, is_train=False)
    n = batch.num_rows
    kinds = batch.column("kind").to_pylist()
    uris = batch.column("uri").to_pylist()
    pixels: list[np.ndarray] = []
    stage, error, message = [""] * n, [""] * n, [""] * n
    empty = np.zeros(0, np.float32)
    for i in range(n):
        if kinds[i] != "image":
            pixels.append(empty)
            continue
        try:
            img = decode_image(read_uri(uris[i], storage_options), max_pixels=max_pixels, source=uris[i])
            pixels.append(transform(Image.fromarray(img)).numpy().reshape(-1))  # (3·H·W,)
        except ImageError as e:
            pixels.append(empty)
            stage[i], error[i], message[i] = e.stage, type(e).__name__, str(e)
    return pa.table({**{k: batch.column(k) for k in INPUT_SCHEMA.names},
                     "pixels": pa.array(pixels, pa.list_(pa.float32())), "stage": pa.array(stage, pa.string()),
                     "error": pa.array(error, pa.string()), "message": pa.array(message, pa.string())},
                    schema=DECODED_SCHEMA)


class ClipStage:
    """Actor stage: one CLIP model per actor; image rows through the image tower, caption rows
    through the text tower (tokenised here), both L2-normalised.

    Args:
        clip_cfg: the CLIP config (dumped).
        seed: seed of the random initialisation (used when ``pretrained`` is None).
        storage_options: fsspec options for weights on object storage.
        preprocess_cfg: the driver's :func:`preprocess_config`; checked against the loaded model's
            (the decode stage used it).
        cpu_threads: torch threads of this actor on CPU (None: leave torch's/Ray's setting).
    """
    def __init__(self, clip_cfg: dict[str, Any], seed: int, storage_options: dict[str, Any],
                 preprocess_cfg: dict[str, Any], cpu_threads: int | None = None):
        clip = ClipConfig.model_validate(clip_cfg)
        self.device = actor_device(clip.device, "clip", cpu_threads or clip.cpu_threads, clip.pool_sizes()[1]).type
        self.model, _, self.tokenizer = load_clip(clip, seed, storage_options, self.device)
        actual = _jsonable(dict(self.model.visual.preprocess_cfg))
        if actual != preprocess_cfg:
            raise BaseScoresError(f"CLIP {clip.model}: the loaded model preprocesses with {actual}, "
                                  f"the decode stage used {preprocess_cfg}")
        self.input_shape = (3, *actual["size"]) if isinstance(actual["size"], list) else (3, actual["size"],
                                                                                          actual["size"])
        self.dtype = next(self.model.parameters()).dtype

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch
        import torch.nn.functional as F

        n = batch.num_rows
        kinds = batch.column("kind").to_pylist()
        errors = batch.column("error").to_pylist()
        img_rows = [i for i in range(n) if kinds[i] == "image" and not errors[i]]
        txt_rows = [i for i in range(n) if kinds[i] == "caption"]
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * n  # failed images keep no embedding
        with torch.inference_mode():
            if img_rows:
                pix = batch.column("pixels").take(pa.array(img_rows, pa.int64()))
                flat = np.asarray(pix.combine_chunks().flatten().to_numpy(zero_copy_only=False), np.float32)
                px = torch.from_numpy(flat.reshape(len(img_rows), *self.input_shape))  # (B', 3, H, W)
                emb = F.normalize(self.model.encode_image(px.to(self.device, self.dtype)).float(), dim=-1)  # (B', D)
                for i, e in zip(img_rows, emb.cpu().numpy(), strict=True):
                    out[i] = e
            if txt_rows:
                texts = batch.column("text").to_pylist()
                tokens = self.tokenizer([texts[i] for i in txt_rows]).to(self.device)  # (B', L)
                emb = F.normalize(self.model.encode_text(tokens).float(), dim=-1)  # (B', D)
                for i, e in zip(txt_rows, emb.cpu().numpy(), strict=True):
                    out[i] = e
        return pa.table({"kind": batch.column("kind"), "id": batch.column("id"), "uri": batch.column("uri"),
                         "embedding": pa.array(out, pa.list_(pa.float32())), "stage": batch.column("stage"),
                         "error": batch.column("error"), "message": batch.column("message")},
                        schema=ENCODED_SCHEMA)


# ---------------------------------------------------------------- orchestration


def caption_order(image_ids: list[str], captions: pa.Table) -> tuple[list[int], list[int]]:
    """Captions of the given images, in the evaluation's order.

    Args:
        image_ids: matrix rows.
        captions: table with ``image_id`` (and ``caption_id``, ``text``).

    Returns:
        ``(indices into captions, row of each caption's image)``, sorted by (image row, original order);
        captions whose image is not among ``image_ids`` are left out.
    """
    pos = {x: i for i, x in enumerate(image_ids)}
    cap_img = captions.column("image_id").to_pylist()
    keep = [j for j, im in enumerate(cap_img) if im in pos]
    order = sorted(keep, key=lambda j: (pos[cap_img[j]], j))
    return order, [pos[cap_img[j]] for j in order]


def gallery_fingerprint(images: pa.Table, captions: pa.Table) -> str:
    """Identity of a gallery for the artifact: image ids and URIs, caption ids, owners and texts."""
    return fingerprint([images.column("image_id").to_pylist(), images.column("uri").to_pylist(),
                        captions.column("caption_id").to_pylist(), captions.column("image_id").to_pylist(),
                        captions.column("text").to_pylist()])


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def compute_base_scores(cfg: MaskConfig, store: Store, gallery: str, images: pa.Table, captions: pa.Table,
                        tracker: Any = None) -> dict[str, Any]:
    """The CLIP similarity matrix of a gallery, committed under ``base_scores/<gallery>/<model-tag>/``.

    Reuses the committed artifact when model, weights and gallery are unchanged.

    Args:
        cfg: the job config (``clip``, ``storage``, ``seed``).
        store: storage root.
        gallery: gallery name (artifact folder).
        images: ``image_id, uri`` in gallery order.
        captions: ``caption_id, image_id, text``.
        tracker: an open tracking run or None.

    Returns:
        Summary: artifact URI, ``reused``, shape, images, captions, errors (by ``stage.error``),
        excluded captions, embedding dim, actors, seconds and inputs (images + captions)/s.

    Raises:
        BaseScoresError: no image of the gallery could be used (the errors are committed first).
    """
    clip = cfg.clip
    rel = base_scores_rel(gallery, clip)
    ident = {"clip": clip.model_dump(mode="json", exclude=set(CLIP_EXECUTION_FIELDS)),
             "weights": weights_fingerprint(clip.pretrained, cfg.storage.options),
             "gallery": gallery_fingerprint(images, captions),
             "seed": cfg.seed if clip.pretrained is None else None}
    h = fingerprint(ident)
    m = store.committed(rel, h)
    if m is not None:
        logger.info("base scores %s are committed; reused", store.uri(rel))
        return {"uri": store.uri(rel), "reused": True, **(m.get("extra") or {}).get("summary", {})}

    init_ray(cfg)
    t0 = time.perf_counter()
    emb, txt, errors = _embed_gallery(cfg, images, captions)
    all_ids = images.column("image_id").to_pylist()
    caption_ids_all = captions.column("caption_id").to_pylist()
    sim = _similarity(all_ids, captions, emb, txt)
    secs = time.perf_counter() - t0

    kinds: dict[str, int] = {}
    for e in errors:
        k = f"{e['stage']}.{e['error']}"
        kinds[k] = kinds.get(k, 0) + 1
    summary = {"uri": store.uri(rel), "reused": False, "gallery": gallery, "model": clip.model,
               "pretrained": weights_label(clip.pretrained), "shape": list(sim.scores.shape),
               "images": len(all_ids), "scored_images": len(sim.rows), "errors": len(errors),
               "errors_by_kind": dict(sorted(kinds.items())), "captions": len(caption_ids_all),
               "excluded_captions": len(sim.excluded_caps), "embedding_dim": sim.dim,
               "actors": list(clip.pool_sizes()), "gpus_per_actor": clip.num_gpus, "seconds": round(secs, 3),
               "inputs_per_s": round((len(all_ids) + len(caption_ids_all)) / secs, 3) if secs > 0 else 0.0}
    run_id = getattr(tracker, "run_id", None)

    err_table = pa.table({k: pa.array([e.get(k) for e in errors], pa.string()) for k in ERRORS_SCHEMA.names},
                         schema=ERRORS_SCHEMA)
    with store.open_artifact(f"{rel}/_errors", kind="base_scores.errors", config_hash=h,
                             inputs={"gallery": gallery}) as w:
        w.write_part(err_table, name="errors")
        w.commit(mlflow_run_id=run_id)
    if not sim.rows:  # nothing to commit as scores: a rerun tries again
        if tracker is not None:
            tracker.log_metrics({"base_scores.errors": float(len(errors))})
        raise BaseScoresError(f"gallery {gallery}: none of its {len(all_ids)} images could be used; "
                              f"see {store.uri(rel, '_errors')}")
    _commit_scores(store, rel, h, ident, gallery, clip, sim, errors, summary, run_id)
    if tracker is not None:
        tracker.log_metrics({f"base_scores.{k}": float(v) for k, v in summary.items()
                             if isinstance(v, int | float) and not isinstance(v, bool)})
        tracker.set_tags({"base_scores.uri": store.uri(rel)})
        tracker.log_dict(summary, f"base_scores_{gallery}.json")
    logger.info("base scores %s: %s", gallery, summary)
    return summary


def _embed_gallery(cfg: MaskConfig, images: pa.Table, captions: pa.Table
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[dict[str, str]]]:
    """One Ray Data pass: images (decode + preprocess in CPU tasks) and captions → both towers in one
    actor pool.  Returns (image id → embedding, caption id → embedding, error rows of unusable images)."""
    import ray

    clip = cfg.clip
    ensure_gpus(cfg, "clip.num_gpus", clip.num_gpus)
    pcfg = preprocess_config(clip)
    bs = clip.batch_size
    opts = cfg.storage.options
    n_img, n_cap = images.num_rows, captions.num_rows
    img_in = pa.table({"kind": pa.array(["image"] * n_img, pa.string()), "id": images.column("image_id"),
                       "uri": images.column("uri"), "text": pa.nulls(n_img, pa.string())}, schema=INPUT_SCHEMA)
    cap_in = pa.table({"kind": pa.array(["caption"] * n_cap, pa.string()), "id": captions.column("caption_id"),
                       "uri": pa.nulls(n_cap, pa.string()), "text": captions.column("text")}, schema=INPUT_SCHEMA)
    blocks = [t.slice(i, bs) for t in (img_in, cap_in) for i in range(0, t.num_rows, bs)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(decode_clip_batch, fn_kwargs={"storage_options": opts, "preprocess_cfg": pcfg,
                                                      "max_pixels": clip.max_pixels},
                        batch_size=bs, batch_format="pyarrow", num_cpus=0.5)
    ds = ds.map_batches(ClipStage, fn_constructor_args=(clip.model_dump(mode="json"), cfg.seed, opts, pcfg, None),
                        batch_size=bs, batch_format="pyarrow", **pool_args(clip))
    emb: dict[str, np.ndarray] = {}
    txt: dict[str, np.ndarray] = {}
    errors: list[dict[str, str]] = []
    for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for r in b.to_pylist():
            if r["kind"] == "caption":
                txt[r["id"]] = np.asarray(r["embedding"], np.float32)
            elif r["error"]:
                errors.append({"image_id": r["id"], **{k: r[k] for k in ("uri", "stage", "error", "message")}})
            else:
                emb[r["id"]] = np.asarray(r["embedding"], np.float32)
    return emb, txt, errors


@dataclass
class _Similarity:
    """The scored matrix: rows (usable images, gallery order) × columns (their captions)."""

    rows: list[str]
    col_ids: list[str]
    caption_image: list[int]
    excluded_caps: list[str]  # captions of images that could not be used
    dim: int
    scores: np.ndarray  # (N, C)


def _similarity(all_ids: list[str], captions: pa.Table, emb: dict[str, np.ndarray],
                txt: dict[str, np.ndarray]) -> _Similarity:
    """The cosine matrix of the usable images (``emb``) and their captions."""
    caption_ids_all = captions.column("caption_id").to_pylist()
    rows = [i for i in all_ids if i in emb]
    order, caption_image = caption_order(rows, captions)
    kept_caps = set(order)
    excluded_caps = [caption_ids_all[j] for j in range(len(caption_ids_all)) if j not in kept_caps]
    col_ids = [caption_ids_all[j] for j in order]
    dim = int(next(iter(emb.values())).shape[0]) if emb else 0
    img_mat = np.stack([emb[i] for i in rows]) if rows else np.zeros((0, dim), np.float32)  # (N, D)
    txt_mat = np.stack([txt[c] for c in col_ids]) if col_ids else np.zeros((0, dim), np.float32)  # (C, D)
    scores = (img_mat @ txt_mat.T).astype(np.float32)  # (N, C) cosine: both sides are unit vectors
    return _Similarity(rows=rows, col_ids=col_ids, caption_image=caption_image, excluded_caps=excluded_caps,
                       dim=dim, scores=scores)


def _commit_scores(store: Store, rel: str, h: str, ident: dict[str, Any], gallery: str, clip: ClipConfig,
                   sim: _Similarity, errors: list[dict[str, str]], summary: dict[str, Any],
                   run_id: str | None) -> None:
    """Commit the base-scores artifact: ``scores.npy``, ``ids.json`` and the summary in its manifest."""
    ids = {"image_ids": sim.rows, "caption_ids": sim.col_ids, "caption_image": sim.caption_image,
           "excluded_image_ids": [e["image_id"] for e in errors],
           "excluded_caption_ids": sim.excluded_caps,
           "similarity": "cosine of L2-normalised open_clip embeddings (no logit_scale)",
           "model": clip.model, "pretrained": None if clip.pretrained is None else redact_text(clip.pretrained),
           "architecture": clip.architecture, "precision": clip.precision}
    with store.open_artifact(rel, kind="base_scores", config_hash=h,
                             inputs={"gallery": gallery, "weights": ident["weights"],
                                     "gallery_fingerprint": ident["gallery"]}) as w:
        w.write_file(SCORES_FILE, _npy_bytes(sim.scores))
        w.write_file(IDS_FILE, json.dumps(ids).encode())
        w.commit(mlflow_run_id=run_id, extra={"summary": {k: v for k, v in summary.items()
                                                          if k not in ("uri", "reused")}})


def base_scores_job(cfg: MaskConfig) -> dict[str, Any]:
    """The base-scores job: gallery dataset (reused when committed) → CLIP matrix, in its own MLflow run.

    Returns:
        ``{"dataset": …, "base_scores": …, "mlflow": {"tracking_uri", "run_id"}}``.

    Raises:
        BaseScoresError: the config names no gallery, or no gallery image could be used.
    """
    require_gallery(cfg, BaseScoresError)
    check_inputs(cfg, ["gallery"], gallery_captions=True)  # before Ray and MLflow start
    ctx = JobContext.from_config(cfg)
    uri = ctx.tracking_uri if cfg.tracking.enabled else None
    # Ray starts in compute_base_scores, only when the matrix is not committed yet
    with job_run(ctx, "base_scores", run_name=f"base_scores:{cfg.gallery.name}", ray=False) as run:
        data = ensure_dataset(ctx, cfg.gallery, run.run_id)
        captions = data.get("captions")
        if captions is None:
            raise BaseScoresError(f"gallery {cfg.gallery.name} has no captions; base scores need image–caption pairs")
        summary = compute_base_scores(cfg, ctx.store, cfg.gallery.name, data["images"], captions, tracker=run)
        return {"dataset": data["summary"], "base_scores": summary,
                "mlflow": {"tracking_uri": uri if run.run_id else None, "run_id": run.run_id}}
