#!/usr/bin/env bash
# Set your Kaggle user name once in every metadata file: kaggle/kernel-metadata.json (the notebook's id and its
# two datasets) and kaggle/weights-dataset-metadata.json; build_wheels.sh then takes it from there when run
# without --owner.
#   kaggle/set_owner.sh YOUR_NAME          (`kaggle config view` shows it)
set -euo pipefail
die() {
  echo "set_owner.sh: error: $*" >&2
  exit 2
}
[[ $# -eq 1 ]] || die "usage: kaggle/set_owner.sh KAGGLE_USER_NAME"
[[ "$1" =~ ^[A-Za-z0-9_-]+$ ]] || die "'$1': expected a Kaggle user name (letters, digits, - and _)"
KAGGLE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python3 - "$1" "$KAGGLE/kernel-metadata.json" "$KAGGLE/weights-dataset-metadata.json" <<'PY'
import json
import sys
from pathlib import Path

owner, files = sys.argv[1], sys.argv[2:]


def owned(ref: str) -> str:  # "<anyone>/<slug>" -> "<owner>/<slug>"
    return f"{owner}/{ref.split('/', 1)[1]}"


for name in files:
    path = Path(name)
    meta = json.loads(path.read_text())
    meta["id"] = owned(meta["id"])
    if "dataset_sources" in meta:
        meta["dataset_sources"] = [owned(ref) for ref in meta["dataset_sources"]]
    path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{path}: id {meta['id']}" + (f", datasets {', '.join(meta['dataset_sources'])}" if "dataset_sources" in meta else ""))
PY
