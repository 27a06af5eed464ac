"""What the backend hands back to dynamo: a callable that specialises per input signature and never
serves results computed from stale weights.

Under torch.compile, parameters are graph inputs that dynamo does not guard. sparsecc bakes their
values into kernels, so each call compares every weight's data pointer and version counter with those
seen at compile time (in-place edits, `.data =` and `load_state_dict` all change one of them).

Two instances of one model class share dynamo's graph, each passing its own parameters. The weight tensors'
identities tell them apart: each instance (a "weight set") keeps its own compiled variants, so calling them in
turn compiles each once instead of recompiling on every switch (about 5 s a call for two BERT-base copies). A
set is released when one of its weights is freed, and the least recently used one when more than
MAX_WEIGHT_SETS are alive.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import warnings
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import fx

from sparsecc.capture import is_weight
from sparsecc.errors import InputError, SparseccError, SparseccFallbackWarning, WeightChangedError
from sparsecc.runtime.dense_graph import fastest_dense
from sparsecc.settings import Settings

log = logging.getLogger(__name__)

_LIVE: "weakref.WeakSet[CompiledGraph]" = weakref.WeakSet()

# Weight sets (model instances sharing one graph) whose compiled variants a graph keeps at once; each holds its
# own packed weights and kernels. Like dynamo's recompile limit, it bounds memory when instances keep coming.
MAX_WEIGHT_SETS = 8


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


# With the `prune` option: id of a user's weight tensor -> (a weak reference to it, the prune settings, its version,
# its pruned value), from the first graph or input shape that pruned it. Other shapes (new variants, or the dynamic
# graph dynamo makes for the second shape) compile and fall back with these values, so a model is pruned once, not
# once per shape. By id: tensors compare element-wise, which a WeakKeyDictionary would call.
_PRUNED: dict[int, tuple[weakref.ref, Any, int, torch.Tensor]] = {}


def _remember_pruned(weight: torch.Tensor, prune: Any, value: torch.Tensor) -> None:
    key = id(weight)
    # A parameter, as the weight it stands for: capture binds parameters as constants, where analysis sees them.
    value = torch.nn.Parameter(value.detach(), requires_grad=False)
    _PRUNED[key] = (weakref.ref(weight, lambda _: _PRUNED.pop(key, None)), prune, weight._version, value)


def _pruned_before(prune: Any, args: Sequence[Any], weight_pos: Sequence[int]) -> dict[int, torch.Tensor]:
    found = {}
    for i in weight_pos:
        entry = _PRUNED.get(id(args[i]))
        if entry is not None and entry[0]() is args[i] and entry[1] == prune and entry[2] == args[i]._version:
            found[i] = entry[3]
    return found


def _with(values: dict[int, torch.Tensor], args: Sequence[Any]) -> list[Any]:
    return [values.get(i, a) for i, a in enumerate(args)]


def _weight_snapshot(args: Sequence[Any], weight_pos: Sequence[int]) -> tuple:
    return tuple((args[i].data_ptr(), args[i]._version) for i in weight_pos)


@dataclasses.dataclass
class _WeightSet:
    """One instance's weights as last compiled, and the variants compiled for them (by input signature)."""

    snapshot: tuple
    variants: dict[tuple, Callable[[Sequence[Any]], Any]] = dataclasses.field(default_factory=dict)
    states: list[Any] = dataclasses.field(default_factory=list)
    watches: list[weakref.ref] = dataclasses.field(default_factory=list)  # a callback when a weight is freed


class CompiledGraph:
    _serial = 0

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], settings: Settings,
                 compile_variant: Callable[[fx.GraphModule, Sequence[Any], Settings], Any]):
        self.gm = gm
        self.settings = settings
        self._compile_variant = compile_variant
        self._weight_pos = tuple(i for i, v in enumerate(example_inputs) if is_weight(v))
        self._weight_set = frozenset(self._weight_pos)
        # By the identities of the weight tensors, least recently used first.
        self._weight_sets: collections.OrderedDict[tuple[int, ...], _WeightSet] = collections.OrderedDict()
        self.compiles = 0
        self.fallbacks = 0
        self._lock = threading.RLock()
        CompiledGraph._serial += 1
        self.serial = CompiledGraph._serial
        _LIVE.add(self)
        # A graph dynamo captured with concrete shapes only ever sees inputs its guards matched to them, so its
        # calls skip the per-call input signature (a few us of a one-Linear call of ~150 us).
        self._concrete = not any(
            isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in v.shape))
            for v in example_inputs
        )
        if self._concrete:  # dynamic graphs are compiled at their first call, with concrete inputs
            self._variant_for(example_inputs)

    @property
    def states(self) -> list[Any]:
        """PipelineResult of each live compiled variant: by weight set, least recently used first, then by age."""
        return [state for weights in self._weight_sets.values() for state in weights.states]

    @property
    def state(self) -> Any:
        """The newest variant of the most recently used weight set."""
        states = self.states
        return states[-1] if states else None

    def __call__(self, *args: Any) -> Any:
        return self._variant_for(args)(args)

    def _variant_for(self, args: Sequence[Any]) -> Callable[[Sequence[Any]], Any]:
        # One thread at a time looks up, compiles or releases variants: two threads calling after a weight edit
        # compile once, and neither runs a variant the other is dropping. The variant itself runs unlocked.
        with self._lock:
            weights = self._weights_of(args)
            sig = () if self._concrete else _signature(args, self._weight_set)
            variant = weights.variants.get(sig)
            if variant is None:
                variant = weights.variants[sig] = self._compile(args, weights, sig)
            return variant

    def _weights_of(self, args: Sequence[Any]) -> _WeightSet:
        """The weight set `args` belong to, its variants dropped if a weight changed since they were compiled."""
        key = tuple(id(args[i]) for i in self._weight_pos)
        snapshot = _weight_snapshot(args, self._weight_pos)
        weights = self._weight_sets.get(key)
        if weights is None:
            return self._add_weight_set(key, snapshot, args)
        self._weight_sets.move_to_end(key)
        if weights.snapshot != snapshot:
            self._on_weight_change(weights, snapshot)
        return weights

    def _add_weight_set(self, key: tuple[int, ...], snapshot: tuple, args: Sequence[Any]) -> _WeightSet:
        if len(self._weight_sets) >= MAX_WEIGHT_SETS:
            old_key, _ = next(iter(self._weight_sets.items()))
            log.warning("sparsecc: graph %d runs with more than %d sets of weights (model instances) in turn; "
                        "releasing the kernels of the least recently used one, which compiles again at its next "
                        "call", self.serial, MAX_WEIGHT_SETS)
            self._drop_weight_set(old_key)
        if self._weight_sets:
            log.info("sparsecc: graph %d called with another model instance's weights; compiling for them too",
                     self.serial)
        weights = self._weight_sets[key] = _WeightSet(snapshot)
        graph = weakref.ref(self)

        def freed(_: weakref.ref) -> None:
            if (g := graph()) is not None:
                g._drop_weight_set(key)

        weights.watches = [weakref.ref(args[i], freed) for i in self._weight_pos]
        return weights

    def _drop_weight_set(self, key: tuple[int, ...]) -> None:
        self._weight_sets.pop(key, None)  # its variants, kernels and packed weights go with it

    def _release(self, weights: _WeightSet) -> None:
        """Forget `weights`' variants, so their kernels and packed weights can be freed."""
        weights.variants.clear()
        weights.states.clear()

    def _compile(self, args: Sequence[Any], weights: _WeightSet, sig: tuple) -> Callable[[Sequence[Any]], Any]:
        self.compiles += 1
        if torch.is_grad_enabled() and any(args[i].requires_grad for i in self._weight_pos):
            warnings.warn("sparsecc compiles for inference: outputs of this graph do not track gradients. "
                          "Run the model under torch.no_grad() or torch.inference_mode().", stacklevel=3)
        if self.compiles > 1:
            log.info("sparsecc: compiling graph %d again for new input shapes or weights", self.serial)
        # Compiling runs the graph (tracing, verifying, timing): on copies, so that a graph which writes into its
        # inputs writes into the caller's tensors once, at the call itself.
        args = self._private_inputs(args)
        settings = self.settings
        pruned = _pruned_before(settings.prune, args, self._weight_pos) if settings.prune is not None else {}
        if pruned:  # pruned by an earlier graph or shape: these shapes compile the pruned weights as they are
            settings, args = dataclasses.replace(settings, prune=None), _with(pruned, args)
        try:
            state = self._compile_variant(self.gm, args, settings)
        except InputError:
            raise  # the user's data (calibration inputs) is wrong: running dense would hide it
        except SparseccError as exc:
            if self.settings.on_failure == "raise":
                raise
            self.fallbacks += 1
            warnings.warn(f"{exc}. Running this graph in plain PyTorch instead "
                          "(options={'on_failure': 'raise'} raises instead).", SparseccFallbackWarning,
                          stacklevel=3)
            return self._pytorch_with(pruned)
        run = state.run
        fallback = self._pytorch_with(pruned)
        if state.reference is not None:
            # Pruned: PyTorch runs the pruned graph, so a fallback never changes the answers mid-stream.
            def fallback(call_args: Sequence[Any], reference=state.reference, state=state) -> Any:
                return reference(*state.runtime_inputs(call_args))

            for i, name in state.captured.weight_names.items():
                if name in (state.pruned_weights or {}):
                    _remember_pruned(args[i], self.settings.prune, state.pruned_weights[name])
        elif state.vm is None and state.completed[-1] == "build":
            backend, dense = fastest_dense(self.gm, args, state.run, self.settings.dense_backend)
            run = dense if not pruned else (lambda call_args, dense=dense: dense(_with(pruned, call_args)))
            state = dataclasses.replace(state, dense_backend=backend)
        weights.states.append(state)
        if self.settings.prune is not None and self.settings.prune.inplace and not pruned:
            weights.snapshot = _weight_snapshot(args, self._weight_pos)  # the pruned values written back
        if state.captured is not None and state.captured.writes_inputs:
            return run  # a failed call may have written part of an input: running it again is not safe
        return self._guarded(run, weights, sig, fallback)

    def _pytorch_with(self, pruned: dict[int, torch.Tensor]) -> Callable[[Sequence[Any]], Any]:
        """The dynamo graph in plain PyTorch, with pruned values for the weights that have them."""
        if not pruned:
            return self._in_pytorch
        return lambda args: self.gm(*_with(pruned, args))

    def _in_pytorch(self, args: Sequence[Any]) -> Any:
        """The dynamo graph in plain PyTorch: what a variant that cannot compile, or failed at run time, runs."""
        return self.gm(*args)

    def _private_inputs(self, args: Sequence[Any]) -> list[Any]:
        return [a.clone() if isinstance(a, torch.Tensor) and i not in self._weight_set else a
                for i, a in enumerate(args)]

    def _guarded(self, run: Callable[[Sequence[Any]], Any], weights: _WeightSet, sig: tuple,
                 fallback: Callable[[Sequence[Any]], Any]) -> Callable[[Sequence[Any]], Any]:
        """`run`, falling back to the dynamo graph in plain PyTorch when it raises where PyTorch does not.

        A failure PyTorch shares (an id past the embedding table) is the input's: PyTorch's error is raised and the
        compiled variant kept. One only the compiled graph has is sparsecc's: the variant is replaced by plain
        PyTorch for the rest of the process, with one warning."""

        def guarded(args: Sequence[Any]) -> Any:
            try:
                return run(args)
            except Exception as exc:
                if self.settings.on_failure == "raise":
                    raise
                result = fallback(args)  # raises PyTorch's own error if the input is at fault
                self.fallbacks += 1
                log.debug("sparsecc: graph %d failed at run time", self.serial, exc_info=True)
                warnings.warn(f"sparsecc: graph {self.serial} failed at run time where plain PyTorch does not "
                              f"({type(exc).__name__}: {exc}); it runs in plain PyTorch from now on "
                              "(options={'on_failure': 'raise'} raises instead).", SparseccFallbackWarning,
                              stacklevel=4)
                if weights.variants.get(sig) is guarded:
                    weights.variants[sig] = fallback
                return result

        return guarded

    def _on_weight_change(self, weights: _WeightSet, snapshot: tuple) -> None:
        if self.settings.on_weight_change == "raise":
            raise WeightChangedError(
                "a weight of a sparsecc-compiled graph changed after compiling; call torch.compile again, or "
                "pass options={'on_weight_change': 'recompile'}"
            )
        log.info("sparsecc: weights of graph %d changed after compiling; recompiling", self.serial)
        self._release(weights)  # their kernels hold the old weights
        weights.snapshot = snapshot

    def report(self) -> str:
        from sparsecc.report import plan_table

        if self.state is None or self.state.plan is None:
            return "sparsecc: this graph was not compiled (see the fallback warning)"
        if self.state.pruning is not None:  # what pruning did, then the plan of the pruned weights
            return f"{self.state.pruning.table()}\n\n{plan_table(self.state.plan)}"
        return plan_table(self.state.plan)
