"""Pruning weights that arrive dense, within a budget (the `prune` option): calibration statistics (layers.py),
sensitivity curves and the allocation of the budget over the layers (allocation.py), the methods (methods.py:
magnitude, Wanda, SparseGPT-style) and their patterns (patterns.py); pruner.py runs them for the prune stage.

Kept free of imports here: settings.py checks patterns through this package, and must not load what the pruner
reaches (the cost model's calibration, which loads TVM)."""
