"""Autotuning: knobs, the search, the persistent database (reuse, concurrent writers), the `tune` option, and
measurement through a TVM RPC tracker and server on loopback."""

import dataclasses
import multiprocessing
import sqlite3

import pytest
import torch
import tvm
from torch.fx.experimental.proxy_tensor import make_fx

from conftest import TEST_OPTIONS

from sparsecc import OptionError, SparseccError
from sparsecc.codegen import tuning
from sparsecc.codegen.tuning import knob_search, runners
from sparsecc.codegen.converters import SparseLinearSpec
from sparsecc.codegen.kernels.cpu.bsr import bsr_linear_kernel
from sparsecc.kernel_work import KernelKnobs, default_knobs
from sparsecc.codegen.targets import host_target
from sparsecc.packing import pack_blocks
from sparsecc.pipeline import run_pipeline
from sparsecc.settings import Settings, TuneSettings
from sparsecc.planning.tuning_db import TuningDatabase, TuningKey, TuningRecord


# Short timings: these tests check what tuning does and what survives a fault, not how well it ranks kernels.
pytestmark = pytest.mark.usefixtures("quick_timing")


def sparse_weight(n, k, density, seed, block=(1, 1)):
    g = torch.Generator().manual_seed(seed)
    occupied = torch.rand(n // block[0], k // block[1], generator=g) < density
    mask = occupied.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return torch.randn(n, k, generator=g) * mask


def run_with_knobs(x, w, bias, block, knobs):
    m, k = x.shape
    n = w.shape[0]
    packed = pack_blocks(w, block)
    kernel = bsr_linear_kernel(m, n, k, block, "float32", column_dtype=str(packed[1].dtype).removeprefix("torch."),
                               knobs=knobs)
    lib = tvm.compile(tvm.IRModule({"kernel": kernel.with_attr("global_symbol", "kernel")}), target=host_target(2))
    out = torch.empty(m, n)
    args = [x, *packed, bias, torch.zeros(1, 1)]
    lib["kernel"](*[tvm.runtime.from_dlpack(a.contiguous()) for a in args], tvm.runtime.from_dlpack(out))
    return out


def test_default_knobs_generate_the_untuned_kernel():
    for m, n, k, block in [(128, 768, 3072, (1, 1)), (37, 64, 48, (16, 1)), (5, 32, 32, (4, 4))]:
        explicit = bsr_linear_kernel(m, n, k, block, "float32", knobs=default_knobs(m, n, k, block, "float32"))
        assert explicit.script() == bsr_linear_kernel(m, n, k, block, "float32").script()


@pytest.mark.parametrize("block,knobs", [
    ((1, 1), KernelKnobs(token_tile=8, rows_per_task=2, token_outer=True, chains=8)),
    ((1, 1), KernelKnobs(token_tile=64, rows_per_task=64, token_outer=False, chains=1)),
    ((1, 1), KernelKnobs(token_tile=16, rows_per_task=4, token_outer=True, chains=2)),
    ((4, 1), KernelKnobs(token_tile=16, rows_per_task=2, token_outer=True, chains=2)),  # rows < r: one block-row
    ((4, 4), KernelKnobs(token_tile=8, rows_per_task=16, token_outer=False, chains=4)),
    ((1, 1), KernelKnobs(token_tile=16, rows_per_task=8, token_outer=False, chains=4, token_split=True)),
    ((16, 1), KernelKnobs(token_tile=8, rows_per_task=16, token_outer=False, chains=1, token_split=True)),
])
def test_non_default_knobs_compute_the_same_result(block, knobs):
    w = sparse_weight(64, 48, 0.2, 3, block)
    x, bias = torch.randn(37, 48), torch.randn(64)  # 37 tokens: a partial last tile whatever the tile
    torch.testing.assert_close(run_with_knobs(x, w, bias, block, knobs), x @ w.t() + bias, rtol=1e-5, atol=1e-5)


def test_search_space_is_canonical_and_fits():
    spec = SparseLinearSpec(128, 768, 768, (1, 1), "float32", "none", False, "int16")
    space = tuning.candidate_space(spec)
    assert space[0] == tuning.spec_default(spec) == default_knobs(128, 768, 768, (1, 1), "float32")
    assert len(space) == len(set(space)) > 20
    assert all(c.fits(spec.block, spec.dtype) and tuning.canonical(c, spec) == c for c in space)
    for c in space[:10]:
        for nb in tuning.neighbours(c, space):
            assert sum(getattr(nb, f.name) != getattr(c, f.name) for f in dataclasses.fields(KernelKnobs)) == 1
    tall = SparseLinearSpec(128, 768, 768, (16, 1), "float32", "none", False, "int16")
    assert {c.token_tile for c in tuning.candidate_space(tall)} == {4, 8}  # 16 rows x 16 tokens would leave the stack


def layers_model():
    """Two 96x64 layers (one kernel, different patterns; the second holds more blocks) and a 64x96 layer."""
    w1, w2, w3 = sparse_weight(96, 64, 0.1, 1), sparse_weight(96, 64, 0.2, 2), sparse_weight(64, 96, 0.1, 3)
    b3 = torch.randn(64)

    def fn(x):
        h = torch.stack([torch.nn.functional.linear(x, w1), torch.nn.functional.linear(x, w2)]).sum(0)
        return torch.nn.functional.linear(torch.relu(h), w3, b3)

    return fn


def compile_fn(fn, x, **options):
    settings = Settings.from_options({**TEST_OPTIONS, "min_weight_numel": 1, "on_failure": "raise", **options})
    return run_pipeline(make_fx(fn)(x), [x], settings)


def test_tuning_then_database_reuse_without_measuring(tmp_path):
    fn, x = layers_model(), torch.randn(20, 64)
    before = tuning.MEASUREMENTS.count
    state = compile_fn(fn, x, tune={"trials": 3}, cache_dir=str(tmp_path))
    report = state.tuning
    assert [k.source for k in report.kernels] == ["tuned", "tuned"]
    assert sorted(len(k.layers) for k in report.kernels) == [1, 2]  # the two 96x64 layers share one kernel
    assert all(k.trials == 3 for k in report.kernels)
    assert tuning.MEASUREMENTS.count > before
    torch.testing.assert_close(state.run([x]), fn(x), rtol=1e-4, atol=1e-4)  # verify=True checked it too
    db = TuningDatabase(tmp_path)
    assert len(db) == 2
    # The shared kernel is tuned on the layer with more stored blocks: w2's pattern is in the key.
    shared = next(k for k in report.kernels if len(k.layers) == 2)
    assert shared.pattern == tuning.KernelTask.from_weight(sparse_weight(96, 64, 0.2, 2), 20).pattern

    # Store non-default knobs for every kernel, then compile again: they are used, and nothing is measured.
    forced = KernelKnobs(token_tile=8, rows_per_task=2, token_outer=True, chains=1)
    for record in db.records():
        db.put(dataclasses.replace(record, knobs=forced.as_dict(), trials=99))
    count = tuning.MEASUREMENTS.count
    again = compile_fn(fn, x, tune={"trials": 3}, cache_dir=str(tmp_path))
    assert tuning.MEASUREMENTS.count == count
    assert [k.source for k in again.tuning.kernels] == ["database", "database"]
    assert all(k.knobs == forced for k in again.tuning.kernels)
    prim_funcs = {gv.name_hint: f for gv, f in again.irmodule.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert sorted(prim_funcs) == sorted(k.name for k in again.tuning.kernels)
    for k in again.tuning.kernels:  # the kernels built are the ones with the stored knobs
        assert prim_funcs[k.name].script() == k.spec.kernel(forced).script()
        assert prim_funcs[k.name].script() != k.spec.kernel().script()
    torch.testing.assert_close(again.run([x]), fn(x), rtol=1e-4, atol=1e-4)

    # A shorter stored search than asked for: tuned again, starting from the stored knobs.
    for record in db.records():
        db.put(dataclasses.replace(record, trials=2))
    starts = []
    real_search = knob_search.search

    def spy(task, trials, runner, start=None, *args, **kwargs):
        starts.append(start)
        return real_search(task, trials, runner, start, *args, **kwargs)

    knob_search.search, saved = spy, knob_search.search
    try:
        longer = compile_fn(fn, x, tune={"trials": 3}, cache_dir=str(tmp_path))
    finally:
        knob_search.search = saved
    assert [k.source for k in longer.tuning.kernels] == ["tuned", "tuned"] and starts == [forced, forced]


def test_trials_zero_reads_the_database_only(tmp_path):
    fn, x = layers_model(), torch.randn(20, 64)
    count = tuning.MEASUREMENTS.count
    state = compile_fn(fn, x, tune={"trials": 0}, cache_dir=str(tmp_path))
    assert tuning.MEASUREMENTS.count == count
    assert [k.source for k in state.tuning.kernels] == ["default", "default"]
    assert len(TuningDatabase(tmp_path)) == 0


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path / "env"))
    assert TuningDatabase.open_default().path == tmp_path / "env" / "tuning.sqlite"
    assert TuningDatabase.open_default(tmp_path / "opt").path == tmp_path / "opt" / "tuning.sqlite"


def record(i: int, writer: int) -> TuningRecord:
    key = TuningKey("target", "tvm", "sparsecc", "bsr_linear", 1, TuningKey.spec_json({"m": i}), f"pattern{i}")
    knobs = KernelKnobs(8 * (1 + i % 4), 8, bool(writer), 1 + i % 3).as_dict()
    return TuningRecord(key, knobs, best_us=i + 0.5, default_us=2 * i + 1.0, trials=i, exhausted=False,
                        measured_on=f"writer{writer}")


def write_records(path: str, writer: int, count: int) -> None:
    db = TuningDatabase(path)
    for i in range(count):
        db.put(record(writer * 1000 + i, writer))  # this writer's own rows
        db.put(record(i, writer))  # rows both writers write
        assert db.get(record(writer * 1000 + i, writer).key) is not None


def test_concurrent_writers_leave_every_row_readable(tmp_path):
    ctx = multiprocessing.get_context("fork")
    count = 40
    procs = [ctx.Process(target=write_records, args=(str(tmp_path), w, count)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    db = TuningDatabase(tmp_path)
    assert len(db) == 3 * count
    for w in (1, 2):
        for i in range(count):
            assert db.get(record(w * 1000 + i, w).key) == record(w * 1000 + i, w).__class__(
                **{**dataclasses.asdict(record(w * 1000 + i, w)), "key": record(w * 1000 + i, w).key,
                   "created": db.get(record(w * 1000 + i, w).key).created})
    for i in range(count):  # written by both: one whole row from one of them
        got = db.get(record(i, 1).key)
        assert got.measured_on in ("writer1", "writer2")
        assert got.knobs == record(i, int(got.measured_on[-1])).knobs
    with sqlite3.connect(db.path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.parametrize("tune,message", [
    ({"trails": 4}, "Did you mean 'trials'? Valid keys: trials, retune, rpc"),
    ({"trials": -1}, "'trials' must be an int >= 0"),
    ({"trials": 2.5}, "'trials' must be an int >= 0"),
    ({"retune": "yes"}, "'retune' must be True or False"),
    (16, "option 'tune' must be a dict"),
    ({"rpc": {"tracker": "localhost", "key": "cpu"}}, "'tracker' must be 'host:port'"),
    ({"rpc": {"tracker": "localhost:9190"}}, "needs 'key'"),
    ({"rpc": {"tracker": "localhost:9190", "key": "cpu", "session": 2}},
     "Valid keys: tracker, key, sessions, priority, session_timeout"),
    ({"rpc": {"tracker": "localhost:9190", "key": "cpu", "sessions": 0}}, "'sessions' must be an int >= 1"),
])
def test_tune_option_validation(tune, message):
    with pytest.raises(OptionError, match="option 'tune") as info:
        Settings.from_options({"tune": tune})
    assert message in str(info.value)


def test_tune_option_forms():
    assert Settings.from_options({"tune": {}}).tune == TuneSettings(trials=16)
    s = Settings.from_options({"tune": {"trials": 4, "rpc": {"tracker": "10.0.0.1:9190", "key": "epyc", "sessions": 3}}})
    assert s.tune.trials == 4 and s.tune.rpc.address == ("10.0.0.1", 9190) and s.tune.rpc.sessions == 3
    hash(s)  # settings stay hashable
    assert Settings.from_options({"tune": s.tune}).tune == s.tune
    with pytest.raises(OptionError, match="option 'cache_dir'"):
        Settings.from_options({"cache_dir": 3})


def test_rpc_loopback_tracker_and_server(tmp_path, monkeypatch):
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    monkeypatch.setenv("TVM_NUM_THREADS", "2")  # the servers' pools, as the tuning docs tell users to start them
    tracker = Tracker(host="127.0.0.1", port=19190, port_end=19290, silent=True)
    servers = []
    try:
        for _ in range(2):  # two servers: candidates are spread over two sessions
            servers.append(rpc.Server(host="127.0.0.1", port=19300, port_end=19400,
                                      tracker_addr=("127.0.0.1", tracker.port), key="sparsecc-test", silent=True))
        address = f"127.0.0.1:{tracker.port}"
        with pytest.raises(SparseccError, match="no RPC server is registered with key 'other'"):
            tuning.tune_weights([tuning.KernelTask.from_weight(sparse_weight(8, 8, 0.5, 0), 4)],
                                {"trials": 2, "rpc": {"tracker": address, "key": "other"}}, Settings(cache_dir=str(tmp_path)))
        w = sparse_weight(64, 96, 0.1, 5)
        bias = torch.randn(64)
        task = tuning.KernelTask.from_weight(w, 37, bias=bias)
        options = {"trials": 4, "rpc": {"tracker": address, "key": "sparsecc-test", "sessions": 2}}
        timed_on = []
        real_time_us = runners._Device.time_us

        def spy(self, cand):
            timed_on.append(self.name)
            return real_time_us(self, cand)

        monkeypatch.setattr(runners._Device, "time_us", spy)
        report = tuning.tune_weights([task], options, Settings(cache_dir=str(tmp_path), num_threads=2))
    finally:
        for server in servers:
            server.terminate()
        tracker.terminate()
    assert set(timed_on) == {"rpc:sparsecc-test#0", "rpc:sparsecc-test#1"}
    (result,) = report.kernels
    assert result.source == "tuned" and result.trials == 4 and report.measured_on == f"rpc:{address}/sparsecc-test"
    (stored,) = TuningDatabase(tmp_path).records()
    assert stored.measured_on == report.measured_on and KernelKnobs(**stored.knobs) == result.knobs
    assert stored.best_us > 0 and stored.default_us > 0
    x = torch.randn(37, 96)
    torch.testing.assert_close(run_with_knobs(x, w, bias, (1, 1), result.knobs), x @ w.t() + bias,
                               rtol=1e-5, atol=1e-5)


def test_rpc_server_that_goes_away_mid_tuning_ends_with_a_clear_error(tmp_path, monkeypatch):
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    tracker = Tracker(host="127.0.0.1", port=19190, port_end=19290, silent=True)
    server = rpc.Server(host="127.0.0.1", port=19300, port_end=19400, tracker_addr=("127.0.0.1", tracker.port),
                        key="sparsecc-test", silent=True)
    real_search = knob_search.search
    searches = []

    def search_then_stop_the_server(*args, **kwargs):
        searches.append(args[0].spec.name)
        if len(searches) == 2:
            server.terminate()  # the server dies as the second kernel's search starts
        return real_search(*args, **kwargs)

    monkeypatch.setattr(knob_search, "search", search_then_stop_the_server)
    tasks = [tuning.KernelTask.from_weight(sparse_weight(32, 48, 0.1, seed), 8) for seed in (1, 2)]
    options = {"trials": 2, "rpc": {"tracker": f"127.0.0.1:{tracker.port}", "key": "sparsecc-test"}}
    try:
        with pytest.raises(SparseccError) as info:
            tuning.tune_weights(tasks, options, Settings(cache_dir=str(tmp_path), num_threads=2))
    finally:
        server.terminate()
        tracker.terminate()
    message = str(info.value)
    assert searches[1] in message and "stopped answering" in message and "1 kernel(s) tuned before it" in message
    (stored,) = TuningDatabase(tmp_path).records()  # the first kernel's result, and nothing of the second
    assert stored.trials == 2 and stored.measured_on.startswith("rpc:")
