"""Servers on 127.0.0.1 for the remote-store tests, started and stopped by the test itself: a plain HTTP server over
a folder that counts what it serves and can misbehave on purpose (503s, reset connections, a kill switch), and
moto's S3 API (``ThreadedMotoServer``) with a public bucket the stores are uploaded to."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import signal
import socket
import threading
from collections import Counter
from pathlib import Path

METADATA = {".zarray", ".zgroup", ".zattrs", "zarr.json", ".zmetadata"}


def is_chunk(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return ".zarr/" in path and name not in METADATA and not name.endswith(".png")


class Served:
    """What a server did and how it misbehaves: GETs per path; ``fault`` ``"503"`` on the first GET of every chunk,
    or ``"reset"`` on its first two (``faults`` counts them); ``kill_after``: after that many chunk GETs, SIGKILL to ``victim``."""

    def __init__(self, fault: str | None = None) -> None:
        self.fault = fault
        self.gets: Counter[str] = Counter()
        self.faults = 0
        self.kill_after: int | None = None
        self.victim: int | None = None
        self.lock = threading.Lock()

    def chunk_gets(self) -> Counter[str]:
        return Counter({p: n for p, n in self.gets.items() if is_chunk(p)})


class _Handler(http.server.SimpleHTTPRequestHandler):
    served: Served

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        with self.served.lock:
            # a reset twice: aiohttp silently tries a dropped keep-alive connection once more on its own
            early = self.served.gets[path] < (2 if self.served.fault == "reset" else 1)
            self.served.gets[path] += 1
            chunks = sum(self.served.chunk_gets().values())
            fault = self.served.fault if early and is_chunk(path) else None
            if fault:
                self.served.faults += 1
            kill = self.served.kill_after is not None and chunks == self.served.kill_after
        if kill and self.served.victim:
            os.kill(self.served.victim, signal.SIGKILL)
        if fault == "503":
            self.send_error(503, "Service Unavailable")
            return
        if fault == "reset":  # the connection dropped mid-answer: no status line at all
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        super().do_GET()


@contextlib.contextmanager
def http_folder(folder: Path, fault: str | None = None):
    """``(base URL, Served)`` of a threaded HTTP server over ``folder``, stopped on exit."""
    served = Served(fault)
    handler = type("Handler", (_Handler,), {"served": served})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(folder))
    )
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextlib.contextmanager
def moto_s3(bucket: str = "scrolls"):
    """``(endpoint URL, s3fs file system with credentials)`` of moto's S3 server on 127.0.0.1 holding a public-read
    bucket (as the open data bucket is: readable without credentials), stopped on exit."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{server._server.server_port}"
        keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys).create_bucket(
            Bucket=bucket, ACL="public-read"
        )
        fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint},
                               s3_additional_kwargs={"ACL": "public-read"}, skip_instance_cache=True)  # fmt: skip
        yield endpoint, fs
    finally:
        server.stop()


def upload(fs, local: Path, target: str) -> None:
    """Every file under ``local`` to ``target`` (``bucket/prefix``), one object each."""
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.pipe(f"{target}/{path.relative_to(local).as_posix()}", path.read_bytes())
