"""Convolutions: 1x1 convolutions with sparse weights run as sparse matrix products over channels-last pixels
(passes/pointwise_conv.py), k x k ones through the direct kernel (passes/direct_conv.py), matching eager PyTorch in
values and memory format; grouped and transposed convolutions stay in PyTorch with the reason in the plan."""

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


def in_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.to(memory_format=torch.channels_last) if channels_last else x


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
    x = in_layout(x, channels_last)
    actual, expected, watch = run_both(model, x)
    torch.testing.assert_close(actual, expected, **FP32)
    assert actual.stride() == expected.stride()  # the memory format eager gives: later views behave the same
    assert watch.sparse_ops == 2 and watch.region_calls >= 2
    plan = watch.graphs[0].state.plan
    assert all(c.format.value == "csr" for c in plan.choices.values())
    assert "40x24x1x1 as 40x24" in watch.graphs[0].report()


@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    (3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2), (5, 2, 0, 1), ((1, 3), 1, (0, 1), 1), (7, 2, 3, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_direct_convolutions_run_sparse(no_fallback, kernel, stride, padding, dilation, channels_last):
    model = prune_convs_(nn.Sequential(nn.Conv2d(12, 20, kernel, stride, padding, dilation), nn.ReLU(),
                                       nn.Conv2d(20, 8, 3, padding=1, bias=False)))
    x = torch.randn(2, 12, 15, 13)
    x = in_layout(x, channels_last)
    actual, expected, watch = run_both(model, x)
    torch.testing.assert_close(actual, expected, **FP32)
    assert actual.stride() == expected.stride()
    graph = watch.graphs[0]
    assert watch.sparse_ops == 2 and watch.region_calls >= 1
    kernels = [n for n in graph.state.gm.graph.nodes if n.op == "call_module"]
    assert kernels, "the sparse convolutions ran outside any TVM region"
    assert all(c.format.value == "csr" and "convolution, direct kernel" in c.reason
               for c in graph.state.plan.choices.values())


def test_direct_convolution_fuses_relu_and_matches_the_eager_reference():
    """The rewritten graph's sparsecc::sparse_conv2d (its eager reference, torch.sparse) and the kernel agree."""
    from sparsecc.passes.direct_conv import ConvGeometry
    from sparsecc.planning.conv_timing import DirectConvTimer, phase_input_eager
    from sparsecc.passes.direct_conv import phase_weight
    from sparsecc.packing import pack_blocks
    from sparsecc.codegen.targets import host_target

    torch.manual_seed(0)
    geo = ConvGeometry(2, 16, (11, 9), 24, (3, 3), (2, 2), (1, 1), (1, 1), (6, 5), "float32")
    weight = torch.randn(24, 16, 3, 3) * (torch.rand(24, 16, 3, 3) < 0.2)
    x = torch.randn(2, 16, 11, 9)
    matrix = phase_weight(weight, geo)
    indptr, indices, values = pack_blocks(matrix, (1, 1))
    reference = torch.ops.sparsecc.sparse_conv2d(phase_input_eager(x, geo), indptr, indices, values, None, 24,
                                                 list(geo.phase_kernel), list(geo.out_size), "relu")
    torch.testing.assert_close(reference, torch.relu(torch.nn.functional.conv2d(x, weight, stride=2, padding=1)),
                               **FP32)
    # The timer checks its kernel against PyTorch's convolution and raises when they differ.
    assert DirectConvTimer(host_target(1)).seconds(weight, matrix, geo, runs=1) > 0


def test_a_denser_convolution_measured_slower_stays_dense(no_fallback):
    # Fully stored weights: the direct kernel does all of oneDNN's multiply-adds at a fraction of its rate. (On tiny
    # convolutions, 16 channels at 12x12, PyTorch's fixed cost per call let the kernel win even so.)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1)).eval()
    actual, expected, watch = run_both(model, torch.randn(1, 64, 28, 28), cost_model="measured")
    torch.testing.assert_close(actual, expected, **FP32)
    choice = next(iter(watch.graphs[0].state.plan.choices.values()))
    assert choice.format.value == "dense" and "measured" in choice.reason and choice.measured
    assert watch.sparse_ops == 0


class OtherConvolutions(nn.Module):
    def __init__(self):
        super().__init__()
        self.k3 = nn.Conv2d(16, 16, 3, padding=1, groups=2)
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
    assert any("3x3 convolution in 2 groups" in r for r in reasons.values()), reasons
    assert any("transposed" in r for r in reasons.values()), reasons
    # `head` is a plain 1x1 convolution; `padded` (1x1 with padding) goes through the direct kernel.
    assert len(reasons) == 3 and watch.sparse_ops == 2


def test_resnet_bottlenecks_from_a_transformers_config(no_fallback):
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="bottleneck")
    model = prune_convs_(ResNetModel(config))
    actual, expected, watch = run_both(model, torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, **FP32)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, **FP32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # Every convolution, the 7x7 stem and the 3x3s included, goes sparse (1x1 as products, the others direct).
    assert watch.sparse_ops == len(convs) and watch.region_calls > 0


def test_convolution_artifact_loads_and_matches(tmp_path):
    model = prune_convs_(nn.Sequential(nn.Conv2d(24, 40, 1), nn.ReLU(), nn.Conv2d(40, 16, 1, stride=2), nn.ReLU(),
                                       nn.Conv2d(16, 16, 3, stride=2, padding=1))).eval()
    x = torch.randn(2, 24, 9, 7)
    path = sparsecc.export(model, (x,), tmp_path / "art", min_weight_numel=1, cost_model="break-even")
    loaded = sparsecc.load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), **FP32)
    assert loaded.region_calls >= 1 and len(loaded.manifest["sparse_weights"]) == 3


class ResidualBlock(nn.Module):
    """act(conv(act(conv(x))) + x): the end of a ResNet basic block, with the activation to fuse."""

    def __init__(self, channels: int, act: nn.Module):
        super().__init__()
        self.a = nn.Conv2d(channels, channels, 3, padding=1)
        self.b = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = act

    def forward(self, x):
        return self.act(self.b(self.act(self.a(x))) + x)


@pytest.mark.parametrize("act, aten_name", [(nn.ReLU(), "relu"), (nn.ReLU6(), "hardtanh"), (nn.SiLU(), "silu")])
def test_residual_add_and_activation_fuse_into_the_direct_kernel(no_fallback, act, aten_name):
    model = prune_convs_(nn.Sequential(ResidualBlock(16, act), ResidualBlock(16, act)))
    actual, expected, watch = run_both(model, torch.randn(2, 16, 12, 12), cost_model="break-even")
    torch.testing.assert_close(actual, expected, **FP32)
    gm = watch.graphs[0].state.gm
    left = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    # Every add and activation went into a kernel's epilogue, so the four convolutions are one region.
    assert not any(aten_name in t or "add" in t for t in left), left
    assert watch.sparse_ops == 4 and len(watch.graphs[0].state.regions) == 1


def test_a_1x1_convolution_takes_the_direct_kernel_only_when_it_measures_faster():
    from sparsecc.formats import DIRECT_KERNEL, FormatChoice, SparseFormat, WeightSparsity, WeightUse
    from sparsecc.passes.plan_formats import direct_pointwise, prefer_direct_pointwise
    from sparsecc.settings import Settings

    use = WeightUse("conv1x1", 1, "conv", 3136, conv="{}")
    w = WeightSparsity(name="w", shape=(256, 64, 1, 1), dtype="float32", nnz=1638, source_layout="strided",
                       uses=(use,))
    assert direct_pointwise(w)
    product = FormatChoice(SparseFormat.BSR, (4, 1), 0.7, "bsr4x1 measured", {}, {"dense": 430.0, "bsr4x1": 300.0})
    settings = Settings()
    faster = prefer_direct_pointwise(product, w, settings, lambda: {"csr": 150e-6, "dense": 430e-6})
    assert faster.kernel == DIRECT_KERNEL and faster.format is SparseFormat.CSR and "150 us" in faster.reason
    slower = prefer_direct_pointwise(product, w, settings, lambda: {"csr": 320e-6, "dense": 430e-6})
    assert slower.kernel == "" and slower.block == (4, 1) and slower.measured["direct"] == 320.0
    # PyTorch's own convolution beating the product it was priced against: dense.
    dense = prefer_direct_pointwise(product, w, settings, lambda: {"csr": 320e-6, "dense": 200e-6})
    assert dense.format is SparseFormat.DENSE and "PyTorch's convolution measured faster" in dense.reason
    assert prefer_direct_pointwise(product, w, settings, lambda: None) is product  # timing failed: unchanged


class BasicBlock(nn.Module):
    """torchvision's ResNet-18 block, written out: conv-BN-ReLU, conv-BN, plus the (projected) input, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


def resnet18(width: int = 16) -> nn.Module:
    """ResNet-18's layout (stem, 4 stages of 2 basic blocks, pooling, classifier) at a small width."""
    widths = [width, 2 * width, 4 * width, 8 * width]
    layers = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    c_in = width
    for i, c in enumerate(widths):
        layers += [BasicBlock(c_in, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)]
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10)]
    return nn.Sequential(*layers)


def test_resnet18_written_as_modules_runs_every_block_sparse(no_fallback):
    torch.manual_seed(0)
    model = resnet18()
    with torch.no_grad():  # batch-norm statistics that are not the identity, so folding them is tested
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model = prune_convs_(model)
    actual, expected, watch = run_both(model, torch.randn(2, 3, 64, 64), cost_model="break-even")
    torch.testing.assert_close(actual, expected, **FP32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert watch.sparse_ops == len(convs)
    gm = watch.graphs[0].state.gm
    left = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert not any("batch_norm" in t for t in left), left  # folded into the convolutions
    # Every add and ReLU fused into an epilogue (the strided 1x1 projections too: over NCHW they take the direct
    # kernel) and the max pool in the region: only the classifier's pooling and product are left in PyTorch.
    assert "aten.add.Tensor" not in left and "aten.relu.default" not in left, left
    assert len(watch.graphs[0].state.regions) == 1


def test_mobilenet_v2_from_a_transformers_config(no_fallback):
    from transformers import MobileNetV2Config, MobileNetV2Model

    torch.manual_seed(0)
    config = MobileNetV2Config(depth_multiplier=0.35, image_size=64)
    model = prune_convs_(MobileNetV2Model(config))
    actual, expected, watch = run_both(model, torch.randn(1, 3, 64, 64), cost_model="break-even")
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, **FP32)
    plan = watch.graphs[0].state.plan
    depthwise = [c for c in plan.choices.values() if "groups" in c.reason]
    assert depthwise and all(c.format.value == "dense" for c in depthwise)  # depthwise stays in PyTorch
    assert watch.sparse_ops >= 10 and watch.region_calls > 0


def test_channels_last_chains_stay_in_the_kernels_layout_until_the_output(no_fallback):
    model = prune_convs_(nn.Sequential(ResidualBlock(16, nn.ReLU()), nn.Conv2d(16, 16, 3, 2, 1),
                                       ResidualBlock(16, nn.ReLU())))
    x = torch.randn(2, 16, 12, 12).to(memory_format=torch.channels_last)
    actual, expected, watch = run_both(model, x, cost_model="break-even")
    torch.testing.assert_close(actual, expected, **FP32)
    assert actual.stride() == expected.stride()  # channels-last, as eager gives it
    gm = watch.graphs[0].state.gm
    copies = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.clone.default]
    # One copy back to channels-last, at the graph's output; none between the five convolutions, so one region.
    assert len(copies) == 1 and watch.sparse_ops == 5 and len(watch.graphs[0].state.regions) == 1


def test_a_strided_1x1_convolution_reads_only_the_phase_it_uses():
    from sparsecc.passes.direct_conv import ConvGeometry, phase_weight
    from sparsecc.planning.conv_timing import phase_input_eager

    geo = ConvGeometry(2, 8, (9, 7), 4, (1, 1), (2, 2), (0, 0), (1, 1), (5, 4), "float32")
    assert geo.single_phase and geo.phase_channels == 8 and geo.phase_kernel == (1, 1)
    w = torch.randn(4, 8, 1, 1)
    x = torch.randn(2, 8, 9, 7)
    phases = phase_input_eager(x, geo)
    hq, wq = geo.phase_size
    assert phases.shape == (2, 8, hq, wq)
    # The stride-1 1x1 convolution of the strided slice is the strided convolution.
    y = torch.nn.functional.conv2d(phases, phase_weight(w, geo).reshape(4, 8, 1, 1))[:, :, :5, :4]
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, stride=2), **FP32)
    assert not ConvGeometry(1, 8, (9, 9), 4, (3, 3), (2, 2), (1, 1), (1, 1), (5, 5), "float32").single_phase


@pytest.mark.parametrize("pool", [nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2), nn.MaxPool2d(3, 2, ceil_mode=True),
                                  nn.MaxPool2d(3, 1, 1)])
def test_max_pool_between_sparse_convolutions_joins_their_region(no_fallback, pool):
    model = prune_convs_(nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), pool,
                                       nn.Conv2d(12, 8, 3, padding=1)))
    actual, expected, watch = run_both(model, torch.randn(2, 8, 13, 11), cost_model="break-even")
    torch.testing.assert_close(actual, expected, **FP32)
    gm = watch.graphs[0].state.gm
    left = [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "getitem" not in str(n.target)]
    assert left == [] and len(watch.graphs[0].state.regions) == 1 and watch.sparse_ops == 2


@pytest.mark.parametrize("channels_last", [False, True])
def test_dense_convolutions_run_on_a_weight_reordered_once(no_fallback, channels_last):
    from sparsecc.ops import packed_conv_available

    if not packed_conv_available():
        pytest.skip("this PyTorch build has no oneDNN convolution")
    # Dense weights (nothing to sparsify) and a depthwise convolution: all stay dense.
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                          nn.ReLU(), nn.Conv2d(16, 8, 1, stride=2)).eval()
    x = torch.randn(2, 8, 12, 12)
    x = in_layout(x, channels_last)
    actual, expected, watch = run_both(model, x)
    torch.testing.assert_close(actual, expected, **FP32)
    assert actual.stride() == expected.stride()
    calls = [n for n in watch.graphs[0].state.gm.graph.nodes if n.op == "call_function"]
    packed = [n for n in calls if n.target is torch.ops.sparsecc.packed_conv2d.default]
    assert len(packed) == 3 and len(calls) == 3  # the ReLUs went into oneDNN's post-op
    assert [n.args[7] for n in packed] == ["relu", "relu", "none"]
    # Only the last one's layout is seen (the graph's output): the others keep oneDNN's.
    assert [n.args[8] for n in packed] == ["any", "any", "channels_last" if channels_last else "contiguous"]
