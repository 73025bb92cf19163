"""The Solver's speed options, off by default: bf16/fp16 autocast (fp16 with loss scaling that
skips an overflowed update), channels_last, torch.compile; each against the float32 run."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.weights import read_weights
from caffe_alex.log import get_logger

from .helpers import make_solver

NET = """
layer { name: "data" type: "Input" top: "x" top: "label"
        input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } shape { dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "x" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3
                            weight_filler { type: "gaussian" std: 0.2 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool1" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.2 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""
SOLVER = 'base_lr: 0.05 momentum: 0.9 weight_decay: 0.001 lr_policy: "fixed" max_iter: 6'


def _batches(count=6):
    gen = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(4, 3, 8, 8, generator=gen),
             "label": torch.randint(0, 3, (4,), generator=gen).float()}
            for _ in range(count)]  # fmt: skip


def _train(steps=6, **options):
    solver = make_solver(NET, SOLVER, _batches(), **options)
    solver.step(steps)
    return solver


def _params(solver) -> list[np.ndarray]:
    return [p.detach().float().numpy().copy() for p in solver.train_net.parameters()]


@pytest.fixture(scope="module")
def fp32():
    return _params(_train())


def _close(ours, reference, rtol):
    for x, y in zip(ours, reference):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * float(np.abs(y).max()))


def _near(ours, reference, tolerance):
    """Relative distance of each parameter (as a whole) from the float32 run's."""
    for x, y in zip(ours, reference):
        assert np.linalg.norm(x - y) <= tolerance * np.linalg.norm(y)


def test_channels_last_keeps_the_numbers_and_the_files(fp32, tmp_path):
    solver = _train(channels_last=True)
    weight = solver.train_net.params["conv1"][0]
    assert weight.is_contiguous(memory_format=torch.channels_last)
    _close(_params(solver), fp32, 1e-5)
    path = tmp_path / "cl.caffemodel"
    solver.train_net.save_weights(str(path))  # written in Caffe's NCHW order all the same
    saved = [b.data for lw in read_weights(str(path)).layers for b in lw.blobs if b is not None]
    assert np.array_equal(saved[0].ravel(), weight.detach().numpy().ravel())


def test_bf16_autocast_runs_the_layers_in_bf16(fp32):
    solver = _train(precision="bf16")
    assert solver.train_net.blobs["conv1"].dtype == torch.bfloat16
    assert solver.train_net.params["conv1"][0].dtype == torch.float32  # the update stays fp32
    ours = _params(solver)
    assert not np.array_equal(ours[0], fp32[0])
    _near(ours, fp32, 5e-2)


def test_fp16_scales_the_loss_and_skips_an_overflowed_update(caplog):
    solver = make_solver(NET, SOLVER, _batches(), precision="fp16")
    start, skipped = _params(solver), 0
    # GradScaler starts at 2**16 and halves the scale on each overflow
    solver.step(1)
    while all(np.array_equal(x, y) for x, y in zip(_params(solver), start)):
        skipped += 1
        assert skipped < 5
        solver.step(1)
    assert solver.train_net.blobs["conv1"].dtype == torch.float16
    reference = make_solver(NET, SOLVER, _batches()[skipped:])  # the batch of the first update
    reference.step(1)
    _near(_params(solver), _params(reference), 1e-2)  # the unscaled update is fp32's

    def overflow():
        solver.train_net.params["ip"][0].grad[0, 0] = float("inf")

    scale, before, iteration = solver.precision.scaler.get_scale(), _params(solver), solver.iter
    solver.gradient_hooks.append(overflow)
    get_logger().propagate = True  # let caplog see the warning
    try:
        with caplog.at_level(logging.WARNING, logger="caffe_alex"):
            solver.step(1)
    finally:
        get_logger().propagate = False
    assert solver.iter == iteration + 1 and solver.precision.scaler.get_scale() == scale / 2
    assert all(np.array_equal(x, y) for x, y in zip(_params(solver), before))
    assert f"Iteration {iteration}: fp16 gradients overflowed; update skipped" in caplog.text


def test_compile_gives_the_eager_numbers(fp32):
    # aot_eager traces forward and backward like inductor without generating C++ (no compiler
    # needed here); the default backend is inductor
    solver = _train(compile="aot_eager")
    _close(_params(solver), fp32, 1e-5)


def test_unknown_precision_is_refused():
    with pytest.raises(CaffeAlexError, match="unknown precision 'fp8'"):
        make_solver(NET, SOLVER, _batches(), precision="fp8")
