"""Optional domain adaptation of the knowledge (Appendix H, eq. 88–93).

Given unpaired images and texts of a target domain, a matrix ``W`` (Z × Z, initialised to the
identity) is learned with a bidirectional region–word cycle-consistency loss; the fine-tuned
knowledge is then ``v̂_k = v_k W`` for every prototype.

Per batch of I region means μ (I, Z) and J caption-word prototypes u (J, Z)::

    S = uW (μW)ᵀ                                             (88)  (J, I)
    û = softmax_rows(S) μW,   μ̂ = softmax_rows(Sᵀ) uW         (89)  (J, Z), (I, Z)
    L_R2W = Σ_j CE(row j of uW ûᵀ, target j)                  (90, 91)
    L_W2R = Σ_n CE(row n of μW μ̂ᵀ, target n)                  (90, 92)
    L_ss  = L_R2W + L_W2R                                      (93)

(eq. 90 writes ``softmax(uWûᵀ)ᵀ`` and takes its columns, i.e. the softmax rows of ``uWûᵀ``: word j
must pick its own reconstruction û_j among all reconstructions.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mask.errors import MaskError

logger = logging.getLogger(__name__)


class FinetuneInputError(MaskError, ValueError):
    """An input to the fine-tuning of the wrong shape or range; the message names it."""


def cycle_consistency_loss(u: Tensor, mu: Tensor, W: Tensor,
                           reduction: Literal["sum", "mean"] = "sum") -> dict[str, Tensor]:
    """Bidirectional region–word cycle-consistency loss (eq. 88–93).

    Args:
        u: prototypes of the batch's caption words (J, Z).
        mu: region means of the batch's images (I, Z).
        W: the transformation (Z, Z).
        reduction: ``"sum"`` over words/regions as eq. 91–92 write it, or ``"mean"``.

    Returns:
        ``{"loss_ss", "loss_r2w", "loss_w2r"}`` scalars.
    """
    for name, t in (("u", u), ("mu", mu), ("W", W)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise FinetuneInputError(f"{name} must be a 2-D tensor")
    z = W.shape[0]
    if W.shape != (z, z) or u.shape[1] != z or mu.shape[1] != z:
        raise FinetuneInputError(f"shapes u {tuple(u.shape)}, mu {tuple(mu.shape)}, W {tuple(W.shape)} "
                                 "do not fit (J, Z), (I, Z), (Z, Z)")
    if u.shape[0] == 0 or mu.shape[0] == 0:
        raise FinetuneInputError(f"need at least one word and one region, got J={u.shape[0]}, I={mu.shape[0]}")
    uw = u @ W  # (J, Z)
    mw = mu @ W  # (I, Z)
    s = uw @ mw.T  # (J, I)  eq. 88
    u_hat = torch.softmax(s, dim=1) @ mw  # (J, Z)  eq. 89
    mu_hat = torch.softmax(s.T, dim=1) @ uw  # (I, Z)
    r2w = F.cross_entropy(uw @ u_hat.T, torch.arange(u.shape[0], device=u.device), reduction=reduction)
    w2r = F.cross_entropy(mw @ mu_hat.T, torch.arange(mu.shape[0], device=mu.device), reduction=reduction)
    return {"loss_ss": r2w + w2r, "loss_r2w": r2w, "loss_w2r": w2r}


def _checked_prototypes(prototypes: np.ndarray, steps: int) -> np.ndarray:
    """The prototypes as an array, checked: a finite float (K, Z) array; and ``steps`` ≥ 0."""
    protos = np.asarray(prototypes)
    if protos.ndim != 2 or not np.issubdtype(protos.dtype, np.floating):
        raise FinetuneInputError(f"prototypes must be a float (K, Z) array, got {protos.dtype} {protos.shape}")
    if not np.isfinite(protos).all():
        raise FinetuneInputError("prototypes contain NaN or inf")
    if steps < 0:
        raise FinetuneInputError(f"steps must be >= 0, got {steps}")
    return protos


def _checked_batch(mu_b: np.ndarray, ids_b: np.ndarray, k: int, z: int) -> tuple[Tensor, np.ndarray]:
    """One step's batch, checked: region means μ as a finite float32 (I, Z) tensor and word indices as a 1-D
    integer array within [0, K) (either may be empty)."""
    mu_t = torch.as_tensor(np.asarray(mu_b), dtype=torch.float32)  # (I, Z)
    ids = np.asarray(ids_b)
    if mu_t.dim() != 2 or mu_t.shape[1] != z:
        raise FinetuneInputError(f"image_mu batch has shape {tuple(mu_t.shape)}, expected (I, {z})")
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise FinetuneInputError(f"word batch must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= k):
        raise FinetuneInputError(f"word batch has indices outside [0, {k})")
    if not torch.isfinite(mu_t).all():
        raise FinetuneInputError("image_mu batch contains NaN or inf")
    return mu_t, ids


def _adam_step(u: Tensor, mu: Tensor, W: Tensor, opt: torch.optim.Optimizer,
               reduction: Literal["sum", "mean"]) -> dict[str, Tensor]:
    """One Adam update of W on L_ss (eq. 93); returns the loss terms (eq. 91–93) before the update."""
    terms = cycle_consistency_loss(u, mu, W, reduction)
    opt.zero_grad(set_to_none=True)
    terms["loss_ss"].backward()
    opt.step()
    return terms


def finetune_prototypes(prototypes: np.ndarray, image_mu_batches: Iterable[np.ndarray],
                        word_batches: Iterable[np.ndarray], steps: int, lr: float = 1e-3, seed: int = 0,
                        *, normalize: bool = True, reduction: Literal["sum", "mean"] = "sum",
                        history: list[dict[str, float]] | None = None) -> np.ndarray:
    """Learn the domain transformation W of Appendix H with Adam.

    Batches are taken in turn from ``zip(image_mu_batches, word_batches)`` (images and words are
    unpaired; the zip only schedules them).  Re-iterable inputs (lists, arrays) are cycled until
    ``steps`` updates are done; one-shot iterators stop the training when exhausted (logged).
    Batches with no region or no word are skipped and counted in the log.

    Args:
        prototypes: knowledge prototypes v (K, Z).
        image_mu_batches: per step, region means μ (I, Z) of some target-domain images.
        word_batches: per step, word indices (J,) into ``prototypes`` of some target-domain captions.
        steps: optimiser steps.
        lr: Adam learning rate.
        seed: seeds torch inside a forked RNG (no global effect); the update itself is deterministic.
        normalize: L2-normalise u and μ rows first (as scoring does); the direction of ``v W`` does
            not depend on the norm of v, so W applies to unnormalised prototypes too.
        reduction: see :func:`cycle_consistency_loss`.
        history: when given, one ``{"loss_ss", "loss_r2w", "loss_w2r"}`` dict per step is appended
            (the terms of eq. 91–93 before that step's update).

    Returns:
        W (Z, Z) float32; apply as ``v_hat = v @ W``.
    """
    protos = _checked_prototypes(prototypes, steps)
    k, z = protos.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        v = torch.as_tensor(protos, dtype=torch.float32)  # (K, Z)
        if normalize:
            v = F.normalize(v, dim=-1)
        W = torch.nn.Parameter(torch.eye(z))  # (Z, Z)
        opt = torch.optim.Adam([W], lr=lr)
        done = skipped = 0
        last = float("nan")
        pairs = iter(zip(image_mu_batches, word_batches, strict=False))
        used_in_pass = 0
        while done < steps:
            try:
                mu_b, ids_b = next(pairs)
            except StopIteration:
                if used_in_pass == 0:
                    if skipped:
                        raise FinetuneInputError("every batch is empty (no region or no word)") from None
                    logger.warning("finetune: no batches after %d of %d steps", done, steps)
                    break
                used_in_pass = 0
                pairs = iter(zip(image_mu_batches, word_batches, strict=False))
                try:
                    mu_b, ids_b = next(pairs)
                except StopIteration:
                    logger.warning("finetune: batches exhausted after %d of %d steps", done, steps)
                    break
            mu_t, ids = _checked_batch(mu_b, ids_b, k, z)  # (I, Z), (J,)
            if mu_t.shape[0] == 0 or ids.size == 0:
                skipped += 1
                continue
            if normalize:
                mu_t = F.normalize(mu_t, dim=-1)
            terms = _adam_step(v[torch.as_tensor(ids, dtype=torch.long)], mu_t, W, opt, reduction)
            last = float(terms["loss_ss"].detach())
            if history is not None:
                history.append({k: float(v.detach()) for k, v in terms.items()})
            if not np.isfinite(last):
                raise FloatingPointError(f"finetune step {done}: loss_ss is {last}")
            done += 1
            used_in_pass += 1
    logger.info("finetune: %d steps, %d empty batches skipped, last loss_ss %.4f", done, skipped, last)
    return W.detach().numpy().astype(np.float32)
