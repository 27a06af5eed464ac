"""The search: knobs for each kernel from the tuning database, or found by measuring candidates around the defaults,
and the graph-level entry the lower stage calls (`tune_graph`)."""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Callable, Iterable, Sequence

import tvm
from torch import fx

import sparsecc
from sparsecc.codegen.converters import KNOBS_META, SparseLinearSpec
from sparsecc.codegen.targets import runs_here, target_of
from sparsecc.codegen.tuning.runners import Candidate, Runner, local_runner, rpc_runner
from sparsecc.codegen.tuning.space import candidate_space, canonical, neighbours, spec_default
from sparsecc.codegen.tuning.tasks import KernelTask, graph_tasks
from sparsecc.errors import SparseccError
from sparsecc.kernel_work import TEMPLATE, TEMPLATE_VERSION, KernelKnobs
from sparsecc.planning.tuning_db import TuningDatabase, TuningKey, TuningRecord
from sparsecc.progress import progress_bar
from sparsecc.settings import Settings, TuneSettings

log = logging.getLogger(__name__)

CONFIRM_TOP = 3
CONFIRM_ROUNDS = 5
KEEP_DEFAULT_MARGIN = 0.05


@dataclasses.dataclass(frozen=True)
class KernelTuning:
    """The outcome for one kernel."""

    name: str
    layers: tuple[str, ...]
    knobs: KernelKnobs
    source: str  # "tuned", "database", or "default" (nothing measured, nothing stored)
    spec: SparseLinearSpec | None = None
    pattern: str = ""  # hash of the pattern of the layer tuned on (the database key's)
    best_us: float | None = None
    default_us: float | None = None
    trials: int = 0  # candidates measured now (0 when taken from the database)
    seconds: float = 0.0

    @property
    def speedup(self) -> float | None:
        return self.default_us / self.best_us if self.best_us and self.default_us else None


@dataclasses.dataclass
class TuningReport:
    kernels: list[KernelTuning]
    database: str
    measured_on: str
    seconds: float

    @property
    def trials(self) -> int:
        return sum(k.trials for k in self.kernels)

    def table(self) -> str:
        lines = [f"{'kernel':<44}{'source':>10}{'trials':>8}{'default us':>12}{'tuned us':>10}{'speed-up':>10}  knobs"]
        for k in self.kernels:
            d = f"{k.default_us:.1f}" if k.default_us else "-"
            b = f"{k.best_us:.1f}" if k.best_us else "-"
            s = f"{k.speedup:.2f}x" if k.speedup else "-"
            kn = k.knobs
            lines.append(f"{k.name:<44}{k.source:>10}{k.trials:>8}{d:>12}{b:>10}{s:>10}  tile={kn.token_tile} "
                         f"rows={kn.rows_per_task} outer={int(kn.token_outer)} chains={kn.chains}")
        return "\n".join(lines)


def tuning_key(task: KernelTask, target: tvm.target.Target) -> TuningKey:
    spec = dataclasses.asdict(task.spec)
    spec["block"] = list(task.spec.block)
    return TuningKey(target=str(target), tvm_version=tvm.__version__, sparsecc_version=sparsecc.__version__,
                     template=TEMPLATE, template_version=TEMPLATE_VERSION, spec=TuningKey.spec_json(spec),
                     pattern=task.pattern)


def search(task: KernelTask, trials: int, runner: Runner, start: KernelKnobs | None = None,
           progress: Callable[[int, str], None] | None = None, seed: int = 0,
           threads: int | None = None) -> tuple[KernelKnobs, float, float, int, bool]:
    """Local search over the task's knobs; returns (best knobs, best us, default us, candidates measured,
    whole space measured)."""
    spec = task.spec
    space = candidate_space(spec, threads)
    default = spec_default(spec, threads)
    budget = max(1, min(trials, len(space)))
    inputs = task.inputs()
    expected = task.reference(inputs)
    rng = random.Random(f"{seed}:{task.pattern}")
    built: dict[KernelKnobs, Candidate] = {}
    times: dict[KernelKnobs, float] = {}

    def measure(batch: list[KernelKnobs]) -> None:
        for k in batch:
            try:
                built[k] = runner.build(spec, k)
            except Exception as exc:  # a knob set TVM cannot compile is dropped, not fatal
                log.warning("tune: %s with %s failed to build: %s", spec.name, k, exc)
                times[k] = float("inf")
        ok = [k for k in batch if k in built]
        for k, t in zip(ok, runner.measure(task, inputs, expected, [built[k] for k in ok])):
            times[k] = float("inf") if t is None else t
        if progress:
            best = min(times.values())
            progress(len(batch), f"{spec.name} {times.get(default, float('nan')) / best:.2f}x" if best < float("inf")
                     else spec.name)

    first = [default] + ([canonical(start, spec)] if start is not None and canonical(start, spec) in space
                         and canonical(start, spec) != default else [])
    measure(first[:budget])
    while len(times) < budget:
        best = min(times, key=times.get)
        batch = [c for c in neighbours(best, space) if c not in times]
        if not batch:
            rest = [c for c in space if c not in times]
            rng.shuffle(rest)
            batch = rest[:runner.parallel]
        measure(batch[:budget - len(times)])

    ranked = sorted((k for k in times if times[k] < float("inf")), key=times.get)
    if default not in ranked:
        raise SparseccError(f"tune: the untuned kernel {spec.name} failed to run or disagreed with the reference")
    finalists = list(dict.fromkeys([default] + ranked[:CONFIRM_TOP]))
    if len(finalists) > 1:
        confirmed = dict(zip(finalists, runner.confirm(task, inputs, [built[k] for k in finalists], CONFIRM_ROUNDS)))
    else:
        confirmed = {default: times[default]}
    best = min(confirmed, key=confirmed.get)
    if best != default and confirmed[best] > confirmed[default] * (1 - KEEP_DEFAULT_MARGIN):
        best = default
    return best, confirmed[best], confirmed[default], len(times), len(times) == len(space)


def tune_tasks(tasks: Sequence[KernelTask], tune: TuneSettings, target: tvm.target.Target, threads: int,
               db: TuningDatabase, runner_factory: Callable[[], Runner] | None = None) -> TuningReport:
    """Knobs for each task: from the database when it holds a search of at least `tune.trials` (or of the whole
    space), else by measuring (stored afterwards). `tune.trials == 0` only reads the database."""
    start_time = time.perf_counter()
    results: dict[int, KernelTuning] = {}
    todo: list[tuple[int, KernelTask, TuningKey, TuningRecord | None]] = []
    for i, task in enumerate(tasks):
        key = tuning_key(task, target)
        record = db.get(key)
        knobs = _knobs_of(record)
        if knobs is not None and (tune.trials == 0 or (not tune.retune and (record.exhausted or
                                                                          record.trials >= tune.trials))):
            results[i] = KernelTuning(task.spec.name, task.layers, knobs, "database", task.spec, key.pattern,
                                      record.best_us, record.default_us)
        elif tune.trials == 0:
            results[i] = KernelTuning(task.spec.name, task.layers, spec_default(task.spec, threads), "default",
                                      task.spec, key.pattern)
        else:
            todo.append((i, task, key, record))

    measured_on = "-"
    if todo:
        if runner_factory is None:
            runner_factory = _runner_factory(tune, target, threads)
        runner = runner_factory()
        measured_on = runner.description
        total = sum(min(tune.trials, len(candidate_space(t.spec, threads))) for _, t, _, _ in todo)
        update, close = progress_bar(total, "sparsecc tune", "trial")
        try:
            for done, (i, task, key, record) in enumerate(todo):
                t0 = time.perf_counter()
                try:
                    best, best_us, default_us, n, exhausted = search(task, tune.trials, runner, _knobs_of(record),
                                                                     update, threads=threads)
                except Exception as exc:  # a worker or RPC server that died, ...: say what is kept
                    kept = (f"the {done} kernel(s) tuned before it in this run are stored in {db.path}, so running "
                            "again measures only the rest" if db.writable else
                            f"nothing was stored: {db.path} cannot be written")
                    raise SparseccError(f"tune: tuning {task.spec.name} on {runner.description} failed "
                                        f"({type(exc).__name__}: {exc}); {kept}") from exc
                db.put(TuningRecord(key, best.as_dict(), best_us, default_us, n, exhausted, runner.description))
                results[i] = KernelTuning(task.spec.name, task.layers, best, "tuned", task.spec, key.pattern, best_us,
                                          default_us, n, time.perf_counter() - t0)
                log.info("tune: %s: %s, %.1f us (untuned %.1f us, %.2fx), %d trials in %.1f s", task.spec.name, best,
                         best_us, default_us, default_us / best_us, n, results[i].seconds)
        finally:
            close()
            runner.close()
    return TuningReport([results[i] for i in range(len(tasks))], str(db.path), measured_on,
                        time.perf_counter() - start_time)


def _knobs_of(record: TuningRecord | None) -> KernelKnobs | None:
    if record is None:
        return None
    try:
        return KernelKnobs(**record.knobs)
    except TypeError:  # stored by a template with other knobs (its version should have changed)
        return None


def _runner_factory(tune: TuneSettings, target: tvm.target.Target, threads: int) -> Callable[[], Runner]:
    if tune.rpc is not None:
        return lambda: rpc_runner(tune.rpc, target, threads)
    if not runs_here(target):
        raise SparseccError(f"tune: kernels for target {target} cannot run on this machine; measure them on machines "
                            "of that kind with tune={'trials': N, 'rpc': {'tracker': 'host:port', 'key': ...}}")
    return lambda: local_runner(target, threads)


def tune_graph(gm: fx.GraphModule, settings: Settings) -> TuningReport:
    """Tune (or look up) every sparse kernel of a partitioned graph and record the knobs in its nodes' meta."""
    tune = settings.tune or TuneSettings(trials=0)
    db = TuningDatabase.open_default(settings.cache_dir)
    tasks = graph_tasks(gm)
    report = tune_tasks(tasks, tune, target_of(settings), settings.threads, db)
    for task, result in zip(tasks, report.kernels):
        for node in task.nodes:
            node.meta[KNOBS_META] = result.knobs
    if report.trials:
        log.info("tune: %d kernels, %d trials in %.1f s on %s\n%s", len(tasks), report.trials, report.seconds,
                 report.measured_on, report.table())
    return report


def tune_weights(tasks: Iterable[KernelTask], tune: TuneSettings | dict, settings: Settings | None = None,
                 ) -> TuningReport:
    """`tune_tasks` with the target, threads and database of `settings` (benchmarks, tools)."""
    settings = (settings or Settings()).resolved()
    tune = tune if isinstance(tune, TuneSettings) else TuneSettings.from_option(tune)
    return tune_tasks(list(tasks), tune, target_of(settings), settings.threads,
                      TuningDatabase.open_default(settings.cache_dir))
