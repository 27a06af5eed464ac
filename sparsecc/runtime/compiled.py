"""What the backend hands back to dynamo: a callable that specialises per input signature and never
serves results computed from stale weights.

Under torch.compile, parameters are graph inputs that dynamo does not guard. sparsecc bakes their
values into kernels, so each call compares every weight's data pointer and version counter with those
seen at compile time (in-place edits, `.data =` and `load_state_dict` all change one of them).
"""

from __future__ import annotations

import logging
import warnings
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import fx

from sparsecc.capture import is_weight
from sparsecc.errors import SparseccError, SparseccFallbackWarning, WeightChangedError
from sparsecc.runtime.dense_graph import fastest_dense
from sparsecc.settings import Settings

log = logging.getLogger(__name__)

_LIVE: "weakref.WeakSet[CompiledGraph]" = weakref.WeakSet()


def compiled_graphs() -> list["CompiledGraph"]:
    """Every CompiledGraph alive in this process, oldest first (for reports and tests)."""
    return sorted(_LIVE, key=lambda g: g.serial)


def _signature(args: Sequence[Any], weight_pos: frozenset[int]) -> tuple:
    sig = []
    for i, a in enumerate(args):
        if i in weight_pos:
            continue
        if isinstance(a, torch.Tensor):
            sig.append((tuple(a.shape), a.dtype, a.device.type))
        else:
            sig.append((type(a).__name__, a))
    return tuple(sig)


def _weight_snapshot(args: Sequence[Any], weight_pos: Sequence[int]) -> tuple:
    return tuple((args[i].data_ptr(), args[i]._version) for i in weight_pos)


class CompiledGraph:
    _serial = 0

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], settings: Settings,
                 compile_variant: Callable[[fx.GraphModule, Sequence[Any], Settings], Any]):
        self.gm = gm
        self.settings = settings
        self._compile_variant = compile_variant
        self._weight_pos = tuple(i for i, v in enumerate(example_inputs) if is_weight(v))
        self._weight_set = frozenset(self._weight_pos)
        self._weights = _weight_snapshot(example_inputs, self._weight_pos)
        self._variants: dict[tuple, Callable[[Sequence[Any]], Any]] = {}
        self.states: list[Any] = []  # PipelineState of each live compiled variant, newest last
        self.compiles = 0
        self.fallbacks = 0
        CompiledGraph._serial += 1
        self.serial = CompiledGraph._serial
        _LIVE.add(self)
        concrete = not any(
            isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in v.shape))
            for v in example_inputs
        )
        if concrete:  # dynamic graphs are compiled at their first call, with concrete inputs
            self._variant_for(example_inputs)

    @property
    def state(self) -> Any:
        return self.states[-1] if self.states else None

    def __call__(self, *args: Any) -> Any:
        if _weight_snapshot(args, self._weight_pos) != self._weights:
            self._on_weight_change(args)
        return self._variant_for(args)(args)

    def _variant_for(self, args: Sequence[Any]) -> Callable[[Sequence[Any]], Any]:
        sig = _signature(args, self._weight_set)
        variant = self._variants.get(sig)
        if variant is None:
            variant = self._variants[sig] = self._compile(args)
        return variant

    def _compile(self, args: Sequence[Any]) -> Callable[[Sequence[Any]], Any]:
        self.compiles += 1
        if torch.is_grad_enabled() and any(args[i].requires_grad for i in self._weight_pos):
            warnings.warn("sparsecc compiles for inference: outputs of this graph do not track gradients. "
                          "Run the model under torch.no_grad() or torch.inference_mode().", stacklevel=3)
        if self.compiles > 1:
            log.info("sparsecc: compiling graph %d again for new input shapes or weights", self.serial)
        try:
            state = self._compile_variant(self.gm, args, self.settings)
        except SparseccError as exc:
            if self.settings.on_failure == "raise":
                raise
            self.fallbacks += 1
            warnings.warn(f"{exc}. Running this graph in plain PyTorch instead "
                          "(options={'on_failure': 'raise'} raises instead).", SparseccFallbackWarning,
                          stacklevel=3)
            return lambda a: self.gm(*a)
        self.states.append(state)
        if state.vm is None and state.completed[-1] == "build":
            state.dense_backend, run = fastest_dense(self.gm, args, state.run, self.settings.dense_backend)
            return run
        return state.run

    def _on_weight_change(self, args: Sequence[Any]) -> None:
        if self.settings.on_weight_change == "raise":
            raise WeightChangedError(
                "a weight of a sparsecc-compiled graph changed after compiling; call torch.compile again, or "
                "pass options={'on_weight_change': 'recompile'}"
            )
        log.info("sparsecc: weights of graph %d changed after compiling; recompiling", self.serial)
        self._variants.clear()
        self.states.clear()  # their kernels hold the old weights
        self._weights = _weight_snapshot(args, self._weight_pos)

    def report(self) -> str:
        from sparsecc.report import plan_table

        if self.state is None or self.state.plan is None:
            return "sparsecc: this graph was not compiled (see the fallback warning)"
        return plan_table(self.state.plan)
