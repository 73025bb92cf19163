"""Caffe's fillers (include/caffe/filler.hpp) against their formulas written out."""

from __future__ import annotations

import math

import pytest
import torch

from caffe_alex.errors import LayerConfigError
from caffe_alex.fillers import INT_MAX, blob_shape_problem, check_blob_shape, fill
from caffe_alex.proto import caffe_pb2


def filler(**kw) -> caffe_pb2.FillerParameter:
    return caffe_pb2.FillerParameter(**kw)


def test_default_is_constant_zero():
    assert torch.equal(fill((2, 3)), torch.zeros(2, 3))
    assert torch.equal(fill((4,), filler(type="constant", value=0.1)), torch.full((4,), 0.1))


def test_uniform_range():
    t = fill((1000,), filler(type="uniform", min=-2, max=3))
    assert t.min() >= -2 and t.max() <= 3 and t.std() > 1


def test_gaussian_moments():
    torch.manual_seed(0)
    t = fill((200, 500), filler(type="gaussian", mean=1.0, std=0.01))
    assert abs(t.mean().item() - 1.0) < 1e-3 and abs(t.std().item() - 0.01) < 1e-3


def test_sparse_gaussian_keeps_about_sparse_inputs_per_output():
    torch.manual_seed(0)
    t = fill((50, 400), filler(type="gaussian", std=1.0, sparse=10))
    # each weight is kept with probability sparse / num_outputs = 10 / 50
    assert abs((t != 0).float().mean().item() - 0.2) < 0.01


@pytest.mark.parametrize(
    "norm, n", [("FAN_IN", 48 * 9), ("FAN_OUT", 64 * 9), ("AVERAGE", (48 * 9 + 64 * 9) / 2)]
)
def test_xavier_and_msra_scale_from_caffe_fans(norm, n):
    # Caffe: fan_in = count / shape[0], fan_out = count / shape[1]
    torch.manual_seed(0)
    norm_value = caffe_pb2.FillerParameter.VarianceNorm.Value(norm)
    x = fill((64, 48, 3, 3), filler(type="xavier", variance_norm=norm_value))
    bound = math.sqrt(3.0 / n)
    assert x.abs().max() <= bound and x.abs().max() > 0.99 * bound
    m = fill((64, 48, 3, 3), filler(type="msra", variance_norm=norm_value))
    assert m.mean().abs() < 0.01 * math.sqrt(2.0 / n) * 5
    assert m.std().item() == pytest.approx(math.sqrt(2.0 / n), rel=0.02)


def test_positive_unitball_rows_sum_to_one():
    t = fill((6, 2, 3, 3), filler(type="positive_unitball"))
    assert (t >= 0).all()
    torch.testing.assert_close(t.reshape(6, -1).sum(1), torch.ones(6))


def test_bilinear_matches_caffe_formula():
    t = fill((2, 1, 4, 4), filler(type="bilinear"))
    f = math.ceil(4 / 2)
    c = (4 - 1) / (2.0 * f)
    for y in range(4):
        for x in range(4):
            expected = (1 - abs(x / f - c)) * (1 - abs(y / f - c))
            assert t[1, 0, y, x].item() == pytest.approx(expected)


def test_bad_fillers_are_rejected():
    with pytest.raises(LayerConfigError, match="unknown filler type 'nope'"):
        fill((2,), filler(type="nope"))
    with pytest.raises(LayerConfigError, match="does not support sparse"):
        fill((2, 2), filler(type="xavier", sparse=3))
    with pytest.raises(LayerConfigError, match="bilinear filler needs a 4-D blob"):
        fill((2, 3), filler(type="bilinear"))


@pytest.mark.parametrize(
    "shape,problem",
    [
        ((2, -1), "dimension -1 is negative"),
        ((INT_MAX + 1,), "dimension 2147483648 exceeds INT_MAX (2147483647), Caffe's limit"),
        (
            (1 << 16, 1 << 15),
            "2147483648 elements exceed INT_MAX (2147483647), Caffe's limit for a blob",
        ),
        (
            (96, 3, 4294967295, 4294967295),
            "dimension 4294967295 exceeds INT_MAX (2147483647), Caffe's limit",
        ),
        ((1,) * 33, "33 axes, more than Caffe's 32"),
        ((2, 1.5), "dimension 1.5 is not an integer"),
    ],
)
def test_shapes_past_caffes_blob_limits_are_refused_before_allocating(shape, problem, monkeypatch):
    assert blob_shape_problem(shape) == problem
    monkeypatch.setattr(torch, "empty", lambda *a, **k: pytest.fail("allocated"))
    with pytest.raises(LayerConfigError) as info:
        fill(shape, filler(type="gaussian"), what="learnable blob 3")
    assert str(info.value) == f"learnable blob 3 would have shape {list(shape)}: {problem}"


def test_shapes_at_caffes_limits_are_allowed():
    assert blob_shape_problem((INT_MAX,)) is None
    assert blob_shape_problem((1,) * 32) is None
    assert blob_shape_problem((0, INT_MAX, INT_MAX)) is None  # count 0: Caffe checks no more
    assert blob_shape_problem(()) is None
    assert check_blob_shape((torch.tensor(2).item(), True + 2), "b") == (2, 3)
    assert fill((0, INT_MAX, INT_MAX)).shape == (0, INT_MAX, INT_MAX)


@pytest.mark.parametrize(
    "params,message",
    [
        ("type: 'gaussian' std: -2147483648", "gaussian filler needs a finite std > 0"),
        ("type: 'gaussian' std: 0", "gaussian filler needs a finite std > 0"),
        ("type: 'gaussian' std: inf", "gaussian filler needs a finite std > 0"),
        ("type: 'gaussian' mean: nan", "gaussian filler needs a finite std > 0"),
        ("type: 'uniform' min: 1 max: 0", "uniform filler needs finite min <= max"),
        ("type: 'uniform' min: -inf max: 0", "uniform filler needs finite min <= max"),
    ],
)
def test_fillers_refuse_what_caffes_random_generators_check(params, message):
    from google.protobuf import text_format

    filler = text_format.Parse(params, caffe_pb2.FillerParameter())
    with pytest.raises(LayerConfigError, match=message):
        fill((2, 3), filler)
