"""caffe_alex.data.db: LMDB and LevelDB behind one interface, as Caffe's db::DB uses them."""

import contextlib
import multiprocessing
import os
import pickle
import subprocess
import sys

import pytest

from caffe_alex.data import db as dbmod
from caffe_alex.data.db import detect_backend, open_db
from caffe_alex.errors import CaffeAlexError
from tests.data.full_disk import entries, small_file_system
from tests.paths import ROOT

BACKENDS = ["lmdb", "leveldb"]


def _fill(path, backend, n=10):
    with open_db(path, backend, mode="new") as db:
        txn = db.transaction()
        for i in reversed(range(n)):  # written out of order: reads come back in key order
            txn.put(f"{i:08d}_x", f"value {i}".encode())
        txn.commit()


@pytest.fixture(params=BACKENDS)
def filled(request, tmp_path):
    path = str(tmp_path / request.param)
    _fill(path, request.param)
    return path, request.param


def test_key_order_count_and_get(filled):
    path, backend = filled
    assert detect_backend(path) == backend
    with open_db(path) as db:
        assert db.backend == backend and len(db) == 10
        assert [k for k, _ in db] == [f"{i:08d}_x".encode() for i in range(10)]
        assert list(db.keys())[3] == b"00000003_x"
        assert db.get("00000004_x") == b"value 4" and db.get(b"nope") is None


@pytest.mark.parametrize(
    "start, step, endless, expected",
    [
        (0, 1, False, list(range(10))),
        (3, 1, False, list(range(3, 10))),
        (1, 3, False, [1, 4, 7]),
        (12, 1, False, []),
        (2, 4, True, [2, 6, 0, 4, 8, 2, 6]),  # rank 2 of 4 over the endless stream
        (13, 1, True, [3, 4, 5]),  # rand_skip past the end wraps
        (0, 25, True, [0, 5, 0]),  # a step longer than the database
    ],
)
def test_records_skip_and_shard(filled, start, step, endless, expected):
    path, _ = filled
    with open_db(path) as db:
        stream = db.records(start=start, step=step, endless=endless)
        got = [
            int(k[:8])
            for _, (k, _v) in zip(
                range(len(expected) + (0 if endless else 5)), stream, strict=False
            )
        ]
        assert got == expected


def test_ranks_partition_an_epoch(filled):
    path, _ = filled
    with open_db(path) as db:
        shares = [[k for k, _ in db.records(start=r, step=3)] for r in range(3)]
        assert sorted(sum(shares, [])) == [k for k, _ in db]


def test_new_refuses_existing_and_read_refuses_missing(filled, tmp_path):
    path, backend = filled
    with pytest.raises(CaffeAlexError, match="already exists"):
        open_db(path, backend, mode="new")
    missing = str(tmp_path / "missing_db")
    with pytest.raises(CaffeAlexError, match="missing_db"):
        open_db(missing, backend)
    with pytest.raises(CaffeAlexError, match="missing_db"):
        open_db(missing)
    with open_db(path) as db, pytest.raises(CaffeAlexError, match="read-only"):
        db.transaction()


def test_not_a_database(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(CaffeAlexError, match="neither an LMDB"):
        open_db(str(tmp_path / "folder"))
    with pytest.raises(CaffeAlexError, match="unknown backend"):
        open_db(str(tmp_path / "folder"), "rocksdb")


@pytest.mark.parametrize("backend", BACKENDS)
def test_append_mode_and_batches(tmp_path, backend):
    path = str(tmp_path / "db")
    _fill(path, backend, n=3)
    with open_db(path, backend, mode="w") as db:
        txn = db.transaction()
        txn.put(b"zzz", b"last")
        assert len(txn) == 1
        txn.commit()
        assert len(db) == 4 and db.get("zzz") == b"last"


def test_lmdb_map_grows(tmp_path, monkeypatch):
    monkeypatch.setattr(dbmod, "_LMDB_START_MAP", 64 << 10)
    path = str(tmp_path / "grow")
    with open_db(path, "lmdb", mode="new") as db:
        txn = db.transaction()
        for i in range(100):
            txn.put(f"{i:04d}", bytes(5000))
        txn.commit()
        assert db.env.info()["map_size"] > 64 << 10
    with open_db(path) as db:
        assert len(db) == 100 and len(db.get("0099")) == 5000


def test_lmdb_opened_twice_and_pickled(filled):
    path, backend = filled
    if backend != "lmdb":
        pytest.skip("LevelDB locks a database to one handle, as in Caffe")
    a, b = open_db(path), open_db(path)
    c = pickle.loads(pickle.dumps(a))
    a.close()
    assert len(b) == len(c) == 10 and c.get("00000002_x") == b"value 2"
    b.close()
    c.close()


def _child_reads(db, queue):
    queue.put((len(db), db.get("00000005_x"), next(iter(db))[0]))


def test_lmdb_reader_survives_fork(filled):
    path, backend = filled
    if backend != "lmdb":
        pytest.skip("LMDB only")
    ctx = multiprocessing.get_context("fork")
    with open_db(path) as db:
        assert len(db) == 10
        queue = ctx.Queue()
        proc = ctx.Process(target=_child_reads, args=(db, queue))
        proc.start()
        result = queue.get(timeout=30)
        proc.join()
        assert result == (10, b"value 5", b"00000000_x")
        assert db.get("00000005_x") == b"value 5"  # the parent's handle is untouched


def test_lmdb_single_file(tmp_path):
    import lmdb

    path = str(tmp_path / "single.mdb")
    env = lmdb.open(path, subdir=False)
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v")
    env.close()
    assert detect_backend(path) == "lmdb"
    with open_db(path) as db:
        assert list(db) == [(b"k", b"v")]
    assert os.path.isfile(path)


# ---- damaged databases, full disks, interrupted writes ----------------------------------------


def _cli(*args) -> subprocess.CompletedProcess:
    """The command line in a fresh process: a crash (SIGBUS) shows as a negative return code."""
    return subprocess.run([sys.executable, "-m", "caffe_alex", *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def _big_lmdb(path, n=200) -> None:
    with open_db(path, "lmdb", mode="new") as db:
        txn = db.transaction()
        for i in range(n):
            txn.put(f"{i:08d}", bytes([i % 256]) * 3000)  # a page or so each
        txn.commit()


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "keep",
    [lambda size: size // 2, lambda size: size - 1, lambda size: 5000, lambda size: 100,
     lambda size: 0],
    ids=["half", "all but a byte", "a meta page", "part of a meta page", "empty"],
)  # fmt: skip
def test_truncated_lmdb_is_an_error_not_a_crash(tmp_path, keep):
    path = tmp_path / "db"
    _big_lmdb(str(path))
    data = path / "data.mdb"
    os.truncate(data, keep(data.stat().st_size))
    result = _cli("db-info", str(path))
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert result.stderr.startswith(f"caffe-alex: error: LMDB '{path}' is damaged: {data} is ")
    assert result.stderr.count("\n") == 1
    with pytest.raises(CaffeAlexError, match="is damaged"):
        open_db(str(path))


@pytest.mark.subprocess
def test_a_damaged_lmdb_page_is_an_error(tmp_path):
    path = tmp_path / "db"
    _big_lmdb(str(path))
    with open(path / "data.mdb", "r+b") as f:
        f.seek(2 * 4096)  # the first page after the two meta pages: a tree page
        f.write(b"\xff" * 64)
    result = _cli("db-info", str(path))
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert result.stderr.startswith(f"caffe-alex: error: LMDB '{path}' is damaged: ")


def test_lmdb_header_layout_matches_lmdb(tmp_path):
    # the size check reads LMDB's meta pages itself: its fields agree with LMDB's own figures
    path = tmp_path / "db"
    _big_lmdb(str(path))
    with open(path / "data.mdb", "rb") as f:
        metas = [dbmod._META.unpack(f.read(dbmod._META.size))]
        f.seek(metas[0][2])
        metas.append(dbmod._META.unpack(f.read(dbmod._META.size)))
    with open_db(str(path)) as db:
        info, stat = db.env.info(), db.env.stat()
    newest = max(metas, key=lambda m: m[4])
    assert [m[0] for m in metas] == [dbmod._LMDB_MAGIC] * 2
    assert (newest[2], newest[3], newest[4]) == (stat["psize"], info["last_pgno"],
                                                  info["last_txnid"])  # fmt: skip
    assert (newest[3] + 1) * newest[2] == (path / "data.mdb").stat().st_size


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_new_database_leaves_nothing(tmp_path, backend):
    if backend == "leveldb" and not dbmod.leveldb_available():
        pytest.skip("plyvel is not installed")
    path = str(tmp_path / "db")
    with pytest.raises(KeyboardInterrupt), open_db(path, backend, mode="new") as db:
        txn = db.transaction()
        txn.put("a", b"1")
        txn.commit()
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
    _fill(path, backend)  # and the name is free for the next run
    assert os.listdir(tmp_path) == ["db"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_disk_is_an_error_naming_the_database(tmp_path, backend):
    if backend == "leveldb" and not dbmod.leveldb_available():
        pytest.skip("plyvel is not installed")
    with small_file_system(tmp_path / "full") as folder:
        path = str(folder / "db")
        with pytest.raises(CaffeAlexError) as info, open_db(path, backend, mode="new") as db:
            for start in range(0, 4000, 100):  # ~4 MB: twice the file system
                txn = db.transaction()
                for i in range(start, start + 100):
                    txn.put(f"{i:08d}", os.urandom(1000))
                txn.commit()
        assert str(info.value) == f"cannot write {path}: No space left on device"
        assert entries(folder) == []


@pytest.mark.subprocess
def test_full_disk_before_the_lock_file_is_an_error_not_a_crash(tmp_path):
    # LMDB maps its lock file and writes through the map: unallocated, that was a SIGBUS
    with small_file_system(tmp_path / "full") as folder:
        _big_lmdb(str(folder / "old"), n=20)
        code = ("import sys; from caffe_alex.data.db import open_db\n"
                "with open_db(sys.argv[1], 'lmdb', sys.argv[2]) as db:\n"
                "    t = db.transaction(); t.put('k', bytes(10000)); t.commit()\n")  # fmt: skip
        os.remove(folder / "old" / "lock.mdb")
        with open(folder / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(bytes(1 << 16))
                f.flush()
        for target, mode in ((folder / "new", "new"), (folder / "old", "w")):
            result = subprocess.run([sys.executable, "-c", code, str(target), mode],
                                    capture_output=True, text=True, cwd=ROOT)  # fmt: skip
            assert result.returncode == 1, (result.returncode, result.stderr)
            assert f"cannot write {target}: No space left on device" in result.stderr
        assert entries(folder) == ["old"]
        with open_db(str(folder / "old")) as db:
            assert len(db) == 20  # the existing database is intact
