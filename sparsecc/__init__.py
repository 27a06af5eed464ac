"""sparsecc: a PyTorch compiler for sparse models.

    torch.compile(model, backend="sparsecc", options={...})     # after `pip install sparsecc`
    sparsecc.compile(model, options={...})                       # same, plus torch.sparse weights
    sparsecc.export(model, example_inputs, "artifact/", **options)  # ahead of time, for another process
    model = sparsecc.load("artifact/")
"""

from sparsecc import ops  # noqa: F401  (registers the sparsecc:: custom ops)
from sparsecc.api import _installed_as_entry_point, compile, densify_sparse_weights, register_backend
from sparsecc.artifact import LoadedModel, export, load, plan_program
from sparsecc.errors import (
    ArtifactError,
    InputError,
    OptionError,
    SparseccError,
    SparseccFallbackWarning,
    StageError,
    UnsupportedError,
    WeightChangedError,
)
from sparsecc.formats import FormatChoice, SparseFormat, SparsePlan, WeightSparsity
from sparsecc.runtime.compiled import CompiledGraph, compiled_graphs
from sparsecc.settings import Settings

__version__ = "0.1.0"

# Installed, dynamo finds the backend through the entry point and imports this package itself; registering
# here too would make dynamo's own registration fail as a duplicate. From a source tree, register now.
if not _installed_as_entry_point():
    register_backend()

__all__ = [
    "ArtifactError", "InputError", "LoadedModel", "export", "load", "plan_program",
    "CompiledGraph", "FormatChoice", "OptionError", "Settings", "SparseFormat", "SparsePlan", "SparseccError",
    "SparseccFallbackWarning", "StageError", "UnsupportedError", "WeightChangedError", "WeightSparsity",
    "compile", "compiled_graphs", "densify_sparse_weights", "register_backend",
]
