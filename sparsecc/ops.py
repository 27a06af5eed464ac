"""`sparsecc::` custom ops. The rewritten graph uses them; each has a fake (shape) implementation for
tracing and an eager reference built on torch.sparse, so a rewritten graph still runs in plain PyTorch."""

from __future__ import annotations

import warnings

import torch

# torch warns that CSR support is "beta" on first use; sparsecc relies only on the long-stable pieces.
_CSR_BETA = "Sparse CSR tensor support is in beta state"


@torch.library.custom_op("sparsecc::csr_linear", mutates_args=())
def csr_linear(
    x: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """y = x @ W^T + bias, where W (out_features x in_features) is given in CSR form and x is 2-D."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CSR_BETA)
        weight = torch.sparse_csr_tensor(indptr, indices, values, (out_features, x.shape[1]), check_invariants=False)
    y = (weight @ x.t()).t()
    if bias is not None:
        y = y + bias
    return y.contiguous()


@csr_linear.register_fake
def _(x, indptr, indices, values, bias, out_features):
    return x.new_empty((x.shape[0], out_features))


def pack_csr(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense (N, K) -> int32 row pointers, int32 column indices and values; keeps only exact non-zeros."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CSR_BETA)
        csr = weight.detach().contiguous().to_sparse_csr()
    return (csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32), csr.values().clone())


SPARSE_OPS = frozenset({torch.ops.sparsecc.csr_linear.default})
