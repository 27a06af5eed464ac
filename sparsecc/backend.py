"""The torch.compile entry: `torch.compile(model, backend="sparsecc", options={...})`."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import fx

from sparsecc.errors import OptionError
from sparsecc.pipeline import run_pipeline
from sparsecc.runtime.compiled import CompiledGraph
from sparsecc.settings import Settings


def sparsecc_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None = None,
                     mode: str | None = None) -> CompiledGraph:
    """Dynamo backend. Options are parsed into one frozen Settings; a bad option raises OptionError
    (dynamo reports it as BackendCompilerFailed with the OptionError as `inner_exception`)."""
    if mode is not None:
        raise OptionError(f"torch.compile(mode={mode!r}) is an Inductor setting; sparsecc takes options={{...}}")
    settings = options if isinstance(options, Settings) else Settings.from_options(options)
    if settings.target != "host":
        raise OptionError(f"option target={settings.target!r}: torch.compile runs kernels on this machine, so its "
                          "target is 'host'; build for other machines with sparsecc.export or `sparsecc build`")
    return CompiledGraph(gm, example_inputs, settings, run_pipeline)
