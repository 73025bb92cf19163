"""Each solver type and lr policy against a NumPy transcription of Caffe's formulas, weights
compared after every step (tests/solvers/helpers.py holds the reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError

from .helpers import (
    LOSS,
    Reference,
    batches,
    input_layer,
    ip_grads,
    ip_layer,
    make_solver,
    solver_text,
    tiny_net,
)

STEPS = 6
BASE = {"lr_policy": "fixed", "base_lr": 0.1, "max_iter": 100}


def run_tiny(p: dict, params="", lr_mults=(1, 1), decay_mults=(1, 1), steps=STEPS):
    data = batches()
    solver = make_solver(tiny_net(params), solver_text(p), data)
    w, b = (t.detach().numpy().copy() for t in solver.train_net.params["ip"])
    ref = Reference(p, [w, b], lr_mults, decay_mults)
    used = 0
    for _ in range(steps):
        grads = [np.zeros_like(w), np.zeros_like(b)]
        for _ in range(p.get("iter_size", 1)):
            gw, gb = ip_grads(ref.w[0], ref.w[1], data[used]["x"], data[used]["y"])
            grads[0] += gw
            grads[1] += gb
            used += 1
        ref.update(grads)
        solver.step(1)
        got = [t.detach().numpy() for t in solver.train_net.params["ip"]]
        for mine, want in zip(got, ref.w):
            np.testing.assert_allclose(mine, want, rtol=2e-6, atol=2e-7)
    return solver, ref


@pytest.mark.parametrize(
    "extra",
    [
        {"type": "SGD", "momentum": 0.9, "weight_decay": 0.01},
        {"type": "Nesterov", "momentum": 0.9, "weight_decay": 0.01},
        {"type": "AdaGrad", "weight_decay": 0.01, "delta": 1e-6},
        {"type": "RMSProp", "weight_decay": 0.01, "rms_decay": 0.9},
        {"type": "AdaDelta", "momentum": 0.95, "delta": 1e-6, "base_lr": 1.0},
        {"type": "Adam", "momentum": 0.9, "momentum2": 0.999, "weight_decay": 0.01},
    ],
    ids=lambda e: e["type"],
)
def test_solver_types(extra):
    solver, ref = run_tiny({**BASE, **extra})
    for mine, want in zip(solver.rule.history, ref.h):  # the history Caffe would snapshot
        np.testing.assert_allclose(mine.numpy(), want, rtol=1e-5, atol=1e-7)


POLICIES = [
    {"lr_policy": "fixed"},
    {"lr_policy": "step", "gamma": 0.1, "stepsize": 2},
    {"lr_policy": "exp", "gamma": 0.8},
    {"lr_policy": "inv", "gamma": 0.5, "power": 0.75},
    {"lr_policy": "multistep", "gamma": 0.5, "stepvalue": [1, 2, 4]},
    {"lr_policy": "poly", "power": 2.0, "max_iter": 8},
    {"lr_policy": "sigmoid", "gamma": 0.5, "stepsize": 3},
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p["lr_policy"])
def test_lr_policies_through_momentum(policy):
    # the rate lives inside SGD's history: a changing rate leaves old momentum at its old rate
    p = {**BASE, "type": "SGD", "momentum": 0.9, "base_lr": 0.2, **policy}
    solver, ref = run_tiny(p)
    assert solver.current_step == ref.step


def test_momentum_across_step_change_differs_from_torch_optim():
    p = {**BASE, "type": "SGD", "momentum": 0.9, "lr_policy": "step", "gamma": 0.1, "stepsize": 2}
    solver, ref = run_tiny(p, steps=4)
    data = batches()
    # torch.optim.SGD scales the whole velocity by the new rate: a different trajectory
    solver2 = make_solver(tiny_net(), solver_text(p), data)
    params = list(solver2.train_net.params["ip"])
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for it in range(4):
        for group in opt.param_groups:
            group["lr"] = 0.1 * 0.1 ** (it // 2)
        opt.zero_grad()
        solver2.train_net(**data[it])
        solver2.train_net.loss.backward()
        opt.step()
    gap = np.abs(params[0].detach().numpy() - ref.w[0]).max()
    assert gap > 1e-3


def test_iter_size_accumulates_and_normalizes():
    run_tiny({**BASE, "type": "SGD", "momentum": 0.9, "iter_size": 3, "weight_decay": 0.01})


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_l1_regularization(kind):
    run_tiny({**BASE, "type": kind, "momentum": 0.9, "weight_decay": 0.05,
              "regularization_type": "L1"})  # fmt: skip


def test_clip_gradients():
    solver, _ = run_tiny({**BASE, "type": "SGD", "momentum": 0.5, "clip_gradients": 0.05})


def test_lr_and_decay_mults():
    params = "param { lr_mult: 0.5 decay_mult: 2 } param { lr_mult: 2 decay_mult: 0 }"
    run_tiny({**BASE, "type": "SGD", "momentum": 0.9, "weight_decay": 0.1}, params,
             lr_mults=(0.5, 2), decay_mults=(2, 0))  # fmt: skip


@pytest.mark.parametrize("kind", ["SGD", "AdaGrad", "Adam", "AdaDelta"])
def test_frozen_layer_stays_bit_identical(kind):
    frozen = "param { lr_mult: 0 } param { lr_mult: 0 }"
    net = input_layer() + ip_layer("ip1", "x", "h", 3, frozen) + ip_layer("ip", "h", "out", 2)
    p = {**BASE, "type": kind, "weight_decay": 0.1, "delta": 1e-6}
    if kind in ("SGD", "Adam", "AdaDelta"):
        p["momentum"] = 0.9
    data = batches()
    solver = make_solver(net + LOSS, solver_text(p), data)
    before = [t.detach().clone() for t in solver.train_net.params["ip1"]]
    w1, b1 = (t.numpy() for t in before)
    w, b = (t.detach().numpy().copy() for t in solver.train_net.params["ip"])
    ref = Reference(p, [w, b], (1, 1), (1, 1))
    for it in range(STEPS):
        h = np.float32(np.float64(data[it]["x"]) @ np.float64(w1).T + b1)
        ref.update(ip_grads(ref.w[0], ref.w[1], h, data[it]["y"]))
        solver.step(1)
        for mine, want in zip(solver.train_net.params["ip"], ref.w):
            np.testing.assert_allclose(mine.detach().numpy(), want, rtol=1e-5, atol=1e-6)
    for mine, old in zip(solver.train_net.params["ip1"], before):
        assert torch.equal(mine, old)


def test_shared_parameter_updates_once():
    # two layers share W ("w"); each has its own bias; W's gradient is the sum of both uses
    shared = 'param { name: "w" } param { }'
    loss2 = 'layer { name: "loss2" type: "EuclideanLoss" bottom: "out2" bottom: "y" top: "l2" }'
    net = (input_layer() + ip_layer("ipa", "x", "out", 2, shared)
           + ip_layer("ipb", "x", "out2", 2, shared) + LOSS + loss2)  # fmt: skip
    p = {**BASE, "type": "SGD", "momentum": 0.9, "weight_decay": 0.01}
    data = batches()
    solver = make_solver(net, solver_text(p), data)
    assert len(solver.learnable) == 3
    w, ba = (t.detach().numpy().copy() for t in solver.train_net.params["ipa"])
    bb = solver.train_net.params["ipb"][1].detach().numpy().copy()
    ref = Reference(p, [w, ba, bb], (1, 1, 1), (1, 1, 1))
    for it in range(STEPS):
        x, y = data[it]["x"], data[it]["y"]
        gwa, gba = ip_grads(ref.w[0], ref.w[1], x, y)
        gwb, gbb = ip_grads(ref.w[0], ref.w[2], x, y)
        ref.update([gwa + gwb, gba, gbb])
        solver.step(1)
        got = [solver.train_net.params["ipa"][0], solver.train_net.params["ipa"][1],
               solver.train_net.params["ipb"][1]]  # fmt: skip
        for mine, want in zip(got, ref.w):
            np.testing.assert_allclose(mine.detach().numpy(), want, rtol=2e-6, atol=2e-7)
    assert solver.train_net.params["ipb"][0] is solver.train_net.params["ipa"][0]


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"type": "Foo"}, "solver type 'Foo'"),
        ({"regularization_type": "L3"}, "regularization_type 'L3'"),
        ({"lr_policy": "cosine"}, "lr_policy 'cosine'"),
        ({"lr_policy": "step"}, "stepsize"),
        ({"type": "AdaGrad", "momentum": 0.9}, "momentum"),
        ({"type": "RMSProp", "rms_decay": 1.5}, "rms_decay"),
        ({"iter_size": 0}, "iter_size"),
        ({"average_loss": 0}, "average_loss"),
        ({"snapshot": 5}, "snapshot_prefix"),
    ],
)
def test_bad_settings_name_the_field(extra, words):
    with pytest.raises(CaffeAlexError, match=words.replace("(", r"\(")):
        make_solver(tiny_net(), solver_text({**BASE, **extra}), batches(2))
