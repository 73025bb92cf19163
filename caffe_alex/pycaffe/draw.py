"""pycaffe's ``caffe.draw``: net diagrams from a NetParameter, with pycaffe's functions and
signatures, drawn by caffe-alex's ``tools/draw.py`` (graphviz package, Graphviz's ``dot``)
instead of pydot.

- ``get_edge_label``, ``get_layer_label``, ``get_layer_lr_mult``, ``choose_color_by_layertype``
  and ``get_pooling_types_dict`` give pycaffe's exact strings and values.
- ``draw_net`` / ``draw_net_to_file`` draw with caffe-alex's labels, which are pycaffe's where
  pycaffe's are exact (one kernel size, stride and pad); they also show per-axis values as
  ``HxW``, global pooling as ``global``, and with ``display_lrm`` the decay multipliers too.
  Every blob is a grey octagon (pycaffe leaves a blob last seen as a top unstyled).
- ``phase`` (``caffe_pb2.TRAIN``/``TEST``, or "TRAIN"/"TEST") selects layers by Caffe's own
  include/exclude rules: a rule that names no phase does not count as TRAIN, as it does in
  pycaffe. A layer with both include and exclude rules raises ValueError, as in pycaffe.
- The formats are Graphviz's (``png``, ``svg``, ``pdf``...); ``raw``, ``dot`` and ``gv`` give
  the DOT text itself.
- ``get_pydot_graph`` needs pydot (or pydotplus): it parses our DOT text into a pydot graph;
  without it, it raises ImportError naming ``get_graphviz_graph``, which returns the same
  graph as a ``graphviz.Digraph``.
"""

from __future__ import annotations

import os

from ..formats.atomic import atomic_path
from ..formats.filtering import filter_net, make_state
from ..proto import caffe_pb2
from ..tools import draw as _draw

__all__ = [
    "BLOB_STYLE",
    "LAYER_STYLE_DEFAULT",
    "NEURON_LAYER_STYLE",
    "choose_color_by_layertype",
    "draw_net",
    "draw_net_to_file",
    "get_edge_label",
    "get_graphviz_graph",
    "get_layer_label",
    "get_layer_lr_mult",
    "get_pooling_types_dict",
    "get_pydot_graph",
]

# pycaffe's node styles (module constants code may read)
LAYER_STYLE_DEFAULT = {"shape": "record", "fillcolor": _draw.DEFAULT_COLOUR, "style": "filled"}
NEURON_LAYER_STYLE = {"shape": "record", "fillcolor": _draw.IN_PLACE_COLOUR, "style": "filled"}
BLOB_STYLE = {"shape": "octagon", "fillcolor": _draw.BLOB_COLOUR, "style": "filled"}
_TEXT_FORMATS = ("raw", *_draw.TEXT_FORMATS)


# ---- labels and colours -----------------------------------------------------------------------
def get_pooling_types_dict() -> dict[int, str]:
    """PoolingParameter's pool method numbers -> names (0 -> 'MAX', ...)."""
    methods = caffe_pb2.PoolingParameter.PoolMethod
    return {number: name for name, number in methods.items()}


def get_edge_label(layer: caffe_pb2.LayerParameter) -> str:
    """The label of the edges from a layer to its tops: ``Batch <n>`` for Data, num_output for
    (De)Convolution and InnerProduct, else ``'""'`` (DOT's empty string, as pycaffe returns)."""
    return _draw.edge_label(layer) or '""'


def get_layer_lr_mult(layer: caffe_pb2.LayerParameter) -> tuple[float, float]:
    """The learning-rate multipliers (weights, bias) of a Convolution, Deconvolution or
    InnerProduct layer; unset ones are 1. ValueError for other types or more than 2 params."""
    if layer.type not in _draw.LEARNING_TYPES:
        raise ValueError(f"{layer.type} layers do not have a learning rate multiplier")
    if len(layer.param) > 2:
        raise ValueError(
            f"layer '{layer.name}' has {len(layer.param)} param entries; "
            "expected at most 2 (weights, bias)"
        )
    mults = [spec.lr_mult for spec in layer.param]  # ParamSpec's lr_mult defaults to 1
    return tuple(mults + [1.0] * (2 - len(mults)))


def _spatial_parts(layer: caffe_pb2.LayerParameter) -> list[str]:
    # pycaffe's: pooling's scalar fields; a convolution's first value of each repeated field
    if layer.type == "Pooling":
        p = layer.pooling_param
        kernel, stride, pad = p.kernel_size, p.stride, p.pad
    else:
        p = layer.convolution_param
        kernel = p.kernel_size[0] if len(p.kernel_size) else 1
        stride = p.stride[0] if len(p.stride) else 1
        pad = p.pad[0] if len(p.pad) else 0
    return [f"kernel size: {kernel}", f"stride: {stride}", f"pad: {pad}"]


def get_layer_label(layer: caffe_pb2.LayerParameter, rankdir: str, display_lrm: bool = False):
    """The node label pycaffe gives a layer, as DOT source: in double quotes, the parts (name,
    ``(Type)``, kernel/stride/pad, learning-rate multipliers) joined by a space when the graph
    runs top-bottom (TB/BT), else by DOT's ``\\n`` escape."""
    separator = " " if rankdir in ("TB", "BT") else r"\n"
    kind = layer.type
    if kind == "Pooling":
        kind = f"{kind} {get_pooling_types_dict()[layer.pooling_param.pool]}"
    parts = [layer.name, f"({kind})"]
    if layer.type in ("Convolution", "Deconvolution", "Pooling"):
        parts.append(separator.join(_spatial_parts(layer)))
    if display_lrm and layer.type in _draw.LEARNING_TYPES:
        weights, bias = get_layer_lr_mult(layer)
        if weights or bias:  # frozen layers show none
            parts.append(f"lr mult: {weights:.1f}, {bias:.1f}")
    # quoted so that DOT reads the colons as text
    return '"' + separator.join(parts) + '"'


def choose_color_by_layertype(layertype: str) -> str:
    """The fill colour of a layer node by type (Convolution red, Pooling orange...)."""
    return _draw.LAYER_COLOURS.get(layertype, _draw.DEFAULT_COLOUR)


# ---- graphs -------------------------------------------------------------------------------------
def _phase_name(phase) -> str:
    if isinstance(phase, str):
        return phase.upper()
    return caffe_pb2.Phase.Name(int(phase))  # caffe_pb2.TRAIN / TEST are 0 / 1


def _graph(caffe_net, rankdir, label_edges=True, phase=None, display_lrm=False):
    if phase is not None:
        # filtered here rather than by net_graph so that a bad rule stays a ValueError
        caffe_net = filter_net(caffe_net, make_state(_phase_name(phase)))
    graph = _draw.net_graph(caffe_net, rankdir, display_lrm=display_lrm)
    if not label_edges:
        graph.edges = [(src, dst, "") for src, dst, _ in graph.edges]
    return graph


def get_graphviz_graph(caffe_net, rankdir, label_edges=True, phase=None, display_lrm=False):
    """The net's diagram as a ``graphviz.Digraph`` (caffe-alex's stand-in for pycaffe's
    ``get_pydot_graph``): render it with ``.pipe(format=...)`` or read ``.source``."""
    return _draw.to_digraph(_graph(caffe_net, rankdir, label_edges, phase, display_lrm))


def get_pydot_graph(caffe_net, rankdir, label_edges=True, phase=None, display_lrm=False):
    """The net's diagram as a pydot graph, when pydot or pydotplus is installed."""
    try:  # imported on use: pydot is optional, as it is for pycaffe's drawing
        import pydotplus as pydot
    except ImportError:
        try:
            import pydot  # the same, under its other name
        except ImportError:
            raise ImportError(
                "get_pydot_graph returns a pydot graph and needs pydot (pip install pydot); "
                "caffe-alex draws without it: use get_graphviz_graph (a graphviz.Digraph), "
                "draw_net or draw_net_to_file",
                name="pydot",
            ) from None
    source = get_graphviz_graph(caffe_net, rankdir, label_edges, phase, display_lrm).source
    parsed = pydot.graph_from_dot_data(source)
    # pydot >= 1.2 returns a list of graphs, pydotplus the graph itself
    return parsed[0] if isinstance(parsed, list) else parsed


def draw_net(caffe_net, rankdir, ext="png", phase=None, display_lrm=False) -> bytes:
    """The diagram of ``caffe_net`` (a NetParameter) as ``ext`` bytes: an image format of
    Graphviz's, or DOT text for ``raw``/``dot``/``gv``. ``phase``: None for all layers."""
    graph = _graph(caffe_net, rankdir, phase=phase, display_lrm=display_lrm)
    ext = ext.lower()
    if ext in _TEXT_FORMATS:
        return _draw.to_dot(graph).encode()
    return _draw.render(graph, ext)


def draw_net_to_file(caffe_net, filename, rankdir="LR", phase=None, display_lrm=False) -> None:
    """Draw ``caffe_net`` into ``filename`` in the format its extension names (``.raw``,
    ``.dot`` or ``.gv`` for the DOT text). The file is written only once the drawing is done."""
    filename = os.fspath(filename)
    base = os.path.basename(filename)
    if "." not in base:
        raise ValueError(f"cannot tell the format of '{filename}': give it an extension")
    data = draw_net(caffe_net, rankdir, base.rsplit(".", 1)[1], phase, display_lrm)
    with atomic_path(filename) as tmp, open(tmp, "wb") as f:
        f.write(data)
