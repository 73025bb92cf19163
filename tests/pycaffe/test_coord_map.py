"""caffe_alex.pycaffe.coord_map as pycaffe's caffe.coord_map. The maps are checked by hand on
small fake tops that have only what pycaffe's net spec tops have (``top.fn.type_name``,
``.params``, ``.inputs``), so these run without net_spec; pycaffe's own test cases
(test_coord_map.py) then run on real net spec tops when caffe_alex.pycaffe.net_spec imports."""

from __future__ import annotations

import numpy as np
import pytest

from caffe_alex.pycaffe import coord_map as cm


# ---- fake net spec tops -----------------------------------------------------------------------
class FakeTop:
    def __init__(self, fn, n=0):
        self.fn, self.n = fn, n

    def __eq__(self, other):  # a top that compares by value must still be walked by identity
        return True

    __hash__ = None


class FakeFunction:
    def __init__(self, type_name, inputs, params, ntop=1):
        self.type_name, self.inputs, self.params, self.ntop = type_name, inputs, params, ntop
        self.tops = tuple(FakeTop(self, n) for n in range(ntop))


def fake(type_name, *bottoms, ntop=1, **params):
    fn = FakeFunction(type_name, bottoms, params, ntop)
    return fn.tops[0] if ntop == 1 else fn.tops


def fcn_chain(pad=100, pool=2, dstride=2, dpad=0):
    """data -> conv 3x3 (pad) -> max pool -> deconv (kernel 2 x stride), as FCN's score path."""
    data = fake("Input", shape=dict(dim=[1, 3, 100, 100]))
    conv = fake("Convolution", data, num_output=8, kernel_size=3, pad=pad)
    pooled = fake("Pooling", conv, pool=0, kernel_size=pool, stride=pool)
    deconv = fake("Deconvolution", pooled, convolution_param=dict(
        num_output=8, kernel_size=2 * dstride, stride=dstride, pad=dpad))  # fmt: skip
    return data, conv, pooled, deconv


def assert_map(got, axis, a, b):
    assert got[0] == axis
    np.testing.assert_array_equal(np.broadcast_to(got[1], np.shape(a)), a)
    np.testing.assert_array_equal(np.broadcast_to(got[2], np.shape(b)), b)


# ---- the pure functions -----------------------------------------------------------------------
def test_conv_params():
    conv = fake("Convolution", kernel_size=3, dilation=2).fn
    axis, stride, kernel, pad = cm.conv_params(conv)
    assert axis == 1 and list(stride) == [1] and list(pad) == [0]
    assert list(kernel) == [5]  # (3 - 1) * 2 + 1
    nested = fake("Convolution", num_output=4, convolution_param=dict(
        kernel_size=[3, 5], stride=[1, 2], pad=[0, 10], axis=2)).fn  # fmt: skip
    axis, stride, kernel, pad = cm.conv_params(nested)
    assert axis == 2 and list(stride) == [1, 2] and list(kernel) == [3, 5] and list(pad) == [0, 10]
    pool = fake("Pooling", pooling_param=dict(kernel_size=3, stride=2)).fn
    assert [list(v) for v in cm.conv_params(pool)[1:]] == [[2], [3], [0]]


def test_conv_params_refusals():
    for params in (dict(kernel_h=3, kernel_w=3), dict(convolution_param=dict(pad_h=1))):
        with pytest.raises(AssertionError, match="legacy"):
            cm.conv_params(fake("Convolution", kernel_size=3, **params).fn)
    with pytest.raises(cm.UndefinedMapException):
        cm.conv_params(fake("Pooling", pool=1, global_pooling=True).fn)


def test_crop_params():
    axis, offset = cm.crop_params(fake("Crop").fn)
    assert axis == 2 and list(offset) == [0]
    axis, offset = cm.crop_params(fake("Crop", crop_param=dict(axis=1, offset=[0, 3, 4])).fn)
    assert axis == 1 and list(offset) == [0, 3, 4]


def test_coord_map_per_layer_by_hand():
    # conv: output j is centred on input j * stride - pad + (k - 1) / 2
    assert_map(cm.coord_map(fake("Convolution", kernel_size=3).fn), 1, [1], [-1])
    assert_map(cm.coord_map(fake("Convolution", kernel_size=3, stride=2, pad=1).fn), 1, [0.5], [0])
    assert_map(cm.coord_map(fake("Pooling", kernel_size=2, stride=2).fn), 1, [0.5], [-0.25])
    assert_map(cm.coord_map(fake("Im2col", kernel_size=5, pad=2).fn), 1, [1], [0])
    # deconv: the converse, scale stride and shift (k - 1) / 2 - pad
    assert_map(cm.coord_map(fake("Deconvolution", kernel_size=4, stride=2).fn), 1, [2], [1.5])
    padded = fake("Deconvolution", kernel_size=4, stride=2, pad=1).fn
    assert_map(cm.coord_map(padded), 1, [2], [0.5])
    assert cm.coord_map(fake("ReLU").fn) == (None, 1, 0)
    assert cm.coord_map(fake("Eltwise").fn) == (None, 1, 0)
    # crop: the map's axis is the one before Crop's first cropped axis
    assert_map(cm.coord_map(fake("Crop", axis=2, offset=5).fn), 1, 1, [-5])
    for kind in ("InnerProduct", "Input", "Reshape"):
        with pytest.raises(cm.UndefinedMapException):
            cm.coord_map(fake(kind).fn)


def test_compose_and_inverse():
    assert cm.compose((1, 2, 3), (1, 5, 7)) == (1, 10, 17)  # 2 * (5x + 7) + 3
    assert cm.compose((None, 1, 0), (2, 3, 4)) == (2, 3, 4)
    assert cm.compose((2, 3, 4), (None, 1, 0)) == (2, 3, 4)
    with pytest.raises(cm.AxisMismatchException):
        cm.compose((1, 1, 0), (2, 1, 0))
    assert cm.inverse((1, 2, 3)) == (1, 0.5, -1.5)
    m = (1, np.array([2.0, 4.0]), np.array([3.0, -1.0]))
    assert_map(cm.compose(m, cm.inverse(m)), 1, [1, 1], [0, 0])


# ---- walking the graph (fake tops) ------------------------------------------------------------
def test_fcn_chain_by_hand():
    # deconv <- pool <- conv <- data, each map from the blob's coordinates to deconv's:
    #   pool: (2, 1.5); conv: 2 * (x / 2 - 0.25) + 1.5 = x + 1; data: (x + 99) + 1 = x + 100
    data, _, _, deconv = fcn_chain()
    assert_map(cm.coord_map_from_to(deconv, data), 1, [1], [-100])
    assert_map(cm.coord_map_from_to(data, deconv), 1, [1], [100])
    assert_map(cm.coord_map_from_to(deconv, deconv), None, 1, 0)


def test_crop_of_fcn_chain(monkeypatch):
    made = []

    class FakeLayers:
        def Crop(self, *bottoms, **params):
            made.append((bottoms, params))
            return "crop top"

    monkeypatch.setattr(cm.net_spec, "layers", FakeLayers())
    data, _, _, deconv = fcn_chain()
    assert cm.crop(deconv, data) == "crop top"
    (bottoms, params), = made  # fmt: skip
    assert bottoms[0] is deconv and bottoms[1] is data
    assert params == {"crop_param": {"axis": 2, "offset": [100]}}
    assert all(type(v) is int for v in params["crop_param"]["offset"])
    # then mapping through that Crop: the offset is gone
    cropped = fake("Crop", deconv, data, **params)
    assert_map(cm.coord_map_from_to(cropped, data), 1, [1], [0])
    # only point-wise layers between: no axis to name, Crop's default is used
    made.clear()
    cm.crop(fake("ReLU", data), data)
    assert made[0][1] == {"crop_param": {"offset": [0]}}


def test_crop_refusals():
    data, _, _, deconv = fcn_chain(pool=3, dstride=2)  # 3x down, 2x up
    with pytest.raises(AssertionError, match="scale"):
        cm.crop(deconv, data)
    data, _, _, deconv = fcn_chain(pad=0, dpad=10)  # smaller than the input
    with pytest.raises(AssertionError, match="negative"):
        cm.crop(deconv, data)
    data = fake("Input")
    shifted = fake("Pooling", fake("Deconvolution", data, kernel_size=4, stride=2),
                   kernel_size=2, stride=2)  # fmt: skip
    assert_map(cm.coord_map_from_to(shifted, data), 1, [1], [-0.5])
    with pytest.raises(AssertionError, match="fractional"):
        cm.crop(shifted, data)


def test_walks_the_first_crop_bottom_only_and_stops_at_unmapped():
    data, aux = fake("Input"), fake("Input")
    _, _, _, deconv = fcn_chain()
    cropped = fake("Crop", deconv, aux)
    with pytest.raises(RuntimeError, match="common blob"):
        cm.coord_map_from_to(cropped, aux)
    ip = fake("InnerProduct", deconv, num_output=10)
    with pytest.raises(RuntimeError):
        cm.coord_map_from_to(ip, data)


def test_multi_bottom_multi_top():
    data, aux = fake("Input"), fake("Input")
    conv_data, conv_aux = fake("Convolution", data, aux, ntop=2, kernel_size=5, stride=2)
    # conv: x / 2 - 2 / 2; back: 2 * x + 2
    assert_map(cm.coord_map_from_to(conv_data, data), 1, [2], [2])
    assert_map(cm.coord_map_from_to(conv_aux, aux), 1, [2], [2])
    # two branches meeting in an Eltwise map through their common input
    left = fake("Convolution", data, kernel_size=3, pad=1)
    right = fake("ReLU", data)
    summed = fake("Eltwise", left, right)
    assert_map(cm.coord_map_from_to(summed, data), 1, [1], [0])


# ---- pycaffe's own cases, on net spec tops -----------------------------------------------------
@pytest.fixture
def ns():
    from caffe_alex.pycaffe import net_spec

    return net_spec


def coord_net_spec(ns, ks=3, stride=1, pad=0, pool=2, dstride=2, dpad=0):
    """pycaffe's conv -> pool -> deconv test net (the deconv kernel twice its stride)."""
    L, P = ns.layers, ns.params
    n = ns.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 1, 100, 100]))
    n.aux = L.Input(shape=dict(dim=[2, 1, 20, 20]))
    n.conv = L.Convolution(n.data, num_output=10, kernel_size=ks, stride=stride, pad=pad)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=pool, stride=pool, pad=0)
    deconv_ks = [s * 2 for s in dstride] if isinstance(dstride, list) else dstride * 2
    n.deconv = L.Deconvolution(
        n.pool, num_output=10, kernel_size=deconv_ks, stride=dstride, pad=dpad
    )
    return n


def test_conv_pool_deconv(ns):
    n = coord_net_spec(ns)
    assert_map(cm.coord_map_from_to(n.deconv, n.data), 1, [1], [0])
    n = coord_net_spec(ns, pool=4, dstride=4)
    assert_map(cm.coord_map_from_to(n.deconv, n.data), 1, [1], [-1])


def test_pass(ns):
    n = coord_net_spec(ns)
    want = cm.coord_map_from_to(n.deconv, n.data)
    n.relu = ns.layers.ReLU(n.deconv)
    n.conv1x1 = ns.layers.Convolution(n.relu, num_output=10, kernel_size=1, stride=1, pad=0)
    for top in (n.relu, n.conv1x1):
        assert_map(cm.coord_map_from_to(top, n.data), *want)


@pytest.mark.parametrize("pad", [0, 3, 10])
def test_padding(ns, pad):
    base = coord_net_spec(ns)
    _, a, b = cm.coord_map_from_to(base.deconv, base.data)
    n = coord_net_spec(ns, pad=pad)  # conv padding shifts one way
    assert_map(cm.coord_map_from_to(n.deconv, n.data), 1, a, b - pad)
    n = coord_net_spec(ns, dpad=pad)  # deconv padding the other
    assert_map(cm.coord_map_from_to(n.deconv, n.data), 1, a, b + pad)
    n = coord_net_spec(ns, pad=pad, dpad=pad)
    assert_map(cm.coord_map_from_to(n.deconv, n.data), 1, a, b)


def test_multi_conv(ns):
    n = coord_net_spec(ns)
    n.conv_data, n.conv_aux = ns.layers.Convolution(
        n.data, n.aux, ntop=2, num_output=10, kernel_size=5, stride=2, pad=0
    )
    got = cm.coord_map_from_to(n.conv_data, n.data)
    assert_map(cm.coord_map_from_to(n.conv_aux, n.aux), *got)


def test_rect(ns):
    n3x3 = coord_net_spec(ns, ks=3, stride=1, pad=0)
    n5x5 = coord_net_spec(ns, ks=5, stride=2, pad=10)
    n3x5 = coord_net_spec(ns, ks=[3, 5], stride=[1, 2], pad=[0, 10])
    ax33, a33, b33 = cm.coord_map_from_to(n3x3.deconv, n3x3.data)
    ax55, a55, b55 = cm.coord_map_from_to(n5x5.deconv, n5x5.data)
    ax35, a35, b35 = cm.coord_map_from_to(n3x5.deconv, n3x5.data)
    assert ax33 == ax55 == ax35 == 1
    assert (a35[0], b35[0], a35[1], b35[1]) == (a33[0], b33[0], a55[0], b55[0])


def test_nd_conv(ns):
    L, P = ns.layers, ns.params
    n = ns.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 100, 100, 100]))
    n.conv = L.Convolution(
        n.data, num_output=10, kernel_size=[3, 3, 3], stride=[1, 1, 1], pad=[0, 1, 2]
    )
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=2, stride=2, pad=0)
    n.deconv = L.Deconvolution(n.pool, num_output=10, kernel_size=4, stride=2, pad=0)
    ax, a, b = cm.coord_map_from_to(n.deconv, n.data)
    assert ax == 1 and len(a) == len(b) == 3 and np.all(a == 1)
    assert b[0] - 1 == b[1] and b[1] - 1 == b[2]


@pytest.mark.parametrize("offset", [0, 4, 10])
def test_crop_of_crop(ns, offset):
    n = coord_net_spec(ns)
    ax, a, b = cm.coord_map_from_to(n.deconv, n.data)
    n.crop = ns.layers.Crop(n.deconv, n.data, axis=2, offset=offset)
    assert_map(cm.coord_map_from_to(n.crop, n.data), ax, a, b + offset)


def test_crop_helper_writes_the_crop_layer(ns):
    n = coord_net_spec(ns, pad=100)  # FCN-like: map b = -100 (see test_fcn_chain_by_hand)
    n.score = cm.crop(n.deconv, n.data)
    layer = [lay for lay in n.to_proto().layer if lay.type == "Crop"][0]
    assert list(layer.bottom) == ["deconv", "data"]
    assert layer.crop_param.axis == 2 and list(layer.crop_param.offset) == [100]


def test_catch_unconnected(ns):
    n = coord_net_spec(ns)
    n.ip = ns.layers.InnerProduct(n.deconv, num_output=10)
    with pytest.raises(RuntimeError):
        cm.coord_map_from_to(n.ip, n.data)


def test_catch_scale_mismatch_and_negative_crop(ns):
    n = coord_net_spec(ns, pool=3, dstride=2)
    with pytest.raises(AssertionError):
        cm.crop(n.deconv, n.data)
    n = coord_net_spec(ns, dpad=10)
    with pytest.raises(AssertionError):
        cm.crop(n.deconv, n.data)
