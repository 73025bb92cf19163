"""Caffe's learning-rate policies (SGDSolver::GetLearningRate), with Caffe's float arithmetic.

``learning_rate(param, iter, current_step) -> (rate, current_step)``. Caffe computes in a mix
of float and double: ``pow(float, int)`` promotes to double (step, exp, multistep), while inv,
poly and sigmoid stay in float. The result is stored in a float (Dtype), so the rate returned
here is always a float32 value.
"""

from __future__ import annotations

import functools

import numpy as np

from ..errors import CaffeAlexError
from ..log import get_logger

POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")
f32 = np.float32


def check_policy(param) -> None:
    """Caffe's CHECKs of GetLearningRate, made up front instead of at the first iteration."""
    policy = param.lr_policy
    if policy not in POLICIES:
        what = f"unknown lr_policy '{policy}'" if policy else "lr_policy is not set"
        raise CaffeAlexError(f"{what}; known policies: {', '.join(POLICIES)}")
    if policy in ("step", "sigmoid") and param.stepsize <= 0:
        raise CaffeAlexError(f"lr_policy '{policy}' needs stepsize > 0 (got {param.stepsize})")
    if policy not in ("fixed", "poly") and param.gamma < 0:
        raise CaffeAlexError(f"lr_policy '{policy}' needs gamma >= 0 (got {param.gamma})")
    if policy == "poly" and param.max_iter <= 0:
        raise CaffeAlexError("lr_policy 'poly' needs max_iter > 0")


@functools.lru_cache(maxsize=256)
def _times_power(base_lr: float, gamma: float, exponent: int) -> float:
    # base_lr (float) * pow(float, int) (double) -> stored as float (remembered: a step or
    # multistep rate is asked for at every iteration, a captured chunk's eight at once)
    return float(f32(float(f32(base_lr)) * float(f32(gamma)) ** exponent))


def learning_rate(param, iter: int, current_step: int) -> tuple[float, int]:
    """The rate for iteration ``iter`` and the (possibly advanced) multistep position."""
    policy, base_lr = param.lr_policy, f32(param.base_lr)
    if policy == "fixed":
        return float(base_lr), current_step
    if policy == "step":
        current_step = iter // param.stepsize
        return _times_power(param.base_lr, param.gamma, current_step), current_step
    if policy == "exp":
        return _times_power(param.base_lr, param.gamma, iter), current_step
    if policy == "inv":
        inner = f32(1) + f32(param.gamma) * f32(iter)
        return float(base_lr * np.power(inner, -f32(param.power))), current_step
    if policy == "multistep":
        # one step per call at most, as Caffe: resuming past several stepvalues catches up
        # over the following iterations
        steps = param.stepvalue
        if current_step < len(steps) and iter >= steps[current_step]:
            current_step += 1
            get_logger().info("MultiStep Status: Iteration %d, step = %d", iter, current_step)
        return _times_power(param.base_lr, param.gamma, current_step), current_step
    if policy == "poly":
        left = f32(1) - f32(iter) / f32(param.max_iter)
        return float(base_lr * np.power(left, f32(param.power))), current_step
    if policy == "sigmoid":
        x = -f32(param.gamma) * (f32(iter) - f32(param.stepsize))
        with np.errstate(over="ignore"):  # exp overflowing to inf gives rate 0, as in C++
            return float(base_lr * (f32(1) / (f32(1) + np.exp(x)))), current_step
    check_policy(param)
    raise AssertionError("unreachable")
