"""What pruning did: per layer and for the whole model, as data and as a table."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class LayerPrune:
    name: str
    shape: tuple[int, int]  # (out, in)
    density_before: float
    density: float
    error: float  # relative output error of this layer on the calibration inputs
    dense_us: float | None = None  # predicted, from the machine model (None with cost_model="break-even")
    sparse_us: float | None = None  # predicted for sparsecc's kernel at the new density


@dataclasses.dataclass(frozen=True)
class PruneReport:
    method: str
    pattern: str
    budget: str  # "target_sparsity=0.6" | "max_error=0.01 (cosine)" | "2:4 on every layer it fits"
    metric: str
    model_error: float  # measured on the calibration batches, against the dense graph
    sparsity: float  # of the pruned layers' elements together
    calibration_batches: int
    seconds: float
    layers: tuple[LayerPrune, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (weight, why it was not pruned)
    # name -> (levels, errors): each layer's sensitivity curve (with allocation="sensitivity")
    curves: tuple[tuple[str, tuple[float, ...], tuple[float, ...]], ...] = ()
    # (sparsity, measured model error, predicted seconds of the pruned layers) of each allocation measured
    model_curve: tuple[tuple[float, float, float | None], ...] = ()
    dead_channels: tuple = ()  # passes.remove_dead_channels.DeadChannels of each layer with all-zero output rows

    def table(self) -> str:
        rows = [("weight", "out x in", "density", "layer error", "dense us", "sparse us")]
        for layer in self.layers:
            rows.append((layer.name, f"{layer.shape[0]}x{layer.shape[1]}",
                         f"{layer.density_before:.3f} -> {layer.density:.3f}", f"{layer.error:.2e}",
                         _us(layer.dense_us), _us(layer.sparse_us)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        head = (f"pruned {len(self.layers)} weights with {self.method} ({self.pattern}, {self.budget}): "
                f"{self.sparsity:.1%} of their elements zero, model error {self.model_error:.4g} ({self.metric}) "
                f"on {self.calibration_batches} calibration batches, {self.seconds:.1f} s")
        tail = [f"not pruned: {name} ({why})" for name, why in self.skipped]
        for d in self.dead_channels:
            tail.append(f"dead channels: {d.weight}: {d.dead} all-zero output rows, " +
                        (f"removed with the matching inputs of {d.into}" if d.removed else f"kept ({d.note})"))
        return "\n".join([head, *lines, *tail])


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"
