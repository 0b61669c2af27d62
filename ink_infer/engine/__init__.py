"""The window loop: pure tiling maths, the slab reader, batches on a device, exact stitching, tuning and compiling."""
