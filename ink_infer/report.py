"""What a run measured: host and GPU memory peaks, environment, the JSON report, the table, the preview PNGs."""

from __future__ import annotations

import json
import platform
import resource
from pathlib import Path

import cv2
import numpy as np
import torch

from .rle import atomic_write_text

GIB = 1024**3
PREVIEW_MAX_SIDE = 1024


def host_peak_gib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux; it cannot be reset)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def host_current_gib() -> float:
    """Current resident set size, from /proc/self/status (0 where that file does not exist)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return 0.0


def gpu_peaks_gib(device: torch.device) -> dict[str, float] | None:
    """``max_memory_allocated`` / ``max_memory_reserved`` since the last reset, or None off CUDA."""
    if device.type != "cuda":
        return None
    return {
        "allocated": torch.cuda.max_memory_allocated(device) / GIB,
        "reserved": torch.cuda.max_memory_reserved(device) / GIB,
    }


def environment(device: torch.device) -> dict:
    """Versions and hardware, recorded in every report."""
    import timm

    from . import __version__

    env = {
        "ink_infer": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=_jsonable) + "\n")


def _jsonable(o: object) -> object:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, (Path, torch.device)):
        return str(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` is (key, header, format spec) per column."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_preview(path: Path, prob: np.ndarray, ink: np.ndarray, mask: np.ndarray) -> None:
    """PNG of the probability map (left) beside the binary ink mask (right), mask outline in grey.

    prob: ``(H, W)`` float32 in [0, 1]; ink, mask: ``(H, W)`` bool. Downscaled so the longer side is at most 1024.
    """
    h, w = prob.shape
    scale = min(1.0, PREVIEW_MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    left = (np.clip(prob, 0, 1) * 255).astype(np.uint8)
    right = np.where(ink, 255, np.where(mask, 48, 0)).astype(np.uint8)
    left, right = (cv2.resize(a, size, interpolation=cv2.INTER_AREA) for a in (left, right))
    gap = np.full((size[1], 8), 128, dtype=np.uint8)
    img = cv2.applyColorMap(np.hstack([left, gap, right]), cv2.COLORMAP_VIRIDIS)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    if not cv2.imwrite(str(tmp), img):
        raise OSError(f"{path}: could not write preview")
    tmp.replace(path)
