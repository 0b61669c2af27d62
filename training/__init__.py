"""The pieces of ``train.py`` (beside this package, outside the ink_infer wheel): ``data`` (regions, folds, block
stores, windows), ``augment``, ``objective`` (labels, loss, threshold), ``validate`` (stitched F0.5) and ``state``
(trainer, optimiser, schedule, checkpoints, export). train.py itself is the CLI and the epoch loop."""
