"""One frozen settings object, built from the user's options and passed down to every stage."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from typing import Any, Literal, Mapping

from sparsecc.errors import OptionError

STAGES = ("capture", "analysis", "prune", "plan", "rewrite", "partition", "lower", "build")
# Options every compile of the process (and of the processes it starts) takes unless it passes its own: a JSON
# object, e.g. '{"cost_model": "break-even"}' where a build pipeline wants plans that do not depend on timing.
ENV_OPTIONS = "SPARSECC_OPTIONS"


@dataclasses.dataclass(frozen=True)
class RpcSettings:
    """Where tuning measures: an RPC tracker and the key its servers registered under (`python -m tvm.exec.rpc_tracker`,
    `python -m tvm.exec.rpc_server --tracker host:port --key KEY`). The servers' CPUs must be the target's."""

    tracker: str  # "host:port"
    key: str
    # RPC sessions (servers) measuring at once; candidates are spread over them.
    sessions: int = 1
    priority: int = 1
    # Seconds after which a server ends a session (0: never).
    session_timeout: float = 0.0

    def __post_init__(self) -> None:
        tracker = self.tracker
        host, _, port = tracker.rpartition(":") if isinstance(tracker, str) else ("", "", "")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise OptionError(f"option 'tune.rpc': 'tracker' must be 'host:port'; got {tracker!r}.")
        if not isinstance(self.key, str) or not self.key:
            raise OptionError(f"option 'tune.rpc': 'key' must be a non-empty string; got {self.key!r}.")
        for name, minimum in (("sessions", 1), ("priority", None)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or (minimum is not None and v < minimum):
                raise OptionError(f"option 'tune.rpc': '{name}' must be an int{f' >= {minimum}' if minimum else ''}; "
                                  f"got {v!r}.")
        timeout = self.session_timeout
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0:
            raise OptionError(f"option 'tune.rpc': 'session_timeout' must be seconds >= 0; got {timeout!r}.")
        object.__setattr__(self, "session_timeout", float(timeout))

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.tracker.rpartition(":")
        return host, int(port)


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    """The `tune` option. `trials`: kernel variants measured per kernel (0: use what the tuning database holds, measure
    nothing). A kernel already tuned with at least that many trials (or with its whole search space) is taken from the
    database. `retune`: measure again even then. `rpc`: measure on RPC servers instead of in this process."""

    trials: int = 16
    retune: bool = False
    rpc: RpcSettings | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.trials, int) or isinstance(self.trials, bool) or self.trials < 0:
            raise OptionError(f"option 'tune': 'trials' must be an int >= 0; got {self.trials!r}.")
        if not isinstance(self.retune, bool):
            raise OptionError(f"option 'tune': 'retune' must be True or False; got {self.retune!r}.")
        if self.rpc is not None:
            object.__setattr__(self, "rpc", _rpc_settings(self.rpc))

    @classmethod
    def from_option(cls, value: Any) -> "TuneSettings":
        if isinstance(value, TuneSettings):
            return value
        return cls(**_sub_options("tune", value, cls, "{'trials': 16}, or None"))


def _sub_options(where: str, value: Any, cls: type, example: str) -> dict:
    """A dict option's keys and values, checked against the fields of its settings class."""
    if not isinstance(value, Mapping):
        raise OptionError(f"option '{where}' must be a dict such as {example}; got {value!r}.")
    value = dict(value)
    _check_sub_keys(where, value, cls)
    return value


def _check_sub_keys(where: str, value: dict, cls: type) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in value:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise OptionError(f"option '{where}' has no key {key!r}.{hint} Valid keys: {', '.join(valid)}.")


def _rpc_settings(value: Any) -> RpcSettings:
    if isinstance(value, RpcSettings):
        return value
    if not isinstance(value, Mapping):
        raise OptionError("option 'tune': 'rpc' must be a dict such as {'tracker': '127.0.0.1:9190', 'key': 'cpu'}; "
                          f"got {value!r}.")
    value = dict(value)
    _check_sub_keys("tune.rpc", value, RpcSettings)
    for required in ("tracker", "key"):
        if required not in value:
            raise OptionError(f"option 'tune.rpc' needs '{required}' (valid keys: tracker, key, sessions, priority, "
                              "session_timeout).")
    return RpcSettings(**value)


PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclasses.dataclass(frozen=True)
class PruneSettings:
    """The `prune` option: make weights sparse that arrive dense (sparsecc/pruning/). Exactly one budget:
    `target_sparsity`, the fraction of the prunable weights' elements that become zero, or `max_error`, the
    largest error of the model's outputs on the calibration inputs (`metric`: "relative_l2" of all floating
    outputs, or "cosine": 1 - the mean cosine of the outputs' last-dimension vectors, for embedders). `pattern`:
    "unstructured", "N:M" (e.g. "2:4") or "RxC" blocks (e.g. "16x1"). `allocation`: "sensitivity" spreads the
    budget over the layers by the error each level costs them (and, with `max_error`, by the speed it buys);
    "uniform" gives every layer the same level. `calibration`: batches of the graph's inputs (an iterable of
    tensors / tuples / dicts, or a safetensors file); None uses the example inputs. `include`: glob patterns of
    weight names to prune (None: every weight feeding a matrix product). `inplace`: also write the pruned values
    into the model's own tensors. `dead_channels`: remove all-zero output rows together with the next layer's
    matching inputs."""

    method: Literal["magnitude", "wanda", "sparsegpt"] = "sparsegpt"
    pattern: str = "unstructured"
    target_sparsity: float | None = None
    max_error: float | None = None
    metric: Literal["relative_l2", "cosine"] = "relative_l2"
    allocation: Literal["sensitivity", "uniform"] = "sensitivity"
    include: tuple[str, ...] | None = None
    inplace: bool = False
    # Take all-zero output rows out of a layer and the matching inputs of the next (passes/remove_dead_channels.py).
    dead_channels: bool = True
    # Not part of what the settings compare or hash: data, not a choice.
    calibration: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        from sparsecc.pruning.patterns import Pattern

        if self.method not in PRUNE_METHODS:
            raise OptionError(f"option 'prune': 'method' must be one of {', '.join(PRUNE_METHODS)}; "
                              f"got {self.method!r}.")
        if not isinstance(self.pattern, str):
            raise OptionError(f"option 'prune': 'pattern' must be a string such as '2:4'; got {self.pattern!r}.")
        pattern = Pattern.parse(self.pattern)
        budgets = [b for b in ("target_sparsity", "max_error") if getattr(self, b) is not None]
        if len(budgets) > 1:
            raise OptionError("option 'prune': give 'target_sparsity' or 'max_error', not both.")
        if not budgets and pattern.fixed_sparsity is None:
            raise OptionError("option 'prune' needs exactly one budget: 'target_sparsity' (e.g. 0.6) or "
                              "'max_error' (e.g. 0.01); an N:M pattern alone needs none.")
        for name, high in (("target_sparsity", 1.0), ("max_error", None)):
            v = getattr(self, name)
            if v is None:
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0 < v and (high is None or v < high)):
                bounds = "between 0 and 1 (exclusive)" if high else "> 0"
                raise OptionError(f"option 'prune': '{name}' must be a number {bounds}; got {v!r}.")
            object.__setattr__(self, name, float(v))
        if self.metric not in ("relative_l2", "cosine"):
            raise OptionError(f"option 'prune': 'metric' must be 'relative_l2' or 'cosine'; got {self.metric!r}.")
        if self.allocation not in ("sensitivity", "uniform"):
            raise OptionError(f"option 'prune': 'allocation' must be 'sensitivity' or 'uniform'; "
                              f"got {self.allocation!r}.")
        if self.include is not None:
            items = (self.include,) if isinstance(self.include, str) else self.include
            if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items) or not items:
                raise OptionError(f"option 'prune': 'include' must be a list of name patterns such as "
                                  f"['encoder.*']; got {self.include!r}.")
            object.__setattr__(self, "include", tuple(items))
        for flag in ("inplace", "dead_channels"):
            if not isinstance(getattr(self, flag), bool):
                raise OptionError(f"option 'prune': '{flag}' must be True or False; got {getattr(self, flag)!r}.")

    @classmethod
    def from_option(cls, value: Any) -> "PruneSettings":
        if isinstance(value, PruneSettings):
            return value
        return cls(**_sub_options("prune", value, cls,
                                  "{'target_sparsity': 0.6} or {'max_error': 0.01, 'calibration': batches}, or None"))

    def to_option(self) -> dict[str, Any]:
        """The option as a manifest records it: without the calibration data."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "calibration"}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Options of `torch.compile(..., backend="sparsecc", options={...})` and of the Python API."""

    # What a failing stage does: fall back to the original graph with one warning, or raise.
    on_failure: Literal["fallback", "raise"] = "fallback"
    # CSR only for weights at most this dense; None: 0.3 with cost_model="break-even" (the measured CSR break-even,
    # 0.42 at BERT shapes, times 0.75 for the slowdown inside a model), no limit with the other cost models.
    csr_max_density: float | None = None
    # How the planner prices formats: "measured" (the calibrated model ranks the candidates and dense plus the close
    # ones are timed on the weight, sparsecc/planning/candidate_timing.py; a target that does not run here falls back to the
    # predictions), "calibrated" (sparsecc/planning/cost_model.py: a model of this machine from a micro-benchmark run once
    # per target and stored in the cache; predictions per candidate in the plan) or "break-even" (stored fraction
    # over each kernel's measured break-even density; never measures, so plans do not depend on timing). See
    # docs/benchmarks.md "Plan quality" for how often each picks the fastest.
    cost_model: Literal["break-even", "calibrated", "measured"] = "measured"
    # Weights with fewer elements stay dense: the call overhead would eat the saving.
    min_weight_numel: int = 4096
    # Which ops go to TVM: "sparse" = sparse ops and, joined to them, reshapes, attention and layer norm (sparsecc's
    # own kernels; other dense work stays in PyTorch, which runs it faster than untuned TVM); "all" = every op
    # sparsecc has a TVM converter for (element-wise ops too).
    offload: Literal["sparse", "all"] = "sparse"
    # What the kernels are built for: "host" (this CPU), "aarch64", "x86_64" (any AVX2 + FMA CPU), or TVM's JSON
    # form of an LLVM target. Other targets than the host only make sense for sparsecc.export / `sparsecc build`.
    target: str = "host"
    # Threads for TVM kernels; None follows torch.get_num_threads().
    num_threads: int | None = None
    # Whose threads run the TVM kernels' parallel loops: "openmp", PyTorch's own OpenMP threads (one pool for the
    # whole model; needs a C compiler, else TVM's pool with a log line; with num_threads other than PyTorch's, TVM's
    # pool); "tvm", TVM's own pool beside PyTorch's; "auto", "openmp" unless PyTorch's threads were told to sleep
    # soon after each op (GOMP_SPINCOUNT at most 10 000, OMP_WAIT_POLICY=passive), where TVM's briefly spinning
    # workers start kernels sooner. codegen/openmp_pool.py says why one pool is better.
    thread_pool: Literal["auto", "openmp", "tvm"] = "auto"
    # Stop the pipeline after this stage and run what it produced (debugging, tests, `sparsecc inspect`).
    stop_after: Literal["capture", "analysis", "prune", "plan", "rewrite", "partition", "lower", "build"] | None = None
    # Compare the compiled graph with PyTorch on the example inputs before using it.
    verify: bool = True
    # Where a graph with no sparse region runs: eager PyTorch, Inductor, or whichever measures faster on the
    # example inputs ("auto"; costs an Inductor compile for such graphs).
    dense_backend: Literal["auto", "eager", "inductor"] = "auto"
    # When a weight changes after compiling: compile again, or raise WeightChangedError.
    on_weight_change: Literal["recompile", "raise"] = "recompile"
    # Autotune the sparse kernels, e.g. {"trials": 16} or {"trials": 16, "rpc": {"tracker": "host:9190", "key":
    # "cpu"}}; see TuneSettings. Results persist in the tuning database under `cache_dir`; None: untuned kernels.
    tune: TuneSettings | None = None
    # Prune weights that arrive dense, e.g. {"target_sparsity": 0.6} or {"max_error": 0.01, "calibration": batches};
    # see PruneSettings. None: never (sparsecc only uses the zeros weights already have).
    prune: PruneSettings | None = None
    # Formats the planner may choose from: "dense", "csr", "ell" (CSR rows padded to one length), "bsr" (any measured
    # block shape) or "bsrRxC" (one shape).
    # Without "dense" the best listed sparse format is forced on every weight that has a sparse kernel, even where
    # it is predicted slower. None: all of them.
    formats: tuple[str, ...] | None = None
    # Go sparse only where the speed-up over dense (measured or predicted) is at least this (1.2: 20 % faster).
    min_gain: float = 1.0
    # Directory of sparsecc's on-disk cache (the tuning database); None: $SPARSECC_CACHE_DIR, else ~/.cache/sparsecc.
    cache_dir: str | None = None
    # Keep built regions under `cache_dir` and load them when a compile builds the same regions again (same code,
    # shapes and packed weights; codegen/kernel_cache.py). False: lower and build every time.
    cache_kernels: bool = True

    def __post_init__(self) -> None:
        """Check every field, however the settings were made (options, `Settings(...)`, `dataclasses.replace`), and
        turn the dict and list forms of `tune` and `formats` into their settings types."""
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "tune" and value is not None and not isinstance(value, TuneSettings):
                value = TuneSettings.from_option(value)
            elif field.name == "prune" and value is not None and not isinstance(value, PruneSettings):
                value = PruneSettings.from_option(value)
            elif field.name == "formats" and value is not None:
                value = _formats(value)
            elif field.name == "cache_dir" and isinstance(value, os.PathLike):
                value = os.fspath(value)
            _check_type(field.name, value, hints[field.name])
            object.__setattr__(self, field.name, value)
        if self.csr_max_density is not None and not 0.0 <= self.csr_max_density <= 1.0:
            raise OptionError(f"option 'csr_max_density' must be within [0, 1], got {self.csr_max_density}.")
        if self.target != "host":
            _check_target(self.target)
        if self.min_gain <= 0:
            raise OptionError(f"option 'min_gain' must be > 0 (1.0: any predicted gain), got {self.min_gain}.")
        if self.num_threads is not None and self.num_threads < 1:
            raise OptionError(f"option 'num_threads' must be >= 1 or None, got {self.num_threads}.")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "Settings":
        """Settings from the user's options over those of $SPARSECC_OPTIONS, checked."""
        given = dict(options or {})
        inherited = {k: v for k, v in environment_options().items() if k not in given}
        try:
            cls._checked(inherited)
        except OptionError as exc:
            raise OptionError(f"${ENV_OPTIONS}: {exc}") from None
        return cls._checked({**inherited, **given})

    @classmethod
    def _checked(cls, options: dict[str, Any]) -> "Settings":
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise OptionError(f"unknown sparsecc option '{key}'.{hint} Valid options: {', '.join(sorted(fields))}.")
        return cls(**options)

    def resolved(self) -> "Settings":
        """These settings with what a compile decides once filled in: `num_threads` (PyTorch's thread count when
        unset) and `cache_dir` (the cache directory, sparsecc/cache.py). The pipeline resolves them at its start
        and hands the result to every stage, so all of them see the same threads and cache."""
        import torch

        from sparsecc.cache import default_cache_dir

        return dataclasses.replace(self, num_threads=self.num_threads or torch.get_num_threads(),
                                   cache_dir=str(default_cache_dir(self.cache_dir)))

    @property
    def threads(self) -> int:
        """The kernels' thread count, of resolved settings."""
        if self.num_threads is None:
            raise ValueError("these Settings are not resolved: call settings.resolved() once per compile and pass "
                             "the result down")
        return self.num_threads


def environment_options() -> dict[str, Any]:
    text = os.environ.get(ENV_OPTIONS, "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OptionError(f"${ENV_OPTIONS} must be a JSON object such as '{{\"cost_model\": \"break-even\"}}' "
                          f"({exc}); got {text!r}.") from None
    if not isinstance(value, dict):
        raise OptionError(f"${ENV_OPTIONS} must be a JSON object such as '{{\"cost_model\": \"break-even\"}}'; "
                          f"got {text!r}.")
    return value


FORMAT_NAMES = ("dense", "csr", "ell", "bsr")


def _formats(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise OptionError(f"option 'formats' must be a non-empty list such as ['dense', 'csr']; got {value!r}.")
    for item in items:
        if not (isinstance(item, str) and (item in FORMAT_NAMES or re.fullmatch(r"bsr\d+x\d+", item))):
            raise OptionError(f"option 'formats': {item!r} is not one of {', '.join(FORMAT_NAMES)} or 'bsrRxC' "
                              "(e.g. 'bsr8x1').")
    return tuple(dict.fromkeys(items))


# Short names for the `target` option; anything else is TVM's JSON dict form of an LLVM target.
TARGET_ALIASES = {
    "aarch64": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "generic"},
    "x86_64": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"},  # AVX2 + FMA
}


def target_fields(spec: str) -> dict[str, Any]:
    """The TVM target fields a `target` option other than "host" names (checked here without TVM; TVM checks the
    fields themselves when it builds the target, codegen/targets.py)."""
    if spec in TARGET_ALIASES:
        return dict(TARGET_ALIASES[spec])
    try:
        fields = json.loads(spec)
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        raise OptionError(f"option 'target': target {spec!r} is not 'host', one of {', '.join(TARGET_ALIASES)}, or a "
                          'JSON LLVM target such as \'{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": '
                          '"neoverse-n1"}\'')
    if fields.get("kind") != "llvm":
        raise OptionError(f"option 'target': target kind {fields.get('kind')!r}: sparsecc has CPU (LLVM) kernels "
                          "only; GPU kernels are not written yet")
    return fields


def _check_target(spec: str) -> None:
    target_fields(spec)


def _check_type(key: str, value: Any, hint: Any) -> None:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise OptionError(
                f"option '{key}' must be one of {', '.join(repr(a) for a in args)}; got {value!r}."
            )
        return
    if origin is typing.Union or isinstance(hint, types.UnionType):
        for alternative in args:
            if alternative is type(None) and value is None:
                return
            if alternative is not type(None):
                try:
                    _check_type(key, value, alternative)
                    return
                except OptionError:
                    pass
        raise OptionError(f"option '{key}' must be {_describe(hint)}; got {value!r}.")
    expected = typing.get_origin(hint) or hint  # tuple[str, ...] -> tuple (its items are checked where it is parsed)
    ok = isinstance(value, expected) and not (expected in (int, float) and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise OptionError(
            f"option '{key}' must be {expected.__name__}, got {type(value).__name__} {value!r}."
        )


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is typing.Union or isinstance(hint, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    return "None" if hint is type(None) else hint.__name__
