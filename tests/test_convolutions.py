"""Convolutions (passes/pointwise_conv.py): 1x1 convolutions with sparse weights run as sparse matrix products over
channels-last pixels, matching eager PyTorch in values and memory format; every other convolution stays in PyTorch
with the reason in the plan."""

import pytest
import torch
import torch.nn as nn
from conftest import CompileWatch, compile_sparsecc

import sparsecc
from sparsecc.tolerances import TOLERANCES

FP32 = TOLERANCES[torch.float32]


def prune_convs_(model: nn.Module, sparsity: float = 0.9) -> nn.Module:
    """Every convolution weight pruned by magnitude to `sparsity` zeros."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                w = module.weight
                w[w.abs() < w.abs().flatten().kthvalue(max(1, int(sparsity * w.numel()))).values] = 0
    return model


def run_both(model, x, **options):
    model = model.eval()
    compiled = compile_sparsecc(model, min_weight_numel=1, **options)
    with torch.no_grad(), CompileWatch() as watch:
        compiled(x.clone())
        actual = compiled(x)
        expected = model(x)
    return actual, expected, watch


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride, bias", [(1, True), (2, False), (2, True)])
def test_pointwise_convolutions_run_sparse(no_fallback, channels_last, stride, bias):
    model = prune_convs_(nn.Sequential(nn.Conv2d(24, 40, 1, bias=bias), nn.ReLU(),
                                       nn.Conv2d(40, 16, 1, stride=stride, bias=bias), nn.GELU()))
    x = torch.randn(2, 24, 9, 7)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    actual, expected, watch = run_both(model, x)
    torch.testing.assert_close(actual, expected, **FP32)
    assert actual.stride() == expected.stride()  # the memory format eager gives: later views behave the same
    assert watch.sparse_ops == 2 and watch.region_calls >= 2
    plan = watch.graphs[0].state.plan
    assert all(c.format.value == "csr" for c in plan.choices.values())
    assert "40x24x1x1 as 40x24" in watch.graphs[0].report()


class OtherConvolutions(nn.Module):
    def __init__(self):
        super().__init__()
        self.k3 = nn.Conv2d(16, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 1, groups=4)
        self.padded = nn.Conv2d(16, 16, 1, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 1)
        self.head = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.head(self.up(self.padded(self.grouped(self.k3(x)))))


def test_other_convolutions_stay_in_pytorch_with_the_reason(no_fallback):
    model = prune_convs_(OtherConvolutions())
    actual, expected, watch = run_both(model, torch.randn(1, 16, 6, 6))
    torch.testing.assert_close(actual, expected, **FP32)
    plan = watch.graphs[0].state.plan
    reasons = {name: c.reason for name, c in plan.choices.items() if c.format.value == "dense"}
    assert any("3x3 convolution" in r for r in reasons.values()), reasons
    assert len(reasons) == 4 and watch.sparse_ops == 1  # only `head`, a plain 1x1 convolution, goes sparse


def test_resnet_bottlenecks_from_a_transformers_config(no_fallback):
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="bottleneck")
    model = prune_convs_(ResNetModel(config))
    actual, expected, watch = run_both(model, torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, **FP32)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, **FP32)
    pointwise = sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))
    assert watch.sparse_ops == pointwise == 6 and watch.region_calls > 0


def test_pointwise_convolution_artifact_loads_and_matches(tmp_path):
    model = prune_convs_(nn.Sequential(nn.Conv2d(24, 40, 1), nn.ReLU(), nn.Conv2d(40, 16, 1, stride=2))).eval()
    x = torch.randn(2, 24, 9, 7)
    path = sparsecc.export(model, (x,), tmp_path / "art", min_weight_numel=1, cost_model="break-even")
    loaded = sparsecc.load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), **FP32)
    assert loaded.region_calls >= 1 and len(loaded.manifest["sparse_weights"]) == 2
