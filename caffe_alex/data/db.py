"""Key-value databases of Caffe records: LMDB (package ``lmdb``) and LevelDB (package ``plyvel``).

One small interface over both, shaped like Caffe's db::DB / Cursor / Transaction:

    with open_db("train_lmdb") as db:            # backend guessed from the files, or given
        len(db); db.get(b"00000000_a.jpg")       # count, random access by key (both cheap)
        for key, value in db: ...                # key order, as Caffe's cursor
        for key, value in db.records(start=3, step=2, endless=True): ...  # rand_skip, sharding

    with open_db("out_lmdb", "lmdb", mode="new") as db:   # Caffe's NEW: the path must not exist
        txn = db.transaction(); txn.put(key, value); txn.commit()

LevelDB goes through plyvel: it is the maintained CPython binding of the C++ leveldb library
(wheels bundle leveldb, it reads databases written by Caffe's leveldb unchanged, and it offers
write batches and ordered iterators); the pure-Python or RocksDB alternatives either cannot read
existing LevelDB files or are unmaintained. It is an optional dependency (``caffe-alex[leveldb]``).

A read-only Database pickles as its path and reopens itself, so loader worker processes can
receive one; each process then holds its own handle, as LMDB requires (a forked LMDB reader
reopens itself on first use). LevelDB locks a database to one process at a time (as in
Caffe): a parent must close a LevelDB before worker processes open it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

import lmdb

from ..errors import CaffeAlexError

BACKENDS = ("lmdb", "leveldb")
_LMDB_START_MAP = 64 << 20  # grown by doubling on MapFullError, as Caffe's LMDBTransaction


def _as_key(key) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


def leveldb_available() -> bool:
    """Whether the optional plyvel package (LevelDB) is installed."""
    return importlib.util.find_spec("plyvel") is not None


def detect_backend(path: str) -> str:
    """``lmdb`` or ``leveldb`` from the files at ``path`` (data.mdb vs CURRENT)."""
    if os.path.isfile(path) or os.path.exists(os.path.join(path, "data.mdb")):
        return "lmdb"
    if os.path.exists(os.path.join(path, "CURRENT")):
        return "leveldb"
    if not os.path.exists(path):
        raise CaffeAlexError(f"database '{path}' does not exist")
    raise CaffeAlexError(f"'{path}' is neither an LMDB (data.mdb) nor a LevelDB (CURRENT)")


def open_db(path: str, backend: str | None = None, mode: str = "r") -> Database:
    """Open ``path``. mode: "r" read only (must exist), "new" (must not exist, as Caffe's NEW),
    "w" (create or add to). backend: "lmdb", "leveldb" (case-insensitive) or None to detect."""
    path = os.fspath(path)
    if mode not in ("r", "w", "new"):
        raise ValueError(f"mode must be 'r', 'w' or 'new', got {mode!r}")
    if mode == "r" and not os.path.exists(path):
        raise CaffeAlexError(f"database '{path}' does not exist")
    if mode == "new" and os.path.exists(path):
        raise CaffeAlexError(f"database '{path}' already exists (remove it or choose another)")
    if backend is None:
        backend = detect_backend(path) if mode == "r" else "lmdb"
    backend = backend.lower()
    if backend not in BACKENDS:
        raise CaffeAlexError(f"unknown backend '{backend}' (expected lmdb or leveldb)")
    return (LMDBDatabase if backend == "lmdb" else LevelDBDatabase)(path, mode)


class Database:
    backend = ""

    def __init__(self, path: str, mode: str = "r"):
        self.path, self.mode = path, mode
        self._count: int | None = None
        self._open()

    # --- the interface (subclasses implement the _underscored parts) ---
    def __len__(self) -> int:
        if self._count is None:
            self._count = self._entries()
        return self._count

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return self.records()

    def get(self, key) -> bytes | None:
        return self._get(_as_key(key))

    def keys(self) -> Iterator[bytes]:
        return self._iterate(values=False)

    def records(
        self, start: int = 0, step: int = 1, endless: bool = False
    ) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs in key order, at stream positions start, start+step, ...

        The stream runs through the records in key order, and with ``endless`` starts over at
        the first record after the last, as Caffe's DataLayer does. ``start`` skips records
        (rand_skip); ``step`` = world size and ``start`` = rank give a rank its share, counted
        over the endless stream as Caffe's DataLayer::Skip counts its offset.
        """
        if step < 1 or start < 0:
            raise ValueError(f"need start >= 0 and step >= 1, got start={start}, step={step}")
        total = len(self)
        if total == 0 or (not endless and start >= total):
            return
        skip = start % total if endless else start
        while True:
            for key, value in self._iterate(values=True, lazy=True):
                if skip:
                    skip -= 1
                else:
                    yield key, value()
                    skip = step - 1
            if not endless:
                return
            skip %= total  # a step longer than the database wraps within one pass

    def transaction(self) -> Transaction:
        if self.mode == "r":
            raise CaffeAlexError(f"database '{self.path}' is open read-only")
        return Transaction(self)

    def close(self) -> None:
        self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        if self.mode != "r":
            raise TypeError("only a read-only Database can be sent to another process")
        return {"path": self.path, "mode": self.mode}

    def __setstate__(self, state):
        self.__init__(state["path"], state["mode"])

    def __repr__(self) -> str:
        return f"<{self.backend} database '{self.path}' ({self.mode})>"


class Transaction:
    """Puts buffered until commit(), then written at once (one LMDB txn / LevelDB batch)."""

    def __init__(self, db: Database):
        self.db, self.items = db, []

    def put(self, key, value: bytes) -> None:
        self.items.append((_as_key(key), bytes(value)))

    def __len__(self) -> int:
        return len(self.items)

    def commit(self) -> None:
        if self.items:
            self.db._write(self.items)
            self.db._count = None
        self.items = []


class LMDBDatabase(Database):
    backend = "lmdb"

    def _open(self):

        self._pid = os.getpid()
        subdir = not os.path.isfile(self.path)
        try:
            if self.mode == "r":
                self.env = _shared_reader(self.path, subdir)
            else:
                self.env = lmdb.open(self.path, subdir=subdir, map_size=_LMDB_START_MAP)
        except lmdb.Error as exc:
            raise CaffeAlexError(f"cannot open LMDB '{self.path}': {exc}") from None

    def _txn(self):
        if self.mode == "r" and self._pid != os.getpid():
            # Forked: LMDB forbids using the parent's handle, and refuses a second one while
            # the inherited one is open, so close it here (the parent's stays open) and reopen.
            self.env.close()
            self._open()
        return self.env.begin(buffers=False)

    def _entries(self) -> int:
        with self._txn() as txn:
            return int(txn.stat()["entries"])

    def _get(self, key):
        with self._txn() as txn:
            return txn.get(key)

    def _iterate(self, values: bool, lazy: bool = False):
        with self._txn() as txn:
            cursor = txn.cursor()
            if not values:
                yield from cursor.iternext(keys=True, values=False)
                return
            if not lazy:
                yield from cursor.iternext()
                return
            # Positioning is cheap; a value is copied out only when asked for.
            ok = cursor.first()
            while ok:
                yield cursor.key(), cursor.value
                ok = cursor.next()

    def _write(self, items):

        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in items:
                        txn.put(key, value)
                return
            except lmdb.MapFullError:  # the txn was aborted: double the map and redo it
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def _close(self):
        if self.mode != "r":
            self.env.close()
            return
        key = (os.getpid(), os.path.realpath(self.path))
        entry = _READERS.get(key)
        if entry and entry[0] is self.env:
            entry[1] -= 1
            if entry[1] == 0:
                del _READERS[key]
                self.env.close()


# LMDB refuses to open one environment twice in a process, so read-only handles are shared
# (counted) per process; a forked worker opens its own, as LMDB requires after fork.
_READERS: dict = {}


def _shared_reader(path: str, subdir: bool):

    key = (os.getpid(), os.path.realpath(path))
    if key not in _READERS:
        # lock=False: Caffe opens read only without TLS and databases often sit on read-only
        # or shared mounts; readers never see a half-written txn anyway.
        env = lmdb.open(path, readonly=True, lock=False, subdir=subdir, max_readers=512)
        _READERS[key] = [env, 0]
    _READERS[key][1] += 1
    return _READERS[key][0]


class LevelDBDatabase(Database):
    backend = "leveldb"

    def _open(self):
        try:
            import plyvel  # imported on use: an optional extra (caffe-alex[leveldb])
        except ImportError:
            raise CaffeAlexError(
                f"'{self.path}' is a LevelDB; reading it needs plyvel "
                "(pip install 'caffe-alex[leveldb]')"
            ) from None
        try:
            # Caffe's options: 64 KiB blocks, 256 MiB write buffer, at most 100 open files.
            self.db = plyvel.DB(
                self.path,
                create_if_missing=self.mode != "r",
                error_if_exists=self.mode == "new",
                block_size=65536,
                write_buffer_size=256 << 20,
                max_open_files=100,
            )
        except plyvel.Error as exc:
            raise CaffeAlexError(f"cannot open LevelDB '{self.path}': {exc}") from None

    def _entries(self) -> int:  # LevelDB keeps no count: walk the keys once (cached)
        return sum(1 for _ in self.db.iterator(include_value=False))

    def _get(self, key):
        return self.db.get(key)

    def _iterate(self, values: bool, lazy: bool = False):
        if not values:
            yield from self.db.iterator(include_value=False)
            return
        for key, value in self.db.iterator():
            yield (key, (lambda v=value: v)) if lazy else (key, value)

    def _write(self, items):
        with self.db.write_batch() as batch:
            for key, value in items:
                batch.put(key, value)

    def _close(self):
        if not self.db.closed:
            self.db.close()
