import networkx as nx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.shape_prop import ShapeProp

from sparsecc.ops import SPARSE_OPS
from sparsecc.passes.analyze_weights import analyze_weights
from sparsecc.passes.fold_constants import fold_constants
from sparsecc.passes.partition_regions import REGION_PREFIX, find_regions, partition_regions
from sparsecc.passes.plan_formats import plan_formats
from sparsecc.passes.rewrite_sparse import rewrite_sparse
from sparsecc.passes.runner import run_passes
from sparsecc.settings import Settings

S = Settings(min_weight_numel=1, cost_model="break-even").resolved()  # plans that do not depend on timing


def sparse_matrix(rows, cols, density=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) >= density] = 0
    return w


def rewritten(fn, *inputs):
    with torch.no_grad():
        gm = make_fx(fn)(*inputs)
    fold_constants(gm, S)
    analyze_weights(gm, S)
    run_passes(gm, S, (("rewrite_sparse", lambda g, s: rewrite_sparse(g, s, plan_formats(g, s))),))
    return gm


def sparse_nodes(gm):
    return [n for n in gm.graph.nodes if n.target in SPARSE_OPS]


W = sparse_matrix(48, 40)  # (out=48, in=40) when used as nn.Linear weight
B = torch.randn(48)
B_2D = torch.randn(6, 48)


@pytest.mark.parametrize("name, fn, fused_bias", [
    ("linear", lambda x: torch.nn.functional.linear(x, W, B), True),
    ("linear_3d", lambda x: torch.nn.functional.linear(x.view(2, 3, 40), W, B), True),
    ("right_no_bias", lambda x: x @ W.t(), False),
    ("left", lambda x: (W @ x.t()).t(), False),
    ("left_addmm", lambda x: torch.addmm(B.unsqueeze(1), W, x.t()), False),
    ("bias_2d", lambda x: torch.addmm(B_2D, x, W.t()), False),
])
def test_rewrite_runs_in_eager_and_matches(name, fn, fused_bias):
    x = torch.randn(6, 40)
    gm = rewritten(fn, x)
    nodes = sparse_nodes(gm)
    assert len(nodes) == 1 and (nodes[0].args[4] is not None) == fused_bias
    assert not [n for n in gm.graph.nodes if n.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)]
    torch.testing.assert_close(gm(x), fn(x), rtol=1e-5, atol=1e-5)


def test_weight_used_twice_is_packed_once():
    gm = rewritten(lambda x: x @ W.t() + (x * 2) @ W.t(), torch.randn(3, 40))
    assert len(sparse_nodes(gm)) == 2
    assert len({n.args[3] for n in sparse_nodes(gm)}) == 1


def prepared(fn, *inputs):
    gm = rewritten(fn, *inputs)
    ShapeProp(gm).propagate(*inputs)
    return gm


def is_sparse(node):
    return node.target in SPARSE_OPS


def test_op_outside_regions_keeps_graph_acyclic():
    # a = sparse(x); b = cumsum(a) [unsupported]; c = sparse(x) + b: merging both sparse ops and the add into
    # one region would need b's value inside it before it exists. The two sparse ops read the same x and neither
    # needs b, so they form one region; the add stays outside.
    w2 = sparse_matrix(48, 40, seed=1)

    def fn(x):
        a = x @ W.t()
        b = torch.cumsum(a, 1)
        return (x @ w2.t()) + b

    x = torch.randn(5, 40)
    gm = prepared(fn, x)
    supported = lambda n: is_sparse(n) or n.target == torch.ops.aten.add.Tensor  # noqa: E731
    regions = find_regions(gm, supported, is_sparse)
    assert len(regions) == 1
    assert sum(is_sparse(n) for n in regions[0]) == 2
    assert not any(n.target == torch.ops.aten.add.Tensor for n in regions[0])
    fused = partition_regions(gm, S, supported, is_sparse)
    assert len([n for n in fused.graph.nodes if n.op == "call_module"]) == 1
    torch.testing.assert_close(fused(x), fn(x), rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_regions_never_form_cycles(data):
    """Random DAGs with random supported/unsupported nodes: the region graph must stay acyclic."""
    n = data.draw(st.integers(3, 25))
    graph = fx.Graph()
    nodes = [graph.placeholder("x")]
    flags = {}
    for i in range(n):
        k = data.draw(st.integers(1, min(2, len(nodes))))
        preds = data.draw(st.lists(st.sampled_from(nodes), min_size=k, max_size=k))
        node = graph.call_function(torch.add, tuple(preds) if len(preds) == 2 else (preds[0], preds[0]))
        flags[node] = data.draw(st.booleans())
        nodes.append(node)
    graph.output(nodes[-1])
    gm = fx.GraphModule(torch.nn.Module(), graph)
    regions = find_regions(gm, lambda node: flags[node], lambda node: True)
    owner = {node: i for i, r in enumerate(regions) for node in r}
    quotient = nx.DiGraph()
    for node in gm.graph.nodes:
        for user in node.users:
            a, b = owner.get(node, node), owner.get(user, user)
            if a != b:
                quotient.add_edge(a, b)
    assert nx.is_directed_acyclic_graph(quotient)
    assert all(flags[node] for r in regions for node in r if node.op == "call_function")
    fused = partition_regions(gm, S, lambda node: flags[node], lambda node: True)
    x = torch.randn(3)
    torch.testing.assert_close(fused(x), gm(x))
    assert len([m for m in fused.graph.nodes if str(m.target).startswith(REGION_PREFIX)]) == len(regions)


def fused(fn, *inputs):
    from sparsecc.passes.fuse_epilogues import fuse_epilogues

    gm = rewritten(fn, *inputs)
    run_passes(gm, S, (("fuse_epilogues", fuse_epilogues),))
    return gm


W2 = sparse_matrix(48, 48, seed=3)


@pytest.mark.parametrize("name, fn, activation, residual", [
    ("gelu_through_view", lambda x: torch.nn.functional.gelu(torch.nn.functional.linear(x.view(2, 3, 40), W, B)),
     "gelu", False),
    ("relu_2d", lambda x: torch.relu(torch.nn.functional.linear(x, W, B)), "relu", False),
    ("gelu_tanh", lambda x: torch.nn.functional.gelu(x @ W.t(), approximate="tanh"), "gelu_tanh", False),
    ("residual_after_relu",
     lambda x: (lambda r: torch.relu(torch.nn.functional.linear(x, W2[:, :40], B)) + r)(x.repeat(1, 2)[:, :48]),
     "relu", True),
    ("residual_3d", lambda x: torch.nn.functional.linear(x.view(2, 3, 40), W, B) + torch.ones(2, 3, 48), "none", True),
])
def test_epilogues_fuse_and_match(name, fn, activation, residual):
    x = torch.randn(6, 40)
    gm = fused(fn, x)
    node = sparse_nodes(gm)[0]
    args = tuple(node.args) + ("none", None)[len(node.args) - 6:]
    assert args[6] == activation and (args[7] is not None) == residual
    remaining = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert not {"aten.relu.default", "aten.gelu.default"} & remaining
    torch.testing.assert_close(gm(x), fn(x), rtol=1e-5, atol=1e-5)


def test_broadcast_add_and_later_residual_are_not_fused():
    def fn(x):
        y = torch.nn.functional.linear(x, W, B)
        return y + B, (x @ W.t()) + torch.relu(x @ W2[:, :40].t() * 2)

    x = torch.randn(5, 40)
    gm = fused(fn, x)
    assert all(len(n.args) < 8 or n.args[7] is None for n in sparse_nodes(gm))
    torch.testing.assert_close(gm(x), fn(x), rtol=1e-5, atol=1e-5)
