"""The `sparsecc` subcommands, one module each; every module has `add_arguments(parser)` and `run(args) -> int`."""
