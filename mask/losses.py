"""Training losses of MASK (eq. 5, 6, 9, 14) and the optional DIAS dimension-alignment term.

Functions of tensors that return named terms, the total being their weighted sum (eq. 14)::

    L = L_ir + λ1·L_cm + λ2·L_cl [+ w_dias·L_dim]

The region–word pairs of a batch are flattened: a region that carries several words gives several
pairs.  :func:`mask_loss` builds them from a padded batch of images and :class:`mask.models.MaskNet`
outputs; the per-term functions take the flattened tensors.

Rules for degenerate batches (documented, never NaN):

* no real region → ``loss_ir`` terms are 0; no pair → ``loss_cm``, ``loss_cl``, ``loss_dias`` are 0;
* a single pair → the ``i ≠ j`` structure term of L_cm is 0 (there is no ordered pair ``i ≠ j``);
* zero vectors have cosine 0 with everything (``F.normalize`` with eps).

Zeros are returned as ``x.sum() * 0`` of an input so the autograd graph still reaches every
parameter (DDP expects that).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mask.errors import MaskError

logger = logging.getLogger(__name__)

_EPS = 1e-8


class LossInputError(MaskError, ValueError):
    """A loss input of the wrong shape, dtype or range; the message names the input."""


class NonFiniteLoss(MaskError, FloatingPointError):
    """A loss term is NaN or infinite.

    Attributes:
        term: the name of the first non-finite term.
        value: its value as text (``nan``, ``inf``, ``-inf``).
        step: the training step given by the caller, or None.
    """

    exit_code = 1  # not bad input: the run failed

    def __init__(self, term: str, value: str, step: int | None = None):
        self.term, self.value, self.step = term, value, step
        prefix = f"step {step}: " if step is not None else ""
        super().__init__(f"{prefix}{term} is {value}")

    def __reduce__(self):
        # pickles with its fields (a Ray worker hands it to the driver as it is, not as text)
        return type(self), (self.term, self.value, self.step)


def _zero(*like: Tensor) -> Tensor:
    """A scalar 0 that keeps the autograd graph of ``like`` (all inputs are empty or unused)."""
    return sum(t.sum() * 0.0 for t in like)  # type: ignore[return-value]


def _check_2d(t: Tensor, name: str, rows: int | None = None, cols: int | None = None) -> None:
    if not isinstance(t, Tensor) or t.dim() != 2:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise LossInputError(f"{name} must be a 2-D tensor, got {got}")
    if rows is not None and t.shape[0] != rows:
        raise LossInputError(f"{name} has {t.shape[0]} rows, expected {rows}")
    if cols is not None and t.shape[1] != cols:
        raise LossInputError(f"{name} has {t.shape[1]} columns, expected {cols}")


def _check_index(t: Tensor, name: str, n: int | None = None, high: int | None = None) -> None:
    if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype not in (torch.int64, torch.int32):
        got = (tuple(t.shape), t.dtype) if isinstance(t, Tensor) else type(t).__name__
        raise LossInputError(f"{name} must be a 1-D integer tensor, got {got}")
    if n is not None and t.shape[0] != n:
        raise LossInputError(f"{name} has length {t.shape[0]}, expected {n}")
    if high is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= high):
        raise LossInputError(f"{name} has values in [{int(t.min())}, {int(t.max())}], "
                             f"outside [0, {high})")


# ---------------------------------------------------------------------------------------------------
# The terms


IR_REDUCTIONS = ("sum", "mean")


def loss_ir(r: Tensor, r_rec: Tensor, mu: Tensor, logvar: Tensor, kl_weight: float = 1.0,
            reduction: str = "sum") -> dict[str, Tensor]:
    """Information retention loss L_ir (eq. 5) over the real regions.

    ``reduction="sum"``: ``loss_kl`` = KL(N(mu, σ²) ‖ N(0, I)) summed over Z and averaged over
    regions; ``loss_rec`` = ``‖r − r'‖²`` (squared L2 summed over M) averaged over regions.
    ``reduction="mean"``: both are also averaged over their dimension — the reconstruction per
    feature dimension (÷ M), the KL per latent dimension (÷ Z) — so L_ir is of the size of L_cm and
    L_cl instead of ~M times larger.  Eq. 5 does not say how the terms are reduced.
    ``loss_ir`` = ``loss_rec + kl_weight · loss_kl``.

    Args:
        r: raw features (P_r, M).  r_rec: restored features (P_r, M).
        mu: means (P_r, Z).  logvar: log σ² (P_r, Z).
        kl_weight: weight of the KL term; 0 skips its compute ("w/o KL" ablation, no ``loss_kl`` key).
        reduction: "sum" or "mean" over the feature / latent dimension (see above).

    Returns:
        ``{"loss_ir", "loss_rec"[, "loss_kl"]}`` scalars.
    """
    _check_2d(r, "r")
    _check_2d(r_rec, "r_rec", r.shape[0], r.shape[1])
    _check_2d(mu, "mu", r.shape[0])
    _check_2d(logvar, "logvar", r.shape[0], mu.shape[1])
    if reduction not in IR_REDUCTIONS:
        raise LossInputError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    dim_reduce = (lambda t: t.sum(-1)) if reduction == "sum" else (lambda t: t.mean(-1))
    if r.shape[0] == 0:
        rec = _zero(r_rec)
    else:
        rec = dim_reduce((r - r_rec).pow(2)).mean()
    out = {"loss_rec": rec}
    total = rec
    if kl_weight > 0:
        if r.shape[0] == 0:
            kl = _zero(mu, logvar)
        else:
            kl = dim_reduce(0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)).mean()
        out["loss_kl"] = kl
        total = total + kl_weight * kl
    out["loss_ir"] = total
    return out


def loss_cm(w_true: Tensor, w_pred: Tensor, mu: Tensor) -> Tensor:
    """Cross-modal alignment loss L_cm (eq. 9) over P region–word pairs.

    ``E_i[1 − cos(w_i, w'_i)] + E_{i≠j}[(cos(w'_i, w'_j) − cos(μ_i, μ_j))²]``; the second expectation
    runs over the ``P(P−1)`` ordered pairs ``i ≠ j`` and is 0 when ``P < 2``.  Gradients reach both
    the MTM (through w') and the PAE (through μ and w'), as Appendix F requires.

    Args:
        w_true: word vectors w (P, N).  w_pred: MTM outputs w' (P, N).  mu: region means μ (P, Z).

    Returns:
        The scalar L_cm.
    """
    _check_2d(w_true, "w_true")
    _check_2d(w_pred, "w_pred", w_true.shape[0], w_true.shape[1])
    _check_2d(mu, "mu", w_true.shape[0])
    p = w_true.shape[0]
    if p == 0:
        return _zero(w_pred, mu)
    wt = F.normalize(w_true, dim=-1, eps=_EPS)  # (P, N)
    wp = F.normalize(w_pred, dim=-1, eps=_EPS)  # (P, N)
    word = (1.0 - (wt * wp).sum(-1)).mean()
    if p < 2:
        return word + _zero(mu)
    mn = F.normalize(mu, dim=-1, eps=_EPS)  # (P, Z)
    diff = (wp @ wp.T - mn @ mn.T).pow(2)  # (P, P)
    off = ~torch.eye(p, dtype=torch.bool, device=diff.device)  # (P, P)
    struct = diff.masked_fill(~off, 0.0).sum() / (p * (p - 1))
    return word + struct


def loss_cl(mu: Tensor, word_ids: Tensor, prototypes: Tensor, tau: float, *,
            region_ids: Tensor | None = None, normalize: bool = True, exclude_same_word: bool = True) -> Tensor:
    """Prototype consistency contrastive loss L_cl (eq. 6), InfoNCE of prototypes against regions.

    For each pair k (word w_k, region ρ_k)::

        −log exp(s(v_{w_k}, μ_{ρ_k})/τ) / Σ_{n ∈ N_k} exp(s(v_{w_k}, μ_n)/τ)

    averaged over pairs.  The candidates n are the distinct regions of the batch (a region that
    appears in several pairs counts once); N_k keeps the positive ρ_k and drops every other region
    that also carries word w_k — regions of the same word are not negatives of each other
    (``exclude_same_word=True``, our reading; ``False`` keeps every other region of the batch in the
    denominator, the literal form of eq. 6).

    With ``normalize=True`` (default) ``s`` is the cosine (v and μ L2-normalised), the usual InfoNCE
    form: μ leaves the PAE's LayerNorm with norm ≈ √Z, so raw dot products over τ = 0.1 would
    saturate the softmax; scoring (eq. 10) also normalises by default.  ``normalize=False`` uses the
    raw dot product of eq. 6.

    Args:
        mu: region means μ of each pair (P, Z).
        word_ids: word index of each pair (P,), into ``prototypes``.
        prototypes: prototype table v (V, Z).
        tau: temperature τ > 0.
        region_ids: region identity of each pair (P,) — pairs sharing it are the same region, and
            its μ is taken from the first of them; None = every pair is its own region.
        normalize: use cosine similarity.
        exclude_same_word: drop the other regions of the same word from the negatives.

    Returns:
        The scalar L_cl (0 when there is no pair).
    """
    _check_2d(mu, "mu")
    p = mu.shape[0]
    _check_2d(prototypes, "prototypes", cols=mu.shape[1])
    _check_index(word_ids, "word_ids", p, prototypes.shape[0])
    if not tau > 0:
        raise LossInputError(f"tau must be > 0, got {tau}")
    if p == 0:
        return _zero(mu, prototypes)
    if region_ids is None:
        region_ids = torch.arange(p, device=mu.device)
    _check_index(region_ids, "region_ids", p)
    _, inv = torch.unique(region_ids, return_inverse=True)  # (P,) pair → distinct region
    n_regions = int(inv.max()) + 1
    arange = torch.arange(p, device=mu.device)
    first = torch.full((n_regions,), p, dtype=torch.long, device=mu.device)
    first = first.scatter_reduce(0, inv, arange, reduce="amin")  # (U,) first pair of each region
    _, winv = torch.unique(word_ids, return_inverse=True)  # (P,) pair → distinct word
    carries = torch.zeros(int(winv.max()) + 1, n_regions, dtype=torch.bool, device=mu.device)  # (W, U)
    carries[winv, inv] = True
    v = prototypes[word_ids]  # (P, Z)
    m = mu[first]  # (U, Z)
    if normalize:
        v = F.normalize(v, dim=-1, eps=_EPS)
        m = F.normalize(m, dim=-1, eps=_EPS)
    logits = v @ m.T / tau  # (P, U)
    is_pos = torch.zeros(p, n_regions, dtype=torch.bool, device=mu.device)  # (P, U)
    is_pos[arange, inv] = True
    if exclude_same_word:
        excluded = carries[winv] & ~is_pos  # (P, U) same-word regions other than the positive
        logits_n = logits.masked_fill(excluded, -math.inf)
    else:
        logits_n = logits
    denom = torch.logsumexp(logits_n, dim=1)  # (P,)
    return (denom - logits[arange, inv]).mean()


def loss_dias(w_pred: Tensor, w_true: Tensor) -> Tensor:
    """Dimension information alignment L_dim (DIAS, Ma et al., eq. 6) between MTM outputs and word vectors.

    Mapping to MASK: DIAS's image and text "dimension vectors" ``m_i^V``, ``m_j^T`` are here the
    columns of ``w_pred`` (P, N) and ``w_true`` (P, N) over the P pairs of the batch (the rows are
    matched, region i ↔ word i).  ``c_ij`` = cosine of column i of ``w_pred`` and column j of
    ``w_true`` (DIAS's default correlation, its eq. 4), and::

        L_dim = −Σ_i ( c⁺_ii / Σ_j c⁺_ij + c⁺_ii / Σ_j c⁺_ji )

    with ``c⁺ = (1 + c) / 2 ∈ [0, 1]``.  The shift is ours: eq. 6 divides by row and column sums,
    which for raw cosines (signed) can be 0 or negative; the affine map keeps every sum positive and
    the order of correlations unchanged.  Uncorrelated outputs give about −2, perfectly aligned
    near-orthogonal columns about −4 (for N ≫ 1).

    Args:
        w_pred: MTM outputs w' (P, N).  w_true: word vectors w (P, N).

    Returns:
        The scalar L_dim (0 when P = 0).
    """
    _check_2d(w_pred, "w_pred")
    _check_2d(w_true, "w_true", w_pred.shape[0], w_pred.shape[1])
    if w_pred.shape[0] == 0:
        return _zero(w_pred)
    a = F.normalize(w_pred, dim=0, eps=_EPS)  # (P, N) unit columns
    b = F.normalize(w_true, dim=0, eps=_EPS)  # (P, N)
    c = 0.5 * (1.0 + a.T @ b)  # (N, N)
    d = c.diagonal()  # (N,)
    rows = c.sum(dim=1).clamp_min(_EPS)  # (N,)
    cols = c.sum(dim=0).clamp_min(_EPS)  # (N,)
    return -(d / rows + d / cols).sum()


# ---------------------------------------------------------------------------------------------------
# Eq. 14 on a padded batch


_BATCH_KEYS = ("features", "mask", "pair_image", "pair_slot", "pair_word", "word_vectors")


def mask_loss(out: Mapping[str, Tensor], batch: Mapping[str, Tensor], *, lambda_cm: float = 3.0,
              lambda_cl: float = 3.0, kl_weight: float = 1.0, tau: float = 0.1, dias_weight: float = 0.0,
              prototypes: Tensor | None = None, cl_normalize: bool = True, cl_exclude_same_word: bool = True,
              ir_reduction: str = "sum") -> dict[str, Tensor]:
    """The full training loss (eq. 14) of one padded batch.

    Args:
        out: :meth:`mask.models.MaskNet.forward` output (``mu``, ``logvar``, ``r_rec``, ``w_pred``).
        batch: ``features`` (B, R, M); ``mask`` (B, R) bool; ``pair_image``, ``pair_slot``,
            ``pair_word`` (P,) long — pair p is region ``(pair_image[p], pair_slot[p])`` with word
            ``pair_word[p]``, an index into ``word_vectors`` (V, N) and ``prototypes`` (V, Z).
        lambda_cm: λ1.  lambda_cl: λ2.  kl_weight: KL weight inside L_ir.  tau: τ of L_cl.
        dias_weight: weight of the DIAS term.
        prototypes: the learnable prototype table (V, Z); required when ``lambda_cl > 0``.
        cl_normalize: cosine (True) or raw dot product in L_cl; see :func:`loss_cl`.
        cl_exclude_same_word: regions of the same word are not negatives in L_cl; see :func:`loss_cl`.
        ir_reduction: "sum" or "mean" over the feature / latent dimension in L_ir; see :func:`loss_ir`.

    Returns:
        ``{"loss", "loss_ir", "loss_rec", "loss_kl", "loss_cm", "loss_cl", "loss_dias"}``; a term
        whose weight is 0 is not computed and its key is absent.  L_ir runs over every real region,
        the other terms over the pairs.
    """
    missing = [k for k in _BATCH_KEYS if k not in batch]
    if missing:
        raise LossInputError(f"batch lacks {missing}")
    missing = [k for k in ("mu", "logvar", "r_rec", "w_pred") if k not in out]
    if missing:
        raise LossInputError(f"model output lacks {missing}")
    feats, mask = batch["features"], batch["mask"]
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise LossInputError("batch['mask'] must be a (B, R) bool tensor")
    if feats.dim() != 3 or tuple(feats.shape[:2]) != tuple(mask.shape):
        raise LossInputError(f"batch['features'] has shape {tuple(feats.shape)}, expected "
                             f"{tuple(mask.shape)} + (M,)")
    n_img, n_slot = mask.shape
    pi, ps, pw = batch["pair_image"], batch["pair_slot"], batch["pair_word"]
    _check_index(pi, "pair_image", high=n_img)
    _check_index(ps, "pair_slot", pi.shape[0], n_slot)
    wv = batch["word_vectors"]
    _check_2d(wv, "word_vectors")
    _check_index(pw, "pair_word", pi.shape[0], wv.shape[0])
    if pi.numel() and not bool(mask[pi, ps].all()):
        bad = int((~mask[pi, ps]).nonzero()[0, 0])
        raise LossInputError(f"pair {bad} points at padded slot (image {int(pi[bad])}, slot {int(ps[bad])})")

    mu, logvar = out["mu"], out["logvar"]  # (B, R, Z)
    terms = dict(loss_ir(feats[mask], out["r_rec"][mask], mu[mask], logvar[mask], kl_weight=kl_weight,
                         reduction=ir_reduction))
    total = terms["loss_ir"]
    mu_p = mu[pi, ps]  # (P, Z)
    if lambda_cm > 0 or dias_weight > 0:
        w_pred = out["w_pred"][pi, ps]  # (P, N)
        w_true = wv[pw].to(device=w_pred.device, dtype=w_pred.dtype)  # (P, N)
        if w_true.shape[1] != w_pred.shape[1]:
            raise LossInputError(f"word_vectors have {w_true.shape[1]} dims, the MTM predicts "
                                 f"{w_pred.shape[1]}")
    if lambda_cm > 0:
        terms["loss_cm"] = loss_cm(w_true, w_pred, mu_p)
        total = total + lambda_cm * terms["loss_cm"]
    if lambda_cl > 0:
        if prototypes is None:
            raise LossInputError("prototypes are required when lambda_cl > 0")
        _check_2d(prototypes, "prototypes", wv.shape[0], mu.shape[-1])
        terms["loss_cl"] = loss_cl(mu_p, pw, prototypes, tau, region_ids=pi * n_slot + ps,
                                   normalize=cl_normalize, exclude_same_word=cl_exclude_same_word)
        total = total + lambda_cl * terms["loss_cl"]
    if dias_weight > 0:
        terms["loss_dias"] = loss_dias(w_pred, w_true)
        total = total + dias_weight * terms["loss_dias"]
    return {"loss": total, **terms}


def check_finite(terms: Mapping[str, Tensor | float], step: int | None = None) -> None:
    """Raise :class:`NonFiniteLoss` naming the first NaN/inf term (component terms before ``loss``).

    Args:
        terms: named scalar terms, e.g. the output of :func:`mask_loss`.
        step: the training step, put into the message when given.

    Raises:
        NonFiniteLoss: e.g. ``"step 12: loss_cl is nan"``.
    """
    order = [k for k in terms if k != "loss"] + (["loss"] if "loss" in terms else [])
    for name in order:
        t = torch.as_tensor(terms[name]).detach()
        if not bool(torch.isfinite(t).all()):
            value = "nan" if bool(torch.isnan(t).any()) else "inf"
            raise NonFiniteLoss(name, value, step)


def loss_shares(terms: Mapping[str, float], *, lambda_cm: float = 3.0, lambda_cl: float = 3.0,
                kl_weight: float = 1.0, dias_weight: float = 0.0, **_: object) -> dict[str, float]:
    """Each weighted term's share of eq. 14's total: ``share_rec``, ``share_kl``, ``share_cm``, ``share_cl``
    (and ``share_dias``) = |weight · term| / Σ |weight · term| over the terms present.

    Absolute values because the DIAS term is negative; without it every term is ≥ 0 and the shares
    are the plain fractions of L.  Terms absent from ``terms`` (weight 0) are absent from the result.

    Args:
        terms: loss terms (e.g. per-epoch means of :func:`mask_loss`'s output, as floats).
        lambda_cm, lambda_cl, kl_weight, dias_weight: the weights of eq. 14 (extra keys are ignored,
            so :func:`mask.pipeline.train.loss_weights`' dict can be passed as is).
    """
    parts = {"rec": ("loss_rec", 1.0), "kl": ("loss_kl", kl_weight), "cm": ("loss_cm", lambda_cm),
             "cl": ("loss_cl", lambda_cl), "dias": ("loss_dias", dias_weight)}
    weighted = {name: abs(w * float(terms[key])) for name, (key, w) in parts.items() if key in terms}
    total = sum(weighted.values())
    return {f"share_{k}": (v / total if total > 0 else 0.0) for k, v in weighted.items()}
