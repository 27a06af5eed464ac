import os
import shutil
import warnings

import pytest
import torch
import torch._dynamo

import sparsecc
from sparsecc.runtime.compiled import compiled_graphs

# The suite checks captures, rewrites and kernels on small layers, where the default planner (cost_model="measured")
# times dense and sparse and rightly keeps many of them dense: those tests pass these options, planning by the
# break-even rule, which does not depend on the clock. Tests of measured planning and of the defaults
# (test_cost_model.py, test_demo.py, test_examples.py) leave them out.
TEST_OPTIONS = {"cost_model": "break-even"}
CLI_TEST_OPTIONS = ("-O", "cost_model=break-even")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Every cache the suite writes (tuning database, calibrations, the OpenMP launcher), in this process and the ones
    it starts, goes to one temporary directory: never the developer's own ~/.cache/sparsecc."""
    path = tmp_path_factory.mktemp("sparsecc-cache")
    saved = os.environ.get("SPARSECC_CACHE_DIR")
    os.environ["SPARSECC_CACHE_DIR"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("SPARSECC_CACHE_DIR", None)
    else:
        os.environ["SPARSECC_CACHE_DIR"] = saved


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with an empty dynamo cache, so graphs compiled by one test don't serve another."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


class CompileWatch:
    """The CompiledGraphs created while the block runs, to check the sparse path really ran."""

    def __enter__(self):
        self._before = {g.serial for g in compiled_graphs()}
        return self

    def __exit__(self, *exc):
        return False

    @property
    def graphs(self):
        return [g for g in compiled_graphs() if g.serial not in self._before]

    @property
    def sparse_ops(self) -> int:
        return sum(g.state.sparse_ops for g in self.graphs if g.state is not None)

    @property
    def regions(self) -> int:
        return sum(len(g.state.regions) for g in self.graphs if g.state is not None)

    @property
    def region_calls(self) -> int:
        """How many times the TVM regions of the graphs compiled in the block have run."""
        return sum(g.state.gm.get_submodule(r).calls for g in self.graphs if g.state is not None
                   for r in g.state.regions)

    @property
    def fallbacks(self) -> int:
        return sum(g.fallbacks for g in self.graphs)


@pytest.fixture
def watch():
    return CompileWatch()


def compile_sparsecc(model, **options):
    """torch.compile with sparsecc and the suite's options (TEST_OPTIONS) under the test's own."""
    return torch.compile(model, backend="sparsecc", options={**TEST_OPTIONS, **options})


@pytest.fixture
def no_fallback():
    """Turn sparsecc's fallback warning into a test failure."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", sparsecc.SparseccFallbackWarning)
        yield


@pytest.fixture
def reference_machine():
    """The cost model's built-in figures: plans that do not depend on this machine's calibration."""
    from sparsecc.planning.cost_model import REFERENCE

    return REFERENCE


@pytest.fixture(scope="session")
def session_calibration(isolated_cache):
    """This machine's cost-model calibration, measured once per test session into the session's cache (about a
    minute on 2 cores)."""
    from sparsecc.planning.calibration import machine_model
    from sparsecc.settings import Settings

    return machine_model(Settings().resolved())


@pytest.fixture
def calibrated_cache_dir(tmp_path, isolated_cache, session_calibration):
    """An empty cache directory holding only this machine's cost-model calibration (copied from the session's:
    calibrating again costs a minute per test or subprocess)."""
    shutil.copytree(isolated_cache / "machines", tmp_path / "cache" / "machines")
    return tmp_path / "cache"


@pytest.fixture
def quick_timing(monkeypatch):
    """Short kernel timings for tests of what tuning does rather than how well it ranks kernels."""
    from sparsecc.codegen.tuning import knob_search, runners

    monkeypatch.setattr(runners, "MIN_REPEAT_MS", 1)
    monkeypatch.setattr(runners, "REPEAT", 2)
    monkeypatch.setattr(knob_search, "CONFIRM_ROUNDS", 1)
    monkeypatch.setattr(runners, "CONTEXT_RUNS", 3)
