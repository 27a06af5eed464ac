"""The calibration inputs of the `prune` option, checked against the graph's example inputs.

A compiled graph has static shapes, so every calibration batch must have the example inputs' shapes and dtypes
(pad or split the data to that batch size and length). Accepted forms:
- None: the example inputs themselves, with a warning (a handful of real inputs calibrates much better);
- an iterable of batches, each a tensor (graphs of one input), a tuple / list of tensors in input order, or a
  dict from input name to tensor;
- a safetensors file or a dict of tensors keyed by input name (or "input_<i>"), each holding any number of
  example-sized batches stacked along dimension 0, which are split off in order.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Iterable, Mapping, Sequence

import torch

from sparsecc.errors import InputError

log = logging.getLogger(__name__)


def calibration_batches(calibration: Any, example: Sequence[Any], names: Sequence[str]) -> list[tuple[Any, ...]]:
    """The calibration batches as tuples in the graph's input order, each checked against `example`."""
    if calibration is None:
        warnings.warn("sparsecc prune: calibrating on the example inputs alone; pass a few real batches as "
                      "prune={'calibration': ...} for a better-informed pruning", stacklevel=2)
        return [tuple(example)]
    if isinstance(calibration, (str, os.PathLike)):
        calibration = _read_file(os.fspath(calibration))
    if isinstance(calibration, Mapping) and all(isinstance(v, torch.Tensor) for v in calibration.values()):
        batches = _split_stacked(calibration, example, names)
    elif isinstance(calibration, torch.Tensor):
        batches = [_as_tuple(calibration, 0, example, names)]
    elif isinstance(calibration, Iterable):
        batches = [_as_tuple(batch, i, example, names) for i, batch in enumerate(calibration)]
    else:
        raise InputError(f"prune: calibration must be batches of the model's inputs (an iterable, a dict of stacked "
                         f"tensors or a safetensors file); got {type(calibration).__name__}")
    if not batches:
        raise InputError("prune: the calibration inputs are empty; pass at least one batch")
    for i, batch in enumerate(batches):
        _check(batch, i, example, names)
    return batches


def _read_file(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise InputError(f"prune: calibration file {path} does not exist")
    try:
        return load_file(path)
    except Exception as exc:
        raise InputError(f"prune: cannot read calibration file {path} as safetensors ({exc})") from None


def _key_of(position: int, names: Sequence[str], given: Mapping[str, Any]) -> str:
    for key in (names[position], f"input_{position}", str(position)):
        if key in given:
            return key
    raise InputError(f"prune: calibration has no tensor for input '{names[position]}' (keys: "
                     f"{', '.join(sorted(given))}); key each input by its name or 'input_<position>'")


def _split_stacked(stacked: Mapping[str, torch.Tensor], example: Sequence[Any], names: Sequence[str]) -> list[tuple]:
    columns = []
    counts = set()
    for position, ex in enumerate(example):
        if not isinstance(ex, torch.Tensor):
            raise InputError(f"prune: input '{names[position]}' is not a tensor; pass calibration as a list of batches")
        tensor = stacked[_key_of(position, names, stacked)]
        size = ex.shape[0] if ex.dim() else 1
        if tensor.dim() != ex.dim() or tensor.shape[1:] != ex.shape[1:] or tensor.shape[0] % size:
            raise InputError(f"prune: calibration tensor for input '{names[position]}' has shape "
                             f"{tuple(tensor.shape)}; it must stack batches of the example's shape {tuple(ex.shape)} "
                             f"along dimension 0 (a multiple of {size} rows)")
        columns.append(tensor.split(size))
        counts.add(len(columns[-1]))
    if len(counts) > 1:
        raise InputError(f"prune: the calibration tensors hold different numbers of batches ({sorted(counts)})")
    return [tuple(col[i] for col in columns) for i in range(counts.pop() if counts else 0)]


def _as_tuple(batch: Any, index: int, example: Sequence[Any], names: Sequence[str]) -> tuple:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, Mapping):
        return tuple(batch[_key_of(p, names, batch)] for p in range(len(example)))
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    raise InputError(f"prune: calibration batch {index} is a {type(batch).__name__}; each batch must be a tensor, "
                     "a tuple of tensors in input order, or a dict from input name to tensor")


def _check(batch: tuple, index: int, example: Sequence[Any], names: Sequence[str]) -> None:
    if len(batch) != len(example):
        raise InputError(f"prune: calibration batch {index} has {len(batch)} inputs; the graph takes {len(example)} "
                         f"({', '.join(names)})")
    for position, (got, want) in enumerate(zip(batch, example)):
        if not isinstance(want, torch.Tensor):
            continue
        if not isinstance(got, torch.Tensor):
            raise InputError(f"prune: calibration batch {index}, input '{names[position]}': expected a tensor, "
                             f"got {type(got).__name__}")
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise InputError(f"prune: calibration batch {index}, input '{names[position]}' is {got.dtype} "
                             f"{tuple(got.shape)}; the graph was compiled for {want.dtype} {tuple(want.shape)}. Pad "
                             "or split calibration data to the example inputs' shape and dtype")
