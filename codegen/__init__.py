"""Lowering to TVM: the only part of sparsecc that imports TVM at module level. Importing it sizes TVM's thread pool
first (codegen/targets.py), before anything can start the pool, and gives TVMScript macros a faster way to find
their parser (codegen/script_macros.py)."""

from sparsecc.codegen import script_macros, targets  # noqa: F401

script_macros.install()
