"""Ahead-of-time compilation: `sparsecc.export` writes an artifact directory, `sparsecc.load` runs it."""

from sparsecc.artifact.exporter import export, plan_program
from sparsecc.artifact.loader import LoadedModel, load

__all__ = ["LoadedModel", "export", "load", "plan_program"]
