"""A tiny net (Input -> InnerProduct -> EuclideanLoss) with fixed batches, and a NumPy
transcription of Caffe's solver formulas to check the Solver against."""

from __future__ import annotations

import numpy as np
import torch

from caffe_alex.formats.prototxt import parse_solver_text
from caffe_alex.solvers import Solver

f32 = np.float32
N, IN, OUT = 4, 3, 2


def ip_layer(name, bottom, top, num, params="", std=0.5):
    return (
        f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{top}" {params}'
        f' inner_product_param {{ num_output: {num} weight_filler {{ type: "gaussian" std: {std} }}'
        ' bias_filler { type: "uniform" min: -0.5 max: 0.5 } } }\n'
    )


def input_layer(x_dims=(N, IN), y_dims=(N, OUT)):
    dims = lambda d: " ".join(f"dim: {v}" for v in d)  # noqa: E731
    return (
        'layer { name: "data" type: "Input" top: "x" top: "y" input_param { '
        f"shape {{ {dims(x_dims)} }} shape {{ {dims(y_dims)} }} }} }}\n"
    )


LOSS = 'layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "y" top: "loss" }\n'


def tiny_net(params=""):
    return input_layer() + ip_layer("ip", "x", "out", OUT, params) + LOSS


def batches(count=40, seed=0, x_dims=(N, IN), y_dims=(N, OUT)):
    rng = np.random.default_rng(seed)
    return [
        {
            "x": torch.tensor(rng.normal(size=x_dims), dtype=torch.float32),
            "y": torch.tensor(rng.normal(size=y_dims), dtype=torch.float32),
        }
        for _ in range(count)
    ]


def make_solver(net_text, solver_text, data, **kw):
    text = f"net_param {{ {net_text} }}\nsolver_mode: CPU random_seed: 7\n{solver_text}"
    kw.setdefault("feeds", {"train": data, "test": []})
    return Solver(parse_solver_text(text), **kw)


# ---- the reference: Caffe's formulas written out in NumPy -------------------------------------


def ref_lr(p: dict, it: int, step: int) -> tuple[float, int]:
    policy, base = p["lr_policy"], f32(p["base_lr"])
    gamma, power = f32(p.get("gamma", 0)), f32(p.get("power", 0))
    if policy == "fixed":
        return base, step
    if policy == "step":
        step = it // p["stepsize"]
        return f32(np.float64(base) * np.float64(gamma) ** step), step
    if policy == "exp":
        return f32(np.float64(base) * np.float64(gamma) ** it), step
    if policy == "inv":
        return f32(base * (f32(1) + gamma * f32(it)) ** (-power)), step
    if policy == "multistep":
        values = p["stepvalue"]
        if step < len(values) and it >= values[step]:
            step += 1
        return f32(np.float64(base) * np.float64(gamma) ** step), step
    if policy == "poly":
        return f32(base * (f32(1) - f32(it) / f32(p["max_iter"])) ** power), step
    if policy == "sigmoid":
        return f32(base / (f32(1) + np.exp(-gamma * (f32(it) - f32(p["stepsize"]))))), step
    raise ValueError(policy)


class Reference:
    """Caffe's SGDSolver::ApplyUpdate and each ComputeUpdateValue, on float32 arrays."""

    def __init__(self, p: dict, params, lr_mults, decay_mults):
        self.p, self.w = p, [np.array(x, np.float32) for x in params]
        self.lr_mults, self.decay_mults = lr_mults, decay_mults
        sets = 2 if p.get("type") in ("AdaDelta", "Adam") else 1
        self.h = [np.zeros_like(x) for _ in range(sets) for x in self.w]
        self.it, self.step = 0, 0

    def update(self, grads):
        p, n = self.p, len(self.w)
        rate, self.step = ref_lr(p, self.it, self.step)
        g = [np.array(x, np.float32) for x in grads]
        clip = p.get("clip_gradients", -1)
        if clip >= 0:
            norm = np.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in g))
            if norm > clip:
                g = [x * f32(clip / norm) for x in g]
        for i in range(n):
            g[i] = g[i] * (f32(1) / f32(p.get("iter_size", 1)))
            decay = f32(p.get("weight_decay", 0)) * f32(self.decay_mults[i])
            reg = self.w[i] if p.get("regularization_type", "L2") == "L2" else np.sign(self.w[i])
            g[i] = g[i] + decay * reg
            lr = f32(rate) * f32(self.lr_mults[i])
            self.w[i] = self.w[i] - self.rule(i, g[i], lr)
        self.it += 1

    def rule(self, i, g, lr):
        p, n, h = self.p, len(self.w), self.h
        kind, mom = p.get("type", "SGD"), f32(p.get("momentum", 0))
        delta = f32(p.get("delta", 1e-8))
        if kind == "SGD":
            h[i] = mom * h[i] + lr * g
            return h[i]
        if kind == "Nesterov":
            old = h[i].copy()
            h[i] = mom * h[i] + lr * g
            return (f32(1) + mom) * h[i] - mom * old
        if kind == "AdaGrad":
            h[i] = h[i] + g * g
            return lr * (g / (np.sqrt(h[i]) + delta))
        if kind == "RMSProp":
            decay = f32(p.get("rms_decay", 0.99))
            h[i] = decay * h[i] + (f32(1) - decay) * g * g
            return lr * (g / (np.sqrt(h[i]) + delta))
        if kind == "AdaDelta":
            h[i] = mom * h[i] + (f32(1) - mom) * g * g
            dx = g * np.sqrt((h[n + i] + delta) / (h[i] + delta))
            h[n + i] = mom * h[n + i] + (f32(1) - mom) * dx * dx
            return lr * dx
        if kind == "Adam":
            b1, b2, t = mom, f32(p.get("momentum2", 0.999)), self.it + 1
            h[i] = b1 * h[i] + (f32(1) - b1) * g
            h[n + i] = b2 * h[n + i] + (f32(1) - b2) * g * g
            corr = f32(np.sqrt(1 - np.float64(b2) ** t) / (1 - np.float64(b1) ** t))
            return (lr * corr) * (h[i] / (np.sqrt(h[n + i]) + delta))
        raise ValueError(kind)


def ip_grads(w, b, x, y):
    """EuclideanLoss(x W^T + b, y) = sum((out - y)^2) / 2N: gradients of W and b."""
    x, y = np.float64(x), np.float64(y)
    dout = (x @ np.float64(w).T + np.float64(b) - y) / x.shape[0]
    return dout.T @ x, dout.sum(0)


def solver_text(p: dict) -> str:
    lines = []
    for key, value in p.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            lines.append(f'{key}: "{v}"' if isinstance(v, str) else f"{key}: {v}")
    return "\n".join(lines)
