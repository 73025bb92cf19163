"""caffe_alex.pycaffe.draw as pycaffe's caffe.draw: pycaffe's label and colour functions, the
DOT and PNG drawings, phases, files, and pycaffe's own test (every net of the tree draws)."""

from __future__ import annotations

import re
import shutil
import sys
import types

import graphviz
import pytest
from google.protobuf import text_format

from caffe_alex.proto import caffe_pb2
from caffe_alex.pycaffe import draw
from tests.paths import ROOT

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is missing")

TINY = """
name: "tiny"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        data_param { batch_size: 64 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
        data_param { batch_size: 100 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        param { lr_mult: 1 } param { lr_mult: 2 }
        convolution_param { num_output: 20 kernel_size: 5 stride: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
        inner_product_param { num_output: 10 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "ip1" bottom: "label" top: "accuracy"
        include { phase: TEST } }
"""


def net_of(text: str) -> caffe_pb2.NetParameter:
    return text_format.Parse(text, caffe_pb2.NetParameter())


def layer_of(text: str) -> caffe_pb2.LayerParameter:
    return text_format.Parse(text, caffe_pb2.LayerParameter())


# ---- reading the DOT text back (the one-statement-a-line form the graphviz package writes) ---
_TERM = r'"(?:[^"\\]|\\.)*"|[^\s\[\]=;"]+'
_NODE = re.compile(rf"^\s*(\w+) \[label=({_TERM}) (.*)\]$")
_EDGE = re.compile(rf"^\s*(\w+) -> (\w+) \[label=({_TERM})\]$")


def _text(term: str) -> str:
    if not term.startswith('"'):
        return term
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), term[1:-1])


def read_dot(dot: bytes):
    """({label: attribute text}, {(src label, dst label, edge label)}) of a drawing."""
    labels, attrs, edges = {}, {}, set()
    for line in dot.decode().splitlines():
        if node := _NODE.match(line):
            labels[node[1]] = _text(node[2])
            attrs[_text(node[2])] = node[3]
        elif edge := _EDGE.match(line):
            edges.add((edge[1], edge[2], _text(edge[3])))
    return attrs, {(labels[s], labels[d], e) for s, d, e in edges}


# ---- pycaffe's label and colour functions ------------------------------------------------------
def test_get_edge_label():
    net = net_of(TINY)
    assert draw.get_edge_label(net.layer[0]) == "Batch 64"
    assert draw.get_edge_label(net.layer[2]) == "20"
    assert draw.get_edge_label(net.layer[5]) == "10"
    deconv = layer_of('type: "Deconvolution" convolution_param { num_output: 3 }')
    assert draw.get_edge_label(deconv) == "3"
    assert draw.get_edge_label(net.layer[3]) == '""'  # DOT's empty string


def test_get_layer_label():
    net = net_of(TINY)
    conv, pool, relu = net.layer[2], net.layer[4], net.layer[3]
    lr = "LR"
    assert draw.get_layer_label(conv, lr) == (
        r'"conv1\n(Convolution)\nkernel size: 5\nstride: 1\npad: 0"'  # DOT's \n, not newlines
    )
    pooled = '"pool1 (Pooling MAX) kernel size: 2 stride: 2 pad: 0"'  # TB/BT: spaces
    assert draw.get_layer_label(pool, "TB") == pooled
    assert draw.get_layer_label(pool, "BT") == draw.get_layer_label(pool, "TB")
    assert draw.get_layer_label(relu, "RL") == r'"relu1\n(ReLU)"'
    assert draw.get_layer_label(conv, "TB", display_lrm=True).endswith(' lr mult: 1.0, 2.0"')
    assert "lr mult" not in draw.get_layer_label(relu, "TB", display_lrm=True)
    # pycaffe shows a convolution's first value of each list, with defaults 1 / 1 / 0
    bare = layer_of('name: "c" type: "Convolution" convolution_param { kernel_h: 3 kernel_w: 5 }')
    assert draw.get_layer_label(bare, "TB") == '"c (Convolution) kernel size: 1 stride: 1 pad: 0"'
    listed = layer_of(
        'name: "c" type: "Convolution" convolution_param { kernel_size: 3 kernel_size: 5 pad: 1 }'
    )
    assert draw.get_layer_label(listed, "TB") == '"c (Convolution) kernel size: 3 stride: 1 pad: 1"'


def test_get_layer_lr_mult():
    ip = layer_of('name: "ip" type: "InnerProduct"')
    assert draw.get_layer_lr_mult(ip) == (1.0, 1.0)
    ip.param.add(lr_mult=0.5)
    assert draw.get_layer_lr_mult(ip) == (0.5, 1.0)
    ip.param.add(lr_mult=0)
    ip.param[0].lr_mult = 0
    assert draw.get_layer_lr_mult(ip) == (0.0, 0.0)
    assert "lr mult" not in draw.get_layer_label(ip, "LR", display_lrm=True)  # frozen
    ip.param.add()
    with pytest.raises(ValueError):
        draw.get_layer_lr_mult(ip)
    with pytest.raises(ValueError, match="ReLU"):
        draw.get_layer_lr_mult(layer_of('type: "ReLU"'))


def test_colours_and_pooling_names():
    assert draw.choose_color_by_layertype("Convolution") == "#FF5050"
    assert draw.choose_color_by_layertype("Deconvolution") == "#FF5050"
    assert draw.choose_color_by_layertype("Pooling") == "#FF9900"
    assert draw.choose_color_by_layertype("InnerProduct") == "#CC33FF"
    assert draw.choose_color_by_layertype("ReLU") == "#6495ED"
    assert draw.get_pooling_types_dict() == {0: "MAX", 1: "AVE", 2: "STOCHASTIC"}
    assert draw.NEURON_LAYER_STYLE["fillcolor"] == "#90EE90"
    assert draw.BLOB_STYLE == {"shape": "octagon", "fillcolor": "#E0E0E0", "style": "filled"}


# ---- drawings ----------------------------------------------------------------------------------
def test_dot_drawing_labels_and_edges():
    attrs, edges = read_dot(draw.draw_net(net_of(TINY), "LR", ext="dot"))
    conv = "conv1\n(Convolution)\nkernel size: 5\nstride: 1\npad: 0"
    pool = "pool1\n(Pooling MAX)\nkernel size: 2\nstride: 2\npad: 0"
    assert 'fillcolor="#FF5050" shape=record' in attrs[conv]
    assert 'fillcolor="#FF9900"' in attrs[pool]
    assert 'fillcolor="#90EE90"' in attrs["relu1\n(ReLU)"]  # in place
    assert 'fillcolor="#CC33FF"' in attrs["ip1\n(InnerProduct)"]
    assert "shape=octagon" in attrs["conv1"] and "shape=octagon" in attrs["loss"]
    assert {
        # one node for both data layers, its edges labelled with each batch size
        ("data\n(Data)", "data", "Batch 64"),
        ("data\n(Data)", "label", "Batch 100"),
        ("data", conv, ""),
        (conv, "conv1", "20"),
        ("conv1", "relu1\n(ReLU)", ""),
        ("relu1\n(ReLU)", "conv1", ""),
        ("ip1\n(InnerProduct)", "ip1", "10"),
        ("label", "accuracy\n(Accuracy)", ""),
    } <= edges


def test_phases_and_rankdir():
    net = net_of(TINY)
    for phase in (caffe_pb2.TEST, "TEST", "test"):
        attrs, edges = read_dot(draw.draw_net(net, "TB", ext="raw", phase=phase))
        assert "accuracy (Accuracy)" in attrs  # TB: words on one line
        assert {e for *_, e in edges} >= {"Batch 100"} and "Batch 64" not in {e for *_, e in edges}
    attrs, edges = read_dot(draw.draw_net(net, "LR", ext="gv", phase=caffe_pb2.TRAIN))
    assert "accuracy\n(Accuracy)" not in attrs and ("data\n(Data)", "data", "Batch 64") in edges
    assert b"rankdir=BT" in draw.draw_net(net, "BT", ext="dot")
    # pycaffe refuses a layer with both kinds of rules
    net.layer[3].include.add(phase=caffe_pb2.TRAIN)
    net.layer[3].exclude.add(phase=caffe_pb2.TEST)
    with pytest.raises(ValueError, match="relu1"):
        draw.draw_net(net, "LR", ext="dot", phase=caffe_pb2.TEST)


def test_display_lrm():
    attrs, _ = read_dot(draw.draw_net(net_of(TINY), "LR", ext="dot", display_lrm=True))
    assert any(label.startswith("conv1\n") and "\nlr mult: 1.0, 2.0" in label for label in attrs)


def test_graphviz_graph_and_unlabelled_edges():
    graph = draw.get_graphviz_graph(net_of(TINY), "LR", label_edges=False)
    assert isinstance(graph, graphviz.Digraph)
    _, edges = read_dot(graph.source.encode())
    assert edges and {e for *_, e in edges} == {""}


@needs_dot
def test_png(tmp_path):
    png = draw.draw_net(net_of(TINY), "LR")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    out = tmp_path / "net.png"
    draw.draw_net_to_file(net_of(TINY), str(out), phase=caffe_pb2.TRAIN)
    assert out.read_bytes().startswith(b"\x89PNG")
    draw.draw_net_to_file(net_of(TINY), tmp_path / "net.svg", "TB")
    assert b"<svg" in (tmp_path / "net.svg").read_bytes()


def test_files_by_extension(tmp_path):
    net = net_of(TINY)
    draw.draw_net_to_file(net, str(tmp_path / "net.raw"))
    text = (tmp_path / "net.raw").read_bytes()
    assert text.startswith(b"digraph tiny {") and text == draw.draw_net(net, "LR", "dot")
    with pytest.raises(ValueError, match="extension"):
        draw.draw_net_to_file(net, str(tmp_path / "net"))
    with pytest.raises(ValueError):
        draw.draw_net_to_file(net, str(tmp_path / "net.nosuchformat"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.raw"]  # nothing half-written


def test_get_pydot_graph(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydotplus", None)
    monkeypatch.setitem(sys.modules, "pydot", None)
    with pytest.raises(ImportError, match="get_graphviz_graph"):
        draw.get_pydot_graph(net_of(TINY), "LR")
    # with pydot there: the same DOT text, parsed by pydot (a stand-in module here)
    fake = types.ModuleType("pydot")
    fake.graph_from_dot_data = lambda source: [("parsed", source)]
    monkeypatch.setitem(sys.modules, "pydot", fake)
    kind, source = draw.get_pydot_graph(net_of(TINY), "LR", phase=caffe_pb2.TEST)
    assert kind == "parsed"
    assert source == draw.draw_net(net_of(TINY), "LR", "dot", phase=caffe_pb2.TEST).decode()


# ---- pycaffe's test_draw: every net definition of the tree draws -------------------------------
NETS = sorted(
    path
    for folder in ("models", "examples")
    for path in (ROOT / folder).rglob("*.prototxt")
    if "solver" not in path.name
)


@pytest.mark.parametrize("path", NETS, ids=[str(p.relative_to(ROOT)) for p in NETS])
def test_draws_every_net_of_the_tree(path):
    net = text_format.Merge(path.read_text(), caffe_pb2.NetParameter())
    attrs, _ = read_dot(draw.draw_net(net, "LR", ext="dot"))
    assert len(attrs) >= len({(layer.name, layer.type) for layer in net.layer})
