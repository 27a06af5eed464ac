"""Exception classes. Each message says what went wrong, where (stage, node, op, option) and what to do."""

from __future__ import annotations


class SparseccError(Exception):
    """Base class of every error sparsecc raises on purpose."""


class OptionError(SparseccError, ValueError):
    """An option passed to sparsecc is unknown or has the wrong type or value."""


class UnsupportedError(SparseccError):
    """A graph, op or tensor that sparsecc cannot handle (it falls back to PyTorch unless told to raise)."""


class StageError(SparseccError):
    """A pipeline stage failed. Carries the stage name and, where known, the FX node and op."""

    def __init__(self, stage: str, message: str, node: str | None = None, op: str | None = None):
        self.stage, self.node, self.op = stage, node, op
        where = f"stage '{stage}'"
        if node is not None:
            where += f", node '{node}'"
        if op is not None:
            where += f" ({op})"
        super().__init__(f"sparsecc {where}: {message}")


class WeightChangedError(SparseccError):
    """A weight was changed after compiling and the settings say not to recompile."""


class SparseccFallbackWarning(UserWarning):
    """sparsecc could not compile a graph and runs it in plain PyTorch instead."""


class ArtifactError(SparseccError):
    """An artifact directory is missing, incomplete, corrupt, from another format version, or built for a
    machine this is not."""


class InputError(SparseccError, ValueError):
    """A compiled artifact was called with inputs that differ from the ones it was built for."""
