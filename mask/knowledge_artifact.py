"""The knowledge table as a committed storage artifact: ``knowledge/<version>/``.

Parts: the table (``word, count, word_vector, prototype, source, sample``) as Parquet; files:
``pae.safetensors`` (the PAE weights needed at scoring time) and ``knowledge.json`` (sizes, lineage).
The manifest is written last, so a reader sees a whole knowledge version or none.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from mask.knowledge import KnowledgeError, KnowledgeTable
from mask.storage import ArtifactNotFound, Store

logger = logging.getLogger(__name__)

PAE_FILE = "pae.safetensors"
INFO_FILE = "knowledge.json"


def save_knowledge(store: Store, rel: str, table: KnowledgeTable, pae_bytes: bytes, *, config_hash: str,
                   mlflow_run_id: str | None = None, lineage: dict[str, Any] | None = None) -> dict:
    """Validate and commit a knowledge version.

    Args:
        store: storage root.
        rel: artifact path, e.g. ``knowledge/k-1234``.
        table: the knowledge table.
        pae_bytes: PAE weights (``mask.models.save_pae``).
        config_hash: what built it (the reuse key).
        mlflow_run_id: the run that built it.
        lineage: features URI, training run, … (stored in the manifest and ``knowledge.json``).

    Returns:
        The committed manifest.
    """
    table.validate()
    info = {"words": len(table.words), "latent_dim": int(table.prototypes.shape[1]),
            "word_dim": int(table.word_vectors.shape[1]),
            "sources": {s: table.source.count(s) for s in sorted(set(table.source))},
            "lineage": lineage or {}}
    with store.open_artifact(rel, kind="knowledge", config_hash=config_hash, inputs=lineage or {}) as w:
        w.write_part(table.to_arrow(), name="table")
        w.write_file(PAE_FILE, pae_bytes)
        w.write_file(INFO_FILE, json.dumps(info, indent=2, sort_keys=True).encode())
        return w.commit(mlflow_run_id=mlflow_run_id, extra=info)


def load_knowledge(store: Store, rel: str) -> tuple[KnowledgeTable, bytes]:
    """Load a committed knowledge version → (table, PAE safetensors bytes).

    Raises:
        KnowledgeError: no committed knowledge at that path (the URI is named), or an invalid table.
    """
    try:
        table = KnowledgeTable.from_arrow(store.read_table(rel))
        pae = store.read_file(rel, PAE_FILE)
    except ArtifactNotFound as e:
        raise KnowledgeError(f"knowledge version {store.uri(rel)} does not exist (no committed manifest)") from e
    table.validate()
    return table, pae
