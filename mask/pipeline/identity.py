"""Every version and cache name the pipeline derives from a config: one place per rule.

A committed artifact is reused when its name matches, so each rule here decides what a rerun may
reuse: the features of a detector configuration, the Ray Train run of a training configuration,
the knowledge version, the μ artifact and per-word scores of an index, the index version, the
base-scores artifact of a CLIP configuration.  Fields that change only how a step executes
(batch sizes, actor counts, epochs for a training run) are left out on purpose, so a rerun with
other execution settings resumes instead of starting again.
"""

from __future__ import annotations

import os
import re

from mask.config import POOL_FIELDS, ClipConfig, DetectorConfig, MaskConfig
from mask.sources import source_stamps
from mask.storage import fingerprint

#: Detector fields that change how extraction runs, never what it produces (images are batched by
#: equal shape without padding, RoI chunks do not change results): left out of the artifact name.
EXECUTION_FIELDS = frozenset({"batch_size", "num_actors", "max_restarts", "roi_chunk",
                              "commit_every_batches", "commit_every_s", "run_ttl_s"}) | POOL_FIELDS
#: Layout of the features artifact, part of its name: 2 = rows carry ``source_stamp`` and ``content_sha256``
#: (change detection); an artifact of another layout is never appended to.
FEATURES_LAYOUT = 2
#: ClipConfig fields that change how the base-scores job runs, never the scores: left out of its identity.
CLIP_EXECUTION_FIELDS = frozenset({"batch_size", "num_actors", "max_pixels"}) | POOL_FIELDS
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
#: 2: μ in the shared _mu/ artifact, words.parquet + word_scores.npy per version (1: μ parts in the
#: version); 3: μ rows and images.parquet carry the features' content_sha256 (changed images are rescored);
#: part of the index version and of the μ artifact's name, so an older layout is never reused as if current
INDEX_LAYOUT = 3
MU_DIR = "_mu"


def extractor_name(det: DetectorConfig) -> str:
    """Folder name of a detector configuration: readable prefix + hash of every field that shapes the
    features (not :data:`EXECUTION_FIELDS`, so a rerun with another batch size or actor count resumes)."""
    spec = {**det.model_dump(mode="json", exclude=set(EXECUTION_FIELDS)), "layout": FEATURES_LAYOUT}
    if det.backend == "efficientnet_lite0":  # its feature definition has a version (a new one is new features)
        from mask.features.pretrained import FEATURES_VERSION

        spec["features_version"] = FEATURES_VERSION
    h = fingerprint(spec)[:10]
    return f"{det.backend}-r{det.depth}-{det.mode}-{h}"


def features_rel(dataset: str, det: DetectorConfig) -> str:
    """``features/<dataset>/<extractor name>``: the features artifact of a dataset under a detector config."""
    return f"features/{dataset}/{extractor_name(det)}"


#: TrainConfig fields that change how a run executes or how long it goes, not the trajectory it
#: follows: left out of the default run name, so a rerun with more epochs continues the same run.
TRAIN_RUN_MECHANICS = frozenset({"epochs", "checkpoint_every", "max_failures", "log_every", "num_workers",
                                 "use_gpu", "cpus_per_worker", "cpu_threads", "run_name"})


def train_run_name(cfg: MaskConfig, features_rel_: str) -> str:
    """The Ray Train run name: ``train.run_name``, else ``train-<hash>`` of the features artifact, the
    dataset, vocabulary, vectors, model, loss and the train fields outside :data:`TRAIN_RUN_MECHANICS`.

    Epochs are left out on purpose: the run with ``train.epochs=4`` continues the one that stopped
    at 2 (its latest checkpoint), instead of starting again.
    """
    data = cfg.model_dump(mode="json")
    ident = {s: data[s] for s in ("dataset", "vocabulary", "vectors", "model", "loss")}
    ident["features"] = features_rel_
    ident["train"] = {k: v for k, v in data["train"].items() if k not in TRAIN_RUN_MECHANICS}
    return cfg.train.run_name or f"train-{fingerprint(ident)[:16]}"


def knowledge_version(cfg: MaskConfig) -> str:
    """The knowledge artifact's version: ``knowledge.version`` or ``k-<hash>`` of everything that shapes it."""
    return cfg.knowledge.version or \
        f"k-{cfg.hash('dataset', 'vocabulary', 'detector', 'model', 'loss', 'train', 'vectors', 'knowledge')}"


def index_root(gallery: str) -> str:
    """``indexes/<gallery>``: the gallery's versions, ``CURRENT``, the shared μ and the lease."""
    return f"indexes/{gallery}"


def score_hash(cfg: MaskConfig, knowledge) -> str:
    """What the per-word terms depend on: knowledge, features, scoring maths, parser, vectors, OOD."""
    sc = cfg.scoring
    data = cfg.model_dump(mode="json")
    return fingerprint({"knowledge": [knowledge.uri, knowledge.config_hash], "features": extractor_name(cfg.detector),
                        "scoring": [sc.normalize, sc.pooling, sc.prototypes], "text": data["text"],
                        "vectors": data["vectors"], "ood": [cfg.knowledge.ood_method, cfg.knowledge.m, *cfg.knowledge.ood_identity()]})[:16]


def mu_rel(cfg: MaskConfig, knowledge) -> str:
    """The μ artifact of this (knowledge, features) pair for the config's gallery."""
    h = fingerprint({"knowledge": [knowledge.uri, knowledge.config_hash],
                     "features": extractor_name(cfg.detector), "layout": INDEX_LAYOUT})[:16]
    return f"{index_root(cfg.gallery.name)}/{MU_DIR}/m-{h}"


def gallery_content(cfg: MaskConfig, uris: list[str]) -> str:
    """Fingerprint of the gallery images' change stamps (:mod:`mask.sources`: size + mtime / ETag, no image
    read): a replaced image file changes it even when the dataset's own files (a captions JSON) did not."""
    return fingerprint(source_stamps([str(u) for u in uris], cfg.storage.options))


def index_version(cfg: MaskConfig, knowledge, dataset_hash: str, content: str | None = None) -> str:
    """``knowledge``: anything with ``uri`` and ``config_hash`` (:class:`mask.pipeline.steps.ResolvedKnowledge`).

    ``i-<hash>`` of the index layout, the knowledge version, the gallery dataset (and its images' change
    stamps, ``content``: :func:`gallery_content`), the features and the scoring config (a layout change
    gives new versions: an older layout is never reused as if current)."""
    data = cfg.model_dump(mode="json")
    ident = {"layout": INDEX_LAYOUT, "knowledge": [knowledge.uri, knowledge.config_hash], "gallery": dataset_hash,
             "content": content,
             "features": extractor_name(cfg.detector), "scoring": data["scoring"], "text": data["text"],
             "vectors": data["vectors"], "ood": [cfg.knowledge.ood_method, cfg.knowledge.m, *cfg.knowledge.ood_identity()]}
    return f"i-{fingerprint(ident)[:16]}"


def safe_name(text: str) -> str:
    """``text`` as one path-safe folder-name component."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def weights_label(pretrained: str | None) -> str:
    """A short readable name for CLIP weights: the pretrained tag, a file's stem, or ``random``."""
    if pretrained is None:
        return "random"
    if "://" in pretrained or os.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES):
        return os.path.splitext(os.path.basename(pretrained.rstrip("/")))[0] or "file"
    return pretrained


def model_tag(clip: ClipConfig) -> str:
    """Folder name of a CLIP configuration: ``<model>-<weights>-<hash>`` (hash of what shapes the scores).

    Args:
        clip: the CLIP config.

    Returns:
        A single path-safe name, e.g. ``ViT-B-32-openai-1f2e3d4c5b``.
    """
    h = fingerprint(clip.model_dump(mode="json", exclude=set(CLIP_EXECUTION_FIELDS)))[:10]
    return f"{safe_name(clip.model)[:60]}-{safe_name(weights_label(clip.pretrained))[:40]}-{h}"


def base_scores_rel(gallery: str, clip: ClipConfig) -> str:
    """Artifact folder ``base_scores/<gallery>/<model-tag>``."""
    return f"base_scores/{gallery}/{model_tag(clip)}"

