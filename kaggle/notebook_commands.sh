# The notebook's commands: kaggle/submission.ipynb holds this file verbatim in a %%bash cell, and
# kaggle/rehearse.sh runs that cell. Edit here, then `python kaggle/make_notebook.py`.
# On Kaggle: INPUT=/kaggle/input, WORKING=/kaggle/working, PYTHON=the kernel's python, internet off.
set -euo pipefail
INPUT="${INPUT:-/kaggle/input}"
WORKING="${WORKING:-/kaggle/working}"
PYTHON="${PYTHON:-python3}"
SUBMIT_ARGS="${SUBMIT_ARGS:-}" # empty on Kaggle; the rehearsal may pass extra options

# Datasets mount at $INPUT/<slug>/ or, on newer images, $INPUT/datasets/<owner>/<slug>/.
find_one() { # find_one WHAT FILE...: the one folder holding the given paths, or a one-line error
  local what="$1" dirs
  shift
  dirs="$(for f in "$@"; do dirname "$f"; done | sort -u)"
  if [[ -z "$dirs" ]]; then
    echo "error: no $what under $INPUT: add that dataset to the notebook (see kaggle/README.md)" >&2
    return 2
  elif [[ "$(wc -l <<<"$dirs")" -gt 1 ]]; then
    echo "error: several $what datasets, keep one: $(tr '\n' ' ' <<<"$dirs")" >&2
    return 2
  fi
  echo "$dirs"
}

main() {
  shopt -s nullglob
  local bundle manifest manifests weights first hits gpus
  bundle="$(find_one "ink_infer-*.whl (the bundle from build_wheels.sh)" \
    "$INPUT"/*/ink_infer-*.whl "$INPUT"/datasets/*/*/ink_infer-*.whl)"
  echo "bundle:  $bundle ($(cd "$bundle" && echo ink_infer-*.whl))"
  # --no-deps: pip must never touch Kaggle's preinstalled torch/timm/numpy/opencv (and a cv2 from
  # opencv-python-headless would not satisfy the `opencv-python` requirement by name); the imports below check them.
  # --force-reinstall: an ink_infer already installed (an earlier bundle of the same version, a stale editable
  # install) would otherwise "satisfy" the requirement and the bundle's code would not run.
  "$PYTHON" -m pip install -q --no-index --no-deps --force-reinstall --find-links "$bundle" ink_infer
  # the dependencies import, and torch counts the GPUs (one interpreter: torch takes seconds to import)
  gpus="$("$PYTHON" -c 'import torch, timm, numpy, tifffile, cv2, scipy, tqdm; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')" ||
    { echo "error: a dependency of ink_infer is missing from this image (see above); add its wheel with build_wheels.sh --extra" >&2; exit 2; }
  "$PYTHON" -c 'import ink_infer, sys; print("python: ", sys.executable, sys.version.split()[0]); print("package:", ink_infer.__file__, ink_infer.__version__)'

  # The weights dataset: the folder of a weights_manifest.json (written there by `manifest hash`: sizes and
  # hashes), or else the folder holding the packaged manifest's first file. The weights may sit beside the manifest
  # or, after an archive upload (-r tar/zip), a level deeper: the weights dir is wherever the first file is found.
  manifests=("$INPUT"/*/weights_manifest.json "$INPUT"/*/*/weights_manifest.json
    "$INPUT"/datasets/*/*/weights_manifest.json "$INPUT"/datasets/*/*/*/weights_manifest.json)
  if [[ ${#manifests[@]} -gt 0 ]]; then
    manifest="$(find_one "weights_manifest.json (the weights dataset)" "${manifests[@]}")/weights_manifest.json"
  else
    manifest="$("$PYTHON" -c 'from ink_infer.manifest import PACKAGED_MANIFEST; print(PACKAGED_MANIFEST)')"
  fi
  first="$("$PYTHON" -c 'import json, sys; print(next((m["file"] for m in json.load(open(sys.argv[1]))["models"] if m.get("file")), ""))' "$manifest")"
  weights=""
  if [[ ${#manifests[@]} -gt 0 ]]; then weights="$(dirname "$manifest")"; fi
  if [[ -n "$first" && ! -f "$weights/$first" ]]; then
    hits=()
    if [[ -n "$weights" ]]; then hits=("$weights"/*/"$first"); fi
    hits+=("$INPUT"/*/"$first" "$INPUT"/*/*/"$first" "$INPUT"/datasets/*/*/"$first" "$INPUT"/datasets/*/*/*/"$first")
    if [[ ${#hits[@]} -eq 0 ]]; then
      echo "error: no $first under $INPUT: add the weights dataset to the notebook (see kaggle/README.md)" >&2
      exit 2
    fi
    weights="${hits[0]%/"$first"}"
  fi
  echo "weights: $weights (manifest $manifest)"
  # The README's command; --manifest only when the run would not find this manifest by itself (beside the weights,
  # or the packaged one)
  local manifest_arg=()
  if [[ ${#manifests[@]} -gt 0 && "$(dirname "$manifest")" != "$weights" ]]; then manifest_arg=(--manifest "$manifest"); fi

  local extra=()
  read -r -a extra <<<"$SUBMIT_ARGS"
  # "GPU T4 x2": one worker per GPU (the same submission bytes as one GPU, in about half the time)
  if [[ "$gpus" -ge 2 ]]; then extra=(--devices all ${extra[@]+"${extra[@]}"}); fi
  echo "gpus:    $gpus"
  cd "$WORKING"
  local cmd=(-m ink_infer.submit --data "$INPUT" --weights "$weights" --out "$WORKING"
    ${manifest_arg[@]+"${manifest_arg[@]}"} ${extra[@]+"${extra[@]}"})
  echo "run:     python ${cmd[*]}"
  "$PYTHON" "${cmd[@]}"
  echo "submission: $WORKING/submission.csv, $(($(wc -l <"$WORKING/submission.csv") - 1)) rows"
}

# A %%bash cell feeds this text to bash on stdin: run everything with stdin closed, so no command can read
# (and swallow) the rest of the script.
main </dev/null
