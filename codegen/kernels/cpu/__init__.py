"""CPU (LLVM) kernels: the sparse linear (bsr.py, CSR as its 1 x 1 case), attention, layer norm, and the register
transposes they share (transpose.py)."""
