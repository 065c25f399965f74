"""Change stamps of input files (mask.sources): local files and S3 objects (moto)."""

from __future__ import annotations

import os


def test_local_stamps_change_with_the_bytes(tmp_path):
    from mask.sources import source_stamps

    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    first = source_stamps([str(a), f"file://{b}", str(tmp_path / "missing.jpg"), "https://example.org/x.jpg"])
    assert first[0] and first[1] and first[2] is None and first[3] is None
    assert source_stamps([str(a)]) == first[:1]  # stable
    b.write_bytes(b"three")  # another size
    os.utime(a, ns=(1, 1))  # same bytes, another mtime: a changed stamp (re-extracted, harmlessly)
    second = source_stamps([str(a), str(b)])
    assert second[0] != first[0] and second[1] != first[1]


def test_s3_stamps_from_one_listing(s3_bucket, s3_server):
    import fsspec

    from mask.sources import source_stamps

    options = {"client_kwargs": {"endpoint_url": s3_server}}
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    bucket = s3_bucket[len("s3://"):]
    fs.pipe(f"{bucket}/photos/a.jpg", b"one")
    fs.pipe(f"{bucket}/photos/b.jpg", b"two")
    uris = [f"{s3_bucket}/photos/a.jpg", f"{s3_bucket}/photos/b.jpg", f"{s3_bucket}/photos/none.jpg"]
    first = source_stamps(uris, options)
    assert first[0] and first[1] and first[0] != first[1] and first[2] is None
    fs.pipe(f"{bucket}/photos/b.jpg", b"TWO")  # same size, other bytes: the ETag (MD5) differs
    second = source_stamps(uris, options)
    assert second[0] == first[0] and second[1] != first[1]
