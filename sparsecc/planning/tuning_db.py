"""The persistent tuning database: what autotuning found, so a later compile reuses it without measuring.

One sqlite file, `<cache dir>/tuning.sqlite`. The cache directory is the `cache_dir` option, else the
SPARSECC_CACHE_DIR environment variable, else $XDG_CACHE_HOME/sparsecc, else ~/.cache/sparsecc.

A row is keyed by everything a measured result depends on (`TuningKey`): the TVM target string (CPU name,
thread count), TVM's version, sparsecc's version, the kernel template and its version, the kernel's
specialisation (sizes, block shape, dtype, epilogue, index dtypes) and a hash of the weight's sparsity
pattern (row pointers and column indices; the values do not change the speed). The key's fields are stored
as columns too, so the file can be read with the sqlite3 shell; the primary key is a SHA-256 of them all.

Concurrency: every operation opens its own connection and runs in one sqlite transaction; sqlite's file
locks serialise writers across processes (a writer waits up to `BUSY_TIMEOUT_S` for another). A key written
twice keeps the later row (a re-tune starts from the stored best, so it is at least as thorough). sqlite's
locking needs a local file system: don't put the cache on NFS.

This module needs neither torch nor TVM.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from sparsecc.cache import default_cache_dir

DB_FILE = "tuning.sqlite"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tuning (
    digest TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    tvm_version TEXT NOT NULL,
    sparsecc_version TEXT NOT NULL,
    template TEXT NOT NULL,
    template_version INTEGER NOT NULL,
    spec TEXT NOT NULL,
    pattern TEXT NOT NULL,
    knobs TEXT NOT NULL,
    best_us REAL NOT NULL,
    default_us REAL NOT NULL,
    trials INTEGER NOT NULL,
    exhausted INTEGER NOT NULL,
    measured_on TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclasses.dataclass(frozen=True)
class TuningKey:
    target: str
    tvm_version: str
    sparsecc_version: str
    template: str
    template_version: int
    spec: str  # canonical JSON of the kernel's specialisation (see `spec_json`)
    pattern: str  # hex digest of the weight's pattern (the planner's timings: its work signature, candidate_timing.py)

    @staticmethod
    def spec_json(spec: Mapping[str, Any]) -> str:
        return _canonical(dict(spec))

    @property
    def digest(self) -> str:
        return hashlib.sha256(_canonical(dataclasses.asdict(self)).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class TuningRecord:
    key: TuningKey
    knobs: Mapping[str, Any]  # the best knobs, as KernelKnobs.as_dict()
    best_us: float  # their measured time
    default_us: float  # the untuned knobs' time, measured in the same run
    trials: int  # candidates measured so far (over all runs that led here)
    exhausted: bool  # every candidate of the search space was measured
    measured_on: str  # "local" or "rpc:<tracker>/<key>"
    created: float = dataclasses.field(default_factory=time.time)

    @property
    def speedup(self) -> float:
        return self.default_us / self.best_us if self.best_us > 0 else 1.0


class TuningDatabase:
    def __init__(self, path: str | os.PathLike):
        """`path`: the sqlite file, or a directory to hold `tuning.sqlite`."""
        path = Path(path).expanduser()
        self.path = path / DB_FILE if path.is_dir() or not path.suffix else path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute(_SCHEMA)
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @classmethod
    def open_default(cls, cache_dir: str | os.PathLike | None = None) -> "TuningDatabase":
        return cls(default_cache_dir(cache_dir))

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
        return _Closing(conn)

    def get(self, key: TuningKey) -> TuningRecord | None:
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM tuning WHERE digest = ?", (key.digest,)).fetchone()
        return None if row is None else _record(row)

    def put(self, record: TuningRecord) -> None:
        k = record.key
        values = (k.digest, k.target, k.tvm_version, k.sparsecc_version, k.template, k.template_version, k.spec,
                  k.pattern, _canonical(dict(record.knobs)), float(record.best_us), float(record.default_us),
                  int(record.trials), int(record.exhausted), record.measured_on, float(record.created))
        with self._connect() as conn:
            conn.execute(f"INSERT OR REPLACE INTO tuning VALUES ({', '.join('?' * len(values))})", values)

    def records(self) -> list[TuningRecord]:
        with self._connect() as conn:
            return [_record(row) for row in conn.execute("SELECT * FROM tuning ORDER BY created")]

    def __iter__(self) -> Iterator[TuningRecord]:
        return iter(self.records())

    def __len__(self) -> int:
        with self._connect() as conn:
            return conn.execute("SELECT COUNT(*) FROM tuning").fetchone()[0]


class _Closing:
    """A connection used as `with`: one transaction (committed, or rolled back on error), then closed.
    (sqlite3.Connection's own context manager commits but does not close.)"""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self.conn.commit()
            else:
                self.conn.rollback()
        finally:
            self.conn.close()
        return False


def _record(row: tuple) -> TuningRecord:
    (_, target, tvm_version, sparsecc_version, template, template_version, spec, pattern, knobs, best_us,
     default_us, trials, exhausted, measured_on, created) = row
    key = TuningKey(target, tvm_version, sparsecc_version, template, int(template_version), spec, pattern)
    return TuningRecord(key, json.loads(knobs), best_us, default_us, int(trials), bool(exhausted), measured_on,
                        created)
