"""Distributed MASK training with Ray Train (eq. 14 over VG region–word pairs).

``train_loop_per_worker(config)`` is the whole per-worker loop: DDP model (gloo on CPU, NCCL on GPU),
data from ``get_dataset_shard("train")`` as batches of *images* with their regions (padding mask) so
self-attention sees each image's regions, checkpoints (model, optimiser, epoch, step, RNG) through
``ray.train.report``, resume from ``ray.train.get_checkpoint()`` after a worker failure or on a rerun
of the same run name, and MLflow metrics from rank 0.

Training rows (one per image): ``image_id, features (list<float16> n×M), num_boxes, feature_dim,
pair_slot (list<int32>), pair_word (list<int32>)`` — a region with several words gives several pairs.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mask.config import MaskConfig

logger = logging.getLogger(__name__)

FAULT_ENV = "MASK_FAULT_INJECT"  # read by the driver: "train_epoch:<n>:<marker path>" (fault tests)


class TrainModule(torch.nn.Module):
    """The trained parameters in one module so DDP sees them all: MaskNet + the learnable prototypes."""

    def __init__(self, cfg: MaskConfig, num_words: int):
        super().__init__()
        from mask.models import PrototypeTable, build_model

        self.net = build_model(cfg.model)
        self.prototypes = PrototypeTable(num_words, cfg.model.latent_dim)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(features, mask)


def collate(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Rows of images → padded tensors and flattened pairs.

    Returns ``features`` (B, R, M), ``mask`` (B, R), ``pair_image``/``pair_slot``/``pair_word`` (P,).
    """
    n = len(batch["num_boxes"])
    counts = [int(c) for c in batch["num_boxes"]]
    dim = int(batch["feature_dim"][0])
    r_max = max(max(counts), 1)
    feats = np.zeros((n, r_max, dim), np.float32)  # (B, R, M)
    mask = np.zeros((n, r_max), bool)  # (B, R)
    pi, ps, pw = [], [], []
    for i in range(n):
        c = counts[i]
        if c:
            feats[i, :c] = np.asarray(batch["features"][i], np.float32).reshape(c, dim)
            mask[i, :c] = True
        slots = np.asarray(batch["pair_slot"][i], np.int64)
        pi.append(np.full(len(slots), i, np.int64))
        ps.append(slots)
        pw.append(np.asarray(batch["pair_word"][i], np.int64))
    return {
        "features": torch.from_numpy(feats).to(device),
        "mask": torch.from_numpy(mask).to(device),
        "pair_image": torch.from_numpy(np.concatenate(pi)).to(device),
        "pair_slot": torch.from_numpy(np.concatenate(ps)).to(device),
        "pair_word": torch.from_numpy(np.concatenate(pw)).to(device),
    }


def _maybe_inject_fault(epoch: int, spec: str) -> None:
    """Fault injection for the resume tests: ``train_epoch:<n>:<marker>`` kills this worker once at epoch n."""
    if not spec.startswith("train_epoch:"):
        return
    _, at, marker = spec.split(":", 2)
    if int(at) == epoch and not Path(marker).exists():
        Path(marker).write_text("fired")
        logger.warning("fault injection: killing this training worker at epoch %d", epoch)
        os._exit(1)


def _save_checkpoint(module: TrainModule, opt: torch.optim.Optimizer, epoch: int, step: int,
                     directory: str) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, os.path.join(directory, "model.safetensors"))
    torch.save(opt.state_dict(), os.path.join(directory, "optimizer.pt"))
    torch.save({"torch_rng": torch.get_rng_state()}, os.path.join(directory, "rng.pt"))
    with open(os.path.join(directory, "state.json"), "w") as f:
        json.dump({"epoch": epoch, "step": step}, f)


def load_checkpoint_dir(directory: str, module: TrainModule | None = None,
                        opt: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load a training checkpoint folder; a corrupt or mismatched one raises naming the file."""
    from safetensors.torch import load_file

    path = os.path.join(directory, "model.safetensors")
    try:
        state = load_file(path)
        meta = json.loads(Path(directory, "state.json").read_text())
    except Exception as e:
        raise CheckpointError(f"training checkpoint {directory}: unreadable ({e})") from e
    if module is not None:
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"training checkpoint {path}: does not match the model: {e}") from e
    if opt is not None:
        opt.load_state_dict(torch.load(os.path.join(directory, "optimizer.pt"), weights_only=True))
        rng = torch.load(os.path.join(directory, "rng.pt"), weights_only=True)
        torch.set_rng_state(rng["torch_rng"])
    return {"state": state, **meta}


class CheckpointError(ValueError):
    """A training checkpoint that cannot be read or does not match the model."""


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop (see module docstring)."""
    import ray.train
    import ray.train.torch

    from mask.losses import check_finite, mask_loss

    cfg = MaskConfig.model_validate(config["cfg"])
    word_vectors = torch.as_tensor(np.asarray(config["word_vectors"], np.float32))  # (V, N)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg.train.seed + rank)
    device = ray.train.torch.get_device()
    module = TrainModule(cfg, word_vectors.shape[0])
    opt = torch.optim.Adam(module.parameters(), lr=cfg.train.lr)
    start_epoch, step = 0, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            meta = load_checkpoint_dir(d, module, opt)
        start_epoch, step = meta["epoch"] + 1, meta["step"]
        logger.info("resuming from checkpoint at epoch %d", meta["epoch"])
    model = ray.train.torch.prepare_model(module)
    inner: TrainModule = model.module if hasattr(model, "module") else model
    word_vectors = word_vectors.to(device)
    shard = ray.train.get_dataset_shard("train")
    client = None
    if rank == 0 and config.get("mlflow_run_id"):
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=config["tracking_uri"])
    weights = {"lambda_cm": cfg.loss.lambda_cm, "lambda_cl": cfg.loss.lambda_cl,
               "kl_weight": cfg.loss.kl_weight, "tau": cfg.loss.tau, "dias_weight": cfg.loss.dias_weight}
    for epoch in range(start_epoch, cfg.train.epochs):
        _maybe_inject_fault(epoch, config.get("fault", ""))
        late = cfg.train.late_epoch is not None and epoch >= cfg.train.late_epoch
        pairs_per_batch = cfg.train.batch_size_late if (late and cfg.train.batch_size_late) else cfg.train.batch_size
        images_per_batch = max(1, round(pairs_per_batch / config["pairs_per_image"]))
        model.train()
        sums: dict[str, float] = {}
        n_batches, n_pairs, t0 = 0, 0, time.perf_counter()
        for batch in shard.iter_batches(batch_size=images_per_batch, batch_format="numpy",
                                        local_shuffle_buffer_size=max(images_per_batch * 4, 64),
                                        local_shuffle_seed=cfg.train.seed + epoch):
            b = collate(batch, device)
            if b["pair_word"].numel() == 0:
                continue
            b["word_vectors"] = word_vectors
            out = model(b["features"], b["mask"])
            terms = mask_loss(out, b, prototypes=inner.prototypes.weight, **weights)
            check_finite(terms, step)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            step += 1
            n_batches += 1
            n_pairs += int(b["pair_word"].numel())
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            if client is not None and step % config.get("log_every", 10) == 0:
                client.log_batch(config["mlflow_run_id"], metrics=_metrics(
                    {f"step.{k}": float(v.detach()) for k, v in terms.items()}, step))
        secs = time.perf_counter() - t0
        metrics = {f"epoch.{k}": v / max(n_batches, 1) for k, v in sums.items()}
        metrics.update({"epoch": epoch, "pairs_per_s": n_pairs * ctx.get_world_size() / max(secs, 1e-9),
                        "step": step})
        if client is not None:
            client.log_batch(config["mlflow_run_id"], metrics=_metrics(metrics, epoch))
        last = epoch == cfg.train.epochs - 1
        if last or (epoch + 1) % cfg.train.checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:
                    _save_checkpoint(inner, opt, epoch, step, d)
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=checkpoint)
        else:
            ray.train.report(metrics)


def _metrics(values: dict[str, float], step: int) -> list:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(k, float(v), ts, step) for k, v in values.items()]
