"""ONNX export: onnxruntime runs the exported AlexNet and ResNet nets with our outputs (max
relative error <= 1e-5), through the API and through ``caffe-alex export``."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from caffe_alex.cli import main
from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from caffe_alex.tools.onnx_export import to_onnx_model
from tests.paths import ROOT
from tests.reference import caffemodel_bytes, parse_net, randomize, relative_error

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ALEXNET = ROOT / "models" / "bvlc_alexnet" / "deploy.prototxt"
RESNET50 = (
    ROOT.parent / "shared" / "corpus" / "KaimingHe__deep-residual-networks" / "prototxt"
    / "ResNet-50-deploy.prototxt"
)  # fmt: skip
TOL = 1e-5

# A residual block as in ResNet: Convolution + BatchNorm + Scale + ReLU, Eltwise SUM shortcut.
SMALL_RESNET = """name: "tiny_res"
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 2 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 stride: 2 bias_term: false } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2" }
layer { name: "sc2" type: "Scale" bottom: "conv2" top: "conv2" scale_param { bias_term: true } }
layer { name: "sum" type: "Eltwise" bottom: "pool1" bottom: "conv2" top: "sum" }
layer { name: "relu2" type: "ReLU" bottom: "sum" top: "sum" }
layer { name: "gap" type: "Pooling" bottom: "sum" top: "gap"
  pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "gap" top: "fc"
  inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def expose(text: str, blob: str, name: str) -> str:
    """The net plus a Split that makes ``blob`` an output too (the logits before Softmax, which
    random weights would otherwise hide behind a saturated softmax)."""
    return text + f'\nlayer {{ name: "{name}" type: "Split" bottom: "{blob}" top: "{name}" }}\n'


def run_both(net: Net, model, batch: int | None = None, seed: int = 0) -> dict[str, float]:
    """Relative max error of onnxruntime against the net, per output, on random inputs."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in net.input_names:
        shape = list(net.blob_shapes[name])
        shape[0] = batch or shape[0]
        feeds[name] = rng.standard_normal(shape).astype(np.float32)
    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    theirs = dict(zip(net.output_names, sess.run(net.output_names, feeds), strict=True))
    with torch.no_grad():
        ours = net(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    errors = {}
    for name in net.output_names:
        assert theirs[name].shape == tuple(ours[name].shape), name
        errors[name] = relative_error(theirs[name], ours[name].numpy())
    return errors


def _onnx_io(model) -> tuple[list[str], list[str]]:
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


@pytest.fixture(scope="module")
def alexnet_export(tmp_path_factory):
    """AlexNet (batch 2, fc8 exposed) with random weights, exported once with a dynamic batch
    by ``caffe-alex export`` from a .caffemodel. Returns the net, the file and an onnxruntime
    session on it."""
    folder = tmp_path_factory.mktemp("alexnet")
    prototxt, weights = folder / "deploy.prototxt", folder / "w.caffemodel"
    prototxt.write_text(expose(ALEXNET.read_text(), "fc8", "logits"))
    net = Net(parse_net(prototxt.read_text()), "TEST", input_shapes={"data": (2, 3, 227, 227)})
    randomize(net, scale=0.02)
    weights.write_bytes(caffemodel_bytes(net))
    out = folder / "alexnet.onnx"
    result = run_cli("--model", str(prototxt), "--weights", str(weights), "--input-shape",
                     "data=2,3,227,227", "--dynamic-batch", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    return net, str(out), session(str(out))


def session(model):
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def run_cli(*args):
    return CliRunner().invoke(main, ["export", *args])


def test_alexnet_matches_onnxruntime(alexnet_export):
    net, _, sess = alexnet_export
    errors = run_both(net, sess)
    assert set(errors) == {"logits", "prob"}
    assert max(errors.values()) <= TOL, errors


def test_alexnet_graph_names_lrn_and_dynamic_batch(alexnet_export):
    net, path, sess = alexnet_export
    model = onnx.load(path)
    onnx.checker.check_model(model)
    assert _onnx_io(model) == (["data"], ["logits", "prob"])
    assert sum(node.op_type == "LRN" for node in model.graph.node) == 2  # ONNX's own LRN
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert max(run_both(net, sess, batch=1, seed=1).values()) <= TOL
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]


def test_small_resnet_matches_onnxruntime():
    net = Net(parse_net(expose(SMALL_RESNET, "fc", "logits")), "TEST")
    randomize(net, seed=3)
    model = to_onnx_model(net, dynamic_batch=True)
    assert net.blobs == {}  # no traced values left behind
    assert _onnx_io(model) == (["data"], ["logits", "prob"])
    sess = session(model)
    for batch in (2, 5):
        errors = run_both(net, sess, batch=batch, seed=batch)
        assert max(errors.values()) <= TOL, errors


@pytest.mark.skipif(not RESNET50.is_file(), reason="corpus not present")
def test_resnet50_matches_onnxruntime(tmp_path):
    prototxt = tmp_path / "resnet50.prototxt"  # legacy input: fields, upgraded on reading
    prototxt.write_text(expose(RESNET50.read_text(), "fc1000", "logits"))
    net = Net.from_prototxt(str(prototxt), "TEST")
    randomize(net, scale=0.02)
    errors = run_both(net, to_onnx_model(net))
    assert max(errors.values()) <= TOL, errors


def test_older_opset():  # written at 18, then converted by onnx
    opset = 17
    net = Net(parse_net(SMALL_RESNET), "TEST")
    randomize(net)
    model = to_onnx_model(net, opset=opset)
    assert model.opset_import[0].version == opset
    assert max(run_both(net, model).values()) <= TOL


def test_cli_errors_are_one_line(tmp_path):
    proto = tmp_path / "net.prototxt"
    proto.write_text(SMALL_RESNET)
    missing = run_cli("--model", str(tmp_path / "nope.prototxt"), str(tmp_path / "a.onnx"))
    assert missing.exit_code == 1 and "nope.prototxt" in missing.output
    folder = run_cli("--model", str(proto), str(tmp_path / "no" / "dir" / "a.onnx"))
    assert folder.exit_code == 1 and "does not exist" in folder.output
    for result in (missing, folder):
        assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert os.listdir(tmp_path) == ["net.prototxt"]


def test_cli_writes_the_file_atomically(tmp_path):
    proto = tmp_path / "net.prototxt"
    proto.write_text(SMALL_RESNET)
    out = tmp_path / "net.onnx"
    out.write_bytes(b"old")
    result = run_cli("--model", str(proto), "--opset", "19", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == ["net.onnx", "net.prototxt"]  # no temporary left
    model = onnx.load(str(out))
    assert model.opset_import[0].version == 19
    net = Net.from_prototxt(str(proto), "TEST")  # the fillers' values, as the command had
    assert max(run_both(net, str(out)).values()) <= TOL


def test_missing_weights_file_is_one_line(tmp_path):
    proto = tmp_path / "net.prototxt"
    proto.write_text(SMALL_RESNET)
    result = run_cli("--model", str(proto), "--weights", str(tmp_path / "w.caffemodel"),
                     str(tmp_path / "a.onnx"))  # fmt: skip
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "w.caffemodel" in result.output
    assert not (tmp_path / "a.onnx").exists()


HEAD = """layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 2 dim: 4 dim: 3 dim: 3 } } }
"""


def test_unexportable_layer_is_named():
    # ArgMax sorts, and this exporter has no ONNX translation of a stable sort.
    net = Net(parse_net(HEAD + 'layer { name: "top2" type: "ArgMax" bottom: "data" top: "i" '
                        "argmax_param { top_k: 2 } }"), "TEST")  # fmt: skip
    with pytest.raises(CaffeAlexError, match="layer 'top2' \\(ArgMax\\): cannot export to ONNX"):
        to_onnx_model(net)


def test_dynamic_batch_refused_where_the_net_fixes_it():
    text = HEAD + (
        'layer { name: "r" type: "Reshape" bottom: "data" top: "r" '
        "reshape_param { shape { dim: 2 dim: -1 } } }"
    )
    net = Net(parse_net(text), "TEST")
    with pytest.raises(CaffeAlexError, match="fixes the batch size to 2"):
        to_onnx_model(net, dynamic_batch=True)
    assert to_onnx_model(net).graph.output[0].name == "r"
