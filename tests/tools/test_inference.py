"""The inference fast path against the exact path (tools/inference.py).

Tolerances, relative to each compared blob's largest |value|: BatchNorm/Scale folding and
channels_last, 1e-5 (measured on ResNet-50 with random weights: about 1e-6); bf16 autocast,
5e-2 (measured about 1e-2: bfloat16 keeps 8 bits of mantissa).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.prototxt import parse_net_text
from caffe_alex.net import Net
from caffe_alex.tools.inference import compare_outputs, for_inference
from tests.corpus import CORPUS
from tests.reference import parse_net

RESNET50 = CORPUS / "KaimingHe__deep-residual-networks/prototxt/ResNet-50-deploy.prototxt"
MOBILENET = CORPUS / "shicai__MobileNet-Caffe/mobilenet_deploy.prototxt"
MOBILENET_SSD = CORPUS / "chuanqi305__MobileNet-SSD/deploy.prototxt"


def random_weights(net: Net, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, kind in zip(net.layer_names, net.layer_types):
            blobs = net.layer(name).blobs
            if kind in ("Convolution", "InnerProduct"):
                blobs[0].copy_(torch.randn(blobs[0].shape, generator=gen)
                               * (2 / blobs[0][0].numel()) ** 0.5)  # fmt: skip
                if len(blobs) > 1:
                    blobs[1].copy_(torch.randn(blobs[1].shape, generator=gen) * 0.1)
            elif kind == "BatchNorm":
                blobs[0].copy_(torch.randn(blobs[0].shape, generator=gen) * 0.5)
                blobs[1].copy_(torch.rand(blobs[1].shape, generator=gen) * 2 + 0.1)
                blobs[2].fill_(0.999)  # Caffe's stored sums: the statistics are blob / s
            elif kind == "Scale":
                blobs[0].copy_(torch.rand(blobs[0].shape, generator=gen) + 0.5)
                if len(blobs) > 1:
                    blobs[1].copy_(torch.randn(blobs[1].shape, generator=gen) * 0.3)


def small_resnet50() -> Net:
    """ResNet-50's deploy net at 64 x 64 (pool5 global instead of 7 x 7, the one change)."""
    text = RESNET50.read_text()
    pool5 = "kernel_size: 7\n\t\tstride: 1\n\t\tpool: AVE"
    text = text.replace(pool5, "global_pooling: true\n\t\tpool: AVE")
    assert "global_pooling" in text
    net = Net(parse_net_text(text)[0], "TEST", input_shapes={"data": (2, 3, 64, 64)})
    random_weights(net)
    return net


def run_both(net: Net, prepared, blobs, inputs):
    with torch.inference_mode():
        net(**inputs)
        exact = {b: net.blobs[b].clone() for b in blobs}
    prepared(**inputs)
    return exact, {b: prepared.blobs[b] for b in blobs}


@pytest.mark.corpus
def test_folded_resnet50_is_within_1e_5_of_the_exact_path():
    net = small_resnet50()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 50
    fast = for_inference(net)
    assert len(fast.folded) == 2 * 53  # every BatchNorm and Scale of the 53 convolutions
    blobs = ["res2a", "res4f", "pool5", "fc1000", "prob"]
    exact, got = run_both(net, fast, blobs, {"data": x})
    diffs = compare_outputs(exact, got)
    assert max(diffs.values()) < 1e-5, diffs
    assert not torch.equal(exact["fc1000"], got["fc1000"])  # it did change the arithmetic
    # the exact net is left as it was (folding worked on a copy)
    assert type(net.layer("bn_conv1")).__name__ == "BatchNormLayer"
    assert not net.layer("res2a_branch1").bias_term


@pytest.mark.corpus
def test_folded_mobilenet_depthwise_is_within_1e_5():
    net = Net.from_prototxt(str(MOBILENET), "TEST", input_shapes={"data": (1, 3, 64, 64)})
    random_weights(net)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 50
    fast = for_inference(net)
    assert len(fast.folded) == 2 * 27
    exact, got = run_both(net, fast, ["fc7"], {"data": x})
    assert compare_outputs(exact, got)["fc7"] < 1e-5


CHAIN = """
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 bias_term: %s } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "%s" %s }
layer { name: "scale" type: "Scale" bottom: "%s" top: "%s" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "%s" top: "out" }
"""


def chain(bias="false", bn_top="conv", bn_param="", scale_top="conv") -> Net:
    text = CHAIN % (bias, bn_top, bn_param, bn_top, scale_top, scale_top)
    net = Net(parse_net(text), "TEST")
    random_weights(net, seed=3)
    return net


@pytest.mark.parametrize("bias", ["true", "false"])
@pytest.mark.parametrize("in_place", [True, False])
def test_a_chain_folds_in_place_or_not(bias, in_place):
    tops = {} if in_place else {"bn_top": "normed", "scale_top": "scaled"}
    net = chain(bias, **tops)
    fast = for_inference(net)
    assert fast.folded == ["bn", "scale"]
    assert fast.folded_blobs == (set() if in_place else {"conv", "normed"})
    assert isinstance(fast, Net) and fast is not net
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    exact, got = run_both(net, fast, ["out"], {"data": x})
    assert compare_outputs(exact, got)["out"] < 1e-5


def test_a_blob_the_caller_reads_keeps_its_value():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    net = chain(bn_top="normed", scale_top="scaled")
    fast = for_inference(net, keep=["normed"])  # extract-features asks for the BatchNorm top
    assert fast.folded == ["bn"]  # the Scale after it stays: folding it would change "normed"
    assert fast.folded_blobs == {"conv"}
    exact, got = run_both(net, fast, ["normed", "scaled"], {"data": x})
    assert max(compare_outputs(exact, got).values()) < 1e-5
    fast = for_inference(net, keep=["conv"])  # the convolution's own top: nothing folds
    assert fast.folded == []
    exact, got = run_both(net, fast, ["conv", "scaled"], {"data": x})
    assert max(compare_outputs(exact, got).values()) < 1e-6


def test_batch_statistics_and_a_shared_blob_are_not_folded():
    batch_stats = chain(bn_param="batch_norm_param { use_global_stats: false }")
    assert for_inference(batch_stats).folded == []
    text = (CHAIN % ("false", "conv", "", "conv", "conv", "conv")) + (
        'layer { name: "again" type: "ReLU" bottom: "conv" top: "other" }\n'
    )
    # the conv's own top read by another layer before the BatchNorm: it must keep its value
    text = text.replace('layer { name: "bn"', 'layer { name: "peek" type: "Power" bottom: "conv" '
                        'top: "peeked" }\nlayer { name: "bn"')  # fmt: skip
    net = Net(parse_net(text), "TEST")
    random_weights(net)
    assert for_inference(net).folded == []


@pytest.mark.corpus
def test_bf16_is_within_its_stated_tolerance_and_returns_float32():
    net = small_resnet50()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 50
    low = for_inference(net, bf16=True)
    exact, got = run_both(net, low, ["fc1000"], {"data": x})
    assert got["fc1000"].dtype == torch.float32
    diff = compare_outputs(exact, got)["fc1000"]
    assert 1e-5 < diff < 5e-2, diff


def test_the_fast_path_needs_a_test_net():
    net = chain()
    net.phase = "TRAIN"
    with pytest.raises(Exception, match="TEST-phase"):
        for_inference(net)


def test_compare_outputs_is_relative_to_the_largest_value():
    assert compare_outputs({"a": np.array([10.0, -20.0])}, {"a": np.array([10.0, -19.0])}) == {
        "a": 0.05
    }


@pytest.mark.subprocess  # inductor's compile workers
def test_compile_runs_the_net_as_one_graph_per_input_shape():
    import torch._dynamo.utils as dynamo_utils

    net = Net(parse_net(BN_NET), "TEST")
    random_weights(net, seed=7)
    compiled = for_inference(net, compile=True, keep=["gap"])
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    for batch in (2, 5, 2):  # the third call reuses the first shape's graph
        x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch))
        exact, got = run_both(net, compiled, ["prob", "gap"], {"data": x})
        assert max(compare_outputs(exact, got).values()) < 1e-5
        assert set(compiled.blobs) == {"data", "prob", "gap"}  # nothing stale of an old pass
        assert compiled.blob_shapes["prob"] == (batch, 3)
    # one graph per shape: compiling Net.forward instead would capture each layer apart
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 2


@pytest.mark.corpus
def test_compile_refuses_a_layer_whose_output_size_depends_on_the_data(capfd):
    net = Net.from_prototxt(str(MOBILENET_SSD), "TEST")
    compiled = for_inference(net, compile=True)
    x = torch.zeros(net.blob_shapes["data"])
    with pytest.raises(CaffeAlexError, match="the size of its output depends on the data") as info:
        compiled(data=x)
    assert (info.value.layer, info.value.layer_type) == ("detection_out", "DetectionOutput")
    assert "\n" not in str(info.value) and "torch.ops" not in capfd.readouterr().err


IP_NET = """
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 3 dim: 2 dim: 5 dim: 4 } } }
layer { name: "plain" type: "InnerProduct" bottom: "data" top: "plain"
  inner_product_param { num_output: 7 } }
layer { name: "turned" type: "InnerProduct" bottom: "data" top: "turned"
  inner_product_param { num_output: 6 transpose: true axis: 2 bias_term: false } }
"""


def test_inner_products_run_on_onednn_packed_weights_only_where_it_is_safe():
    from caffe_alex.tools.inference import _PackedInnerProduct

    net = Net(parse_net(IP_NET), "TEST")
    random_weights(net, seed=9)
    fast = for_inference(net)
    kinds = {n: type(fast.layer(n)) for n in ("plain", "turned")}
    assert kinds == dict.fromkeys(kinds, _PackedInnerProduct)
    for batch in (3, 1):  # packed for a batch of 3, right for any
        x = torch.randn(batch, 2, 5, 4, generator=torch.Generator().manual_seed(batch))
        exact, got = run_both(net, fast, ["plain", "turned"], {"data": x})
        assert max(compare_outputs(exact, got).values()) < 1e-5
        assert got["turned"].shape == (batch, 2, 6)
    assert fast.params["plain"][0] is fast.layer("plain").layer.blobs[0]  # Caffe's blobs kept
    # an export (no run-time layouts) and compile (inductor's own) keep the layer as it is
    for prepared in (for_inference(net, channels_last=False), for_inference(net, fast=False)):
        assert not isinstance(prepared.layer("plain"), _PackedInnerProduct)
    # with a gradient recorded the layer runs as is, so autograd sees F.linear
    x = torch.randn(3, 2, 5, 4, requires_grad=True)
    fast.forward.forward(data=x)["plain"].sum().backward()
    assert x.grad is not None


# ---- the hook: deploy, extract-features, export ------------------------------------------------
BN_NET = """name: "bn_net"
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "normed" }
layer { name: "scale" type: "Scale" bottom: "normed" top: "normed" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "normed" top: "normed" }
layer { name: "gap" type: "Pooling" bottom: "normed" top: "gap"
  pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "gap" top: "fc"
  inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


@pytest.fixture
def bn_files(tmp_path):
    from PIL import Image

    net = Net(parse_net(BN_NET), "TEST")
    random_weights(net, seed=7)
    (tmp_path / "deploy.prototxt").write_text(BN_NET)
    net.save_weights(tmp_path / "w.caffemodel")
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    return tmp_path


def cli(folder, command, *args):
    from click.testing import CliRunner

    from caffe_alex.cli import main

    base = [command, "--model", str(folder / "deploy.prototxt"), "--weights",
            str(folder / "w.caffemodel"), "--mean-values", "104,117,123",
            "--image-dims", "8,8"]  # fmt: skip
    return CliRunner().invoke(main, base + list(args))


def deploy_scores(folder, flags) -> tuple[dict, dict]:
    """({flags: per image, the probabilities by class index}, {flags: the run}) of deploy on
    the three images, once per tuple of options in ``flags``."""
    import json

    images = [str(folder / f"{i}.png") for i in range(3)]
    runs = {flag: cli(folder, "deploy", "--format", "json", "--top", "3", *flag, *images)
            for flag in flags}  # fmt: skip
    for result in runs.values():
        assert result.exit_code == 0, result.output
    scores = {f: [[c["probability"] for c in sorted(row["top"], key=lambda c: c["index"])]
                  for row in json.loads(r.stdout)] for f, r in runs.items()}  # fmt: skip
    return scores, runs


def features(folder, out_folder, blobs: str, flags) -> dict:
    """{flags: {blob: array}} of extract-features on two images, once per options tuple."""
    images = [str(folder / f"{i}.png") for i in range(2)]
    got = {}
    for flag in flags:
        out = out_folder / f"f{len(flag)}.npz"
        result = cli(folder, "extract-features", "--blobs", blobs, "--out", str(out), *flag,
                     "--source", images[0], "--source", images[1])  # fmt: skip
        assert result.exit_code == 0, result.output
        got[flag] = dict(np.load(out))
    return got


def test_deploy_fast_and_bf16_classify_as_the_exact_path(bn_files):
    scores, runs = deploy_scores(bn_files, ((), ("--fast",), ("--bf16",)))
    np.testing.assert_allclose(scores[("--fast",)], scores[()], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(scores[("--bf16",)], scores[()], rtol=5e-2, atol=1e-2)
    assert "bf16 cost on the first batch: prob within" in runs[("--bf16",)].stderr
    assert "bf16 cost" not in runs[("--fast",)].stderr


def test_extract_features_fast_keeps_the_blobs_it_writes(bn_files):
    got = features(bn_files, bn_files, "conv,fc", ((), ("--fast",)))
    assert got[()]["conv"].shape == (2, 6, 8, 8)
    # "conv" is read, so its BatchNorm and Scale stay: the values are the exact path's
    np.testing.assert_array_equal(got[("--fast",)]["conv"], got[()]["conv"])
    np.testing.assert_allclose(got[("--fast",)]["fc"], got[()]["fc"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_export_fast_writes_the_folded_net(bn_files):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from click.testing import CliRunner

    from caffe_alex.cli import main

    paths = {}
    for flag in ((), ("--fast",)):
        paths[flag] = str(bn_files / f"net{len(flag)}.onnx")
        result = CliRunner().invoke(main, ["export", "--model", str(bn_files / "deploy.prototxt"),
                                           "--weights", str(bn_files / "w.caffemodel"), *flag,
                                           paths[flag]])  # fmt: skip
        assert result.exit_code == 0, result.output
    ops = {f: [n.op_type for n in onnx.load(p).graph.node] for f, p in paths.items()}
    assert {"Sub", "Div", "Mul"} <= set(ops[()])  # BatchNorm and Scale, as exported
    assert ops[("--fast",)] == ["Conv", "Relu", "AveragePool", "Reshape", "Gemm", "Softmax"]
    net = Net(parse_net(BN_NET), "TEST")
    net.load_weights(str(bn_files / "w.caffemodel"))
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32) * 50
    with torch.no_grad():
        want = net(data=torch.from_numpy(x))["prob"].numpy()
    sess = ort.InferenceSession(paths[("--fast",)], providers=["CPUExecutionProvider"])
    (prob,) = sess.run(["prob"], {"data": x})
    np.testing.assert_allclose(prob, want, rtol=1e-5, atol=1e-6)


@pytest.mark.subprocess  # inductor's compile workers
def test_deploy_and_extract_features_compile_give_the_exact_numbers(bn_files, tmp_path):
    scores, _ = deploy_scores(bn_files, ((), ("--compile",), ("--fast", "--compile")))
    for flag in (("--compile",), ("--fast", "--compile")):
        np.testing.assert_allclose(scores[flag], scores[()], rtol=1e-5, atol=1e-7)
    got = features(bn_files, tmp_path, "gap,fc", ((), ("--compile",)))
    for blob in ("gap", "fc"):  # a kept blob and an output, both from the compiled graph
        np.testing.assert_allclose(got[("--compile",)][blob], got[()][blob], rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
