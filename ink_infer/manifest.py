"""weights_manifest.json: schema, validation, file resolution, size + sha256 verification, and the ``hash`` CLI.

Schema (format 1)::

    {"format": 1, "name": str, "threshold": {"percentile": 0.93, "region": "covered"},
     "models": [{"name", "arch": "2.5d" | "csn3d" | "timesformer", "backbone" (2.5d), "depth" (csn3d), "in_chans",
                 "num_3d_layer" (2.5d), "z_range": [start, stop), "tile", "crop" (optional), "file", "sha256",
                 "size" (optional), "stage_blocks" (optional, csn3d), "weight",
                 widths of small models (optional): "dim" (2.5d), "base_channels" and "head_dim" (csn3d),
                 "with_norm" (optional, timesformer), villa's variants (optional, timesformer): "stride",
                 "divisor", "windows": "inside" | "any", "blend": "gp" | "hann" | "gaussian", "sigma",
                 "count": "ones" | "weights"}]}

A timesformer entry (the Grand Prize model) may leave out ``z_range`` ([17, 43)), ``tile`` (64, the only size it
takes) and ``in_chans`` (its frame count: z_range's length); ``with_norm`` defaults to false.

Manifest order is priority order: when the time budget runs short, later models are the ones skipped.

The package ships the 18 reference entries (``PACKAGED_MANIFEST``, hashes unknown: null). A run's manifest is
``--manifest FILE``, else ``weights_manifest.json`` beside the weights (``--weights DIR``) when there is one, else
the packaged one (``default_manifest``). ``python -m ink_infer.manifest hash --weights DIR`` records the size and
sha256 of every weight file present under DIR into DIR/weights_manifest.json, which runs then pick up.
``python -m ink_infer.manifest convert --trust FILE --sha256 HEX`` turns a checkpoint that cannot be read safely
(a Lightning file that pickles its optimizer) into a safetensors file, unpickling it in a child process only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ink_infer.config import ModelSpec, ThresholdSpec
from ink_infer.errors import UserError
from ink_infer.geometry import ARCH_DEFAULTS, GP_VARIANT_KEYS, N_SLICES, WIDTH_ARCH
from ink_infer.outputs.atomic import atomic_write_text
from ink_infer.schema import MODEL_FIELDS, NULLABLE_MODEL_KEYS, THRESHOLD_FIELDS, Invalid, check_field

TOP_KEYS = {"format", "name", "threshold", "models"}
REQUIRED_MODEL_KEYS = {"name", "arch", "in_chans", "z_range", "tile", "file", "sha256"}
OPTIONAL_MODEL_KEYS = {
    "backbone",
    "depth",
    "num_3d_layer",
    "crop",
    "size",
    "stage_blocks",
    "weight",
    "with_norm",
    *WIDTH_ARCH,
    *GP_VARIANT_KEYS,
}
HASH_CHUNK = 1 << 20

PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_MANIFEST = PACKAGE_DIR / "demo" / "demo_manifest.json"
PACKAGED_MANIFEST = PACKAGE_DIR / "weights_manifest.json"  # the 18 reference models, fold0 and fold1
GP_MANIFEST = PACKAGE_DIR / "gp_timesformer.json"  # the 2023 Grand Prize TimeSformer, one entry
# --manifest by name: the packaged manifests
PACKAGED = {"2nd-place": PACKAGED_MANIFEST, "gp": GP_MANIFEST}
MANIFEST_NAME = "weights_manifest.json"


def default_manifest(weights_dir: Path | None) -> Path:
    """The manifest of a run without ``--manifest``: the weights folder's own (written by ``manifest hash``, so
    it holds the files' hashes), else the packaged 18-entry one."""
    if weights_dir is not None and (Path(weights_dir) / MANIFEST_NAME).is_file():
        return Path(weights_dir) / MANIFEST_NAME
    return PACKAGED_MANIFEST


@dataclass(frozen=True)
class Manifest:
    path: Path
    name: str
    threshold: ThresholdSpec
    models: tuple[ModelSpec, ...]


def load_manifest(path: Path) -> Manifest:
    """Read and validate a manifest; any problem is a ``UserError`` naming the file and the entry."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: manifest not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object with keys {sorted(TOP_KEYS)}")
    unknown = set(raw) - TOP_KEYS
    missing = {"format", "models"} - set(raw)
    if unknown or missing:
        raise UserError(f"{path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    if raw["format"] != 1 or isinstance(raw["format"], bool):
        raise UserError(f"{path}: format {raw['format']!r}, expected 1")
    thr = raw.get("threshold", {})
    if not isinstance(thr, dict) or set(thr) - set(THRESHOLD_FIELDS):
        raise UserError(f"{path}: threshold must be {{'percentile': float, 'region': 'covered'|'mask'}}")
    try:
        threshold = ThresholdSpec(
            **{k: check_field(THRESHOLD_FIELDS[k], value, path, f"threshold {k}") for k, value in thr.items()}
        )
    except Invalid as e:
        raise UserError(str(e)) from None
    entries = raw["models"]
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path}: 'models' must be a non-empty list")
    models = tuple(_parse_entry(path, i, e) for i, e in enumerate(entries))
    names = [m.name for m in models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"{path}: duplicate model names {dupes}")
    return Manifest(path=path, name=str(raw.get("name", path.stem)), threshold=threshold, models=models)


def _parse_entry(path: Path, index: int, e: object) -> ModelSpec:
    """One entry checked field by field against ``schema.MODEL_FIELDS``, then across fields."""
    where = f"{path}: models[{index}]"
    if not isinstance(e, dict):
        raise UserError(f"{where}: expected an object")
    if isinstance(e.get("name"), str) and e["name"].strip():
        where = f"{path}: model {e['name']!r}"
    defaults = ARCH_DEFAULTS.get(e["arch"], {}) if isinstance(e.get("arch"), str) else {}
    unknown = set(e) - REQUIRED_MODEL_KEYS - OPTIONAL_MODEL_KEYS
    missing = REQUIRED_MODEL_KEYS - set(e) - set(defaults)
    if unknown or missing:
        raise UserError(f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    v: dict = {}
    for key, value in e.items():
        if value is None and key in NULLABLE_MODEL_KEYS:
            v[key] = None
            continue
        try:
            v[key] = check_field(MODEL_FIELDS[key], value, where, key)
        except Invalid as err:
            raise UserError(str(err)) from None
    if defaults:
        _fill_defaults(where, v, defaults, in_chans_given="in_chans" in e)
    arch, z, tile, crop, in_chans = v["arch"], v["z_range"], v["tile"], v.get("crop"), v["in_chans"]
    if not 0 <= z[0] < z[1] <= N_SLICES:
        raise UserError(f"{where}: z_range {list(z)} outside the volume's {N_SLICES} slices (or empty)")
    if crop is not None and (crop > tile or (tile - crop) % 64):
        raise UserError(
            f"{where}: crop {crop!r}, expected a multiple of 32, at most tile, centred on the 32 grid"
        )
    if (z[1] - z[0]) % in_chans:
        raise UserError(f"{where}: in_chans {in_chans!r} does not divide the {z[1] - z[0]} slices of z_range")
    if arch == "2.5d" and (v.get("backbone") is None or v.get("num_3d_layer") is None):
        raise UserError(f"{where}: a 2.5d model needs 'backbone' (a timm name) and 'num_3d_layer'")
    if arch == "csn3d" and v.get("depth") is None and v.get("stage_blocks") is None:
        raise UserError(f"{where}: a csn3d model needs 'depth' (50 or 152) or 'stage_blocks'")
    for key, key_arch in {**WIDTH_ARCH, "backbone": "2.5d", "num_3d_layer": "2.5d", "depth": "csn3d",
                          "stage_blocks": "csn3d", "with_norm": "timesformer",
                          **dict.fromkeys(GP_VARIANT_KEYS, "timesformer")}.items():  # fmt: skip
        if v.get(key) is not None and key_arch != arch:
            raise UserError(f"{where}: {key!r} applies to {key_arch} models only, this one is {arch}")
    if v.get("sigma") is not None and v.get("blend") != "gaussian":
        raise UserError(
            f"{where}: 'sigma' applies to blend 'gaussian' only, this one is {v.get('blend') or 'gp'}"
        )
    if v["file"] is not None:
        _check_relative(where, v["file"])
    return ModelSpec(
        name=v["name"],
        arch=arch,
        in_chans=in_chans,
        z_range=(z[0], z[1]),
        tile=tile,
        crop=crop,
        backbone=v.get("backbone"),
        num_3d_layer=v.get("num_3d_layer"),
        depth=v.get("depth"),
        stage_blocks=v.get("stage_blocks"),
        **{key: v.get(key) for key in WIDTH_ARCH},
        file=v["file"],
        sha256=v["sha256"],
        size=v.get("size"),
        weight=v.get("weight", 1.0),
        with_norm=v.get("with_norm"),
        **{key: v.get(key) for key in GP_VARIANT_KEYS},
    )


def _fill_defaults(where: str, v: dict, defaults: dict, *, in_chans_given: bool) -> None:
    """A timesformer entry's absent fields from ``ARCH_DEFAULTS``, and what its one configuration allows: 64-px
    windows, no crop, one channel per frame (``in_chans`` = z_range's length), ``with_norm`` false if absent."""
    for key, value in defaults.items():
        if v.get(key) is None:
            v[key] = value
    z = v["z_range"]
    if not in_chans_given:
        v["in_chans"] = z[1] - z[0]
    if v["tile"] != defaults["tile"] or v.get("crop") is not None:
        raise UserError(f"{where}: a {v['arch']} model takes {defaults['tile']}-px windows: tile 64, no crop")
    if v["in_chans"] != z[1] - z[0]:
        raise UserError(
            f"{where}: in_chans {v['in_chans']!r}, a {v['arch']} model takes one frame per slice: "
            f"{z[1] - z[0]} (z_range {list(z)})"
        )
    if v.get("with_norm") is None:
        v["with_norm"] = False


def _check_relative(where: str, file: object) -> None:
    if not isinstance(file, str) or not file:
        raise UserError(f"{where}: file {file!r}, expected a path under --weights or null")
    p = Path(file)
    if p.is_absolute() or ".." in p.parts:
        raise UserError(f"{where}: file {file!r} escapes --weights (absolute or '..')")


def find_weights(spec: ModelSpec, weights_dir: Path | None) -> Path | None:
    """Path of ``spec.file`` under ``weights_dir`` (symlinks resolved), or None when absent.

    A path that resolves outside ``weights_dir`` is a ``UserError`` whether or not it exists."""
    if spec.file is None or weights_dir is None:
        return None
    root = Path(weights_dir).resolve()
    path = (root / spec.file).resolve()
    if root != path and root not in path.parents:
        raise UserError(f"{spec.file}: resolves to {path}, outside --weights {root}")
    return path if path.is_file() else None


def sha256_file(path: Path) -> str:
    """Chunked sha256 of a file, so a multi-GB checkpoint is never held in memory to hash it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# (device, inode, size, mtime_ns, ctime_ns) of a file -> its sha256: the preflight hashes every weight file, and
# loading it (minutes or hours later) checks it again; an unchanged file is not read twice (~1-3 s per GB saved).
_DIGESTS: dict[tuple[int, ...], str] = {}


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def verify_file(spec: ModelSpec, path: Path) -> str:
    """Check size, then sha256, against the manifest before anything is unpickled. Returns the file's sha256.

    The digest is remembered by the file's stat (inode, size, mtime, ctime): a file verified earlier in this
    process and not touched since is not read again; any write or replacement changes the stat and re-hashes."""
    st = path.stat()
    size = st.st_size
    if spec.size is not None and size != spec.size:
        raise UserError(f"{path}: {size} bytes, manifest says {spec.size} (truncated or wrong file?)")
    key = _stat_key(st)
    digest = _DIGESTS.get(key)
    if digest is None:
        digest = sha256_file(path)
        if _stat_key(path.stat()) == key:  # not written while it was read
            _DIGESTS[key] = digest
    if spec.sha256 is not None and digest != spec.sha256.lower():
        raise UserError(
            f"{path}: sha256 {digest[:12]}…, manifest says {spec.sha256[:12]}… (corrupt or wrong file?)"
        )
    return digest


def hash_weights(manifest_path: Path, weights_dir: Path, out: Path) -> tuple[list[str], list[str], list[str]]:
    """Fill in size and sha256 of every present weight file; write the manifest to ``out`` atomically.

    Returns (names hashed, names missing, names refused with why: a file that resolves outside ``weights_dir``,
    a symlink leading out of it, is never read)."""
    manifest_path = Path(manifest_path)
    load_manifest(manifest_path)  # validate first
    raw = json.loads(manifest_path.read_text())
    root = Path(weights_dir).resolve()
    hashed, missing, refused = [], [], []
    for e in raw["models"]:
        path = (root / e["file"]).resolve() if e.get("file") else None
        if path is not None and root not in path.parents:
            refused.append(f"{e['name']} ({e['file']}): resolves to {path}, outside --weights {root}")
            continue
        if path is None or not path.is_file():
            missing.append(f"{e['name']} ({e.get('file')})")
            continue
        e["size"] = path.stat().st_size
        e["sha256"] = sha256_file(path)
        hashed.append(e["name"])
    try:
        atomic_write_text(out, json.dumps(raw, indent=1) + "\n")
    except OSError as err:
        raise UserError(f"{out}: cannot write ({err.strerror or err})") from None
    return hashed, missing, refused


HASH_HELP = """\
Record the size and sha256 of each weight file present under --weights, so that runs verify the files before
anything is unpickled. Reads --manifest (default: the packaged 18-model manifest) and writes --out (default:
DIR/weights_manifest.json, which runs with --weights DIR use without --manifest).

exit status: 0 every file hashed; 1 some files missing (the rest are recorded); 2 bad arguments or files.

example:
  python -m ink_infer.manifest hash --weights ink-infer-weights
"""


CONVERT_HELP = """\
Convert a checkpoint that cannot be read safely (weights_only=True refuses it: the Grand Prize's Lightning file
pickles its optimizer) into a safetensors file that runs read without pickle. The checkpoint IS unpickled, which can
run code: only for a file you trust, named by its sha256 (`sha256sum FILE`), and in a separate process.

exit status: 0 converted; 2 refused (no or wrong --sha256) or failed.

example:
  python -m ink_infer.manifest convert --trust timesformer_weights.ckpt --sha256 <64 hex digits>
"""


def _add_convert(sub) -> None:
    c = sub.add_parser("convert", help="a checkpoint you trust, to safetensors", description=CONVERT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    c.add_argument("--trust", type=Path, required=True, metavar="FILE", help="the checkpoint to convert")
    c.add_argument("--sha256", default=None, metavar="HEX", help="FILE's sha256 (required)")
    c.add_argument("--out", type=Path, default=None, metavar="OUT",
                   help="the safetensors file to write (default: FILE with the suffix .safetensors)")  # fmt: skip


def _run_convert(args: argparse.Namespace) -> int:
    from ink_infer.models.convert import convert  # torch, only for this command

    try:
        out, n, digest = convert(args.trust, args.sha256, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{out}: {n} tensors from {args.trust}; sha256 {digest}, {out.stat().st_size} bytes (for the manifest)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ink_infer.manifest",
        description="weights_manifest.json tools: hash the weight files, convert a trusted checkpoint",
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    h = sub.add_parser(
        "hash", help="record size and sha256 of the weight files present", description=HASH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    h.add_argument(
        "--weights", type=Path, required=True, metavar="DIR", help="the folder holding the weight files"
    )
    h.add_argument("--manifest", type=Path, default=None, metavar="FILE",
                   help="the manifest to fill in (default: DIR/weights_manifest.json if present, else the packaged one)")  # fmt: skip
    h.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="where the filled-in manifest goes (default: --manifest itself when given, else "
                        "DIR/weights_manifest.json)")  # fmt: skip
    _add_convert(sub)
    args = parser.parse_args(argv)
    if args.cmd == "convert":
        return _run_convert(args)
    try:
        if not args.weights.is_dir():
            raise UserError(f"{args.weights}: --weights is not a folder")
        manifest = args.manifest or default_manifest(args.weights)
        out = args.out or (args.manifest if args.manifest else args.weights / MANIFEST_NAME)
        hashed, missing, refused = hash_weights(manifest, args.weights, out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    also = f", {len(refused)} refused" if refused else ""
    print(
        f"{out}: hashed {len(hashed)} file(s) of {manifest}, {len(missing)} missing under {args.weights}{also}"
    )
    for m in missing:
        print(f"  missing: {m}")
    for m in refused:
        print(f"  refused: {m}")
    if missing or refused:
        what = [f"{len(missing)} weight file(s) missing"] if missing else []
        what += [f"{len(refused)} refused (links leading outside the folder)"] if refused else []
        print(f"error: {', '.join(what)}: copy them under {args.weights} and hash again", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
