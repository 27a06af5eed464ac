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

Faults: the database is a cache, so no fault of it stops a compile. A file that is not sqlite, is truncated or
damaged, or holds a table of another shape is moved aside (`tuning.sqlite.corrupt-<time>-<pid>`) with one warning
naming it, and an empty database takes its place; a row that cannot be read is deleted with one warning. Where the
file cannot be written (read-only cache, full disk, a lock held past `BUSY_TIMEOUT_S`) or not opened at all, results
are not stored, with one warning per file and process, and measuring goes on. A process killed mid-write leaves
sqlite's journal, which the next opener rolls back: committed rows survive.

This module needs neither torch nor TVM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; moving a damaged file aside is then not serialised
    fcntl = None

from sparsecc.cache import default_cache_dir

log = logging.getLogger(__name__)

DB_FILE = "tuning.sqlite"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0
# sqlite's names for a file that is damaged, as opposed to one that cannot be reached or written right now.
_DAMAGED = {"SQLITE_CORRUPT", "SQLITE_NOTADB"}
# Files beside the database that belong to it: a hot journal left there would be rolled back into a fresh file.
_COMPANIONS = ("-journal", "-wal", "-shm")
T = TypeVar("T")

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


_COLUMNS = tuple(line.split()[0] for line in _SCHEMA.strip().splitlines()[1:-1])
# (file, what) already warned about in this process: a read-only cache says so once, not at every compile.
_warned: set[tuple[str, str]] = set()


class DamagedDatabase(sqlite3.DatabaseError):
    """The file opens but is not a tuning database this version can use (failed check, table of another shape)."""


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
        """`path`: the sqlite file, or a directory to hold `tuning.sqlite`. Never raises for a fault of the file or
        its directory: see the module's "Faults"."""
        path = Path(path).expanduser()
        self.path = path / DB_FILE if path.is_dir() or not path.suffix else path
        self.readable = True  # False: the file cannot be opened; nothing is read or stored
        self.writable = True  # False after a write failed: results are no longer stored
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._unusable("open", exc)
            return
        self._run(self._prepare, None, "open")

    @classmethod
    def open_default(cls, cache_dir: str | os.PathLike | None = None) -> "TuningDatabase":
        return cls(default_cache_dir(cache_dir))

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
        return _Closing(conn)

    def get(self, key: TuningKey) -> TuningRecord | None:
        def read(conn: sqlite3.Connection) -> tuple | None:
            return conn.execute("SELECT * FROM tuning WHERE digest = ?", (key.digest,)).fetchone()

        row = self._run(read, None, "read")
        decoded = self._decoded([row]) if row is not None else []
        return decoded[0] if decoded else None

    def put(self, record: TuningRecord) -> None:
        """Store `record` (replacing the row of its key); where the file cannot be written, nothing is stored and
        the first failure is logged."""
        k = record.key
        values = (k.digest, k.target, k.tvm_version, k.sparsecc_version, k.template, k.template_version, k.spec,
                  k.pattern, _canonical(dict(record.knobs)), float(record.best_us), float(record.default_us),
                  int(record.trials), int(record.exhausted), record.measured_on, float(record.created))

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(f"INSERT OR REPLACE INTO tuning VALUES ({', '.join('?' * len(values))})", values)

        self._run(write, None, "write")

    def records(self) -> list[TuningRecord]:
        def read(conn: sqlite3.Connection) -> list[tuple]:
            return conn.execute("SELECT * FROM tuning ORDER BY created").fetchall()

        return self._decoded(self._run(read, [], "read"))

    def __iter__(self) -> Iterator[TuningRecord]:
        return iter(self.records())

    def __len__(self) -> int:
        return self._run(lambda conn: conn.execute("SELECT COUNT(*) FROM tuning").fetchone()[0], 0, "read")

    # -------------------------------------------------------------------------------------------------- faults

    def _run(self, op: Callable[[sqlite3.Connection], T], default: T, what: str) -> T:
        """`op` ("open", "read" or "write") in one transaction. A damaged file is moved aside and `op` run again on
        a fresh one; where the file cannot be opened or written, `default` (one warning per file and process)."""
        if not self.readable or (what == "write" and not self.writable):
            return default
        for attempt in range(2):
            try:
                with self._connect() as conn:
                    if attempt:  # the damaged file was moved aside: this is a fresh one, without the table
                        self._prepare(conn)
                    return op(conn)
            except sqlite3.DatabaseError as exc:
                if attempt == 0 and _is_damage(exc):
                    if self._discard():
                        continue
                    self.readable = self.writable = False
                    return default
                self._unusable(what, exc)
                return default
            except OSError as exc:  # sqlite reports its own I/O as DatabaseError; this is the directory's
                self._unusable(what, exc)
                return default
        return default

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Check the file, and create the table in an empty one."""
        columns = _check(conn)
        if not columns:
            conn.execute(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _unusable(self, what: str, exc: BaseException) -> None:
        """Stop what failed for this instance (a full disk or a lock held past the timeout would fail again, each
        time after a wait) and say so once per file and process. A failed read stops nothing: the next may work."""
        consequence = {"open": "tuning results are neither read nor stored",
                       "write": "tuning results are not stored",
                       "read": "kernels are measured again where it would have been read"}[what]
        if what == "open":
            self.readable = False
        if what in ("open", "write"):
            self.writable = False
        if _first(self.path, what):
            log.warning("tuning database: cannot %s %s (%s: %s); %s. Make %s writable, with free space, or set "
                        "SPARSECC_CACHE_DIR (the cache_dir option) to a directory that is.", what, self.path,
                        type(exc).__name__, exc, consequence, self.path.parent)

    def _discard(self) -> bool:
        """Move the damaged file aside (unless another process already did), so the next connection starts an empty
        database. False where it cannot be moved: the database is then left alone, unused."""
        with self._exclusive():
            problem = self._problem()
            if problem is None:  # another process replaced it since we failed: use theirs
                return True
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            try:
                # The journal first: left behind, it would be rolled back into the fresh file.
                for suffix in _COMPANIONS:
                    companion = self.path.with_name(self.path.name + suffix)
                    if companion.exists():
                        os.replace(companion, aside.with_name(aside.name + suffix))
                os.replace(self.path, aside)
            except OSError as move_error:
                if _first(self.path, "damaged"):
                    log.warning("tuning database: %s is damaged (%s) and cannot be moved aside (%s); compiling "
                                "without it. Delete the file to start an empty database.", self.path, problem,
                                move_error)
                return False
        log.warning("tuning database: %s is damaged (%s); moved it to %s and started an empty database (kernels "
                    "will be measured again)", self.path, problem, aside.name)
        return True

    def _problem(self) -> str | None:
        """What is wrong with the file now, or None where it is usable (or absent). Errors that do not show damage
        (locked, unreadable) count as usable: a file is only moved aside on evidence."""
        try:
            with self._connect() as conn:
                _check(conn)
            return None
        except sqlite3.DatabaseError as exc:
            return f"{type(exc).__name__}: {exc}" if _is_damage(exc) else None
        except OSError:
            return None

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Held by whichever process checks and moves a damaged file, so two processes that both found it damaged
        do not move aside the fresh database the first one started."""
        lock = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # read-only directory: nothing can be moved anyway
            yield
            return
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _decoded(self, rows: list[tuple]) -> list[TuningRecord]:
        """The rows as records; rows that cannot be read (written by hand, damaged) are deleted, with one warning."""
        records, bad = [], []
        for row in rows:
            try:
                records.append(_record(row))
            except (ValueError, TypeError, KeyError) as exc:
                bad.append((row[0] if row else None, exc))
        if bad:
            digests = [(d,) for d, _ in bad]

            def delete(conn: sqlite3.Connection) -> bool:
                conn.executemany("DELETE FROM tuning WHERE digest = ?", digests)
                return True

            done = "deleted" if self._run(delete, False, "write") else "ignored"
            log.warning("tuning database: %s: %s %d unreadable row(s) (%s: %s); those kernels will be measured "
                        "again", self.path, done, len(bad), type(bad[0][1]).__name__, bad[0][1])
        return records


def _is_damage(exc: BaseException) -> bool:
    name = getattr(exc, "sqlite_errorname", None)  # Python >= 3.11
    if isinstance(exc, DamagedDatabase) or name in _DAMAGED:
        return True
    if name is None and not isinstance(exc, sqlite3.OperationalError):
        return "malformed" in str(exc) or "not a database" in str(exc)
    return False


def _check(conn: sqlite3.Connection) -> tuple[str, ...]:
    """The tuning table's columns (empty where the file has none yet); DamagedDatabase where sqlite's quick check
    fails or the table has other columns. Cheap at the sizes a tuning database reaches (thousands of rows)."""
    result = conn.execute("PRAGMA quick_check").fetchall()
    if result != [("ok",)]:
        raise DamagedDatabase("quick_check: " + "; ".join(str(r[0]) for r in result[:3]))
    columns = tuple(row[1] for row in conn.execute("PRAGMA table_info(tuning)"))
    if columns and columns != _COLUMNS:
        raise DamagedDatabase(f"table 'tuning' has columns {', '.join(columns)}, not those of schema "
                              f"{SCHEMA_VERSION}")
    return columns


def _first(path: Path, what: str) -> bool:
    key = (str(path), what)
    if key in _warned:
        return False
    _warned.add(key)
    return True


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
    """A row as a record, checked: ValueError/TypeError where a field is not what `put` writes, or the digest is
    not that of the key (a row edited or damaged), so a bad row is never used as a measured time."""
    (digest, target, tvm_version, sparsecc_version, template, template_version, spec, pattern, knobs, best_us,
     default_us, trials, exhausted, measured_on, created) = row
    key = TuningKey(target, tvm_version, sparsecc_version, template, int(template_version), spec, pattern)
    if not all(isinstance(v, str) for v in (digest, target, tvm_version, sparsecc_version, template, spec, pattern,
                                            knobs, measured_on)):
        raise TypeError("a text column holds another type")
    if key.digest != digest:
        raise ValueError("the digest is not that of the row's key")
    knobs = json.loads(knobs)
    if not isinstance(knobs, dict):
        raise TypeError(f"knobs are {type(knobs).__name__}, not an object")
    times = float(best_us), float(default_us)
    if not all(math.isfinite(t) and t > 0 for t in times):
        raise ValueError(f"times {times} are not positive")
    return TuningRecord(key, knobs, times[0], times[1], int(trials), bool(exhausted), measured_on, float(created))
