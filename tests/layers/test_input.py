"""Input: declared shapes, one for all tops or one per top, fed from outside."""

from __future__ import annotations

import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import parse_net


def input_net(tops, shapes) -> str:
    top_text = " ".join(f'top: "{t}"' for t in tops)
    shape_text = " ".join("shape { " + " ".join(f"dim: {d}" for d in s) + " }" for s in shapes)
    return f'layer {{ name: "in" type: "Input" {top_text} input_param {{ {shape_text} }} }}'


def test_one_shape_for_every_top():
    net = Net(parse_net(input_net(["a", "b"], [(2, 3)])))
    assert net.input_names == ["a", "b"]
    assert net.blob_shapes == {"a": (2, 3), "b": (2, 3)}


def test_one_shape_per_top_and_binding():
    net = Net(parse_net(input_net(["a", "b"], [(2, 3), (4,)])))
    assert net.blob_shapes == {"a": (2, 3), "b": (4,)}
    a, b = torch.randn(2, 3), torch.randn(4)
    out = net(a, b=b)
    assert out["a"] is a and out["b"] is b  # inputs are passed through untouched


def test_shape_count_must_fit_the_tops():
    with pytest.raises(CaffeAlexError, match="input_param has 2 shapes for 3 tops"):
        Net(parse_net(input_net(["a", "b", "c"], [(1,), (2,)])))


def test_a_shape_is_needed_unless_declared_at_build():
    with pytest.raises(CaffeAlexError, match="input_param.shape is required"):
        Net(parse_net(input_net(["a"], [])))
    net = Net(parse_net(input_net(["a"], [])), input_shapes={"a": (5, 2)})
    assert net.blob_shapes["a"] == (5, 2)
