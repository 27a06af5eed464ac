"""`sparsecc bench DIR`: the artifact's latency against eager dense PyTorch running the same program."""

from __future__ import annotations

import argparse
from pathlib import Path

from sparsecc.commands.common import load_program, print_json
from sparsecc.errors import SparseccError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", metavar="DIR", help="an artifact directory from `sparsecc build`")
    parser.add_argument("--program", metavar="MODEL.pt2",
                        help="the program it was built from (default: the file the manifest names, looked for in "
                             "the current directory and next to the artifact)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs of each (interleaved)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the timings as JSON")


def find_program(artifact: Path, manifest: dict, given: str | None) -> str:
    from sparsecc.artifact.store import sha256

    source = manifest.get("source")
    if given is not None:
        return given
    if not source:
        raise SparseccError(f"{artifact} does not name the program it was built from; pass --program MODEL.pt2")
    for folder in (Path.cwd(), artifact.resolve().parent):
        candidate = folder / source["file"]
        if candidate.is_file() and sha256(candidate) == source["sha256"]:
            return str(candidate)
    raise SparseccError(f"{source['file']} (the program {artifact} was built from) is not in the current directory "
                        "or next to the artifact, or has changed; pass --program MODEL.pt2")


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.utils._pytree as pytree
    from safetensors.torch import load_file

    from sparsecc.artifact import load
    from sparsecc.measure.clock import interleaved, timing_table
    from sparsecc.tolerances import assert_outputs_close

    artifact = Path(args.artifact)
    model = load(artifact)
    eager = load_program(find_program(artifact, model.manifest, args.program)).module()
    stored = load_file(str(artifact / "example_inputs.safetensors"))
    inputs = [stored[f"input_{i}"] for i in range(len(stored))]
    with torch.no_grad():
        try:
            assert_outputs_close(pytree.tree_leaves(model(*inputs)), pytree.tree_leaves(eager(*inputs)))
        except AssertionError as exc:
            raise SparseccError(f"the artifact's outputs differ from the program's: {exc}") from None
        results = interleaved({"eager": lambda: eager(*inputs), "sparsecc": lambda: model(*inputs)},
                              repeats=args.repeats, warmup=args.warmup)
    if args.json:
        print_json({name: vars(t) for name, t in results.items()}
                   | {"speedup": results["eager"].median_ms / results["sparsecc"].median_ms,
                      "threads": torch.get_num_threads()})
    else:
        print(f"{artifact}: {len(inputs)} inputs from the build, {torch.get_num_threads()} threads, "
              f"{args.repeats} interleaved runs each")
        print(timing_table(results, baseline="eager"))
    return 0
