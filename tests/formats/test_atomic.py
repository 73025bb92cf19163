"""Atomic writes: temporaries named after the destination and the writing process, removed by
the next write of the same destination once that process is gone (a real SIGKILL part-way
through `convert` here), the destination untouched meanwhile."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.atomic import atomic_path, remove_stale_temporaries
from caffe_alex.formats.weights import convert, read_weights
from caffe_alex.proto import caffe_pb2
from tests.data.full_disk import free_bytes, kill_midway, small_file_system


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])  # a process that is gone at once
    proc.wait()
    return proc.pid


def test_temporary_is_named_after_the_destination_and_the_process(tmp_path):
    with atomic_path(tmp_path / "w.caffemodel") as tmp:
        name = os.path.basename(tmp)
        assert re.fullmatch(rf"\.w\.caffemodel\.caffe-alex-{os.getpid()}-\d+\.tmp", name)
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert sorted(os.listdir(tmp_path)) == ["w.caffemodel"]
    long_name = "x" * 240 + ".caffemodel"  # with the suffix, past NAME_MAX unless cut
    with atomic_path(tmp_path / long_name) as tmp, open(tmp, "wb") as f:
        f.write(b"new")
    assert (tmp_path / long_name).read_bytes() == b"new"


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    names = [f".w.caffemodel.caffe-alex-{dead}-0.tmp",  # a killed write of w.caffemodel
             f".w.caffemodel.caffe-alex-{alive}-7.tmp",  # one in progress (this process)
             f".v.caffemodel.caffe-alex-{dead}-0.tmp",  # another destination's
             ".w.caffemodel.1234abcd.tmp"]  # not ours  # fmt: skip
    for name in names:
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / f".w.caffemodel.caffe-alex-{dead}-1.tmp").mkdir()  # a database's folder
    removed = remove_stale_temporaries(tmp_path / "w.caffemodel")
    assert sorted(os.path.basename(p) for p in removed) == [
        f".w.caffemodel.caffe-alex-{dead}-0.tmp",
        f".w.caffemodel.caffe-alex-{dead}-1.tmp",
    ]
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:])


SLOW_CONVERT = """
import os, sys, time
def stall(fd):  # the temporary is written; the rename has not happened
    print("writing", flush=True)
    time.sleep(300)
os.fsync = stall
from caffe_alex.formats.weights import convert
convert(sys.argv[1], sys.argv[2])
"""


@pytest.mark.subprocess
def test_kill_during_convert_keeps_the_destination_and_the_next_run_cleans_up(tmp_path):
    src, dst = tmp_path / "w.caffemodel", tmp_path / "w.safetensors"
    _big_caffemodel(src)
    dst.write_bytes(b"the old weights")
    code = SLOW_CONVERT.replace("sys.argv[1], sys.argv[2]", f"{str(src)!r}, {str(dst)!r}")
    pid = kill_midway(code)
    assert dst.read_bytes() == b"the old weights"
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert left.name.startswith(f".w.safetensors.caffe-alex-{pid}-")
    assert left.stat().st_size > 4 * 10**6  # killed with the data written, before the rename
    convert(src, dst)  # the same command again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.caffemodel", "w.safetensors"]
    assert read_weights(dst).layers[0].blobs[0].data[-1] == 999999


def _big_caffemodel(path) -> None:
    net = caffe_pb2.NetParameter(name="n")
    layer = net.layer.add(name="ip", type="InnerProduct")
    layer.blobs.add(shape=caffe_pb2.BlobShape(dim=[1000, 1000])).data.extend(range(10**6))
    path.write_bytes(net.SerializeToString())


@pytest.mark.slow
@pytest.mark.parametrize("ext", ["caffemodel", "caffemodel.h5", "pt", "safetensors", "npy"])
def test_convert_onto_a_full_disk(tmp_path, ext):
    src = tmp_path / ("w.caffemodel" if ext != "npy" else "m.binaryproto")
    if ext == "npy":
        proto = caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[10**6]))
        proto.data.extend(range(10**6))
        src.write_bytes(proto.SerializeToString())
    else:
        _big_caffemodel(src)
    with small_file_system(tmp_path / "full", size="1m") as folder:
        dst = folder / f"out.{ext}"
        with pytest.raises(CaffeAlexError) as info:
            convert(src, dst)
        assert str(info.value) == f"cannot write {dst}: No space left on device"
        assert os.listdir(folder) == []


def test_a_full_disk_names_the_destination_and_leaves_nothing(tmp_path):
    with small_file_system(tmp_path / "full", size="1m") as folder:
        (folder / "w.caffemodel").write_bytes(b"old")
        with pytest.raises(CaffeAlexError) as info:
            with atomic_path(folder / "w.caffemodel") as tmp, open(tmp, "wb") as f:
                f.write(bytes(free_bytes(folder) + (1 << 20)))
        assert str(info.value) == f"cannot write {folder / 'w.caffemodel'}: No space left on device"
        assert sorted(os.listdir(folder)) == ["w.caffemodel"]
        assert (folder / "w.caffemodel").read_bytes() == b"old"
