"""Parameter and Embed: NumPy transcriptions of Caffe's forward and backward, float64
gradcheck, blob layouts and fillers, Caffe's checks, and .caffemodel files both ways (decoded
by protobuf, and encoded by hand).

OpenCV 4's Caffe importer has neither type (it raises "Can't create layer"), so there is no
OpenCV comparison here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.reference import assert_caffemodel_round_trip, gradcheck_net, parse_net, randomize


def parameter_net(shape_text: str = "shape { dim: 2 dim: 3 }") -> str:
    return f"""name: "parameter_test"
layer {{ name: "p" type: "Parameter" top: "p" parameter_param {{ {shape_text} }} }}
"""


def embed_net(params: str, in_shape=(2, 3)) -> str:
    dims = " ".join(f"dim: {d}" for d in in_shape)
    return f"""name: "embed_test"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}
layer {{ name: "embed" type: "Embed" bottom: "data" top: "out" embed_param {{ {params} }} }}
"""


def round_trip(text: str, tmp_path) -> None:
    assert_caffemodel_round_trip(lambda: Net(parse_net(text)), tmp_path)


# -- Parameter --------------------------------------------------------------------------------
def test_parameter_top_is_its_zero_blob():
    net = Net(parse_net(parameter_net()))
    (blob,) = net.params["p"]
    assert tuple(blob.shape) == (2, 3) and net.blob_shapes["p"] == (2, 3)
    assert torch.equal(blob, torch.zeros(2, 3))  # no filler: Caffe's fresh memory is zeroed
    top = net()["p"]
    assert torch.equal(top, blob)
    with torch.no_grad():
        blob.add_(1.5)
    assert torch.equal(top, torch.full((2, 3), 1.5))  # shares the blob's memory


def test_parameter_is_learnable():
    net = Net(parse_net(parameter_net()))
    weights = torch.arange(6.0).reshape(2, 3)
    (net()["p"] * weights).sum().backward()
    assert torch.equal(net.params["p"][0].grad, weights)


def test_parameter_shapes():
    assert Net(parse_net(parameter_net(""))).blob_shapes["p"] == ()  # 0 axes: one value
    net = Net(parse_net(parameter_net("shape { dim: 4 dim: 0 dim: 2 }")))
    assert tuple(net()["p"].shape) == (4, 0, 2)


@pytest.mark.parametrize(
    "shape_text,message",
    [
        ("shape { dim: 2 dim: -1 }", r"shape \[2, -1\]: dimension -1 is negative"),
        ("shape { " + "dim: 1 " * 33 + "}", "33 axes, more than Caffe's 32"),
        ("shape { dim: 65536 dim: 32768 }", "2147483648 elements exceed INT_MAX"),
    ],
)
def test_parameter_setup_errors(shape_text, message):
    with pytest.raises(CaffeAlexError, match=message) as info:
        Net(parse_net(parameter_net(shape_text)))
    assert "layer 'p' (Parameter)" in str(info.value)


def test_parameter_takes_no_bottom():
    text = parameter_net().replace('top: "p" parameter', 'bottom: "x" top: "p" parameter')
    with pytest.raises(CaffeAlexError, match="takes 0 bottom blob"):
        Net(parse_net(text))


def test_parameter_caffemodel_round_trip(tmp_path):
    round_trip(parameter_net(), tmp_path)
    round_trip(parameter_net(""), tmp_path)


# -- Embed ------------------------------------------------------------------------------------
def caffe_embed(x, weight, bias, dy=None):
    """EmbedLayer: top[n] = weight[int(x[n])] (+ bias); weight diff rows accumulate top diffs
    in order; bias diff = top diff summed over the inputs."""
    flat = x.reshape(-1)
    n_out = weight.shape[1]
    top = np.stack([weight[int(v)] for v in flat]).astype(np.float32)
    if bias is not None:
        top = top + bias
    top = top.reshape(*x.shape, n_out)
    if dy is None:
        return top, None, None
    d = dy.reshape(-1, n_out)
    dw = np.zeros_like(weight)
    for n, v in enumerate(flat):
        dw[int(v)] += d[n]
    db = d.astype(np.float64).sum(0) if bias is not None else None
    return top, dw, db


@pytest.mark.parametrize(
    "in_shape,bias_term,values",
    [
        ((2, 3), True, [0, 4, 4, 1, 4, 0]),  # repeated indices accumulate in backward
        ((5,), False, [3, 2, 1, 0, 2]),
        ((2, 1, 2), True, [1, 1, 1, 1]),
    ],
)
def test_embed_matches_caffe(in_shape, bias_term, values):
    params = f"num_output: 3 input_dim: 5 bias_term: {str(bias_term).lower()}"
    net = Net(parse_net(embed_net(params, in_shape)))
    randomize(net, seed=1)
    assert net.blob_shapes["out"] == (*in_shape, 3)
    weight = net.params["embed"][0].detach().numpy().copy()
    bias = net.params["embed"][1].detach().numpy().copy() if bias_term else None
    x = np.array(values, np.float32).reshape(in_shape)
    y = net(data=torch.from_numpy(x))["out"]
    top, _, _ = caffe_embed(x, weight, bias)
    np.testing.assert_array_equal(y.detach().numpy(), top)
    dy = np.random.default_rng(5).standard_normal(top.shape).astype(np.float32)
    y.backward(torch.from_numpy(dy))
    _, dw, db = caffe_embed(x, weight, bias, dy)
    np.testing.assert_array_equal(net.params["embed"][0].grad.numpy(), dw)
    if bias_term:
        np.testing.assert_allclose(net.params["embed"][1].grad.numpy(), db, rtol=1e-6)


def test_embed_blobs_and_fillers():
    net = Net(parse_net(embed_net("num_output: 4 input_dim: 7")))
    weight, bias = net.params["embed"]
    assert tuple(weight.shape) == (7, 4) and tuple(bias.shape) == (4,)  # K x N, transposed IP
    assert not weight.any() and not bias.any()  # Caffe's default filler: constant 0
    net = Net(
        parse_net(
            embed_net(
                "num_output: 4 input_dim: 7 weight_filler { type: 'constant' value: 2 } "
                "bias_filler { type: 'constant' value: -1 } bias_term: true"
            )
        )
    )
    assert torch.equal(net(data=torch.tensor([[6.0, 0, 1], [2, 3, 4]]))["out"], torch.ones(2, 3, 4))
    assert (
        len(
            Net(parse_net(embed_net("num_output: 4 input_dim: 7 bias_term: false"))).params["embed"]
        )
        == 1
    )


@pytest.mark.parametrize(
    "values,text",
    [
        ([0, 5, 1], "input value 5 (position 1) is out of range"),
        ([0, 1, -1], "input value -1 (position 2) is out of range"),
        ([1.5, 1, 2], "input value 1.5 (position 0) is not an integer"),
        ([0, float("nan"), 2], "input value nan (position 1) is not an integer"),
        ([0, float("inf"), 2], "input value inf (position 1) is out of range"),
    ],
)
def test_embed_refuses_bad_indices(values, text):
    net = Net(parse_net(embed_net("num_output: 2 input_dim: 5", (3,))))
    with pytest.raises(CaffeAlexError) as info:
        net(data=torch.tensor(values))
    message = str(info.value)
    assert message.startswith("layer 'embed' (Embed): ")
    assert text in message and "[0, 5) (embed_param.input_dim 5)" in message


def test_embed_refuses_backward_to_its_input():
    net = Net(parse_net(embed_net("num_output: 2 input_dim: 5", (3,))))
    x = torch.tensor([0.0, 4.0, 2.0], requires_grad=True)
    with pytest.raises(CaffeAlexError, match="layer 'embed' \\(Embed\\): cannot backpropagate"):
        net(data=x)["out"].sum().backward()
    net = Net(parse_net(embed_net("num_output: 2 input_dim: 5", (3,)).replace(
        "embed_param", "propagate_down: false embed_param")))  # fmt: skip
    net(data=x)["out"].sum().backward()
    assert x.grad is None and net.params["embed"][0].grad is not None


def test_embed_gradcheck():
    gradcheck_net(
        embed_net("num_output: 3 input_dim: 4", (2, 3)),
        inputs={"data": torch.tensor([[0.0, 3, 3], [1, 0, 3]])},
        check_inputs=[],
    )


@pytest.mark.parametrize(
    "params,message",
    [
        ("input_dim: 5", "embed_param.num_output must be positive"),
        ("num_output: 3", "embed_param.input_dim must be positive"),
    ],
)
def test_embed_setup_errors(params, message):
    with pytest.raises(CaffeAlexError, match=message) as info:
        Net(parse_net(embed_net(params)))
    assert "layer 'embed' (Embed)" in str(info.value)


def test_embed_caffemodel_round_trip(tmp_path):
    round_trip(embed_net("num_output: 3 input_dim: 5"), tmp_path)
    round_trip(embed_net("num_output: 3 input_dim: 5 bias_term: false"), tmp_path)
