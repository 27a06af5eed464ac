"""Ahead of time: compile a pruned encoder once, then run the artifact in another process that has neither the
model's code nor transformers imported.

    python examples/aot_build_and_load.py [OUTPUT_DIR]
"""

import logging
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

import sparsecc
from sparsecc.sparsify import prune_linears_


def build(out: Path) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(num_hidden_layers=2)).eval()
    prune_linears_(model, 0.9)
    ids = torch.randint(0, model.config.vocab_size, (1, 128))
    path = sparsecc.export(model, (ids,), out / "bert")
    with torch.no_grad():
        save_file({"ids": ids, "expected": model(ids).last_hidden_state}, str(out / "check.safetensors"))
    print(f"built {path}")


RUN = textwrap.dedent("""
    import sys, torch, sparsecc
    from safetensors.torch import load_file
    out = sys.argv[1]
    model = sparsecc.load(out + "/bert")
    check = load_file(out + "/check.safetensors")
    hidden = model(check["ids"])[0]   # a tuple here: this process does not import transformers' output class
    torch.testing.assert_close(hidden, check["expected"], rtol=1e-4, atol=1e-4)
    print(f"loaded in a fresh process: {len(model.regions)} TVM region(s), output matches eager PyTorch")
""")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="sparsecc-aot-"))
    build(out)
    subprocess.run([sys.executable, "-c", RUN, str(out)], check=True)


if __name__ == "__main__":
    main()
