"""Region words and the vocabulary filter, checked against naive references."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from mask.datasets import (
    build_vocabulary,
    count_words,
    min_count_for_size,
    region_words,
    restrict_words,
    split_words,
)
from mask.datasets.records import REGIONS_SCHEMA


@pytest.mark.parametrize("text, words", [
    ("hot dog", ["hot", "dog"]),
    ("Hot-Dog  Stand", ["hot", "dog", "stand"]),
    ("t-shirt", ["t", "shirt"]),
    ("man's", ["man", "s"]),
    ("tennis_racket", ["tennis", "racket"]),
    ("2 cups.", ["2", "cups"]),
    ("café", ["café"]),
    ("  ", []),
])
def test_split_words(text, words):
    assert split_words(text) == words


def test_region_words_dedupes_in_order():
    assert region_words(["Red car", "car"], ["red", "shiny"]) == ["red", "car", "shiny"]


def _regions(rng, n, vocab):
    rows = []
    for i in range(n):
        k = int(rng.integers(0, 4))
        words = list(dict.fromkeys(vocab[j] for j in rng.integers(0, len(vocab), size=k)))
        rows.append({"image_id": str(i // 3), "region_id": str(i), "box": [0, 0, 1, 1], "words": words,
                     "names": words[:1], "attributes": []})
    return pa.Table.from_pylist(rows, schema=REGIONS_SCHEMA)


def test_count_words_matches_naive(rng):
    vocab = ["dog", "cat", "a", "x2", "tree", "verylongwordthatgoesonandon"]
    table = _regions(rng, 200, vocab)
    naive = Counter(w for ws in table.column("words").to_pylist() for w in ws)
    assert count_words(table) == naive
    assert count_words(table.to_batches(max_chunksize=17)) == naive
    assert count_words(iter([])) == Counter()


def test_build_vocabulary_filters_and_orders():
    counts = {"dog": 10, "cat": 10, "a": 50, "x2": 20, "tree": 4, "verylongwordthatgoesonandon": 9, "café": 30}
    assert build_vocabulary(counts) == ["cat", "dog"]  # rare, short, non-alphabetic and > 20 chars dropped
    assert build_vocabulary(counts, max_length=30) == ["cat", "dog", "verylongwordthatgoesonandon"]
    assert build_vocabulary(counts, min_count=1, min_length=1, alphabetic=False, max_length=30) == \
        ["a", "café", "x2", "cat", "dog", "verylongwordthatgoesonandon", "tree"]
    assert build_vocabulary(counts, min_count=1, max_size=2) == ["cat", "dog"]
    with pytest.raises(ValueError, match="min_count=0"):
        build_vocabulary(counts, min_count=0)


def test_min_count_for_size_matches_brute_force(rng):
    for _ in range(20):
        counts = {f"w{chr(97 + i % 26)}{chr(97 + i // 26)}": int(c)
                  for i, c in enumerate(rng.geometric(0.05, size=int(rng.integers(1, 300))))}
        target = int(rng.integers(0, 320))
        t = min_count_for_size(counts, target, min_length=1)
        brute = next(m for m in range(1, 10_000) if len(build_vocabulary(counts, m, min_length=1)) <= target)
        assert t == brute


def test_restrict_words_matches_naive(rng):
    vocab = ["dog", "cat", "tree", "car", "red"]
    table = _regions(rng, 100, vocab)
    keep = {"dog", "red"}
    out = restrict_words(table, keep)
    naive = [(r["region_id"], [w for w in r["words"] if w in keep]) for r in table.to_pylist()]
    assert list(zip(out.column("region_id").to_pylist(), out.column("words").to_pylist(), strict=True)) == \
        [(i, ws) for i, ws in naive if ws]
    full = restrict_words(table, keep, drop_empty=False)
    assert full.num_rows == table.num_rows and full.schema.equals(table.schema)
    assert np.array_equal(np.array([len(w) for w in full.column("words").to_pylist()]),
                          np.array([len(ws) for _, ws in naive]))
