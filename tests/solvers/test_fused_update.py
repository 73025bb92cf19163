"""The update over all blobs at once (torch._foreach_*) gives, bit for bit, what Caffe's
ApplyUpdate loop gives one blob at a time: normalise, regularise, the rule's
ComputeUpdateValue, subtract. The loop is written out here; both start from the same weights
and see the same gradients, with blobs of different lr_mult and decay_mult."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.formats.prototxt import parse_solver_text
from caffe_alex.solvers import Solver
from caffe_alex.solvers.lr_policy import learning_rate

f32 = np.float32
NET = """
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }
layer { name: "a" type: "InnerProduct" bottom: "x" top: "a"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 }
    bias_filler { type: "uniform" min: -0.5 max: 0.5 } } }
layer { name: "b" type: "InnerProduct" bottom: "a" top: "b"
  param { lr_mult: 0.5 decay_mult: 3 } param { lr_mult: 1 decay_mult: 0.5 }
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 }
    bias_filler { type: "uniform" min: -0.5 max: 0.5 } } }
"""
RULES = {
    "SGD": "momentum: 0.9",
    "Nesterov": "momentum: 0.9",
    "AdaGrad": "delta: 1e-6",
    "RMSProp": "rms_decay: 0.9 delta: 1e-6",
    "AdaDelta": "momentum: 0.95 delta: 1e-6",
    "Adam": "momentum: 0.9 momentum2: 0.999 delta: 1e-8",
}


def solver(kind: str, extra: str) -> Solver:
    text = (f"net_param {{ {NET} }}\ntype: \"{kind}\" {RULES[kind]} {extra}\nbase_lr: 0.1 "
            'lr_policy: "step" gamma: 0.5 stepsize: 2 max_iter: 10 solver_mode: CPU '
            "random_seed: 5")  # fmt: skip
    return Solver(parse_solver_text(text), feeds={"train": iter(()), "test": []})


def caffe_loop(s: Solver) -> None:
    """SGDSolver::ApplyUpdate as Caffe runs it: blob by blob."""
    p = s.param
    rate, s.current_step = learning_rate(p, s.iter, s.current_step)
    s.rule.iter = s.iter
    with torch.no_grad():
        for i, info in enumerate(s.learnable):
            grad = info.param.grad
            if p.iter_size != 1:
                grad.mul_(float(f32(1) / f32(p.iter_size)))
            decay = float(f32(p.weight_decay) * f32(info.decay_mult))
            if decay:
                data = info.param if p.regularization_type == "L2" else info.param.sign()
                grad.add_(data, alpha=decay)
            s.rule.compute_update(i, rate)
            info.param.sub_(grad)
    s.iter += 1


@pytest.mark.parametrize("kind", sorted(RULES))
@pytest.mark.parametrize("extra", ["weight_decay: 0.01", 'weight_decay: 0.02 '
                                   'regularization_type: "L1" iter_size: 2'])  # fmt: skip
def test_the_fused_update_is_caffes_loop_bit_for_bit(kind, extra):
    fused, loop = solver(kind, extra), solver(kind, extra)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        for a, b in zip(fused.learnable, loop.learnable):
            assert torch.equal(a.param, b.param)
            grad = torch.randn(a.param.shape, generator=gen)
            a.param.grad, b.param.grad = grad.clone(), grad.clone()
        fused.apply_update()
        caffe_loop(loop)
    for a, b in zip(fused.learnable, loop.learnable):
        assert torch.equal(a.param, b.param)
        assert torch.equal(a.param.grad, b.param.grad)  # the diff holds the update, as Caffe's
    for a, b in zip(fused.rule.history, loop.rule.history):
        assert torch.equal(a, b)
