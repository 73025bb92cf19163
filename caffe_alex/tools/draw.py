"""Draw a net as Caffe's python/draw_net.py does: layers as filled record boxes labelled with
name, type and key parameters, blobs as grey octagons, edges from each bottom blob to its layer
and from the layer to each top blob (labelled with num_output or the Data batch size).

The graph is built as data (``Graph``), turned into DOT with the ``graphviz`` package (which
quotes names and calls Graphviz's ``dot`` to render), and written atomically.
Differences from draw.py, all deliberate: every blob is an octagon (draw.py leaves a blob that
is last seen as a top, such as ``loss``, as a plain ellipse, a side effect of its bookkeeping);
phases are selected with Caffe's full NetState rules; kernel/stride/pad given per dimension
are shown as ``HxW`` (draw.py shows only the first value, or 0/1); ``--display-lrm`` adds the
decay multipliers; ``shapes`` adds each blob's inferred shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import graphviz

from ..errors import CaffeAlexError
from ..formats.atomic import atomic_path
from ..formats.filtering import filter_net, make_state
from ..proto import caffe_pb2
from .summary import build_for_shapes

# Colours of Caffe's draw.py, by layer family.
LAYER_COLOURS = {
    "Convolution": "#FF5050",
    "Deconvolution": "#FF5050",
    "Pooling": "#FF9900",
    "InnerProduct": "#CC33FF",
}
DEFAULT_COLOUR = "#6495ED"
IN_PLACE_COLOUR = "#90EE90"  # a layer whose only top is its only bottom
BLOB_COLOUR = "#E0E0E0"
LEARNING_TYPES = ("Convolution", "Deconvolution", "InnerProduct")
TEXT_FORMATS = ("dot", "gv")
IMAGE_FORMATS = ("png", "svg", "pdf", "jpg", "jpeg", "gif", "ps", "eps")
RANKDIRS = ("LR", "TB", "BT", "RL")


@dataclass
class Graph:
    """The drawing as data: node id -> attributes (``label`` included), and edges in order."""

    name: str
    rankdir: str
    nodes: dict[str, dict[str, str]] = field(default_factory=dict)
    edges: list[tuple[str, str, str]] = field(default_factory=list)  # (src, dst, label)


def _dims(values, single: int, h: int = 0, w: int = 0, use_hw: bool = False) -> str:
    """One number as draw.py prints it, or ``HxW`` / ``AxBxC`` where it is given per axis."""
    if use_hw:
        return f"{h}x{w}"
    values = list(values)
    if len(values) > 1:
        return "x".join(str(v) for v in values)
    return str(values[0] if values else single)


def _spatial(layer: caffe_pb2.LayerParameter) -> list[str]:
    if layer.type == "Pooling":
        p = layer.pooling_param
        if p.global_pooling:
            kernel = "global"
        else:
            kernel = _dims([p.kernel_size], 0, p.kernel_h, p.kernel_w, p.HasField("kernel_h"))
        stride = _dims([p.stride], 1, p.stride_h, p.stride_w, p.HasField("stride_h"))
        pad = _dims([p.pad], 0, p.pad_h, p.pad_w, p.HasField("pad_h"))
    else:
        p = layer.convolution_param
        kernel = _dims(p.kernel_size, 1, p.kernel_h, p.kernel_w, p.HasField("kernel_h"))
        stride = _dims(p.stride, 1, p.stride_h, p.stride_w, p.HasField("stride_h"))
        pad = _dims(p.pad, 0, p.pad_h, p.pad_w, p.HasField("pad_h"))
    return [f"kernel size: {kernel}", f"stride: {stride}", f"pad: {pad}"]


def _multipliers(layer: caffe_pb2.LayerParameter) -> list[str]:
    # Unset multipliers are 1 (ParamSpec's default); draw.py shows nothing for frozen layers.
    lr = [p.lr_mult for p in layer.param[:2]] + [1.0] * (2 - len(layer.param[:2]))
    decay = [p.decay_mult for p in layer.param[:2]] + [1.0] * (2 - len(layer.param[:2]))
    if not any(lr):
        return []
    return [f"lr mult: {lr[0]:.1f}, {lr[1]:.1f}", f"decay mult: {decay[0]:.1f}, {decay[1]:.1f}"]


def layer_label(layer: caffe_pb2.LayerParameter, separator: str, display_lrm: bool) -> str:
    kind = layer.type
    if kind == "Pooling":
        kind += " " + caffe_pb2.PoolingParameter.PoolMethod.Name(layer.pooling_param.pool)
    parts = [layer.name, f"({kind})"]
    if layer.type in ("Convolution", "Deconvolution", "Pooling"):
        parts += _spatial(layer)
    if display_lrm and layer.type in LEARNING_TYPES:
        parts += _multipliers(layer)
    return separator.join(parts)


def edge_label(layer: caffe_pb2.LayerParameter) -> str:
    """The label of an edge from a layer to its tops (edges into a layer have none)."""
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return ""


def _layer_style(layer: caffe_pb2.LayerParameter) -> dict[str, str]:
    in_place = len(layer.bottom) == 1 and list(layer.bottom) == list(layer.top)
    colour = IN_PLACE_COLOUR if in_place else LAYER_COLOURS.get(layer.type, DEFAULT_COLOUR)
    return {"shape": "record", "style": "filled", "fillcolor": colour}


def net_graph(
    net_param: caffe_pb2.NetParameter,
    rankdir: str = "LR",
    phase: str | None = None,
    display_lrm: bool = False,
    blob_notes: Mapping[str, str] | None = None,
) -> Graph:
    """The diagram of ``net_param`` (all layers, or those of ``phase``: "TRAIN" or "TEST").

    Layers with the same name and type (a net's TRAIN and TEST data layers) are one node, as in
    draw.py; ``blob_notes`` adds a line (e.g. the shape) under a blob's name.
    """
    if phase is not None:
        try:
            net_param = filter_net(net_param, make_state(phase))
        except ValueError as exc:
            raise CaffeAlexError(str(exc)) from None
    # Side by side (LR/RL) a label grows downwards; stacked (TB/BT) it grows sideways.
    separator = " " if rankdir in ("TB", "BT") else "\n"
    graph = Graph(net_param.name or "Net", rankdir)
    for layer in net_param.layer:
        node = f"layer:{layer.name}:{layer.type}"
        label = layer_label(layer, separator, display_lrm)
        graph.nodes[node] = {**_layer_style(layer), "label": label}
        for bottom in layer.bottom:
            _add_blob(graph, bottom, separator, blob_notes)
            graph.edges.append((f"blob:{bottom}", node, ""))
        for top in layer.top:
            _add_blob(graph, top, separator, blob_notes)
            graph.edges.append((node, f"blob:{top}", edge_label(layer)))
    return graph


def state_net(net_param: caffe_pb2.NetParameter, phase: str, level: int = 0,
              stages=()) -> caffe_pb2.NetParameter:  # fmt: skip
    """The layers of ``net_param`` that the state (phase, level, stages) includes."""
    try:
        return filter_net(net_param, make_state(phase, level, stages))
    except ValueError as exc:
        raise CaffeAlexError(str(exc)) from None


def _add_blob(graph: Graph, name: str, separator: str, notes) -> None:
    note = (notes or {}).get(name)
    label = f"{name}{separator}{note}" if note else name
    style = {"shape": "octagon", "style": "filled", "fillcolor": BLOB_COLOUR}
    graph.nodes[f"blob:{name}"] = {**style, "label": label}


def _dot_text(text: str, record: bool = False) -> str:
    """A label as DOT reads it back literally: backslashes and quotes escaped, line breaks as
    DOT's ``\\n``, and in a record label the field delimiters ``{}|<>`` escaped too."""
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    if record:
        for char in "{}|<>":
            text = text.replace(char, "\\" + char)
    return text.replace("\n", "\\n")


def to_digraph(graph: Graph) -> graphviz.Digraph:
    """The drawing as a ``graphviz.Digraph``. Node ids are short and plain (``layer3``,
    ``blob7``): the graphviz package reads a ':' in an edge's end as a port."""
    ids = {key: f"{key.split(':', 1)[0]}{i}" for i, key in enumerate(graph.nodes)}
    dot = graphviz.Digraph(graph.name, graph_attr={"rankdir": graph.rankdir})
    for key, attrs in graph.nodes.items():
        record = attrs.get("shape") == "record"
        label = graphviz.nohtml(_dot_text(attrs["label"], record))
        dot.node(ids[key], label=label, **{k: v for k, v in attrs.items() if k != "label"})
    for src, dst, label in graph.edges:
        dot.edge(ids[src], ids[dst], label=graphviz.nohtml(_dot_text(label)))
    return dot


def to_dot(graph: Graph) -> str:
    """The DOT text of the drawing (what ``.dot`` output writes)."""
    return to_digraph(graph).source


def output_format(path: str) -> str:
    """The format a file name asks for, checked before any work is done."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in TEXT_FORMATS + IMAGE_FORMATS:
        known = ", ".join(TEXT_FORMATS + IMAGE_FORMATS)
        raise CaffeAlexError(f"cannot draw to '{path}': use an extension among {known}")
    return fmt


def render(graph: Graph, fmt: str) -> bytes:
    """The diagram as ``fmt`` bytes: DOT text as it is, images through Graphviz's ``dot``."""
    if fmt in TEXT_FORMATS:
        return to_dot(graph).encode()
    try:
        return to_digraph(graph).pipe(format=fmt, quiet=True)  # its message is in ours
    except graphviz.ExecutableNotFound:
        raise CaffeAlexError(
            f"rendering .{fmt} needs Graphviz's 'dot' program: install graphviz "
            "(apt-get install graphviz), or draw to a .dot file"
        ) from None
    except BrokenPipeError:  # dot exited before it read the whole graph
        raise CaffeAlexError(f"Graphviz's dot stopped before reading the graph (.{fmt})") from None
    except graphviz.CalledProcessError as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        reason = stderr.strip().splitlines() or ["no message"]
        raise CaffeAlexError(f"Graphviz's dot failed to render .{fmt}: {reason[0]}") from None


def draw_net_to_file(net_param: caffe_pb2.NetParameter, path: str, **options) -> None:
    """Draw ``net_param`` to ``path``, in the format its extension names (see ``net_graph``)."""
    fmt = output_format(path)
    data = render(net_graph(net_param, **options), fmt)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def format_shape(shape) -> str:
    return " x ".join(str(d) for d in shape) if len(shape) else "scalar"


def shape_notes(
    net_param: caffe_pb2.NetParameter,
    phase: str | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    source=None,
) -> dict[str, str]:
    """Each blob's inferred shape as text, from the net built for ``phase``; for all phases
    (None) from both, with the phase named where TRAIN and TEST differ (e.g. batch sizes)."""
    phases = [phase] if phase else ["TRAIN", "TEST"]
    built = {
        p: build_for_shapes(net_param, p, input_shapes=input_shapes, source=source) for p in phases
    }
    return notes_of(built)


def notes_of(built: Mapping) -> dict[str, str]:
    """Each blob's shape as text from nets built per phase ({"TRAIN": net, ...}): one shape
    where the phases agree, else the shape of each phase that has the blob."""
    phases = list(built)
    notes = {}
    for name in dict.fromkeys(n for net in built.values() for n in net.blob_shapes):
        found = {p: net.blob_shapes[name] for p, net in built.items() if name in net.blob_shapes}
        if len(set(found.values())) == 1 and len(found) == len(phases):
            notes[name] = format_shape(next(iter(found.values())))
        else:
            notes[name] = ", ".join(f"{p}: {format_shape(s)}" for p, s in found.items())
    return notes
