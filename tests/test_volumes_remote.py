"""Segments read over the wire (#25): zarr v2, v3 and OME-Zarr stores on a real S3 API (moto's server) and a plain
HTTP server, both on 127.0.0.1, give the very probabilities of the local copy; faults on the wire are retried and
counted; a missing store is one line; a run killed mid-fetch resumes from its cache; the chunk cache is bounded;
masks are fetched from beside the store, given with --mask, or found in the pyramid's coarsest level."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from ink_infer.manifest import DEMO_MANIFEST
from ink_infer.submit import main
from ink_infer.synthetic.fragments import write_segment
from ink_infer.volumes.remote import ChunkCache, Remote, _s3_defaults, is_transient, parse_storage_options
from tests.helpers import one_error_line, report_of, run_cli
from tests.servers import http_folder, is_chunk, moto_s3, upload

zarr = pytest.importorskip("zarr")
pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")


def probabilities(out: Path, seg: str = "s1") -> np.ndarray:
    import tifffile

    return tifffile.imread(out / "probabilities" / f"{seg}.tif")


@pytest.fixture(scope="module")
def segs(tmp_path_factory) -> Path:
    """``s1.zarr`` (zarr v3, OME-Zarr multiscales, level 0 only) and ``s2.zarr`` (zarr v2, a plain array, its
    layers last), each with its mask beside it, and their probabilities computed locally by the stand-ins."""
    root = tmp_path_factory.mktemp("segs")
    write_segment(root, "s1", shape=(256, 320), seed=4, layout="zarr")
    level0 = np.asarray(zarr.open_group(str(root / "s1.zarr"), mode="r")["0"][...])
    v2 = zarr.create_array(str(root / "s2.zarr"), shape=(256, 320, 65), chunks=(128, 128, 16), dtype="uint16",
                           zarr_format=2)  # fmt: skip
    v2[...] = np.moveaxis(level0[:, :, ::-1], 0, 2)  # another segment: the columns mirrored
    mask = cv2.imread(str(root / "s1_mask.png"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(root / "s2_mask.png"), np.ascontiguousarray(mask[:, ::-1]))
    return root


@pytest.fixture(scope="module")
def local_maps(segs, tmp_path_factory, manifest) -> dict[str, np.ndarray]:
    """The probabilities of both segments read from local disk (stand-ins set up by hand: a module fixture)."""
    from ink_infer import models
    from ink_infer.run import model_run
    from tests.standins import Standin

    mp = pytest.MonkeyPatch()
    for module in (model_run, models):  # what the ``standins`` fixture does, for a module's fixture
        mp.setattr(module, "build_model", lambda spec: Standin())
    out = tmp_path_factory.mktemp("local")
    try:
        assert run_cli(segs, out, manifest) == 0
    finally:
        mp.undo()
    return {s: probabilities(out, s) for s in ("s1", "s2")}


@pytest.fixture
def anonymous_aws(monkeypatch, tmp_path):
    """No AWS credentials anywhere (as a researcher without an AWS account)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))


def test_s3_folder_of_v2_and_v3_stores_gives_the_local_bytes(segs, local_maps, manifest, tmp_path, standins,
                                                             monkeypatch, anonymous_aws):  # fmt: skip
    """A folder URL on a real S3 API (moto), read anonymously as the open data bucket is, its endpoint from
    AWS_ENDPOINT_URL: both stores found, both maps equal to the local ones, the fetches counted."""
    with moto_s3() as (endpoint, fs):
        upload(fs, segs, "scrolls/segments")
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        out = tmp_path / "out"
        assert run_cli("s3://scrolls/segments/", out, manifest) == 0
    for seg in ("s1", "s2"):
        np.testing.assert_array_equal(probabilities(out, seg), local_maps[seg])
    rep = report_of(out)
    assert rep["data"] == "s3://scrolls/segments/"
    assert rep["remote"]["requests"] > 0 and rep["remote"]["bytes"] > 0 and rep["remote"]["retries"] == 0
    # two models read each chunk: the second from the cache
    assert rep["remote"]["cache_hits"] > 0


def test_s3_with_credentials_is_not_anonymous(monkeypatch, tmp_path):
    """Configured credentials are used (a private bucket needs them); none configured: anonymous."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert _s3_defaults({}) == {"anon": False, "endpoint_url": "http://127.0.0.1:9"}
    assert _s3_defaults({"anon": True}) == {"endpoint_url": "http://127.0.0.1:9"}  # the user's word stands
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    assert _s3_defaults({})["anon"] is True


def test_http_store_gives_the_local_bytes_and_the_cache_serves_the_second_model(segs, local_maps, manifest,
                                                                                 tmp_path, standins):  # fmt: skip
    with http_folder(segs) as (url, served):
        out = tmp_path / "out"
        assert run_cli(f"{url}/s1.zarr", out, manifest) == 0
        gets = served.chunk_gets()
    np.testing.assert_array_equal(probabilities(out), local_maps["s1"])
    assert gets and max(gets.values()) == 1  # each chunk fetched once, for both models
    rep = report_of(out)
    assert rep["remote"]["requests"] >= len(gets) and rep["remote"]["cache_hits"] > 0
    assert all(f["wire"] is not None for m in rep["models"] for f in m["fragments"].values())


@pytest.mark.parametrize("fault", ["503", "reset"])
def test_faults_on_the_wire_are_retried_and_counted(segs, local_maps, manifest, tmp_path, standins, fault):
    """Every chunk's first GET answers 503, or its first two drop the connection: the same bytes, and the retries
    counted in report.json (each 503; of the resets, those aiohttp does not retry itself on a fresh connection)."""
    with http_folder(segs, fault=fault) as (url, served):
        out = tmp_path / "out"
        assert run_cli(f"{url}/s1.zarr", out, manifest) == 0
        faults = served.faults
    np.testing.assert_array_equal(probabilities(out), local_maps["s1"])
    retries = report_of(out)["remote"]["retries"]
    assert faults > 0 and (retries == faults if fault == "503" else 0 < retries <= faults)


def test_no_cache_fetches_for_every_model(segs, local_maps, manifest, tmp_path, standins):
    """``--cache-gb 0``: nothing kept, each model fetches its chunks (the cache is what saves the refetches)."""
    with http_folder(segs) as (url, served):
        out = tmp_path / "out"
        assert run_cli(f"{url}/s1.zarr", out, manifest, "--cache-gb", "0") == 0
        gets = served.chunk_gets()
    np.testing.assert_array_equal(probabilities(out), local_maps["s1"])
    assert max(gets.values()) == 2 and report_of(out)["remote"]["cache_hits"] == 0
    assert not (out / "cache").exists() or not any(p.is_file() and "masks" not in p.parts
                                                   for p in (out / "cache").rglob("*"))  # fmt: skip


@pytest.mark.parametrize("where", ["s3", "http"])
def test_a_missing_store_is_one_line_before_compute(where, manifest, tmp_path, standins, capsys, monkeypatch,
                                                    anonymous_aws, segs):  # fmt: skip
    if where == "s3":
        with moto_s3() as (endpoint, _):
            monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
            code = run_cli("s3://scrolls/nowhere/seg.zarr", tmp_path / "out", manifest)
    else:
        with http_folder(segs) as (url, _):
            code = run_cli(f"{url}/nowhere.zarr", tmp_path / "out", manifest)
    assert code == 2
    err = one_error_line(capsys)
    assert "nowhere" in err and "zarr" in err
    assert not (tmp_path / "out" / "submission.csv").exists()


def test_a_store_that_is_not_zarr_is_one_line(tmp_path, manifest, standins, capsys):
    (tmp_path / "site" / "bad.zarr").mkdir(parents=True)
    (tmp_path / "site" / "bad.zarr" / "zarr.json").write_text("{not json")
    with http_folder(tmp_path / "site") as (url, _):
        assert run_cli(f"{url}/bad.zarr", tmp_path / "out", manifest) == 2
    assert "bad.zarr" in one_error_line(capsys)


def test_a_run_killed_mid_fetch_resumes_from_its_cache(segs, tmp_path):
    """The real thing: a run of the demo models in its own process, SIGKILLed by the server after 12 chunk GETs;
    the rerun gives the bytes of a local run, and fetches none of the chunks the cache already held."""
    out, args = tmp_path / "out", ["--manifest", str(DEMO_MANIFEST), "--weights", str(DEMO_MANIFEST.parent),
                                   "--stride", "64", "--quiet", "--device", "cpu"]  # fmt: skip
    with http_folder(segs) as (url, served):
        served.kill_after = 12
        argv = [
            sys.executable,
            "-m",
            "ink_infer.submit",
            "--data",
            f"{url}/s1.zarr",
            "--out",
            str(out),
            *args,
        ]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        served.victim = proc.pid
        assert proc.wait(timeout=300) == -9
        cached = {p.relative_to(next((out / "cache").glob("[0-9a-f]*"))).as_posix()
                  for p in (out / "cache").rglob("*") if p.is_file() and "masks" not in p.parts
                  and not p.name.startswith(".part-")}  # fmt: skip
        before = served.chunk_gets()
        served.kill_after = None
        assert main(["--data", f"{url}/s1.zarr", "--out", str(out), *args]) == 0
        again = served.chunk_gets() - before
    assert cached, "the killed run cached nothing"
    refetched = {p for p in again if any(p.endswith("/s1.zarr/" + c) for c in cached)}
    assert not refetched
    local = tmp_path / "local"
    assert main(["--data", str(segs / "s1.zarr"), "--out", str(local), *args]) == 0
    np.testing.assert_array_equal(probabilities(out), probabilities(local))


def test_partials_of_a_remote_store_follow_its_metadata(segs, manifest, tmp_path, standins):
    """A rerun reuses the partials; a store whose metadata the server reports changed (here: its attributes) is
    computed anew, never mistaken for the old one."""
    site = tmp_path / "site"
    shutil.copytree(segs / "s1.zarr", site / "s1.zarr")
    shutil.copy(segs / "s1_mask.png", site)
    out = tmp_path / "out"
    with http_folder(site) as (url, _):
        assert run_cli(f"{url}/s1.zarr", out, manifest) == 0
        assert run_cli(f"{url}/s1.zarr", out, manifest) == 0
        assert len(report_of(out)["partials"]["reused"]) == 2
        meta = site / "s1.zarr" / "0" / "zarr.json"
        doc = json.loads(meta.read_text())
        doc["attributes"] = {"rewritten": True}
        meta.write_text(json.dumps(doc))
        assert run_cli(f"{url}/s1.zarr", out, manifest) == 0
    rep = report_of(out)
    assert rep["partials"]["reused"] == [] and len(rep["partials"]["ignored"]) == 2


def test_pyramid_mask_when_a_remote_store_has_none(tmp_path, manifest, standins):
    """An OME-Zarr store without a mask, zero outside its papyrus, with a 4x coarser level: the mask comes from that
    level (said in report.json), covers the papyrus, and no chunk outside it is ever fetched at full resolution."""
    root = tmp_path / "site"
    write_segment(root, "s3", shape=(256, 512), seed=7, layout="zarr")
    truth = cv2.imread(str(root / "s3_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    (root / "s3_mask.png").unlink()
    group = zarr.open_group(str(root / "s3.zarr"), mode="r+")
    level0 = group["0"]
    papyrus = np.zeros(truth.shape, bool)
    papyrus[:, :192] = truth[:, :192]  # columns 192..511: no papyrus at all
    level0[...] = np.asarray(level0[...]) * papyrus
    coarse = group.create_array("1", shape=(65, 64, 128), chunks=(65, 64, 128), dtype="uint16")
    coarse[...] = np.asarray(level0[...]).reshape(65, 64, 4, 128, 4).max(axis=(2, 4))
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}, {"path": "1"}]}]
    out = tmp_path / "out"
    with http_folder(root) as (url, served):
        assert run_cli(f"{url}/s3.zarr", out, manifest) == 0
        gets = served.chunk_gets()
    rep = report_of(out)
    assert any("pyramid level '1'" in w for w in rep["warnings"])
    level0_gets = [p for p in gets if "/s3.zarr/0/" in p]
    columns = {int(p.rsplit("/", 1)[-1]) for p in level0_gets}  # chunks of 128 columns
    assert level0_gets and columns <= {0, 1}  # chunks of columns 256..511, free of papyrus, never fetched
    ink = cv2.imread(str(out / "masks" / "s3.png"), cv2.IMREAD_GRAYSCALE)
    assert ink is not None and not ink[:, 256:].any()
    # the same store on local disk gets the same mask: the same windows, the same map
    local = tmp_path / "local"
    assert run_cli(root / "s3.zarr", local, manifest) == 0
    assert report_of(local)["fragments"]["s3"]["windows"] == rep["fragments"]["s3"]["windows"]
    np.testing.assert_array_equal(probabilities(local, "s3"), probabilities(out, "s3"))


def test_mask_option_and_its_mistakes(segs, manifest, tmp_path, standins, capsys):
    """--mask names one segment's mask; for a folder of several, or a file that is not there: one line, exit 2."""
    other = tmp_path / "m.png"
    cv2.imwrite(str(other), np.full((256, 320), 255, np.uint8))
    out = tmp_path / "out"
    assert run_cli(segs / "s1.zarr", out, manifest, "--mask", str(other)) == 0
    assert report_of(out)["fragments"]["s1"]["windows"] > run_cli_windows(segs, tmp_path, manifest)
    assert run_cli(segs, tmp_path / "o2", manifest, "--mask", str(other)) == 2
    assert "--mask" in one_error_line(capsys)
    assert run_cli(segs / "s1.zarr", tmp_path / "o3", manifest, "--mask", str(tmp_path / "none.png")) == 2
    assert "none.png" in one_error_line(capsys)


def run_cli_windows(segs: Path, tmp_path: Path, manifest: Path) -> int:
    out = tmp_path / "own"
    assert run_cli(segs / "s1.zarr", out, manifest) == 0
    return report_of(out)["fragments"]["s1"]["windows"]


def test_without_the_remote_extra_one_line_names_it(segs, manifest, tmp_path, standins, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)
    assert run_cli("https://example.invalid/seg.zarr", tmp_path / "out", manifest) == 2
    assert "ink_infer[remote]" in one_error_line(capsys)


def test_storage_options_and_what_is_transient():
    assert parse_storage_options(["anon=true", "requester_pays=false", "profile=lab", "n=3"]) == (
        ("anon", True), ("requester_pays", False), ("profile", "lab"), ("n", 3))  # fmt: skip
    with pytest.raises(Exception, match="KEY=VALUE"):
        parse_storage_options(["anon"])

    class Status(Exception):
        def __init__(self, status):
            self.status = status

    assert is_transient(TimeoutError()) and is_transient(ConnectionResetError()) and is_transient(Status(503))
    assert is_transient(Status(429)) and not is_transient(Status(404)) and not is_transient(Status(403))
    assert not is_transient(FileNotFoundError()) and not is_transient(PermissionError("Forbidden"))


def test_the_chunk_cache_is_bounded_least_recently_used_out(tmp_path):
    cache = ChunkCache(tmp_path / "c", "v1", limit=1000)
    for k in range(4):
        cache.write(f"c/0/0/{k}", bytes(300))
    # 1200 > 1000: the oldest went until at most 900 were left
    kept = sorted(p.name for p in (tmp_path / "c" / "v1").rglob("*") if p.is_file())
    assert kept == ["1", "2", "3"]
    assert cache.read("c/0/0/1") == bytes(300)  # read: now the most recent
    cache.write("c/0/0/9", bytes(300))
    kept = sorted(p.name for p in (tmp_path / "c" / "v1").rglob("*") if p.is_file())
    assert kept == ["1", "3", "9"] and cache.read("c/0/0/2") is None
    assert not list((tmp_path / "c").rglob(".part-*"))  # written whole, renamed into place


def test_remote_round_trips_through_a_workers_share():
    """A remote fragment crosses to a device worker as JSON (no pickle) and comes back equal."""
    from ink_infer.run.workers import _remote

    remote = Remote("s3://b/s.zarr", (("anon", True),), "/tmp/c", 5)
    assert _remote(json.loads(json.dumps(__import__("dataclasses").asdict(remote)))) == remote
    assert is_chunk("/s1.zarr/0/c/0/0/1") and not is_chunk("/s1.zarr/zarr.json")


def test_the_free_space_check_counts_the_chunk_cache(segs, manifest, tmp_path, standins, capsys, monkeypatch):
    """Room for the outputs but not for the chunks the cache would keep: one line naming --cache-gb, before any
    fetch of a chunk; ``--cache-gb 0`` needs no room for it and runs."""
    import shutil as sh

    from ink_infer.run import preflight

    free = 16 * 2**20 + 2 * 2**20  # one fragment's outputs, and 2 MiB: s1's papyrus is ~10 MiB of chunks
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: sh._ntuple_diskusage(10**12, 10**12, free))
    with http_folder(segs) as (url, served):
        assert run_cli(f"{url}/s1.zarr", tmp_path / "out", manifest) == 2
        assert "--cache-gb" in one_error_line(capsys) and not served.chunk_gets()
        assert run_cli(f"{url}/s1.zarr", tmp_path / "out", manifest, "--cache-gb", "0") == 0
    assert report_of(tmp_path / "out")["disk"]["cache_bytes"] == 0


def test_both_directions_of_a_remote_store(segs, local_maps, manifest, tmp_path, standins):
    """``--direction both`` over HTTP: the forward map is the local one, the reversed one differs, and the chunks
    are fetched once for the two directions and the two models (the cache)."""
    with http_folder(segs) as (url, served):
        out = tmp_path / "out"
        assert run_cli(f"{url}/s1.zarr", out, manifest, "--direction", "both") == 0
        gets = served.chunk_gets()
    np.testing.assert_array_equal(probabilities(out, "s1.forward"), local_maps["s1"])
    assert not np.array_equal(probabilities(out, "s1.reverse"), local_maps["s1"])
    assert max(gets.values()) == 1


def test_a_sharded_v3_store_over_http(segs, local_maps, manifest, tmp_path, standins):
    """Zarr v3 shards (zarr asks for byte ranges of each shard file): the whole shard is fetched once and cached,
    its ranges served from it; the same bytes as the local copy."""
    site = tmp_path / "site"
    level0 = np.asarray(zarr.open_group(str(segs / "s1.zarr"), mode="r")["0"][...])
    sharded = zarr.create_array(str(site / "s1.zarr"), shape=level0.shape, chunks=(8, 64, 64),
                                shards=(16, 128, 320), dtype="uint16")  # fmt: skip
    sharded[...] = level0
    shutil.copy(segs / "s1_mask.png", site)
    with http_folder(site) as (url, served):
        out = tmp_path / "out"
        assert run_cli(f"{url}/s1.zarr", out, manifest) == 0
        gets = served.chunk_gets()
    np.testing.assert_array_equal(probabilities(out), local_maps["s1"])
    assert gets and max(gets.values()) == 1 and len(gets) <= 5 * 2  # shard files, each once


def test_remote_store_through_the_python_api_and_device_workers(
    segs, local_maps, manifest, tmp_path, standins
):
    """``ink_infer.predict`` takes a URL (and fsspec's options as a dict); ``--devices cpu,cpu`` workers read the
    store through the shared cache: the local bytes both ways, each chunk over the wire once."""
    import ink_infer

    ensemble = ink_infer.load_ensemble(manifest, device="cpu", allow_random_weights=True)
    with http_folder(segs) as (url, served):
        found = ink_infer.predict(ensemble, f"{url}/s1.zarr", stride=64, storage_options={"block_size": 0},
                                  cache=tmp_path / "api_cache")  # fmt: skip
        assert run_cli(f"{url}/s1.zarr", tmp_path / "out", manifest, "--devices", "cpu,cpu") == 0
        gets = served.chunk_gets()
    from ink_infer.outputs.maps import quantised

    np.testing.assert_array_equal(quantised(found.probability), local_maps["s1"])
    np.testing.assert_array_equal(probabilities(tmp_path / "out"), local_maps["s1"])
    assert max(gets.values()) <= 2  # the API's run and the workers' run: once each
