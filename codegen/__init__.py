"""TVM code generation: the only part of sparsecc that imports TVM."""
