"""The checks Caffe makes while it builds a net, made by ours too, one case each:

- Blob::Reshape's limits on every inferred shape (each top, at build and at ``reshape``, every
  learnable and embedded blob before it is filled): no negative dimension, at most INT_MAX
  elements, at most 32 axes. Inputs are generated at the edges of those limits, and every
  numeric field of every layer type is set to extreme values: the build either succeeds or
  stops with one CaffeAlexError, never torch's own error, and nothing huge is allocated.
- Net::Init, AppendTop, AppendBottom, AppendParam and Layer::SetUp (src/caffe/net.cpp,
  include/caffe/layer.hpp): the wiring and parameter rules, with Caffe's exceptions (a top
  repeated in place, a layer's own phase).
"""

from __future__ import annotations

import pytest
import torch
from google.protobuf.descriptor import FieldDescriptor

from caffe_alex.errors import CaffeAlexError
from caffe_alex.fillers import INT_MAX
from caffe_alex.layers import layer_types
from caffe_alex.net import Net
from caffe_alex.proto import caffe_pb2
from caffe_alex.registry import get_layer_class
from tests.reference import parse_net


def input_layer(*dims: int, top: str = "data") -> str:
    shape = " ".join(f"dim: {d}" for d in dims)
    return (
        f'layer {{ name: "in" type: "Input" top: "{top}" input_param {{ shape {{ {shape} }} }} }}\n'
    )


def conv(params: str, bottom: str = "data") -> str:
    return (
        f'layer {{ name: "conv" type: "Convolution" bottom: "{bottom}" top: "conv"\n'
        f"  convolution_param {{ {params} }} }}\n"
    )


def build_file(tmp_path, text: str, **kwargs) -> Net:
    path = tmp_path / "net.prototxt"
    path.write_text('name: "checks"\n' + text)
    return Net.from_prototxt(str(path), **kwargs)


# -- Blob::Reshape's limits ----------------------------------------------------------------
SIZE_CASES = {
    "kernel_size 2^32 - 1": (
        input_layer(1, 3, 8, 8) + conv("num_output: 4 kernel_size: 4294967295"),
        "layer 'conv' (Convolution): learnable blob 0 would have shape "
        "[4, 3, 4294967295, 4294967295]: dimension 4294967295 exceeds INT_MAX",
    ),
    "pad 2^32 - 1": (
        input_layer(1, 3, 8, 8) + conv("num_output: 4 kernel_size: 3 pad: 4294967295"),
        "layer 'conv' (Convolution): top 'conv' (top 0) would have shape "
        "[1, 4, 8589934596, 8589934596]",
    ),
    "num_output 2e9": (
        input_layer(1, 3, 8, 8) + conv("num_output: 2000000000 kernel_size: 3"),
        "learnable blob 0 would have shape [2000000000, 3, 3, 3]: 54000000000 elements exceed "
        "INT_MAX (2147483647)",
    ),
    "bias of num_output 2^31": (
        input_layer(1, 1, 1, 1) + conv("num_output: 2147483648 kernel_size: 1"),
        "learnable blob 0 would have shape [2147483648, 1, 1, 1]: dimension 2147483648 exceeds",
    ),
    "input dim 2^40": (
        input_layer(2, 1 << 40),
        "layer 'in' (Input): top 'data' (top 0) would have shape [2, 1099511627776]",
    ),
    "input dim 2^31 + 1 (negative as int32)": (
        input_layer(1, 3, 2147483649, 4),
        "top 'data' (top 0) would have shape [1, 3, 2147483649, 4]: dimension 2147483649 exceeds",
    ),
    "negative input dim": (
        input_layer(1, 3, -5, 4),
        "top 'data' (top 0) would have shape [1, 3, -5, 4]: dimension -5 is negative",
    ),
    "count just past INT_MAX": (
        input_layer(2, 1 << 30),
        "2147483648 elements exceed INT_MAX (2147483647), Caffe's limit for a blob",
    ),
    "33 axes": (input_layer(*[1] * 33), "33 axes, more than Caffe's 32"),
    "inner product over a large bottom": (
        input_layer(1, 1 << 16, 1 << 14)
        + 'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"\n'
        "  inner_product_param { num_output: 2 } }\n",
        "layer 'fc' (InnerProduct): learnable blob 0 would have shape [2, 1073741824]: "
        "2147483648 elements exceed",
    ),
    "embedded blob of 2^40": (
        input_layer(2, 3) + 'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"\n'
        "  inner_product_param { num_output: 2 bias_term: false }\n"
        "  blobs { shape { dim: 1099511627776 } } }\n",
        "layer 'fc' (InnerProduct): embedded blob 0 would have shape [1099511627776]",
    ),
    "embedded blob with a negative dim": (
        input_layer(2, 3) + 'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"\n'
        "  inner_product_param { num_output: 2 bias_term: false }\n"
        "  blobs { shape { dim: -2 dim: -3 } data: [1, 2, 3, 4, 5, 6] } }\n",
        "embedded blob 0 would have shape [-2, -3]: dimension -2 is negative",
    ),
    "embedded blob short of data": (
        input_layer(2, 3) + 'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"\n'
        "  inner_product_param { num_output: 2 bias_term: false }\n"
        "  blobs { shape { dim: 2 dim: 3 } data: 1 } }\n",
        "embedded blob 0 holds 1 values for shape [2, 3]",
    ),
}


@pytest.mark.parametrize("text,message", SIZE_CASES.values(), ids=list(SIZE_CASES))
def test_sizes_past_caffes_limits_are_one_error_naming_layer_and_shape(tmp_path, text, message):
    with pytest.raises(CaffeAlexError) as info:
        build_file(tmp_path, text)
    error = info.value
    assert message in str(error)
    assert error.file.endswith("net.prototxt") and error.line is not None and error.layer


def test_a_blob_of_exactly_int_max_elements_is_allowed():
    net = Net(parse_net(input_layer(1, INT_MAX)))  # only shapes: nothing is allocated
    assert net.blob_shapes["data"] == (1, INT_MAX)
    zero = Net(parse_net(input_layer(0, INT_MAX, INT_MAX)))  # count 0: Caffe checks no more
    assert zero.blob_shapes["data"] == (0, INT_MAX, INT_MAX)


@pytest.mark.parametrize(
    "shape,message",
    [
        ((1, -3), "top 'data' (top 0) would have shape [1, -3]: dimension -3 is negative"),
        ((1 << 16, 1 << 16), "4294967296 elements exceed INT_MAX"),
        ((1, 1.5), "the shape given for input 'data' must be a sequence of integers"),
        ("3", "the shape given for input 'data' must be a sequence of integers"),
    ],
)
def test_declared_input_shapes_are_held_to_the_limits(shape, message):
    text = 'layer { name: "d" type: "Data" top: "data" data_param { batch_size: 2 } }\n'
    with pytest.raises(CaffeAlexError) as info:
        Net(parse_net(text), input_shapes={"data": shape})
    assert message in str(info.value)
    if "top 'data'" in message:
        assert info.value.layer == "d"


def test_reshape_checks_the_inputs_and_every_top():
    net = Net(parse_net(input_layer(2, 3) + 'layer { name: "t" type: "Tile" bottom: "data" '
                        'top: "t" tile_param { tiles: 1000000 } }\n'))  # fmt: skip
    with pytest.raises(CaffeAlexError, match=r"layer 'in' \(Input\): top 'data' .*-1 is neg"):
        net.reshape(data=(2, -1))
    with pytest.raises(CaffeAlexError, match=r"layer 't' \(Tile\): top 't' \(top 0\) would have "
                       r"shape \[2000, 3000000\]"):  # fmt: skip
        net.reshape(data=(2000, 3))
    assert net.blob_shapes["t"] == (2, 3000000)  # unchanged by the refused reshape


EXTREMES = {
    FieldDescriptor.TYPE_UINT32: (4294967295, 2147483648),
    FieldDescriptor.TYPE_INT32: (2147483647, -2147483648, -1),
    FieldDescriptor.TYPE_INT64: (1 << 40, -3),
    FieldDescriptor.TYPE_UINT64: (1 << 40,),
    FieldDescriptor.TYPE_FLOAT: (3e38, float("nan")),
}
# what a layer needs besides the field under test, so the test reaches the field
REQUIRED = {
    "convolution_param": "num_output: 4 kernel_size: 3",
    "pooling_param": "kernel_size: 2",
    "inner_product_param": "num_output: 4",
    "embed_param": "num_output: 4 input_dim: 10",
    "recurrent_param": "num_output: 4",
    "dummy_data_param": "shape { dim: 2 dim: 3 }",
}
SKIPPED = {"Python"}  # runs user code: tests/layers/test_python.py


def _extreme_cases():
    for kind in layer_types():
        cls = get_layer_class(kind)
        if kind in SKIPPED or (cls.is_source and kind != "DummyData"):
            continue
        for group in cls.params:
            fields = getattr(caffe_pb2.LayerParameter(), group).DESCRIPTOR.fields
            for field in fields:
                for value in EXTREMES.get(field.type, ()):
                    yield kind, group, field.name, field.is_repeated, value


def _net_with(kind, group, name, repeated, value) -> caffe_pb2.NetParameter:
    cls = get_layer_class(kind)
    text = input_layer(2, 3, 8, 8) + input_layer(2, top="label").replace('"in"', '"in2"')
    net = parse_net(text)
    layer = net.layer.add(name="L", type=kind)
    layer.bottom.extend(["data", "label", "data"][: cls.bottoms[0]])
    layer.top.extend(f"t{i}" for i in range(max(cls.tops[0], 1)))
    params = getattr(layer, group)
    if group in REQUIRED:
        required = parse_net(f"layer {{ {group} {{ {REQUIRED[group]} }} }}").layer[0]
        params.MergeFrom(getattr(required, group))
    field = getattr(params, name)
    if repeated:
        field.append(value)
    else:
        setattr(params, name, value)
    return net


@pytest.mark.slow
def test_extreme_numbers_in_every_layer_field_never_reach_torch():
    """Every numeric field of every layer type at INT_MAX, 2^32 - 1, -1, 2^40, 3e38, NaN...:
    built and run forward on a small input, the outcome is a result or one CaffeAlexError."""
    escaped, cases = [], 0
    for case in _extreme_cases():
        try:
            net_param = _net_with(*case)
        except (TypeError, ValueError):  # the field does not take this value (bounds)
            continue
        cases += 1
        try:
            net = Net(net_param, "TRAIN")
            with torch.no_grad():
                net(data=torch.rand(2, 3, 8, 8), label=torch.zeros(2))
        except CaffeAlexError:
            pass
        except Exception as exc:  # noqa: BLE001 -- the point: anything else is a finding
            escaped.append((*case, f"{type(exc).__name__}: {str(exc)[:120]}"))
    assert cases > 250
    assert not escaped, escaped


# -- Net::Init, AppendTop, AppendBottom, AppendParam, Layer::SetUp --------------------------
FC = "inner_product_param { num_output: 2 }"
DEFINITION_CASES = {
    # AppendTop: a name already produced, unless in place at the same index
    "top named twice": (
        input_layer(2, 3) + 'layer { name: "s" type: "Slice" bottom: "data" top: "x" top: "x" '
        "slice_param { axis: 1 slice_point: 1 } }\n",
        "layer 's' (Slice): top blob 'x' produced by multiple sources (named twice among this "
        "layer's tops)",
    ),
    "top already produced": (
        input_layer(2, 3) + 'layer { name: "r" type: "ReLU" bottom: "data" top: "y" }\n'
        'layer { name: "t" type: "TanH" bottom: "data" top: "y" }\n',
        "layer 't' (TanH): top blob 'y' produced by multiple sources (already by layer 'r')",
    ),
    "top in place at another index": (
        input_layer(2, 3) + 'layer { name: "s" type: "Slice" bottom: "data" top: "a" '
        'top: "data" slice_param { axis: 1 slice_point: 1 } }\n',
        "top blob 'data' produced by multiple sources (already by layer 'in')",
    ),
    # AppendBottom / InsertSplits: only blobs produced earlier, never an automatic top
    "unknown bottom": (
        input_layer(2, 3) + 'layer { name: "r" type: "ReLU" bottom: "dta" top: "r" }\n',
        "layer 'r' (ReLU): unknown bottom blob 'dta' (bottom index 0)",
    ),
    "bottom produced later": (
        input_layer(2, 3) + 'layer { name: "r" type: "ReLU" bottom: "later" top: "r" }\n'
        'layer { name: "l" type: "ReLU" bottom: "data" top: "later" }\n',
        "unknown bottom blob 'later' (bottom index 0)",
    ),
    "an automatic top as a bottom": (
        input_layer(2, 3)
        + input_layer(2, 3, top="t").replace('"in"', '"in2"')
        + 'layer { name: "loss" type: "EuclideanLoss" bottom: "data" bottom: "t" }\n'
        'layer { name: "r" type: "ReLU" bottom: "(loss automatic top 0)" top: "r" }\n',
        "unknown bottom blob '(loss automatic top 0)' (bottom index 0)",
    ),
    # Net::Init
    "propagate_down count": (
        input_layer(2, 3) + 'layer { name: "r" type: "ReLU" bottom: "data" top: "r" '
        "propagate_down: true propagate_down: false }\n",
        "propagate_down must be given once per bottom or not at all (2 for 1 bottoms)",
    ),
    "unknown type": (
        input_layer(2, 3) + 'layer { name: "m" type: "Mystery" bottom: "data" top: "m" }\n',
        "layer 'm' (Mystery): unknown layer type 'Mystery'",
    ),
    "too many param specs": (
        input_layer(2, 3) + f'layer {{ name: "fc" type: "InnerProduct" bottom: "data" '
        f'top: "fc" param {{ }} param {{ }} param {{ lr_mult: 3 }} {FC} }}\n',
        "layer 'fc' (InnerProduct): 3 param specs given for 2 learnable blob(s)",
    ),
    "param spec on a layer without blobs": (
        input_layer(2, 3) + 'layer { name: "r" type: "ReLU" bottom: "data" top: "r" '
        "param { lr_mult: 0 } }\n",
        "layer 'r' (ReLU): 1 param specs given for 0 learnable blob(s)",
    ),
    # Layer::SetUp: CheckBlobCounts (exact, min, max; conv: as many tops as bottoms)
    "exact bottom count": (
        input_layer(2, 3) + 'layer { name: "sm" type: "Softmax" bottom: "data" bottom: "data" '
        'top: "sm" }\n',
        "layer 'sm' (Softmax): takes 1 bottom blob(s), got 2",
    ),
    "minimum top count": (
        input_layer(2, 3) + 'layer { name: "s" type: "Slice" bottom: "data" }\n',
        "layer 's' (Slice): takes at least 1 top blob(s), got 0",
    ),
    "convolution tops per bottom": (
        input_layer(1, 2, 4, 4) + 'layer { name: "c" type: "Convolution" bottom: "data" '
        'bottom: "data" top: "c" convolution_param { num_output: 2 kernel_size: 1 } }\n',
        "layer 'c' (Convolution)",
    ),
    # Layer::SetLossWeights
    "loss_weight count": (
        input_layer(2, 3) + 'layer { name: "r" type: "ReLU" bottom: "data" top: "r" '
        "loss_weight: 1 loss_weight: 2 }\n",
        "loss_weight must be given once per top or not at all",
    ),
    # AppendParam: sharing
    "shared blob of another shape": (
        input_layer(2, 3)
        + f'layer {{ name: "a" type: "InnerProduct" bottom: "data" top: "a" param {{ name: "w" }} '
        f"{FC} }}\n"
        'layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" param { name: "w" } '
        "inner_product_param { num_output: 3 } }\n",
        "shared parameter 'w' (blob 0) has shape [3, 2], but owner layer 'a' has [2, 3]",
    ),
    "shared blob of another shape, a layer after it": (
        input_layer(2, 3)
        + f'layer {{ name: "a" type: "InnerProduct" bottom: "data" top: "a" param {{ name: "w" }} '
        f"{FC} }}\n"
        'layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" param { name: "w" } '
        "inner_product_param { num_output: 3 } }\n"
        'layer { name: "c" type: "ReLU" bottom: "b" top: "c" }\n',
        "shared parameter 'w' (blob 0) has shape [3, 2], but owner layer 'a' has [2, 3]",
    ),
    "shared blob with another lr_mult": (
        input_layer(2, 2) + f'layer {{ name: "a" type: "InnerProduct" bottom: "data" top: "a" '
        f'param {{ name: "w" lr_mult: 1 }} {FC} }}\n'
        f'layer {{ name: "b" type: "InnerProduct" bottom: "a" top: "b" '
        f'param {{ name: "w" lr_mult: 2 }} {FC} }}\n',
        "shared parameter 'w' has mismatched lr_mult",
    ),
}


@pytest.mark.parametrize("text,message", DEFINITION_CASES.values(), ids=list(DEFINITION_CASES))
def test_caffes_net_definition_checks(tmp_path, text, message):
    with pytest.raises(CaffeAlexError) as info:
        build_file(tmp_path, text)
    assert message in str(info.value)
    # the line is the named layer's own block (build_file adds a first line)
    lines = ('name: "checks"\n' + text).splitlines()
    block = [i for i, line in enumerate(lines, 1) if f'name: "{info.value.layer}"' in line]
    assert info.value.line == block[-1], (info.value.line, block, str(info.value))


def test_tops_repeated_in_place_are_allowed_as_in_caffe():
    # top i may name bottom i: here both tops are the in-place blob (Caffe accepts this)
    text = input_layer(1, 2, 3, 3) + (
        'layer { name: "c" type: "Convolution" bottom: "data" bottom: "data" top: "data" '
        'top: "data" convolution_param { num_output: 2 kernel_size: 1 } }\n'
    )
    net = Net(parse_net(text))
    assert net.blob_shapes["data"] == (1, 2, 3, 3)
    assert net.output_names == ["data"]


def test_param_specs_up_to_the_blob_count_are_fine():
    for specs in ("", "param { lr_mult: 2 }", "param { } param { decay_mult: 0 }"):
        text = input_layer(2, 3) + (
            f'layer {{ name: "fc" type: "InnerProduct" bottom: "data" top: "fc" {specs} {FC} }}'
        )
        assert len(Net(parse_net(text)).params["fc"]) == 2


def test_loss_layers_sharing_a_name_each_get_an_automatic_top():
    text = (
        input_layer(2, 3)
        + input_layer(2, 3, top="t").replace('"in"', '"in2"')
        + 'layer { name: "loss" type: "EuclideanLoss" bottom: "data" bottom: "t" }\n'
        'layer { name: "loss" type: "EuclideanLoss" bottom: "data" bottom: "t" '
        "loss_weight: 2 }\n"
    )
    net = Net(parse_net(text))
    x, t = torch.randn(2, 3), torch.randn(2, 3)
    net(data=x, t=t)
    torch.testing.assert_close(net.loss, 3 * ((x - t) ** 2).sum() / 4)
    assert net.output_names == []


def test_a_layers_own_phase_wins_over_the_nets():
    # Net::Init gives a layer the net's phase only where the layer sets none
    text = input_layer(1000) + (
        'layer { name: "drop" type: "Dropout" bottom: "data" top: "drop" phase: TRAIN }\n'
        'layer { name: "keep" type: "Dropout" bottom: "data" top: "keep" }\n'
    )
    net = Net(parse_net(text), "TEST")
    assert net.layer("drop").phase == "TRAIN" and net.layer("keep").phase == "TEST"
    out = net(torch.ones(1000))
    assert torch.equal(out["keep"], torch.ones(1000))
    assert set(out["drop"].unique().tolist()) == {0.0, 2.0}  # dropped or scaled by 1 / (1 - 0.5)
