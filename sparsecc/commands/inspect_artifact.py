"""`sparsecc inspect DIR`: what an artifact holds and what it was built for."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparsecc.commands.common import print_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", metavar="DIR", help="an artifact directory from `sparsecc build`")
    parser.add_argument("--json", action="store_true", help="print the manifest and plan as JSON")


def run(args: argparse.Namespace) -> int:
    from sparsecc.artifact.store import read_manifest
    from sparsecc.codegen.targets import host_arch

    path = Path(args.artifact)
    manifest = read_manifest(path)
    plan_file = path / "plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else None
    if args.json:
        print_json({"manifest": manifest, "plan": plan})
        return 0
    target = manifest["target"]
    print(f"artifact   {path}  (format {manifest['format']})")
    print(f"built by   sparsecc {manifest['sparsecc']}, TVM {manifest['tvm']}, torch {manifest['torch']}")
    print(f"target     {target['option']}: {target['mtriple'] or target['arch']}, cpu {target['mcpu']}"
          f"{'' if target['arch'] == host_arch() else '  (not this machine: ' + host_arch() + ')'}")
    print(f"library    {manifest['library'] or 'none (runs in PyTorch only)'}; "
          f"{len(manifest['regions'])} TVM regions")
    for i, spec in enumerate(manifest["inputs"]):
        print(f"input {i}    {spec['dtype']}{spec['shape']}")
    for i, spec in enumerate(manifest["outputs"]):
        print(f"output {i}   {spec['dtype']}{spec['shape']}")
    if manifest.get("options"):
        print(f"options    {json.dumps(manifest['options'], sort_keys=True)}")
    if manifest.get("source"):
        print(f"source     {manifest['source']['file']} (sha256 {manifest['source']['sha256'][:12]})")
    print("files")
    for name, info in manifest["files"].items():
        print(f"  {name:<28}{info['bytes']:>12,} bytes")
    if plan is not None:
        sparse = {k: c for k, c in plan["choices"].items() if c["format"] != "dense"}
        print(f"weights    {len(sparse)} of {len(plan['choices'])} sparse")
        for key, c in sorted(sparse.items(), key=lambda kc: plan["weights"][kc[0]]["name"]):
            w = plan["weights"][key]
            block = f" {c['block'][0]}x{c['block'][1]}" if c["block"] else ""
            density = w["nnz"] / max(1, _numel(w["shape"]))
            print(f"  {w['name']:<48}{'x'.join(map(str, w['shape'])):>12}  density {density:.3f}  "
                  f"{c['format']}{block}")
    return 0


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
