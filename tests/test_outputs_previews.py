"""The preview PNGs, read back: header band, absolute viridis probabilities, outside-mask grey, mask outline,
colour bar, tiny and empty fragments; the truth preview's legend and its pixel-exact body. No models: seconds."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from ink_infer.outputs.previews import (
    CANVAS_BACKGROUND,
    HEADER_BACKGROUND,
    HEADER_HEIGHT,
    MARGIN,
    OUTLINE_COLOUR,
    OUTSIDE_MASK_COLOUR,
    PREVIEW_MAX_SIDE,
    PREVIEW_MIN_SIDE,
    SWATCH_SIDE,
    TRUTH_COLOURS,
    body_of,
    preview_layout,
    write_preview,
    write_truth_preview,
)

VIRIDIS = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_VIRIDIS)[:, 0].astype(int)
BORDER = 20  # mask pixels False around the synthetic fragments
THRESHOLD = 0.7


def viridis_index(pixels: np.ndarray) -> np.ndarray:
    """Index of the viridis entry each BGR pixel equals, -1 where none does."""
    hits = (pixels[..., None, :].astype(int) == VIRIDIS).all(-1)
    return np.where(hits.any(-1), hits.argmax(-1), -1)


def ramp_fragment(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """prob rising as the square of x (a percentile stretch would move every value but 0 and 1), a mask with a
    False border, ink above THRESHOLD."""
    h, w = shape
    prob = np.broadcast_to((np.arange(w, dtype=np.float32) / (w - 1)) ** 2, shape).copy()
    mask = np.zeros(shape, bool)
    mask[BORDER:-BORDER, BORDER:-BORDER] = True
    return prob, (prob > THRESHOLD) & mask, mask


def preview(tmp_path: Path, prob, ink, mask, **kwargs) -> np.ndarray:
    path = tmp_path / "preview.png"
    write_preview(path, prob, ink, mask, **kwargs)
    img = cv2.imread(str(path))
    assert img is not None
    return img


def crop(img: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    y0, y1, x0, x1 = box
    return img[y0:y1, x0:x1]


def is_colour(pixels: np.ndarray, colour) -> np.ndarray:
    return (pixels == np.array(colour, np.uint8)).all(-1)


def bright(pixels: np.ndarray) -> np.ndarray:
    return (pixels >= 200).all(-1)


def assert_header_band(img: np.ndarray) -> None:
    """Dark band on top with white text on both of its rows of text, none of viridis' colours in it."""
    band = img[: HEADER_HEIGHT - 1]  # the last row is the rule under it
    assert is_colour(band, HEADER_BACKGROUND).mean() > 0.8
    assert bright(band[: HEADER_HEIGHT // 2]).sum() > 30 and bright(band[HEADER_HEIGHT // 2 :]).sum() > 30
    assert (viridis_index(band) < 0).all()
    below = img[HEADER_HEIGHT : HEADER_HEIGHT + 4]
    assert not is_colour(below, HEADER_BACKGROUND).any()


def test_outside_and_outline_colours_are_not_in_viridis() -> None:
    # else the checks below could not tell an outside pixel or the outline from a probability
    colours = np.array([OUTSIDE_MASK_COLOUR, OUTLINE_COLOUR, CANVAS_BACKGROUND, HEADER_BACKGROUND], np.uint8)
    assert (viridis_index(colours) < 0).all()


@pytest.mark.parametrize("shape", [(300, 500), (700, 2100)])
def test_preview_shows_absolute_probabilities_in_viridis(tmp_path: Path, shape: tuple[int, int]) -> None:
    prob, ink, mask = ramp_fragment(shape)
    img = preview(tmp_path, prob, ink, mask, fragment_id="20230509182749", threshold=THRESHOLD)
    layout = preview_layout(shape)
    assert img.shape[:2] == (layout.height, layout.width)
    assert_header_band(img)
    prob_panel, ink_panel = crop(img, layout.prob_panel), crop(img, layout.ink_panel)
    ph, pw = prob_panel.shape[:2]
    assert max(ph, pw) == min(max(shape), PREVIEW_MAX_SIDE)
    for share in (0.3, 0.6, 0.85):  # of the width, well inside the mask; p = 0.09, 0.36, 0.72
        px, py = round(share * pw), ph // 2
        x = (px + 0.5) / layout.scale - 0.5  # the fragment column at the panel pixel's centre
        p = (x / (shape[1] - 1)) ** 2
        got = prob_panel[py, px].astype(int)
        assert np.abs(got - VIRIDIS[round(p * 255)]).max() <= 3, (share, p, got)
        assert (ink_panel[py, px] == VIRIDIS[255 if p > THRESHOLD else 0]).all()


@pytest.mark.parametrize("shape", [(300, 500), (700, 2100)])
def test_outside_the_mask_is_grey_and_the_outline_follows_the_mask_border(
    tmp_path: Path, shape: tuple[int, int]
) -> None:
    prob, ink, mask = ramp_fragment(shape)
    img = preview(tmp_path, prob, ink, mask, threshold=THRESHOLD)
    layout = preview_layout(shape)
    inset = round(BORDER * layout.scale)  # the mask's border on the panel
    for box in (layout.prob_panel, layout.ink_panel):
        panel = crop(img, box)
        ph, pw = panel.shape[:2]
        outside = np.ones((ph, pw), bool)
        outside[inset:-inset, inset:-inset] = False
        assert is_colour(panel[outside], OUTSIDE_MASK_COLOUR).all()
        outline = is_colour(panel, OUTLINE_COLOUR)
        edge = np.zeros((ph, pw), bool)  # the panel mask's outermost pixels
        edge[inset : ph - inset, inset : pw - inset] = True
        edge[inset + 1 : ph - inset - 1, inset + 1 : pw - inset - 1] = False
        assert (outline == edge).all()


def test_colour_bar_is_the_viridis_ramp_from_1_at_the_top_to_0(tmp_path: Path) -> None:
    prob, ink, mask = ramp_fragment((300, 500))
    img = preview(tmp_path, prob, ink, mask, threshold=THRESHOLD)
    bar = crop(img, preview_layout(prob.shape).colour_bar)
    assert (bar == bar[:, :1]).all()  # every column the same
    index = viridis_index(bar[:, 0])
    assert (index >= 0).all(), "a bar pixel that is no viridis colour"
    assert index[0] == 255 and index[-1] == 0
    steps = -np.diff(index)
    assert (steps >= 0).all() and steps.max() <= 2  # monotonic, no entry skipped by much
    assert len(np.unique(index)) > 200


def test_tiny_fragment_is_enlarged_in_pixel_blocks_under_a_header_that_fits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    prob = rng.random((64, 64), dtype=np.float32)
    mask = np.ones((64, 64), bool)
    img = preview(tmp_path, prob, prob > 0.8, mask, fragment_id="tiny", threshold=None)
    layout = preview_layout(prob.shape)
    assert_header_band(img)
    text_columns = np.flatnonzero(bright(img[: HEADER_HEIGHT - 1]).any(0))
    assert text_columns.max() < img.shape[1] - MARGIN // 2  # the text ends inside the picture
    panel = crop(img, layout.prob_panel)
    block = PREVIEW_MIN_SIDE // 64
    assert panel.shape[:2] == (PREVIEW_MIN_SIDE, PREVIEW_MIN_SIDE)
    # one pixel from each block's centre, leaving out the rim, where the outline runs
    centres = panel[block // 2 :: block, block // 2 :: block][1:-1, 1:-1]
    expected = VIRIDIS[np.rint(prob * 255).astype(int)][1:-1, 1:-1]
    assert (centres == expected).all()


def test_long_fragment_id_widens_the_canvas_to_the_right(tmp_path: Path) -> None:
    prob, ink, mask = ramp_fragment((300, 500))
    img = preview(tmp_path, prob, ink, mask, fragment_id="x" * 200, threshold=THRESHOLD)
    layout = preview_layout(prob.shape)
    assert img.shape[1] > layout.width
    text_columns = np.flatnonzero(bright(img[: HEADER_HEIGHT - 1]).any(0))
    assert text_columns.max() < img.shape[1] - MARGIN // 2
    assert viridis_index(crop(img, layout.colour_bar)[:, 0])[0] == 255  # the boxes did not move


def test_empty_mask_and_no_threshold(tmp_path: Path) -> None:
    shape = (120, 300)
    empty = np.zeros(shape, bool)
    img = preview(tmp_path, np.zeros(shape, np.float32), empty, empty, fragment_id="e", threshold=None)
    layout = preview_layout(shape)
    assert_header_band(img)
    for box in (layout.prob_panel, layout.ink_panel):
        assert is_colour(crop(img, box), OUTSIDE_MASK_COLOUR).all()


def truth_case(shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones(shape, bool)
    mask[: shape[0] // 10] = False
    return (rng.random(shape) < 0.3) & mask, (rng.random(shape) < 0.3) & mask, mask


def test_truth_colours_are_distinct_and_not_black() -> None:
    colours = list(TRUTH_COLOURS.values())
    assert len(set(colours)) == 4 and (0, 0, 0) not in colours
    assert set(TRUTH_COLOURS) == {"hit", "false", "missed", "papyrus"}


@pytest.mark.parametrize("shape", [(120, 160), (200, 900)])  # narrower than the header (padded), wider
def test_truth_preview_has_a_legend_and_a_pixel_exact_body(tmp_path: Path, shape: tuple[int, int]) -> None:
    ink, truth, mask = truth_case(shape, sum(shape))
    path = tmp_path / "truth.png"
    write_truth_preview(path, ink, truth, mask, fragment_id="a", f05=0.5)
    img = cv2.imread(str(path))
    h, w = shape
    assert img.shape[0] == HEADER_HEIGHT + h and img.shape[1] >= w
    header = img[: HEADER_HEIGHT - 1]
    assert is_colour(header, HEADER_BACKGROUND).mean() > 0.7 and bright(header).sum() > 30
    for name, colour in TRUTH_COLOURS.items():
        assert is_colour(header, colour).sum() >= SWATCH_SIDE**2, f"no {name} swatch in the legend"
    body = body_of(img)
    expected = np.zeros((h, w, 3), np.uint8)
    classes = {
        "hit": ink & truth,
        "false": ink & ~truth,
        "missed": ~ink & truth,
        "papyrus": mask & ~ink & ~truth,
    }
    for name, where in classes.items():
        expected[where] = TRUTH_COLOURS[name]
        assert is_colour(body, TRUTH_COLOURS[name]).sum() == where.sum()
    assert (body[:, :w] == expected).all()
    assert (body[:, w:] == 0).all()  # the widening is black, like outside the mask
