"""Segments read over the wire: ``s3://``, ``https://`` and ``http://`` zarr stores (v2 and v3, plain arrays and
OME-Zarr level 0), through fsspec (s3fs for S3) behind the ``ink_infer[remote]`` extra.

A remote store is one more ``ZarrVolume``: zarr reads it through ``FetchingStore``, which wraps fsspec's store with

- **retries**: a transient error (a timeout, a reset connection, HTTP 429 or 5xx) is tried again with exponential
  backoff, ``RETRIES`` times; each is counted (``WIRE``). A missing object (404) is a missing chunk (zarr reads its
  fill value; counted and named); 403 and the rest fail at once;
- **a chunk cache** on local disk (``ChunkCache``): each chunk fetched once per store version, written atomically
  (a temporary file renamed), read back by the 18 models of an ensemble, by reruns and by the other workers on the
  machine; bounded in size, least recently used out. Metadata is never cached: each run reads what the server says now.

S3 credentials: the standard AWS environment and config when there are any, anonymous access otherwise (the open
data bucket); ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for S3-compatible stores; ``--storage-option
KEY=VALUE`` passes anything else to the file system.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ink_infer.errors import UserError

log = logging.getLogger(__name__)

SCHEMES = ("s3://", "https://", "http://")
RETRIES = 6  # a transient error is tried again this many times (backoff 0.1 s, doubling, at most 5 s)
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
METADATA_KEYS = (".zarray", ".zgroup", ".zattrs", "zarr.json", ".zmetadata")
EXTRA = "pip install 'ink_infer[remote]'"


def is_url(text: str | os.PathLike) -> bool:
    return isinstance(text, str) and text.lower().startswith(SCHEMES)


def url_name(url: str) -> str:
    """The last part of a URL's path (``s3://b/p/seg.zarr/`` -> ``seg.zarr``)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def url_parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


@dataclass(frozen=True)
class Remote:
    """How to reach a remote store: its URL, ``--storage-option`` pairs, and the chunk cache (folder, bytes; 0: none)."""

    url: str
    options: tuple[tuple[str, object], ...] = ()
    cache: str | None = None
    cache_bytes: int = 0

    def __str__(self) -> str:
        return self.url

    def at(self, url: str) -> Remote:
        return Remote(url, self.options, self.cache, self.cache_bytes)


def parse_storage_options(pairs: list[str] | tuple[str, ...]) -> tuple[tuple[str, object], ...]:
    """``--storage-option KEY=VALUE``s: VALUE read as JSON when it is (true, 3, {"a": 1}), else as text."""
    found = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--storage-option {pair!r}: expected KEY=VALUE (e.g. anon=true)")
        try:
            found.append((key, json.loads(value)))
        except ValueError:
            found.append((key, value))
    return tuple(found)


# -- the file system ---------------------------------------------------------------------------------------------


def filesystem(remote: Remote, *, asynchronous: bool = False):
    """``(fsspec file system, path inside it)`` for ``remote.url``; ``UserError`` naming the extra when the
    packages are missing. ``asynchronous``: the one zarr reads through, in zarr's own event loop; the plain one
    (a distinct instance, with its own connections) for the few calls made from plain code."""
    try:
        import fsspec
        from zarr.storage import FsspecStore  # noqa: F401 - zarr 3's: the reader below needs it
    except ImportError:
        raise UserError(f"{remote.url}: reading remote stores needs fsspec and zarr 3: {EXTRA}") from None
    options = dict(remote.options)
    protocol = remote.url.split("://", 1)[0].lower()
    if protocol == "s3":
        try:
            import s3fs  # noqa: F401
        except ImportError:
            raise UserError(f"{remote.url}: reading s3:// stores needs s3fs: {EXTRA}") from None
        options = {**_s3_defaults(options), **options}
    else:
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            raise UserError(f"{remote.url}: reading http(s):// stores needs aiohttp: {EXTRA}") from None
    try:
        fs, path = fsspec.core.url_to_fs(remote.url, asynchronous=asynchronous, **options)
    except (TypeError, ValueError) as e:
        raise UserError(f"{remote.url}: --storage-option not accepted ({e})".splitlines()[0]) from None
    return fs, path


def _s3_defaults(options: dict) -> dict:
    """Anonymous unless credentials are configured (environment, config files, instance roles); the endpoint from
    ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` unless the options name one."""
    found = {}
    if "anon" not in options and not any(k in options for k in ("key", "secret", "token", "profile")):
        try:
            import botocore.session

            found["anon"] = botocore.session.get_session().get_credentials() is None
        except Exception:  # noqa: BLE001 - a broken AWS config: anonymous, as the open data needs
            found["anon"] = True
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in options:
        found["endpoint_url"] = endpoint
    return found


# -- the wire's faults and counters ------------------------------------------------------------------------------


@dataclass
class WireStats:
    """What this process fetched: requests, bytes, chunks served from the cache, transient errors retried, chunks
    the server did not have (read as the fill value)."""

    requests: int = 0
    bytes: int = 0
    cache_hits: int = 0
    retries: int = 0
    missing: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def note_missing(self, where: str) -> None:
        with self._lock:
            self.missing.append(where)

    def as_dict(self) -> dict:
        """The counts as report.json shows them (the missing chunks named, at most 20)."""
        return {"requests": self.requests, "bytes": self.bytes, "cache_hits": self.cache_hits,
                "retries": self.retries, "missing_chunks": len(self.missing), "missing": self.missing[:20]}  # fmt: skip

    def since(self, before: dict) -> dict:
        """What was fetched since ``before`` (an ``as_dict`` taken then)."""
        now = self.as_dict()
        with self._lock:
            missing = self.missing[before["missing_chunks"] : before["missing_chunks"] + 20]
        return {**{k: now[k] - before[k] for k in WIRE_COUNTS}, "missing": missing}


WIRE_COUNTS = ("requests", "bytes", "cache_hits", "retries", "missing_chunks")


def add_wire(*counts: dict | None) -> dict | None:
    """The sum of several ``as_dict``s (None: nothing fetched anywhere)."""
    found = [c for c in counts if c]
    if not found:
        return None
    total = {k: sum(c[k] for c in found) for k in WIRE_COUNTS}
    return {**total, "missing": [m for c in found for m in c["missing"]][:20]}


WIRE = WireStats()


def is_transient(error: BaseException) -> bool:
    """A timeout, a reset or refused connection, HTTP 408/429/5xx: worth another try. 403, 404, a malformed
    answer: not."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(error, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
        return True
    status = getattr(error, "status", None) or getattr(error, "code", None)
    if isinstance(status, int):
        return status in TRANSIENT_STATUS
    try:
        import aiohttp

        if isinstance(error, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            return True
    except ImportError:
        pass
    text = str(error)
    return any(word in text for word in ("503 ", "502 ", "500 ", "429 ", "SlowDown", "Service Unavailable",
                                         "Connection reset", "timed out"))  # fmt: skip


async def with_retries(fetch, what: str):
    """``await fetch()``, again after a transient error (backoff 0.1 s doubling to 5 s), ``RETRIES`` times."""
    for delay in _delays():
        try:
            return await fetch()
        except Exception as e:
            if delay is None or not is_transient(e):
                raise
            _retrying(what, e, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def retried(fetch, what: str):
    """``fetch()`` from plain code, with ``with_retries``' rule."""
    for delay in _delays():
        try:
            return fetch()
        except Exception as e:
            if delay is None or not is_transient(e):
                raise
            _retrying(what, e, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _delays():
    """The waits before each retry, then None (the last try)."""
    for attempt in range(RETRIES):
        yield min(0.1 * 2**attempt, 5.0)
    yield None


def _retrying(what: str, error: Exception, delay: float) -> None:
    WIRE.add(retries=1)
    log.debug("%s: %s, trying again in %.1f s", what, type(error).__name__, delay)


# -- the chunk cache ---------------------------------------------------------------------------------------------


class ChunkCache:
    """Chunks of one store version on local disk, under ``root/<version>/<key>``: complete or absent (written to a
    temporary file, then renamed), their mtime bumped when read (least recently used out first), the whole cache
    (every version under ``root``) kept under ``limit`` bytes."""

    def __init__(self, root: Path, version: str, limit: int) -> None:
        self.root, self.folder, self.limit = Path(root), Path(root) / version, limit
        self._lock = threading.Lock()
        self._size: int | None = None  # what this process believes the cache holds; listed when first needed

    def read(self, key: str) -> bytes | None:
        path = self.folder / key
        try:
            data = path.read_bytes()
        except OSError:  # absent, or evicted by another process since it was seen
            return None
        try:
            os.utime(path)
        except OSError:
            pass
        return data

    def write(self, key: str, data: bytes) -> None:
        path = self.folder / key
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:  # a full disk loses the cache's help, not the run
            log.debug("%s: not cached (%s)", path, e)
            return
        with self._lock:
            self._size = (
                self._size if self._size is not None else sum(size for _, size, _ in _cached_files(self.root))
            ) + len(data)
            if self._size > self.limit:
                self._size = self._evict()

    def _evict(self) -> int:
        """Delete the least recently used chunks until the cache holds at most 90 % of its limit; its new size."""
        files = sorted(_cached_files(self.root))
        total = sum(size for _, size, _ in files)
        for _, size, path in files:
            if total <= self.limit * 0.9:
                break
            try:
                os.unlink(path)
                total -= size
            except OSError:
                pass
        return total


def _cached_files(root: Path):
    """``(mtime_ns, size, path)`` of every file under ``root`` (one evicted meanwhile by another process: left out)."""
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            yield st.st_mtime_ns, st.st_size, path
