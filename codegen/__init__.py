"""Lowering to TVM: the only part of sparsecc that imports TVM at module level. Importing it sizes TVM's thread pool
first (codegen/targets.py), before anything can start the pool."""

from sparsecc.codegen import targets  # noqa: F401
