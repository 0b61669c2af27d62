"""(split from config.py)"""

from __future__ import annotations

N_SLICES = 65  # surface volumes hold slices 00.tif .. 64.tif


BLOCK = 32  # the reference cuts fragments into 32 x 32 blocks; window origins and strides live on this grid


ARCHS = ("2.5d", "csn3d", "timesformer")


# Window-origin rows per streamed band at most: a power of two, so a multiple of every band's rows
# (``stream.rows_per_band_for``); ``plan.split_rows`` cuts fragments at its multiples.
MAX_ROWS_PER_BAND = 16


# A fragment with more pixels is "large": its units are row ranges of at most this many pixels (``plan.split_rows``),
# their sums go through the partials on disk, and its ensemble map lives in a file (``raster.py``). 256 MiB as
# float32: Kaggle's fragments 1 and 3 stay whole and in memory; fragment 2 (141 M px) and scroll segments do not.
LARGE_PIXELS = 2**26


# The reference models' widths, and which arch each optional width key belongs to.
WIDTH_DEFAULTS = {"dim": 512, "base_channels": 64, "head_dim": 512}


WIDTH_ARCH = {"dim": "2.5d", "base_channels": "csn3d", "head_dim": "csn3d"}

# Fixed point of the sums (engine.stitch): a probability p is summed as round(p * FIXED_SCALE), float32's own
# resolution at 1, so sums are exact integers whatever order windows, ranges and devices add them in.
FIXED_SCALE = 2**24

# Manifest fields a timesformer entry may leave out: the Grand Prize model's layers 17..42 (26 frames, each its
# own channel group) and its 64-px windows (its image_size; the only size it takes).
ARCH_DEFAULTS = {"timesformer": {"z_range": (17, 43), "in_chans": 26, "tile": 64}}

# A timesformer entry's optional fields that pick villa's variants of the GP script by name (models.gp_family):
# which windows are kept, the blending weight, what the count adds. Their absence is the GP script.
GP_CHOICES = {"windows": ("inside", "any"), "blend": ("gp", "hann", "gaussian"), "count": ("ones", "weights")}
GP_VARIANT_KEYS = ("stride", "divisor", *GP_CHOICES, "sigma")
