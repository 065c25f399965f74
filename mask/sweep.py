"""Search spaces of ``tune/``: a validated YAML file, and the grid that needs no retraining.

A sweep retrains for every sample of the *training-level* parameters (λ1 = ``loss.lambda_cm``,
λ2 = ``loss.lambda_cl``, τ = ``loss.tau`` of eq. 14 / eq. 6, and a few more), while the scoring-level
parameters — the OOD sampling size m (eq. 11–13), the re-ranking weight α and top-k (eq. 15) — are a
grid that every trial evaluates on its own trained model, so they cost no training.  The file::

    search:                       # Tune samples; each one trains a model
      loss.lambda_cm: {loguniform: [1.0, 9.0]}
      loss.tau: {choice: [0.05, 0.1]}
    grid:                         # evaluated by every trial on its validation gallery
      knowledge.m: [1, 10, 50, 100]
      rerank.alpha: [0.05, 0.15, 0.5]
      rerank.k: [10, 20]
    trials: {num_samples: 4, epochs: 12, eval_every: 2, cpus: 1, gpus: 0, seed: 0}
    scheduler: {type: asha, grace_period: 4, reduction_factor: 2}
    validation: {fraction: 0.5, split: null, seed: 0}

This module is Ray-free: it validates the file (an unknown parameter, bad bounds or a value the
config itself refuses → :class:`SpaceError` naming the key) and names and ranks the grid metrics.
``mask.pipeline.tune`` turns the samples into Ray Tune distributions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mask.config import MaskConfig
from mask.errors import MaskError
from mask.metrics import METRIC_NAMES

#: Training-level parameters a space may sample (each sample retrains).
TUNABLE = ("loss.lambda_cm", "loss.lambda_cl", "loss.tau", "loss.kl_weight", "loss.dias_weight", "train.lr",
           # the paper-literal switches (README "Paper fidelity"); categorical ones take choice/grid
           "loss.ir_reduction", "loss.cl_normalize", "loss.cl_exclude_same_word", "scoring.normalize",
           "knowledge.ood_weighting", "knowledge.ood_temperature")
#: Scoring-level parameters of the grid (no retraining), in the order of the metric names.
GRID_KEYS = ("knowledge.m", "rerank.alpha", "rerank.k")
#: Metrics of every grid entry (R@K in percent, both directions, and their sum Rs).
METRICS = METRIC_NAMES
#: The Tune metric ASHA and the best-trial choice use: the trial's best validation Rs over its grid.
SCORE = "val_rsum"
#: Paper names of the loss weights, logged next to the config keys.
ALIASES = {"loss.lambda_cm": "loss.lambda1", "loss.lambda_cl": "loss.lambda2"}


class SpaceError(MaskError, ValueError):
    """A search-space file that cannot be used; the message names the file and the key."""


class SweepError(MaskError, ValueError):
    """A sweep that cannot run or go on as asked; the message names what is missing."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
    """One sampled parameter: exactly one of the keys (Tune's distribution of the same name)."""

    # Log-uniform between two positive bounds, lower < upper (λ1, λ2 around the paper's 3).
    loguniform: tuple[float, float] | None = None
    # Uniform between two bounds, lower < upper.
    uniform: tuple[float, float] | None = None
    # Random choice among the values (numbers, booleans or names: {choice: [sum, mean]}).
    choice: list[bool | float | str] | None = None
    # Every value in turn (tune.grid_search; multiplies num_samples).
    grid: list[bool | float | str] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [k for k in ("loguniform", "uniform", "choice", "grid") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of loguniform, uniform, choice, grid"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.loguniform is not None:
            lo, hi = self.loguniform
            if not (0 < lo < hi) or not math.isfinite(hi):
                raise ValueError(f"loguniform bounds must satisfy 0 < lower < upper, got [{lo:g}, {hi:g}]")
        if self.uniform is not None:
            lo, hi = self.uniform
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"uniform bounds must be finite with lower < upper, got [{lo:g}, {hi:g}]")
        for name in ("choice", "grid"):
            vals = getattr(self, name)
            if vals is not None and not vals:
                raise ValueError(f"{name} needs at least one value")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("loguniform", "uniform", "choice", "grid") if getattr(self, k) is not None)

    def edge_values(self) -> list[float]:
        """The bounds or every listed value: what the config must accept."""
        v = getattr(self, self.kind)
        return list(v)


class Grid(_Strict):
    # OOD sampling sizes m (eq. 11–13); values above the knowledge size are clipped to it (and said so).
    m: list[int] = Field(default_factory=lambda: [1, 10, 50, 100], alias="knowledge.m")
    # Re-ranking weights α (eq. 15).
    alpha: list[float] = Field(default_factory=lambda: [0.05, 0.15, 0.5, 1.0], alias="rerank.alpha")
    # Re-ranking top-k of the base model (eq. 15; clipped to the gallery size per direction by mask.rerank).
    k: list[int] = Field(default_factory=lambda: [10, 20], alias="rerank.k")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("m", "k")
    @classmethod
    def _positive_ints(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs at least one value")
        if any(x < 1 for x in v):
            raise ValueError(f"values must be ≥ 1, got {v}")
        return sorted(set(v))

    @field_validator("alpha")
    @classmethod
    def _finite(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("needs at least one value")
        if any(not math.isfinite(x) or x < 0 for x in v):
            raise ValueError(f"values must be finite and ≥ 0, got {v}")
        return sorted(set(v))


class Trials(_Strict):
    # Samples drawn from `search` (times the size of any `grid` distribution).
    num_samples: int = Field(default=4, ge=1)
    # Epochs per trial (ASHA's max_t); None = train.epochs of the config.
    epochs: int | None = Field(default=None, ge=1)
    # Evaluate on the validation gallery (report to Tune, checkpoint) every this many epochs and at the end.
    eval_every: int = Field(default=2, ge=1)
    # Resources per trial: Tune runs as many trials at once as the cluster's resources allow.
    cpus: float = Field(default=1.0, gt=0)
    gpus: float = Field(default=0.0, ge=0)
    # Upper bound on concurrent trials (None = resources alone decide).
    max_concurrent: int | None = Field(default=None, ge=1)
    # Seed of the sampler (BasicVariantGenerator), so a sweep draws the same configurations again.
    seed: int = 0
    # Restarts of a failed trial from its last checkpoint.
    max_failures: int = Field(default=1, ge=0)


class Scheduler(_Strict):
    # asha: ASHAScheduler on the validation Rs; fifo: every trial runs all its epochs.
    type: Literal["asha", "fifo"] = "asha"
    # ASHA: epochs a trial runs before it can be stopped, and the fraction kept at each rung (1/factor).
    grace_period: int = Field(default=2, ge=1)
    reduction_factor: float = Field(default=2.0, gt=1.0)


class Validation(_Strict):
    # Gallery images used for validation: those of this split (e.g. Karpathy "val"), or when None a
    # seeded `fraction` of the gallery; the rest is the held-out test the best configuration is reported on.
    split: str | None = None
    fraction: float = Field(default=0.5, gt=0.0, le=1.0)
    seed: int = 0


class SweepSpec(_Strict):
    """A whole search-space file."""

    search: dict[str, Distribution] = Field(default_factory=dict)
    grid: Grid = Field(default_factory=Grid)
    trials: Trials = Field(default_factory=Trials)
    scheduler: Scheduler = Field(default_factory=Scheduler)
    validation: Validation = Field(default_factory=Validation)

    @field_validator("search", mode="before")
    @classmethod
    def _known_keys(cls, v: Any) -> Any:
        if isinstance(v, dict):
            unknown = [k for k in v if k not in TUNABLE]
            if unknown:
                hint = " (m, α and k belong under grid: knowledge.m / rerank.alpha / rerank.k)" \
                    if any(k in GRID_KEYS for k in unknown) else ""
                raise ValueError(f"unknown parameter {unknown[0]!r}{hint}; tunable: {', '.join(TUNABLE)}")
        return v

    @model_validator(mode="after")
    def _config_accepts_values(self) -> SweepSpec:
        for key, dist in self.search.items():
            section, field = key.split(".", 1)
            model = MaskConfig.model_fields[section].annotation
            for value in dist.edge_values():
                try:
                    model.model_validate({field: value})
                except ValidationError as e:
                    msg = e.errors()[0]["msg"]
                    shown = f"{value:g}" if isinstance(value, float) else repr(value)
                    raise ValueError(f"search.{key}: {dist.kind} value {shown} is refused by the config "
                                     f"({msg})") from None
        if self.scheduler.type == "asha" and self.trials.epochs is not None \
                and self.scheduler.grace_period > self.trials.epochs:
            raise ValueError(f"scheduler.grace_period ({self.scheduler.grace_period}) exceeds trials.epochs "
                             f"({self.trials.epochs})")
        return self

    def epochs(self, cfg: MaskConfig) -> int:
        return self.trials.epochs or cfg.train.epochs


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def parse_space(data: Any, source: str = "search space") -> SweepSpec:
    """Validate a search space given as a dict (the parsed YAML).

    Raises:
        SpaceError: the first problems, each with its key (``search.loss.tau: loguniform bounds …``).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpaceError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        raise SpaceError(f"{source}: {_format_errors(e)}") from None


def load_space(path: str | Path) -> SweepSpec:
    """Read and validate a search-space YAML file.

    Raises:
        SpaceError: missing or unreadable file, invalid YAML, or an invalid space (the key named).
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpaceError(f"search space {path}: cannot read ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpaceError(f"search space {path}: not valid YAML: {e}") from None
    return parse_space(data, f"search space {path}")


# ---------------------------------------------------------------- the grid


def clip_m(values: list[int], known_words: int) -> tuple[list[int], list[int]]:
    """m above the knowledge size means "all known words": clip to it and drop duplicates.

    Returns:
        ``(grid values, the requested values that were clipped)``.
    """
    kept = sorted({min(int(v), max(known_words, 1)) for v in values})
    return kept, [v for v in values if v > known_words]


def fmt(x: float) -> str:
    """Numbers in metric names and params: ``f"{x:g}"`` (0.15 → ``0.15``, 10 → ``10``)."""
    return f"{x:g}"


def mask_key(m: int, metric: str) -> str:
    """``grid.m_<m>.<metric>``: MASK alone with OOD sampling size m."""
    return f"grid.m_{fmt(m)}.{metric}"


def rerank_key(m: int, alpha: float, k: int, metric: str) -> str:
    """``grid.m_<m>.alpha_<a>.k_<k>.<metric>``: the base model re-ranked with MASK (eq. 15)."""
    return f"grid.m_{fmt(m)}.alpha_{fmt(alpha)}.k_{fmt(k)}.{metric}"


def base_key(metric: str) -> str:
    return f"grid.base.{metric}"


def flatten_grid(grid: dict[str, Any]) -> dict[str, float]:
    """The grid results as metric names (see :func:`mask_key`, :func:`rerank_key`, :func:`base_key`).

    Args:
        grid: ``{"mask": {m: metrics}, "rerank": {(m, alpha, k): metrics}, "base": metrics | None}``.
    """
    out: dict[str, float] = {}
    for m, met in grid["mask"].items():
        out.update({mask_key(m, k): float(v) for k, v in met.items() if k in METRICS})
    for (m, a, kk), met in grid["rerank"].items():
        out.update({rerank_key(m, a, kk, k): float(v) for k, v in met.items() if k in METRICS})
    if grid.get("base") is not None:
        out.update({base_key(k): float(v) for k, v in grid["base"].items() if k in METRICS})
    return out


def best_entry(grid: dict[str, Any]) -> dict[str, Any]:
    """The grid entry with the highest Rs (MASK alone or re-ranked; the base alone is not a candidate).

    Ties go to the first entry in this order: MASK alone by increasing m, then re-ranked by (m, α, k).

    Returns:
        ``{"m", "alpha" (None for MASK alone), "k" (None), "metrics"}``.
    """
    cands = [(m, None, None, met) for m, met in sorted(grid["mask"].items())]
    cands += [(m, a, k, met) for (m, a, k), met in sorted(grid["rerank"].items())]
    if not cands:
        raise ValueError("empty grid")
    best = cands[0]
    for c in cands[1:]:
        if c[3]["rsum"] > best[3]["rsum"]:
            best = c
    return {"m": best[0], "alpha": best[1], "k": best[2], "metrics": dict(best[3])}


def best_rerank(grid: dict[str, Any], m: int) -> dict[str, Any] | None:
    """The best re-ranked (α, k) at OOD size m (what the best configuration's ``rerank`` section gets)."""
    cands = [(a, k, met) for (mm, a, k), met in sorted(grid["rerank"].items()) if mm == m]
    if not cands:
        return None
    best = cands[0]
    for c in cands[1:]:
        if c[2]["rsum"] > best[2]["rsum"]:
            best = c
    return {"alpha": best[0], "k": best[1], "metrics": dict(best[2])}
