"""The Kaggle bundle: build_wheels.sh's wheel installed offline into a fresh venv and run from there, and the
notebook / metadata that ship it. Nothing here imports the checkout's ink_infer into the venv: the venv run
happens from a cwd outside the repo, with PYTHONPATH and pip's machine settings removed."""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import pytest

from ink_infer.outputs.rle import read_submission, rle_decode, rle_encode

REPO = Path(__file__).resolve().parents[1]
KAGGLE = REPO / "kaggle"
TEST_FRAGMENTS = {"a": (160, 200), "b": (192, 224)}


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that could leak the checkout or this machine's pip settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env["PIP_CONFIG_FILE"] = os.devnull
    env.update(extra)
    return env


def run(cmd: list, *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    cmd = ["bash", REPO / "build_wheels.sh", "--no-build-isolation", "--python", sys.executable]
    run([*cmd, "--out", out, "--owner", "tester"], cwd=out, env=dict(os.environ))
    return out


@pytest.fixture(scope="module")
def wheel(bundle: Path) -> Path:
    wheels = sorted(bundle.glob("*.whl"))
    assert [w.name for w in wheels] == [f"ink_infer-{_version()}-py3-none-any.whl"]
    return wheels[0]


@pytest.fixture(scope="module")
def venv_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv over this python's packages (as Kaggle's preinstalled image) with only the wheel installed."""
    root = tmp_path_factory.mktemp("kaggle")
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", root / "venv"], cwd=root)
    py = root / "venv" / "bin" / "python"
    # A venv made from a venv sits on the base python: hand it this python's packages too.
    if sys.prefix != sys.base_prefix:
        purelib = run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=root).strip()
        Path(purelib, "_preinstalled.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # --ignore-installed: CI has `pip install -e .` in the base python, which pip would call already satisfied.
    run([py, "-m", "pip", "install", "--no-index", "--no-deps", "--ignore-installed", wheel], cwd=root)
    return py


def _version() -> str:
    return re.search(r'__version__ = "([^"]+)"', (REPO / "ink_infer" / "__init__.py").read_text()).group(1)


def test_bundle_is_flat_with_dataset_metadata(bundle: Path, wheel: Path) -> None:
    assert sorted(p.name for p in bundle.iterdir()) == sorted(["dataset-metadata.json", wheel.name])
    meta = json.loads((bundle / "dataset-metadata.json").read_text())
    assert meta["id"] == "tester/ink-infer-wheels"
    assert 6 <= len(meta["title"]) <= 50
    assert meta["licenses"] == [{"name": "CC0-1.0"}]


def test_wheel_holds_the_package_and_demo_only(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "ink_infer").rglob("*.py")}
    demo = {
        p.relative_to(REPO).as_posix()
        for pat in ("*.json", "*.pt")
        for p in (REPO / "ink_infer/demo").glob(pat)
    }
    assert "ink_infer/demo/demo_manifest.json" in demo
    demo.add("ink_infer/weights_manifest.json")  # the default manifest: the 18 reference models
    assert modules | demo <= names, sorted((modules | demo) - names)
    tops = {n.split("/")[0] for n in names}
    assert tops == {"ink_infer", f"ink_infer-{_version()}.dist-info"}
    assert not [
        n for n in names if "tests" in n.split("/") or "benchmarks" in n.split("/") or n.endswith("train.py")
    ]


# distribution name -> import name, where they differ; any opencv build (full, headless, contrib) provides cv2
IMPORT_NAMES = {"opencv-python": "cv2", "pytest": "pytest"}


def test_wheel_requirements_are_importable_from_the_preinstalled_packages(wheel: Path) -> None:
    """The notebook installs with --no-deps (pip never touches Kaggle's stack), so each requirement must be
    importable as preinstalled, whatever distribution provides it (cv2 from opencv-python-headless counts)."""
    requirements = pytest.importorskip("packaging.requirements")
    meta = zipfile.ZipFile(wheel).read(f"ink_infer-{_version()}.dist-info/METADATA").decode()
    missing = []
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = requirements.Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra, e.g. [test]
        name = IMPORT_NAMES.get(req.name, req.name.replace("-", "_"))
        if importlib.util.find_spec(name) is None:
            missing.append(f"{req} (import {name})")
    assert not missing, f"the notebook's import check would fail: {missing}"


def test_build_fails_before_building_on_a_bad_extra(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    # An invalid requirement fails in pip itself, before any network access, and before the build starts.
    cmd = [
        "bash",
        REPO / "build_wheels.sh",
        "--no-build-isolation",
        "--out",
        out,
        "--extra",
        "not a requirement!",
    ]
    proc = subprocess.run([str(c) for c in cmd], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "could not download" in proc.stderr
    assert not out.exists() or not list(out.iterdir())


def test_installed_package_comes_from_the_wheel(venv_python: Path, tmp_path: Path) -> None:
    code = "import ink_infer, ink_infer.manifest as m; print(ink_infer.__file__); print(m.DEMO_MANIFEST.is_file())"
    path, demo_ok = run([venv_python, "-c", code], cwd=tmp_path).split()
    assert Path(venv_python).parents[1] in Path(path).parents, path
    assert demo_ok == "True"


def test_submit_runs_from_the_installed_wheel(venv_python: Path, tmp_path: Path) -> None:
    test = ",".join(f"{k}:{h}x{w}" for k, (h, w) in TEST_FRAGMENTS.items())
    run(
        [
            venv_python,
            "-m",
            "ink_infer.synthetic.fragments",
            tmp_path / "data",
            "--train",
            "0",
            "--test",
            test,
        ],
        cwd=tmp_path,
    )
    demo = run(
        [venv_python, "-c", "from ink_infer.manifest import DEMO_MANIFEST; print(DEMO_MANIFEST)"],
        cwd=tmp_path,
    )
    demo = Path(demo.strip())
    assert Path(venv_python).parents[1] in demo.parents
    out = tmp_path / "out"
    run(
        [venv_python, "-m", "ink_infer.submit", "--data", tmp_path / "data", "--manifest", demo,
         "--weights", demo.parent, "--out", out, "--allow-random-weights", "--stride", "64", "--tta", "none",
         "--no-previews", "--quiet"],
        cwd=tmp_path,
    )  # fmt: skip
    comp = tmp_path / "data" / "vesuvius-challenge-ink-detection"
    with open(comp / "sample_submission.csv", newline="") as fh:
        order = [row["Id"] for row in csv.DictReader(fh)]
    rows = read_submission(out / "submission.csv")
    assert [frag_id for frag_id, _ in rows] == order == list(TEST_FRAGMENTS)
    for frag_id, rle in rows:
        shape = cv2.imread(str(comp / "test" / frag_id / "mask.png"), cv2.IMREAD_GRAYSCALE).shape
        assert shape == TEST_FRAGMENTS[frag_id]
        pred = rle_decode(rle, shape)
        assert 0 < pred.sum() < pred.size  # the percentile threshold marks some, not all, pixels
        assert rle_encode(pred) == rle


# --- the notebook and its metadata -------------------------------------------------------------------------


def load_notebook() -> dict:
    return json.loads((KAGGLE / "submission.ipynb").read_text())


def bash_cell_text(nb: dict) -> str:
    cells = [
        c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).startswith("%%bash\n")
    ]
    assert len(cells) == 1
    return "".join(cells[0]["source"]).removeprefix("%%bash\n")


def test_notebook_is_nbformat4_with_a_python3_kernel() -> None:
    nb = load_notebook()
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    assert nb["cells"]
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("code", "markdown", "raw")
        assert isinstance(cell["source"], (str, list))
        assert all(isinstance(line, str) for line in cell["source"])
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
    if nb["nbformat_minor"] >= 5:
        ids = [c["id"] for c in nb["cells"]]
        assert len(set(ids)) == len(ids)


def test_notebook_runs_the_shared_commands_verbatim() -> None:
    commands = (KAGGLE / "notebook_commands.sh").read_text()
    assert bash_cell_text(load_notebook()) == commands.rstrip("\n")
    # the notebook is exactly what make_notebook.py writes, and rehearse.sh runs that same cell
    run([sys.executable, KAGGLE / "make_notebook.py", "--check"], cwd=REPO)
    assert run([sys.executable, KAGGLE / "make_notebook.py", "--cell"], cwd=REPO) == commands
    assert 'make_notebook.py" --cell' in (KAGGLE / "rehearse.sh").read_text()
    for needle in (
        '"$INPUT"/*/ink_infer-*.whl',
        '"$INPUT"/datasets/*/*/ink_infer-*.whl',
        '-m pip install -q --no-index --no-deps --force-reinstall --find-links "$bundle" ink_infer',
        '-m ink_infer.submit --data "$INPUT" --weights "$weights" --out "$WORKING"',
    ):
        assert needle in commands


def _fake_python(tmp_path: Path) -> Path:
    """A PYTHON for the notebook's commands that logs pip and submit calls instead of running them, and answers
    the dependency check with ``$GPUS`` GPUs (0 unless set) instead of importing torch (whose imports are tested
    with the wheel's requirements)."""
    fake = tmp_path / "fake_python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'echo "$*" >>"$LOG"\n'
        'if [[ "$1" == -c && "$2" == *device_count* ]]; then echo "${GPUS:-0}"; exit 0; fi\n'
        'if [[ "$1" == -c ]]; then PYTHONPATH="$REPO" exec "$REAL" "$@"; fi\n'
        'if [[ "$2" == ink_infer.submit ]]; then printf "Id,Predicted\\na,1 2\\n" >"$WORKING/submission.csv"; fi\n'
    )
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("mount", ["<slug>", "datasets/<owner>/<slug>"])
@pytest.mark.parametrize("nested", [False, True])
def test_notebook_commands_find_bundle_and_weights(tmp_path: Path, mount: str, nested: bool) -> None:
    inp, work = tmp_path / "input", tmp_path / "working"
    bundle = inp / mount.replace("<owner>", "me").replace("<slug>", "wheels")
    weights = inp / mount.replace("<owner>", "me").replace("<slug>", "weights")
    for d in (bundle, weights, work, inp / "vesuvius-challenge-ink-detection"):
        d.mkdir(parents=True)
    (bundle / "ink_infer-0.1.0-py3-none-any.whl").write_bytes(b"")
    manifest = json.loads((REPO / "ink_infer/demo/demo_manifest.json").read_text())
    manifest["models"][0]["file"] = "logdir/fold0/best_fbeta.ckpt"
    (weights / "weights_manifest.json").write_text(json.dumps(manifest))
    root = weights / "unpacked" if nested else weights  # an archive upload may land a level deeper
    (root / "logdir/fold0").mkdir(parents=True)
    (root / "logdir/fold0/best_fbeta.ckpt").write_bytes(b"")
    log = tmp_path / "log"
    gpus = 2 if nested else 1  # "GPU T4 x2" in half the cases, "GPU T4" in the others
    env = clean_env(
        INPUT=str(inp), WORKING=str(work), PYTHON=str(_fake_python(tmp_path)), LOG=str(log),
        REAL=sys.executable, REPO=str(REPO), GPUS=str(gpus),
    )  # fmt: skip
    with open(KAGGLE / "notebook_commands.sh") as script:
        proc = subprocess.run(
            ["bash"], stdin=script, cwd=work, env=env, capture_output=True, text=True, timeout=60
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = log.read_text().splitlines()
    assert (
        f"-m pip install -q --no-index --no-deps --force-reinstall --find-links {bundle} ink_infer" in calls
    )
    # the README's command; the manifest is named only when the run would not find it beside the weights
    submit = f"-m ink_infer.submit --data {inp} --weights {root} --out {work}"
    submit += f" --manifest {weights}/weights_manifest.json" if nested else ""
    assert submit + (" --devices all" if gpus == 2 else "") in calls  # one worker per GPU on a T4 x2


def test_notebook_commands_find_weights_without_a_manifest_by_the_packaged_one(tmp_path: Path) -> None:
    """A weights dataset of checkpoints alone: found by the packaged manifest's first file, and the README's
    real-submission command run as printed there (with /kaggle mapped to this folder)."""
    inp, work = tmp_path / "input", tmp_path / "working"
    bundle, weights = inp / "wheels", inp / "ink-infer-weights"
    for d in (bundle, work, inp / "vesuvius-challenge-ink-detection"):
        d.mkdir(parents=True)
    (bundle / "ink_infer-0.1.0-py3-none-any.whl").write_bytes(b"")
    first = json.loads((REPO / "ink_infer/weights_manifest.json").read_text())["models"][0]["file"]
    (weights / first).parent.mkdir(parents=True)
    (weights / first).write_bytes(b"")
    log = tmp_path / "log"
    env = clean_env(INPUT=str(inp), WORKING=str(work), PYTHON=str(_fake_python(tmp_path)), LOG=str(log),
                    REAL=sys.executable, REPO=str(REPO))  # fmt: skip
    with open(KAGGLE / "notebook_commands.sh") as script:
        proc = subprocess.run(
            ["bash"], stdin=script, cwd=work, env=env, capture_output=True, text=True, timeout=60
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    readme = (REPO / "README.md").read_text().split("rehearse.sh runs this line", 1)[1]
    command = next(ln for ln in readme.splitlines() if ln.startswith("python -m ink_infer.submit"))
    command = command.replace("/kaggle/input", str(inp)).replace("/kaggle/working", str(work))
    assert command.removeprefix("python ") in log.read_text().splitlines()


def test_notebook_commands_fail_without_a_bundle(tmp_path: Path) -> None:
    (tmp_path / "input" / "weights").mkdir(parents=True)
    env = clean_env(INPUT=str(tmp_path / "input"), WORKING=str(tmp_path), PYTHON="false")
    with open(KAGGLE / "notebook_commands.sh") as script:
        proc = subprocess.run(["bash"], stdin=script, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no ink_infer-*.whl" in proc.stderr


def test_kernel_metadata_runs_offline_on_a_t4() -> None:
    text = (KAGGLE / "kernel-metadata.json").read_text()
    meta = json.loads(text)
    assert '"enable_internet": false' in text  # written explicitly: the CLI's default is true
    assert meta["enable_internet"] is False and meta["enable_gpu"] is True
    assert meta["machine_shape"] == "NvidiaTeslaT4"
    assert meta["code_file"] == "submission.ipynb" and (KAGGLE / meta["code_file"]).is_file()
    assert meta["language"] == "python" and meta["kernel_type"] == "notebook" and meta["is_private"] is True
    assert meta["competition_sources"] == ["vesuvius-challenge-ink-detection"]
    weights = json.loads((KAGGLE / "weights-dataset-metadata.json").read_text())
    assert sorted(meta["dataset_sources"]) == sorted(["YOUR_KAGGLE_USERNAME/ink-infer-wheels", weights["id"]])
    # the CLI warns when the title does not slugify to the id
    assert meta["id"].split("/")[1] == re.sub(r"[^a-z0-9]+", "-", meta["title"].lower()).strip("-")


def test_weights_dataset_template() -> None:
    meta = json.loads((KAGGLE / "weights-dataset-metadata.json").read_text())
    owner, slug = meta["id"].split("/")
    assert owner == "YOUR_KAGGLE_USERNAME" and 6 <= len(slug) <= 50
    assert 6 <= len(meta["title"]) <= 50 and meta["licenses"] == [{"name": "CC0-1.0"}]


@pytest.mark.parametrize(
    "script", ["build_wheels.sh", "kaggle/rehearse.sh", "kaggle/notebook_commands.sh", "kaggle/set_owner.sh"]
)
def test_scripts_parse(script: str) -> None:
    run(["bash", "-n", REPO / script], cwd=REPO)


def test_set_owner_writes_the_user_name_into_every_metadata_file(tmp_path: Path) -> None:
    kaggle = tmp_path / "kaggle"
    shutil.copytree(KAGGLE, kaggle)
    assert subprocess.run(["bash", kaggle / "set_owner.sh", "bad name!"], capture_output=True).returncode == 2
    proc = subprocess.run(["bash", kaggle / "set_owner.sh", "scroll-reader"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    kernel = json.loads((kaggle / "kernel-metadata.json").read_text())
    weights = json.loads((kaggle / "weights-dataset-metadata.json").read_text())
    assert (
        kernel["id"] == "scroll-reader/ink-infer-submission"
        and weights["id"] == "scroll-reader/ink-infer-weights"
    )
    assert kernel["dataset_sources"] == ["scroll-reader/ink-infer-wheels", "scroll-reader/ink-infer-weights"]
    assert "YOUR_KAGGLE_USERNAME" not in (kaggle / "kernel-metadata.json").read_text()
    assert (
        kernel["enable_internet"] is False
        and '"enable_internet": false' in (kaggle / "kernel-metadata.json").read_text()
    )
