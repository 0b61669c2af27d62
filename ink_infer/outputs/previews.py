"""Pictures of a run, for a person to look at: one per fragment, and (demo) one per fragment against the truth.

``write_preview`` (OUT/previews/<id>.png), from top to bottom:

- a header band: fragment id, its size in pixels (and the scale it is shown at), the threshold and the share of
  the mask predicted as ink;
- the probability map, in absolute terms (0 at the bottom of viridis, 1 at the top, never stretched), pixels
  outside the mask in neutral grey; beside it the binary ink mask (yellow ink on purple papyrus, same grey
  outside); the mask outline in white on both; a viridis colour bar 0..1 with the threshold marked.

``write_side_by_side`` (``--direction both``, OUT/previews/<seg>.both.png): a header band over two such previews
side by side, a segment's forward and reverse maps.

``write_truth_preview`` (demo, OUT/previews/<id>_truth.png): a header band with the fragment id, F0.5 and a legend,
over the full-size comparison with the truth, one colour per pixel class (``TRUTH_COLOURS``, Okabe-Ito colours
told apart under protanopia and deuteranopia as well); ``body_of`` cuts the header off for counting.

All drawing is OpenCV (BGR colours). Written atomically (``atomic.py``): a full disk leaves no half-written image
behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ink_infer.outputs.atomic import atomic_write_bytes

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1) of a PNG, half-open
Colour = tuple[int, int, int]  # BGR

PREVIEW_MAX_SIDE = 1024  # longer side of a panel: a 10k x 20k fragment stays a viewable picture
PREVIEW_MIN_SIDE = 256  # a smaller fragment is enlarged (pixel blocks) until its longer side is this

HEADER_HEIGHT = 52  # rows of the header band, in both pictures
HEADER_BASELINES = (20, 42)  # text rows of the header
LABEL_HEIGHT = 24  # the band between header and panels that holds the panel labels
MARGIN = 12
PANEL_GAP = 16
PANEL_MIN_WIDTH = 200  # a narrow panel still has room for its label above it
COLOUR_BAR_WIDTH = 20
COLOUR_BAR_MIN_HEIGHT = 150  # a flat fragment still gets a readable bar
COLOUR_BAR_LABELS_WIDTH = 120  # right of the bar: tick labels, then the threshold's label in a second column
SWATCH_SIDE = 12

FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.5
TEXT_COLOUR: Colour = (255, 255, 255)
HEADER_BACKGROUND: Colour = (16, 16, 16)
HEADER_RULE: Colour = (128, 128, 128)  # the header's last row: where the picture starts
CANVAS_BACKGROUND: Colour = (40, 40, 40)
# neutral grey: viridis has no grey (every entry's channels differ by 69 or more), so "outside the mask" cannot be
# read as "low probability"
OUTSIDE_MASK_COLOUR: Colour = (80, 80, 80)
OUTLINE_COLOUR: Colour = (255, 255, 255)  # white: not in viridis, and bright against the grey outside

# BGR colours of the truth comparison (Okabe-Ito): found ink blue, false ink vermillion, missed ink yellow,
# papyrus without ink dark grey; outside the mask black. Picked for the largest smallest CIELAB distance between
# the four under simulated protanopia, deuteranopia and tritanopia (Machado 2009, full severity).
TRUTH_COLOURS: dict[str, Colour] = {
    "hit": (178, 114, 0),
    "false": (0, 94, 213),
    "missed": (66, 228, 240),
    "papyrus": (50, 50, 50),
}
TRUTH_LABELS = {
    "hit": "found ink",
    "false": "false ink",
    "missed": "missed ink",
    "papyrus": "papyrus, no ink",
}
TRUTH_LEGEND = "found ink blue, false ink orange-red, missed ink yellow"  # the colours in words, for the CLI


@dataclass(frozen=True)
class PreviewLayout:
    """Where ``write_preview`` draws, as boxes of the PNG. ``width`` is the canvas width before a header longer
    than the panels widens it (to the right: the boxes stay where they are)."""

    scale: float  # panel pixels per fragment pixel
    prob_panel: Box
    ink_panel: Box
    colour_bar: Box  # the ramp alone: 1 in its top row, 0 in its bottom row
    width: int
    height: int


def preview_layout(shape: tuple[int, int]) -> PreviewLayout:
    """The layout of ``write_preview`` for a fragment of ``shape`` ``(H, W)``."""
    h, w = shape
    longer = max(h, w)
    scale = PREVIEW_MIN_SIDE / longer if longer < PREVIEW_MIN_SIDE else min(1.0, PREVIEW_MAX_SIDE / longer)
    ph, pw = max(1, round(h * scale)), max(1, round(w * scale))
    slot = max(pw, PANEL_MIN_WIDTH)
    top = HEADER_HEIGHT + LABEL_HEIGHT
    ink_x = MARGIN + slot + PANEL_GAP
    bar_x = ink_x + slot + PANEL_GAP
    bar_height = max(ph, COLOUR_BAR_MIN_HEIGHT)
    return PreviewLayout(
        scale=scale,
        prob_panel=(top, top + ph, MARGIN, MARGIN + pw),
        ink_panel=(top, top + ph, ink_x, ink_x + pw),
        colour_bar=(top, top + bar_height, bar_x, bar_x + COLOUR_BAR_WIDTH),
        width=bar_x + COLOUR_BAR_WIDTH + COLOUR_BAR_LABELS_WIDTH,
        height=top + bar_height + MARGIN,
    )


class PreviewAccumulator:
    """The preview's panels built from the fragment's rows as they come, so a segment that is never whole in
    memory still gets its picture (``outputs/write.py``): every band's pixels are summed into cells of ``factor`` x
    ``factor`` pixels (the largest whole shrink that stays at or above the panel's size), whose means are then
    resized to the panel as a whole image would be."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self.layout = preview_layout(shape)
        self.factor = max(1, int(1 / self.layout.scale)) if self.layout.scale < 1 else 1
        f, (h, w) = self.factor, shape
        self.cells = (-(-h // f), -(-w // f))
        self.sums = np.zeros((3, *self.cells), np.float64)  # in-mask probability, mask, ink
        self.row = 0
        self.ink_pixels = self.mask_pixels = 0

    def add(self, prob: np.ndarray, ink: np.ndarray, mask: np.ndarray) -> None:
        """The next rows (in order): ``(r, W)`` float32 probabilities, bool ink, bool mask."""
        r, w = mask.shape
        f, cw = self.factor, self.cells[1]
        self.ink_pixels += int(np.count_nonzero(ink))
        self.mask_pixels += int(np.count_nonzero(mask))
        cell_rows = (self.row + np.arange(r)) // f
        starts = np.flatnonzero(np.diff(cell_rows, prepend=-1))
        for i, values in enumerate((np.where(mask, prob, 0), mask, ink)):
            padded = np.zeros((r, cw * f), np.float64)
            padded[:, :w] = values
            per_row = padded.reshape(r, cw, f).sum(axis=2)
            self.sums[i, cell_rows[starts]] += np.add.reduceat(per_row, starts, axis=0)
        self.row += r

    def panels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Panel-sized ``(mean in-mask probability, ink share of the mask, mask coverage)``, float32."""
        (h, w), f = self.shape, self.factor
        area = np.outer(
            np.minimum(f, h - np.arange(self.cells[0]) * f), np.minimum(f, w - np.arange(self.cells[1]) * f)
        )
        y0, y1, x0, x1 = self.layout.prob_panel
        size = (x1 - x0, y1 - y0)
        prob, mask, ink = (_resize((s / area).astype(np.float32), size) for s in self.sums)
        in_mask_share = np.maximum(mask, 1 / 255)
        return prob / in_mask_share, ink / in_mask_share, mask


def write_preview(
    path: Path,
    prob: np.ndarray,
    ink: np.ndarray,
    mask: np.ndarray,
    *,
    fragment_id: str = "",
    threshold: float | None = None,
) -> None:
    """PNG of the probability map (left) beside the binary ink mask (right), under a header (see the module).

    prob: ``(H, W)`` float32 in [0, 1]; ink, mask: ``(H, W)`` bool; threshold: the probability ``ink`` was cut
    at (None: none, e.g. an empty region). Panels are ``preview_layout(prob.shape)``.
    """
    acc = PreviewAccumulator(prob.shape)
    acc.add(prob, ink, mask)
    write_accumulated_preview(path, acc, fragment_id=fragment_id, threshold=threshold)


def write_accumulated_preview(
    path: Path, acc: PreviewAccumulator, *, fragment_id: str = "", threshold: float | None = None
) -> None:
    """``write_preview`` of the rows ``acc`` was given."""
    _write_png(path, preview_image(acc, fragment_id=fragment_id, threshold=threshold))


def write_side_by_side(path: Path, images: Sequence[np.ndarray], lines: Sequence[str]) -> None:
    """PNG of ``images`` (``preview_image``'s, ``(h, w, 3)`` uint8 BGR) left to right, ``PANEL_GAP`` apart, under
    a header band of ``lines`` (at most two): ``--direction both``'s two maps of a segment."""
    gap = np.full((max(i.shape[0] for i in images), PANEL_GAP, 3), CANVAS_BACKGROUND, np.uint8)
    row = [p for i in images for p in (gap, _padded(i, gap.shape[0]))][1:]
    body = np.concatenate(row, axis=1)
    width = max(body.shape[1], _header_width(lines))
    img = np.full((HEADER_HEIGHT + body.shape[0], width, 3), CANVAS_BACKGROUND, np.uint8)
    img[:HEADER_HEIGHT] = _header(width, lines)
    img[HEADER_HEIGHT:, : body.shape[1]] = body
    _write_png(path, img)


def _padded(img: np.ndarray, height: int) -> np.ndarray:
    """``img`` with background rows below, ``height`` rows in all."""
    below = np.full((height - img.shape[0], *img.shape[1:]), CANVAS_BACKGROUND, np.uint8)
    return np.concatenate([img, below])


def preview_image(
    acc: PreviewAccumulator, *, fragment_id: str = "", threshold: float | None = None
) -> np.ndarray:
    """The picture ``write_accumulated_preview`` writes, ``(h, w, 3)`` uint8 BGR."""
    layout = acc.layout
    # the panels show means over the in-mask part of each panel pixel only, so a pixel on the mask's edge is not
    # darkened by the zeros outside
    mean_prob, ink_share, coverage = acc.panels()
    inside = coverage >= 0.5
    outline = _outline(inside)
    panels = []
    for values in (mean_prob, ink_share):
        panel = _viridis(values)
        panel[~inside] = OUTSIDE_MASK_COLOUR
        cv2.drawContours(panel, outline, -1, OUTLINE_COLOUR, 1)
        panels.append(panel)

    thr_text = "n/a" if threshold is None else f"{threshold:.3f}"
    header_lines = [
        _size_line(fragment_id, acc.shape, layout.scale),
        _ink_line(thr_text, acc.ink_pixels, acc.mask_pixels),
    ]
    width = max(layout.width, _header_width(header_lines))
    img = np.full((layout.height, width, 3), CANVAS_BACKGROUND, np.uint8)
    img[:HEADER_HEIGHT] = _header(width, header_lines)
    labels = ("probability", f"ink mask (threshold {thr_text})")
    for panel, box, label in zip(panels, (layout.prob_panel, layout.ink_panel), labels, strict=True):
        by0, by1, bx0, bx1 = box
        img[by0:by1, bx0:bx1] = panel
        _put_text(img, label, bx0, by0 - 7)
    by0, by1, bx0, bx1 = layout.colour_bar
    img[by0:by1, bx0:bx1] = _colour_bar(by1 - by0)
    _draw_bar_ticks(img, layout.colour_bar, threshold)
    return img


def write_truth_preview(
    path: Path,
    ink: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray,
    *,
    fragment_id: str = "",
    f05: float | None = None,
) -> None:
    """PNG comparing predicted ``ink`` with ``truth`` (both ``(H, W)`` bool) inside ``mask``: a header with the
    fragment id, F0.5 and a legend, over the comparison at full size, one ``TRUTH_COLOURS`` colour per class,
    black outside the mask. ``body_of(image)`` is the comparison (widened with black when the header is wider)."""
    classes = {
        "hit": ink & truth,
        "false": ink & ~truth,
        "missed": ~ink & truth,
        "papyrus": mask & ~ink & ~truth,
    }
    h, w = ink.shape
    parts = [f"fragment {fragment_id}"] if fragment_id else []
    if f05 is not None:
        parts.append(f"F0.5 {f05:.3f}")
    title = "   ".join([*parts, f"{h}x{w} px"])
    legend = [(TRUTH_COLOURS[name], TRUTH_LABELS[name]) for name in classes]
    width = max(w, _header_width([title], legend))
    img = np.zeros((HEADER_HEIGHT + h, width, 3), np.uint8)
    img[:HEADER_HEIGHT] = _header(width, [title], legend)
    body = img[HEADER_HEIGHT:, :w]
    for name, where in classes.items():
        body[where] = TRUTH_COLOURS[name]
    _write_png(path, img)


def body_of(img: np.ndarray) -> np.ndarray:
    """The picture under the header band of either preview (a view)."""
    return img[HEADER_HEIGHT:]


def _size_line(fragment_id: str, shape: tuple[int, int], scale: float) -> str:
    h, w = shape
    size = f"{h}x{w} px" + ("" if scale == 1 else f" (shown at {scale:.0%})")
    return f"fragment {fragment_id}   {size}" if fragment_id else size


def _ink_line(thr_text: str, ink_pixels: int, in_mask: int) -> str:
    share = f"{100 * ink_pixels / in_mask:.2f} % of the mask" if in_mask else "n/a (empty mask)"
    return f"threshold {thr_text}   ink {share}"


def _resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``a`` at ``size`` (width, height): area means when shrinking, pixel blocks when enlarging (a 64 px
    fragment shows its pixels, not a blur)."""
    shrinking = size[0] * size[1] < a.shape[0] * a.shape[1]
    return cv2.resize(a, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_NEAREST)


def _viridis(values: np.ndarray) -> np.ndarray:
    """BGR viridis of ``values`` in [0, 1], absolute: 0 -> entry 0, 1 -> entry 255."""
    index = np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8)
    return cv2.applyColorMap(index, cv2.COLORMAP_VIRIDIS)


def _outline(inside: np.ndarray) -> Sequence[np.ndarray]:
    """Contours of the (panel-sized) mask, holes included."""
    contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    return contours


def _colour_bar(height: int) -> np.ndarray:
    """``(height, COLOUR_BAR_WIDTH, 3)`` viridis ramp, 1 at the top, 0 at the bottom."""
    ramp = _viridis(np.linspace(1, 0, height, dtype=np.float32)[:, None])
    return np.repeat(ramp, COLOUR_BAR_WIDTH, axis=1)


def _draw_bar_ticks(img: np.ndarray, bar: Box, threshold: float | None) -> None:
    """Ticks and labels 0, 0.5, 1 right of the bar; the threshold as an arrow head left of it, its label in a
    second column on the right, so it never covers a tick label, however close it is to 0, 0.5 or 1."""
    y0, y1, x0, x1 = bar

    def row(value: float) -> int:
        return y0 + round((1 - value) * (y1 - 1 - y0))

    for value, label in ((0.0, "0"), (0.5, "0.5"), (1.0, "1")):
        y = row(value)
        cv2.line(img, (x1, y), (x1 + 4, y), TEXT_COLOUR, 1)
        _put_text(img, label, x1 + 8, y + 5)
    if threshold is not None:
        y = row(min(max(threshold, 0.0), 1.0))
        arrow_head = np.array([(x0 - 9, y - 5), (x0 - 9, y + 5), (x0 - 2, y)], np.int32)
        cv2.fillConvexPoly(img, arrow_head, TEXT_COLOUR, cv2.LINE_AA)
        _put_text(img, f"thr {threshold:.2f}", x1 + 40, y + 5)


def _header(width: int, lines: Sequence[str], legend: Sequence[tuple[Colour, str]] = ()) -> np.ndarray:
    """``(HEADER_HEIGHT, width, 3)`` band: white ``lines`` on dark, then ``legend`` (swatch, label) on the next
    text row; its last row a grey rule."""
    assert len(lines) + bool(legend) <= len(HEADER_BASELINES), "the header has two text rows"
    band = np.full((HEADER_HEIGHT, width, 3), HEADER_BACKGROUND, np.uint8)
    for text, baseline in zip(lines, HEADER_BASELINES, strict=False):
        _put_text(band, text, MARGIN, baseline)
    if legend:
        _draw_legend(band, legend, HEADER_BASELINES[len(lines)])
    band[-1] = HEADER_RULE
    return band


def _draw_legend(band: np.ndarray, legend: Sequence[tuple[Colour, str]], baseline: int) -> None:
    x = MARGIN
    for colour, label in legend:
        band[baseline - SWATCH_SIDE + 1 : baseline + 1, x : x + SWATCH_SIDE] = colour
        x += SWATCH_SIDE + 6
        _put_text(band, label, x, baseline)
        x += _text_width(label) + 18


def _header_width(lines: Sequence[str], legend: Sequence[tuple[Colour, str]] = ()) -> int:
    """The width the header's text needs, margins included."""
    legend_width = sum(SWATCH_SIDE + 6 + _text_width(label) + 18 for _, label in legend)
    return 2 * MARGIN + max([legend_width, *(_text_width(text) for text in lines)])


def _text_width(text: str) -> int:
    return cv2.getTextSize(text, FONT, FONT_SCALE, 1)[0][0]


def _put_text(img: np.ndarray, text: str, x: int, baseline: int) -> None:
    cv2.putText(img, text, (x, baseline), FONT, FONT_SCALE, TEXT_COLOUR, 1, cv2.LINE_AA)


def _write_png(path: Path, img: np.ndarray) -> None:
    """Encode in memory, write atomically: a full disk leaves no half-written image behind."""
    ok, data = cv2.imencode(".png", img)
    if not ok:
        raise OSError(f"{path}: could not encode preview")
    atomic_write_bytes(path, data.tobytes())
