#!/usr/bin/env bash
# Local rehearsal of the Kaggle submission, run as a new user would:
#   1. build the bundle with build_wheels.sh;
#   2. make a fresh venv that sees only the preinstalled packages, as Kaggle's image does
#      (--system-site-packages: torch, timm, numpy, ... come from this machine's python; ink_infer must not);
#   3. lay out kaggle_sim/input/{vesuvius-challenge-ink-detection (synthetic), ink-infer-wheels, ink-infer-weights}
#      read-only, and kaggle_sim/working;
#   4. run the notebook's own %%bash cell (kaggle/submission.ipynb) with the network cut where the machine allows,
#      as a Kaggle run (KAGGLE_KERNEL_RUN_TYPE set), and check that it ran the README's real-submission command as
#      printed and left no partials in kaggle_sim/working;
#   5. decode kaggle_sim/working/submission.csv against the fragment shapes and say where every piece came from.
#
#   kaggle/rehearse.sh                  # the packaged 18-model manifest, with random-init checkpoints of the 18
#                                       # reference models (no trained ones here): the real path, 5 min on 2 CPU cores
#   kaggle/rehearse.sh --demo           # the demo manifest and its trained weights, from the wheel: about a minute
#   kaggle/rehearse.sh --weights DIR    # DIR laid out as the weights dataset (see kaggle/README.md)
set -euo pipefail

usage() {
  cat <<'EOF'
usage: kaggle/rehearse.sh [options]
  --weights DIR          a weights dataset folder (<logdir>/fold{i}/best_fbeta.ckpt, and weights_manifest.json
                         from `manifest hash`); without it, random-init checkpoints of the 18 reference models
  --demo                 the demo manifest and its trained weights from the wheel instead (quick)
  --sim DIR              where the simulated /kaggle goes (default: ./kaggle_sim; replaced on each run)
  --test ID:HxW,...      synthetic test fragments (default: a:64x96,b:96x64; with --demo a:160x200,b:192x224)
  --python PY            the "preinstalled" interpreter the venv is made from (default: python3)
  --submit-args ARGS     more arguments for ink_infer.submit, e.g. '--stride 64 --tta none'
  --no-build-isolation   passed to build_wheels.sh (build with PY's own setuptools)
EOF
}

die() {
  echo "rehearse.sh: error: $*" >&2
  exit 2
}

need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SIM="./kaggle_sim"
WEIGHTS_SRC=""
DEMO=0
TEST=""
PY="python3"
MORE_ARGS=""
BUILD_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --weights) need_value "$@"; WEIGHTS_SRC="$2"; shift 2 ;;
    --demo) DEMO=1; shift ;;
    --sim) need_value "$@"; SIM="$2"; shift 2 ;;
    --test) need_value "$@"; TEST="$2"; shift 2 ;;
    --python) need_value "$@"; PY="$2"; shift 2 ;;
    --submit-args) need_value "$@"; MORE_ARGS="$2"; shift 2 ;;
    --no-build-isolation) BUILD_ARGS+=(--no-build-isolation); shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
if [[ -n "$WEIGHTS_SRC" ]]; then
  [[ $DEMO -eq 0 ]] || die "--demo and --weights: choose one"
  [[ -d "$WEIGHTS_SRC" ]] || die "--weights $WEIGHTS_SRC: not a folder (lay it out as kaggle/README.md says)"
  WEIGHTS_SRC="$(cd "$WEIGHTS_SRC" && pwd)"
fi
# the reference models cost ~1 s per window on a CPU: small fragments keep the 18-model run to minutes
if [[ -z "$TEST" ]]; then TEST="$([[ $DEMO -eq 1 ]] && echo a:160x200,b:192x224 || echo a:64x96,b:96x64)"; fi
PY="$("$PY" -c 'import sys; print(sys.executable)')" || die "--python $PY: not a working python"
# Nothing from this shell may leak the checkout into the simulated Kaggle python.
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP PYTHONUSERBASE

# A fresh simulation each run; the old input is read-only, so give write access back before removing it.
if [[ -e "$SIM" ]]; then
  [[ -d "$SIM/input" || -d "$SIM/working" ]] || die "--sim $SIM: exists and is not an earlier rehearsal"
  chmod -R u+w "$SIM"
  rm -rf "$SIM"
fi
mkdir -p "$SIM/input" "$SIM/working" "$SIM/generated" "$SIM/tmp"
SIM="$(cd "$SIM" && pwd)"
INPUT="$SIM/input"
WORKING="$SIM/working"
BUNDLE="$INPUT/ink-infer-wheels"
WEIGHTS="$INPUT/ink-infer-weights"
VENV="$SIM/venv"
VPY="$VENV/bin/python"

echo "==== 1/5 bundle: $REPO/build_wheels.sh -> $BUNDLE"
"$REPO/build_wheels.sh" --python "$PY" --out "$BUNDLE" ${BUILD_ARGS[@]+"${BUILD_ARGS[@]}"}
WHEEL="$(cd "$BUNDLE" && echo ink_infer-*.whl)"

echo "==== 2/5 venv: $VENV from $PY (--system-site-packages, as Kaggle's preinstalled image)"
importable() { (cd "$WORKING" && "$VPY" -c 'import ink_infer; print(ink_infer.__file__)' 2>/dev/null); }
purelib() { "$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))'; }
# --without-pip: ensurepip would put its own (older) setuptools and pip in front of the preinstalled ones and
# break torch's requirements; the preinstalled pip, run by the venv's python, installs into the venv.
"$PY" -m venv --system-site-packages --without-pip "$VENV"
# A venv made from a venv sits on the base interpreter: hand it PY's own site-packages too, so the packages PY
# sees (torch in a venv, say) are the "preinstalled" ones, in the same order.
"$PY" -c 'import site, sys; print("\n".join(site.getsitepackages() if sys.prefix != sys.base_prefix else []))' \
  >"$(purelib)/_preinstalled.pth"
if where="$(importable)"; then
  # PY has ink_infer (e.g. `pip install -e .`): pip would call the bundle's already satisfied and the run would
  # use the checkout. Kaggle has no ink_infer, so rebuild the venv over a view of PY's site-packages without it:
  # a folder of links to every entry but ink_infer's (and .pth lines pointing at its source).
  echo "  note: $PY has ink_infer installed ($where); the venv gets PY's site-packages without it"
  rm -rf "$VENV"
  "$PY" -m venv --without-pip "$VENV"
  "$PY" - "$SIM/preinstalled" "$(dirname "$(dirname "$where")")" >"$(purelib)/_preinstalled.pth" <<'EOF'
import os
import re
import sys
from pathlib import Path

view, source_root = Path(sys.argv[1]), os.path.realpath(sys.argv[2])
ours = re.compile(r"(__editable__[._]+)?ink[_-]infer([^a-z0-9]|$)", re.IGNORECASE)
site_dirs = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)]
for i, site_dir in enumerate(site_dirs):
    dest = view / str(i)
    dest.mkdir(parents=True)
    for entry in sorted(os.listdir(site_dir)):
        src = Path(site_dir, entry)
        if ours.match(entry):
            continue
        if entry.endswith(".pth"):
            lines = src.read_text().splitlines(keepends=True)
            keep = [ln for ln in lines if os.path.realpath(ln.strip() or "/") != source_root]
            (dest / entry).write_text("".join(keep))
        else:
            (dest / entry).symlink_to(src)
    print(f"import site; site.addsitedir({str(dest)!r})")
EOF
  if where="$(importable)"; then die "ink_infer is still importable ($where) in the venv; cannot rehearse a clean install"; fi
fi
echo "  ink_infer is not importable before the install: good"

echo "==== 3/5 input: synthetic test fragments $TEST, the bundle, the weights; read-only"
(cd "$REPO" && "$PY" -m ink_infer.synthetic "$SIM/generated" --train 0 --test "$TEST" --seed 7) | sed "s/^/  data: /"
mv "$SIM/generated/vesuvius-challenge-ink-detection" "$INPUT/"
SUBMIT_ARGS="$MORE_ARGS"
if [[ -n "$WEIGHTS_SRC" ]]; then
  # A link, so a multi-GB weights folder is not copied; chmod -R does not follow it, so the original keeps its modes.
  ln -s "$WEIGHTS_SRC" "$WEIGHTS"
  echo "  weights: $WEIGHTS -> $WEIGHTS_SRC"
elif [[ $DEMO -eq 1 ]]; then
  # The demo manifest (and any demo weights) from the wheel itself: what the bundle ships is what runs.
  "$PY" - "$BUNDLE/$WHEEL" "$WEIGHTS" <<'EOF'
import sys
import zipfile
from pathlib import Path

wheel, out = sys.argv[1], Path(sys.argv[2])
out.mkdir(parents=True)
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith("ink_infer/demo/") and not name.endswith("/"):
            (out / name.removeprefix("ink_infer/demo/")).write_bytes(zf.read(name))
(out / "demo_manifest.json").rename(out / "weights_manifest.json")
EOF
  echo "  weights: the demo manifest and checkpoints from $WHEEL, as $WEIGHTS/weights_manifest.json"
else
  # Checkpoints of the packaged manifest's 18 entries in the team's layout (the EMA copy in float16, 1.1 GB), from
  # seeded random init: the real loading, verification and model code run; the masks mean nothing.
  (cd "$REPO" && "$PY" - "$WEIGHTS" <<'EOF')
import sys
from pathlib import Path

import torch

from ink_infer.manifest import PACKAGED_MANIFEST, load_manifest
from ink_infer.models import build_model
from ink_infer.models.checkpoint import EMA_PREFIX, hyper_parameters_for

out = Path(sys.argv[1])
torch.manual_seed(0)
specs = load_manifest(PACKAGED_MANIFEST).models
for spec in specs:
    state = {EMA_PREFIX + k: v.half() if v.is_floating_point() else v for k, v in build_model(spec).state_dict().items()}
    path = out / spec.file
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "hyper_parameters": hyper_parameters_for(spec)}, path)
print(f"  weights: random-init checkpoints of the {len(specs)} packaged entries in {out} (no weights_manifest.json: "
      "the run uses the packaged one)")
EOF
fi
chmod -R a-w "$INPUT"

echo "==== 4/5 the notebook's %%bash cell, with INPUT=$INPUT WORKING=$WORKING"
"$PY" "$REPO/kaggle/make_notebook.py" --check
"$PY" "$REPO/kaggle/make_notebook.py" --cell >"$SIM/notebook_cell.sh"
if unshare -n -m true 2>/dev/null; then
  ISOLATE=(unshare -n -m)
elif unshare -r -n -m true 2>/dev/null; then
  ISOLATE=(unshare -r -n -m)
else
  ISOLATE=()
fi
if [[ ${#ISOLATE[@]} -gt 0 ]]; then
  NET="cut (${ISOLATE[*]}: a private network namespace with loopback only)"
  RO="read-only bind mount of $INPUT (and chmod -R a-w)"
  # The cell goes to bash on stdin, as a %%bash cell does; the input is remounted read-only first, inside the
  # namespace, so even root cannot write there.
  # shellcheck disable=SC2016  # $1 expands in the inner shell
  RUN=("${ISOLATE[@]}" -- bash -c 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && exec bash -s' _ "$INPUT")
else
  NET="NOT cut (unshare is unavailable here): pip runs with --no-index, but nothing proves no download happens"
  RO="chmod -R a-w only$([[ $EUID -eq 0 ]] && echo ' (root ignores it: writes would not be caught)')"
  RUN=(bash -s)
  echo "  note: network $NET"
fi
# Kaggle's pip has no find-links, extra index or constraints of this machine's: drop its PIP_* settings.
PIP_UNSET=()
for v in $(compgen -e); do
  if [[ "$v" == PIP_* ]]; then PIP_UNSET+=(-u "$v"); fi
done
# As on Kaggle: KAGGLE_KERNEL_RUN_TYPE set (partials go to a temporary folder, deleted after the submission), with
# that temporary folder inside the simulation, where this script can look.
(cd "$WORKING" && env ${PIP_UNSET[@]+"${PIP_UNSET[@]}"} PIP_CONFIG_FILE=/dev/null INPUT="$INPUT" WORKING="$WORKING" \
  PYTHON="$VPY" SUBMIT_ARGS="$SUBMIT_ARGS" KAGGLE_KERNEL_RUN_TYPE=Batch TMPDIR="$SIM/tmp" \
  "${RUN[@]}" <"$SIM/notebook_cell.sh") 2>&1 | tee "$SIM/notebook_cell.log" ||
  die "the notebook's commands failed (see above)"

# The README's real-submission command, as printed there, with /kaggle/input and /kaggle/working mapped here.
readme="$(grep -A3 'rehearse.sh runs this line' "$REPO/README.md" | grep -m1 '^python -m ink_infer.submit')" ||
  die "README.md: no real-submission command under its 'rehearse.sh runs this line' marker"
expected="${readme//\/kaggle\/input/$INPUT}"
expected="${expected//\/kaggle\/working/$WORKING}"
ran="$(sed -n 's/^run: *//p' "$SIM/notebook_cell.log")"
if [[ -z "$SUBMIT_ARGS" ]]; then
  [[ "$ran" == "$expected" ]] || die "the notebook ran '$ran'; the README says '$readme' ('$expected' here)"
  echo "  the notebook ran the README's command as printed: $readme"
else
  echo "  note: --submit-args given: the notebook's command differs from the README's by them"
fi
left="$(find "$WORKING" "$SIM/tmp" -name '*.npz' | head -3)"
[[ -z "$left" ]] || die "partials left behind after the submission: $left"
echo "  no partials left in $WORKING, nor in the run's temporary folder"

echo "==== 5/5 check $WORKING/submission.csv with ink_infer.outputs.rle.rle_decode"
(cd "$WORKING" && "$VPY" - "$INPUT/vesuvius-challenge-ink-detection" "$SIM/generated/ground_truth" "$VENV" <<'EOF')
import csv
import sys
from pathlib import Path

import cv2
import ink_infer
from ink_infer.outputs.metrics import fbeta
from ink_infer.outputs.rle import read_submission, rle_decode, rle_encode

comp, truth_dir, venv = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]).resolve()
pkg = Path(ink_infer.__file__).resolve()
if venv not in pkg.parents:
    sys.exit(f"ink_infer was imported from {pkg}, not from the venv {venv}")
with open(comp / "sample_submission.csv", newline="") as fh:
    want = [row["Id"] for row in csv.DictReader(fh)]
rows = read_submission(Path("submission.csv"))
if [r[0] for r in rows] != want:
    sys.exit(f"submission.csv ids {[r[0] for r in rows]}, sample_submission.csv has {want}")
for frag_id, rle in rows:
    mask = cv2.imread(str(comp / "test" / frag_id / "mask.png"), cv2.IMREAD_GRAYSCALE)
    pred = rle_decode(rle, mask.shape)
    if rle_encode(pred) != rle:
        sys.exit(f"fragment {frag_id}: its RLE is not canonical (decode + encode changes it)")
    truth = cv2.imread(str(truth_dir / f"{frag_id}.png"), cv2.IMREAD_GRAYSCALE)
    f05 = fbeta(pred, truth > 0) if truth is not None else float("nan")
    print(f"  fragment {frag_id}: {mask.shape[0]}x{mask.shape[1]}, {int(pred.sum())} ink pixels "
          f"({pred.mean():.1%}), {len(rle.split()) // 2} runs, F0.5 vs synthetic truth {f05:.3f}")
print(f"  submission.csv: {len(rows)} rows in sample_submission order, every RLE decodes to its fragment's shape")
EOF

echo "==== where each piece came from"
echo "  wheel:      $BUNDLE/$WHEEL (sha256 $(sha256sum "$BUNDLE/$WHEEL" | cut -c1-16)), built from $REPO"
(cd "$WORKING" && "$VPY" - <<'EOF')
import os
import sys

import ink_infer
import numpy
import timm
import torch

print(f"  python:     {sys.executable} ({sys.version.split()[0]}), venv over {sys.base_prefix}")
print(f"  ink_infer:  {ink_infer.__version__} from {ink_infer.__file__}")
for m in (torch, timm, numpy):
    where = os.path.dirname(os.path.dirname(os.path.realpath(m.__file__)))
    print(f"  {m.__name__ + ':':11} {m.__version__} from {where} (preinstalled)")
EOF
if [[ -n "$WEIGHTS_SRC" ]]; then
  echo "  weights:    $WEIGHTS_SRC"
elif [[ $DEMO -eq 1 ]]; then
  echo "  weights:    the demo manifest and its trained checkpoints, from the wheel"
else
  echo "  weights:    random-init checkpoints of the packaged manifest's 18 models (F0.5 means nothing)"
fi
echo "  data:       synthetic, $TEST ($INPUT/vesuvius-challenge-ink-detection)"
echo "  network:    $NET"
echo "  input:      $RO"
echo "OK: $WORKING/submission.csv"
