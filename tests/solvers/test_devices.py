"""solvers/devices.py: the one place a device is chosen, by Caffe's precedence (caffe.cpp):
the --gpu flag, then the solver file's solver_mode/device_id when it sets solver_mode, then the
CPU; checked against the GPUs the machine has."""

from __future__ import annotations

import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.proto import caffe_pb2
from caffe_alex.solvers.devices import choose_device, gpu_ids, gpu_spec

SP = caffe_pb2.SolverParameter
CPU = torch.device("cpu")


def cuda(i):
    return torch.device("cuda", i)


def solver(mode=None, device_id=None):
    param = SP()
    if mode is not None:
        param.solver_mode = getattr(SP, mode)
    if device_id is not None:
        param.device_id = device_id
    return param


# (flag, solver file, GPUs on the machine) -> device, or the error's words
CASES = [
    (None, None, 0, CPU),
    (None, None, 2, CPU),
    (None, solver(), 2, CPU),  # solver_mode unset: its default (GPU) chooses nothing
    (None, solver(device_id=1), 2, CPU),
    (None, solver("CPU", 1), 2, CPU),
    (None, solver("GPU"), 2, cuda(0)),
    (None, solver("GPU", 1), 2, cuda(1)),
    (None, solver("GPU", 1), 0, CPU),  # no CUDA: the file's one GPU falls back, with a warning
    (None, solver("GPU", 3), 2, "there is no GPU 3"),
    ("1", solver("GPU", 0), 2, cuda(1)),  # the flag wins
    ("none", solver("GPU", 1), 2, CPU),
    ("cpu", None, 2, CPU),
    ("", solver("GPU", 1), 2, cuda(1)),  # an empty flag is no flag
    ("0", None, 0, CPU),
    ("all", None, 2, cuda(0)),
    ("all", None, 0, "no CUDA device is available"),
    ("1,0", None, 2, cuda(1)),  # one process: the first listed
    ("0,1", None, 0, "no CUDA device is available"),
    ("x", None, 2, "expected GPU ids"),
    (torch.device("cuda", 1), solver("GPU", 0), 2, cuda(1)),  # code gives a device: it wins
    (torch.device("cpu"), solver("GPU", 0), 2, CPU),  # pycaffe's set_mode_cpu
]


@pytest.mark.parametrize("flag,param,gpus,expected", CASES)
def test_device_choice_follows_caffes_precedence(flag, param, gpus, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    if isinstance(expected, str):
        with pytest.raises(CaffeAlexError, match=expected):
            choose_device(flag, param)
    else:
        assert choose_device(flag, param) == expected


def test_the_spec_and_ids_training_uses(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert gpu_spec(None, solver("GPU", 2)) == "2" and gpu_spec("0,1", solver("GPU")) == "0,1"
    assert gpu_ids("all") == [0, 1, 2, 3] and gpu_ids(gpu_spec(None, solver())) == []
