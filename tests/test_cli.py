"""The `sparsecc` command as a build pipeline runs it: a real process, exit codes, data on stdout, logs on stderr."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import CLI_TEST_OPTIONS

from sparsecc.cli import COMMANDS, main
from sparsecc.sparsify import prune_linears_


def sparsecc_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sparsecc", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64), nn.Linear(64, 64)).eval()
    prune_linears_(model, 0.9)
    with torch.no_grad():
        model[3].weight.normal_()  # stays dense
    path = folder / "mlp.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(4, 128),)), str(path))
    return path


def test_analyze_json_lists_each_weight_with_format_and_gain(program):
    done = sparsecc_cli("analyze", program, "--json", *CLI_TEST_OPTIONS)
    assert done.returncode == 0, done.stderr
    rows = {r["weight"]: r for r in json.loads(done.stdout)["weights"]}
    assert set(rows) == {"0.weight", "2.weight", "3.weight"}
    assert rows["0.weight"]["format"] == "csr" and rows["0.weight"]["predicted_gain"] > 1
    assert rows["3.weight"]["format"] == "dense" and rows["3.weight"]["density"] == 1.0
    assert rows["0.weight"]["shape"] == [128, 256]


@pytest.mark.slow  # needs this machine's calibration (measured once per session, about a minute)
def test_analyze_shows_each_candidates_prediction_with_the_calibrated_model(program, monkeypatch, calibrated_cache_dir):
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(calibrated_cache_dir))
    done = sparsecc_cli("analyze", program, "--json", "-O", "cost_model=calibrated")
    assert done.returncode == 0, done.stderr
    rows = {r["weight"]: r for r in json.loads(done.stdout)["weights"]}
    for row in rows.values():
        assert row["predicted_us"]["dense"] > 0 and "csr" in row["predicted_us"], row
    chosen = rows["0.weight"]
    name = "dense" if chosen["format"] == "dense" else "csr" if chosen["format"] == "csr" else \
        f"bsr{chosen['block'][0]}x{chosen['block'][1]}"
    assert name in chosen["predicted_us"] and "us at 4 tokens" in chosen["reason"]


def test_analyze_table_and_plot(program, tmp_path):
    pytest.importorskip("matplotlib")
    done = sparsecc_cli("analyze", program, "--plot", tmp_path / "plan.png", "-O", "min_weight_numel=1000000",
                        *CLI_TEST_OPTIONS)
    assert done.returncode == 0, done.stderr
    assert "0.weight" in done.stdout and "0 of 3 weights sparse" in done.stdout  # the option reached the planner
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_build_inspect_bench(program, tmp_path):
    out = tmp_path / "artifact"
    done = sparsecc_cli("build", program, "-o", out, *CLI_TEST_OPTIONS)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    assert "[8/8] build done" in done.stderr  # progress goes to stderr
    info = json.loads(sparsecc_cli("inspect", out, "--json").stdout)
    assert info["manifest"]["source"]["file"] == "mlp.pt2"
    assert len(info["manifest"]["sparse_weights"]) == 2
    text = sparsecc_cli("inspect", out).stdout
    assert "kernels.so" in text and "2 of 3 sparse" in text
    # bench finds mlp.pt2 through the manifest when run from its folder, checks outputs, then times both.
    done = sparsecc_cli("bench", out, "--repeats", "3", "--json", cwd=program.parent)
    assert done.returncode == 0, done.stderr
    timings = json.loads(done.stdout)
    assert {"eager", "sparsecc", "speedup"} <= set(timings) and timings["sparsecc"]["median_ms"] > 0


def test_build_for_another_cpu_then_inspect(program, tmp_path):
    out = tmp_path / "arm"
    assert sparsecc_cli("build", program, "-o", out, "--target", "aarch64", *CLI_TEST_OPTIONS).returncode == 0
    text = sparsecc_cli("inspect", out).stdout
    assert "aarch64-linux-gnu" in text and "not this machine" in text


@pytest.mark.parametrize("args, reason", [
    (["build", "missing.pt2", "-o", "x"], "missing.pt2: no such file"),
    (["inspect", "no-such-dir"], "does not exist"),
    (["build", "{program}", "-o", "x", "-O", "csr_max_densty=0.2"], "Did you mean 'csr_max_density'"),
    (["build", "{program}", "-o", "x", "--target", "sparc"], "option 'target'"),
])
def test_failures_exit_1_with_one_line(program, tmp_path, monkeypatch, capsys, args, reason):
    monkeypatch.chdir(tmp_path)  # in-process: the same main() the console script calls, without a new interpreter
    assert main([a.format(program=program) for a in args]) == 1
    out, err = capsys.readouterr()
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"sparsecc {args[0]}: error:") and reason in last
    assert out == ""
    assert not (tmp_path / "x").exists()


def test_not_a_program_is_refused(tmp_path):
    bogus = tmp_path / "bogus.pt2"
    bogus.write_bytes(b"not a zip")
    done = sparsecc_cli("analyze", bogus)
    assert done.returncode == 1 and "is not a torch.export program" in done.stderr


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and f"usage: sparsecc {command}" in capsys.readouterr().out


def test_export_mlir_writes_encoded_weights(program, tmp_path):
    pytest.importorskip("torch_mlir")
    out = tmp_path / "model.mlir"
    done = sparsecc_cli("export-mlir", program, "-o", out, *CLI_TEST_OPTIONS)
    assert done.returncode == 0, done.stderr
    from torch_mlir import ir

    with ir.Context() as ctx:
        ctx.allow_unregistered_dialects = False
        module = ir.Module.parse(out.read_text())
    text = str(module)
    assert 'sparse_tensor.encoding' in text
    assert text.count("#sparse") >= 2 and 'sparsecc.weight = "3.weight"' in text


def test_tune_fills_the_database_and_build_reuses_it(program, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(cache))
    first = sparsecc_cli("tune", program, "--trials", "2", *CLI_TEST_OPTIONS)
    assert first.returncode == 0, first.stderr
    assert "tuned" in first.stdout and (cache / "tuning.sqlite").is_file()
    again = sparsecc_cli("tune", program, "--trials", "2", *CLI_TEST_OPTIONS)
    assert again.returncode == 0 and "0 measurements" in again.stdout and "database" in again.stdout
    built = sparsecc_cli("build", program, "-o", tmp_path / "art", "--tune", "2", *CLI_TEST_OPTIONS)
    assert built.returncode == 0, built.stderr
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["options"]["tune"]["trials"] == 2


class ModelOutputLike(dict):
    """A model's own output class, as transformers' ModelOutput is: the CLI's process cannot import it."""


def test_program_returning_the_models_own_class_builds(tmp_path):
    import torch.utils._pytree as pytree

    pytree.register_pytree_node(
        ModelOutputLike, lambda d: (list(d.values()), list(d.keys())),
        lambda values, keys: ModelOutputLike(zip(keys, values)), serialized_type_name="not_importable.Output")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(128, 128)

        def forward(self, x):
            return ModelOutputLike(hidden=self.a(x))

    net = Net().eval()
    prune_linears_(net, 0.9)
    torch.export.save(torch.export.export(net, (torch.randn(4, 128),)), str(tmp_path / "own.pt2"))
    done = sparsecc_cli("build", tmp_path / "own.pt2", "-o", tmp_path / "art", *CLI_TEST_OPTIONS)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "a dict stands in for it" in done.stderr and "Traceback" not in done.stderr
