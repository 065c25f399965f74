"""One Tune trial of a MASK sweep: train with sampled λ1, λ2, τ, then evaluate the (m, α, k) grid.

A trial is a Tune *function trainable* running a plain single-process PyTorch loop — the project's
own pieces (:class:`mask.pipeline.train.TrainModule`, :func:`~mask.pipeline.train.collate`,
:func:`~mask.pipeline.train.train_step` on eq. 14, :func:`~mask.pipeline.train.save_checkpoint`)
without Ray Train: a sweep's trials are small and many, and Tune already gives each one its
resources (``trials.cpus`` / ``trials.gpus``), so a DDP group per trial would only add start-up
time.  Everything a trial reads comes from the storage root (features, dataset regions and the
sweep's ``inputs`` artifact that the driver committed once); the trial config carries only the
sampled values.

Every ``trials.eval_every`` epochs (and at the last) the trial

1. materialises its knowledge in memory (eq. 2: μ of every VG region of a word, averaged —
   :class:`mask.pipeline.represent.MuStage` in its ``partials`` mode, merged exactly by
   :class:`mask.knowledge.PrototypeAccumulator`);
2. scores the validation gallery for every OOD sampling size m of the grid (eq. 10–13), the base
   model, and every (m, α, k) re-ranking (eq. 15), with the same functions as the evaluation jobs;
3. reports to Tune (``val_rsum`` = the best Rs of the grid, the grid itself, the epoch losses since
   the last report) together with a checkpoint, so ASHA can stop it and ``Tuner.restore`` resume it.

The driver's MLflow callback (:mod:`mask.pipeline.tune`) turns the reports into the nested run.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mask.alignment import gap_measures
from mask.config import MaskConfig, flatten
from mask.datasets import dataset_rel
from mask.evaluation import gallery_scores, map_captions, padded_mu
from mask.faults import fires
from mask.knowledge import KnowledgeTable, PrototypeAccumulator
from mask.losses import loss_shares
from mask.metrics import recall_at_k
from mask.models import save_pae
from mask.pipeline.regionwords import RegionWords
from mask.pipeline.represent import MuStage
from mask.pipeline.train import (
    TrainModule,
    collate,
    images_per_batch,
    load_checkpoint_dir,
    loss_weights,
    save_checkpoint,
    train_step,
)
from mask.pipeline.trial_rows import FEATURE_COLUMNS, TrialRows, rebatch
from mask.rerank import rerank_both
from mask.storage import Store
from mask.sweep import SCORE, best_entry, flatten_grid

logger = logging.getLogger(__name__)

INPUTS_KIND = "tune-inputs"


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares (small, plain values; handed over by ``tune.with_parameters``).

    Attributes:
        cfg: the sweep's base config as JSON (every trial applies its samples to it).
        inputs_rel: the committed ``tune-inputs`` artifact of the sweep.
        epochs, eval_every: trial length and evaluation period (epochs).
        m, alpha, k: the grid (m already clipped to the knowledge size).
        base_m: OOD sampling size of the demo base model (the config's ``knowledge.m``).
        cpus, gpus: resources per trial (torch threads follow ``cpus``).
        fault: the driver's ``MASK_FAULT_INJECT`` (tests only; see :func:`_fault_after_report`).
    """
    cfg: dict[str, Any]
    inputs_rel: str
    epochs: int
    eval_every: int
    m: tuple[int, ...]
    alpha: tuple[float, ...]
    k: tuple[int, ...]
    base_m: int
    cpus: float = 1.0
    gpus: float = 0.0
    fault: str = ""


def trial_config(base: dict[str, Any], samples: dict[str, Any]) -> MaskConfig:
    """The base config with a trial's sampled values (nested ``{"loss": {"tau": …}}`` or dotted keys)."""
    data = json.loads(json.dumps(base))
    for key, value in flatten(samples).items():
        *sections, name = key.split(".")
        node = data
        for s in sections:
            node = node.setdefault(s, {})
        node[name] = value
    return MaskConfig.model_validate(data)


# ---------------------------------------------------------------- inputs from storage


class PreParsed:
    """A caption parser that replays the driver's parse (the driver ran spaCy/NLTK once for the sweep)."""

    def __init__(self, words_by_text: dict[str, list[str]]):
        self.words_by_text = words_by_text

    def parse_batch(self, texts: list[str], batch_size: int = 256) -> list[list[str]]:
        return [list(self.words_by_text.get(t, [])) for t in texts]


@dataclass
class StoredVectors:
    """The caption words' vectors, with the three attributes :func:`mask.vectors.vectors_for` reads."""

    key_to_index: dict[str, int]
    vectors: np.ndarray  # (W, N) float32
    vector_size: int


@dataclass
class EvalGallery:
    """A gallery split (validation or held-out test) ready to score.

    Attributes:
        features: feature rows of the split's images (numpy columns, gallery order).
        image_ids: N ids; texts: T captions grouped by image; caption_to_image: (T,) rows.
        parser, kv: the driver's parse and the caption words' vectors.
        base: (N, T) base-model scores, or None (the demo base: MASK with global mean pooling).
    """
    features: dict[str, np.ndarray]
    image_ids: list[str]
    texts: list[str]
    caption_to_image: np.ndarray
    parser: PreParsed
    kv: StoredVectors
    base: np.ndarray | None = None


@dataclass
class SweepData:
    """A trial's view of the sweep inputs: training rows, vocabulary and the validation gallery.

    The training features are never all in memory (:class:`mask.pipeline.trial_rows.TrialRows`); the
    validation gallery is (its size is the gallery split's, not the training set's)."""

    words: list[str]
    word_vectors: np.ndarray  # (V, N)
    word_index: dict[str, int]
    region_words: RegionWords  # region_id → word ids, loaded once from the regions artifact
    rows: TrialRows  # the training rows and the eq. 2 pass, streamed from the features artifact
    galleries: dict[str, EvalGallery] = field(default_factory=dict)


def _numpy_columns(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def read_inputs(store: Store, inputs_rel: str) -> dict[str, Any]:
    """The sweep's ``inputs.json`` (artifact paths, counts, grid) from its committed inputs artifact."""
    return json.loads(store.read_file(inputs_rel, "inputs.json"))


def _parquet_file(store: Store, rel: str, name: str) -> pa.Table:

    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(store.read_file(rel, name)))


def load_gallery(store: Store, inputs_rel: str, info: dict[str, Any], split: str) -> EvalGallery | None:
    """The ``val`` or ``test`` gallery split of a sweep (None when the split has no image)."""

    images = _parquet_file(store, inputs_rel, f"{split}_images.parquet").column("image_id").to_pylist()
    if not images:
        return None
    caps = _parquet_file(store, inputs_rel, f"{split}_captions.parquet")
    words = _parquet_file(store, inputs_rel, "caption_words.parquet")
    vecs = _parquet_file(store, inputs_rel, "caption_vectors.parquet")
    vocab = vecs.column("word").to_pylist()
    dim = int(info["word_dim"])
    mat = np.asarray(vecs.column("vector").to_pylist(), np.float32).reshape(len(vocab), dim)
    feats = store.read_table(info["gallery_features"], columns=FEATURE_COLUMNS)
    pos = {x: i for i, x in enumerate(feats.column("image_id").to_pylist())}
    feats = feats.take(pa.array([pos[x] for x in images], pa.int64()))
    base = None
    if f"{split}_base.npy" in info.get("files", []):
        base = np.load(io.BytesIO(store.read_file(inputs_rel, f"{split}_base.npy")), allow_pickle=False)
    return EvalGallery(features=_numpy_columns(feats), image_ids=images, texts=caps.column("text").to_pylist(),
                       caption_to_image=np.asarray(caps.column("image_position").to_pylist(), np.int64),
                       parser=PreParsed(dict(zip(words.column("text").to_pylist(), words.column("words").to_pylist(),
                                                 strict=True))),
                       kv=StoredVectors({w: i for i, w in enumerate(vocab)}, mat, dim), base=base)


def load_sweep_data(store: Store, inputs_rel: str, splits: tuple[str, ...] = ("val",)) -> SweepData:
    """Read what a trial trains and validates on from the storage root (never from the trial config)."""

    info = read_inputs(store, inputs_rel)
    vocab = _parquet_file(store, inputs_rel, "vocabulary.parquet")
    words = vocab.column("word").to_pylist()
    wv = np.asarray(vocab.column("vector").to_pylist(), np.float32).reshape(len(words), int(info["word_dim"]))
    word_index = {w: i for i, w in enumerate(words)}
    region_words = RegionWords(store.root, store.options, dataset_rel(info["dataset"], "regions"), words)
    rows = TrialRows(store, info["features"], region_words)
    if rows.images == 0:
        raise ValueError(f"dataset {info['dataset']}: no region carries a vocabulary word; nothing to train on")
    logger.info("trial rows: %s", rows.describe())
    data = SweepData(words=words, word_vectors=wv, word_index=word_index, region_words=region_words, rows=rows)
    for split in splits:
        g = load_gallery(store, inputs_rel, info, split)
        if g is not None:
            data.galleries[split] = g
    return data


# ---------------------------------------------------------------- training, knowledge, evaluation


def train_epoch(module, opt: torch.optim.Optimizer, rows: TrialRows, word_vectors: torch.Tensor,
                cfg: MaskConfig, epoch: int, device: torch.device, step: int) -> tuple[dict[str, float], int]:
    """One epoch of eq. 14 over the training rows in a seeded order (same order after a resume;
    :meth:`mask.pipeline.trial_rows.TrialRows.epoch_batches`).

    Returns:
        ``({"loss", "loss_ir", …, "share_rec", …}: means over the epoch's batches and each weighted
        term's share of the total (:func:`mask.losses.loss_shares`), the step count after it)``.
    """
    module.train()
    per = images_per_batch(cfg.train, epoch, rows.pairs_per_image, 1)
    weights = loss_weights(cfg)
    sums: dict[str, float] = {}
    batches = 0
    for rows_b in rows.epoch_batches(cfg.train.seed, epoch, per):
        b = collate(rows_b, device)
        terms = train_step(module, module, opt, b, word_vectors, weights, step + 1)
        step += 1
        batches += 1
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    means = {k: v / max(batches, 1) for k, v in sums.items()}
    return {**means, **loss_shares(means, **weights)}, step


def knowledge_table(pae_bytes: bytes, data: SweepData, cfg: MaskConfig, batch_size: int = 64):
    """Eq. 2 in memory: μ of every VG region through the PAE, averaged per word → a KnowledgeTable."""
    stage = MuStage(pae_bytes, data.word_index, data.region_words, "partials", cfg.seed)
    acc = PrototypeAccumulator(len(data.words), cfg.model.latent_dim, seed=cfg.seed)
    for batch in data.rows.raw_batches(batch_size):
        part = stage(batch)
        if len(part["word_id"]):
            acc.merge_partial(part["word_id"], part["sum"], part["count"], part["key"], part["sample"])
    return KnowledgeTable.from_accumulator(acc, data.words, data.word_vectors)


def gallery_mu(pae_bytes: bytes, gallery: EvalGallery, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """μ of the gallery's regions → ``(N, R, Z)`` and the padding mask ``(N, R)``, in gallery order."""

    stage = MuStage(pae_bytes)
    cols: dict[str, list] = {"image_id": [], "mu": [], "num_boxes": [], "latent_dim": []}
    for batch in rebatch(iter([gallery.features]), batch_size):
        out = stage(batch)
        cols["image_id"] += [str(x) for x in out["image_id"]]
        cols["mu"] += [np.asarray(m, np.float32) for m in out["mu"]]
        cols["num_boxes"] += [int(x) for x in out["num_boxes"]]
        cols["latent_dim"] += [int(x) for x in out["latent_dim"]]
    table = pa.table({"image_id": pa.array(cols["image_id"], pa.string()),
                      "mu": pa.array(cols["mu"], pa.list_(pa.float32())),
                      "num_boxes": pa.array(cols["num_boxes"], pa.int32()),
                      "latent_dim": pa.array(cols["latent_dim"], pa.int32())})
    return padded_mu(table, gallery.image_ids)


def evaluate_grid(cfg: MaskConfig, table, mu: np.ndarray, mask: np.ndarray, gallery: EvalGallery,
                  m_values, alphas, ks, base_m: int) -> dict[str, Any]:
    """MASK alone for every m, the base model, and the base re-ranked for every (m, α, k).

    MASK scores are eq. 10 (max-mean pooling, or ``scoring.pooling``) with caption words outside
    the knowledge given OOD prototypes of sampling size m (eq. 11–13); re-ranking is eq. 15 in both
    directions (:func:`mask.rerank.rerank_both`).  The base model is ``gallery.base`` when given,
    else the demo's stand-in: the same knowledge scored with *global mean pooling* (Table 1's
    "without max-mean pooling" ablation) at OOD size ``base_m``.

    Returns:
        ``{"mask": {m: metrics}, "base": metrics, "rerank": {(m, α, k): metrics}}`` (metrics as
        :func:`mask.metrics.recall_at_k`).
    """
    sc = cfg.scoring
    c2i = gallery.caption_to_image
    out: dict[str, Any] = {"mask": {}, "rerank": {}, "base": None}
    sims: dict[int, np.ndarray] = {}
    for m in m_values:
        cw = map_captions(cfg, table, gallery.texts, parser=gallery.parser, kv=gallery.kv, m=int(m))
        sims[m] = gallery_scores(mu, mask, cw, sc.normalize, sc.pooling)
        out["mask"][m] = recall_at_k(sims[m], caption_to_image=c2i)
    base = gallery.base
    if base is None:
        cw = map_captions(cfg, table, gallery.texts, parser=gallery.parser, kv=gallery.kv, m=int(base_m))
        base = gallery_scores(mu, mask, cw, sc.normalize, "mean")
    out["base"] = recall_at_k(base, caption_to_image=c2i)
    for m, sim in sims.items():
        for a in alphas:
            for k in ks:
                rr = rerank_both(base, sim, int(k), float(a))
                out["rerank"][(m, a, k)] = recall_at_k(rr.i2t, caption_to_image=c2i, t2i_similarity=rr.t2i)
    return out


def grid_json(grid: dict[str, Any]) -> str:
    """The grid as JSON (entries with m, alpha, k; alpha/k null for MASK alone and the base)."""
    rows = [{"m": m, "alpha": None, "k": None, "metrics": met} for m, met in grid["mask"].items()]
    rows += [{"m": m, "alpha": a, "k": k, "metrics": met} for (m, a, k), met in grid["rerank"].items()]
    return json.dumps({"entries": rows, "base": grid["base"]})


def grid_from_json(text: str) -> dict[str, Any]:
    data = json.loads(text)
    out: dict[str, Any] = {"mask": {}, "rerank": {}, "base": data.get("base")}
    for r in data["entries"]:
        if r["alpha"] is None:
            out["mask"][r["m"]] = r["metrics"]
        else:
            out["rerank"][(r["m"], r["alpha"], r["k"])] = r["metrics"]
    return out


def grid_report(grid: dict[str, Any]) -> dict[str, Any]:
    """What a trial reports about its grid: the score, the best entry and every grid metric."""
    best = best_entry(grid)
    return {SCORE: float(best["metrics"]["rsum"]), "best_m": best["m"],
            "best_alpha": "none" if best["alpha"] is None else best["alpha"],
            "best_k": "none" if best["k"] is None else best["k"],
            **{f"best.{k}": float(v) for k, v in best["metrics"].items()},
            **flatten_grid(grid), "grid_json": grid_json(grid)}


# ---------------------------------------------------------------- the trainable


def _fault_after_report(reports: int, spec: str) -> None:
    """The restore tests' faults (:mod:`mask.faults`): after its n-th report a trial fails
    (``tune_error``: a rerun restores it from its checkpoint) or hangs (``tune_report``: a test kills
    the driver mid-sweep)."""
    if fires("tune_error", reports, spec):
        raise RuntimeError(f"fault injection: trial fails after report {reports}")
    if fires("tune_report", reports, spec):
        logger.warning("fault injection: trial holds after report %d until the driver is killed", reports)
        time.sleep(600)


def _device(setup: TrialSetup) -> torch.device:
    return torch.device("cuda" if setup.gpus > 0 and torch.cuda.is_available() else "cpu")


def _gap(table, module) -> dict[str, float]:
    """The modality-gap measures (:func:`mask.alignment.gap_measures`) of the trial's MTM on its knowledge."""

    try:
        with torch.no_grad():
            return {k: float(v) for k, v in gap_measures(table, module.net.mtm.cpu()).items()}
    except Exception as e:  # noqa: BLE001 - a measure that cannot run must not fail the trial
        logger.warning("trial: modality-gap measures skipped (%s)", e)
        return {"gap.skipped": 1.0}
    finally:
        module.net.mtm.to(next(module.parameters()).device)


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Tune function trainable: train with the sampled config, report the validation grid with checkpoints.

    Args:
        config: the trial's samples (nested, e.g. ``{"loss": {"lambda_cm": 2.7}}``).
        setup: the sweep's shared :class:`TrialSetup`.
    """
    import ray.tune


    cfg = trial_config(setup.cfg, config)
    torch.set_num_threads(max(1, int(setup.cpus)))
    device = _device(setup)
    store = Store(cfg.storage.root, cfg.storage.options)
    t0 = time.perf_counter()
    data = load_sweep_data(store, setup.inputs_rel)
    val = data.galleries.get("val")
    if val is None:
        raise ValueError(f"sweep inputs {store.uri(setup.inputs_rel)}: the validation gallery is empty")
    torch.manual_seed(cfg.train.seed)
    module = TrainModule(cfg, len(data.words)).to(device)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.train.lr)
    start, step = 0, 0
    ckpt = ray.tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            meta = load_checkpoint_dir(d, module, opt)
        start, step = int(meta["epoch"]) + 1, int(meta["step"])
        logger.info("trial resumes after epoch %d (step %d)", start, step)
    wv = torch.tensor(data.word_vectors, device=device)  # a copy: it may be a read-only view of Ray's object store
    load_s = time.perf_counter() - t0
    history: list[dict[str, float]] = []
    reports = 0
    for epoch in range(start, setup.epochs):
        t1 = time.perf_counter()
        losses, step = train_epoch(module, opt, data.rows, wv, cfg, epoch, device, step)
        history.append({"epoch": epoch, "epoch_seconds": time.perf_counter() - t1, **losses})
        if (epoch + 1) % setup.eval_every and epoch != setup.epochs - 1:
            continue
        t2 = time.perf_counter()
        module.eval()
        pae = save_pae(module.net.pae)
        table = knowledge_table(pae, data, cfg)
        mu, mask = gallery_mu(pae, val)
        grid = evaluate_grid(cfg, table, mu, mask, val, setup.m, setup.alpha, setup.k, setup.base_m)
        metrics = {**grid_report(grid), **_gap(table, module), "epoch": epoch, "epochs_done": epoch + 1, "step": step, "start_epoch": start,
                   "eval_seconds": time.perf_counter() - t2, "load_seconds": load_s,
                   "knowledge_words": len(table.words), "history_json": json.dumps(history)}
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(module, opt, {"epoch": epoch, "step": step, "resumes": 0, "world_size": 1,
                                          "metrics": {f"epoch.{k}": v for k, v in losses.items()}},
                            [torch.get_rng_state()], d)
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(d))
        history = []
        reports += 1
        _fault_after_report(reports, setup.fault)
