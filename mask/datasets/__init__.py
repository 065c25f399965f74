"""Dataset readers (VG, Karpathy splits, COCO captions, image folders, the demo world) and their artifact.

Every reader returns :class:`DatasetTables` in the normalised schemas of :mod:`mask.datasets.records`;
:func:`write_dataset` stores them as ``datasets/<name>/{images,regions,captions,_errors}/``.
:func:`read_dataset` picks the reader of a :class:`mask.config.DatasetConfig`, and
:func:`ingest_dataset` reads and writes unless the same inputs were already committed with the same
config.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from mask.datasets.captions import read_coco_captions, read_karpathy
from mask.datasets.demo import (
    DemoWorld,
    demo_dataset_config,
    generate_demo_world,
    read_demo_world,
    synonym_words,
    vg_words,
)
from mask.datasets.folder import read_captions_file, read_image_folder, read_uri_list
from mask.datasets.records import (
    CAPTIONS_SCHEMA,
    ERRORS_SCHEMA,
    IMAGES_SCHEMA,
    REGIONS_SCHEMA,
    DatasetError,
    DatasetTables,
    ErrorLog,
    dataset_hash,
    dataset_rel,
    exists,
    write_dataset,
)
from mask.datasets.vg import read_vg
from mask.datasets.vocabulary import (
    build_vocabulary,
    count_words,
    min_count_for_size,
    region_words,
    restrict_words,
    split_words,
)
from mask.storage import fingerprint as _fp

logger = logging.getLogger(__name__)

__all__ = [
    "CAPTIONS_SCHEMA", "ERRORS_SCHEMA", "IMAGES_SCHEMA", "REGIONS_SCHEMA",
    "DatasetError", "DatasetTables", "DemoWorld", "ErrorLog",
    "build_vocabulary", "count_words", "dataset_hash", "dataset_rel", "demo_dataset_config",
    "generate_demo_world", "ingest_dataset", "min_count_for_size", "read_captions_file",
    "read_coco_captions", "read_dataset", "read_demo_world", "read_image_folder", "read_karpathy",
    "read_uri_list", "read_vg", "region_words", "restrict_words", "split_words", "synonym_words",
    "vg_words", "write_dataset",
]

_TABLES = ("images", "regions", "captions", "_errors")


def read_dataset(cfg: Any, storage_options: dict | None = None, demo_root: str | None = None,
                 exclude: tuple[set[int], set[int]] | None = None) -> DatasetTables:
    """Read the dataset a :class:`mask.config.DatasetConfig` describes.

    Args:
        cfg: the dataset config (``name, kind, path, image_root, splits, limit``).
        storage_options: fsspec options for remote inputs.
        demo_root: folder of the demo world when ``cfg.kind == "demo"`` and ``cfg.path`` is None.
        exclude: ``(coco_ids, flickr_ids)`` of VG images to leave out (a gallery's images,
            :func:`mask.datasets.overlap.gallery_source_ids`); VG / demo datasets only.

    Returns:
        :class:`DatasetTables` (regions lazy for VG / demo).

    Raises:
        DatasetError: no path, or the reader's own errors.
    """
    kind, path = cfg.kind, cfg.path
    if kind == "demo":
        root = path or demo_root
        if root is None:
            raise DatasetError(f"dataset {cfg.name!r}: kind 'demo' needs a folder (dataset.path) to hold the world")
        return read_demo_world(root, name=cfg.name, splits=cfg.splits, limit=cfg.limit,
                               storage_options=storage_options,
                               exclude_coco_ids=None if exclude is None else exclude[0],
                               exclude_flickr_ids=None if exclude is None else exclude[1])
    if path is None:
        raise DatasetError(f"dataset {cfg.name!r}: kind {kind!r} needs dataset.path")
    so = storage_options
    if kind == "vg":
        return read_vg(path, cfg.image_root, name=cfg.name, splits=cfg.splits, limit=cfg.limit,
                       storage_options=so, exclude_coco_ids=None if exclude is None else exclude[0],
                       exclude_flickr_ids=None if exclude is None else exclude[1])
    if kind == "karpathy":
        return read_karpathy(path, cfg.image_root, name=cfg.name, splits=cfg.splits, limit=cfg.limit,
                             storage_options=so)
    if kind == "coco":
        return read_coco_captions(path, cfg.image_root, name=cfg.name, splits=cfg.splits, limit=cfg.limit,
                                  storage_options=so)
    if kind == "folder":
        fs_isdir = exists(path, so) and not os.path.splitext(path)[1]
        if fs_isdir:
            return read_image_folder(path, name=cfg.name, limit=cfg.limit, captions=cfg.captions, storage_options=so)
        return read_uri_list(path, name=cfg.name, limit=cfg.limit, captions=cfg.captions, storage_options=so)
    raise DatasetError(f"dataset {cfg.name!r}: unknown kind {kind!r}")


def ingest_dataset(store: Any, cfg: Any, storage_options: dict | None = None, demo_root: str | None = None,
                   mlflow_run_id: str | None = None, exclude: tuple[set[int], set[int]] | None = None
                   ) -> dict[str, Any]:
    """Read a dataset and write its artifact, unless it is committed for the same config and inputs.

    The artifact hash combines the dataset config with the fingerprints of the input files, so a
    rerun reuses committed work and replaced inputs are read again.  The check happens before the
    regions stream is started, so a reuse never reads ``objects.json``.

    Args:
        store: a :class:`mask.storage.Store`.
        cfg: the :class:`mask.config.DatasetConfig`.
        storage_options: fsspec options for remote inputs.
        demo_root: demo world folder when ``cfg.kind == "demo"`` and ``cfg.path`` is None.
        mlflow_run_id: recorded in the manifests.
        exclude: VG images to leave out by ``(coco_ids, flickr_ids)`` (see :func:`read_dataset`); part of
            the artifact's identity.

    Returns:
        The :func:`write_dataset` summary, with ``"reused": True`` when nothing was rewritten.
    """

    tables = read_dataset(cfg, storage_options, demo_root, exclude=exclude)
    ident = cfg.model_dump(mode="json")
    if exclude is not None:
        ident = {**ident, "exclude": [sorted(exclude[0]), sorted(exclude[1])]}
    h = dataset_hash(_fp(ident), tables.inputs)
    manifests = {t: store.committed(dataset_rel(cfg.name, t), h) for t in _TABLES}
    needed = [t for t in _TABLES if t != "regions" or tables.regions is not None]
    needed = [t for t in needed if t != "captions" or tables.captions is not None]
    if all(manifests[t] is not None for t in needed):
        logger.info("dataset %s: committed with hash %s; reused", cfg.name, h)
        return {"name": cfg.name, "config_hash": h, "reused": True,
                "tables": {t: {"uri": store.uri(dataset_rel(cfg.name, t)), "rows": manifests[t]["row_count"],
                               "parts": len(manifests[t].get("parts") or [])} for t in needed},
                "stats": (manifests["_errors"].get("extra") or {}).get("stats", {})}
    out = write_dataset(store, cfg.name, tables.images, regions=tables.regions, captions=tables.captions,
                        errors=tables.errors, inputs=tables.inputs, config_hash=h, mlflow_run_id=mlflow_run_id)
    out["reused"] = False
    return out

