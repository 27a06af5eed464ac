import os
import warnings

import pytest
import torch
import torch._dynamo

import sparsecc
from sparsecc.runtime.compiled import compiled_graphs
from sparsecc.settings import ENV_OPTIONS

# The suite checks captures, rewrites and kernels on small layers, where the default planner (cost_model="measured")
# times dense and sparse and rightly keeps many of them dense: those tests plan by the break-even rule, which does
# not depend on the clock, here and in the processes they start. Tests of measured planning and of the defaults
# (test_cost_model.py, test_demo.py) ask for them explicitly.
os.environ[ENV_OPTIONS] = '{"cost_model": "break-even"}'


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
    def fallbacks(self) -> int:
        return sum(g.fallbacks for g in self.graphs)


@pytest.fixture
def watch():
    return CompileWatch()


def compile_sparsecc(model, **options):
    return torch.compile(model, backend="sparsecc", options=options or None)


@pytest.fixture
def no_fallback():
    """Turn sparsecc's fallback warning into a test failure."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", sparsecc.SparseccFallbackWarning)
        yield


@pytest.fixture
def reference_machine():
    """The cost model's built-in figures: plans that do not depend on this machine's calibration."""
    from sparsecc.cost_model import REFERENCE

    return REFERENCE


@pytest.fixture
def calibrated_cache_dir(tmp_path):
    """An empty cache directory holding only this machine's cost-model calibration (measured once into the default
    cache and copied: calibrating again costs 30 s per test or subprocess)."""
    import shutil

    from sparsecc.calibration import machine_model
    from sparsecc.settings import Settings
    from sparsecc.tuning_db import default_cache_dir

    machine_model(Settings())
    shutil.copytree(default_cache_dir() / "machines", tmp_path / "cache" / "machines")
    return tmp_path / "cache"
