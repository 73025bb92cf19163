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

A database opened "new" is written in a temporary folder beside its path and renamed into place
when it is closed without an error (formats/atomic.py names the temporary; the next run removes
one a killed process left), so a failed or interrupted conversion leaves nothing under the
name. A full file system is an error naming the database, never a crash: LMDB writes through
a memory map only in its lock file, which is allocated before LMDB maps it. A read-only LMDB's
size is checked against its header before it is mapped: a truncated data.mdb is an error, where
reading it through the map would end the process (SIGBUS).

A read-only Database pickles as its path and reopens itself, so loader worker processes can
receive one; each process then holds its own handle, as LMDB requires (a forked LMDB reader
reopens itself on first use). LevelDB locks a database to one process at a time (as in
Caffe): a parent must close a LevelDB before worker processes open it.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import struct
from collections.abc import Iterator

import lmdb

from ..errors import CaffeAlexError, describe
from ..formats.atomic import remove_path, temporary_path
from ..formats.file_errors import no_space, write_error

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
        # where the files are while open: a "new" database is written beside its path
        self.location = temporary_path(path) if mode == "new" else path
        self._count: int | None = None
        if mode == "new":
            try:
                os.mkdir(self.location)
            except OSError as exc:
                raise write_error(path, exc) from None
        try:
            self._open()
        except BaseException:
            if mode == "new":
                remove_path(self.location)
            raise

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
        """Close; a "new" database is then moved to its path."""
        self._close()
        if self.mode == "new" and os.path.isdir(self.location):
            try:
                if os.path.lexists(self.path):
                    raise FileExistsError(errno.EEXIST, "something else created it meanwhile")
                os.rename(self.location, self.path)
            except OSError as exc:
                remove_path(self.location)
                raise write_error(self.path, exc) from None

    def discard(self) -> None:
        """Close; a "new" database is removed (a failed write leaves nothing behind)."""
        with contextlib.suppress(Exception):
            self._close()
        if self.mode == "new":
            remove_path(self.location)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and self.mode == "new":
            self.discard()
        else:
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
        subdir = not os.path.isfile(self.location)
        data = os.path.join(self.location, "data.mdb") if subdir else self.location
        problem = _lmdb_size_problem(data, self.mode == "r")
        if problem:
            raise CaffeAlexError(f"LMDB '{self.path}' is damaged: {problem}")
        try:
            if self.mode == "r":
                self.env = _shared_reader(self.location, subdir)
            else:
                if subdir and not os.path.isdir(self.location):
                    os.mkdir(self.location)  # as lmdb.open would ("w" on a new path)
                lock = os.path.join(self.location, "lock.mdb") if subdir else data + "-lock"
                _reserve_lock_file(lock)
                self.env = lmdb.open(self.location, subdir=subdir, map_size=_LMDB_START_MAP,
                                     max_readers=_LOCK_READERS)  # fmt: skip
        except OSError as exc:
            raise write_error(self.path, exc) from None
        except lmdb.Error as exc:
            raise CaffeAlexError(f"cannot open LMDB '{self.path}': {describe(exc)}") from None

    def _txn(self):
        if self.mode == "r" and self._pid != os.getpid():
            # Forked: LMDB forbids using the parent's handle, and refuses a second one while
            # the inherited one is open, so close it here (the parent's stays open) and reopen.
            self.env.close()
            self._open()
        return self.env.begin(buffers=False)

    @contextlib.contextmanager
    def _reading(self):
        try:
            yield
        except (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError) as exc:
            raise CaffeAlexError(f"LMDB '{self.path}' is damaged: {describe(exc)}") from None
        except lmdb.Error as exc:
            raise CaffeAlexError(f"cannot read LMDB '{self.path}': {describe(exc)}") from None

    def _entries(self) -> int:
        with self._reading(), self._txn() as txn:
            return int(txn.stat()["entries"])

    def _get(self, key):
        with self._reading(), self._txn() as txn:
            return txn.get(key)

    def _iterate(self, values: bool, lazy: bool = False):
        with self._reading(), self._txn() as txn:
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
            except lmdb.Error as exc:
                raise _write_failure(self.path, self.location, exc, items) from None

    def _close(self):
        if self.mode != "r":
            self.env.close()
            return
        key = (os.getpid(), os.path.realpath(self.location))
        entry = _READERS.get(key)
        if entry and entry[0] is self.env:
            entry[1] -= 1
            if entry[1] == 0:
                del _READERS[key]
                self.env.close()


def _write_failure(path: str, folder: str, exc: Exception, items) -> CaffeAlexError:
    # LMDB reports a short write (what a full file system gives part-way) as EIO: no_space
    # tells it from a failing device by the free space left in the database's folder
    if no_space(exc, folder, sum(len(k) + len(v) for k, v in items)):
        return CaffeAlexError(f"cannot write {path}: {os.strerror(errno.ENOSPC)}")
    return CaffeAlexError(f"cannot write {path}: {describe(exc)}")


# LMDB's file layout (lmdb.h / mdb.c, 64-bit): a meta page at offset 0 and one at page size;
# each holds, after a 16-byte page header, the magic, the page size (in the free-list DB's
# md_pad), the last page number used and the transaction id. A reader's pages all lie below
# (last page + 1) x page size of the newest meta.
_META = struct.Struct("<16xII16xI92xQQ")  # magic, version, page size, last page, txn id
_LMDB_MAGIC = 0xBEEFC0DE
_LOCK_READERS = 126  # py-lmdb's default max_readers
_LOCK_BYTES = (_LOCK_READERS - 1) * 64 + 192  # LMDB's lock file for that many readers


def _lmdb_size_problem(data: str, reading: bool) -> str | None:
    """Why the LMDB data file ``data`` cannot be mapped safely, if it cannot: shorter than its
    newest meta page says (a truncated copy); LMDB itself reports a file that is not an LMDB."""
    try:
        size = os.path.getsize(data)
        with open(data, "rb") as f:
            first = f.read(_META.size)
            metas = [_META.unpack(first)] if len(first) == _META.size else []
            psize = metas[0][2] if metas else 0
            if metas and psize:
                f.seek(psize)
                second = f.read(_META.size)
                if len(second) == _META.size:
                    metas.append(_META.unpack(second))
    except OSError:
        return None  # missing (a new database) or unreadable: LMDB's open says which
    if not metas:
        return f"{data} is empty" if size == 0 and reading else (
            f"{data} is truncated ({size} bytes)" if size else None)  # fmt: skip
    if metas[0][0] != _LMDB_MAGIC:
        return None  # not an LMDB: LMDB's own error says so
    if psize == 0 or len(metas) < 2:
        return f"{data} is truncated ({size} bytes, short of its two meta pages)"
    valid = [m for m in metas if m[0] == _LMDB_MAGIC]
    last_page = max(valid, key=lambda m: m[4])[3]
    need = (last_page + 1) * psize
    if size < need:
        return f"{data} is truncated ({size} bytes; its header says {need})"
    return None


def _reserve_lock_file(lock: str) -> None:
    """LMDB writes its lock file through a memory map: on a full file system a page of it not
    yet allocated faults (SIGBUS) where a write would fail. Allocate it before LMDB maps it."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            os.write(fd, bytes(_LOCK_BYTES))
        elif hasattr(os, "posix_fallocate"):  # another process may use it: keep its bytes
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
    finally:
        os.close(fd)


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
        self._errors = plyvel.Error
        try:
            # Caffe's options: 64 KiB blocks, 256 MiB write buffer, at most 100 open files.
            self.db = plyvel.DB(
                self.location,
                create_if_missing=self.mode != "r",
                error_if_exists=self.mode == "new",
                block_size=65536,
                write_buffer_size=256 << 20,
                max_open_files=100,
            )
        except plyvel.Error as exc:
            if self.mode != "r" and no_space(exc):
                raise _write_failure(self.path, self.location, exc, []) from None
            raise CaffeAlexError(f"cannot open LevelDB '{self.path}': {describe(exc)}") from None

    @contextlib.contextmanager
    def _reading(self):
        try:
            yield
        except self._errors as exc:  # a damaged table, a missing file...
            raise CaffeAlexError(f"LevelDB '{self.path}' is damaged: {describe(exc)}") from None

    def _entries(self) -> int:  # LevelDB keeps no count: walk the keys once (cached)
        with self._reading():
            return sum(1 for _ in self.db.iterator(include_value=False))

    def _get(self, key):
        with self._reading():
            return self.db.get(key)

    def _iterate(self, values: bool, lazy: bool = False):
        with self._reading():
            if not values:
                yield from self.db.iterator(include_value=False)
                return
            for key, value in self.db.iterator():
                yield (key, (lambda v=value: v)) if lazy else (key, value)

    def _write(self, items):
        try:
            with self.db.write_batch() as batch:
                for key, value in items:
                    batch.put(key, value)
        except self._errors as exc:
            raise _write_failure(self.path, self.location, exc, items) from None

    def _close(self):
        if not self.db.closed:
            self.db.close()
