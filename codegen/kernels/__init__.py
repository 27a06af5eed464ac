"""TIR kernel factories, one file per storage format."""
