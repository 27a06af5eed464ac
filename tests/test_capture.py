import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as prune
from torch import fx

from sparsecc.capture import capture, user_name
from sparsecc.errors import UnsupportedError
from sparsecc.settings import Settings


def dynamo_graph(model, *inputs):
    """The GraphModule and example inputs dynamo hands a backend."""
    seen = []

    def grab(gm, example_inputs):
        seen.append((gm, list(example_inputs)))
        return gm.forward

    torch.compile(model, backend=grab)(*inputs)
    assert len(seen) == 1
    return seen[0]


def ops(gm: fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def constants(gm):
    return {n.meta.get("sparsecc_origin"): getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}


def test_linear_becomes_aten_with_folded_transpose():
    model = nn.Linear(8, 5)
    gm, ex = dynamo_graph(model, torch.randn(3, 8))
    cap = capture(gm, ex, Settings())
    assert "aten.addmm.default" in ops(cap.gm) and "aten.t.default" not in ops(cap.gm)
    consts = constants(cap.gm)
    torch.testing.assert_close(consts["weight"], model.weight.detach().t())
    assert cap.input_positions == (2,) and cap.weight_positions == (0, 1)


def test_prune_mask_is_folded_into_the_weight():
    model = nn.Linear(16, 8)
    prune.l1_unstructured(model, "weight", amount=0.75)
    gm, ex = dynamo_graph(model, torch.randn(2, 16))
    cap = capture(gm, ex, Settings())
    assert "aten.mul.Tensor" not in ops(cap.gm)
    used = [getattr(cap.gm, n.args[2].target) for n in cap.gm.graph.nodes if n.target == torch.ops.aten.addmm.default]
    assert int(torch.count_nonzero(used[0])) == 16 * 8 // 4


class Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).transpose(-1, -2)


def test_parametrization_is_folded():
    model = nn.Linear(6, 6)
    parametrize.register_parametrization(model, "weight", Symmetric())
    gm, ex = dynamo_graph(model, torch.randn(2, 6))
    cap = capture(gm, ex, Settings())
    assert not {"aten.triu.default", "aten.transpose.int"} & set(ops(cap.gm))
    x = torch.randn(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(cap.gm(x)[0], model(x))


class WritesWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(3))

    def forward(self, x):
        self.count.add_(1)
        return x + self.count


def test_graph_that_writes_a_weight_is_rejected():
    gm, ex = dynamo_graph(WritesWeight(), torch.randn(3))
    with pytest.raises(UnsupportedError, match="writes to weight 'count'"):
        capture(gm, ex, Settings())


@pytest.mark.parametrize("placeholder, name", [
    ("L_self_modules_encoder_modules_layer_modules_0_modules_output_modules_dense_parameters_weight_",
     "encoder.layer.0.output.dense.weight"),
    ("l_fn_modules_2_parameters_bias_", "2.bias"),
    ("L_self_buffers_running_mean_", "running_mean"),
])
def test_user_names(placeholder, name):
    assert user_name(placeholder) == name
