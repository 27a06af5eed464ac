"""Plan: choose a storage format per analysed weight (dense in PyTorch, CSR, or BSR with some block shape) and say why.

Three ways to price the candidates (`cost_model`):
- "measured", the default: the calibrated model ranks the candidates and dense plus the close ones are timed on the
  weight itself (sparsecc/planning/candidate_timing.py); a sparse format must then measure MEASURED_MIN_GAIN faster.
- "calibrated": each candidate's time comes from the cost model (sparsecc/planning/cost_model.py) on the machine model of the
  target (calibrated once per machine, sparsecc/planning/calibration.py), summed over the weight's uses at their token counts.
- "break-even": a format costs the fraction of the weight it stores over its measured break-even density, whatever
  the shape and token count; it never measures, so plans do not depend on timing.
Every candidate's prediction (and measurement) goes into the plan. The fastest wins, and a sparse format must beat
dense by `min_gain`.
"""

from __future__ import annotations

import dataclasses

import logging
from typing import Callable

from torch import fx

from sparsecc.formats import (DIRECT_KERNEL, ELL_CANDIDATE, FormatChoice, SparseFormat, SparsePlan, WeightSparsity,
                              candidate_block, candidate_format, candidate_name)
from sparsecc.passes.analyze_weights import analysed_weights, as_matrix
from sparsecc.passes.graph_utils import constant_of
from sparsecc.passes.direct_conv import DIRECT_USE, ConvGeometry, phase_weight
from sparsecc.passes.pointwise_conv import CONVOLUTION, POINTWISE_USE
from sparsecc.planning.cost_model import MachineModel, predict_dense, predict_sparse
from sparsecc.planning.pricing import LazyMachine, Pricing, finalists
from sparsecc.progress import progress_bar
from sparsecc.settings import Settings

log = logging.getLogger(__name__)

SPARSE_DTYPES = ("float32", "float64")
# Uses the CSR rewrite can take: a 2-D matrix product with the weight in either operand.
CSR_USES = {("aten.mm.default", 0), ("aten.mm.default", 1), ("aten.addmm.default", 1), ("aten.addmm.default", 2),
            (POINTWISE_USE, 1)}
# Stored fraction above which a format is not offered unless forced: each kernel's break-even density against
# PyTorch at BERT shapes, 128 tokens (benchmarks/kernel_break_even.py). The cost model is least reliable there:
# it predicted CSR at 50 % density at 0.6x dense where it measured 1.1x (benchmarks/plan_quality.py, docs).
MAX_STORED_DENSITY = {(1, 1): 0.42, (1, 4): 0.48, (4, 1): 0.61, (8, 1): 0.67, (16, 1): 0.53, (4, 4): 0.71, (8, 8): 0.67}
# The `cost_model="break-even"` planner: a format's time relative to dense grows linearly with the fraction of the
# weight it stores and breaks even at these densities, measured by benchmarks/kernel_break_even.py (mean of BERT's
# three shapes on AVX-512) times 0.75 for the slowdown inside a model. 16x1 blocks run with shorter token tiles (their
# accumulators must fit the stack) and break even lower than 8x1.
BSR_BREAK_EVEN = {(1, 4): 0.36, (4, 1): 0.46, (8, 1): 0.5, (16, 1): 0.4, (4, 4): 0.53, (8, 8): 0.5}
CSR_BREAK_EVEN = 0.3
# A measured sparse candidate must beat dense by this much: near a tie the sparse kernels' timings scatter far more
# than PyTorch's GEMM (64x4096 at 512 tokens, 99 % sparse: the same 1x4 kernel 1.5-3.0 ms, dense 1.4-1.7 ms), and
# a tie given to sparse is how a plan ends up slower than dense.
MEASURED_MIN_GAIN = 1.05
# ELL is offered when padding every row to the longest stores at most this many times the non-zeros: its constant
# row length saved 2-8 % over CSR's kernel at BERT shapes, and 14 % padding already cost more than that
# (benchmarks/ell_rows.py; docs/benchmarks.md, "Rows of one length"). Listing "ell" in `formats` offers it anyway.
ELL_MAX_PADDING = 1.1
# The planners that do not measure (`cost_model` "calibrated" or "break-even") give a k x k convolution the direct
# kernel at or below this density: against oneDNN's channels-last convolution on AVX-512, 3x3 256->256 broke even at
# about 0.35 at 56x56 and 0.22 at 14x14 (benchmarks/direct_conv.py --sweep, --densities).
DIRECT_CONV_BREAK_EVEN = 0.2
# Token count assumed for a use whose graph does not carry shapes (symbolic tracing).
UNKNOWN_TOKENS = 128


def plan_formats(gm: fx.GraphModule, settings: Settings, pricing: Pricing | MachineModel | None = None) -> SparsePlan:
    """`pricing`: what prices the candidates (the pipeline builds it for the target, sparsecc/planning/
    target_pricing.py); a MachineModel alone predicts without timing; None only with `cost_model="break-even"`."""
    weights = analysed_weights(gm)
    if isinstance(pricing, MachineModel):
        pricing = Pricing(LazyMachine(pricing))
    elif pricing is None:
        if settings.cost_model != "break-even":
            raise ValueError(f"plan_formats: cost_model={settings.cost_model!r} needs its pricing "
                             "(sparsecc.planning.target_pricing.pricing_for(settings)) or a MachineModel")
        pricing = Pricing()
    timer = pricing.timer
    if timer is None:
        choices = {name: choose_direct_conv(w, settings) if direct_conv(w) else
                   choose_format(w, settings, pricing.machine) for name, w in weights.items()}
    else:
        tensors = {n.target: constant_of(gm, n) for n in gm.graph.nodes if n.op == "get_attr" and n.target in weights}
        update, close = progress_bar(len(weights), "sparsecc plan", "weight")
        choices = {}
        try:
            for name, w in weights.items():
                if direct_conv(w):
                    choices[name] = choose_direct_conv(w, settings, _conv_timing(timer, tensors[name], w))
                else:
                    choices[name] = choose_format(w, settings, pricing.machine,
                                                  _timing(timer, as_matrix(tensors[name], w), w))
                    if direct_pointwise(w):
                        choices[name] = prefer_direct_pointwise(choices[name], w, settings,
                                                                _conv_timing(timer, tensors[name], w))
                update(1, name)
        finally:
            close()
        log.info("plan: timed %d candidates, %d more read from the tuning database", timer.timed, timer.reused)
    n_sparse = sum(c.format is not SparseFormat.DENSE for c in choices.values())
    log.info("plan: %d of %d weights sparse", n_sparse, len(choices))
    loaded = pricing.machine.loaded if pricing.machine is not None else None
    described = loaded.description if loaded is not None else ""
    if loaded is not None and not loaded.calibrated:
        log.warning("plan: the target %s cannot be measured here; predictions use %s", settings.target, described)
    return SparsePlan(choices=choices, weights=weights, machine=described)


def _timing(timer, matrix, w: WeightSparsity) -> Callable[[list[str]], dict[str, float] | None]:
    def measure(names: list[str]) -> dict[str, float] | None:
        try:
            return timer.seconds(matrix, _tokens(w), names, w)
        except Exception as exc:  # a kernel that fails to build or run here: the predictions still stand
            log.warning("plan: timing %s for %s failed (%s); choosing from predictions", ", ".join(names), w.name,
                        exc)
            return None

    return measure


def _conv_timing(timer, tensor, w: WeightSparsity) -> Callable[[], dict[str, float] | None]:
    def measure() -> dict[str, float] | None:
        total: dict[str, float] = {}
        try:
            for use in w.uses:
                geo = ConvGeometry.from_json(use.conv)
                for name, t in timer.conv_seconds(tensor, phase_weight(tensor, geo), geo, w).items():
                    total[name] = total.get(name, 0.0) + t
        except Exception as exc:  # a kernel that fails to build or run here: dense, which always works
            log.warning("plan: timing the direct convolution kernel for %s failed (%s); it stays dense", w.name, exc)
            return None
        return total

    return measure


def direct_conv(w: WeightSparsity) -> bool:
    """Whether the weight feeds only k x k convolutions the direct kernel computes."""
    return bool(w.uses) and all(u.op == DIRECT_USE for u in w.uses)


def direct_pointwise(w: WeightSparsity) -> bool:
    """Whether the weight feeds only 1x1 convolutions that the direct kernel could also compute (analysis gave each
    use its geometry)."""
    return bool(w.uses) and all(u.op == POINTWISE_USE and u.conv for u in w.uses)


def prefer_direct_pointwise(choice: FormatChoice, w: WeightSparsity, settings: Settings,
                            measure: Callable[[], dict[str, float] | None]) -> FormatChoice:
    """`choice` (a matrix product over channels-last pixels, or dense) or the direct kernel for a 1x1 convolution
    over a channels-last input, whichever measured faster. The direct kernel's time includes its copy into NCHW,
    the product needs none here. Why both: the direct kernel wins on large images (64->256 at 56x56: about half the
    product's time here), the product on small ones with many channels (7x7: a band of 7 pixels is too short a
    run)."""
    if not allowed("csr", settings.formats) or w.nnz == 0 or w.numel < settings.min_weight_numel or \
            w.dtype not in SPARSE_DTYPES:
        return choice
    seconds = measure()
    if not seconds:
        return choice
    direct_us, dense_us = seconds["csr"] * 1e6, seconds["dense"] * 1e6
    product_us = choice.measured.get(choice.candidate) if choice.format is not SparseFormat.DENSE else None
    gain = max(settings.min_gain, MEASURED_MIN_GAIN)
    measured = {**choice.measured, "direct": round(direct_us, 2), "dense conv": round(dense_us, 2)}
    rivals = f"PyTorch's convolution {dense_us:.0f} us" + (
        f", {choice.candidate} product {product_us:.0f} us" if product_us is not None else "")
    if direct_us * gain < min(dense_us, product_us or dense_us):
        return FormatChoice(SparseFormat.CSR, None, direct_us / dense_us,
                            f"density {w.density:.3f}: a 1x1 convolution, direct kernel measured {direct_us:.0f} us "
                            f"({rivals})", choice.predictions, measured, DIRECT_KERNEL)
    if product_us is not None and dense_us * gain < product_us:
        return FormatChoice(SparseFormat.DENSE, None, 1.0, f"density {w.density:.3f}: a 1x1 convolution, stays dense: "
                            f"PyTorch's convolution measured faster (direct kernel {direct_us:.0f} us, {rivals})",
                            choice.predictions, measured)
    return dataclasses.replace(choice, measured=measured)


def choose_direct_conv(w: WeightSparsity, settings: Settings,
                       measure: Callable[[], dict[str, float] | None] | None = None) -> FormatChoice:
    """Dense (PyTorch's convolution) or CSR (the direct kernel) for a k x k convolution weight. `measure()` -> seconds
    of "dense" and "csr" on the weight's own convolutions (None if timing failed): the measurement decides; without
    it, DIRECT_CONV_BREAK_EVEN does."""
    kernel = "x".join(map(str, w.shape[2:]))

    def dense(reason: str, measured: dict | None = None) -> FormatChoice:
        return FormatChoice(SparseFormat.DENSE, None, 1.0, reason, {}, measured or {})

    if w.dtype not in SPARSE_DTYPES:
        return dense(f"dtype {w.dtype} has no sparse kernel yet (supported: {', '.join(SPARSE_DTYPES)})")
    if not allowed("csr", settings.formats):
        return dense(f"a {kernel} convolution: its direct kernel stores CSR, which formats={list(settings.formats)} "
                     "does not allow")
    if w.numel < settings.min_weight_numel:
        return dense(f"{w.numel} elements < min_weight_numel {settings.min_weight_numel}")
    if w.nnz == 0:
        return FormatChoice(SparseFormat.CSR, None, 0.0, f"all zeros ({kernel} convolution, direct kernel)",
                            kernel=DIRECT_KERNEL)
    forced = settings.formats is not None and "dense" not in settings.formats
    seconds = measure() if measure is not None and not forced else None
    if seconds:
        measured = {name: round(t * 1e6, 2) for name, t in seconds.items()}
        est = seconds["csr"] / seconds["dense"]
        gain = max(settings.min_gain, MEASURED_MIN_GAIN)
        how = (f"direct kernel measured at {est:.2f}x PyTorch's convolution (dense {measured['dense']:.0f} us, "
               f"csr {measured['csr']:.0f} us)")
    else:
        measured, gain = {}, settings.min_gain
        est = w.density / DIRECT_CONV_BREAK_EVEN
        how = (f"direct kernel assumed at {est:.2f}x PyTorch's convolution (density over its break-even "
               f"{DIRECT_CONV_BREAK_EVEN})")
    reason = f"density {w.density:.3f}: a {kernel} convolution, {how}"
    if forced:
        return FormatChoice(SparseFormat.CSR, None, est, f"{reason}; csr forced by formats={list(settings.formats)}",
                            {}, measured, DIRECT_KERNEL)
    if est * gain >= 1.0:
        return dense(f"{reason}: not {gain:.2f}x faster, stays dense", measured)
    return FormatChoice(SparseFormat.CSR, None, est, reason, {}, measured, DIRECT_KERNEL)


def _tokens(w: WeightSparsity) -> list[int]:
    return [u.tokens for u in w.uses if u.tokens > 0] or [UNKNOWN_TOKENS]


def choose_format(w: WeightSparsity, settings: Settings,
                  machine: MachineModel | Callable[[], MachineModel] | None = None,
                  measure: Callable[[list[str]], dict[str, float] | None] | None = None) -> FormatChoice:
    """`machine`: the machine model (or a callable loading it) the candidates are predicted with; None only with
    `cost_model="break-even"`. `measure(candidates)` -> seconds per candidate, timed on this weight (None if timing
    failed): when given, the predicted finalists are timed and the measured times decide."""
    measured: dict[str, float] = {}

    def dense(reason: str, predictions: dict | None = None) -> FormatChoice:
        return FormatChoice(SparseFormat.DENSE, None, 1.0, reason, predictions or {}, measured)

    if w.dtype not in SPARSE_DTYPES:
        return dense(f"dtype {w.dtype} has no sparse kernel yet (supported: {', '.join(SPARSE_DTYPES)})")
    if any(u.op == str(CONVOLUTION) for u in w.uses):
        why = "; ".join(sorted({u.reason for u in w.uses if u.op == str(CONVOLUTION) and u.reason}))
        return dense(f"{why or 'a convolution no sparse kernel takes'}: it runs in PyTorch")
    if any(u.op == DIRECT_USE for u in w.uses):
        return dense("used by both k x k convolutions and other ops: no one kernel takes every use")
    if len(w.shape) != 2 and not all(u.op == POINTWISE_USE for u in w.uses):
        return dense(f"{len(w.shape)}-D weight: only 2-D weights have a sparse kernel yet")
    other = sorted({u.op for u in w.uses if (u.op, u.operand) not in CSR_USES})
    if other:
        return dense(f"also used by {', '.join(other)}, which has no sparse kernel yet")
    if w.numel < settings.min_weight_numel:
        return dense(f"{w.numel} elements < min_weight_numel {settings.min_weight_numel}")
    if w.nnz == 0 and allowed("csr", settings.formats):
        return FormatChoice(SparseFormat.CSR, None, 0.0, "all zeros")
    # Per candidate: (stored blocks, thread balance).
    stored = {"csr": (w.nnz, w.imbalance)}
    if settings.csr_max_density is not None and w.density > settings.csr_max_density:
        stored.pop("csr")
    elif w.ell_stored and (w.nnz < w.ell_stored <= ELL_MAX_PADDING * w.nnz
                           or ELL_CANDIDATE in (settings.formats or ())):
        stored[ELL_CANDIDATE] = (w.ell_stored, 1.0)  # padded rows, equal per row: threads share them evenly
    csr_cap = CSR_BREAK_EVEN if settings.csr_max_density is None else settings.csr_max_density
    stored.update({candidate_name((b.rows, b.cols)): (b.blocks, b.imbalance) for b in w.blocks})
    stored = {name: v for name, v in stored.items() if allowed(name, settings.formats)}
    forced = settings.formats is not None and "dense" not in settings.formats
    if machine is None and settings.cost_model == "break-even":
        limits = {**{candidate_name(b): t for b, t in BSR_BREAK_EVEN.items()}, "csr": csr_cap, ELL_CANDIDATE: csr_cap}
        relative = {name: _stored_fraction(w, name, blocks) / limits[name] if limits[name] else float("inf")
                    for name, (blocks, _) in stored.items() if name in limits}
        predictions: dict[str, float] = {}
        timing = "time relative to dense: stored fraction over the measured break-even"
    elif machine is None:
        raise ValueError(f"choose_format: cost_model={settings.cost_model!r} predicts with the machine model; pass "
                         "`machine` (sparsecc.planning.calibration.machine_model(settings))")
    else:
        relative, predictions, timing = _predict(w, stored, machine)
        # One forced format leaves nothing to choose between: timing it would only slow the compile.
        if measure is not None and relative and not (forced and len(relative) == 1):
            seconds = measure(finalists(predictions))
            if seconds:
                measured.update({name: round(t * 1e6, 2) for name, t in seconds.items()})
                relative = {name: t / seconds["dense"] for name, t in seconds.items() if name != "dense"}
                timing = f"measured here, dense {seconds['dense'] * 1e6:.0f} us; predicted {timing}"
    if not relative:
        allowing = f"formats={list(settings.formats)} allows" if settings.formats is not None else "there is"
        return dense(f"{allowing} no sparse format that fits this weight", predictions)
    others = ", ".join(f"{name} {t:.2f}x" for name, t in sorted(relative.items(), key=lambda kv: kv[1]))
    # N:M weights run on the same kernels: at 2:4's 50 % density no sparse kernel measured faster than dense here
    # (benchmarks/kernel_break_even.py), so the pattern only says why such a weight is, or is not, sparse. Pruned to
    # exactly n of every m, their rows are of one length, and the CSR kernel takes that length as a constant.
    nm = w.nm_label()
    if nm is not None:
        others += f"; {nm} structured, run as its density allows"
    eligible = {name: t for name, t in relative.items()
                if forced or not predictions or measured
                or _stored_fraction(w, name, stored[name][0]) <= MAX_STORED_DENSITY.get(candidate_block(name), 0.0)}
    if not eligible:
        return dense(f"density {w.density:.3f}: every sparse format would store more than its break-even fraction "
                     f"(csr {MAX_STORED_DENSITY[(1, 1)]:.2f}; {timing}; {others})", predictions)
    name, est = min(eligible.items(), key=lambda kv: (kv[1], kv[0] != "csr"))
    verb = "measured" if measured else "predicted"
    fmt = candidate_format(name)
    chosen = candidate_block(name) if fmt is SparseFormat.BSR else None
    if forced:
        return FormatChoice(fmt, chosen, est, f"density {w.density:.3f}: {name} forced by formats="
                            f"{list(settings.formats)}, {verb} at {est:.2f}x dense ({timing}; {others})", predictions,
                            measured)
    gain = max(settings.min_gain, MEASURED_MIN_GAIN) if measured else settings.min_gain
    if est * gain >= 1.0:
        wanted = "faster than dense" if gain == 1.0 else f"{gain:.2f}x faster than dense"
        return dense(f"density {w.density:.3f}: no sparse format {verb} {wanted} ({timing}; {others})", predictions)
    return FormatChoice(fmt, chosen, est, f"density {w.density:.3f}: {name} {verb} at {est:.2f}x dense "
                        f"({timing}; {others})", predictions, measured)


def _stored_fraction(w: WeightSparsity, name: str, blocks: int) -> float:
    """The fraction of the weight's blocks that candidate `name`, storing `blocks` of them, keeps."""
    r, c = candidate_block(name)
    return blocks / max(1, w.numel // (r * c))


def _predict(w: WeightSparsity, stored: dict, machine: MachineModel | Callable[[], MachineModel]):
    """(time relative to dense per candidate, predicted microseconds per candidate, a note on the dense time)."""
    model = machine() if callable(machine) else machine
    n, k = w.matrix or w.shape
    tokens = _tokens(w)
    assumed = "" if any(u.tokens > 0 for u in w.uses) else f"; token count unknown, {UNKNOWN_TOKENS} assumed"
    dense_s = sum(predict_dense(model, n, k, t, w.dtype) for t in tokens)
    sparse_s = {}
    for name, (blocks, spread) in stored.items():
        times = [predict_sparse(model, n, k, t, candidate_block(name), blocks, spread, w.dtype) for t in tokens]
        if all(t is not None for t in times):
            sparse_s[name] = sum(times)
    predictions = {"dense": round(dense_s * 1e6, 2), **{name: round(t * 1e6, 2) for name, t in sparse_s.items()}}
    timing = f"dense {dense_s * 1e6:.0f} us at {'+'.join(map(str, tokens))} tokens{assumed}"
    return {name: t / dense_s for name, t in sparse_s.items()}, predictions, timing


def allowed(name: str, formats: tuple[str, ...] | None) -> bool:
    """Whether the `formats` option lets the planner use candidate `name` ("csr", "ell", "bsrRxC")."""
    if formats is None:
        return True
    if name in ("csr", ELL_CANDIDATE):
        return name in formats
    return "bsr" in formats or name in formats
