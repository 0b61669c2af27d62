"""The per-fragment 2-D maps behind a synthetic fragment (see ``synthetic.py``): mask, ink, surface, fibres.

Each map is ``(H, W)``; together they take 8 bytes a pixel (0.4 GB for 8192 x 6144), built once per fragment. The
slices are then rendered from them row chunk by row chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

CHUNK_PIXELS = 1 << 21  # pixels per row chunk when rendering: float32 temporaries of ~8 MB
SURFACE_RANGE = (25.0, 40.0)  # the papyrus surface wanders between these slices
# Letters are 128-400 px tall (a quarter of the fragment's short side, at most half of it on tiny test fragments) with
# strokes a quarter of that: like real scroll ink, several 32 x 32 prediction cells wide. Thinner strokes could not
# be found by any model that predicts one value per cell (the 6 px strokes of 48 px letters capped a perfect
# model's F0.5 at ~0.44 on the demo fragments; 32 px strokes allow ~0.8).
LETTER_SIDE = (128, 400)
STROKE_PER_LETTER = 4  # stroke width = letter side / 4


@dataclass(frozen=True)
class FragmentMaps:
    """mask, ink: (H, W) uint8 0/1 (ink only inside the mask); surface: (H, W) float32 slice index of the papyrus
    surface; fibre_h, fibre_v: (H, W) float16 texture, ~zero mean, unit std; rows: [r0, r1) rows holding the mask."""

    mask: np.ndarray
    ink: np.ndarray
    surface: np.ndarray
    fibre_h: np.ndarray
    fibre_v: np.ndarray
    rows: tuple[int, int]


def make_maps(rng: np.random.Generator, height: int, width: int) -> FragmentMaps:
    """Draw every map of one fragment from ``rng`` (deterministic for a given generator state)."""
    mask = _mask(rng, height, width)
    ink = _ink(rng, height, width, mask)
    fibre_h = _fibres(rng, height, width, horizontal=True)
    fibre_v = _fibres(rng, height, width, horizontal=False)
    # Built last and scaled in place: the float32 temporaries of the other maps are gone by then (peak memory).
    lo, hi = SURFACE_RANGE
    surface = _upsampled_field(rng, height, width, sigma_frac=0.25, tilt=1.0)
    surface *= hi - lo  # fill the whole range: the surface is never flat
    surface += lo
    rows = np.flatnonzero(mask.any(axis=1))
    extent = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, 0)
    return FragmentMaps(mask, ink, surface, fibre_h, fibre_v, extent)


def _low_res(height: int, width: int, side: int = 256) -> tuple[int, int]:
    scale = min(1.0, side / max(height, width))
    return max(8, round(height * scale)), max(8, round(width * scale))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """(h, w) float32 Gaussian-blurred white noise, normalised to zero mean and unit std."""
    field = cv2.GaussianBlur(rng.standard_normal(shape, dtype=np.float32), (0, 0), max(sigma, 0.5))
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _upsampled_field(
    rng: np.random.Generator, height: int, width: int, *, sigma_frac: float, tilt: float
) -> np.ndarray:
    """(H, W) float32 smooth field scaled to [0, 1]: low-resolution noise plus a random tilt, resized up."""
    lh, lw = _low_res(height, width)
    field = _smooth_noise(rng, (lh, lw), sigma_frac * max(lh, lw))
    yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    field += tilt * (np.cos(angle) * xx / lw + np.sin(angle) * yy / lh)
    field = (field - field.min()) / max(float(np.ptp(field)), 1e-6)
    return cv2.resize(field, (width, height), interpolation=cv2.INTER_LINEAR)


def _mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 0/1: a blob with a wavy, ragged edge and, in half the fragments, a hole."""
    lh, lw = _low_res(height, width)
    yy, xx = np.mgrid[-1 : 1 : lh * 1j, -1 : 1 : lw * 1j].astype(np.float32)
    cy, cx = rng.uniform(-0.1, 0.1, 2)
    ry, rx = rng.uniform(0.75, 0.95, 2)
    field = 1.0 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2
    field += 0.3 * _smooth_noise(rng, (lh, lw), max(lh, lw) / 8)  # wavy outline
    field += 0.08 * _smooth_noise(rng, (lh, lw), 1.0)  # ragged edge
    if rng.random() < 0.5:  # a hole where the papyrus is missing
        hy, hx = rng.uniform(-0.4, 0.4, 2)
        sy, sx = rng.uniform(0.05, 0.15, 2)
        field -= 2.0 * np.exp(-(((yy - hy) / sy) ** 2) - ((xx - hx) / sx) ** 2)
    full = cv2.resize(field, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.greater(full, 0, out=np.empty((height, width), bool)).view(np.uint8)


def _ink(rng: np.random.Generator, height: int, width: int, mask: np.ndarray) -> np.ndarray:
    """(H, W) uint8 0/1 ink: lines of 'letters', each one or two thick strokes or arcs, kept inside the mask."""
    ink = np.zeros((height, width), np.uint8)
    short = min(height, width)
    size = int(min(max(short / 4, LETTER_SIDE[0]), LETTER_SIDE[1], short / 2))  # letter height in pixels
    thick = max(2, size // STROKE_PER_LETTER)
    y = int(size * rng.uniform(0.6, 1.2))
    while y + size < height:
        x = int(size * rng.uniform(0.3, 1.0))
        while x + size < width:
            if rng.random() < 0.15:  # a gap between words
                x += size
                continue
            for _ in range(rng.integers(1, 3)):
                _stroke(rng, ink, x, y, size, thick)
            x += int(size * rng.uniform(0.9, 1.3))
        y += int(size * rng.uniform(1.6, 2.0))
    ink &= mask
    if not ink.any():  # tiny fragments: make sure there is some ink to find
        ys, xs = np.nonzero(mask)
        if ys.size:
            cy, cx = int(ys.mean()), int(xs.mean())
            cv2.line(ink, (cx - size, cy), (cx + size, cy), 1, thick)
            ink &= mask
    return ink


def _stroke(rng: np.random.Generator, ink: np.ndarray, x: int, y: int, size: int, thick: int) -> None:
    """Draw one straight stroke or arc inside the letter box with top-left corner (x, y)."""
    if rng.random() < 0.6:
        p0 = (x + int(rng.integers(0, size)), y + int(rng.integers(0, size)))
        p1 = (x + int(rng.integers(0, size)), y + int(rng.integers(0, size)))
        cv2.line(ink, p0, p1, 1, thick)
    else:
        centre = (x + size // 2, y + size // 2)
        axes = (int(size * rng.uniform(0.2, 0.5)), int(size * rng.uniform(0.2, 0.5)))
        start = float(rng.uniform(0, 360))
        cv2.ellipse(ink, centre, axes, 0.0, start, start + float(rng.uniform(90, 300)), 1, thick)


def _fibres(rng: np.random.Generator, height: int, width: int, *, horizontal: bool) -> np.ndarray:
    """(H, W) float16 papyrus fibre texture: noise smeared along one axis, unit std."""
    # Fibres are long and a few pixels wide; the cap keeps the blur kernel short on full-size fragments.
    along = float(np.clip(min(height, width) / 40, 2.0, 24.0))
    across = max(0.8, along / 6)
    field = rng.standard_normal((height, width), dtype=np.float32)
    sigma = (along, across) if horizontal else (across, along)
    cv2.GaussianBlur(field, (0, 0), sigmaX=sigma[0], sigmaY=sigma[1], dst=field)
    field *= 1.0 / max(float(field.std()), 1e-6)
    return field.astype(np.float16)
