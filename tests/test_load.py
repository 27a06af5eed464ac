"""A compiled model under load: called from several threads at once, its weights edited from another thread between
calls, and 10,000 calls in a row (slow) without growing memory, threads or open files."""

import os
import threading

import pytest
import torch
from conftest import TEST_OPTIONS, CompileWatch

from sparsecc.sparsify import prune_linears_
from sparsecc.tolerances import TOLERANCES

FP32 = TOLERANCES[torch.float32]


def small_bert(hidden=64, layers=2, heads=4, intermediate=160):
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate, vocab_size=120, max_position_embeddings=64)
    return prune_linears_(BertModel(config), 0.9).eval()


def compiled_bert(model):
    return torch.compile(model, backend="sparsecc", options={**TEST_OPTIONS, "min_weight_numel": 1})


def test_four_threads_at_once_match_serial_calls(no_fallback):
    model = small_bert()
    compiled = compiled_bert(model)
    inputs = [torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad(), CompileWatch() as watch:
        serial = [compiled(x).last_hidden_state for x in inputs]
        calls = watch.region_calls
        results: dict[tuple[int, int], torch.Tensor] = {}
        failures: list[BaseException] = []
        start = threading.Barrier(4)

        def worker(k: int) -> None:
            try:
                with torch.no_grad():
                    start.wait()
                    for r in range(40):
                        j = (k + r) % len(inputs)
                        results[k, r] = compiled(inputs[j]).last_hidden_state
            except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
                failures.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        expected = model(inputs[0]).last_hidden_state
    assert not failures, failures
    for (k, r), out in results.items():
        torch.testing.assert_close(out, serial[(k + r) % len(inputs)], rtol=0, atol=0)
    torch.testing.assert_close(serial[0], expected, **FP32)
    assert watch.region_calls - calls == 4 * 40 * len(watch.graphs[0].state.regions)  # the sparse path ran


def test_weight_edits_from_another_thread_are_never_stale(no_fallback):
    model = small_bert()
    compiled = compiled_bert(model)
    x = torch.randint(0, 120, (2, 16))
    linear = model.encoder.layer[0].intermediate.dense
    edits = [lambda w: w.mul_(-2.0), lambda w: w.add_(0.01), lambda w: w.zero_()]
    with torch.no_grad():
        compiled(x)
        for edit in edits:
            editor = threading.Thread(target=lambda: torch.no_grad()(edit)(linear.weight))
            editor.start()
            editor.join()  # the edit is done before the next call starts: that call must see it
            torch.testing.assert_close(compiled(x).last_hidden_state, model(x).last_hidden_state, **FP32)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
def test_ten_thousand_calls_keep_memory_threads_and_files_flat(no_fallback):
    # BERT-small's shape (4 layers of width 512), pruned 90 %: a few ms a call.
    model = small_bert(hidden=512, layers=4, heads=8, intermediate=2048)
    compiled = compiled_bert(model)
    x = torch.randint(0, 120, (1, 32))
    with torch.no_grad(), CompileWatch() as watch:
        for _ in range(200):  # warm-up: allocator pools and thread pools reach their working size
            compiled(x)
        rss, threads, files = _rss_mb(), _os_threads(), _open_files()
        calls = watch.region_calls
        for _ in range(10_000):
            out = compiled(x)
        grown = _rss_mb() - rss
        torch.testing.assert_close(out.last_hidden_state, model(x).last_hidden_state, **FP32)
    assert watch.region_calls - calls >= 10_000
    assert grown < 20, f"RSS grew by {grown:.1f} MB over 10,000 calls"
    assert _os_threads() == threads and _open_files() == files
