"""Generated programs (tests/random_programs.py) through torch.compile(backend="sparsecc"), each compared with eager
PyTorch on inputs it was not compiled (or verified) with, and each checking that every weight the plan made sparse
runs through a sparse kernel in a TVM region.

The default suite runs 100 cases; `python -m pytest -m slow tests/test_generated_graphs.py` runs 1000 more
(SPARSECC_GENERATED_CASES sets that count). Both are derandomised: the same cases every run. Bugs these found
have their own regression tests below, and are listed in docs/reliability.md.
"""

import os
import warnings

import pytest
import torch
import torch._dynamo
from conftest import CompileWatch
from hypothesis import HealthCheck, given, settings
from random_programs import Program, ProgramModule, Step, WeightSpec, programs

import sparsecc
from sparsecc.tolerances import assert_outputs_close

CASES = dict(derandomize=True, database=None, deadline=None, print_blob=True,
             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check_program(program: Program) -> None:
    torch._dynamo.reset()  # every case is the same nn.Module class: dynamo would otherwise hit its recompile limit
    model = ProgramModule(program).eval()
    compiled = torch.compile(model, backend="sparsecc", options=dict(program.options))
    example, fresh = program.inputs(1), program.inputs(2)
    with torch.no_grad(), warnings.catch_warnings(), CompileWatch() as watch:
        warnings.simplefilter("error", sparsecc.SparseccFallbackWarning)
        compiled(*example)
        calls_before = _region_calls(watch)
        actual = compiled(*fresh)
        expected = model(*fresh)
    assert_outputs_close(actual, expected)
    assert watch.graphs, "dynamo never called the sparsecc backend"
    assert watch.fallbacks == 0
    for graph in watch.graphs:
        _check_sparse_path_ran(graph.state, calls_before)


def _region_calls(watch: CompileWatch) -> dict[tuple[int, str], int]:
    return {(id(g.state), name): g.state.gm.get_submodule(name).calls
            for g in watch.graphs if g.state is not None for name in g.state.regions}


def _check_sparse_path_ran(state, calls_before) -> None:
    sparse = state.plan.sparse_weights()
    # Every weight the plan made sparse is multiplied by its own sparse op, and those ops run in TVM regions.
    assert state.sparse_ops == len(sparse), f"plan made {sparse} sparse; the graph has {state.sparse_ops} sparse ops"
    if sparse:
        assert state.regions, "sparse weights but no TVM region"
    for name in state.regions:
        calls = state.gm.get_submodule(name).calls
        assert calls > calls_before.get((id(state), name), 0), f"region {name} did not run on the second call"


@settings(max_examples=100, **CASES)
@given(programs())
def test_generated_programs_match_eager(program):
    check_program(program)


@pytest.mark.slow
@settings(max_examples=int(os.environ.get("SPARSECC_GENERATED_CASES", "1000")), **CASES)
@given(programs(max_steps=10))
def test_many_generated_programs_match_eager(program):
    check_program(program)


# ------------------------------------------------------------------------------ regressions the generator found

OPTIONS = (("cost_model", "break-even"), ("min_weight_numel", 1), ("dense_backend", "eager"), ("offload", "all"),
           ("formats", ("csr",)))


def test_layer_norm_without_affine_over_one_feature():
    # A layer norm with neither weight nor bias read only its input; TVM's RewriteDataflowReshape then took the
    # kernel for a reshape and failed analysing it (the build fell back to PyTorch). Width 1 made it reachable.
    program = Program(lead=(2, 7), width=5, vocab=0, extra_outputs=(), options=OPTIONS, steps=(
        Step("linear", (WeightSpec(1, 5, "unstructured", 0.3, (1, 4), 3),)),
        Step("layer_norm", args=(1, 1e-12)),
    ))
    check_program(program)
