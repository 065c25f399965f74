"""Region words and the VG-side vocabulary (the K words of the knowledge, Sec. 3.5 / Appendix I.2).

Words of a region come from its object names and attributes: lowercased and split on whitespace and
punctuation (``"hot dog"`` → ``hot, dog``; ``"t-shirt"`` → ``t, shirt``; ``"man's"`` → ``man, s``),
de-duplicated within the region in order of appearance.  Counting is per region: a word counts
once for every region that carries it, the number of (region, word) training pairs it gives.

Vocabulary filter and its defaults
----------------------------------
The paper "collects all words from the VG dataset and filters out some special characters and rare
words, resulting in a total of K = 12,385 semantic concepts"; MACK (Huang et al., 2022) reports a
vocabulary of 26,276 VG words.  Neither gives the exact rule.  Our defaults
(:class:`mask.config.VocabularyConfig`): ``min_count=5`` regions, ``alphabetic=True`` (drops
digits and mixed tokens; punctuation is already split away), ``min_length=2`` (drops the single
letters left by "t-shirt", "man's"), ``max_length=20`` (drops run-together junk).

**We could not measure which K these defaults give on the real VG**: no dataset download works on
the machines this was built on.  The two published sizes bracket the choice: a looser filter
(``min_count`` 1–2) lands nearer MACK's 26k, a stricter one nearer the paper's 12k.  To reproduce a
given K on real data, count once with :func:`count_words` and let :func:`min_count_for_size` pick
the smallest ``min_count`` whose vocabulary is at most that size — e.g. ``target_size=12385``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

logger = logging.getLogger(__name__)

# Letters and digits runs; everything else (spaces, punctuation, underscores) separates words.
_WORD = re.compile(r"[^\W_]+")


def split_words(text: str) -> list[str]:
    """Lowercase and split on whitespace and punctuation: ``"Hot-Dog stand"`` → ``[hot, dog, stand]``.

    Args:
        text: a VG object name or attribute (any string).

    Returns:
        The words in order (possibly empty).
    """
    return _WORD.findall(text.lower())


def region_words(names: Iterable[str], attributes: Iterable[str] = ()) -> list[str]:
    """Words of one region: its names' words, then its attributes' words, de-duplicated in order."""
    seen: dict[str, None] = {}
    for s in (*names, *attributes):
        for w in split_words(s):
            seen.setdefault(w, None)
    return list(seen)


def count_words(regions: pa.Table | pa.RecordBatch | Iterable[pa.Table | pa.RecordBatch]) -> Counter:
    """Number of regions per word, over one table or a stream of region batches.

    Args:
        regions: table(s) with a ``words`` column (list<string>), e.g. the ``regions`` artifact.

    Returns:
        Counter word → number of regions that carry it.
    """
    batches = [regions] if isinstance(regions, pa.Table | pa.RecordBatch) else regions
    counts: Counter = Counter()
    for b in batches:
        words = b.column("words")
        flat = pc.list_flatten(words)
        if len(flat) == 0:
            continue
        vc = pc.value_counts(flat)
        counts.update(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(),
                               strict=True)))
    return counts


def keep_word(word: str, min_length: int = 2, max_length: int = 20, alphabetic: bool = True) -> bool:
    """Whether a word passes the length and character filters (not the count)."""
    if not (min_length <= len(word) <= max_length):
        return False
    return word.isascii() and word.isalpha() if alphabetic else True


def build_vocabulary(counts: Counter | dict[str, int], min_count: int = 5, min_length: int = 2,
                     max_length: int = 20, alphabetic: bool = True, max_size: int | None = None) -> list[str]:
    """Filter counted words into the vocabulary, most frequent first (ties by word).

    Args:
        counts: word → number of regions (from :func:`count_words`).
        min_count: drop words seen in fewer regions.
        min_length, max_length: allowed word length in characters.
        alphabetic: keep only ASCII-alphabetic words.
        max_size: keep at most this many of the most frequent words (None = all).

    Returns:
        The vocabulary as a list of words.
    """
    if min_count < 1 or min_length < 1 or max_length < min_length:
        raise ValueError(f"bad vocabulary filter: min_count={min_count}, min_length={min_length}, "
                         f"max_length={max_length}")
    vocab = [w for w, c in counts.items()
             if c >= min_count and keep_word(w, min_length, max_length, alphabetic)]
    vocab.sort(key=lambda w: (-counts[w], w))
    if max_size is not None:
        vocab = vocab[:max_size]
    logger.info("vocabulary: %d of %d words (min_count=%d, length %d..%d, alphabetic=%s)",
                len(vocab), len(counts), min_count, min_length, max_length, alphabetic)
    return vocab


def min_count_for_size(counts: Counter | dict[str, int], target_size: int, min_length: int = 2,
                       max_length: int = 20, alphabetic: bool = True) -> int:
    """Smallest ``min_count`` whose vocabulary has at most ``target_size`` words.

    Args:
        counts: word → number of regions.
        target_size: wanted K (e.g. 12,385 as in the paper, 26,276 as in MACK).
        min_length, max_length, alphabetic: the other filters, as in :func:`build_vocabulary`.

    Returns:
        The threshold (1 when even min_count=1 gives at most ``target_size`` words).
    """
    if target_size < 0:
        raise ValueError(f"target_size must be >= 0, got {target_size}")
    kept = sorted((c for w, c in counts.items() if keep_word(w, min_length, max_length, alphabetic)),
                  reverse=True)
    if len(kept) <= target_size:
        return 1
    # Words with count >= t number at most target_size iff t > kept[target_size].
    return int(kept[target_size]) + 1


def restrict_words(regions: pa.Table, vocabulary: Iterable[str], drop_empty: bool = True) -> pa.Table:
    """Keep only vocabulary words in each region's ``words``; optionally drop regions left empty.

    Args:
        regions: a regions table.
        vocabulary: the words to keep.
        drop_empty: drop regions with no vocabulary word left.

    Returns:
        The filtered table (same schema).
    """
    vocab = pa.array(sorted(set(vocabulary)), pa.string())
    words = regions.column("words").combine_chunks()
    flat = pc.list_flatten(words)
    parents = pc.list_parent_indices(words)
    keep = pc.is_in(flat, value_set=vocab)
    kept_flat = flat.filter(keep)
    kept_parents = parents.filter(keep).to_numpy(zero_copy_only=False)
    lengths = np.bincount(kept_parents, minlength=len(words)).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    new_words = pa.ListArray.from_arrays(pa.array(offsets), kept_flat)
    out = regions.set_column(regions.schema.get_field_index("words"), regions.schema.field("words"),
                             new_words)
    if drop_empty:
        out = out.filter(pa.array(lengths > 0))
    return out
