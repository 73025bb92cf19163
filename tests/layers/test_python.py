"""Python layers (type "Python"): pycaffe's layer protocol hosted in autograd.

The layer classes are written to a temporary module on sys.path, as users' are. Their numbers
are compared with float64 autograd of the same formulas, with built-in layers of the same
function, and through training with the Solver and `caffe-alex train`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from caffe_alex.cli import main
from caffe_alex.errors import CaffeAlexError, SourceMap, one_line
from caffe_alex.net import Net
from caffe_alex.solvers import Solver
from tests.reference import assert_caffemodel_round_trip, parse_net

LAYERS = '''
import numpy as np
import caffe_alex.pycaffe as caffe


class ScaleBy(caffe.Layer):
    """y = w * x**3 elementwise over the last axis, w learnable; param_str: the initial w."""

    def setup(self, bottom, top):
        self.blobs.add_blob(bottom[0].shape[-1])
        self.blobs[0].data[...] = float(self.param_str or 1.0)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.blobs[0].data * bottom[0].data ** 3

    def backward(self, top, propagate_down, bottom):
        x, dy = bottom[0].data, top[0].diff
        self.blobs[0].diff[...] += (dy * x ** 3).reshape(-1, x.shape[-1]).sum(0)
        if propagate_down[0]:
            bottom[0].diff[...] = dy * 3 * self.blobs[0].data * x ** 2


class EuclideanLoss(caffe.Layer):
    """pycaffe's pyloss example: sum of squared differences / 2N."""

    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise Exception("Need two inputs to compute distance.")

    def reshape(self, bottom, top):
        if bottom[0].count != bottom[1].count:
            raise Exception("Inputs must have the same dimension.")
        self.diff = np.zeros_like(bottom[0].data, dtype=np.float32)
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.diff[...] = bottom[0].data - bottom[1].data
        top[0].data[...] = np.sum(self.diff ** 2) / bottom[0].num / 2.

    def backward(self, top, propagate_down, bottom):
        for i in range(2):
            if not propagate_down[i]:
                continue
            sign = 1 if i == 0 else -1
            bottom[i].diff[...] = sign * self.diff / bottom[i].num


class Counter(caffe.Layer):
    """A data layer: batches of its phase and a running count (param_str: batch size)."""

    def setup(self, bottom, top):
        self.batch, self.calls = int(self.param_str), 0

    def reshape(self, bottom, top):
        top[0].reshape(self.batch, 2)

    def forward(self, bottom, top):
        self.calls += 1
        top[0].data[:, 0] = self.calls
        top[0].data[:, 1] = self.phase


class FasterRcnnStyle(caffe.Layer):
    """py-faster-rcnn's conventions: param_str_, str(self.phase), tops shaped in setup and in
    forward only (reshape does nothing)."""

    def setup(self, bottom, top):
        self.offset = float(self.param_str_)
        top[0].reshape(1, 5)
        top[1].reshape(1, 1, 1, 1)

    def reshape(self, bottom, top):
        pass

    def set_offset(self, value):  # called through pycaffe's net.layers, as set_roidb is
        self.offset = value

    def forward(self, bottom, top):
        rows = bottom[0].data.shape[0] + (1 if str(self.phase) == "TRAIN" else 0)
        top[0].reshape(rows, 5)
        top[0].data[...] = self.offset
        top[1].reshape(rows, 1)
        top[1].data[...] = len(str(self.phase))


class Broken(caffe.Layer):
    def setup(self, bottom, top):
        if self.param_str == "setup":
            raise ValueError("bad param_str")

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        raise RuntimeError("boom")
'''


@pytest.fixture(autouse=True)
def layer_module(tmp_path, monkeypatch):
    (tmp_path / "my_layers.py").write_text(LAYERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    import sys

    sys.modules.pop("my_layers", None)


def python_layer(name, cls, bottoms, tops, param_str="", extra=""):
    bottom = " ".join(f'bottom: "{b}"' for b in bottoms)
    top = " ".join(f'top: "{t}"' for t in tops)
    param = f'module: "my_layers" layer: "{cls}" param_str: "{param_str}"'
    head = f'layer {{ name: "{name}" type: "Python" {bottom} {top} {extra}'
    return f"{head} python_param {{ {param} }} }}"


def input_layer(shape, name="x") -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    shape = f"input_param {{ shape {{ {dims} }} }}"
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" {shape} }}'


def test_forward_and_backward_match_float64_autograd_of_the_formula():
    text = input_layer((2, 3, 4)) + python_layer("s", "ScaleBy", ["x"], ["y"], "0.5")
    net = Net(parse_net(text), "TRAIN")
    assert net.blob_shapes["y"] == (2, 3, 4) and list(net.params["s"][0].shape) == [4]
    with torch.no_grad():
        net.params["s"][0].copy_(torch.tensor([0.5, -1.0, 2.0, 0.25]))
    x = torch.randn(2, 3, 4, requires_grad=True)
    dy = torch.randn(2, 3, 4)
    net(x)["y"].backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), net.params["s"][0].detach().double()
    w64.requires_grad_()
    y64 = w64 * x64**3
    y64.backward(dy.double())
    np.testing.assert_allclose(net.blobs["y"].detach().numpy(), y64.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(x.grad.numpy(), x64.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.params["s"][0].grad.numpy(), w64.grad.numpy(), rtol=1e-5)


def test_param_str_phase_and_a_data_layer_without_bottoms():
    text = python_layer("d", "Counter", [], ["batch"], "3")
    for phase, value in (("TRAIN", 0), ("TEST", 1)):
        net = Net(parse_net(text), phase)
        assert net.blob_shapes["batch"] == (3, 2)
        first, second = net()["batch"], net()["batch"]
        assert first[:, 0].tolist() == [1, 1, 1] and second[:, 0].tolist() == [2, 2, 2]
        assert second[:, 1].tolist() == [value] * 3


def test_py_faster_rcnn_conventions_param_str_underscore_phase_names_and_lasting_tops():
    text = input_layer((3, 2)) + python_layer("p", "FasterRcnnStyle", ["x"], ["a", "b"], "1.5")
    for phase in ("TRAIN", "TEST"):
        net = Net(parse_net(text), phase)
        assert net.blob_shapes["a"] == (1, 5) and net.blob_shapes["b"] == (1, 1, 1, 1)
        net.reshape(x=(4, 2))  # a reshape that does nothing keeps the tops as they were
        assert net.blob_shapes["a"] == (1, 5)
        out = net(x=torch.zeros(4, 2))
        rows = 5 if phase == "TRAIN" else 4
        assert out["a"].shape == (rows, 5) and (out["a"] == 1.5).all()
        assert (out["b"] == len(phase)).all()
        impl = net.layer("p").impl
        assert impl.phase == (0 if phase == "TRAIN" else 1) and str(impl.phase) == phase


def test_pycaffe_net_layers_reach_the_python_layers_own_methods(tmp_path):
    import caffe_alex.pycaffe as caffe

    path = tmp_path / "net.prototxt"
    path.write_text(
        input_layer((3, 2)) + python_layer("p", "FasterRcnnStyle", ["x"], ["a", "b"], "1.5")
    )
    net = caffe.Net(str(path), caffe.TEST)
    layer = net.layers[list(net._layer_names).index("p")]
    assert layer.type == "Python" and layer.offset == 1.5
    layer.set_offset(4.0)
    net.forward()
    assert (net.blobs["a"].data == 4.0).all() and net.blobs["a"].data.shape == (3, 5)
    with pytest.raises(AttributeError):
        net.layers[0].set_offset(1.0)  # the Input layer is no Python layer


def test_python_loss_trains_like_the_builtin_euclidean_loss(tmp_path):
    def solver_for(loss_layer):
        text = (input_layer((4, 3)) + input_layer((4, 2), "t")
                + 'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" '
                'inner_product_param { num_output: 2 '
                'weight_filler { type: "gaussian" std: 0.5 } } }'
                + loss_layer)  # fmt: skip
        param = (f"net_param {{ {text} }} base_lr: 0.1 lr_policy: 'fixed' momentum: 0.9 "
                 "max_iter: 5 random_seed: 3 solver_mode: CPU")  # fmt: skip
        from google.protobuf import text_format

        from caffe_alex.proto import caffe_pb2

        gen = torch.Generator().manual_seed(0)
        batches = [{"x": torch.randn(4, 3, generator=gen), "t": torch.randn(4, 2, generator=gen)}
                   for _ in range(5)]  # fmt: skip
        return Solver(text_format.Parse(param, caffe_pb2.SolverParameter()),
                      feeds={"train": batches, "test": []})  # fmt: skip

    ours = solver_for(python_layer("loss", "EuclideanLoss", ["ip", "t"], ["loss"],
                                   extra="loss_weight: 1"))  # fmt: skip
    builtin = solver_for('layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "t" '
                         'top: "loss" }')  # fmt: skip
    ours.step(5)
    builtin.step(5)
    for a, b in zip(ours.train_net.params["ip"], builtin.train_net.params["ip"]):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_learnable_blobs_round_trip_through_a_caffemodel(tmp_path):
    text = input_layer((1, 3)) + python_layer("s", "ScaleBy", ["x"], ["y"], "2")
    net = Net(parse_net(text))
    with torch.no_grad():
        net.params["s"][0].copy_(torch.tensor([1.0, 2.0, 3.0]))
    net.save_weights(tmp_path / "w.caffemodel")
    fresh = Net(parse_net(text))
    assert fresh.params["s"][0].tolist() == [2.0, 2.0, 2.0]  # from param_str in setup
    fresh.load_weights(tmp_path / "w.caffemodel")
    assert fresh.params["s"][0].tolist() == [1.0, 2.0, 3.0]
    # and against protobuf's decoder and a hand-encoded file
    assert_caffemodel_round_trip(lambda: Net(parse_net(text)), tmp_path)


@pytest.mark.parametrize(
    "module,cls,param_str,message",
    [
        ("no_such_module", "X", "", r"cannot import python_param.module 'no_such_module': "
         r"ModuleNotFoundError"),
        ("my_layers", "Missing", "", r"module 'my_layers' has no class 'Missing'"),
    ],
)  # fmt: skip
def test_build_errors_name_the_layer_and_the_module(module, cls, param_str, message):
    text = input_layer((1, 3)) + (
        f'layer {{ name: "p" type: "Python" bottom: "x" top: "y" python_param {{ '
        f'module: "{module}" layer: "{cls}" param_str: "{param_str}" }} }}'
    )
    with pytest.raises(CaffeAlexError, match=message) as info:
        Net(parse_net(text))
    assert "layer 'p' (Python)" in str(info.value) and "\n" not in str(info.value)


def test_a_python_layers_own_exception_reaches_the_caller_with_a_note_and_one_line():
    # pycaffe lets the layer's exception through (BVLC's test_python_layer.test_exception
    # asserts RuntimeError); a note names the layer and its code, and the command line's one
    # line (errors.one_line) names the file and line too
    text = input_layer((1, 3)) + (
        'layer { name: "p" type: "Python" bottom: "x" top: "y" python_param { '
        'module: "my_layers" layer: "Broken" param_str: "setup" } }'
    )
    with pytest.raises(ValueError, match="bad param") as info:
        Net(parse_net(text), source=SourceMap(path="net.prototxt", layer_lines={"p": 7}))
    assert info.value.__notes__ == ["(caffe-alex: in my_layers.Broken.setup of layer 'p')"]
    assert str(one_line(info.value)) == ("net.prototxt:7: layer 'p' (Python): my_layers.Broken."
                                         "setup raised ValueError: bad param_str")  # fmt: skip


def test_a_top_shape_later_layers_refuse_names_that_layer():
    text = (input_layer((2, 3)) + python_layer("s", "ScaleBy", ["x"], ["y"])
            + 'layer { name: "sm" type: "SoftmaxWithLoss" bottom: "y" bottom: "x" '
            'top: "l" }')  # fmt: skip
    with pytest.raises(CaffeAlexError, match="layer 'sm' \\(SoftmaxWithLoss\\)"):
        Net(parse_net(text), "TRAIN")


def test_forward_errors_are_one_line_in_the_cli_and_tracebacks_with_debug(tmp_path):
    text = input_layer((1, 3)) + python_layer("p", "Broken", ["x"], ["y"])
    (tmp_path / "n.prototxt").write_text(text)
    runner = CliRunner()
    result = runner.invoke(main, ["time", "--model", str(tmp_path / "n.prototxt"),
                                  "--iterations", "1"])  # fmt: skip
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "caffe-alex: error: layer 'p' (Python): my_layers.Broken.forward raised RuntimeError: boom"
    )
    debug = runner.invoke(main, ["--debug", "time", "--model", str(tmp_path / "n.prototxt"),
                                 "--iterations", "1"])  # fmt: skip
    assert isinstance(debug.exception, RuntimeError)  # the layer's own, with its note
    assert "my_layers.Broken.forward of layer 'p'" in debug.exception.__notes__[0]


def test_caffe_alex_train_trains_a_python_loss(tmp_path):
    def constant(name, shape, value):
        dims = " ".join(f"dim: {d}" for d in shape)
        filler = f'data_filler {{ type: "constant" value: {value} }}'
        return (f'layer {{ name: "{name}" type: "DummyData" top: "{name}" '
                f"dummy_data_param {{ shape {{ {dims} }} {filler} }} }}")  # fmt: skip

    (tmp_path / "net.prototxt").write_text(
        constant("x", (4, 3), 1) + constant("t", (4, 2), 1)
        + 'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" inner_product_param { '
        'num_output: 2 weight_filler { type: "constant" value: 0.1 } } }'
        + python_layer("loss", "EuclideanLoss", ["ip", "t"], ["loss"], extra="loss_weight: 1")
    )  # fmt: skip
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path}/net.prototxt" base_lr: 0.05 lr_policy: "fixed" max_iter: 20 '
        f'display: 10 snapshot_prefix: "{tmp_path}/s" solver_mode: CPU\n'
    )
    result = CliRunner().invoke(main, ["train", "--solver", str(tmp_path / "solver.prototxt"),
                                       "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    losses = [float(line.rsplit("= ", 1)[1]) for line in result.output.splitlines()
              if "Iteration" in line and "), loss = " in line]  # fmt: skip
    # ip = 0.3 per output at first: loss (0.7^2 * 2 * 4) / 4 / 2 = 0.49, then falling
    assert losses[0] == pytest.approx(0.49, rel=1e-5) and losses[-1] < 0.05
    assert (tmp_path / "s_iter_20.caffemodel").is_file()
