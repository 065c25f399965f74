"""mask.storage: one API over local paths, file:// and s3:// (moto on loopback), atomic artifacts."""

from __future__ import annotations

import json
import os
import re

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mask
from mask.storage import (
    MANIFEST,
    ArtifactNotFound,
    StorageError,
    Store,
    code_version,
    fingerprint,
    fingerprint_files,
    parse_uri,
    redact,
    redact_text,
)


def _table(rng: np.random.Generator, n: int, start: int = 0) -> pa.Table:
    return pa.table({
        "image_id": pa.array(np.arange(start, start + n, dtype=np.int64)),
        "score": pa.array(rng.standard_normal(n).astype(np.float32)),
        "word": pa.array([f"w{i}" for i in range(start, start + n)]),
    })


@pytest.fixture(params=["local", "file", "s3"])
def store(request, tmp_path) -> Store:
    """The same tests on a local path, a file:// URI and S3 (moto)."""
    if request.param == "local":
        return Store(str(tmp_path / "art"))
    if request.param == "file":
        return Store(f"file://{tmp_path}/art")
    bucket = request.getfixturevalue("s3_bucket")
    return Store(f"{bucket}/prefix/art")


# ---------------------------------------------------------------- URIs and paths


def test_parse_uri_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_uri("./a/b/") == ("file", str(tmp_path / "a" / "b"))
    assert parse_uri("/x/y") == ("file", "/x/y")
    assert parse_uri("file:///x/y/") == ("file", "/x/y")
    assert parse_uri("file://localhost/x") == ("file", "/x")
    assert parse_uri("s3://bucket/pre/fix/") == ("s3", "bucket/pre/fix")
    assert parse_uri("s3a://bucket") == ("s3", "bucket")


@pytest.mark.parametrize("uri, fragment", [
    ("", "empty"),
    ("gs://bucket/x", "not supported"),
    ("s3:///nobucket", "no bucket"),
    ("s3://bucket/a/../b", "traversal"),
    ("file:///a/../b", "traversal"),
    ("file://otherhost/x", "host"),
])
def test_parse_uri_rejects(uri, fragment):
    with pytest.raises(StorageError, match=fragment):
        parse_uri(uri)


def test_credentials_in_uri_rejected_and_not_echoed():
    with pytest.raises(StorageError) as e:
        Store("s3://AKIAABCDEFGHIJKLMNOP:supersecretvalue@bucket/x")
    assert "credentials" in str(e.value)
    assert "supersecretvalue" not in str(e.value) and "AKIAABCDEFGHIJKLMNOP" not in str(e.value)


def test_credentials_in_options_rejected():
    with pytest.raises(StorageError, match="credentials.*secret"):
        Store("s3://bucket/x", options={"key": "k", "secret": "s"})
    with pytest.raises(StorageError, match="aws_secret_access_key"):
        Store("s3://bucket/x", options={"client_kwargs": {"aws_secret_access_key": "s"}})


def test_root_normalisation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Store("./artifacts").root == str(tmp_path / "artifacts")
    assert Store(f"file://{tmp_path}/a/").root == f"{tmp_path}/a"
    s = Store("s3://bucket/prefix/")
    assert s.root == "s3://bucket/prefix"
    assert s.path("a", "b/c") == "bucket/prefix/a/b/c"
    assert s.uri("a/b") == "s3://bucket/prefix/a/b"
    assert s.path() == "bucket/prefix"


@pytest.mark.parametrize("bad", ["..", "a/../b", "/etc/passwd", "", "a//b", "./a", "s3://other/x", "a\\b",
                                 "C:/x"])
def test_path_traversal_rejected(tmp_path, bad):
    s = Store(str(tmp_path))
    with pytest.raises(StorageError) as e:
        s.path("ok", bad)
    assert repr(bad) in str(e.value) or "empty" in str(e.value)
    with pytest.raises(StorageError):
        s.write_bytes(bad, b"x")
    with pytest.raises(StorageError):
        s.open_artifact(bad or "..", kind="k", config_hash="h")


def test_traversal_in_part_and_file_names(tmp_path, rng):
    s = Store(str(tmp_path))
    with s.open_artifact("a", kind="k", config_hash="h") as w:
        for bad in ["../x", "a/b", "..", "/abs", ""]:
            with pytest.raises(StorageError, match="part name"):
                w.write_part(_table(rng, 2), name=bad)
            with pytest.raises(StorageError, match="file name"):
                w.write_file(bad, b"x")
        w.write_part(_table(rng, 2), name="ok")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.parquet").exists()


def test_tampered_manifest_path_cannot_escape(tmp_path, rng):
    s = Store(str(tmp_path / "root"))
    with s.open_artifact("a", kind="k", config_hash="h") as w:
        w.write_part(_table(rng, 2), name="p")
    m = s.manifest("a")
    m["parts"][0]["path"] = "../../outside.parquet"
    s.write_json(f"a/{MANIFEST}", m)
    with pytest.raises(StorageError, match="traversal"):
        s.read_table("a")


# ---------------------------------------------------------------- plain files


def test_bytes_json_list_delete(store):
    assert store.list("nothing") == []
    assert not store.exists("d/x.json")
    store.write_bytes("d/raw.bin", b"\x00\x01")
    store.write_json("d/x.json", {"b": 1, "a": [1.5, "z"]})
    assert store.read_bytes("d/raw.bin") == b"\x00\x01"
    assert store.read_json("d/x.json") == {"b": 1, "a": [1.5, "z"]}
    assert store.exists("d/x.json") and store.exists("d")
    assert store.list("d") == ["raw.bin", "x.json"]
    store.write_json("d/x.json", {"v": 2})  # overwrite
    assert store.read_json("d/x.json") == {"v": 2}
    with pytest.raises(FileNotFoundError, match=re.escape(store.uri("d/none"))):
        store.read_bytes("d/none")
    store.delete("d")
    store.delete("d")  # no error when absent
    assert store.list("d") == [] and not store.exists("d/x.json")


def test_write_json_rejects_nan(tmp_path):
    with pytest.raises(StorageError, match="JSON"):
        Store(str(tmp_path)).write_json("m.json", {"x": float("nan")})


def test_local_write_leaves_no_temp_files(tmp_path, rng):
    s = Store(str(tmp_path))
    s.write_bytes("a/b.bin", b"1")
    with s.open_artifact("art", kind="k", config_hash="h") as w:
        w.write_part(_table(rng, 3))
        w.write_file("f.bin", b"x")
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


# ---------------------------------------------------------------- artifacts


def test_artifact_roundtrip(store, rng):
    t1, t2 = _table(rng, 5, 0), _table(rng, 3, 5)
    with store.open_artifact("features/demo", kind="features", config_hash="abc",
                             inputs={"images": "f00d"}) as w:
        assert w.write_part(t1, name="shard-0") == "shard-0"
        name2 = w.write_part(t2)
        w.write_file("metrics.json", b'{"r1": 0.5}')
    m = store.manifest("features/demo")
    assert m["schema_version"] == 1 and m["kind"] == "features" and m["config_hash"] == "abc"
    assert m["inputs"] == {"images": "f00d"}
    assert [p["name"] for p in m["parts"]] == ["shard-0", name2]
    assert [p["rows"] for p in m["parts"]] == [5, 3] and m["row_count"] == 8
    assert all(p["bytes"] > 0 for p in m["parts"])
    assert m["files"][0]["name"] == "metrics.json" and m["files"][0]["bytes"] == 11
    assert m["code_version"].startswith(mask.__version__)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", m["created_at"])
    assert m["mlflow_run_id"] is None and m["extra"] == {}

    got = store.read_table("features/demo")
    assert got.equals(pa.concat_tables([t1, t2]))
    cols = store.read_table("features/demo", columns=["word", "image_id"])
    assert cols.column_names == ["word", "image_id"]
    assert cols.column("image_id").to_pylist() == list(range(8))
    with pytest.raises(StorageError, match=r"no column\(s\) \['nope'\]"):
        store.read_table("features/demo", columns=["nope"])
    assert store.read_file("features/demo", "metrics.json") == b'{"r1": 0.5}'
    with pytest.raises(StorageError, match="lists no file 'other.bin'"):
        store.read_file("features/demo", "other.bin")


def test_part_uris_readable_by_pyarrow(store, rng):
    t = _table(rng, 4)
    with store.open_artifact("x", kind="k", config_hash="h") as w:
        w.write_part(t, name="p0")
        w.write_part(t, name="p1")
    uris = store.part_uris("x")
    assert uris == [store.uri("x", "parts", "p0.parquet"), store.uri("x", "parts", "p1.parquet")]
    if store.protocol == "s3":
        assert all(u.startswith("s3://") for u in uris)
    for u in uris:
        # A plain URI through fsspec (endpoint from the environment) ...
        with fsspec.open(u, "rb") as f:
            assert pq.read_table(f).equals(t)
    # ... and native paths through the store's pyarrow filesystem (what Ray Data gets).
    paths = [store.path("x", "parts", f"p{i}.parquet") for i in range(2)]
    both = pq.read_table(paths, filesystem=store.pyarrow_filesystem())
    assert both.num_rows == 8


def test_s3_endpoint_from_options_only(s3_bucket, s3_server, monkeypatch, rng):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    s = Store(f"{s3_bucket}/opt", options={"client_kwargs": {"endpoint_url": s3_server}})
    with s.open_artifact("a", kind="k", config_hash="h") as w:
        w.write_part(_table(rng, 3))
    assert s.read_table("a").num_rows == 3  # read goes through pyarrow's S3 with endpoint_override
    assert s.list("a") == [MANIFEST, "parts"]


def test_failed_writer_commits_nothing(store, rng):
    with pytest.raises(RuntimeError, match="boom"), \
            store.open_artifact("a", kind="k", config_hash="h") as w:
        w.write_part(_table(rng, 3), name="p")
        w.write_file("weights.bin", b"w")
        raise RuntimeError("boom")
    assert store.manifest("a") is None and store.committed("a") is None
    assert store.list("a/parts") == []  # the aborted writer removed its own part
    with pytest.raises(ArtifactNotFound) as e:
        store.read_table("a")
    assert store.uri("a") in str(e.value)
    with pytest.raises(ArtifactNotFound, match=re.escape(store.uri("a"))):
        store.part_uris("a")
    with pytest.raises(ArtifactNotFound, match=re.escape(store.uri("a"))):
        store.read_file("a", "weights.bin")


def test_crash_leftovers_are_ignored(store, rng):
    # A writer that dies without running __exit__ (killed process) leaves its part behind.
    crashed = store.open_artifact("a", kind="k", config_hash="h")
    crashed.write_part(_table(rng, 7, 100), name="orphan")
    assert store.committed("a") is None
    with store.open_artifact("a", kind="k", config_hash="h") as w:
        w.write_part(_table(rng, 2), name="good")
    assert "orphan.parquet" in store.list("a/parts")
    got = store.read_table("a")
    assert got.num_rows == 2 and got.column("image_id").to_pylist() == [0, 1]
    assert store.part_uris("a") == [store.uri("a/parts/good.parquet")]


def test_rewrite_keeps_old_version_readable_until_commit(tmp_path, rng):
    s = Store(str(tmp_path))
    with s.open_artifact("k", kind="knowledge", config_hash="h1") as w:
        w.write_part(_table(rng, 2))
        w.write_file("pae.safetensors", b"old")
    w2 = s.open_artifact("k", kind="knowledge", config_hash="h2")
    w2.write_part(_table(rng, 4))
    w2.write_file("pae.safetensors", b"new")
    # Not committed yet: readers still see the old version, files intact.
    assert s.read_table("k").num_rows == 2 and s.read_file("k", "pae.safetensors") == b"old"
    w2.commit()
    assert s.read_table("k").num_rows == 4 and s.read_file("k", "pae.safetensors") == b"new"
    assert s.committed("k", "h1") is None and s.committed("k", "h2")["config_hash"] == "h2"


def test_append_union(store, rng):
    with store.open_artifact("f", kind="features", config_hash="h", append=True) as w:
        w.write_part(_table(rng, 2, 0), name="s0")
        w.write_file("a.json", b"1")
    with store.open_artifact("f", kind="features", config_hash="h", inputs={"n": 2}, append=True) as w:
        w.write_part(_table(rng, 3, 2), name="s1")
        w.write_file("b.json", b"2")
    m = store.manifest("f")
    assert [p["name"] for p in m["parts"]] == ["s0", "s1"] and m["row_count"] == 5
    assert sorted(f["name"] for f in m["files"]) == ["a.json", "b.json"]
    assert m["inputs"] == {"n": 2}
    assert store.read_table("f").column("image_id").to_pylist() == [0, 1, 2, 3, 4]
    assert store.read_file("f", "a.json") == b"1"
    # Committed parts are never overwritten.
    with store.open_artifact("f", kind="features", config_hash="h", append=True) as w:
        with pytest.raises(StorageError, match="'s0' already exists"):
            w.write_part(_table(rng, 1), name="s0")
    # Without append, a new commit replaces the part list.
    with store.open_artifact("f", kind="features", config_hash="h") as w:
        w.write_part(_table(rng, 1, 9), name="only")
    assert store.read_table("f").column("image_id").to_pylist() == [9]


def test_append_unions_with_commits_that_landed_meanwhile(tmp_path, rng):
    s = Store(str(tmp_path))
    w1 = s.open_artifact("f", kind="k", config_hash="h", append=True)
    w2 = s.open_artifact("f", kind="k", config_hash="h", append=True)
    w1.write_part(_table(rng, 1, 0), name="a")
    w2.write_part(_table(rng, 1, 1), name="b")
    w1.commit()
    w2.commit()
    assert [p["name"] for p in s.manifest("f")["parts"]] == ["a", "b"]


def test_append_rejects_schema_mismatch(store, rng):
    with store.open_artifact("f", kind="k", config_hash="h", append=True) as w:
        w.write_part(_table(rng, 2))
    other = _table(rng, 2).drop_columns(["word"]).append_column("word", pa.array([1, 2]))
    with store.open_artifact("f", kind="k", config_hash="h", append=True) as w:
        with pytest.raises(StorageError, match=r"different schema.*type changes word: string -> int64"):
            w.write_part(other)
        with pytest.raises(StorageError, match=r"missing columns \['score'\]"):
            w.write_part(_table(rng, 2).drop_columns(["score"]))
    assert store.read_table("f").num_rows == 2


def test_schema_mismatch_within_one_writer(tmp_path, rng):
    s = Store(str(tmp_path))
    with s.open_artifact("f", kind="k", config_hash="h") as w:
        w.write_part(_table(rng, 2))
        with pytest.raises(StorageError, match=r"extra columns \['extra'\]"):
            w.write_part(_table(rng, 2).append_column("extra", pa.array([0, 1])))
        # Schema metadata (e.g. pandas) does not count as a difference.
        w.write_part(_table(rng, 2).replace_schema_metadata({b"pandas": b"{}"}))
    assert s.manifest("f")["row_count"] == 4


def test_append_rejects_other_config_hash(tmp_path, rng):
    s = Store(str(tmp_path))
    with s.open_artifact("f", kind="k", config_hash="h1", append=True) as w:
        w.write_part(_table(rng, 1))
    with pytest.raises(StorageError, match="config_hash='h1'.*config_hash='h2'"):
        s.open_artifact("f", kind="k", config_hash="h2", append=True)


def test_committed_with_hash_skips_work(store, rng):
    calls = []

    def build(config_hash: str) -> dict:
        rel = f"knowledge/{config_hash}"
        done = store.committed(rel, config_hash)
        if done is not None:
            return done
        calls.append(config_hash)
        with store.open_artifact(rel, kind="knowledge", config_hash=config_hash) as w:
            w.write_part(_table(rng, 3))
            return w.commit(mlflow_run_id="run-1")

    first = build("h1")
    again = build("h1")
    assert calls == ["h1"] and again == first and again["mlflow_run_id"] == "run-1"
    build("h2")
    assert calls == ["h1", "h2"]
    assert store.committed("knowledge/h1") is not None
    assert store.committed("knowledge/h1", "other") is None


def test_commit_twice_and_write_after_commit_rejected(tmp_path, rng):
    s = Store(str(tmp_path))
    w = s.open_artifact("a", kind="k", config_hash="h")
    w.commit()
    with pytest.raises(StorageError, match="already committed"):
        w.commit()
    with pytest.raises(StorageError, match="already committed"):
        w.write_part(_table(rng, 1))


def test_empty_artifact(tmp_path, rng):
    s = Store(str(tmp_path))
    with s.open_artifact("empty", kind="k", config_hash="h"):
        pass
    assert s.read_table("empty").num_rows == 0
    with s.open_artifact("zero", kind="k", config_hash="h") as w:
        w.write_part(_table(rng, 0))
    t = s.read_table("zero", columns=["word"])
    assert t.num_rows == 0 and t.column_names == ["word"]


def test_read_file_detects_tampering(tmp_path):
    s = Store(str(tmp_path))
    with s.open_artifact("a", kind="k", config_hash="h") as w:
        w.write_file("w.bin", b"weights")
    entry = s.manifest("a")["files"][0]
    s.write_bytes(f"a/{entry['path']}", b"tampered")
    with pytest.raises(StorageError, match="SHA-256"):
        s.read_file("a", "w.bin")


def test_newer_manifest_schema_version_refused(tmp_path):
    s = Store(str(tmp_path))
    s.write_json(f"a/{MANIFEST}", {"schema_version": 99})
    with pytest.raises(StorageError, match="schema_version 99"):
        s.manifest("a")


def test_manifest_never_holds_credentials(store, rng):
    with store.open_artifact("a", kind="k", config_hash="h", inputs={
        "images": "s3://AKIAABCDEFGHIJKLMNOP:hunter2pass@bucket/x",
        "aws_secret_access_key": "wJalrXUtnFEMI",
        "note": "uses key AKIAABCDEFGHIJKLMNOP",
    }) as w:
        w.write_part(_table(rng, 1))
        w.commit(extra={"password": "pw123456", "db": "postgresql://user:dbpass99@host/db"})
    raw = store.read_bytes(f"a/{MANIFEST}").decode()
    for secret in ("AKIAABCDEFGHIJKLMNOP", "hunter2pass", "wJalrXUtnFEMI", "pw123456", "dbpass99"):
        assert secret not in raw
    m = json.loads(raw)
    assert m["extra"]["db"] == "postgresql://***@host/db"


def test_redact_helpers():
    assert redact({"a": {"token": "t0k3n", "n": 3}, "l": ["x"]}) == {"a": {"token": "***", "n": 3}, "l": ["x"]}
    assert redact_text("https://u:p@h/x and ghp_abcdefghijklmnopqrstuvwxyz") == "https://***@h/x and ***"
    assert redact({"secret": ""}) == {"secret": ""}  # nothing to hide


def test_code_version():
    v = code_version()
    assert v == mask.__version__ or re.fullmatch(re.escape(mask.__version__) + r"\+g[0-9a-f]{12}", v)


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_files_local(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"aaa")
    (tmp_path / "ann.json").write_bytes(b"{}")
    s = Store(str(tmp_path))
    f1 = fingerprint_files(s, ["imgs", "ann.json"])
    assert f1 == fingerprint_files(s, ["imgs", "ann.json"])
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint_files(None, [str(tmp_path / "imgs")]))
    (tmp_path / "imgs" / "b.jpg").write_bytes(b"b")
    f2 = fingerprint_files(s, ["imgs", "ann.json"])
    assert f2 != f1
    (tmp_path / "ann.json").write_bytes(b'{"x": 1}')
    assert fingerprint_files(s, ["imgs", "ann.json"]) != f2
    with pytest.raises(StorageError, match="'missing.json' does not exist"):
        fingerprint_files(s, ["missing.json"])
    with pytest.raises(StorageError, match="does not exist"):
        fingerprint_files(fsspec.filesystem("file"), [str(tmp_path / "nope")])
    assert fingerprint({"b": 1, "a": 2}) == fingerprint({"a": 2, "b": 1})


def test_fingerprint_files_s3(s3_bucket):
    s = Store(s3_bucket)
    s.write_bytes("in/a.bin", b"1")
    f1 = fingerprint_files(s, ["in"])
    s.write_bytes("in/a.bin", b"22")
    assert fingerprint_files(s, ["in"]) != f1
    f2 = fingerprint_files(None, [f"{s3_bucket}/in/a.bin"])
    assert f2 == fingerprint_files(None, [f"{s3_bucket}/in/a.bin"]) and f2 != f1


def test_store_is_importable_without_side_effects(tmp_path):
    Store(str(tmp_path / "never"))
    assert not os.path.exists(tmp_path / "never")  # constructing a Store creates nothing


def test_add_existing_part_from_workers(store, rng):
    """Ray Data workers write under parts/ through the pyarrow filesystem; the driver lists and commits."""
    fs = store.pyarrow_filesystem()
    t0, t1 = _table(rng, 3, 0), _table(rng, 2, 3)
    fs.create_dir(store.path("f", "parts", "run-1"), recursive=True)  # pyarrow's local fs wants folders
    pq.write_table(t0, store.path("f", "parts", "run-1/a.parquet"), filesystem=fs)
    assert store.write_parquet("f/parts/run-1/b.parquet", t1) > 0  # creates folders itself
    store.write_parquet("f/parts/run-1/bad.parquet", t1.drop_columns(["word"]))
    with store.open_artifact("f", kind="features", config_hash="h", append=True) as w:
        assert w.add_existing_part("run-1/a.parquet") == "run-1/a"
        w.add_existing_part("run-1/b")
        with pytest.raises(StorageError, match=r"missing columns \['word'\]"):
            w.add_existing_part("run-1/bad.parquet")
        with pytest.raises(StorageError, match="no file at"):
            w.add_existing_part("run-1/none.parquet")
        with pytest.raises(StorageError, match="traversal"):
            w.add_existing_part("../x.parquet")
    m = store.manifest("f")
    assert [(p["name"], p["rows"]) for p in m["parts"]] == [("run-1/a", 3), ("run-1/b", 2)]
    assert store.read_table("f").equals(pa.concat_tables([t0, t1]))
    with store.open_artifact("f", kind="features", config_hash="h", append=True) as w:
        with pytest.raises(StorageError, match="already exists"):
            w.add_existing_part("run-1/a")


def test_retire_rows_replaces_superseded_rows_in_one_commit(tmp_path):
    """Rows of committed parts are dropped in the same manifest write that adds their replacements; the old
    part files stay (listed as retired) until a sweep after the grace period."""
    import pyarrow as pa

    from mask.storage import Store, sweep_parts

    store = Store(str(tmp_path))
    rel = "features/x"
    with store.open_artifact(rel, kind="f", config_hash="h") as w:
        w.write_part(pa.table({"image_id": ["a", "b"], "v": [1, 2]}), name="p1")
        w.write_part(pa.table({"image_id": ["c"], "v": [3]}), name="p2")
    with store.open_artifact(rel, kind="f", config_hash="h", append=True) as w:
        w.write_part(pa.table({"image_id": ["b", "c"], "v": [20, 30]}), name="p3")
        w.retire_rows(["image_id", "v"], lambda t: pa.compute.and_(
            pa.compute.is_in(t["image_id"], pa.array(["b", "c"])), pa.compute.less(t["v"], 10)).to_numpy(
                zero_copy_only=False), into="run-1")
    got = store.read_table(rel).sort_by("image_id")
    assert got.column("image_id").to_pylist() == ["a", "b", "c"] and got.column("v").to_pylist() == [1, 20, 30]
    m = store.manifest(rel)
    assert sorted(r["path"] for r in m["retired"]) == ["parts/p1.parquet", "parts/p2.parquet"]
    assert store.exists(rel, "parts/p1.parquet") and store.exists(rel, "parts/p2.parquet")  # readers of the old manifest
    assert any(p["path"].startswith("parts/run-1/p1-r") for p in m["parts"])
    assert sweep_parts(store, rel, lambda run, t: True, grace_s=3600)["retired"] == 0
    assert sweep_parts(store, rel, lambda run, t: True, grace_s=0)["retired"] == 2
    assert not store.exists(rel, "parts/p1.parquet") and store.read_table(rel).num_rows == 3
