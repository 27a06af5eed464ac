"""Python API beyond the torch.compile backend."""

from __future__ import annotations

import functools
import logging
from importlib.metadata import entry_points
from typing import Any, Mapping

import torch

from sparsecc.capture import SOURCE_LAYOUT_ATTR
from sparsecc.settings import Settings

log = logging.getLogger(__name__)


def compile(model: torch.nn.Module, options: Mapping[str, Any] | None = None, **compile_kwargs: Any):
    """`torch.compile(model, backend="sparsecc", options=options)`, with two additions: options are checked
    now rather than at the first call, and weights held in a torch.sparse layout (which dynamo cannot
    trace) are replaced on `model` by dense parameters with the same values, marked so that analysis
    reports the layout they came in."""
    from sparsecc.backend import sparsecc_backend

    settings = Settings.from_options(options)
    densify_sparse_weights(model)
    backend = functools.partial(sparsecc_backend, options=settings)
    functools.update_wrapper(backend, sparsecc_backend)
    return torch.compile(model, backend=backend, **compile_kwargs)


def densify_sparse_weights(model: torch.nn.Module) -> int:
    count = 0
    for module_name, module in model.named_modules():
        for table in (module._parameters, module._buffers):
            for name, value in list(table.items()):
                if value is None or value.layout == torch.strided:
                    continue
                dense = value.to_dense()
                if isinstance(value, torch.nn.Parameter):
                    dense = torch.nn.Parameter(dense, requires_grad=value.requires_grad)
                setattr(dense, SOURCE_LAYOUT_ATTR, str(value.layout).removeprefix("torch."))
                table[name] = dense
                count += 1
                log.info("sparsecc: %s.%s held as %s; replaced by a dense tensor for tracing",
                         module_name or "model", name, value.layout)
    return count


def register_backend() -> None:
    """Make backend="sparsecc" known to torch.compile. Installed packages need not call this: dynamo finds
    the `torch_dynamo_backends` entry point by itself. Idempotent."""
    from torch._dynamo import list_backends
    from torch._dynamo import register_backend as dynamo_register

    from sparsecc.backend import sparsecc_backend

    if "sparsecc" in list_backends(exclude_tags=()):
        return
    dynamo_register(sparsecc_backend, name="sparsecc")


def _installed_as_entry_point() -> bool:
    return "sparsecc" in entry_points(group="torch_dynamo_backends").names
