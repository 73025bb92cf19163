"""caffe-alex draw: the graph follows Caffe's draw_net.py conventions, renders, and every corpus
net draws. The expected graphs are written here from draw_net's documented conventions; our
DOT text is read back with a small parser of the one-statement-per-line form we emit."""

from __future__ import annotations

import io
import re
import shutil
from collections import Counter

import pytest
from click.testing import CliRunner

from caffe_alex.cli import main
from caffe_alex.formats.prototxt import parse_net_text, read_net
from caffe_alex.tools import draw
from tests.corpus import CORPUS
from tests.paths import ROOT
from tests.test_corpus_build import (
    CORPUS_LAYERS,
    _guessed_source_shapes,
    _read_or_skip,
    _states,
    corpus_nets,
)

ALEXNET = ROOT / "models" / "bvlc_alexnet" / "train_val.prototxt"
GOOGLENET = CORPUS / "BVLC__caffe" / "models" / "bvlc_googlenet" / "train_val.prototxt"
ALEX_INPUTS = {"data": (256, 3, 227, 227), "label": (256,)}

# -- reading our DOT back --------------------------------------------------------------------
# The subset the graphviz package writes: one statement a line, IDs and values bare or quoted.
_TERM = r'"(?:[^"\\]|\\.)*"|[^\s\[\]=;"]+'
_NODE = re.compile(rf"^\s*({_TERM}) \[(.*)\]$")
_EDGE = re.compile(rf"^\s*({_TERM}) -> ({_TERM}) \[(.*)\]$")
_ATTR = re.compile(rf"(\w+)=({_TERM})")


def _unescape(term: str) -> str:
    if not term.startswith('"'):
        return term
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), term[1:-1])


def _attrs(text: str) -> dict[str, str]:
    return {k: _unescape(v) for k, v in _ATTR.findall(text)}


def parse_dot(text: str):
    """(nodes: id -> attrs, edges: [(src id, dst id, label)]) of our DOT output."""
    nodes, edges = {}, []
    lines = text.splitlines()
    assert lines[0].startswith("digraph ") and lines[-1] == "}"
    for line in lines[1:-1]:
        if line.strip().startswith("graph ["):
            continue
        edge = _EDGE.match(line)
        if edge:
            src, dst, attrs = edge.groups()
            edges.append((_unescape(src), _unescape(dst), _attrs(attrs)["label"]))
            continue
        node = _NODE.match(line)
        assert node, f"unexpected DOT line: {line!r}"
        nodes[_unescape(node.group(1))] = _attrs(node.group(2))
    return nodes, edges


def drawn(text: str):
    """Nodes as a Counter of (label, shape, fillcolor), edges as a Counter of label triples."""
    nodes, edges = parse_dot(text)
    label = {node: attrs["label"] for node, attrs in nodes.items()}
    node_set = Counter((a["label"], a["shape"], a["fillcolor"]) for a in nodes.values())
    return node_set, Counter((label[s], label[d], e) for s, d, e in edges)


# -- the expectation, from draw_net.py's conventions -----------------------------------------
def expected_colour(layer) -> str:
    """In-place neuron layers green; convolutions red, pooling orange, inner products purple,
    everything else blue."""
    if len(layer.bottom) == 1 and len(layer.top) == 1 and layer.bottom[0] == layer.top[0]:
        return "#90EE90"
    return {
        "Convolution": "#FF5050",
        "Deconvolution": "#FF5050",
        "Pooling": "#FF9900",
        "InnerProduct": "#CC33FF",
    }.get(layer.type, "#6495ED")


def expected_label(layer, sep: str = "\n") -> str:
    """``name``, ``(Type)`` (``(Pooling MAX)``), then kernel size, stride and pad for spatial
    layers (these nets give them as single values)."""
    lines = [layer.name]
    if layer.type == "Pooling":
        pool = layer.pooling_param
        lines.append(f"(Pooling {['MAX', 'AVE', 'STOCHASTIC'][pool.pool]})")
        lines += [f"kernel size: {pool.kernel_size}", f"stride: {pool.stride}"]
        lines.append(f"pad: {pool.pad}")
    elif layer.type == "Convolution":
        conv = layer.convolution_param
        lines.append("(Convolution)")
        lines.append(f"kernel size: {conv.kernel_size[0]}")
        lines.append(f"stride: {conv.stride[0] if conv.stride else 1}")
        lines.append(f"pad: {conv.pad[0] if conv.pad else 0}")
    else:
        lines.append(f"({layer.type})")
    return sep.join(lines)


def expected_edge_label(layer) -> str:
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type == "Convolution":
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return ""


def expected_graph(net_param):
    """draw_net with all phases: one node per (layer name, type), the last such layer's label;
    a grey octagon per blob; an edge per bottom and per top, tops labelled."""
    layers = {}
    edges = Counter()
    for layer in net_param.layer:
        label = expected_label(layer)
        layers[(layer.name, layer.type)] = (label, "record", expected_colour(layer))
        for bottom in layer.bottom:
            edges[(bottom, label, "")] += 1
        for top in layer.top:
            edges[(label, top, expected_edge_label(layer))] += 1
    blobs = {b for layer in net_param.layer for b in (*layer.bottom, *layer.top)}
    nodes = Counter(layers.values()) + Counter((b, "octagon", "#E0E0E0") for b in blobs)
    return nodes, edges


@pytest.mark.parametrize(
    "path",
    [ALEXNET, pytest.param(GOOGLENET, marks=pytest.mark.corpus)],
    ids=["alexnet", "googlenet"],
)
def test_graph_follows_draw_net_conventions(path):
    net_param, _ = read_net(str(path))
    nodes, edges = drawn(draw.to_dot(draw.net_graph(net_param)))
    want_nodes, want_edges = expected_graph(net_param)
    assert nodes == want_nodes
    assert edges == want_edges


def test_alexnet_details():
    net_param, _ = read_net(str(ALEXNET))
    nodes, edges = drawn(draw.to_dot(draw.net_graph(net_param)))
    # the TRAIN and TEST data layers are one node with two batch sizes on its edges
    assert edges[("data\n(Data)", "data", "Batch 256")] == 1
    assert edges[("data\n(Data)", "label", "Batch 50")] == 1
    conv1 = "conv1\n(Convolution)\nkernel size: 11\nstride: 4\npad: 0"
    assert nodes[(conv1, "record", "#FF5050")] == 1
    # an in-place layer: an edge out of its blob and one back into it
    assert edges[("conv1", "relu1\n(ReLU)", "")] == edges[("relu1\n(ReLU)", "conv1", "")] == 1
    assert nodes[("pool1\n(Pooling MAX)\nkernel size: 3\nstride: 2\npad: 0", "record", "#FF9900")]


def test_phase_rankdir_and_multipliers():
    net_param, _ = read_net(str(ALEXNET))
    test = draw.to_dot(draw.net_graph(net_param, "TB", phase="TEST", display_lrm=True))
    nodes, edges = drawn(test)
    labels = {label for label, _, _ in nodes}
    assert "accuracy (Accuracy)" in labels  # TB/BT: words on one line
    assert "conv1 (Convolution) kernel size: 11 stride: 4 pad: 0 lr mult: 1.0, 2.0 " \
        "decay mult: 1.0, 0.0" in labels  # fmt: skip
    assert {e for _, _, e in edges} >= {"Batch 50"} and "Batch 256" not in {e for *_, e in edges}
    train = drawn(draw.to_dot(draw.net_graph(net_param, phase="TRAIN")))[0]
    assert not any(label.startswith("accuracy") for label, _, _ in train)
    assert "graph [rankdir=TB]" in test


def test_kernel_given_per_axis_and_record_characters():
    net_param, _ = parse_net_text(
        """
        name: "x"
        layer { name: "in{1}" type: "Input" top: "a|b" input_param { shape { dim: 1 } } }
        layer { name: "c" type: "Convolution" bottom: "a|b" top: "c"
                convolution_param { num_output: 2 kernel_h: 1 kernel_w: 7 pad_h: 0 pad_w: 3 } }
        layer { name: "p" type: "Pooling" bottom: "c" top: "p"
                pooling_param { pool: AVE global_pooling: true } }
        """
    )
    text = draw.to_dot(draw.net_graph(net_param))
    assert r'label="in\{1\}\n(Input)"' in text  # record delimiters escaped
    labels = {label for label, _, _ in drawn(text)[0]}
    assert "c\n(Convolution)\nkernel size: 1x7\nstride: 1\npad: 0x3" in labels
    assert "p\n(Pooling AVE)\nkernel size: global\nstride: 1\npad: 0" in labels
    assert {"in{1}\n(Input)", "a|b"} <= labels


@pytest.mark.slow
def test_shapes_label_blobs():
    net_param, source = read_net(str(ALEXNET))
    notes = draw.shape_notes(net_param, None, ALEX_INPUTS, source)
    assert notes["data"] == "256 x 3 x 227 x 227" and notes["fc8"] == "256 x 1000"
    assert notes["loss"] == "scalar"  # the same in both phases: said once
    assert notes["accuracy"] == "TEST: scalar"  # a blob of one phase only
    nodes, _ = drawn(draw.to_dot(draw.net_graph(net_param, blob_notes=notes)))
    labels = {label for label, _, _ in nodes}
    assert "pool5\n256 x 256 x 6 x 6" in labels


def _png_size(data: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("dot"), reason="Graphviz's dot is not installed")
def test_alexnet_png_renders(tmp_path):
    out = tmp_path / "alexnet.png"
    result = CliRunner().invoke(main, ["draw", str(ALEXNET), str(out), "--shapes",
                                       "--input-shape", "data=256,3,227,227",
                                       "--input-shape", "label=256"])  # fmt: skip
    assert result.exit_code == 0, result.output
    image = _png_size(out.read_bytes())
    assert image.format == "PNG" and image.width > 2000 and image.height > 100
    colours = {c for _, c in image.convert("RGB").getcolors(1 << 20)}
    assert {(0xFF, 0x50, 0x50), (0xFF, 0x99, 0x00), (0xCC, 0x33, 0xFF)} <= colours


def test_dot_output_needs_no_graphviz(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no dot program to be found
    out = tmp_path / "net.dot"
    result = CliRunner().invoke(main, ["draw", str(ALEXNET), str(out), "--phase", "test"])
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("digraph AlexNet {")
    result = CliRunner().invoke(main, ["draw", str(ALEXNET), str(tmp_path / "net.png")])
    assert result.exit_code == 1
    assert "install graphviz (apt-get install graphviz)" in result.output


def test_bad_extension_and_missing_shapes(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["draw", str(ALEXNET), str(tmp_path / "n.xyz")])
    assert result.exit_code == 1 and "use an extension among" in result.output
    result = runner.invoke(main, ["draw", str(ALEXNET), str(tmp_path / "n.dot"), "--shapes"])
    assert result.exit_code == 1 and "--input-shape data=N,C,H,W" in result.output


# -- every corpus net draws ------------------------------------------------------------------
RENDERED = {"BVLC__caffe/examples/mnist/lenet_train_test.prototxt"}


@pytest.mark.corpus
@pytest.mark.parametrize("path", corpus_nets(), ids=lambda p: str(p.relative_to(CORPUS)))
def test_corpus_net_draws(path, monkeypatch):
    monkeypatch.syspath_prepend(str(CORPUS_LAYERS))  # the Python layers' modules, as in a build
    net_param, source = _read_or_skip(path)
    graph = draw.net_graph(net_param)
    assert {f"layer:{lp.name}:{lp.type}" for lp in net_param.layer} <= set(graph.nodes)
    nodes, _ = parse_dot(draw.to_dot(graph))
    assert len(nodes) == len(graph.nodes)
    shapes = _guessed_source_shapes(net_param)
    # every net test_corpus_build builds gets its shapes drawn: a failure here is a defect. A
    # net whose TEST layers all need a stage (mnist_autoencoder) is drawn in TRAIN, as Caffe
    # builds neither phase of it without the stage.
    phase = "TEST" if _states(net_param, "TEST") == [[]] else "TRAIN"
    assert _states(net_param, phase) == [[]]
    notes = draw.shape_notes(net_param, phase, shapes, source)
    graph = draw.net_graph(net_param, phase=phase, blob_notes=notes)
    parse_dot(draw.to_dot(graph))
    if str(path.relative_to(CORPUS)) in RENDERED and shutil.which("dot"):
        assert _png_size(draw.render(graph, "png")).width > 100


def test_names_dot_would_misread_are_drawn_as_written():
    # ':' is graphviz's port syntax in an edge, '<...>' an HTML label, '"' and '\' escapes
    net_param, _ = parse_net_text(
        r"""
        layer { name: "a:b\"c\\d" type: "Input" top: "<x>" input_param { shape { dim: 1 } } }
        layer { name: "r" type: "ReLU" bottom: "<x>" top: "y:z" }
        """
    )
    graph = draw.net_graph(net_param)
    nodes, edges = drawn(draw.to_dot(graph))
    labels = {label for label, _, _ in nodes}
    assert {'a:b"c\\d\n(Input)', "<x>", "y:z", "r\n(ReLU)"} == labels
    assert {(s, d) for s, d, _ in edges} == {
        ('a:b"c\\d\n(Input)', "<x>"), ("<x>", "r\n(ReLU)"), ("r\n(ReLU)", "y:z")
    }
    if shutil.which("dot"):
        assert _png_size(draw.render(graph, "png")).width > 10
