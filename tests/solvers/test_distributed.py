"""Training on several ranks (caffe_alex/solvers/distributed.py) on the CPU with gloo: two ranks
equal one process with iter_size 2 on the same records; only rank 0 tests, logs and snapshots;
resume restores every rank; a signal to one rank stops both with a snapshot; a rank that dies,
fails to start or was given another solver makes the others stop with one clear line.

The ranks are real processes: under torchrun, started by ``distributed.launch`` (what
``--gpu 0,1`` uses), or started here with torchrun's variables so that each can be signalled.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from caffe_alex.commands import train as train_command
from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.weights import read_weights
from caffe_alex.solvers import Solver, distributed
from tests.commands.test_train import write_tiny_problem
from tests.paths import ROOT

pytestmark = [
    pytest.mark.skipif(
        not distributed.dist.is_available() or not distributed.dist.is_gloo_available(),
        reason="torch.distributed with gloo is not available",
    ),
    pytest.mark.subprocess,  # ranks are processes
]
TIMEOUT = 120  # seconds for a whole run: the runs take a few; a hang fails instead of blocking


def _params(path) -> list[np.ndarray]:
    return [b.data for lw in read_weights(str(path)).layers for b in lw.blobs if b is not None]


def _moved(solver, prefix) -> str:
    """The text of ``solver`` with its snapshot_prefix set to ``prefix``."""
    return re.sub(r'snapshot_prefix: ".*"', f'snapshot_prefix: "{prefix}"', solver.read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, size: int, port: int) -> dict:
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size),
               LOCAL_WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS="1")  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class Ranks:
    """``caffe-alex train ARGS`` as ranks 0..n-1 of one world, each logging to its own file."""

    def __init__(self, tmp_path, args_per_rank, cwds=None):
        port = _free_port()
        self.logs = [tmp_path / f"rank{r}.log" for r in range(len(args_per_rank))]
        self.procs = []
        for rank, args in enumerate(args_per_rank):
            with open(self.logs[rank], "w") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "caffe_alex", "train", *map(str, args)],
                    env=_env(rank, len(args_per_rank), port), stdout=log, stderr=log,
                    cwd=cwds[rank] if cwds else None,
                ))  # fmt: skip

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def wait_for(self, rank: int, text: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while text not in self.log(rank):
            assert time.monotonic() < deadline, f"no {text!r} in rank {rank}'s log"
            assert self.procs[rank].poll() is None, self.log(rank)
            time.sleep(0.05)

    def wait(self) -> list[int]:
        try:
            return [p.wait(TIMEOUT) for p in self.procs]
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()


def _torchrun(tmp_path, *args) -> subprocess.CompletedProcess:
    """torchrun --nproc-per-node 2 -m caffe_alex train ARGS; each line tagged with its rank."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "--tee", "3", "-m", "caffe_alex", "train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(list(map(str, command)), cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)  # fmt: skip


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The tiny HDF5 problem trained 20 iterations by 2 ranks under torchrun (snapshots at 10
    and 20, tests every 3 iterations)."""
    root = tmp_path_factory.mktemp("two_ranks")
    files = write_tiny_problem(root, max_iter=20, snapshot=10)
    result = _torchrun(root, "--solver", files["solver"])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines() + result.stderr.splitlines()
    files["rank0"] = [line for line in lines if line.startswith("[default0]:")]
    files["rank1"] = [line for line in lines if line.startswith("[default1]:")]
    return files


def test_two_ranks_equal_one_process_with_iter_size_two(two_ranks, tmp_path):
    reference = tmp_path / "solver.prototxt"
    reference.write_text(_moved(two_ranks["solver"], tmp_path / "one") + "iter_size: 2\n")
    solver = Solver.from_file(str(reference))
    solver.solve()
    solver.close()
    ours = _params(f"{two_ranks['prefix']}_iter_20.caffemodel")
    single = _params(tmp_path / "one_iter_20.caffemodel")
    assert len(ours) == len(single) == 2
    for x, y in zip(ours, single):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * float(np.abs(y).max()))
    # the 40 records dealt round robin: 2 ranks x 20 iterations x batch 8 = 8 passes over them
    assert not np.array_equal(ours[0], _params(f"{two_ranks['prefix']}_iter_10.caffemodel")[0])


def test_only_rank_zero_tests_logs_and_snapshots(two_ranks):
    rank0, rank1 = two_ranks["rank0"], two_ranks["rank1"]
    assert rank1 == []  # the other ranks log warnings and errors only
    assert sum("Test net output #0: accuracy" in line for line in rank0) == 7  # 0, 3 .. 18
    assert sum("] Iteration 18 (" in line for line in rank0) == 1
    assert sum("Snapshotting to binary proto file" in line for line in rank0) == 2
    written = sorted(p.name for p in two_ranks["prefix"].parent.glob("tiny_iter_*"))
    assert written == [f"tiny_iter_{n}.{ext}" for n in (10, 20)
                       for ext in ("caffemodel", "solverstate", "solverstate.data.json")]
    doc = json.loads((two_ranks["prefix"].parent / "tiny_iter_20.solverstate.data.json")
                     .read_text())  # fmt: skip
    ranks = doc["feeds"]["ranks"]
    assert [r["train"]["state"]["rank"] for r in ranks] == [0, 1]
    assert {r["train"]["batches"] for r in ranks} == {20}


def test_resume_of_two_ranks_launched_for_a_gpu_list_equals_the_uninterrupted_run(
    two_ranks, tmp_path
):
    """Resume the torchrun run at iteration 10 on 2 ranks started by ``distributed.launch``
    (what ``--gpu 0,1`` uses; here on CPUs): the same weights at 20, bit for bit."""
    solver = tmp_path / "solver.prototxt"  # the same run, writing its snapshots here
    solver.write_text(_moved(two_ranks["solver"], tmp_path / "tiny"))
    opts = {"solver": str(solver), "weights": "",
            "snapshot": f"{two_ranks['prefix']}_iter_10.solverstate", "gpu": "none",
            "level": 0, "stage": "", "sigint_effect": "stop", "sighup_effect": "snapshot",
            "progress": False, "log_file": str(tmp_path / "train.log"), "precision": "fp32",
            "channels_last": False, "compile_net": False, "dist_timeout": 60.0,
            "dist_backend": None, "debug": False, "tensorboard": None}  # fmt: skip
    distributed.launch(train_command._rank_main, (opts,), nprocs=2)
    for x, y in zip(_params(tmp_path / "tiny_iter_20.caffemodel"),
                    _params(f"{two_ranks['prefix']}_iter_20.caffemodel")):  # fmt: skip
        assert np.array_equal(x, y)
    log = (tmp_path / "train.log").read_text()  # rank 0's --log
    assert "Resuming from" in log and "Iteration 18, Testing net (#0)" in log


def test_the_launcher_names_the_rank_that_failed():
    fork = multiprocessing.get_context("fork")
    processes = [fork.Process(target=os._exit, args=(code,)) for code in (0, 3)]
    for process in processes:
        process.start()
    assert distributed._wait(processes, grace=5) == (1, 3)
    assert distributed._failure(1, 3, ["GPU 4", "GPU 5"]) == (
        "rank 1 (GPU 5) stopped with exit code 3; training stopped on every rank"
    )
    assert distributed._failure(0, -9, None) == (
        "rank 0 was killed by SIGKILL; training stopped on every rank"
    )


def _long_run(tmp_path):
    files = write_tiny_problem(tmp_path, max_iter=1000000, snapshot=0)
    text = files["solver"].read_text().replace("display: 2", "display: 100")
    files["solver"].write_text(text.replace("test_interval: 3", "test_interval: 500"))
    return files


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
def test_signals_to_one_rank_reach_both(tmp_path):
    """SIGHUP to rank 1: both go on after a snapshot; SIGINT to rank 0: both stop, with one."""
    files = _long_run(tmp_path)
    ranks = Ranks(tmp_path, [["--solver", files["solver"]]] * 2)
    ranks.wait_for(0, "] Iteration 100 (")  # both ranks have their signal handlers by now
    ranks.procs[1].send_signal(signal.SIGHUP)
    ranks.wait_for(0, "Snapshotting solver state")
    ranks.procs[0].send_signal(signal.SIGINT)
    assert ranks.wait() == [0, 0], ranks.log(0)[-2000:] + ranks.log(1)
    log0 = ranks.log(0)
    assert "Optimization stopped early." in log0 and ranks.log(1) == ""
    models = list(tmp_path.glob("tiny_iter_*.caffemodel"))
    assert len(models) == 2
    for model in models:
        assert f"Snapshotting to binary proto file {model}" in log0


def test_a_rank_that_dies_stops_the_others(tmp_path):
    files = _long_run(tmp_path)
    ranks = Ranks(tmp_path, [["--solver", files["solver"], "--dist-timeout", 30]] * 2)
    ranks.wait_for(0, "] Iteration 100 (")
    ranks.procs[1].kill()
    codes = ranks.wait()
    assert codes[0] == 1, ranks.log(0)[-2000:]
    last = ranks.log(0).strip().splitlines()[-1]
    assert last.startswith("caffe-alex: error: rank 0: ") and "failed" in last
    assert "Traceback" not in ranks.log(0)


def test_ranks_given_different_solvers_stop(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    files_a = write_tiny_problem(a, max_iter=2)
    files_b = write_tiny_problem(b, max_iter=2, extra="iter_size: 2")
    ranks = Ranks(tmp_path, [["--solver", files_a["solver"]], ["--solver", files_b["solver"]]])
    assert ranks.wait() == [1, 1]
    for rank in (0, 1):
        assert ranks.log(rank).strip().splitlines()[-1] == (
            "caffe-alex: error: the ranks disagree on the solver file: rank 1's differs from "
            "rank 0's; start every rank with the same solver file and options"
        )


def test_a_rank_without_its_data_stops_every_rank(tmp_path):
    """Relative paths, two working folders: rank 1's folder lacks the HDF5 list."""
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    files = write_tiny_problem(here, max_iter=2)
    for name in ("solver.prototxt", "tiny.prototxt"):
        text = (here / name).read_text().replace(f"{here}/", "")
        (here / name).write_text(text)
        shutil.copy(here / name, there / name)
    (here / "list.txt").write_text("tiny.h5\n")
    ranks = Ranks(tmp_path, [["--solver", "solver.prototxt"]] * 2, cwds=[here, there])
    assert ranks.wait() == [1, 1]
    own = ranks.log(1).strip().splitlines()[-1]
    assert own.startswith("caffe-alex: error: ") and "list.txt" in own
    assert ranks.log(0).strip().splitlines()[-1] == (
        f"caffe-alex: error: rank 1 could not start: {own.removeprefix('caffe-alex: error: ')}"
    )
    assert files["solver"].exists() and not list(here.glob("tiny_iter_*"))


def test_ranks_from_the_environment():
    assert distributed.ranks_from_env({}) is None
    assert distributed.ranks_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert distributed.ranks_from_env(env) == distributed.Ranks(3, 4, 1, 2)
    with pytest.raises(CaffeAlexError, match="inconsistent torchrun variables"):
        distributed.ranks_from_env({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(CaffeAlexError, match="not integers"):
        distributed.ranks_from_env({"WORLD_SIZE": "two", "RANK": "0"})
    with pytest.raises(CaffeAlexError, match="RANK is not"):
        distributed.ranks_from_env({"WORLD_SIZE": "2"})
