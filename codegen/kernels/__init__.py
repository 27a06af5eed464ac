"""TIR kernel factories, a folder per target (cpu/: LLVM; cuda/ to come), one file per kernel.

What a kernel does in numbers (knobs, task spans, the token-tiled layout, template versions) is TVM-free and lives
in sparsecc/kernel_work.py, which analysis and the cost model use too.
"""
