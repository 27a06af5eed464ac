"""Per-dtype tolerances for comparing sparsecc's results with eager PyTorch.

Dropping exact zeros changes only the order of the additions, so the gap is reassociation error, which
grows with the length of the dot products; these bounds hold for the widths of BERT-base (3072).
"""

from __future__ import annotations

from typing import Any

import torch

TOLERANCES = {
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def assert_outputs_close(actual: Any, expected: Any) -> None:
    """torch.testing.assert_close over (nested) outputs with the tolerance of each tensor's dtype."""
    if isinstance(expected, torch.Tensor):
        tol = TOLERANCES.get(expected.dtype, {})
        torch.testing.assert_close(actual, expected, **tol)
        return
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected), (
            f"expected {len(expected)} outputs, got {len(actual) if isinstance(actual, (tuple, list)) else 1}"
        )
        for a, e in zip(actual, expected):
            assert_outputs_close(a, e)
        return
    if isinstance(expected, dict):
        assert set(actual) == set(expected), f"output keys differ: {sorted(actual)} vs {sorted(expected)}"
        for k in expected:
            assert_outputs_close(actual[k], expected[k])
        return
    if hasattr(expected, "to_tuple"):  # transformers ModelOutput
        assert_outputs_close(actual.to_tuple(), expected.to_tuple())
        return
    assert actual == expected, f"{actual!r} != {expected!r}"
