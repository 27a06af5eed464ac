"""The attention and layer-norm TIR kernels (offload="all"), built for the host and checked against PyTorch in
float64, next to PyTorch's own float32 error."""

import pytest
import torch
import tvm

from sparsecc.codegen.kernels.attention import attention_kernel
from sparsecc.codegen.kernels.layer_norm import layer_norm_kernel
from sparsecc.codegen.targets import host_target
from sparsecc.ops import attention


def build(kernel):
    return tvm.compile(tvm.IRModule({"kernel": kernel.with_attr("global_symbol", "kernel")}), target=host_target(2))


def call(lib, *tensors):
    lib["kernel"](*[tvm.runtime.from_dlpack(t) for t in tensors])


def error(actual, exact):
    return (actual.double() - exact).abs().max().item()


@pytest.mark.parametrize("batch, tokens, heads, head_dim", [
    (1, 128, 12, 64),  # BERT-base
    (2, 37, 3, 6),  # tokens neither a multiple of the query tile nor of the key block; head_dim in pairs
    (3, 1, 2, 5),  # one token; odd head_dim
    (1, 5, 1, 4),
])
def test_attention_kernel_matches_pytorch(batch, tokens, heads, head_dim):
    g = torch.Generator().manual_seed(tokens)
    q, k, v = (torch.randn(batch, tokens, heads * head_dim, generator=g) * 2 for _ in range(3))
    scale = 0.3
    out = torch.full_like(q, float("nan"))
    call(build(attention_kernel(batch, tokens, heads, head_dim, scale, "float32")), q, k, v, out)
    exact = attention(q.double(), k.double(), v.double(), heads, scale)
    torch_error = error(attention(q, k, v, heads, scale), exact)
    assert error(out, exact) <= max(2 * torch_error, 1e-5)


def test_attention_kernel_fp64():
    q, k, v = (torch.randn(2, 9, 8, dtype=torch.float64) for _ in range(3))
    out = torch.empty_like(q)
    call(build(attention_kernel(2, 9, 2, 4, 0.5, "float64")), q, k, v, out)
    torch.testing.assert_close(out, attention(q, k, v, 2, 0.5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows, width, affine", [(128, 768, True), (33, 48, False), (7, 20, True), (1, 3, True)])
def test_layer_norm_kernel_matches_pytorch(rows, width, affine):
    g = torch.Generator().manual_seed(rows)
    # An offset mean: a one-pass variance would lose digits here.
    x = torch.randn(rows, width, generator=g) * 3 + 50
    weight, bias = torch.randn(width, generator=g), torch.randn(width, generator=g)
    params = (weight, bias) if affine else (torch.zeros(1), torch.zeros(1))
    out = torch.full_like(x, float("nan"))
    call(build(layer_norm_kernel(rows, width, 1e-5, "float32", affine)), x, *params, out)
    w, b = (weight, bias) if affine else (None, None)
    exact = torch.nn.functional.layer_norm(x.double(), (width,), None if w is None else w.double(),
                                           None if b is None else b.double(), 1e-5)
    torch_error = error(torch.nn.functional.layer_norm(x, (width,), w, b, 1e-5), exact)
    assert error(out, exact) <= max(3 * torch_error, 1e-5)
