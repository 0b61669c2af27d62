"""A remote zarr store as zarr reads it (``FetchingStore``: retries, the chunk cache, counters), what identifies its
version (the metadata and what the server says of it), the segments in a remote folder, and their masks fetched.
The wire itself (file systems, retries, the cache) is ``remote.py``'s."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path

from ink_infer.errors import UserError
from ink_infer.volumes.remote import (
    METADATA_KEYS,
    WIRE,
    ChunkCache,
    Remote,
    filesystem,
    retried,
    url_name,
    url_parent,
    with_retries,
)

log = logging.getLogger(__name__)

ZARR_SUFFIX = ".zarr"
MASK_CACHE = "masks"  # under the cache folder: masks fetched from beside remote stores


class _Shared:
    """What every copy of one ``FetchingStore`` shares (zarr makes copies of a store, e.g. read-only views): where
    it is, its version once asked (``store_identity``) and its chunk cache."""

    def __init__(self, remote: Remote) -> None:
        self.remote, self.url = remote, remote.url
        self.cache: ChunkCache | None = None
        self.identity: dict | None = None  # the store's version, asked of the server once


def fetching_store(remote: Remote):
    """The zarr store of ``remote.url``: fsspec's, wrapped by ``FetchingStore`` (its cache set by ``use_cache``)."""
    from zarr.storage import FsspecStore, WrapperStore

    class FetchingStore(WrapperStore):
        """Every read through ``with_retries``; a chunk's whole object from the cache, or fetched and cached."""

        def __init__(self, store, shared: _Shared) -> None:
            super().__init__(store)
            self.shared = shared

        def _with_store(self, store):
            return type(self)(store, self.shared)

        async def get(self, key, prototype, byte_range=None):
            data = await self._whole(key, prototype)
            if data is None:
                return None
            return prototype.buffer.from_bytes(_ranged(data, byte_range))

        async def _whole(self, key: str, prototype) -> bytes | None:
            metadata = (
                key.rsplit("/", 1)[-1] in METADATA_KEYS
            )  # never cached: each run reads what is there now
            cache = None if metadata else self.shared.cache
            if cache is not None:  # in a thread, as zarr reads local files: chunks are read side by side
                data = await asyncio.to_thread(cache.read, key)
                if data is not None:
                    WIRE.add(cache_hits=1)
                    return data
            where = f"{self.shared.url}/{key}"
            buffer = await with_retries(lambda: self._store.get(key, prototype), where)
            WIRE.add(requests=1)
            if buffer is None:  # zarr probes for metadata that may be absent; a missing chunk reads as fill
                if not metadata:
                    WIRE.note_missing(where)
                return None
            data = buffer.to_bytes()
            WIRE.add(bytes=len(data))
            if cache is not None:
                await asyncio.to_thread(cache.write, key, data)
            return data

    fs, path = filesystem(remote, asynchronous=True)
    inner = FsspecStore(fs, read_only=True, path=path.rstrip("/"))
    return FetchingStore(inner, _Shared(remote))


def _ranged(data: bytes, byte_range) -> bytes:
    """The part of a whole object a zarr byte request asks for (sharded arrays read their shards in ranges)."""
    if byte_range is None:
        return data
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest

    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start : byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset :]
    if isinstance(byte_range, SuffixByteRequest):
        return data[-byte_range.suffix :]
    raise ValueError(f"unexpected byte range {byte_range!r}")


def store_identity(store, array_path: str, metadata: dict) -> dict:
    """What identifies a remote store's version: its URL, the array's metadata, and what the server says of the
    metadata object (ETag, last-modified, size), as far as it says anything. Asked once per store."""
    if store.shared.identity is not None:
        return store.shared.identity
    fs, root = filesystem(store.shared.remote)
    told = {}
    for name in (".zarray", "zarr.json"):  # the array's own metadata object
        full = "/".join(p.strip("/") for p in (root, array_path, name) if p)
        try:
            info = retried(lambda full=full: fs.info(full), full)
        except (FileNotFoundError, OSError, ValueError):
            continue
        told = {k: str(info[k]) for k in sorted(info) if k.lower() in ("etag", "last-modified", "lastmodified",
                                                                       "size", "versionid")}  # fmt: skip
        told["object"] = name
        break
    store.shared.identity = {"url": store.shared.url, "array": array_path, "metadata_sha256": _sha(metadata),
                             "server": told}  # fmt: skip
    return store.shared.identity


def use_cache(store, remote: Remote, identity: dict) -> None:
    """Chunks of this store version cached under ``remote.cache`` (none when ``remote.cache_bytes`` is 0); once
    per store (a store opened again in the run is the same one, its cache's size already known)."""
    if remote.cache and remote.cache_bytes > 0 and store.shared.cache is None:
        store.shared.cache = ChunkCache(Path(remote.cache), _sha(identity)[:24], remote.cache_bytes)


def _sha(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def remote_segments(remote: Remote) -> list[Remote]:
    """The stores at ``remote.url``: itself when it names a ``.zarr``, else the ``.zarr`` stores in that folder
    (sorted); ``UserError`` for a folder that cannot be listed or holds none."""
    if url_name(remote.url).endswith(ZARR_SUFFIX):
        return [remote]
    fs, path = filesystem(remote)
    try:
        entries = retried(lambda: fs.ls(path.rstrip("/") + "/", detail=False), remote.url)
    except FileNotFoundError:
        raise UserError(f"{remote.url}: not found (expected a .zarr store or a folder of them)") from None
    except Exception as e:  # noqa: BLE001 - s3fs and aiohttp raise many kinds; one line names it
        raise UserError(f"{remote.url}: cannot be listed ({type(e).__name__}: {e})".splitlines()[0]) from None
    base = remote.url.rstrip("/")
    names = sorted({url_name(str(e)) for e in entries})
    found = [remote.at(f"{base}/{name}") for name in names if name.endswith(ZARR_SUFFIX)]
    if not found:
        raise UserError(f"{remote.url}: no .zarr store in this folder")
    return found


def fetch_mask(remote: Remote, asked: Path | None = None) -> Path | None:
    """The segment's mask as a local file: ``asked`` (``--mask``, a local path or URL), else ``<seg>_mask.png``
    beside the store, inside it, or ``mask.png`` inside it, fetched into the cache folder; None when there is none."""
    if asked is not None:
        return asked
    seg = url_name(remote.url).removesuffix(ZARR_SUFFIX)
    candidates = [f"{url_parent(remote.url)}/{seg}_mask.png", f"{remote.url.rstrip('/')}/{seg}_mask.png",
                  f"{remote.url.rstrip('/')}/mask.png"]  # fmt: skip
    for url in candidates:
        data = fetch_file(remote.at(url))
        if data is not None:
            folder = Path(remote.cache or ".") / MASK_CACHE
            folder.mkdir(parents=True, exist_ok=True)
            local = folder / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}_{url_name(url)}"
            local.write_bytes(data)
            return local
    return None


def fetch_file(remote: Remote) -> bytes | None:
    """One small object's bytes (a mask), with retries; None when the server has no such object."""
    fs, path = filesystem(remote)
    try:
        data = retried(lambda: fs.cat_file(path), remote.url)
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001
        raise UserError(
            f"{remote.url}: cannot be fetched ({type(e).__name__}: {e})".splitlines()[0]
        ) from None
    WIRE.add(requests=1, bytes=len(data))
    return data
