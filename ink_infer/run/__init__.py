"""A run: its plan of units and their partials, the story (pipeline), model runs, executors (one process, workers, ranks, parts), budget, preflight checks, runtime, stop requests."""
