#!/usr/bin/env bash
# Build the offline bundle for Kaggle: ink_infer's py3-none-any wheel, any extra wheels the Kaggle image lacks
# (none by default: it preinstalls torch, timm, numpy, scipy, opencv, tifffile, tqdm), and dataset-metadata.json,
# all in one flat folder ready for `kaggle datasets create -p DIR`. Run it where PyPI is reachable.
#
#   ./build_wheels.sh                                   # ./bundle, target Python 3.12, owner YOUR_KAGGLE_USERNAME
#   ./build_wheels.sh --owner alice --out /tmp/bundle --extra 'somepkg==1.2' --python-version 3.10
#
# See kaggle/README.md for the upload and submit steps.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: build_wheels.sh [options]
  --out DIR               bundle folder (default: ./bundle); an old bundle there is replaced
  --python-version X.Y    Python of the Kaggle image the extra wheels must fit (default: 3.12)
  --platform TAG          a platform tag for the extra wheels; repeat for several
                          (default: manylinux_2_35_x86_64 .. manylinux_2_17_x86_64, manylinux2014/2010/1_x86_64)
  --extra SPEC            a wheel the Kaggle image lacks, e.g. 'somepkg==1.2' (binary only, no dependencies:
                          name each one needed); repeat for several
  --owner NAME            Kaggle user owning the dataset (default: YOUR_KAGGLE_USERNAME, edit before upload)
  --slug SLUG             dataset slug, 6-50 of a-z 0-9 - (default: ink-infer-wheels)
  --title TEXT            dataset title, 6-50 characters (default: "ink_infer wheels")
  --python PY             interpreter that builds the wheel (default: python3)
  --no-build-isolation    build with PY's own setuptools instead of a fresh isolated build environment
EOF
}

die() {
  echo "build_wheels.sh: error: $*" >&2
  exit 2
}

need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="./bundle"
PYVER="3.12"
PLATFORMS=()
EXTRAS=()
# the owner kaggle/set_owner.sh wrote into the notebook's metadata, until --owner says otherwise
OWNER="$(sed -n 's|^ *"id": "\([A-Za-z0-9_-]*\)/.*|\1|p' "$REPO/kaggle/kernel-metadata.json" 2>/dev/null | head -1)"
OWNER="${OWNER:-YOUR_KAGGLE_USERNAME}"
SLUG="ink-infer-wheels"
TITLE="ink_infer wheels"
PY="python3"
ISOLATION=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) need_value "$@"; OUT="$2"; shift 2 ;;
    --python-version) need_value "$@"; PYVER="$2"; shift 2 ;;
    --platform) need_value "$@"; PLATFORMS+=("$2"); shift 2 ;;
    --extra) need_value "$@"; EXTRAS+=("$2"); shift 2 ;;
    --owner) need_value "$@"; OWNER="$2"; shift 2 ;;
    --slug) need_value "$@"; SLUG="$2"; shift 2 ;;
    --title) need_value "$@"; TITLE="$2"; shift 2 ;;
    --python) need_value "$@"; PY="$2"; shift 2 ;;
    --no-build-isolation) ISOLATION=(--no-build-isolation); shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

# Everything that can be checked without building is checked first, so a typo fails in a second, not after a build.
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || die "--python-version $PYVER: expected 3.X, e.g. 3.12"
[[ ${#TITLE} -ge 6 && ${#TITLE} -le 50 ]] || die "--title '$TITLE': Kaggle wants 6-50 characters"
[[ "$SLUG" =~ ^[a-z0-9][a-z0-9-]{4,48}[a-z0-9]$ ]] || die "--slug '$SLUG': Kaggle wants 6-50 of a-z 0-9 -"
[[ "$OWNER" =~ ^[A-Za-z0-9_-]+$ ]] || die "--owner '$OWNER': expected a Kaggle user name"
command -v "$PY" >/dev/null || die "--python $PY: not found"
"$PY" -m pip --version >/dev/null || die "$PY has no pip"
if [[ ${#PLATFORMS[@]} -eq 0 ]]; then
  # Kaggle's image is Ubuntu 22.04 (glibc 2.35) on x86_64. pip does not widen a manylinux_2_Y tag to older
  # glibc versions by itself, so every version a wheel may be tagged with is listed.
  for minor in $(seq 35 -1 17); do PLATFORMS+=("manylinux_2_${minor}_x86_64"); done
  PLATFORMS+=(manylinux2014_x86_64 manylinux2010_x86_64 manylinux1_x86_64)
fi
if [[ -e "$OUT" ]]; then
  [[ -d "$OUT" ]] || die "--out $OUT: exists and is not a folder"
  if [[ -n "$(ls -A "$OUT")" && ! -f "$OUT/dataset-metadata.json" ]]; then
    die "--out $OUT: not empty and not an earlier bundle (no dataset-metadata.json); refusing to replace it"
  fi
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
STAGE="$WORK/src"
WHEELS="$WORK/bundle"
mkdir -p "$STAGE" "$WHEELS"

# The extra wheels first: a download that cannot work fails before anything is built.
if [[ ${#EXTRAS[@]} -gt 0 ]]; then
  echo "== downloading extra wheels for CPython $PYVER (${#PLATFORMS[@]} platform tags): ${EXTRAS[*]}"
  platform_args=()
  for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
  "$PY" -m pip download --only-binary=:all: --implementation cp --python-version "$PYVER" \
    "${platform_args[@]}" --no-deps -d "$WHEELS" "${EXTRAS[@]}" ||
    die "could not download a binary wheel for ${EXTRAS[*]} (CPython $PYVER, ${PLATFORMS[0]}..)"
fi

# Build from a clean copy of the source: a stale build/lib or *.egg-info in the checkout would otherwise leak
# deleted modules into the wheel. In a git checkout the copy holds the tracked and the untracked-but-not-ignored
# files, exactly what a fresh clone plus today's edits would hold.
echo "== staging the source of $REPO"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do if [[ -f "$f" ]]; then printf '%s\0' "$f"; fi; done |
    tar --null -T - -cf -) | tar -xf - -C "$STAGE"
else
  tar -C "$REPO" --exclude=./build --exclude=./dist --exclude='*.egg-info' --exclude=./bundle \
    --exclude=./kaggle_sim --exclude=.git -cf - . | tar -xf - -C "$STAGE"
fi
[[ -f "$STAGE/setup.cfg" && -f "$STAGE/ink_infer/__init__.py" ]] || die "$REPO: no setup.cfg / ink_infer/ to build"

echo "== building the ink_infer wheel with $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
"$PY" -m pip wheel -q --no-deps ${ISOLATION[@]+"${ISOLATION[@]}"} -w "$WHEELS" "$STAGE" ||
  die "building the ink_infer wheel failed (see above)"
shopt -s nullglob
built=("$WHEELS"/ink_infer-*.whl)
shopt -u nullglob
[[ ${#built[@]} -eq 1 ]] || die "expected one ink_infer-*.whl from the build, got ${#built[@]}"
WHEEL="${built[0]}"
[[ "$(basename "$WHEEL")" == ink_infer-*-py3-none-any.whl ]] ||
  die "$(basename "$WHEEL"): expected a pure-Python py3-none-any wheel"

echo "== checking what $(basename "$WHEEL") holds"
"$PY" - "$WHEEL" "$STAGE" <<'EOF' || die "the wheel's contents are wrong (see above)"
import sys
import zipfile
from pathlib import Path, PurePosixPath

wheel, src = Path(sys.argv[1]), Path(sys.argv[2])
names = zipfile.ZipFile(wheel).namelist()
problems = []
required = ["ink_infer/__init__.py", "ink_infer/submit.py", "ink_infer/manifest.py", "ink_infer/weights_manifest.json",
            "ink_infer/demo/demo_manifest.json"]
demo = sorted(p.relative_to(src).as_posix() for pat in ("*.json", "*.pt") for p in (src / "ink_infer/demo").glob(pat))
modules = sorted(p.relative_to(src).as_posix() for p in (src / "ink_infer").rglob("*.py"))
for name in dict.fromkeys(required + demo + modules):
    if name not in names:
        problems.append(f"missing {name}")
for name in names:
    parts = PurePosixPath(name).parts
    top = parts[0]
    if top in ("tests", "benchmarks", "training") or "tests" in parts or parts[-1] == "train.py":
        problems.append(f"must not ship {name}")
    elif top != "ink_infer" and not top.endswith(".dist-info"):
        problems.append(f"unexpected top-level entry {name}")
for p in problems:
    print(f"  {wheel.name}: {p}", file=sys.stderr)
print(f"  {len(names)} entries: the package and its 18-model manifest, {len(demo)} demo file(s) ({', '.join(demo)}); "
      "no tests/, benchmarks/, training/, train.py")
sys.exit(1 if problems else 0)
EOF

"$PY" - "$WHEELS/dataset-metadata.json" "$TITLE" "$OWNER/$SLUG" <<'EOF'
import json
import sys

path, title, ref = sys.argv[1:]
meta = {"title": title, "id": ref, "licenses": [{"name": "CC0-1.0"}]}
with open(path, "w") as fh:
    fh.write(json.dumps(meta, indent=2) + "\n")
EOF

# Replace the old bundle only now that the new one is complete.
mkdir -p "$OUT"
find "$OUT" -mindepth 1 -delete
cp -p "$WHEELS"/* "$OUT"/
OUT="$(cd "$OUT" && pwd)"

echo "== bundle ready: $OUT"
(cd "$OUT" && for f in *; do printf '  %-60s %10s bytes  sha256 %s\n' "$f" "$(stat -c %s "$f")" \
  "$(sha256sum "$f" | cut -c1-16)"; done)
if [[ "$OWNER" == YOUR_KAGGLE_USERNAME ]]; then
  echo "  note: dataset id is $OWNER/$SLUG: run kaggle/set_owner.sh <your Kaggle user name> (or pass --owner) before uploading"
fi
echo "  upload:  kaggle datasets create -p $OUT     (a new version later: kaggle datasets version -p $OUT -m '...')"
