"""The CSR TIR kernel, built by TVM for the host and checked against a dense reference."""

import dataclasses

import pytest
import torch
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax

from sparsecc.codegen.kernels.cpu.bsr import bsr_linear_kernel
from sparsecc.kernel_work import MAX_TASKS, ROW_WORK, default_knobs, task_spans, to_token_tiles, token_tiled_shape, work_prefix
from sparsecc.codegen.targets import host_target
from sparsecc.ops import ACTIVATIONS
from sparsecc.packing import pack_blocks, pack_ell, uniform_row_blocks

BLOCKS = [(1, 1), (1, 4), (4, 1), (8, 1), (16, 1), (4, 4), (8, 8)]


def run_kernel(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, block=(1, 1), activation="none",
               residual: torch.Tensor | None = None, ell: bool = False, knobs=None) -> torch.Tensor:
    """The kernel's y for x and w packed in `block`s (`ell`: rows padded to one length); rows that all store the
    same number of blocks get the kernel with that number as a constant, as lowering does."""
    m, k = x.shape
    n = w.shape[0]
    dtype = str(x.dtype).removeprefix("torch.")
    packed = (pack_ell if ell else pack_blocks)(w, block)
    columns = str(packed[1].dtype).removeprefix("torch.")
    kernel = bsr_linear_kernel(m, n, k, block, dtype, activation, residual is not None, column_dtype=columns,
                               knobs=knobs, row_blocks=uniform_row_blocks(packed[0]))
    lib = tvm.compile(tvm.IRModule({"kernel": kernel.with_attr("global_symbol", "kernel")}), target=host_target(2))
    arrays = [x, *packed, bias if bias is not None else torch.zeros(n, dtype=x.dtype),
              residual if residual is not None else torch.zeros(1, 1, dtype=x.dtype)]
    out = torch.empty(m, n, dtype=x.dtype)
    lib["kernel"](*[tvm.runtime.from_dlpack(a.contiguous()) for a in arrays], tvm.runtime.from_dlpack(out))
    return out


def reference(x, w, bias, activation="none", residual=None):
    y = x @ w.t()
    y = y + bias if bias is not None else y
    y = ACTIVATIONS[activation](y)
    return y + residual if residual is not None else y


def pattern(n, k, kind, density, seed, block=(1, 1)):
    """A weight whose non-zeros sit in r x c blocks (any pattern is one of 1 x 1 blocks)."""
    r, c = block
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    occupied = torch.rand(n // r, k // c, generator=g) < density
    if kind == "empty_rows":
        occupied[::2] = False
    elif kind == "single":
        occupied[:] = False
        occupied[(n // r) // 2, (k // c) // 3] = True
    elif kind == "dense_rows":
        occupied[0] = True
    elif kind == "zeros":
        occupied[:] = False
    elif kind == "skewed":  # rows thin out from 2x the density to none: tasks span very different row counts
        occupied = torch.rand(n // r, k // c, generator=g) < (2 * density * torch.linspace(1, 0, n // r)).unsqueeze(1)
    elif kind == "last_rows":
        occupied[: -2] = False
    return w * occupied.repeat_interleave(r, 0).repeat_interleave(c, 1)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 70), n_blocks=st.integers(1, 40), k_blocks=st.integers(1, 12), block=st.sampled_from(BLOCKS),
       kind=st.sampled_from(["random", "empty_rows", "single", "dense_rows", "zeros", "skewed", "last_rows"]),
       density=st.floats(0.01, 1.0), with_bias=st.booleans(), seed=st.integers(0, 1000))
def test_kernel_matches_dense(m, n_blocks, k_blocks, block, kind, density, with_bias, seed):
    n, k = n_blocks * block[0], k_blocks * block[1]
    w = pattern(n, k, kind, density, seed, block)
    x = torch.randn(m, k)
    bias = torch.randn(n) if with_bias else None
    torch.testing.assert_close(run_kernel(x, w, bias, block), reference(x, w, bias), rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 70), n_blocks=st.integers(1, 40), k_blocks=st.integers(1, 12), block=st.sampled_from(BLOCKS),
       kind=st.sampled_from(["random", "empty_rows", "single", "dense_rows", "zeros", "skewed"]),
       density=st.floats(0.01, 1.0), chains=st.sampled_from([1, 2, 3]), seed=st.integers(0, 1000))
def test_ell_rows_with_constant_length_match_dense(m, n_blocks, k_blocks, block, kind, density, chains, seed):
    """Padded rows: the kernel reads no indptr and each row's loop (and its remainder over `chains`) is a constant."""
    n, k = n_blocks * block[0], k_blocks * block[1]
    w = pattern(n, k, kind, density, seed, block)
    x, bias = torch.randn(m, k), torch.randn(n)
    knobs = dataclasses.replace(default_knobs(m, n, k, block, "float32"), chains=chains)
    torch.testing.assert_close(run_kernel(x, w, bias, block, ell=True, knobs=knobs), reference(x, w, bias),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["skewed", "last_rows", "single"])
@pytest.mark.parametrize("block", [(1, 1), (4, 1)])
def test_tasks_split_uneven_rows_by_work(kind, block):
    """Weights tall enough for MAX_TASKS tasks, rows of very uneven length, both loop orders."""
    n, k = 64 * 8 * block[0], 96
    w = pattern(n, k, kind, 0.2, 3, block)
    x = torch.randn(40, k)
    torch.testing.assert_close(run_kernel(x, w, None, block), reference(x, w, None), rtol=1e-5, atol=1e-5)
    per_row = (w != 0).reshape(n // block[0], block[0], k).any(dim=1).sum(dim=1)
    spans = task_spans(work_prefix(per_row, block), MAX_TASKS)
    work = (per_row + ROW_WORK) * block[0]  # per block-row, in the kernel's units (c = 1)
    per_task = torch.stack([work[a:b].sum() for a, b in zip(spans[:-1], spans[1:])])
    assert spans[0] == 0 and spans[-1] == n // block[0] and bool((spans[1:] >= spans[:-1]).all())
    # No task holds more than an equal share plus one block-row, whatever the rows look like.
    assert int(per_task.max()) <= int(work.sum()) / MAX_TASKS + int(work.max())


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("block", [(1, 1), (8, 1)])
def test_fused_epilogues(activation, with_residual, block):
    w = pattern(32, 48, "random", 0.2, 11, block)
    x, bias = torch.randn(37, 48), torch.randn(32)
    residual = torch.randn(37, 32) if with_residual else None
    torch.testing.assert_close(run_kernel(x, w, bias, block, activation, residual),
                               reference(x, w, bias, activation, residual), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("residual_tiled", [False, True])
@pytest.mark.parametrize("m,token_split", [(1, False), (37, False), (64, False), (37, True), (64, True)])
@pytest.mark.parametrize("blocks", [((1, 1), (1, 1)), ((8, 1), (8, 1)), ((1, 4), (4, 4))])
def test_kernels_hand_over_in_token_tiles(m, token_split, blocks, residual_tiled):
    """A kernel writing y in token tiles and the next one reading it as x (and its residual in tiles too, or not)
    give what two row-major kernels give, including token counts that leave the last tile padded; with threads
    splitting rows or token tiles."""
    (b1, b2), (n1, k, n2) = blocks, (64, 48, 32)
    w1, w2 = pattern(n1, k, "random", 0.3, 5, b1), pattern(n2, n1, "empty_rows", 0.3, 6, b2)
    x, bias1, bias2, residual = torch.randn(m, k), torch.randn(n1), torch.randn(n2), torch.randn(m, n2)
    knobs1 = dataclasses.replace(default_knobs(m, n1, k, b1, "float32"), token_split=token_split)
    knobs2 = dataclasses.replace(default_knobs(m, n2, n1, b2, "float32"), token_split=token_split)
    first = bsr_linear_kernel(m, n1, k, b1, "float32", "gelu", column_dtype="int16", y_tiled=True, knobs=knobs1)
    second = bsr_linear_kernel(m, n2, n1, b2, "float32", "none", True, column_dtype="int16", x_tiled=True,
                               residual_tiled=residual_tiled, knobs=knobs2)
    tile = min(default_knobs(m, n1, k, b1, "float32").token_tile, m)
    assert tile == min(default_knobs(m, n2, n1, b2, "float32").token_tile, m)
    mod = tvm.IRModule({"first": first.with_attr("global_symbol", "first"),
                        "second": second.with_attr("global_symbol", "second")})
    lib = tvm.compile(mod, target=host_target(2))
    hidden, y = torch.empty(token_tiled_shape(m, n1, tile)), torch.empty(m, n2)
    as_tvm = lambda t: tvm.runtime.from_dlpack(t.contiguous())  # noqa: E731
    lib["first"](as_tvm(x), *map(as_tvm, pack_blocks(w1, b1)), as_tvm(bias1), as_tvm(torch.zeros(1, 1)), as_tvm(hidden))
    # NaN in a tiled residual's padded tokens must not reach y.
    residual_in = to_token_tiles(residual, tile, float("nan")) if residual_tiled else residual
    lib["second"](as_tvm(hidden), *map(as_tvm, pack_blocks(w2, b2)), as_tvm(bias2), as_tvm(residual_in), as_tvm(y))
    expected = reference(reference(x, w1, bias1, "gelu"), w2, bias2, residual=residual)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [1, 31, 32, 33, 128])
def test_kernel_token_tiles_and_fp64(m):
    w = pattern(64, 96, "random", 0.1, 7).double()
    x = torch.randn(m, 96, dtype=torch.float64)
    bias = torch.randn(64, dtype=torch.float64)
    torch.testing.assert_close(run_kernel(x, w, bias), reference(x, w, bias))


def test_unstructured_weight_in_blocks_keeps_zeros_inside_blocks():
    w = pattern(32, 32, "random", 0.3, 5)  # unstructured: blocks hold zeros too
    x = torch.randn(7, 32)
    torch.testing.assert_close(run_kernel(x, w, None, (4, 4)), reference(x, w, None), rtol=1e-5, atol=1e-5)


def test_host_target_names_a_real_cpu():
    target = host_target(2)
    assert target.attrs["mcpu"] not in ("", "generic")
    assert int(target.attrs["num-cores"]) == 2


def test_relax_module_uses_tir_kernel_for_each_shape():
    from torch.fx.experimental.proxy_tensor import make_fx

    from sparsecc.pipeline import run_pipeline
    from sparsecc.settings import Settings

    w1 = pattern(64, 32, "random", 0.1, 1)
    w2 = pattern(64, 32, "random", 0.1, 2)

    def fn(x):
        return torch.nn.functional.linear(x, w1) + torch.nn.functional.linear(x, w2)

    x = torch.randn(4, 32)
    gm = make_fx(fn)(x)
    state = run_pipeline(gm, [x], Settings(min_weight_numel=1, cost_model="break-even"))
    prim_funcs = [gv.name_hint for gv, f in state.irmodule.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    relax_funcs = [gv.name_hint for gv, f in state.irmodule.functions.items() if isinstance(f, relax.Function)]
    # Two layers of one shape share one kernel; each region is a Relax function.
    assert prim_funcs == ["csr_linear_4x64x32_float32"]
    assert relax_funcs and all(name.startswith("sparsecc_region_") for name in relax_funcs)
    torch.testing.assert_close(state.run([x]), fn(x), rtol=1e-5, atol=1e-5)


def test_tvm_threads_follow_torch_and_the_option():
    from sparsecc.codegen.build import build

    mod = tvm.IRModule({"kernel": bsr_linear_kernel(4, 8, 8, (1, 1), "float32", column_dtype="int16")
                        .with_attr("global_symbol", "kernel")})
    wrapped = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    with wrapped.function("main", [x]):
        gv = wrapped.add_func(mod["kernel"].without_attr("global_symbol"), "kernel")
        w = pattern(8, 8, "random", 0.5, 3)
        consts = [relax.const(tvm.runtime.from_dlpack(a)) for a in (*pack_blocks(w), torch.zeros(8), torch.zeros(1, 1))]
        out = wrapped.emit(relax.call_tir(gv, [x, *consts], relax.TensorType((4, 8), "float32")))
        wrapped.emit_func_output(out)
    from sparsecc.settings import Settings

    build(wrapped.get(), Settings(num_threads=1).resolved())
    assert tvm.runtime.num_threads() == 1
    build(wrapped.get(), Settings().resolved())
    assert tvm.runtime.num_threads() == torch.get_num_threads()


@pytest.mark.parametrize("environ, spins", [
    ({}, 0),  # libgomp's default: its threads spin long, so TVM's must not
    ({"GOMP_SPINCOUNT": "1000"}, 1000),
    ({"GOMP_SPINCOUNT": "10k"}, 1000),
    ({"GOMP_SPINCOUNT": "2M"}, 0),
    ({"GOMP_SPINCOUNT": "INFINITE"}, 0),
    ({"OMP_WAIT_POLICY": "Passive"}, 1000),
    ({"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": "1000"}, 1000),
])
def test_tvm_spins_only_beside_quiet_openmp_threads(environ, spins):
    from sparsecc.codegen.targets import default_tvm_spin_count

    assert default_tvm_spin_count(environ) == spins


def test_packed_bytes_at_90_percent():
    """CSR at 90 % zeros, fp32, int16 columns: at most 0.2x the dense bytes (0.15x plus row pointers)."""
    w = pattern(768, 3072, "random", 0.1, 4)
    packed = pack_blocks(w)
    assert packed[1].dtype == torch.int16
    ratio = sum(t.numel() * t.element_size() for t in packed) / (w.numel() * w.element_size())
    assert ratio <= 0.2


def test_wide_weights_keep_int32_columns():
    w = torch.zeros(2, 40000)
    w[0, 39999] = 1.0
    packed = pack_blocks(w)
    assert packed[1].dtype == torch.int32
    x = torch.randn(3, 40000)
    torch.testing.assert_close(run_kernel(x, w, None), reference(x, w, None))


@pytest.mark.parametrize("rows,lanes", [(2, 16), (8, 16), (16, 16), (16, 8), (4, 4), (16, 2)])
def test_register_transpose(rows, lanes):
    """R vectors of C lanes come out as C columns of R values, whichever of R and C is larger."""
    from tvm.script import tirx as T

    from sparsecc.codegen.kernels.cpu.transpose import emit_transpose, load, ramp, store

    def block(src, dst):
        emit_transpose([load(src, [i, ramp(0, lanes)]) for i in range(rows)], lanes,
                       lambda c, r0, vector, count: store(dst, [c, ramp(r0, count)], vector))

    @T.prim_func
    def kernel(a: T.Buffer((rows, lanes), "float32"), b: T.Buffer((lanes, rows), "float32")):
        T.func_attr({"global_symbol": "kernel", "tir.noalias": True})
        block(a, b)

    lib = tvm.compile(tvm.IRModule({"kernel": kernel}), target=host_target(1))
    a, b = torch.randn(rows, lanes), torch.full((lanes, rows), float("nan"))
    lib["kernel"](tvm.runtime.from_dlpack(a), tvm.runtime.from_dlpack(b))
    torch.testing.assert_close(b, a.t(), rtol=0, atol=0)


@pytest.mark.parametrize("token_split", [False, True])
@pytest.mark.parametrize("density", [1.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("token_tile,rows_per_task", [(32, 8), (16, 2), (8, 32), (64, 64), (32, 1)])
def test_row_major_edges_in_register_transposes(token_tile, rows_per_task, dtype, density, token_split):
    """Row-major x and y go through register transposes where whole blocks fit and scalar loops elsewhere: 69
    tokens leave a partial tile, K = 40 a partial 16-column strip; rows of equal work (density 1) make every
    task's rows whole groups, uneven rows leave partial ones. With a residual; threads split rows or tokens."""
    m, n, k = 69, 64, 40
    w = pattern(n, k, "random", density, 9).to(dtype)
    x, bias, residual = torch.randn(m, k, dtype=dtype), torch.randn(n, dtype=dtype), torch.randn(m, n, dtype=dtype)
    knobs = dataclasses.replace(default_knobs(m, n, k, (1, 1), "float32"), token_tile=token_tile,
                                rows_per_task=rows_per_task, chains=1, token_split=token_split)
    torch.testing.assert_close(run_kernel(x, w, bias, residual=residual, knobs=knobs),
                               reference(x, w, bias, residual=residual))


def test_threads_split_token_tiles_only_when_they_divide_evenly():
    assert default_knobs(128, 768, 768, (1, 1), "float32", threads=2).token_split  # 4 tiles
    assert default_knobs(128, 768, 768, (1, 1), "float32", threads=4).token_split
    assert not default_knobs(128, 768, 768, (1, 1), "float32", threads=8).token_split  # a thread would idle
    assert not default_knobs(96, 768, 768, (1, 1), "float32", threads=2).token_split  # 3 tiles: 2 against 1
    assert not default_knobs(128, 768, 768, (1, 1), "float32").token_split  # threads unknown: rows


@pytest.mark.parametrize("block", [(1, 1), (8, 8)])
def test_macro_parser_lookup_builds_the_same_kernel_as_tvms(monkeypatch, block):
    # codegen/script_macros.py replaces how TVMScript macros find their parser, for speed: what they build must not
    # change.
    from tvm.script.parser.core.parser import ScriptMacro

    from sparsecc.codegen import script_macros

    assert ScriptMacro._find_parser_def is script_macros._find_parser_def
    args = (64, 256, 512, block, "float32", "gelu", True)
    ours = bsr_linear_kernel(*args)
    monkeypatch.setattr(ScriptMacro, "_find_parser_def", script_macros.TVM_FIND_PARSER_DEF)
    tvm.ir.assert_structural_equal(ours, bsr_linear_kernel(*args))
