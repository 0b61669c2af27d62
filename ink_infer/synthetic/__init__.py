"""Synthetic fragments and segments with known ink: the demo, tests and benchmarks."""
