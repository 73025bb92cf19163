"""caffe-alex summary: AlexNet's totals worked out by hand from its layer shapes, GoogLeNet's,
the per-row shapes, in-place and shared blobs, and the command line."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from caffe_alex.cli import main
from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.prototxt import parse_net_text, read_net
from caffe_alex.tools.summary import build_for_shapes, summarize
from tests.corpus import CORPUS
from tests.paths import ROOT

DEPLOY = ROOT / "models" / "bvlc_alexnet" / "deploy.prototxt"
GOOGLENET = CORPUS / "BVLC__caffe" / "models" / "bvlc_googlenet" / "deploy.prototxt"

# AlexNet at batch 1, by hand: (C_out, H_out, W_out, C_in / group, k) per convolution,
# (outputs, inputs) per inner product.
CONVS = [(96, 55, 55, 3, 11), (256, 27, 27, 48, 5), (384, 13, 13, 256, 3),
         (384, 13, 13, 192, 3), (256, 13, 13, 192, 3)]  # fmt: skip
FCS = [(4096, 256 * 6 * 6), (4096, 4096), (1000, 4096)]
ALEX_PARAMS = sum(c * ci * k * k + c for c, _, _, ci, k in CONVS) + sum(o * i + o for o, i in FCS)
ALEX_MACS = sum(c * h * w * ci * k * k for c, h, w, ci, k in CONVS) + sum(o * i for o, i in FCS)
# float32 tops, in-place ReLU/Dropout tops not counted again
ALEX_TOPS = [3 * 227 * 227, 96 * 55 * 55, 96 * 55 * 55, 96 * 27 * 27, 256 * 27 * 27,
             256 * 27 * 27, 256 * 13 * 13, 384 * 13 * 13, 384 * 13 * 13, 256 * 13 * 13,
             256 * 6 * 6, 4096, 4096, 1000, 1000]  # fmt: skip


def _alexnet(batch: int = 1):
    net_param, _ = read_net(str(DEPLOY))
    return build_for_shapes(net_param, "TEST", input_shapes={"data": (batch, 3, 227, 227)})


def test_alexnet_totals():
    assert ALEX_PARAMS == 60_965_224
    assert ALEX_MACS == 724_406_816  # ~0.72 G, within 1% of the usual figure
    assert abs(ALEX_MACS - 0.72e9) / 0.72e9 < 0.01
    summary = summarize(_alexnet())
    assert summary.params == ALEX_PARAMS
    assert summary.macs == ALEX_MACS
    assert summary.memory == 4 * sum(ALEX_TOPS)


def test_alexnet_rows():
    rows = {r.name: r for r in summarize(_alexnet(batch=2)).rows}
    assert rows["conv1"].top_shapes == [(2, 96, 55, 55)]
    assert rows["conv1"].params == 96 * 3 * 11 * 11 + 96
    assert rows["conv2"].macs == 2 * 256 * 27 * 27 * 48 * 25  # grouped: C_in / 2
    assert rows["pool5"].top_shapes == [(2, 256, 6, 6)] and rows["pool5"].macs == 0
    assert rows["relu1"].memory == 0  # in place
    assert rows["fc6"].macs == 2 * 4096 * 9216
    assert rows["prob"].top_shapes == [(2, 1000)] and rows["prob"].memory == 2 * 1000 * 4
    assert [r.name for r in summarize(_alexnet()).rows][:3] == ["data", "conv1", "relu1"]


@pytest.mark.corpus
def test_googlenet_deploy():
    net_param, _ = read_net(str(GOOGLENET))
    net = build_for_shapes(net_param, "TEST", input_shapes={"data": (1, 3, 224, 224)})
    summary = summarize(net)
    assert summary.params == 6_998_552
    assert abs(summary.macs - 1.58e9) / 1.58e9 < 0.01
    rows = {r.name: r for r in summary.rows}
    assert rows["inception_3a/output"].top_shapes == [(1, 256, 28, 28)]
    assert rows["prob"].top_shapes == [(1, 1000)]


def test_shared_params_deconvolution_and_losses():
    net_param, _ = parse_net_text(
        """
        layer { name: "in" type: "Input" top: "x"
                input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
        layer { name: "a" type: "Convolution" bottom: "x" top: "a"
                param { name: "w" } param { name: "b" }
                convolution_param { num_output: 3 kernel_size: 3 pad: 1 } }
        layer { name: "b" type: "Convolution" bottom: "a" top: "b"
                param { name: "w" } param { name: "b" }
                convolution_param { num_output: 3 kernel_size: 3 pad: 1 } }
        layer { name: "up" type: "Deconvolution" bottom: "b" top: "up"
                convolution_param { num_output: 6 kernel_size: 2 stride: 2 group: 3 } }
        layer { name: "l" type: "EuclideanLoss" bottom: "a" bottom: "b" }
        """
    )
    rows = {r.name: r for r in summarize(build_for_shapes(net_param)).rows}
    assert rows["a"].params == 3 * 3 * 9 + 3 and rows["b"].params == 0  # shared: counted once
    assert rows["b"].macs == rows["a"].macs == 2 * 3 * 16 * 3 * 9
    # the transpose: every bottom element meets C_out/group x kernel weights
    assert rows["up"].top_shapes == [(2, 6, 8, 8)] and rows["up"].macs == 2 * 3 * 16 * 2 * 4
    assert rows["l"].top_shapes == [] and rows["l"].memory == 0  # an automatic loss top


def test_cli_batch_and_input_shape():
    runner = CliRunner()
    result = runner.invoke(main, ["summary", str(DEPLOY), "--batch", "1"])
    assert result.exit_code == 0, result.output
    assert "Total parameters: 60,965,224" in result.output
    assert "Total multiply-adds: 724,406,816 (724.4 M)" in result.output
    assert f"{4 * sum(ALEX_TOPS):,} bytes" in result.output
    assert any(line.split()[:3] == ["conv1", "Convolution", "1x96x55x55"]
               for line in result.output.splitlines())  # fmt: skip
    result = runner.invoke(main, ["summary", str(DEPLOY), "--input-shape", "data=4,3,227,227"])
    assert "4x96x55x55" in result.output
    result = runner.invoke(main, ["summary", str(ROOT / "models/bvlc_alexnet/train_val.prototxt")])
    assert result.exit_code == 1 and "--input-shape" in result.output


def _small_net(tmp_path, dims, conv: str = "num_output: 4 kernel_size: 3") -> str:
    path = tmp_path / "net.prototxt"
    shape = " ".join(f"dim: {d}" for d in dims)
    path.write_text(
        f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {shape} }} }} }}\n'
        f'layer {{ name: "c" type: "Convolution" bottom: "x" top: "c"\n'
        f"  convolution_param {{ {conv} }} }}\n"
        'layer { name: "fc" type: "InnerProduct" bottom: "c" top: "fc"\n'
        "  inner_product_param { num_output: 3 } }\n"
    )
    return str(path)


NEGATIVE = re.compile(r"(?<![\w.])-\d")  # a minus sign before a number (not in a name)


@pytest.mark.parametrize(
    "dims,conv,options,message",
    [
        ((1, 3, -5, 8), "num_output: 4 kernel_size: 3", (), "dimension -5 is negative"),
        ((1, 3, 2147483649, 8), "num_output: 4 kernel_size: 3", (), "2147483649 exceeds INT_MAX"),
        ((1, 3, 8, 8), "num_output: 4 kernel_size: 4294967295", (), "learnable blob 0"),
        ((1, 3, 8, 8), "num_output: 2000000000 kernel_size: 3", (), "exceed INT_MAX"),
        ((1, 3, 8, 8), "num_output: 4 kernel_size: 3 pad: 4294967295", (), "top 'c' (top 0)"),
        ((1, 3, 8, 8), "num_output: 4 kernel_size: 3", ("--input-shape", "x=1,3,-8,8"), "-8"),
    ],
)
def test_cli_refuses_sizes_past_caffes_limits_in_one_line(tmp_path, dims, conv, options, message):
    result = CliRunner().invoke(main, ["summary", _small_net(tmp_path, dims, conv), *options])
    assert result.exit_code == 1
    assert result.output.startswith("caffe-alex: error: ") and result.output.count("\n") == 1
    assert "net.prototxt:" in result.output and message in result.output


def test_summary_never_shows_a_negative_shape_or_count(tmp_path):
    """Generated input shapes around the limits (seeded): each summary is either refused in
    one line or a table without a negative number."""
    rng = random.Random(13)
    edges = [-(2**31), -1, 0, 2**15, 2**31 - 1, 2**31, 2**32 - 1, 2**40]
    outcomes = set()
    for _ in range(40):
        dims = [
            rng.choice(edges) if rng.random() < 0.2 else rng.choice([1, 3, 8]) for _ in range(4)
        ]
        kernel = rng.choice([1, 3, 3, 2**31 - 1, 2**32 - 1])
        net = _small_net(tmp_path, dims, f"num_output: 4 kernel_size: {kernel}")
        result = CliRunner().invoke(main, ["summary", net])
        assert result.exit_code in (0, 1), (dims, kernel, result.output)
        outcomes.add(result.exit_code)
        if result.exit_code == 1:
            assert result.output.count("\n") == 1, (dims, kernel, result.output)
        else:
            assert not NEGATIVE.search(result.output), (dims, kernel, result.output)
    assert outcomes == {0, 1}
    with pytest.raises(CaffeAlexError, match="dimension -1 is negative"):
        build_for_shapes(parse_net_text(Path(_small_net(tmp_path, (1, 3, -1, 4))).read_text())[0])
