"""Turn a checkpoint that ``torch.load(weights_only=True)`` refuses into a safetensors file, once, on trust.

The Grand Prize's Lightning checkpoint pickles its optimizer and LR scheduler objects (``GP_TIMESFORMER.md`` §5),
so it cannot be read without running its pickle. ``python -m ink_infer.manifest convert --trust FILE --sha256 HEX``
does that here, and only here: after the caller has checked FILE's sha256, ``convert_trusted`` starts a child
Python process (``python -m ink_infer.models.convert``) that hashes the bytes it reads again (the file cannot be
swapped in between), unpickles them with ``weights_only=False``, and writes ``checkpoint["state_dict"]`` (or the
file itself when it is a bare state dict) as safetensors to a temporary file. The calling process never unpickles
anything: it checks the child's file is safetensors and renames it into place (atomic). Classes the checkpoint
names that cannot be imported here (Lightning's, a training script's scheduler) are unpickled as empty stand-ins:
only the tensors are kept. The checkpoint's ``hyper_parameters`` go into the metadata, as JSON.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ink_infer.errors import UserError

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def convert(src: Path, sha256: str | None, out: Path | None) -> tuple[Path, int, str]:
    """``src`` converted to safetensors at ``out`` (default: beside it, suffix ``.safetensors``), once its sha256
    is the one given. Returns (out, tensors written, out's sha256). Refusals are one-line ``UserError``s."""
    src = Path(src)
    if not sha256 or _HEX64.fullmatch(sha256) is None:
        raise UserError(
            f"{src}: convert unpickles the file, which can run code: give its --sha256 (64 hex digits)"
        )
    if not src.is_file():
        raise UserError(f"{src}: not a file")
    digest = _sha256(src)
    if digest != sha256.lower():
        raise UserError(f"{src}: sha256 {digest[:12]}…, --sha256 says {sha256[:12]}…: refused, not unpickled")
    out = Path(out) if out is not None else src.with_suffix(".safetensors")
    n = convert_trusted(src, out, sha256=digest)
    return out, n, _sha256(out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def convert_trusted(src: Path, out: Path, *, sha256: str) -> int:
    """Write ``src``'s state dict to ``out`` (safetensors) through a child process; returns the tensor count.

    ``sha256``: ``src``'s, already checked by the caller; the child refuses bytes that do not hash to it. Raises
    ``UserError`` (one line) when the child fails; ``out`` is then untouched."""
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise UserError(f"{out}: --out would overwrite the checkpoint it converts")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ink_infer.models.convert", str(src), str(tmp), sha256],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or [
                f"exit status {proc.returncode}"
            ]
            raise UserError(f"{src}: conversion failed: {lines[-1].removeprefix('error: ')}")
        n = _count_tensors(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def _count_tensors(path: Path) -> int:
    """The tensors a safetensors file lists (its JSON header alone: nothing is unpickled or loaded)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return sum(1 for k in header if k != "__metadata__")


class _Stub:
    """What an object of a class that cannot be imported here unpickles as: its state kept, nothing called."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state


class _Tolerant(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Stub,), {"__module__": f"unimported.{module}"})


_TOLERANT = types.SimpleNamespace(Unpickler=_Tolerant, load=pickle.load, __name__="ink_infer_tolerant_pickle")


def _plain(value: Any) -> Any:
    """JSON-ready: plain containers and scalars as they are, anything else as its repr."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _child(src: Path, dst: Path, sha256: str) -> int:
    """The child's work: hash, unpickle (trusted), extract, write. Returns the tensor count."""
    import torch

    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError(
            "writing safetensors needs the safetensors package: pip install 'ink_infer[timesformer]'"
        ) from None

    data = src.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256.lower():
        raise UserError(f"{src}: sha256 {digest[:12]}…, --sha256 says {sha256[:12]}… (changed since?)")
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=_TOLERANT)
    if not isinstance(obj, Mapping):
        raise UserError(
            f"{src}: holds a {type(obj).__name__}, expected a Lightning checkpoint or a state dict"
        )
    state = obj.get("state_dict", obj)
    if not isinstance(state, Mapping) or not state:
        raise UserError(f"{src}: 'state_dict' is a {type(state).__name__}, expected a dict of tensors")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{src}: state_dict entries that are not tensors: {', '.join(bad[:4])}")
    # clones: safetensors refuses tensors that share memory, and a mapped or sliced storage is not written whole
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    meta = {"format": "pt", "source": src.name, "source_sha256": digest}
    if isinstance(obj.get("hyper_parameters"), Mapping):
        meta["hyper_parameters"] = json.dumps(_plain(obj["hyper_parameters"]))
    save_file(tensors, str(dst), metadata=meta)
    return len(tensors)


def main(argv: list[str]) -> int:
    """``python -m ink_infer.models.convert SRC DST SHA256``: the child's entry point (not a user command)."""
    if len(argv) != 3:
        print("error: usage: python -m ink_infer.models.convert SRC DST SHA256", file=sys.stderr)
        return 2
    src, dst, sha256 = Path(argv[0]), Path(argv[1]), argv[2]
    try:
        _child(src, dst, sha256)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 -- the trusted file's own unpickling can raise anything; one line up
        print(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
