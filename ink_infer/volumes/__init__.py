"""Everything behind ``read_band``: discovery of fragments and segments, TIFF stacks, zarr stores, rotated views, masks."""
