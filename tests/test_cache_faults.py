"""Faults of the on-disk cache (sparsecc/cache.py): the tuning database, the cost model's calibrations and the OpenMP
launcher, damaged, unwritable or full, and several processes using one cache at once. Whatever the fault: the
compiled model agrees with eager PyTorch, the sparse path runs, nothing escapes to torch.compile (the compiles here
raise instead of falling back), and a damaged entry is detected, discarded and rebuilt with a warning naming it.

The suite runs as root here, where chmod does not stop writes: the read-only cases are then simulated (sqlite opened
read-only, a file where a directory should be), and the real chmod variants run only for other users."""

import dataclasses
import errno
import json
import logging
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import TEST_OPTIONS, CompileWatch

from sparsecc import SparseccError
from sparsecc.codegen import openmp_pool, tuning
from sparsecc.codegen.targets import host_target
from sparsecc.codegen.tuning import knob_search, runners
from sparsecc.planning import calibration, tuning_db
from sparsecc.planning.calibration import machine_key, machine_model
from sparsecc.planning.cost_model import REFERENCE, MachineModel
from sparsecc.planning.tuning_db import TuningDatabase, TuningKey, TuningRecord
from sparsecc.settings import Settings

DB_LOG = "sparsecc.planning.tuning_db"
ROOT = os.geteuid() == 0
# A tuned compile that must not fall back: a fault that escaped would fail the test instead of hiding.
TUNED = {**TEST_OPTIONS, "min_weight_numel": 1, "on_failure": "raise", "tune": {"trials": 2}}


# Short timings: these tests check what tuning does and what survives a fault, not how well it ranks kernels.
pytestmark = pytest.mark.usefixtures("quick_timing")


def sparse_model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32)).eval()
    with torch.no_grad():
        for layer in model[0], model[2]:
            layer.weight.mul_(torch.rand_like(layer.weight) < 0.1)
    return model


def compile_and_check(cache_dir, **options) -> None:
    """Compile the sparse model with its cache in `cache_dir`: same outputs as eager, on the sparse path."""
    model, x = sparse_model(), torch.randn(8, 64)
    compiled = torch.compile(model, backend="sparsecc", options={**TUNED, "cache_dir": str(cache_dir), **options})
    with torch.no_grad(), CompileWatch() as watch:
        torch.testing.assert_close(compiled(x), model(x))
    assert watch.sparse_ops > 0 and watch.fallbacks == 0


def record(i: int) -> TuningRecord:
    key = TuningKey("target", "tvm", "sparsecc", "bsr_linear", 1, TuningKey.spec_json({"m": i}), f"pattern{i}")
    return TuningRecord(key, {"token_tile": 8, "chains": 1 + i % 3}, best_us=i + 0.5, default_us=2 * i + 1.0,
                        trials=i, exhausted=False, measured_on="local", created=1e9 + i)


def filled_database(directory: Path, rows: int = 200) -> TuningDatabase:
    db = TuningDatabase(directory)
    for i in range(rows):
        db.put(record(i))
    return db


def warnings_of(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


def integrity(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


# ------------------------------------------------------------------------------------------- tuning database

def damage_garbage(path: Path) -> None:
    path.write_bytes(os.urandom(5000))


def damage_truncated_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def damage_truncated_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def damage_wrong_schema(path: Path) -> None:
    path.unlink()
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE tuning (digest TEXT PRIMARY KEY, knobs TEXT)")
        conn.execute("INSERT INTO tuning VALUES ('x', '{}')")


@pytest.mark.parametrize("damage", [damage_garbage, damage_truncated_header, damage_truncated_half,
                                    damage_wrong_schema])
def test_damaged_database_is_moved_aside_and_started_again(tmp_path, caplog, damage):
    path = filled_database(tmp_path).path
    damage(path)
    damaged = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger=DB_LOG):
        db = TuningDatabase(tmp_path)
        assert db.records() == [] and db.get(record(1).key) is None
        db.put(record(1))
    (warning,) = warnings_of(caplog, DB_LOG)
    assert str(path) in warning and "damaged" in warning
    (aside,) = tmp_path.glob("tuning.sqlite.corrupt-*")
    assert aside.name in warning and aside.read_bytes() == damaged  # kept for a post-mortem, not deleted
    assert db.get(record(1).key) == record(1) and integrity(path) == "ok"


def test_damage_found_mid_run_is_moved_aside_once(tmp_path, caplog):
    """The file is damaged while two handles have it open (another process overwrote it): the first to notice moves
    it aside; the second finds the fresh database in its place and leaves it alone."""
    first, second = filled_database(tmp_path, 20), TuningDatabase(tmp_path)
    damage_garbage(first.path)
    with caplog.at_level(logging.WARNING, logger=DB_LOG):
        first.put(record(7))  # detects, moves aside, stores in the fresh one
        assert second._discard()  # what a second process that also saw the damage does: re-checks, moves nothing
        assert second.get(record(7).key) == record(7)
    assert len(warnings_of(caplog, DB_LOG)) == 1
    assert len(list(tmp_path.glob("tuning.sqlite.corrupt-*"))) == 1 and len(second) == 1


def open_damaged_at_once(directory: str, writer: int, barrier) -> None:
    barrier.wait()
    TuningDatabase(directory).put(record(writer))


def test_processes_finding_the_same_damage_move_it_aside_once(tmp_path):
    """Four processes open one damaged file at the same moment: one moves it aside, the others use the database it
    started (moving that aside too would lose rows just written to it)."""
    damage_garbage(filled_database(tmp_path, 5).path)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=open_damaged_at_once, args=(str(tmp_path), w, barrier)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert len(list(tmp_path.glob("tuning.sqlite.corrupt-*"))) == 1
    assert sorted(r.trials for r in TuningDatabase(tmp_path).records()) == [0, 1, 2, 3]


@pytest.mark.parametrize("column,value", [("knobs", "{not json"), ("knobs", "[1, 2]"), ("best_us", "fast"),
                                          ("default_us", -1.0), ("digest", "0" * 64), ("target", 42)])
def test_unreadable_row_is_deleted_with_a_warning(tmp_path, caplog, column, value):
    db = filled_database(tmp_path, 5)
    bad = record(2).key.digest
    with sqlite3.connect(db.path) as conn:
        conn.execute(f"UPDATE tuning SET {column} = ? WHERE digest = ?", (value, bad))
    digest = "0" * 64 if column == "digest" else bad
    with caplog.at_level(logging.WARNING, logger=DB_LOG):
        assert sorted(r.trials for r in db.records()) == [0, 1, 3, 4]
    (warning,) = warnings_of(caplog, DB_LOG)
    assert str(db.path) in warning and "deleted 1 unreadable row" in warning
    with sqlite3.connect(db.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM tuning WHERE digest = ?", (digest,)).fetchone()[0] == 0
    db.put(record(2))  # measured again, stored again
    assert db.get(record(2).key) == record(2)


def test_compile_with_a_damaged_database_rebuilds_it(tmp_path, caplog):
    path = filled_database(tmp_path).path
    damage_truncated_half(path)
    with caplog.at_level(logging.WARNING, logger=DB_LOG):
        compile_and_check(tmp_path)
    (warning,) = warnings_of(caplog, DB_LOG)
    assert str(path) in warning
    assert {r.measured_on for r in TuningDatabase(tmp_path).records()} == {"local"}  # what this compile tuned
    assert integrity(path) == "ok"


def read_only_connect(self):
    """sqlite opened read-only: what a read-only cache directory does for a user who is not root."""
    return tuning_db._Closing(sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, timeout=1))


def full_disk_connect(self):
    """A real SQLITE_FULL ("database or disk is full") from sqlite: a new file may not grow past its first page,
    so not even the table can be created."""
    conn = sqlite3.connect(self.path, timeout=1)
    conn.execute("PRAGMA max_page_count = 1")
    return tuning_db._Closing(conn)


class FullConnection(sqlite3.Connection):
    """Every write fails as sqlite fails on a full disk. Simulated: an existing file's free pages would take small
    rows, and filling the real disk is not something a test may do."""

    def execute(self, sql, *args):
        if sql.lstrip().upper().startswith(("INSERT", "DELETE", "UPDATE")):
            raise sqlite3.OperationalError("database or disk is full")
        return super().execute(sql, *args)

    executemany = execute


def full_on_write_connect(self):
    return tuning_db._Closing(sqlite3.connect(self.path, timeout=1, factory=FullConnection))


def test_read_only_database_compiles_without_storing(tmp_path, caplog, monkeypatch):
    """Simulated with sqlite's read-only mode: root, who runs this suite, writes through chmod."""
    path = filled_database(tmp_path, 3).path
    monkeypatch.setattr(TuningDatabase, "_connect", read_only_connect)
    with caplog.at_level(logging.WARNING, logger=DB_LOG):
        compile_and_check(tmp_path)
        compile_and_check(tmp_path, tune={"trials": 3})  # a second compile: no second warning
    (warning,) = warnings_of(caplog, DB_LOG)
    assert f"cannot write {path}" in warning and str(tmp_path) in warning and "not stored" in warning
    monkeypatch.undo()
    assert sorted(r.trials for r in TuningDatabase(tmp_path).records()) == [0, 1, 2]  # untouched


@pytest.mark.skipif(ROOT, reason="root writes through chmod: test_read_only_database_compiles_without_storing "
                                 "simulates this case")
def test_read_only_directory_compiles_without_storing(tmp_path, caplog):
    path = filled_database(tmp_path / "cache", 3).path
    path.chmod(0o444)
    path.parent.chmod(0o555)
    try:
        with caplog.at_level(logging.WARNING, logger=DB_LOG):
            compile_and_check(path.parent)
        (warning,) = warnings_of(caplog, DB_LOG)
        assert str(path) in warning
    finally:
        path.parent.chmod(0o755)
    assert len(TuningDatabase(path.parent)) == 3


@pytest.mark.parametrize("seeded", [False, True], ids=["empty cache", "existing database"])
def test_full_disk_compiles_without_storing(tmp_path, caplog, monkeypatch, seeded):
    if seeded:
        filled_database(tmp_path, 3)
    monkeypatch.setattr(TuningDatabase, "_connect", full_on_write_connect if seeded else full_disk_connect)
    with caplog.at_level(logging.WARNING, logger=DB_LOG):
        db = TuningDatabase(tmp_path)
        db.put(record(9))
        assert db.get(record(9).key) is None
        compile_and_check(tmp_path)
    (warning,) = warnings_of(caplog, DB_LOG)
    assert "database or disk is full" in warning and str(tmp_path) in warning
    assert ("cannot write" if seeded else "cannot open") in warning
    monkeypatch.undo()
    assert sorted(r.trials for r in TuningDatabase(tmp_path).records()) == ([0, 1, 2] if seeded else [])


def test_cache_directory_that_cannot_be_created(tmp_path, caplog):
    """A file where the cache directory should be: a real error even for root, as an unwritable parent gives."""
    (tmp_path / "file").write_text("not a directory")
    cache = tmp_path / "file" / "cache"
    with caplog.at_level(logging.WARNING, logger=DB_LOG):
        compile_and_check(cache)
        db = TuningDatabase(cache)
        db.put(record(1))
        assert db.records() == [] and len(db) == 0 and db.get(record(1).key) is None
    (warning,) = warnings_of(caplog, DB_LOG)
    assert str(cache) in warning and "neither read nor stored" in warning


def test_directory_permission_error_is_one_warning(tmp_path, caplog, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with caplog.at_level(logging.WARNING, logger=DB_LOG):
        for _ in range(3):
            db = TuningDatabase(tmp_path / "new")
            db.put(record(1))
            assert db.get(record(1).key) is None
    (warning,) = warnings_of(caplog, DB_LOG)
    assert "Permission denied" in warning and str(tmp_path / "new") in warning


# ------------------------------------------------------------------------------------ a writer that dies

def write_until_killed(path: str, committed) -> None:
    db = TuningDatabase(path)
    i = 0
    while True:
        db.put(record(i))
        committed.value = i + 1  # after put returned: the row is committed
        i += 1


def test_writer_killed_mid_write_loses_no_committed_row(tmp_path, caplog):
    ctx = multiprocessing.get_context("fork")
    committed = ctx.Value("i", 0, lock=False)  # a lock the killed writer held would hang this test
    writer = ctx.Process(target=write_until_killed, args=(str(tmp_path), committed))
    writer.start()
    deadline = time.monotonic() + 60
    while committed.value < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(writer.pid, signal.SIGKILL)  # most likely inside a transaction: it spends its time there
    writer.join()
    done = committed.value
    assert done >= 100
    with caplog.at_level(logging.WARNING, logger=DB_LOG):
        db = TuningDatabase(tmp_path)
        assert all(db.get(record(i).key) == record(i) for i in range(done))
    assert warnings_of(caplog, DB_LOG) == [] and not list(tmp_path.glob("*.corrupt-*"))
    assert integrity(db.path) == "ok"


def weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < 0.2)


def kernel_tasks() -> list:
    return [tuning.KernelTask.from_weight(weight(32 * (i + 1), 48, i), 8) for i in range(3)]


def test_measurement_that_dies_ends_the_run_with_a_clear_error(tmp_path, monkeypatch):
    """The first kernel is tuned, then every measurement fails (a dead RPC server, a crashed device): the run ends
    with an error naming the kernel and the database, which keeps the first kernel; a second run resumes."""
    tasks = kernel_tasks()
    settings = Settings(cache_dir=str(tmp_path))
    real_search, real_time = knob_search.search, runners._Device.time_us
    searches = []

    def search(*args, **kwargs):
        result = real_search(*args, **kwargs)
        searches.append(result)
        return result

    def time_us(self, cand):
        if searches:
            raise RuntimeError("measurement worker died")
        return real_time(self, cand)

    monkeypatch.setattr(knob_search, "search", search)
    monkeypatch.setattr(runners._Device, "time_us", time_us)
    with pytest.raises(SparseccError, match=rf"tune: tuning {tasks[1].spec.name} on local failed") as info:
        tuning.tune_weights(tasks, {"trials": 2}, settings)
    db = TuningDatabase(tmp_path)
    assert "the 1 kernel(s) tuned before it" in str(info.value) and str(db.path) in str(info.value)
    (kept,) = db.records()
    target = host_target(settings.resolved().threads)
    assert kept.key == knob_search.tuning_key(tasks[0], target) and kept.knobs == searches[0][0].as_dict()

    monkeypatch.setattr(runners._Device, "time_us", real_time)
    report = tuning.tune_weights(tasks, {"trials": 2}, settings)
    assert [k.source for k in report.kernels] == ["database", "tuned", "tuned"]
    assert len(db) == 3 and integrity(db.path) == "ok"


DIES_AFTER_FIRST_KERNEL = """
import os, sys
import torch
from sparsecc.codegen import tuning
from sparsecc.codegen.tuning import knob_search, runners
from sparsecc.settings import Settings
sys.path.insert(0, {tests!r})
from test_cache_faults import kernel_tasks

runners.CONTEXT_RUNS, knob_search.CONFIRM_ROUNDS = 3, 1
real_search = knob_search.search
done = []

def search(*args, **kwargs):
    done.append(real_search(*args, **kwargs))
    return done[-1]

def time_us(self, cand, real=runners._Device.time_us):
    if done:
        os._exit(17)  # the process dies mid-measurement: no exception, no cleanup
    return real(self, cand)

knob_search.search, runners._Device.time_us = search, time_us
tuning.tune_weights(kernel_tasks(), {{"trials": 2}}, Settings(cache_dir={cache!r}))
"""


def test_tuning_process_that_dies_keeps_what_it_stored(tmp_path, caplog):
    script = tmp_path / "dies.py"
    script.write_text(DIES_AFTER_FIRST_KERNEL.format(tests=str(Path(__file__).parent), cache=str(tmp_path / "c")))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-3000:]
    with caplog.at_level(logging.WARNING, logger=DB_LOG):
        db = TuningDatabase(tmp_path / "c")
        (kept,) = db.records()
    assert warnings_of(caplog, DB_LOG) == [] and integrity(db.path) == "ok"
    assert kept.trials == 2 and kept.key.template == knob_search.TEMPLATE and kept.best_us > 0


# ------------------------------------------------------------------------------------------- calibrations

def fresh_model() -> MachineModel:
    return dataclasses.replace(REFERENCE, description="fresh", calibrated=True)


def calibration_path(cache: Path) -> Path:
    threads = torch.get_num_threads()
    return cache / "machines" / f"{machine_key(str(host_target(threads)), threads)}.json"


def edited(**changes) -> str:
    d = json.loads(dataclasses.replace(REFERENCE, description="stored", calibrated=True).to_json())
    for key, value in changes.items():
        if value is None:
            del d[key]
        else:
            d[key] = value
    return json.dumps(d)


BAD_CALIBRATIONS = {
    "truncated": fresh_model().to_json()[:300],
    "empty": "",
    "garbage bytes": b"\xff\xfe\x00\x9c garbage",
    "a list": "[1, 2]",
    "a number": "42",
    "missing key": edited(blocks=None),
    "string figure": edited(launch="fast"),
    "negative figure": edited(transpose=-1.0),
    "non-finite figure": edited(dense_overhead=float("inf")),
    "bad points": edited(bandwidth=[[1024, 1e9], [512, 2e9]]),
    "bad block": edited(blocks={"1x1": {"per_visit": "x", "per_vector_fma": 1.0}}),
    "no blocks": edited(blocks={}),
    "not calibrated": edited(calibrated=False),
    "another version": edited(version=-1),
}


@pytest.fixture
def fresh_calibration(monkeypatch):
    """machine_model with nothing in memory, and a calibration that returns `fresh_model()` at once."""
    calls = []
    monkeypatch.setattr(calibration, "_memo", {})
    monkeypatch.setattr(calibration, "calibrate", lambda *a, **k: calls.append(a) or fresh_model())
    return calls


@pytest.mark.parametrize("content", BAD_CALIBRATIONS.values(), ids=BAD_CALIBRATIONS.keys())
def test_unusable_calibration_is_measured_again(tmp_path, caplog, fresh_calibration, content):
    path = calibration_path(tmp_path)
    path.parent.mkdir(parents=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with caplog.at_level(logging.WARNING, logger=calibration.__name__):
        assert machine_model(Settings(cache_dir=str(tmp_path)).resolved()) == fresh_model()
    (warning,) = warnings_of(caplog, calibration.__name__)
    assert str(path) in warning and "measuring again" in warning
    assert len(fresh_calibration) == 1 and MachineModel.from_json(path.read_text()) == fresh_model()  # rebuilt


def test_calibration_on_a_full_disk_keeps_the_old_file_whole(tmp_path, caplog, monkeypatch):
    path = calibration_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(edited())

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(calibration.os, "fsync", no_space)
    with caplog.at_level(logging.WARNING, logger=calibration.__name__):
        calibration._write(path, fresh_model())
    (warning,) = warnings_of(caplog, calibration.__name__)
    assert str(path) in warning and "No space left" in warning
    assert path.read_text() == edited() and sorted(p.name for p in path.parent.iterdir()) == [path.name]


def write_then_die(path: str) -> None:
    calibration.os.fsync = lambda fd: os._exit(3)  # killed after writing the data, before renaming it
    calibration._write(Path(path), fresh_model())


def test_calibration_writer_killed_mid_write_leaves_the_old_file(tmp_path, caplog):
    path = calibration_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(edited())
    writer = multiprocessing.get_context("fork").Process(target=write_then_die, args=(str(path),))
    writer.start()
    writer.join(60)
    assert writer.exitcode == 3
    with caplog.at_level(logging.WARNING, logger=calibration.__name__):
        assert calibration._read(path) == MachineModel.from_json(edited())
    assert warnings_of(caplog, calibration.__name__) == []


def test_unwritable_calibration_directory_works_with_one_warning(tmp_path, caplog, fresh_calibration):
    """A file where machines/ should be: a real error even for root."""
    (tmp_path / "machines").write_text("not a directory")
    settings = Settings(cache_dir=str(tmp_path)).resolved()
    with caplog.at_level(logging.WARNING, logger=calibration.__name__):
        assert machine_model(settings) == fresh_model()
        assert machine_model(settings) == fresh_model()  # in memory: neither measured nor warned again
    (warning,) = warnings_of(caplog, calibration.__name__)
    assert str(calibration_path(tmp_path)) in warning and "could not store" in warning
    assert len(fresh_calibration) == 1


@pytest.mark.skipif(ROOT, reason="root writes through chmod: test_unwritable_calibration_directory_works_with_one_"
                                 "warning covers this case with a real error")
def test_read_only_calibration_directory(tmp_path, caplog, fresh_calibration):
    (tmp_path / "machines").mkdir()
    (tmp_path / "machines").chmod(0o555)
    try:
        with caplog.at_level(logging.WARNING, logger=calibration.__name__):
            assert machine_model(Settings(cache_dir=str(tmp_path)).resolved()) == fresh_model()
        (warning,) = warnings_of(caplog, calibration.__name__)
        assert str(calibration_path(tmp_path)) in warning
    finally:
        (tmp_path / "machines").chmod(0o755)


# ------------------------------------------------------------------------------------------ OpenMP launcher

OMP_LOG = openmp_pool.__name__


def launcher_path(cache: Path) -> Path:
    return openmp_pool._shim_directories(str(cache))[0] / openmp_pool._built_shim(str(cache)).name


def has_shim_functions(library: Path) -> bool:
    import ctypes

    loaded = ctypes.CDLL(str(library))
    return all(hasattr(loaded, name) for name in openmp_pool._SHIM_FUNCTIONS)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_damaged_launcher_is_rebuilt(tmp_path, caplog, damage):
    library = launcher_path(tmp_path)
    whole = library.read_bytes()
    library.write_bytes({"garbage": os.urandom(20000), "truncated": whole[:len(whole) // 2], "empty": b""}[damage])
    with caplog.at_level(logging.WARNING, logger=OMP_LOG):
        assert openmp_pool._built_shim(str(tmp_path)) == library
    (warning,) = warnings_of(caplog, OMP_LOG)
    assert str(library) in warning and "damaged" in warning
    assert openmp_pool._damage(library) is None and has_shim_functions(library)


def compile_c(tmp_path: Path, source: str, shared: bool) -> Path:
    from tvm.support import cc

    (tmp_path / "x.c").write_text(source)
    out = tmp_path / ("x.so" if shared else "x.o")
    if shared:
        cc.create_shared(str(out), [str(tmp_path / "x.c")])
    else:
        subprocess.run([cc.get_cc() or "cc", "-c", "-fPIC", "-o", str(out), str(tmp_path / "x.c")], check=True)
    return out


@pytest.mark.parametrize("kind", ["object file", "other library"])
def test_launcher_that_does_not_load_is_rebuilt(tmp_path, caplog, monkeypatch, kind):
    """Whole ELF files that are not the launcher: dlopen refuses an object file; another library loads but lacks
    the launcher's functions. Either is unloaded, built again and the new one loaded."""
    library = launcher_path(tmp_path / "cache")
    imposter = compile_c(tmp_path, "int other(void) { return 1; }\n", shared=kind == "other library")
    library.write_bytes(imposter.read_bytes())
    assert openmp_pool._damage(library) is None  # whole: only loading tells
    monkeypatch.setattr(openmp_pool, "_LOADED", [])  # this process's own launcher stays loaded and untouched
    with caplog.at_level(logging.WARNING, logger=OMP_LOG):
        shim = openmp_pool._loaded_shim(str(tmp_path / "cache"))
    (warning,) = warnings_of(caplog, OMP_LOG)
    assert str(library) in warning and "cannot be loaded" in warning
    assert all(hasattr(shim, name) for name in openmp_pool._SHIM_FUNCTIONS)
    assert library.read_bytes() != imposter.read_bytes()


def test_unwritable_launcher_directory_builds_elsewhere(tmp_path):
    """A file where openmp/ should be (a real error for root too): the launcher goes to the temporary directory."""
    (tmp_path / "openmp").write_text("not a directory")
    library = openmp_pool._built_shim(str(tmp_path))
    assert library.parent == Path(tempfile.gettempdir()) / f"sparsecc-{os.getuid()}" and has_shim_functions(library)


def build_at_once(directory: str, library: str, barrier) -> None:
    barrier.wait()
    openmp_pool._build(Path(directory), Path(library))


def watch_launcher(library: str, barrier, seen) -> None:
    barrier.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and seen.value < 400:
        if os.path.exists(library):
            problem = openmp_pool._damage(Path(library))
            assert problem is None, problem
            seen.value += 1


def test_concurrent_launcher_builders_never_show_half_a_file(tmp_path):
    directory = tmp_path / "openmp"
    library = directory / "launch-test.so"
    ctx = multiprocessing.get_context("fork")
    barrier, seen = ctx.Barrier(5), ctx.Value("i", 0, lock=False)
    procs = [ctx.Process(target=build_at_once, args=(str(directory), str(library), barrier)) for _ in range(4)]
    procs.append(ctx.Process(target=watch_launcher, args=(str(library), barrier, seen)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 5
    assert [p.name for p in directory.iterdir()] == [library.name]  # no temporary directory left behind
    assert has_shim_functions(library)


# ------------------------------------------------------------------------------------ whole processes

CHILD = """
import os, sys, time
import torch
from sparsecc.codegen import openmp_pool
from sparsecc.runtime.compiled import compiled_graphs

options = {options!r}
go = {go!r}
open(f"{{go}}.ready-{{os.getpid()}}", "w").close()
while not os.path.exists(go):  # imports done: start compiling with the others
    time.sleep(0.01)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32)).eval()
with torch.no_grad():
    for layer in model[0], model[2]:
        layer.weight.mul_(torch.rand_like(layer.weight) < 0.1)
x = torch.randn(8, 64)
compiled = torch.compile(model, backend="sparsecc", options=options)
with torch.no_grad():
    torch.testing.assert_close(compiled(x), model(x))
    torch.testing.assert_close(compiled(x), model(x))
assert compiled_graphs()[-1].state.sparse_ops > 0
assert openmp_pool.launch_count()[0] > 0, "the kernels did not run on the OpenMP launcher"
"""


def start_children(tmp_path: Path, count: int, cache: Path, **options) -> list[subprocess.Popen]:
    """`count` processes compiling the sparse model with one cache, all released at once after their imports."""
    go = tmp_path / f"go-{count}"
    script = tmp_path / "child.py"
    options = {**TEST_OPTIONS, "min_weight_numel": 1, "on_failure": "raise", "thread_pool": "openmp", **options}
    script.write_text(CHILD.format(options=options, go=str(go)))
    env = {**os.environ, "SPARSECC_CACHE_DIR": str(cache)}
    procs = [subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(count)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob(f"{go.name}.ready-*"))) < count and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break  # one failed while importing: finish() reports it
        time.sleep(0.05)
    go.write_text("")
    return procs


def finish(procs: list[subprocess.Popen]) -> list[str]:
    errors = [p.communicate(timeout=300)[1] for p in procs]
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-3000:]
    return errors


def test_compile_with_a_damaged_launcher_rebuilds_it(tmp_path):
    library = launcher_path(tmp_path / "cache")
    library.write_bytes(os.urandom(20000))
    (err,) = finish(start_children(tmp_path, 1, tmp_path / "cache"))
    assert str(library) in err and "damaged" in err
    assert openmp_pool._damage(library) is None


def assert_cache_whole(cache: Path, kernels: int) -> None:
    db = TuningDatabase(cache)
    assert len(db.records()) == kernels and integrity(db.path) == "ok"
    assert [p.name for p in (cache / "openmp").iterdir()] == [openmp_pool._built_shim(str(cache)).name]


@pytest.mark.slow
@pytest.mark.parametrize("count", [2, 4])
def test_processes_compiling_at_once_share_one_cache(tmp_path, count):
    cache = tmp_path / "cache"
    for err in finish(start_children(tmp_path, count, cache)):
        assert "damaged" not in err and "cannot" not in err, err[-3000:]
    assert_cache_whole(cache, 0)


@pytest.mark.slow
@pytest.mark.parametrize("count", [2, 4])
def test_processes_tuning_at_once_into_a_damaged_cache(tmp_path, count):
    """They all tune the two kernels and write their rows at once, into a cache whose database and launcher are
    garbage: exactly one process moves the database aside, every one gets a working launcher."""
    cache = tmp_path / "cache"
    filled_database(cache, 50)
    damage_garbage(cache / "tuning.sqlite")
    launcher_path(cache).write_bytes(os.urandom(20000))
    errors = finish(start_children(tmp_path, count, cache, tune={"trials": 2}))
    assert sum(str(cache / "tuning.sqlite") + " is damaged" in err for err in errors) == 1
    assert len(list(cache.glob("tuning.sqlite.corrupt-*"))) == 1
    assert_cache_whole(cache, 2)
