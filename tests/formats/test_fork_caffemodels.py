"""Caffemodels written by forks: blobs matched by layer name, whatever a fork numbered its
parameters; NVIDIA/caffe's fp16 raw_data blobs.

Each file here is encoded by hand, field by field, as the fork's C++ would write it, so no
part of the reader under test produces its own input.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from caffe_alex.cli import main
from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.caffemodel import read_caffemodel
from caffe_alex.formats.prototxt import parse_net_text
from caffe_alex.net import Net
from tests.reference import varint


def field(number: int, wire: int, payload: bytes) -> bytes:
    head = varint(number << 3 | wire)
    return head + (varint(len(payload)) + payload if wire == 2 else payload)


def text(number: int, value: str) -> bytes:
    return field(number, 2, value.encode())


def blob(values: np.ndarray, *, fp16: bool = False) -> bytes:
    shape = field(1, 2, b"".join(varint(d) for d in values.shape))  # BlobShape.dim, packed
    if fp16:  # NVIDIA/caffe: raw_data_type (10) FLOAT16 = 2, raw_data (12)
        data = field(10, 0, varint(2)) + field(12, 2, values.astype("<f2").tobytes())
    else:
        data = field(5, 2, values.astype("<f4").tobytes())
    return data + field(7, 2, shape)


def layer(name: str, kind: str, bottoms, tops, blobs, *extra: bytes) -> bytes:
    body = text(1, name) + text(2, kind)
    body += b"".join(text(3, b) for b in bottoms) + b"".join(text(4, t) for t in tops)
    body += b"".join(field(7, 2, b) for b in blobs) + b"".join(extra)
    return field(100, 2, body)


RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
B = RNG.standard_normal(4).astype(np.float32)
FC = RNG.standard_normal((5, 4 * 8 * 8)).astype(np.float32)

# Parameters at the numbers forks gave them, each meaning something else in BVLC's proto:
COLLIDING = {
    # DeepLab's interp_param {height: 65 width: 65} at 143, BVLC's input_param
    "interp 143": field(143, 2, field(1, 0, varint(65)) + field(2, 0, varint(65))),
    # a fork's pooling ceil_mode: false at PoolingParameter 13, BVLC's round_mode
    "ceil_mode 13": field(121, 2, field(1, 0, varint(0)) + field(13, 0, varint(0))),
    # yjxiong's bn_param {slope_filler {type: "constant"}} at 137, BVLC's embed_param
    "bn 137": field(137, 2, field(1, 2, text(1, "constant")) + field(3, 5, b"\x00\x00\x80?")),
    # Microsoft/caffe's roi_pooling_param {pooled_h: 7 pooled_w: 7 spatial_scale: .0625} at 147
    "roi 147": field(
        147, 2, field(1, 0, varint(7)) + field(2, 0, varint(7)) + field(3, 5, b"\x00\x00\x80=")
    ),
    # Microsoft's psroi_pooling_param at 149 with its `required` output_dim missing
    "psroi 149": field(149, 2, field(1, 5, b"\x00\x00\x80=")),
    # SSD's prior_box_param at 203 and OpenCV's detection_output_param at 147
    "prior 203": field(203, 2, field(1, 5, b"\x00\x00\xf0A")),
    "detout 147": field(
        147, 2, field(1, 0, varint(21)) + field(4, 2, field(1, 5, b"\x9a\x99\x99>"))
    ),
    # a length-delimited value under BVLC's transform_param (100) that is no valid message
    "garbage 100": field(100, 2, b"\xff\xff\xff\xff\x0f"),
}

NET = """
name: "tiny"
input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
        inner_product_param { num_output: 5 bias_term: false } }
"""


def _model(extra: bytes, *, fp16: bool = False) -> bytes:
    return (
        text(1, "tiny")
        + layer("data", "Input", [], ["data"], [])
        + layer(
            "conv",
            "Convolution",
            ["data"],
            ["conv"],
            [blob(W, fp16=fp16), blob(B, fp16=fp16)],
            extra,
        )
        + layer("fc", "InnerProduct", ["conv"], ["fc"], [blob(FC, fp16=fp16)], extra)
    )


@pytest.mark.parametrize("case", sorted(COLLIDING))
def test_fork_numbered_parameters_never_break_a_load(tmp_path, case):
    path = tmp_path / "fork.caffemodel"
    path.write_bytes(_model(COLLIDING[case]))
    ws = read_caffemodel(path)
    assert [lw.name for lw in ws.layers] == ["data", "conv", "fc"]
    conv, fc = ws.layers[1], ws.layers[2]
    assert conv.type == "Convolution"
    np.testing.assert_array_equal(conv.blobs[0].data.reshape(W.shape), W)
    np.testing.assert_array_equal(conv.blobs[1].data, B)
    np.testing.assert_array_equal(fc.blobs[0].data.reshape(FC.shape), FC)
    net, _ = parse_net_text(NET)
    net = Net(net, "TEST")
    net.load_weights(str(path))
    np.testing.assert_array_equal(net.params["conv"][0].detach().numpy(), W)
    np.testing.assert_array_equal(net.params["fc"][0].detach().numpy(), FC)


def test_fp16_raw_data_blobs_read_as_their_values(tmp_path):
    path = tmp_path / "fp16.caffemodel"
    path.write_bytes(_model(b"", fp16=True))
    ws = read_caffemodel(path)
    got = ws.layers[1].blobs[0].data.reshape(W.shape)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, W.astype(np.float16).astype(np.float32))
    assert not np.array_equal(got, W)  # really the fp16 values, not a float32 copy
    out = CliRunner().invoke(main, ["inspect", str(path)])
    assert out.exit_code == 0, out.output
    assert "conv" in out.output and "4x3x3x3" in out.output


def test_raw_data_without_a_type_is_one_line(tmp_path):
    bad = field(12, 2, np.zeros(3, "<f2").tobytes()) + field(7, 2, field(1, 2, varint(3)))
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(text(1, "x") + layer("fc", "InnerProduct", ["a"], ["b"], [bad]))
    with pytest.raises(
        CaffeAlexError, match=r"bad.caffemodel: not a caffemodel .*raw_data with no raw_data_type"
    ):
        read_caffemodel(path)


def test_inspect_lists_a_fork_models_layers(tmp_path):
    path = tmp_path / "fork.caffemodel"
    path.write_bytes(_model(COLLIDING["interp 143"] + COLLIDING["psroi 149"]))
    out = CliRunner().invoke(main, ["inspect", str(path)])
    assert out.exit_code == 0, out.output
    rows = out.output.splitlines()
    assert any("conv" in r and "Convolution" in r and "4x3x3x3" in r for r in rows)
    assert any("fc" in r and "InnerProduct" in r and "5x256" in r for r in rows)
