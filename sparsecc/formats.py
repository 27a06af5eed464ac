"""Plain data that the passes hand each other: what a weight looks like and how it will be stored."""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any, Mapping


class SparseFormat(str, enum.Enum):
    DENSE = "dense"
    CSR = "csr"
    BSR = "bsr"
    # CSR with every row padded to the longest (ELLPACK): the kernel runs each row a constant number of times.
    ELL = "ell"


@dataclasses.dataclass(frozen=True)
class BlockStats:
    """How a weight, seen as (out, in), fills r x c blocks: `blocks` of them hold a non-zero."""

    rows: int
    cols: int
    blocks: int
    total_blocks: int
    # The busiest thread's stored blocks over the mean when the kernel splits block-rows among threads (1.0: even).
    imbalance: float = 1.0

    @property
    def stored_density(self) -> float:
        """Fraction of the weight a BSR copy with this block shape stores (zeros inside blocks included)."""
        return self.blocks / self.total_blocks if self.total_blocks else 0.0


@dataclasses.dataclass(frozen=True)
class WeightUse:
    """One place a constant weight is consumed: the op and which operand it is."""

    op: str
    operand: int
    node: str
    # Rows the weight is applied to (tokens: batch x sequence for a Linear); 0 when the graph does not say.
    tokens: int = 0
    # A convolution the direct kernel computes: its passes/direct_conv.ConvGeometry as JSON (timing needs it).
    conv: str = ""
    # Why no sparse kernel takes this use, when none does (a grouped convolution, say): for the plan's reason line.
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class WeightSparsity:
    """What analysis found in one constant weight (stored in the get_attr node's meta["sparsecc"])."""

    name: str  # the user's name for it, e.g. "encoder.layer.0.output.dense.weight"
    shape: tuple[int, ...]
    dtype: str
    nnz: int
    # "strided" for ordinary tensors; "sparse_csr" etc. when the user held the weight in a torch.sparse layout.
    source_layout: str
    uses: tuple[WeightUse, ...]
    # Block structure of the (out, in) matrix for each block shape that divides it.
    blocks: tuple[BlockStats, ...] = ()
    # N:M structure along the input dimension: (n, m) for each group size m in NM_GROUPS that divides it, n being
    # the most non-zeros any group of m consecutive inputs holds (2:4 means every group of 4 has at most 2).
    nm: tuple[tuple[int, int], ...] = ()
    # (out, in): the weight as the kernel multiplies it (a right operand of x @ W is (in, out) in `shape`).
    matrix: tuple[int, ...] = ()
    # Like BlockStats.imbalance, for single non-zeros (CSR).
    imbalance: float = 1.0
    # Most non-zeros in any row of `matrix`: ELL stores this many per row.
    row_max: int = 0

    def nm_label(self) -> str | None:
        """The tightest N:M pattern at least half sparse (n <= m / 2) that the weight satisfies, e.g. "2:4"."""
        fits = [(n / m, f"{n}:{m}") for n, m in self.nm if 2 * n <= m]
        return min(fits)[1] if fits else None

    @property
    def ell_stored(self) -> int:
        """Values an ELL copy stores: every row padded to the longest."""
        return self.row_max * self.matrix[0] if self.matrix else 0

    def block_fill(self, rows: int, cols: int) -> float:
        """Mean fraction of a stored r x c block that is non-zero (1.0 = perfectly block-structured)."""
        for b in self.blocks:
            if (b.rows, b.cols) == (rows, cols):
                return self.nnz / (b.blocks * rows * cols) if b.blocks else 1.0
        raise KeyError(f"no statistics for {rows}x{cols} blocks")

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def density(self) -> float:
        return self.nnz / self.numel if self.numel else 1.0


ELL_CANDIDATE = "ell"
DIRECT_KERNEL = "direct"  # FormatChoice.kernel of a 1x1 convolution the direct kernel runs


def candidate_name(block: tuple[int, int]) -> str:
    """The name of a block-shaped sparse candidate in options, plans and reports: "csr" for 1 x 1 blocks, else
    "bsrRxC". CSR with rows padded to one length is the one other candidate, ELL_CANDIDATE."""
    return "csr" if tuple(block) == (1, 1) else f"bsr{block[0]}x{block[1]}"


def candidate_block(name: str) -> tuple[int, int]:
    """The block shape a candidate stores: the inverse of `candidate_name`, and (1, 1) for "ell"."""
    if name in ("csr", ELL_CANDIDATE):
        return (1, 1)
    return tuple(int(v) for v in name.removeprefix("bsr").split("x"))


def candidate_format(name: str) -> SparseFormat:
    """The SparseFormat a candidate name ("dense", "csr", "ell", "bsrRxC") stands for."""
    return {"dense": SparseFormat.DENSE, "csr": SparseFormat.CSR, ELL_CANDIDATE: SparseFormat.ELL}.get(
        name, SparseFormat.BSR)


@dataclasses.dataclass(frozen=True)
class FormatChoice:
    format: SparseFormat
    block: tuple[int, int] | None
    est_cost: float  # predicted (or measured) time relative to the dense kernel (1.0 = same as dense)
    reason: str
    # Predicted microseconds per candidate the cost model priced: "dense" (PyTorch), "csr", "bsr8x1", ...
    predictions: Mapping[str, float] = dataclasses.field(default_factory=dict)
    # Measured microseconds of the candidates timed on the weight (cost_model="measured"); they decided.
    measured: Mapping[str, float] = dataclasses.field(default_factory=dict)
    # Which kernel runs a sparse 1x1 convolution: "" (a matrix product over channels-last pixels) or DIRECT_KERNEL
    # (the direct convolution kernel over NCHW, which needs no layout change for an NCHW input).
    kernel: str = ""

    @property
    def candidate(self) -> str:
        """"dense", "csr", "ell" or "bsrRxC": the key of the chosen format in `predictions`."""
        if self.format in (SparseFormat.DENSE, SparseFormat.ELL):
            return self.format.value
        return candidate_name(self.block or (1, 1))


@dataclasses.dataclass(frozen=True)
class SparsePlan:
    """Format choice per weight, keyed by the weight's graph attribute name. Pure data; JSON round-trips."""

    choices: Mapping[str, FormatChoice]
    weights: Mapping[str, WeightSparsity]
    # The machine model the predictions come from (sparsecc/planning/cost_model.py).
    machine: str = ""

    def sparse_weights(self) -> list[str]:
        return [k for k, c in self.choices.items() if c.format is not SparseFormat.DENSE]

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": 3,
                "machine": self.machine,
                "weights": {k: _weight_to_dict(w) for k, w in self.weights.items()},
                "choices": {
                    k: {"format": c.format.value, "block": list(c.block) if c.block else None,
                        "est_cost": c.est_cost, "reason": c.reason, "predictions": dict(c.predictions),
                        "measured": dict(c.measured), "kernel": c.kernel}
                    for k, c in self.choices.items()
                },
            },
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> "SparsePlan":
        data = json.loads(text)
        weights = {k: _weight_from_dict(w) for k, w in data["weights"].items()}
        choices = {
            k: FormatChoice(SparseFormat(c["format"]), tuple(c["block"]) if c["block"] else None,
                            float(c["est_cost"]), c["reason"], c.get("predictions", {}), c.get("measured", {}),
                            c.get("kernel", ""))
            for k, c in data["choices"].items()
        }
        return cls(choices=choices, weights=weights, machine=data.get("machine", ""))


def _weight_to_dict(w: WeightSparsity) -> dict[str, Any]:
    d = dataclasses.asdict(w)
    d["shape"] = list(w.shape)
    d["uses"] = [dataclasses.asdict(u) for u in w.uses]
    d["blocks"] = [dataclasses.asdict(b) for b in w.blocks]
    d["nm"] = [list(p) for p in w.nm]
    return d


def _weight_from_dict(d: dict[str, Any]) -> WeightSparsity:
    return WeightSparsity(
        name=d["name"], shape=tuple(d["shape"]), dtype=d["dtype"], nnz=int(d["nnz"]),
        source_layout=d["source_layout"], uses=tuple(WeightUse(**u) for u in d["uses"]),
        blocks=tuple(BlockStats(**b) for b in d.get("blocks", ())),
        nm=tuple(tuple(p) for p in d.get("nm", ())), matrix=tuple(d.get("matrix", ())),
        imbalance=float(d.get("imbalance", 1.0)), row_max=int(d.get("row_max", 0)),
    )
