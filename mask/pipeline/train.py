"""Distributed MASK training with Ray Train (eq. 14 over VG region–word pairs).

``train_loop_per_worker(config)`` is the whole per-worker loop: DDP model (gloo on CPU, NCCL on GPU,
chosen by ``ray.train.torch.prepare_model``), data from ``get_dataset_shard("train")`` as batches of
*images* with their regions (padding mask) so self-attention sees each image's regions, checkpoints
(model, optimiser, epoch, step, RNG of every rank) through ``ray.train.report``, resume from
``ray.train.get_checkpoint()`` after a worker failure or on a rerun of the same run name, and MLflow
metrics from rank 0.

Training rows (one per image, made by :class:`PairJoin` from the features artifact and the VG region
words): ``image_id, features (list<float16> n×M), num_boxes, feature_dim, pair_slot (list<int32>),
pair_word (list<int32>), num_pairs`` — a region with several words gives several pairs.

Batch size: ``train.batch_size`` counts region–word pairs of the *global* batch (the paper's 4096);
each worker takes ``batch_size / num_workers`` of them, rounded to whole images.  L_cm's pairwise term
and L_cl's negatives run over each worker's share (no cross-worker gather), as in plain DDP.

A non-finite loss stops every worker at the same step (a one-scalar all-reduce per step under DDP):
they report the step and term and return, and the driver raises :class:`mask.losses.NonFiniteLoss`.
It is not retried — a rerun from the last checkpoint would meet the same step.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mask.config import MaskConfig, TrainConfig
from mask.errors import MaskError
from mask.faults import driver_spec, exit_point
from mask.losses import NonFiniteLoss, check_finite, loss_shares, mask_loss
from mask.models import PrototypeTable, build_model, save_pae
from mask.pipeline.console import quiet_train_worker, train_log_level
from mask.pipeline.identity import train_run_name
from mask.pipeline.pair_join import PairJoin
from mask.pipeline.regionwords import RegionWords
from mask.pipeline.resources import ensure_gpus, node_cpus
from mask.pipeline.runtime import JobContext, job_run
from mask.pipeline.steps import KNOWLEDGE_COLUMNS, TrainingInputs, features_dataset, prepare_training_inputs
from mask.preflight import check_inputs
from mask.storage import Store

logger = logging.getLogger(__name__)

#: what a rank raises when another rank's loss was non-finite (sync_finite): the driver reports the other one
ELSEWHERE = NonFiniteLoss("loss(another worker)", "nan")

MODEL_FILE, OPTIM_FILE, RNG_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "rng.pt", "state.json"
CHECKPOINT_FILES = (MODEL_FILE, OPTIM_FILE, RNG_FILE, STATE_FILE)


class CheckpointError(MaskError, ValueError):
    """A training checkpoint that cannot be read or does not match the model; the message names it."""


class TrainingRunError(MaskError, ValueError):
    """A training run that cannot go on as configured (e.g. it already trained past ``train.epochs``)."""


class TrainModule(torch.nn.Module):
    """The trained parameters in one module so DDP sees them all: MaskNet + the learnable prototypes."""

    def __init__(self, cfg: MaskConfig, num_words: int):
        super().__init__()

        self.net = build_model(cfg.model)
        self.prototypes = PrototypeTable(num_words, cfg.model.latent_dim)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(features, mask)


# ---------------------------------------------------------------- data


def collate(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Rows of images → padded tensors and flattened pairs (vectorised; float16 → float32 on the device).

    Returns ``features`` (B, R, M), ``mask`` (B, R), ``pair_image``/``pair_slot``/``pair_word`` (P,).
    """
    counts = np.asarray(batch["num_boxes"], np.int64)  # (B,)
    n = len(counts)
    dim = int(batch["feature_dim"][0]) if n else 0
    r_max = max(int(counts.max(initial=0)), 1)
    mask = np.arange(r_max)[None, :] < counts[:, None]  # (B, R)
    mask_t = torch.from_numpy(mask).to(device)
    feats = torch.zeros((n, r_max, dim), dtype=torch.float32, device=device)  # (B, R, M)
    if counts.sum():
        flat = np.concatenate([np.asarray(f).reshape(-1) for f in batch["features"]])  # (ΣR·M,)
        # Row-major order of the mask's True slots is image by image, slot by slot: the stored order.
        feats[mask_t] = torch.from_numpy(flat.reshape(-1, dim)).to(device).float()  # (ΣR, M)
    lens = [len(s) for s in batch["pair_slot"]]
    total = int(sum(lens))
    if total:
        slot = np.concatenate(list(batch["pair_slot"])).astype(np.int64)  # (P,)
        word = np.concatenate(list(batch["pair_word"])).astype(np.int64)  # (P,)
    else:
        slot = word = np.zeros(0, np.int64)
    image = np.repeat(np.arange(n, dtype=np.int64), lens)  # (P,)
    return {"features": feats, "mask": mask_t,
            "pair_image": torch.from_numpy(image).to(device),
            "pair_slot": torch.from_numpy(slot).to(device),
            "pair_word": torch.from_numpy(word).to(device)}


def batch_pairs(train: TrainConfig, epoch: int) -> int:
    """Global batch size in region–word pairs at ``epoch`` (Appendix I.2: 4096, then 2048 from epoch 200)."""
    if train.late_epoch is not None and train.batch_size_late and epoch >= train.late_epoch:
        return train.batch_size_late
    return train.batch_size


def images_per_batch(train: TrainConfig, epoch: int, pairs_per_image: float, world_size: int = 1) -> int:
    """Images per worker batch that give about the configured global pair batch."""
    return max(1, round(batch_pairs(train, epoch) / max(pairs_per_image, 1e-9) / world_size))


def loss_weights(cfg: MaskConfig) -> dict[str, float]:
    """Keyword arguments of :func:`mask.losses.mask_loss` from the config (λ1, λ2, KL weight, τ, DIAS,
    and the literal-form switches ``loss.cl_normalize``, ``loss.cl_exclude_same_word``, ``loss.ir_reduction``)."""
    lo = cfg.loss
    return {"lambda_cm": lo.lambda_cm, "lambda_cl": lo.lambda_cl, "kl_weight": lo.kl_weight, "tau": lo.tau,
            "dias_weight": lo.dias_weight, "cl_normalize": lo.cl_normalize,
            "cl_exclude_same_word": lo.cl_exclude_same_word, "ir_reduction": lo.ir_reduction}


def epoch_shares(epoch_metrics: dict[str, Any], weights: dict[str, Any]) -> dict[str, float]:
    """``epoch.share_<term>``: each weighted loss term's share of the epoch's total (:func:`mask.losses.loss_shares`)."""
    terms = {k[len("epoch."):]: v for k, v in epoch_metrics.items() if k.startswith("epoch.loss_")}
    return {f"epoch.{k}": v for k, v in loss_shares(terms, **weights).items()}


def train_step(model: torch.nn.Module, inner: TrainModule, opt: torch.optim.Optimizer, b: dict[str, torch.Tensor],
               word_vectors: torch.Tensor, weights: dict[str, float], step: int,
               sync_finite=None) -> dict[str, torch.Tensor]:
    """One optimisation step of eq. 14 on a collated batch.

    Args:
        model: the (possibly DDP-wrapped) module.  inner: the unwrapped :class:`TrainModule`.
        opt: optimiser.  b: :func:`collate` output.  word_vectors: (V, N) on the device.
        weights: :func:`loss_weights`.  step: the number of this step (1-based), for errors.
        sync_finite: callable(bool) → bool that agrees across workers whether every loss was finite.

    Returns:
        The loss terms (detached).

    Raises:
        NonFiniteLoss: a term is NaN/inf here (or on another worker, through ``sync_finite``);
            no update is applied.
    """
    b = {**b, "word_vectors": word_vectors}
    out = model(b["features"], b["mask"])
    terms = mask_loss(out, b, prototypes=inner.prototypes.weight, **weights)
    error: NonFiniteLoss | None = None
    try:
        check_finite(terms, step)
    except NonFiniteLoss as e:
        error = e
    if sync_finite is not None and not sync_finite(error is None) and error is None:
        error = NonFiniteLoss(ELSEWHERE.term, ELSEWHERE.value, step)
    if error is not None:
        raise error
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    opt.step()
    return {k: v.detach() for k, v in terms.items()}


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(module: TrainModule, opt: torch.optim.Optimizer, state: dict[str, Any],
                    rng_states: list[torch.Tensor], directory: str) -> None:
    """Write a training checkpoint folder: weights (safetensors), optimiser, RNG per rank, state JSON.

    Args:
        module: the unwrapped module.  opt: optimiser.
        state: ``epoch`` (last finished, 0-based), ``step``, ``resumes``, ``world_size``, ``metrics``
            (that epoch's mean loss terms).
        rng_states: torch CPU RNG state of every rank, in rank order.
        directory: an existing folder; ``state.json`` is written last.
    """
    from safetensors.torch import save_file

    weights = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(weights, os.path.join(directory, MODEL_FILE))
    torch.save(opt.state_dict(), os.path.join(directory, OPTIM_FILE))
    torch.save({"torch_rng": torch.stack([s.cpu() for s in rng_states])}, os.path.join(directory, RNG_FILE))
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(state, f)


def load_checkpoint_dir(directory: str, module: TrainModule | None = None,
                        opt: torch.optim.Optimizer | None = None, rank: int = 0) -> dict[str, Any]:
    """Load a training checkpoint folder.

    Args:
        directory: a folder written by :func:`save_checkpoint`.
        module: load the weights into it (shapes and keys must match).
        opt: load the optimiser state into it.
        rank: restore this rank's torch RNG state when ``opt`` is given (a rank the checkpoint has no
            state for is re-seeded from the step instead).

    Returns:
        The state JSON (``epoch``, ``step``, …) plus ``state`` (the weights).

    Raises:
        CheckpointError: a missing, truncated or unreadable file, or weights that do not match the
            model — the message names the file.
    """
    from safetensors.torch import load_file

    def path(name: str) -> str:
        return os.path.join(directory, name)

    try:
        meta = json.loads(Path(path(STATE_FILE)).read_text())
        if not isinstance(meta, dict) or not {"epoch", "step"} <= set(meta):
            raise ValueError("no epoch/step in it")
    except Exception as e:
        raise CheckpointError(f"training checkpoint {path(STATE_FILE)}: unreadable ({e})") from e
    try:
        state = load_file(path(MODEL_FILE))
    except Exception as e:
        raise CheckpointError(f"training checkpoint {path(MODEL_FILE)}: unreadable or truncated ({e})") from e
    if module is not None:
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"training checkpoint {path(MODEL_FILE)}: does not match the model "
                                  f"(different model config?): {e}") from e
    if opt is not None:
        try:
            opt.load_state_dict(torch.load(path(OPTIM_FILE), weights_only=True))
        except Exception as e:
            raise CheckpointError(f"training checkpoint {path(OPTIM_FILE)}: unreadable or does not match "
                                  f"the optimiser ({e})") from e
        try:
            rng = torch.load(path(RNG_FILE), weights_only=True)["torch_rng"]
        except Exception as e:
            raise CheckpointError(f"training checkpoint {path(RNG_FILE)}: unreadable ({e})") from e
        if rng.dim() == 2 and rank < rng.shape[0]:
            torch.set_rng_state(rng[rank].clone())
        else:
            torch.manual_seed(int(meta["step"]) * 1000 + rank)
    return {**meta, "state": state}


def latest_checkpoint(fs, run_path: str) -> str | None:
    """The newest complete checkpoint folder of a Ray Train run (largest ``step``, then ``epoch``).

    A folder without ``state.json`` (an interrupted upload) is skipped; a damaged one with it is
    returned so that loading it fails with a clear error rather than silently training from an older one.

    Args:
        fs: a ``pyarrow.fs.FileSystem``.  run_path: the run folder (``<storage_path>/<run name>``), fs-native.

    Returns:
        The fs-native path of the folder, or None when the run has no checkpoint.
    """
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return None
    best: tuple[int, int, str] | None = None
    for info in infos:
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{STATE_FILE}") as f:
                meta = json.loads(f.read().decode())
            key = (int(meta["step"]), int(meta["epoch"]), info.path)
        except (FileNotFoundError, OSError, ValueError, KeyError, TypeError):
            continue
        if best is None or key > best:
            best = key
    return best[2] if best else None


def resume_checkpoint(registered, run_storage: tuple[Any, str] | None, module: TrainModule,
                      opt: torch.optim.Optimizer, rank: int) -> dict[str, Any] | None:
    """Load the checkpoint a (re)started worker continues from; None = start at epoch 0.

    Ray Train registers a reported checkpoint only when its controller next polls the worker (every
    couple of seconds), so a worker killed right after ``report`` restarts from the checkpoint before
    it although the newer one is already persisted.  The newest complete checkpoint in the run's
    storage folder is therefore tried first; if it cannot be loaded (an upload cut short by the
    failure) it is skipped with a warning and Ray's registered checkpoint is used, whose failure to
    load is an error.  The same scan covers a run folder that has checkpoints but no Ray snapshot.

    Args:
        registered: ``ray.train.get_checkpoint()`` (None when Ray has none).
        run_storage: ``(pyarrow filesystem, run folder)``, or None to use only ``registered``.
        module, opt, rank: see :func:`load_checkpoint_dir`.

    Raises:
        CheckpointError: the registered checkpoint cannot be loaded.
    """
    import ray.train

    candidates: list[tuple[str, Any]] = []
    if run_storage is not None:
        fs, run_path = run_storage
        newest = latest_checkpoint(fs, run_path)
        if newest is not None and (registered is None or newest.rstrip("/") != str(registered.path).rstrip("/")):
            candidates.append(("unregistered", ray.train.Checkpoint(newest, filesystem=fs)))
    if registered is not None:
        candidates.append(("registered", registered))
    for kind, ckpt in candidates:
        try:
            with ckpt.as_directory() as d:
                meta = load_checkpoint_dir(d, module, opt, rank=rank)
        except CheckpointError as e:
            if kind == "registered":
                raise
            logger.warning("rank %d: skipping checkpoint %s not registered by Ray Train (%s)", rank, ckpt.path, e)
            continue
        logger.info("rank %d: resuming after epoch %d (step %d) from %s checkpoint %s", rank, meta["epoch"],
                    meta["step"], kind, ckpt.path)
        return meta
    return None


# ---------------------------------------------------------------- the worker loop


def _worker_threads(cpu_threads: int | None = None, workers: int = 1) -> int:
    """torch threads of this worker: ``train.cpu_threads``, else at least the CPUs Ray assigned it and up
    to the CPUs of its node / the run's workers (Ray exports OMP_NUM_THREADS=assigned; make it explicit)."""
    import ray

    assigned = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)))
    n = cpu_threads or max(assigned, node_cpus() // max(1, workers))
    torch.set_num_threads(n)
    return n


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker loop (see the module docstring).

    Args:
        config: ``cfg`` (MaskConfig as JSON), ``word_vectors`` (V, N), ``pairs_per_image``,
            ``mlflow_run_id`` / ``tracking_uri`` (None = no MLflow), ``fault`` (fault-injection spec),
            ``run_storage`` (``(pyarrow filesystem, run folder)``, see :func:`resume_checkpoint`).

    Returns:
        The last epoch's metrics (Ray Train hands rank 0's to the driver as ``Result.return_value``),
        or ``{"nonfinite": NonFiniteLoss, "step", "epoch"}`` when a loss term became NaN/inf.
    """
    import ray.train
    import ray.train.torch

    cfg = MaskConfig.model_validate(config["cfg"])
    quiet_train_worker(config.get("train_log_level", "INFO"))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = _worker_threads(cfg.train.cpu_threads, world)
    torch.manual_seed(cfg.train.seed + rank)
    wv_np = np.asarray(config["word_vectors"], np.float32)  # (V, N)
    module = TrainModule(cfg, wv_np.shape[0])
    device = _worker_device(rank)
    model = ray.train.torch.prepare_model(module, move_to_device=device)  # DDP when world > 1
    inner: TrainModule = model.module if hasattr(model, "module") else model
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    start_epoch, step, resumes = 0, 0, 0
    # every rank loads the same weights after DDP wrapping, so they stay identical; the optimiser
    # state is loaded after the move to the device, so Adam casts its moments there
    meta = resume_checkpoint(ray.train.get_checkpoint(), config.get("run_storage"), inner, opt, rank)
    if meta is not None:
        start_epoch, step, resumes = meta["epoch"] + 1, meta["step"], int(meta.get("resumes", 0)) + 1
    dist = world > 1 and torch.distributed.is_initialized()
    word_vectors = torch.tensor(wv_np, device=device)  # a copy: wv_np is a read-only view of Ray's object store
    shard = ray.train.get_dataset_shard("train")
    run_id = config.get("mlflow_run_id")
    client = _rank0_client(config, rank, resumes, start_epoch, step)
    weights = loss_weights(cfg)
    sync_finite = functools.partial(_sync_finite, dist, device)
    last_metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.train.epochs):
        exit_point("train_epoch", epoch, config.get("fault", ""))
        per_worker = images_per_batch(cfg.train, epoch, config["pairs_per_image"], world)
        model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        ep = _run_epoch(cfg, epoch, shard, per_worker, device, model, inner, opt, word_vectors, weights, step,
                        sync_finite, client, run_id)
        step = ep.step
        if ep.failure is not None:
            # every rank broke out at the same step (sync_finite); do not retry
            return {"nonfinite": _own_failure(ep.failure, dist, world), "step": step + 1, "epoch": epoch}
        secs = time.perf_counter() - t0
        metrics = _epoch_metrics(ep.sums, ep.pairs, ep.batches, time.process_time() - c0, secs, dist, device)
        metrics.update(epoch_shares(metrics, weights))
        metrics.update({"epoch": epoch, "step": step, "resumes": resumes, "start_epoch": start_epoch,
                        "threads": threads, "world_size": world})
        last_metrics = metrics
        if client is not None:
            client.log_batch(run_id, metrics=_metrics(
                {k: v for k, v in metrics.items() if k.startswith("epoch") and k != "epoch" or k == "pairs_per_s"},
                epoch))
        last = epoch == cfg.train.epochs - 1
        _report_epoch(metrics, inner, opt, rank, world, dist,
                      checkpoint=last or (epoch + 1) % cfg.train.checkpoint_every == 0)
    return last_metrics


def _worker_device(rank: int) -> torch.device:
    """The device Ray Train gave this worker; the CPU (with a warning) when torch sees no CUDA on a GPU worker."""
    import ray
    import ray.train.torch

    device = ray.train.torch.get_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        # a GPU worker whose torch sees no CUDA (a fake GPU node of the simulated cluster, a driver problem)
        logger.warning("train worker %d: Ray assigned GPU(s) %s but torch sees no CUDA device; training on the "
                       "CPU", rank, ray.get_gpu_ids())
        device = torch.device("cpu")
    else:
        logger.info("train worker %d on %s (node %s)", rank, device, ray.get_runtime_context().get_node_id())
    return device


def _rank0_client(config: dict[str, Any], rank: int, resumes: int, start_epoch: int, step: int):
    """Rank 0's MLflow client when the run is tracked (None otherwise); logs the epoch a resumed run
    restarts at."""
    run_id = config.get("mlflow_run_id")
    if not (rank == 0 and run_id):
        return None
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=config["tracking_uri"])
    if resumes:
        client.log_batch(run_id, metrics=_metrics({"train.resumed_at_epoch": start_epoch}, step))
    return client


def _sync_finite(dist: bool, device: torch.device, ok: bool) -> bool:
    """Whether every worker's loss was finite (an all-reduce of the flags; ``ok`` itself on one worker)."""
    if not dist:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item() == 0.0)


@dataclass
class _EpochRun:
    """One worker's pass over its shard for an epoch: loss sums, counts, the step reached, or the failure."""

    sums: dict[str, float]
    batches: int
    pairs: int
    step: int
    failure: NonFiniteLoss | None


def _run_epoch(cfg: MaskConfig, epoch: int, shard, per_worker: int, device: torch.device, model: torch.nn.Module,
               inner: TrainModule, opt: torch.optim.Optimizer, word_vectors: torch.Tensor,
               weights: dict[str, float], step: int, sync_finite, client, run_id: str | None) -> _EpochRun:
    """Train on one epoch of the worker's shard from step ``step``; stops at the first non-finite loss."""
    sums: dict[str, float] = {}
    n_batches, n_pairs = 0, 0
    failure: NonFiniteLoss | None = None
    for batch in shard.iter_batches(batch_size=per_worker, batch_format="numpy",
                                    local_shuffle_buffer_size=max(per_worker * 4, 64),
                                    local_shuffle_seed=cfg.train.seed + epoch):
        b = collate(batch, device)
        try:
            terms = train_step(model, inner, opt, b, word_vectors, weights, step + 1, sync_finite)
        except NonFiniteLoss as e:
            failure = e
            break
        step += 1
        n_batches += 1
        n_pairs += int(b["pair_word"].numel())
        values = {k: float(v) for k, v in terms.items()}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        if client is not None and step % cfg.train.log_every == 0:
            client.log_batch(run_id, metrics=_metrics({f"step.{k}": v for k, v in values.items()}, step))
    return _EpochRun(sums=sums, batches=n_batches, pairs=n_pairs, step=step, failure=failure)


def _own_failure(failure: NonFiniteLoss, dist: bool, world: int) -> NonFiniteLoss:
    """The NonFiniteLoss of a rank whose own loss was non-finite (not one that only heard of it)."""
    failures: list[Any] = [failure]
    if dist:
        failures = [None] * world
        torch.distributed.all_gather_object(failures, failure)
    return next((f for f in failures if f.term != ELSEWHERE.term), failures[0])


def _epoch_metrics(sums: dict[str, float], n_pairs: int, n_batches: int, cpu_s: float, secs: float, dist: bool,
                   device) -> dict[str, Any]:
    """Mean loss terms over every worker's batches (``epoch.<term>``) and the whole run's throughput."""
    keys = sorted(sums)
    totals = torch.tensor([float(n_pairs), float(n_batches), cpu_s, *[sums[k] for k in keys]], dtype=torch.float64)
    if dist:
        totals = totals.to(device)
        torch.distributed.all_reduce(totals)
        totals = totals.cpu()
    all_pairs, all_batches = float(totals[0]), max(float(totals[1]), 1.0)
    metrics: dict[str, Any] = {f"epoch.{k}": float(totals[3 + i]) / all_batches for i, k in enumerate(keys)}
    # throughput of the whole run: pairs of all workers over this worker's wall time of the epoch
    metrics.update({"pairs_per_s": all_pairs / max(secs, 1e-9), "epoch_seconds": secs, "epoch_pairs": all_pairs,
                    "epoch_cpu_seconds": float(totals[2])})
    return metrics


def _report_epoch(metrics: dict[str, Any], inner: TrainModule, opt: torch.optim.Optimizer, rank: int, world: int,
                  dist: bool, checkpoint: bool) -> None:
    """``ray.train.report`` the epoch, with a checkpoint (rank 0 writes it; every rank's RNG state) when due."""
    import ray.train

    if not checkpoint:
        ray.train.report(metrics)
        return
    rng = [torch.get_rng_state()]
    if dist:
        rng = [None] * world
        torch.distributed.all_gather_object(rng, torch.get_rng_state())
    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if rank == 0:
            losses = {k: v for k, v in metrics.items() if k.startswith("epoch.")}
            save_checkpoint(inner, opt, {"epoch": metrics["epoch"], "step": metrics["step"],
                                         "resumes": metrics["resumes"], "world_size": world, "metrics": losses}, rng, d)
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=ckpt)


def _metrics(values: dict[str, float], step: int) -> list:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(k, float(v), ts, step) for k, v in values.items()]


def training_table(features: pa.Table, region_words: dict[str, list[str]], word_index: dict[str, int]) -> pa.Table:
    """Features rows + region-word pairs (``pair_slot``, ``pair_word``); images with no pair are dropped.

    The in-memory reference of :func:`training_dataset` (tests, benchmarks)."""
    slots_col, words_col, keep = [], [], []
    for i, rids in enumerate(features.column("region_ids").to_pylist()):
        slots, wids = [], []
        for s, rid in enumerate(rids or []):
            for w in region_words.get(rid, ()):
                slots.append(s)
                wids.append(word_index[w])
        if slots:
            keep.append(i)
            slots_col.append(slots)
            words_col.append(wids)
    t = features.select(["image_id", "features", "num_boxes", "feature_dim"]).take(pa.array(keep, pa.int64()))
    return t.append_column("pair_slot", pa.array(slots_col, pa.list_(pa.int32()))) \
            .append_column("pair_word", pa.array(words_col, pa.list_(pa.int32()))) \
            .append_column("num_pairs", pa.array([len(x) for x in slots_col], pa.int64()))


def training_dataset(store: Store, features_rel_: str, region_words: dict[str, list[str]],
                     word_index: dict[str, int]):
    """Training rows through Ray Data: the features artifact joined with the VG region words.

    :class:`mask.pipeline.pair_join.PairJoin` runs in Ray tasks (their rows can be rebuilt by lineage when a
    node is lost); the result is materialised in Ray's object store (spilling to disk when large), so every epoch
    iterates it without re-reading storage and the trainer's workers can take every CPU.

    Returns:
        ``(dataset, {"images", "pairs"})``.
    """
    ids = region_words if isinstance(region_words, RegionWords) else \
        {rid: [word_index[w] for w in ws] for rid, ws in region_words.items()}
    ds = features_dataset(store, features_rel_, KNOWLEDGE_COLUMNS)
    # a seeded training sees the same rows in the same order on every run: Ray Data keeps the order of the
    # blocks (ExecutionOptions.preserve_order) here and in Ray Train's ingest (ingest_options)
    ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(PairJoin(ids), batch_size=256, batch_format="numpy").materialize()
    # Ray Train splits this dataset again every epoch (in its SplitCoordinator actor); a progress bar per epoch
    # split is noise (the materialisation above had its bar, training reports its epochs).  Ray Data's warning
    # that this setting causes is kept off the console by mask.pipeline.console.
    ds.context.enable_progress_bars = False
    images = ds.count()
    # a projection per block (no aggregation shuffle): only the small column reaches the driver
    pairs = sum(int(np.sum(b["num_pairs"])) for b in
                ds.select_columns(["num_pairs"]).iter_batches(batch_size=None, batch_format="numpy"))
    return ds, {"images": images, "pairs": pairs}


def ingest_options():
    """Ray Train's ingest options for the training dataset: its defaults (the current DataContext's resource
    limits and progress setting; ``DataConfig.default_ingest_options`` would also pass the deprecated
    ``exclude_resources``) with the block order kept, so the seeded local shuffle of every epoch starts from
    the same order."""
    from ray.data import DataContext, ExecutionOptions

    cur = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=cur.resource_limits, preserve_order=True,
                            verbose_progress=cur.verbose_progress)


def _cpus_per_worker(cfg: MaskConfig) -> float:
    """CPUs each Ray Train worker asks for: ``train.cpus_per_worker`` (config, not the cluster's size)."""
    return cfg.train.cpus_per_worker


def _checkpoint_uri(store: Store, path: str) -> str:
    return path if store.protocol == "file" else f"s3://{path}"


def _worker_error(err: BaseException) -> BaseException | None:
    """The checkpoint/run error raised inside a training worker, if that is what failed the run."""
    for e in getattr(err, "worker_failures", {}).values():
        seen = set()
        while e is not None and id(e) not in seen:
            seen.add(id(e))
            if isinstance(e, CheckpointError | TrainingRunError):
                return e
            e = getattr(e, "cause", None) or e.__cause__
    return None


def _train_storage(ctx: JobContext) -> tuple[Any, str]:
    """(pyarrow filesystem, fs-native folder) where Ray Train keeps its runs: ``<storage root>/train``."""
    storage_path = ctx.store.path("train")
    if ctx.store.protocol == "file":
        os.makedirs(storage_path, exist_ok=True)
    return ctx.store.pyarrow_filesystem(), storage_path


def resume_point(ctx: JobContext, run_name: str, module) -> dict[str, Any] | None:
    """The latest checkpoint of a training run, checked against the model, or None for a new run.

    Args:
        ctx: job context (storage root, config).
        run_name: the Ray Train run name.
        module: a :class:`mask.pipeline.train.TrainModule` of this config; the checkpoint's weights
            are loaded into it.

    Returns:
        The checkpoint's state (``epoch`` 0-based, ``step``, ``resumes``) plus ``uri`` and ``fs_path``.

    Raises:
        CheckpointError: the checkpoint cannot be read or does not match the model (names the file).
        TrainingRunError: it is past ``train.epochs`` (a shorter rerun cannot un-train).
    """
    import ray.train

    fs, storage_path = _train_storage(ctx)
    path = latest_checkpoint(fs, f"{storage_path}/{run_name}")
    if path is None:
        return None
    with ray.train.Checkpoint(path, filesystem=fs).as_directory() as d:
        meta = load_checkpoint_dir(d, module)
    meta.pop("state", None)
    meta.update(uri=_checkpoint_uri(ctx.store, path), fs_path=path)
    if meta["epoch"] > ctx.cfg.train.epochs - 1:
        raise TrainingRunError(
            f"training run {run_name}: its latest checkpoint {meta['uri']} is after epoch {meta['epoch'] + 1}, "
            f"past train.epochs={ctx.cfg.train.epochs}; raise train.epochs, or set train.run_name to train a "
            "separate run")
    return meta


def run_training(ctx: JobContext, ds, stats: dict[str, int], word_vectors: np.ndarray, run_id: str | None,
                 tracking_uri: str | None, run_name: str) -> tuple[bytes, dict[str, Any]]:
    """Ray Train (``TorchTrainer``) on the training rows; returns (PAE safetensors bytes, summary).

    Resume: Ray Train V2 reloads the run's checkpoint list from ``<storage>/train/<run_name>`` when
    ``fit()`` runs again under the same name and hands its latest checkpoint to the workers (checked
    with ray 2.60: no flag needed); after a worker failure it restarts the worker group from it
    (``train.max_failures``).  The driver checks the run's newest checkpoint first (:func:`resume_point`:
    a corrupt or mismatched one fails here, naming the file).  Workers also look at the run's storage
    folder (:func:`mask.pipeline.train.resume_checkpoint`): a checkpoint persisted just before a worker
    died may not be registered by Ray yet, and a run folder may hold checkpoints without a Ray
    snapshot (V2 deprecates ``resume_from_checkpoint``).

    Args:
        ctx: job context.  ds: training rows (Ray Dataset).  stats: ``images``, ``pairs`` of ``ds``.
        word_vectors: (V, N) vectors of the vocabulary.  run_id, tracking_uri: MLflow run for the
            workers' metrics (None = none).  run_name: Ray Train run name.

    Raises:
        CheckpointError, TrainingRunError: see :func:`resume_point`.
        NonFiniteLoss: a loss term became NaN/inf (the message names the step and the term).
    """
    import ray.train
    import ray.train.torch
    from ray.train.torch import TorchTrainer

    cfg = ctx.cfg
    if stats["pairs"] == 0:
        raise ValueError(f"dataset {cfg.dataset.name}: no region carries a vocabulary word; nothing to train on")
    fs, storage_path = _train_storage(ctx)
    module = TrainModule(cfg, word_vectors.shape[0])
    prior = resume_point(ctx, run_name, module)
    if prior is not None:
        logger.info("training run %s: continuing after epoch %d from %s", run_name, prior["epoch"] + 1, prior["uri"])
    ensure_gpus(cfg, "train.use_gpu", 1 if cfg.train.use_gpu else 0)
    train_level = train_log_level(logger.isEnabledFor(logging.DEBUG))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "word_vectors": word_vectors,
                           "pairs_per_image": stats["pairs"] / max(stats["images"], 1),
                           "mlflow_run_id": run_id, "tracking_uri": tracking_uri,
                           "fault": driver_spec(), "train_log_level": train_level,
                           "run_storage": (fs, f"{storage_path}/{run_name}")},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": _cpus_per_worker(cfg), **({"GPU": 1} if cfg.train.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Ray Train's per-report and checkpoint lines stay in its log files (mask.pipeline.console)
            logging_config=ray.train.LoggingConfig(log_level=train_level)),
        datasets={"train": ds},
        dataset_config=ray.train.DataConfig(execution_options=ingest_options()),
        **({} if cfg.train.dist_backend == "auto"
           else {"torch_config": ray.train.torch.TorchConfig(backend=cfg.train.dist_backend)}),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:
        inner = _worker_error(e)
        if inner is not None:
            raise inner from e
        raise
    secs = time.perf_counter() - t0
    metrics = dict(result.return_value or result.metrics or {})
    if isinstance(metrics.get("nonfinite"), NonFiniteLoss):
        raise metrics["nonfinite"]
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        meta = load_checkpoint_dir(d, module)
    summary = _training_summary(run_name, _checkpoint_uri(ctx.store, result.checkpoint.path), meta, stats,
                                word_vectors.shape[0], prior)
    summary["train_seconds"] = round(secs, 2)
    summary.update({k: v for k, v in metrics.items()
                    if isinstance(v, int | float) and (k.startswith("epoch.") or k in ("pairs_per_s", "epoch_seconds"))})
    return save_pae(module.net.pae), summary


def _training_summary(run_name: str, uri: str, meta: dict[str, Any], stats: dict[str, int] | None,
                      num_words: int, prior: dict[str, Any] | None) -> dict[str, Any]:
    return {"run_name": run_name, "checkpoint": uri, "final_epoch": meta["epoch"], "steps": meta["step"],
            "resumes": int(meta.get("resumes", 0)), "vocabulary": int(num_words),
            "continued_from_epoch": prior["epoch"] + 1 if prior is not None else 0, "reused": False,
            **(stats or {})}


def train_model(ctx: JobContext, inputs: TrainingInputs, run, tracking_uri: str | None) -> tuple[bytes, dict[str, Any]]:
    """Ray Data join → Ray Train, or the finished run's checkpoint when it already reached
    ``train.epochs``; logs the summary to the job's MLflow run and records the final checkpoint there
    (tag ``train.checkpoint`` and the artifact ``train/checkpoint.json``)."""
    if not inputs.word_index:
        raise ValueError(f"dataset {ctx.cfg.dataset.name}: the vocabulary is empty "
                         f"({inputs.vocab['report']}); nothing to train")
    name = train_run_name(ctx.cfg, inputs.features_rel)
    run.set_tags({"train.run_name": name})
    try:
        module = TrainModule(ctx.cfg, len(inputs.word_index))
        prior = resume_point(ctx, name, module)
        if prior is not None and prior["epoch"] == ctx.cfg.train.epochs - 1:
            logger.info("training run %s already finished epoch %d; reusing %s", name, prior["epoch"] + 1, prior["uri"])
            pae_bytes = save_pae(module.net.pae)
            tsum = {**_training_summary(name, prior["uri"], prior, None, len(inputs.word_index), None),
                    "reused": True, **prior.get("metrics", {})}
        else:
            ds, stats = training_dataset(ctx.store, inputs.features_rel, inputs.region_words, inputs.word_index)
            pae_bytes, tsum = run_training(ctx, ds, stats, inputs.vocab["vectors"], run.run_id, tracking_uri, name)
    except Exception as e:
        run.set_tags({"train.error": f"{type(e).__name__}: {e}"})
        raise
    run.log_metrics({f"train.{k}": float(v) for k, v in tsum.items()
                     if isinstance(v, int | float) and not isinstance(v, bool)})
    run.set_tags({"train.checkpoint": tsum["checkpoint"]})
    run.log_dict({k: tsum[k] for k in ("run_name", "checkpoint", "final_epoch", "steps", "resumes")},
                 "train/checkpoint.json")
    return pae_bytes, tsum


def train_job(cfg: MaskConfig) -> dict[str, Any]:
    """The training job: dataset → features → vocabulary → Ray Train, in its own MLflow run.

    Returns:
        A summary: ``dataset``, ``features``, ``vocabulary`` (incl. words without a vector),
        ``training`` (run name, checkpoint URI, epochs, steps, resumes, final losses, pairs/s) and
        ``mlflow`` (tracking URI, run id).
    """
    check_inputs(cfg, ["dataset"])  # before Ray and MLflow start
    ctx = JobContext.from_config(cfg)
    uri = ctx.tracking_uri
    with job_run(ctx, "train") as run:
        inputs = prepare_training_inputs(ctx, run)
        _, tsum = train_model(ctx, inputs, run, uri)
        return {**inputs.summary, "training": tsum,
                "mlflow": {"tracking_uri": uri if run.run_id else None, "run_id": run.run_id}}
