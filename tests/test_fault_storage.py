"""Transient object-storage errors (DESIGN §3 fault tolerance): retried, nothing lost, nothing duplicated.

A small HTTP proxy on 127.0.0.1 sits in front of the moto S3 server and fails requests on a fixed
schedule with ``503 SlowDown`` before forwarding, a connection dropped before forwarding, or a connection
dropped *after* moto has done the request (the reply is lost, so the client cannot know it happened).
Both S3 clients of :class:`mask.storage.Store` go through it — s3fs/botocore (writes, manifests, files,
listings) and pyarrow's S3 filesystem (Parquet reads) — and both must retry until the work is done
(``mask.storage.S3_MAX_ATTEMPTS``; the clients' own defaults give up on a burst of three failures).
"""

from __future__ import annotations

import http.client
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")


class FaultyS3Proxy:
    """A reverse proxy to ``upstream`` that fails every ``every``-th request (503 / drop / drop after)."""

    KINDS = ("503", "drop-before", "drop-after")
    #: Every third request fails, the kinds in turn.
    EVERY_THIRD = (None, None, "503", None, None, "drop-before", None, None, "drop-after")
    #: Bursts: three failures in a row (one of each kind) after six good requests.
    BURSTS = (None, None, None, None, None, None, "503", "drop-before", "drop-after")

    def __init__(self, upstream: str, schedule: tuple[str | None, ...] = EVERY_THIRD):
        self.upstream = upstream.split("://", 1)[1]
        self.schedule = schedule
        self.lock = threading.Lock()
        self.requests = 0
        self.faults = {k: 0 for k in self.KINDS}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyS3Proxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _next_fault(self) -> str | None:
        with self.lock:
            kind = self.schedule[self.requests % len(self.schedule)]
            self.requests += 1
            if kind is not None:
                self.faults[kind] += 1
            return kind

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _drop(self) -> None:
                self.close_connection = True
                try:  # RST instead of an orderly close: the client sees a reset connection
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                except OSError:
                    pass

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._next_fault()
                if fault == "503":
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    self.wfile.write(SLOWDOWN)
                    return
                if fault == "drop-before":
                    return self._drop()
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                if fault == "drop-after":  # moto did it; the client never hears
                    return self._drop()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)  # a HEAD reply's length is the object's, not this empty body's
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler


@pytest.fixture
def faulty(s3_server):
    with FaultyS3Proxy(s3_server) as proxy:
        yield proxy


def _proxied(url: str, **retries) -> dict:
    return {"client_kwargs": {"endpoint_url": url}, **({"config_kwargs": {"retries": retries}} if retries else {})}


def _table(seed: int, rows: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"id": [f"r{seed}-{i}" for i in range(rows)], "x": rng.normal(size=rows),
                     "v": pa.array(list(rng.normal(size=(rows, 8)).astype(np.float32)), pa.list_(pa.float32()))})


def test_store_artifacts_survive_transient_s3_errors(s3_bucket, s3_server, faulty):
    """Write + commit artifacts (parts via s3fs, files, manifest), read them back (Parquet via pyarrow,
    files via s3fs, listings): every byte comes back, through ~a third of requests failing."""
    from mask.storage import Store

    options = _proxied(faulty.url)
    store = Store(f"{s3_bucket}/faulty", options)
    expected = {}
    for a in range(4):
        with store.open_artifact(f"art/{a}", kind="k", config_hash=f"h{a}") as w:
            tables = [_table(10 * a + p, 50 + p) for p in range(3)]
            for p, t in enumerate(tables):
                w.write_part(t, name=f"p{p}")
            w.write_file("weights.bin", bytes(range(256)) * (a + 1))
        expected[a] = pa.concat_tables(tables)
    again = Store(f"{s3_bucket}/faulty", options)  # fresh clients: nothing served from a cache
    assert again.list("art") == ["0", "1", "2", "3"]
    for a, t in expected.items():
        assert again.read_table(f"art/{a}").equals(t)
        assert again.read_file(f"art/{a}", "weights.bin") == bytes(range(256)) * (a + 1)
        assert again.committed(f"art/{a}", f"h{a}")["row_count"] == t.num_rows
    # the faults happened, of every kind, and the bucket (seen without the proxy) has exactly what was committed
    assert min(faulty.faults.values()) >= 3, faulty.faults
    direct = Store(f"{s3_bucket}/faulty", _proxied(s3_server))
    for a in expected:
        m = direct.manifest(f"art/{a}")
        listed = {f"art/{a}/{e['path']}" for e in m["parts"] + m["files"]} | {f"art/{a}/_MANIFEST.json"}
        on_s3 = {k.split("/faulty/", 1)[1] for k in direct.fs.find(direct.path(f"art/{a}"))}
        assert on_s3 == listed


def test_dataset_ingest_survives_transient_s3_errors(s3_bucket, s3_server, faulty):
    """An image-folder dataset on S3 is listed, read and committed through the faulty proxy; a rerun
    (also through it) finds the committed dataset and rewrites nothing."""
    import io

    import fsspec
    from PIL import Image

    from mask.config import DatasetConfig
    from mask.datasets import ingest_dataset
    from mask.storage import Store

    direct = fsspec.filesystem("s3", skip_instance_cache=True, client_kwargs={"endpoint_url": s3_server})
    bucket = s3_bucket[len("s3://"):]
    names = [f"img{i:02d}" for i in range(12)]
    for i, name in enumerate(names):
        buf = io.BytesIO()
        Image.new("RGB", (40 + i, 30), (20 * i, 100, 200)).save(buf, format="PNG")
        direct.pipe(f"{bucket}/photos/{name}.png", buf.getvalue())
    options = _proxied(faulty.url)
    store = Store(f"{s3_bucket}/mask", options)
    cfg = DatasetConfig(name="photos", kind="folder", path=f"{s3_bucket}/photos")
    first = ingest_dataset(store, cfg, options)
    assert first["reused"] is False
    images = store.read_table("datasets/photos/images")
    assert sorted(images.column("image_id").to_pylist()) == names
    assert images.num_rows == len(set(images.column("uri").to_pylist())) == 12
    assert sum(faulty.faults.values()) >= 3, faulty.faults
    second = ingest_dataset(store, cfg, options)
    assert second["reused"] is True and second["config_hash"] == first["config_hash"]
    assert store.read_table("datasets/photos/images").equals(images)


def test_bursts_of_three_failures_are_retried_by_both_clients(s3_bucket, s3_server):
    """Three failures in a row (503, dropped, reply lost): with the clients' default attempts pyarrow gives
    up (the control); with the Store's retry settings every read and write of both clients succeeds."""
    from mask.storage import Store

    direct = Store(f"{s3_bucket}/burst", _proxied(s3_server))
    with direct.open_artifact("a", kind="k", config_hash="h") as w:
        for p in range(3):
            w.write_part(_table(p, 40), name=f"p{p}")
    expected = direct.read_table("a")
    paths = [direct.path("a", "parts", f"p{p}.parquet") for p in range(3)]

    def read_parts(store: Store) -> None:
        fs = store.pyarrow_filesystem()
        for _ in range(3):
            for path in paths:
                with fs.open_input_file(path) as f:
                    assert len(f.read()) == direct.fs.info(path)["size"]

    with FaultyS3Proxy(s3_server, FaultyS3Proxy.BURSTS) as proxy:  # control: pyarrow's default of 3 attempts
        with pytest.raises(OSError, match="503|NETWORK_CONNECTION"):
            read_parts(Store(f"{s3_bucket}/burst", _proxied(proxy.url, max_attempts=3)))
    with FaultyS3Proxy(s3_server, FaultyS3Proxy.BURSTS) as proxy:
        store = Store(f"{s3_bucket}/burst", _proxied(proxy.url))
        read_parts(store)
        assert store.read_table("a").equals(expected)
        with store.open_artifact("b", kind="k", config_hash="h") as w:
            w.write_part(expected, name="all")
            w.write_file("f.bin", b"\x00" * 1000)
        assert store.read_table("b").equals(expected) and store.read_file("b", "f.bin") == b"\x00" * 1000
        assert min(proxy.faults.values()) >= 3, proxy.faults
