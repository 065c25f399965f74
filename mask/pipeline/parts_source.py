"""A committed artifact's parts as a Ray Data datasource: the manifest is the reader's index.

A committed artifact (:mod:`mask.storage.artifacts`) lists every part with its path, row count and size,
and its schema; a reader needs nothing else.  :class:`CommittedPartsDatasource` turns that list into read
tasks (Ray Data's public ``Datasource`` API): contiguous runs of parts in the given order, each task reading
its files with pyarrow, only the asked columns.  Ray Data knows every task's rows and bytes before it runs
one, and nothing is listed or sampled:

* Ray Data's default Parquet reader in Ray 2.60 (the V2 datasource) lists the given paths in a
  ``ListFiles`` task whose completion-signaler thread can die with an uncaught ``InterruptedError``
  traceback on the console after the listing finished (``ray/data/_internal/dynamic_work_queue.py``: the
  consumer's shutdown interrupts the signaler's last queue puts; seen in a CI run of the main job);
* its V1 reader samples files in remote tasks with a progress bar of its own while the dataset is built.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata


@dataclass(frozen=True)
class Part:
    """One committed part: its fs-native path, and the rows and bytes its manifest entry records."""

    path: str
    rows: int | None = None
    bytes: int | None = None


class CommittedPartsDatasource(Datasource):
    """Read the given parts, in order, as Ray Data blocks (one block per part).

    Args:
        parts: the parts, in the order the dataset keeps.
        filesystem: the pyarrow filesystem the paths are native to (it travels to the read tasks).
        schema: the artifact's schema (its manifest's), or None; projected to ``columns``.
        columns: only these columns (None: all).
    """

    def __init__(self, parts: Sequence[Part], filesystem, schema: pa.Schema | None = None,
                 columns: list[str] | None = None):
        super().__init__()
        if not parts:
            raise ValueError("no parts to read")
        self._parts = list(parts)
        self._fs = filesystem
        self._columns = list(columns) if columns else None
        if schema is not None and self._columns is not None:
            missing = [c for c in self._columns if c not in schema.names]
            if missing:
                raise ValueError(f"no column(s) {missing} in the parts of {parts[0].path}; "
                                 f"columns: {schema.names}")
        self._schema = schema if schema is None or self._columns is None else \
            pa.schema([schema.field(c) for c in self._columns])

    def get_name(self) -> str:
        return "CommittedParts"

    def estimate_inmemory_data_size(self) -> int | None:
        sizes = [p.bytes for p in self._parts]
        return None if any(s is None for s in sizes) else int(sum(sizes))

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        n = max(1, min(int(parallelism), len(self._parts)))
        bounds = [round(i * len(self._parts) / n) for i in range(n + 1)]
        return [self._task(self._parts[a:b], per_task_row_limit) for a, b in zip(bounds, bounds[1:], strict=False)
                if b > a]

    def _task(self, parts: list[Part], per_task_row_limit: int | None) -> ReadTask:
        rows = [p.rows for p in parts]
        size = [p.bytes for p in parts]
        meta = BlockMetadata(num_rows=None if None in rows else int(sum(rows)),
                             size_bytes=None if None in size else int(sum(size)),
                             input_files=[p.path for p in parts], exec_stats=None)
        paths, fs, columns = [p.path for p in parts], self._fs, self._columns

        def read() -> Iterator[pa.Table]:
            for path in paths:
                yield pq.read_table(path, filesystem=fs, columns=columns, partitioning=None)

        return ReadTask(read, meta, schema=self._schema, per_task_row_limit=per_task_row_limit)
