"""Runtime: the callables that compiled graphs become."""

from sparsecc.runtime.compiled import CompiledGraph, compiled_graphs

__all__ = ["CompiledGraph", "compiled_graphs"]
