"""Break-even density of each sparse format at BERT shapes: the kernel alone (TVM time evaluator) at 10 % stored
density against torch dense addmm, assuming time grows linearly with stored density. plan_formats.BSR_BREAK_EVEN
and the default csr_max_density are these figures times 0.75, because inside a model the kernels run slower
than alone (docs/benchmarks.md, threads).

    python benchmarks/kernel_break_even.py
"""

import torch, tvm, warnings, statistics
warnings.simplefilter("ignore")
import sparsecc.codegen.targets as targets
from sparsecc.codegen.kernels.cpu.bsr import bsr_linear_kernel
from sparsecc.measure.clock import median_seconds
from sparsecc.packing import pack_blocks
torch.manual_seed(0)
blocks = [(1, 1), (1, 4), (4, 1), (8, 1), (16, 1), (4, 4), (8, 8)]
print("block  " + "  ".join(f"{n}x{k}" for n, k in [(768, 768), (3072, 768), (768, 3072)]) + "   break-even (mean)")
dense_t = {}
for (n, k) in [(768, 768), (3072, 768), (768, 3072)]:
    x = torch.randn(128, k); w = torch.randn(n, k); b = torch.randn(n)
    dense_t[(n, k)] = median_seconds(lambda: torch.addmm(b, x, w.t()), 40, warmup=0) * 1e3
for block in blocks:
    r, c = block
    row = []
    for (n, k) in [(768, 768), (3072, 768), (768, 3072)]:
        occ = (torch.rand(n // r, k // c) < 0.1).repeat_interleave(r, 0).repeat_interleave(c, 1)
        w = torch.randn(n, k) * occ; x = torch.randn(128, k); b = torch.randn(n)
        f = bsr_linear_kernel(128, n, k, block, "float32")
        lib = tvm.compile(tvm.IRModule({"k": f.with_attr("global_symbol", "k")}), target=targets.host_target(2)).jit()
        y = torch.empty(128, n)
        args = [tvm.runtime.from_dlpack(a.contiguous()) for a in [x, *pack_blocks(w, block), b, torch.zeros(1, 1)]] + [tvm.runtime.from_dlpack(y)]
        lib["k"](*args); torch.testing.assert_close(y, x @ w.T + b, rtol=1e-4, atol=1e-4)
        ev = lib.time_evaluator("k", tvm.cpu(), number=10, repeat=7)
        t = sorted(ev(*args).results)[3] * 1e3
        row.append((t, 0.1 * dense_t[(n, k)] / t))
    print(f"{r}x{c}   " + "  ".join(f"{t:.3f}ms" for t, _ in row) + f"   {statistics.mean(be for _, be in row):.2f}")
print("dense", {k: round(v, 3) for k, v in dense_t.items()})
