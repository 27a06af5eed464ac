"""The attention and layer-norm TIR kernels, built for the host and checked against PyTorch in float64, next to
PyTorch's own float32 error; also in the token-tiled layout the sparse kernels hand over in."""

import pytest
import torch
import tvm

from sparsecc.codegen.kernels.cpu.attention import attention_kernel, can_tile, query_tile
from sparsecc.kernel_work import from_token_tiles, to_token_tiles, token_tiled_shape
from sparsecc.codegen.kernels.cpu.layer_norm import layer_norm_kernel, token_tile
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


@pytest.mark.parametrize("batch, tokens", [(1, 128), (1, 37), (2, 64), (1, 5)])
@pytest.mark.parametrize("tiled", [("q", "k", "v", "out"), ("q",), ("out",), ("k", "v")])
def test_attention_kernel_token_tiled(batch, tokens, tiled):
    heads, head_dim, scale = 3, 8, 0.3
    assert can_tile(batch, tokens, "float32")
    tile = query_tile(tokens, "float32")
    g = torch.Generator().manual_seed(tokens)
    q, k, v = (torch.randn(batch, tokens, heads * head_dim, generator=g) * 2 for _ in range(3))
    inputs = [to_token_tiles(t, tile, float("nan")) if name in tiled else t for name, t in zip("qkv", (q, k, v))]
    out = torch.full(token_tiled_shape(batch * tokens, heads * head_dim, tile) if "out" in tiled else q.shape,
                     float("nan"))
    call(build(attention_kernel(batch, tokens, heads, head_dim, scale, "float32", frozenset(tiled))), *inputs, out)
    actual = from_token_tiles(out, q.shape) if "out" in tiled else out
    exact = attention(q.double(), k.double(), v.double(), heads, scale)
    assert error(actual, exact) <= max(2 * error(attention(q, k, v, heads, scale), exact), 1e-5)


def test_attention_tiles_must_not_straddle_sequences():
    assert not can_tile(2, 37, "float32")
    with pytest.raises(ValueError, match="straddle"):
        attention_kernel(2, 37, 2, 4, 0.5, "float32", frozenset({"q"}))


def test_attention_kernel_fp64():
    q, k, v = (torch.randn(2, 9, 8, dtype=torch.float64) for _ in range(3))
    out = torch.empty_like(q)
    call(build(attention_kernel(2, 9, 2, 4, 0.5, "float64")), q, k, v, out)
    torch.testing.assert_close(out, attention(q, k, v, 2, 0.5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["rows", "tiled", "tiled_in", "tiled_out"])
@pytest.mark.parametrize("rows, width, affine", [(128, 768, True), (33, 48, False), (7, 20, True), (1, 3, True)])
def test_layer_norm_kernel_matches_pytorch(rows, width, affine, layout):
    g = torch.Generator().manual_seed(rows)
    # An offset mean: a one-pass variance would lose digits here.
    x = torch.randn(rows, width, generator=g) * 3 + 50
    weight, bias = torch.randn(width, generator=g), torch.randn(width, generator=g)
    params = (weight, bias) if affine else (torch.zeros(1), torch.zeros(1))
    x_tiled, y_tiled = layout in ("tiled", "tiled_in"), layout in ("tiled", "tiled_out")
    tile = token_tile(rows)
    out = torch.full(token_tiled_shape(rows, width, tile) if y_tiled else x.shape, float("nan"))
    kernel = layer_norm_kernel(rows, width, 1e-5, "float32", affine, x_tiled, y_tiled)
    call(build(kernel), to_token_tiles(x, tile, float("nan")) if x_tiled else x, *params, out)
    out = from_token_tiles(out, x.shape) if y_tiled else out
    w, b = (weight, bias) if affine else (None, None)
    exact = torch.nn.functional.layer_norm(x.double(), (width,), None if w is None else w.double(),
                                           None if b is None else b.double(), 1e-5)
    torch_error = error(torch.nn.functional.layer_norm(x, (width,), w, b, 1e-5), exact)
    assert error(out, exact) <= max(3 * torch_error, 1e-5)
