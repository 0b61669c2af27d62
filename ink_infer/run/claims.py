"""The queue the workers of a ``--devices`` run share: each unit is taken by one process before it is computed.

A unit is taken by creating its file in the run's claims folder with ``O_CREAT | O_EXCL``: atomic between the
processes of a machine, and nothing is held while the unit computes. A lock in shared memory would stay locked
if its holder were SIGKILLed or OOM-killed inside it, and every other worker would hang on it; a file left
behind by a killed worker only says which unit it had taken (``holders``: the units it lost).

Claims decide who computes a unit, never its bytes: a unit's partial is the same whoever computes it, and the
outputs are merged from the partials in manifest order (``run/merge.py``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Collection
from pathlib import Path

from ink_infer.run.partials import safe_name
from ink_infer.run.plan import Unit

log = logging.getLogger(__name__)


def claim_name(model: str, unit_id: str) -> str:
    """The claim file's name of (model, unit id): readable, plus a short hash so that distinct pairs never share
    one (``safe_name`` alone maps ``a b`` and ``a_b`` to one name)."""
    tag = hashlib.sha256(f"{model}\0{unit_id}".encode()).hexdigest()[:8]
    return f"{safe_name(model)}@{safe_name(unit_id)}.{tag}"


class Claims:
    """One process's view of the claims folder ``root``: it takes units as ``label``. ``own``: the (model, unit
    id) pairs the static plan gave it, the only ones it computes when the folder cannot be written (a full disk:
    the run then goes on as the static plan)."""

    def __init__(self, root: Path, label: str, own: Collection[tuple[str, str]] = ()) -> None:
        self.root, self.label, self.own = Path(root), label, frozenset(own)
        self._unwritable = False

    @staticmethod
    def reset(root: Path) -> None:
        """An empty folder before the workers start: an earlier run's claims are not this one's."""
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, unit: Unit) -> Path:
        return self.root / claim_name(unit.model.name, unit.fragment.id)

    def free(self, unit: Unit) -> bool:
        """Nobody has taken ``unit`` yet (a look only: ``take`` decides)."""
        if self._unwritable:
            return (unit.model.name, unit.fragment.id) in self.own
        return not self._path(unit).exists()

    def take(self, unit: Unit) -> bool:
        """Take ``unit``: True if this process now computes it, False if another one took it first."""
        if self._unwritable:
            return (unit.model.name, unit.fragment.id) in self.own
        try:
            fd = os.open(self._path(unit), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            log.warning("%s: cannot write (%s); this worker computes its planned units only", self.root,
                        e.strerror or e)  # fmt: skip
            self._unwritable = True
            return (unit.model.name, unit.fragment.id) in self.own
        with os.fdopen(fd, "w") as f:
            f.write(
                self.label
            )  # a worker killed before this line leaves an empty file: taken, by nobody known
        return True

    def holders(self) -> dict[str, str]:
        """Every claim file's name, with the label of the process that took it ("" if unknown)."""
        found = {}
        for path in self.root.glob("*@*"):
            try:
                found[path.name] = path.read_text()
            except OSError:
                found[path.name] = ""
        return found
