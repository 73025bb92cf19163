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
from tests.corpus import CORPUS
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


@pytest.mark.slow
def test_alexnet_matches_onnxruntime(alexnet_export):
    net, _, sess = alexnet_export
    errors = run_both(net, sess)
    assert set(errors) == {"logits", "prob"}
    assert max(errors.values()) <= TOL, errors


@pytest.mark.slow
def test_alexnet_graph_names_lrn_and_dynamic_batch(alexnet_export):
    net, path, sess = alexnet_export
    model = onnx.load(path)
    onnx.checker.check_model(model)
    assert _onnx_io(model) == (["data"], ["logits", "prob"])
    assert sum(node.op_type == "LRN" for node in model.graph.node) == 2  # ONNX's own LRN
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert max(run_both(net, sess, batch=1, seed=1).values()) <= TOL
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.skipif(not RESNET50.is_file(), reason="corpus not present")
def test_resnet50_matches_onnxruntime(tmp_path):
    prototxt = tmp_path / "resnet50.prototxt"  # legacy input: fields, upgraded on reading
    prototxt.write_text(expose(RESNET50.read_text(), "fc1000", "logits"))
    net = Net.from_prototxt(str(prototxt), "TEST")
    randomize(net, scale=0.02)
    errors = run_both(net, to_onnx_model(net))
    assert max(errors.values()) <= TOL, errors


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_unexportable_layer_is_named():
    # ArgMax sorts, and this exporter has no ONNX translation of a stable sort.
    net = Net(parse_net(HEAD + 'layer { name: "top2" type: "ArgMax" bottom: "data" top: "i" '
                        "argmax_param { top_k: 2 } }"), "TEST")  # fmt: skip
    with pytest.raises(CaffeAlexError, match="layer 'top2' \\(ArgMax\\): cannot export to ONNX"):
        to_onnx_model(net)


@pytest.mark.slow
def test_dynamic_batch_refused_where_the_net_fixes_it():
    text = HEAD + (
        'layer { name: "r" type: "Reshape" bottom: "data" top: "r" '
        "reshape_param { shape { dim: 2 dim: -1 } } }"
    )
    net = Net(parse_net(text), "TEST")
    with pytest.raises(CaffeAlexError, match="fixes the batch size to 2"):
        to_onnx_model(net, dynamic_batch=True)
    assert to_onnx_model(net).graph.output[0].name == "r"


# ---- fork layers ----------------------------------------------------------------------------
# One net holding the fork types that trace to plain ONNX operators; each top is exported as
# an output (``outputs``), compared with onnxruntime, and its ONNX operators checked. (A blob
# named "permute" also checks that blob names may equal the names the exporter gives values.)
FORK_ZOO = """name: "fork_zoo"
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 2 dim: 8 dim: 6 dim: 6 } } }
layer { name: "relu6" type: "ReLU6" bottom: "data" top: "relu6" }
layer { name: "shuffle" type: "ShuffleChannel" bottom: "relu6" top: "shuffle"
  shuffle_channel_param { group: 2 } }
layer { name: "dw" type: "ConvolutionDepthwise" bottom: "shuffle" top: "dw"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "dw2" type: "DepthwiseConvolution" bottom: "dw" top: "dw2"
  convolution_param { num_output: 8 group: 8 kernel_size: 3 pad: 1 stride: 2 } }
layer { name: "interp" type: "Interp" bottom: "dw2" top: "interp" interp_param { zoom_factor: 2 } }
layer { name: "bn_segnet" type: "BN" bottom: "interp" top: "bn_segnet"
  bn_param { bn_mode: INFERENCE } }
layer { name: "bn_pspnet" type: "BN" bottom: "interp" top: "bn_pspnet" bn_param { eps: 1e-5 } }
layer { name: "nearest" type: "Upsample" bottom: "bn_segnet" top: "nearest"
  upsample_param { scale: 2 } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" top: "mask"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "unpool" type: "Upsample" bottom: "pool" bottom: "mask" top: "unpool"
  upsample_param { scale: 2 } }
layer { name: "reorg" type: "Reorg" bottom: "data" top: "reorg" reorg_param { stride: 2 } }
layer { name: "region" type: "Region" bottom: "data" top: "region"
  region_param { classes: 3 coords: 4 boxes_of_each_grid: 1 softmax: true } }
layer { name: "gap" type: "Pooling" bottom: "data" top: "gap"
  pooling_param { pool: AVE global_pooling: true } }
layer { name: "axpy" type: "Axpy" bottom: "gap" bottom: "data" bottom: "relu6" top: "axpy" }
layer { name: "floor_pool" type: "Pooling" bottom: "data" top: "floor_pool"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 ceil_mode: false } }
layer { name: "permute" type: "Permute" bottom: "dw" top: "permute"
  permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "norm" type: "Normalize" bottom: "data" top: "norm"
  norm_param { across_spatial: false channel_shared: false } }
layer { name: "norm_all" type: "Normalize" bottom: "relu6" top: "norm_all" }
layer { name: "priors" type: "PriorBox" bottom: "dw2" bottom: "data" top: "priors"
  prior_box_param { min_size: 2 max_size: 4 aspect_ratio: 2 flip: true
                    variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 } }
"""
ZOO_OUTPUTS = ["relu6", "shuffle", "dw", "dw2", "interp", "bn_segnet", "bn_pspnet", "nearest",
               "unpool", "reorg", "region", "axpy", "floor_pool", "permute", "norm", "norm_all",
               "priors"]  # fmt: skip


@pytest.mark.slow
def test_fork_layers_export_to_onnx_operators():
    net = Net(parse_net(FORK_ZOO), "TEST")
    randomize(net, 3)
    with torch.no_grad():
        variance = net.params["bn_pspnet"][3]
        variance.copy_(variance.abs() + 0.5)
    model = to_onnx_model(net, outputs=ZOO_OUTPUTS)
    assert [o.name for o in model.graph.output] == ZOO_OUTPUTS
    # PriorBox depends on shapes only: its output is stored, not computed
    assert "priors" in {i.name for i in model.graph.initializer}
    assert not [n for n in model.graph.node if "priors" in n.output]
    ops = {node.op_type for node in model.graph.node}
    assert {"Clip", "Transpose", "Conv", "MaxPool"} <= ops
    depthwise = [n for n in model.graph.node if n.op_type == "Conv"]
    assert [a.i for n in depthwise for a in n.attribute if a.name == "group"] == [8, 8]
    x = np.random.default_rng(4).standard_normal((2, 8, 6, 6)).astype(np.float32) * 4
    theirs = session(model).run(ZOO_OUTPUTS, {"data": x})
    with torch.no_grad():
        net(torch.from_numpy(x))
    for name, value in zip(ZOO_OUTPUTS, theirs):
        ours = net.blobs[name].numpy()
        assert value.shape == ours.shape, name
        assert relative_error(value, ours) <= TOL, name


ROI_NET = """layer { name: "in" type: "Input" top: "data" top: "rois"
  input_param { shape { dim: 2 dim: 5 dim: 12 dim: 14 } shape { dim: 300 dim: 5 } } }
layer { name: "roi_pool" type: "ROIPooling" bottom: "data" bottom: "rois" top: "pooled"
  roi_pooling_param { pooled_h: 3 pooled_w: 4 spatial_scale: 0.5 } }
"""


@pytest.mark.slow
def test_roi_pooling_exports_as_max_roi_pool_with_equal_values():
    net = Net(parse_net(ROI_NET), "TEST")
    model = to_onnx_model(net)
    assert [n.op_type for n in model.graph.node if n.op_type != "Reshape"] == ["MaxRoiPool"]
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 5, 12, 14)).astype(np.float32)
    corners = rng.uniform(-8, 36, (300, 4))
    corners[:100] = np.round(corners[:100]) + 0.5  # halves: rounded away from zero by both
    corners[100:120, 2:] = corners[100:120, :2] - 3  # corners out of order
    rois = np.concatenate([rng.integers(0, 2, (300, 1)), corners], axis=1).astype(np.float32)
    [theirs] = session(model).run(["pooled"], {"data": x, "rois": rois})
    with torch.no_grad():
        ours = net(torch.from_numpy(x), torch.from_numpy(rois))["pooled"].numpy()
    np.testing.assert_array_equal(theirs, ours)


PROPOSAL_NET = """layer { name: "in" type: "Input" top: "data"
  input_param { shape { dim: 1 dim: 4 dim: 5 dim: 6 } } }
layer { name: "info" type: "Input" top: "im_info" input_param { shape { dim: 1 dim: 3 } } }
layer { name: "cls" type: "Convolution" bottom: "data" top: "cls"
  convolution_param { num_output: 18 kernel_size: 1 } }
layer { name: "cls_prob" type: "Softmax" bottom: "cls" top: "cls_prob" }
layer { name: "bbox" type: "Convolution" bottom: "data" top: "bbox"
  convolution_param { num_output: 36 kernel_size: 1 } }
layer { name: "proposal" type: "Proposal" bottom: "cls_prob" bottom: "bbox" bottom: "im_info"
  top: "rois" proposal_param { feat_stride: 16 } }
"""


@pytest.mark.slow
def test_layers_without_an_onnx_operator_are_named_and_outputs_export_around_them(tmp_path):
    net = Net(parse_net(PROPOSAL_NET), "TEST")
    randomize(net, 6)
    with pytest.raises(CaffeAlexError) as error:
        to_onnx_model(net)
    assert str(error.value) == (
        "layer 'proposal' (Proposal): cannot export to ONNX: no ONNX operator does "
        "py-faster-rcnn's anchor decoding and NMS; export the blobs it reads with --outputs "
        "cls_prob,bbox,im_info and run it after the model"
    )
    (tmp_path / "net.prototxt").write_text(PROPOSAL_NET)
    result = run_cli("--model", str(tmp_path / "net.prototxt"), str(tmp_path / "a.onnx"))
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert not (tmp_path / "a.onnx").exists()
    # up to the blobs Proposal reads: im_info's layer, which nothing else reads, is dropped
    model = to_onnx_model(net, outputs=["cls_prob", "bbox"])
    assert [v.name for v in model.graph.input] == ["data"]
    x = np.random.default_rng(7).standard_normal((1, 4, 5, 6)).astype(np.float32)
    theirs = session(model).run(["cls_prob", "bbox"], {"data": x})
    with torch.no_grad():
        net(torch.from_numpy(x), torch.zeros(1, 3))
    for value, name in zip(theirs, ["cls_prob", "bbox"]):
        assert relative_error(value, net.blobs[name].numpy()) <= TOL
    with pytest.raises(CaffeAlexError, match="--outputs: the net has no blob named 'nope'"):
        to_onnx_model(net, outputs=["bbox", "nope"])


MOBILENET_SSD = CORPUS / "chuanqi305__MobileNet-SSD" / "deploy.prototxt"
SSD_HEADS = ["mbox_loc", "mbox_conf_flatten", "mbox_priorbox"]


@pytest.mark.slow
@pytest.mark.skipif(not MOBILENET_SSD.is_file(), reason="../shared/corpus not present")
def test_mobilenet_ssd_exports_up_to_its_detection_output(tmp_path):
    proto, weights, onnx_path = MOBILENET_SSD, tmp_path / "w.caffemodel", tmp_path / "ssd.onnx"
    net = Net.from_prototxt(str(proto), "TEST")
    randomize(net, 8, 0.1)
    weights.write_bytes(caffemodel_bytes(net))
    whole = run_cli("--model", str(proto), "--weights", str(weights), str(onnx_path))
    assert whole.exit_code == 1 and not onnx_path.exists()
    assert whole.output.splitlines()[-1] == (
        f"caffe-alex: error: {proto}:3080: layer 'detection_out' (DetectionOutput): cannot "
        "export to ONNX: no ONNX operator does SSD's box decoding, per-class NMS and "
        "keep_top_k; export the blobs it reads with --outputs "
        "mbox_loc,mbox_conf_flatten,mbox_priorbox and run it after the model"
    )
    heads = run_cli("--model", str(proto), "--weights", str(weights), "--outputs",
                    ",".join(SSD_HEADS), str(onnx_path))  # fmt: skip
    assert heads.exit_code == 0, heads.output
    model = onnx.load(str(onnx_path))
    assert [v.name for v in model.graph.output] == SSD_HEADS
    assert "data" not in _ancestors(model, "mbox_priorbox")  # PriorBoxes as constants
    assert "data" in _ancestors(model, "mbox_loc")
    ops = {n.op_type for n in model.graph.node}
    assert "Transpose" in ops and "DetectionOutput" not in ops  # Permute as Transpose
    x = np.random.default_rng(9).standard_normal((1, 3, 300, 300)).astype(np.float32)
    theirs = session(str(onnx_path)).run(SSD_HEADS, {"data": x})
    with torch.no_grad():
        net(torch.from_numpy(x))
    for name, value in zip(SSD_HEADS, theirs):
        assert relative_error(value, net.blobs[name].numpy()) <= TOL, name


def _ancestors(model, name: str) -> set[str]:
    """Every value the graph computes ``name`` from."""
    producer = {out: node for node in model.graph.node for out in node.output}
    found, todo = set(), [name]
    while todo:
        node = producer.get(todo.pop())
        for value in node.input if node is not None else ():
            if value not in found:
                found.add(value)
                todo.append(value)
    return found
