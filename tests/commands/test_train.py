"""``caffe-alex train`` / ``caffe-alex test``: Caffe's flags and spellings, the signal effects,
the progress bar, resume through the CLI, and ``test``'s averages with loss-weight notes."""

from __future__ import annotations

import os
import signal
import textwrap

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from caffe_alex.cli import main
from caffe_alex.commands import train as train_command
from caffe_alex.commands.train import progress_bar, score, signal_effects
from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from caffe_alex.proto import caffe_pb2
from caffe_alex.solvers import distributed


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write_tiny_problem(root, *, max_iter=6, snapshot=3, extra="") -> dict:
    """A 4-class linear problem in HDF5 (40 rows of 8 features), a net and a solver file."""
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 4
    centres = rng.normal(size=(4, 8)).astype(np.float32) * 2
    data = centres[labels] + rng.normal(size=(40, 8)).astype(np.float32) * 0.5
    with h5py.File(root / "tiny.h5", "w") as h5:
        h5["data"], h5["label"] = data.astype(np.float32), labels.astype(np.float32)
    (root / "list.txt").write_text(f"{root / 'tiny.h5'}\n")
    net = root / "tiny.prototxt"
    net.write_text(
        textwrap.dedent(f"""\
        name: "tiny"
        layer {{ name: "data" type: "HDF5Data" top: "data" top: "label"
                 hdf5_data_param {{ source: "{root / "list.txt"}" batch_size: 8 }} }}
        layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
                 inner_product_param {{ num_output: 4 weight_filler {{ type: "gaussian" std: 0.1 }}
                                        bias_filler {{ type: "constant" value: 0 }} }} }}
        layer {{ name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy"
                 include {{ phase: TEST }} }}
        layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
        """)
    )
    solver = root / "solver.prototxt"
    solver.write_text(
        textwrap.dedent(f"""\
        net: "{net}"
        test_iter: 2
        test_interval: 3
        base_lr: 0.1
        momentum: 0.9
        weight_decay: 0.001
        lr_policy: "step"
        gamma: 0.5
        stepsize: 4
        display: 2
        max_iter: {max_iter}
        snapshot: {snapshot}
        snapshot_prefix: "{root / "tiny"}"
        random_seed: 1
        solver_mode: CPU
        {extra}""")
    )
    return {"net": net, "solver": solver, "prefix": root / "tiny"}


# -- flags ----------------------------------------------------------------------------------
def test_help_names_caffes_flags():
    result = run("train", "--help")
    assert result.exit_code == 0
    for flag in ("-solver", "-weights", "-snapshot", "-gpu", "-level", "-stage",
                 "-sigint_effect", "-sighup_effect"):  # fmt: skip
        assert flag in result.output
    result = run("test", "--help")
    for flag in ("-model", "-weights", "-iterations", "-gpu"):
        assert flag in result.output


def test_weights_and_snapshot_are_exclusive(tmp_path):
    # Caffe's single-dash spelling, as in existing scripts
    result = run("train", "-solver", "s.prototxt", "-weights", "a.caffemodel",
                 "-snapshot", "s_iter_2.solverstate")  # fmt: skip
    assert result.exit_code == 2
    assert "not both" in result.output


def test_solver_and_model_are_required():
    assert "Need a solver definition" in run("train").output
    assert "Need a model definition" in run("test", "-weights", "w.caffemodel").output
    assert "Need model weights" in run("test", "-model", "m.prototxt").output


def test_signal_effect_choices():
    result = run("train", "-solver", "s.prototxt", "-sigint_effect", "pause")
    assert result.exit_code == 2 and "pause" in result.output


def test_missing_solver_file_is_one_line(tmp_path):
    result = run("train", "--solver", tmp_path / "nope.prototxt")
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 or "error:" in result.stderr


# -- signals and progress -------------------------------------------------------------------
class FakeSolver:
    def __init__(self):
        self.requests, self.callbacks, self.iter = [], [], 0
        self.param = caffe_pb2.SolverParameter(max_iter=10)

    def request(self, action):
        self.requests.append(action)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP here")
def test_signal_effects_request_and_restore():
    solver = FakeSolver()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGHUP)
    with signal_effects(solver, "stop", "snapshot"):
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGINT)
    with signal_effects(solver, "none", "stop"):
        os.kill(os.getpid(), signal.SIGINT)  # swallowed, as Caffe's 'none'
    assert solver.requests == ["snapshot", "stop"]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGHUP)) == before


def test_progress_bar_follows_callbacks(capsys):
    solver = FakeSolver()
    solver.iter = 2  # resumed
    with progress_bar(solver, True) as bar:
        assert bar.n == 2 and len(solver.callbacks) == 1
        for it in range(3, 6):  # the solver passes the iterations done so far
            solver.callbacks[0](it, 0.5, 0.01, 123.4)
        assert bar.n == 5
    assert solver.callbacks == []
    err = capsys.readouterr().err
    assert "loss=0.5, lr=0.01, 123.4 img/s" in err
    with progress_bar(solver, False) as bar:
        assert bar is None and solver.callbacks == []


# -- test -----------------------------------------------------------------------------------
def _caffe_mean(values) -> float:
    """caffe.cpp's test(): the batches' values summed in float32, then divided in float32 (a
    mean taken in double may print another last digit)."""
    total = np.float32(0)
    for value in values:
        total = np.float32(total + np.float32(float(value)))
    return float(total / np.float32(len(values)))


def test_score_averages_and_loss_weights(tmp_path):
    files = write_tiny_problem(tmp_path)
    net = Net.from_prototxt(str(files["net"]), "TEST")
    weights = tmp_path / "w.caffemodel"
    net.save_weights(str(weights))
    gen = torch.Generator().manual_seed(0)
    batches = [{"data": torch.randn(8, 8, generator=gen),
                "label": torch.tensor([0.0, 1, 2, 3] * 2)} for _ in range(3)]  # fmt: skip
    logged = []
    lines = score(net, iter(batches), 3, logged.append)
    with torch.no_grad():
        outs = [net(**b) for b in batches]
    acc = _caffe_mean([o["accuracy"] for o in outs])
    loss = _caffe_mean([o["loss"] for o in outs])
    assert logged[:2] == [f"Batch 0, accuracy = {float(outs[0]['accuracy']):.6g}",
                          f"Batch 0, loss = {float(outs[0]['loss']):.6g}"]  # fmt: skip
    assert lines == [f"Loss: {loss:.6g}", f"accuracy = {acc:.6g}",
                     f"loss = {loss:.6g} (* 1 = {loss:.6g} loss)"]  # fmt: skip


def test_test_command(tmp_path):
    files = write_tiny_problem(tmp_path)
    weights = tmp_path / "w.caffemodel"
    Net.from_prototxt(str(files["net"]), "TEST").save_weights(str(weights))
    result = run("test", "-model", files["net"], "-weights", weights, "-iterations", 5)
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "Use CPU." in err and "Running for 5 iterations." in err
    assert err.count("Batch 4, accuracy = ") == 1
    assert "] Loss: " in err and " (* 1 = " in err


# -- train ----------------------------------------------------------------------------------
def _read_params(path) -> list[np.ndarray]:
    from caffe_alex.formats.weights import read_weights

    return [b.data for lw in read_weights(str(path)).layers for b in lw.blobs if b is not None]


def test_train_writes_snapshots_and_a_parseable_log(tmp_path):
    files = write_tiny_problem(tmp_path)
    result = run("train", "-solver", files["solver"], "-gpu", "none")
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "Use CPU." in err and "Starting Optimization" in err
    assert err.rstrip().endswith("Optimization Done.")
    for n in (3, 6):
        assert (tmp_path / f"tiny_iter_{n}.caffemodel").is_file()
        assert (tmp_path / f"tiny_iter_{n}.solverstate").is_file()
    from caffe_alex.tools.plot_log import parse_lines

    log = parse_lines(err.splitlines())
    assert [r["NumIters"] for r in log.test][:1] == [0]
    assert [i for i, _ in log.loss][:3] == [0, 2, 4]


def test_resume_through_the_cli_is_bit_identical(tmp_path):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    straight.mkdir(), resumed.mkdir()
    a, b = write_tiny_problem(straight), write_tiny_problem(resumed)
    assert run("train", "--solver", a["solver"]).exit_code == 0
    b["solver"].write_text(b["solver"].read_text().replace("max_iter: 6", "max_iter: 3"))
    assert run("train", "--solver", b["solver"]).exit_code == 0
    b["solver"].write_text(b["solver"].read_text().replace("max_iter: 3", "max_iter: 6"))
    state = f"{b['prefix']}_iter_3.solverstate"
    result = run("train", "--solver", b["solver"], "--snapshot", state)
    assert result.exit_code == 0, result.output
    assert "Resuming from" in result.stderr
    for x, y in zip(_read_params(f"{a['prefix']}_iter_6.caffemodel"),
                    _read_params(f"{b['prefix']}_iter_6.caffemodel")):  # fmt: skip
        assert np.array_equal(x, y)


def test_finetune_from_weights_and_progress_bar(tmp_path):
    files = write_tiny_problem(tmp_path, max_iter=2, snapshot=0)
    start = tmp_path / "start.caffemodel"
    net = Net.from_prototxt(str(files["net"]), "TRAIN")
    with torch.no_grad():
        net.params["ip"][0].fill_(0.0)
    net.save_weights(str(start))
    result = run("train", "-solver", files["solver"], "-weights", start, "--progress")
    assert result.exit_code == 0, result.output
    assert " img/s" in result.stderr  # the bar was drawn
    assert (tmp_path / "tiny_iter_2.caffemodel").is_file()  # snapshot_after_train


def test_gpu_solver_mode_falls_back_to_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    files = write_tiny_problem(tmp_path, max_iter=1, snapshot=0)
    text = files["solver"].read_text().replace("solver_mode: CPU", "solver_mode: GPU")
    files["solver"].write_text(text)
    result = run("train", "-solver", files["solver"])
    assert result.exit_code == 0, result.output
    assert "no CUDA device available" in result.stderr and "Use CPU." in result.stderr


# -- several GPUs ---------------------------------------------------------------------------
@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with GPUs 0 and 1, as far as the checks of --gpu can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def _error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("caffe-alex: error: ") and "Traceback" not in result.stderr
    return lines[-1]


def test_gpu_lists_are_checked_against_the_machine(tmp_path, two_gpus, monkeypatch):
    solver = write_tiny_problem(tmp_path)["solver"]
    assert _error(run("train", "--solver", solver, "--gpu", "3")).endswith(
        "--gpu 3: there is no GPU 3; this machine has 2 (ids 0, 1)"
    )
    assert "a GPU is listed twice" in _error(run("train", "--solver", solver, "--gpu", "0,0"))
    assert "expected GPU ids" in _error(run("train", "--solver", solver, "--gpu", "0,x"))
    launched = []
    monkeypatch.setattr(train_command.distributed, "launch",
                        lambda fn, args, nprocs, **kw: launched.append((nprocs, kw["names"])))
    for spec in ("0,1", "all"):
        assert run("train", "--solver", solver, "--gpu", spec).exit_code == 0
    assert launched == [(2, ["GPU 0", "GPU 1"])] * 2  # one process per GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_gpu_all_or_a_list_without_cuda(tmp_path):
    solver = write_tiny_problem(tmp_path)["solver"]
    assert _error(run("train", "--solver", solver, "--gpu", "all")).endswith(
        "--gpu all: no CUDA device is available (--gpu none runs on the CPU)"
    )
    assert "no CUDA device is available" in _error(run("train", "-solver", solver, "-gpu", "0,1"))


def test_gpus_of_the_local_ranks_under_torchrun(two_gpus):
    ranks = distributed.Ranks(rank=3, size=4, local_rank=1, local_size=2)
    assert train_command._pick([0, 1], "0,1", True, ranks) == torch.device("cuda", 1)
    assert train_command._pick([0, 1], "all", True, ranks) == torch.device("cuda", 1)
    assert train_command._pick([0], "0", False, ranks) == torch.device("cuda", 1)  # solver's GPU
    assert train_command._pick([], "", False, ranks) == torch.device("cpu")
    with pytest.raises(CaffeAlexError, match="give one id per process"):
        train_command._pick([1], "1", True, ranks)


def test_speed_options_are_checked(tmp_path):
    solver = write_tiny_problem(tmp_path)["solver"]
    result = run("train", "--solver", solver, "--precision", "fp8")
    assert result.exit_code == 2 and "fp8" in result.output
    result = run("train", "--solver", solver, "--dist-timeout", "0")
    assert result.exit_code == 2 and "dist-timeout" in result.output
