"""``caffe-alex draw NET net.html``: draw's diagram as one self-contained web page.

The page holds, for each view of the net (all layers, the TRAIN net, the TEST net; views with
the same layers are one), the SVG that Graphviz's ``dot`` lays out from draw's graph (draw.py:
the same colours, labels and edges), and a JSON table of what each node shows when clicked:
a layer's type, the fields set in its prototxt block, its bottoms and tops with their shapes,
its parameter blobs with shapes and counts, its multiply-adds (summary.py) and, given weights,
per-blob statistics of the stored values; a blob's shape, producers and readers. The page's
script (html_view.js) and style (html_view.css) are inlined: no network, nothing to install,
it works opened from disk.

Pan and zoom are written by hand (html_view.js, about 50 lines over the SVG's viewBox): the
libraries that do it (svg-pan-zoom, panzoom, d3-zoom) would each add more code than the whole
page's script, for the two gestures we need.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from ..errors import CaffeAlexError
from ..formats.atomic import atomic_path
from ..formats.filtering import filter_net, included_indices, make_state
from ..formats.prototxt import to_text
from ..formats.weights import read_weights
from ..log import get_logger
from ..proto import caffe_pb2
from .draw import format_shape, net_graph, notes_of, render
from .summary import build_for_shapes, summarize

log = get_logger()
# what the node shows elsewhere (name, type, wiring) or too large to show (embedded blobs)
_NOT_PARAMETERS = ("name", "type", "bottom", "top", "blobs")
_PHASES = ("TRAIN", "TEST")


@dataclass
class View:
    """One selectable drawing: its name(s), the phases whose nets give its shapes, its layers."""

    label: str
    phases: list[str]
    net_param: caffe_pb2.NetParameter
    nodes: dict[str, dict] = field(default_factory=dict)
    svg: str = ""


def _views(net_param, phase: str | None, level: int, stages: Sequence[str]) -> list[View]:
    """The views asked for; views holding the same layers are merged ("ALL = TRAIN = TEST")."""
    groups: dict[tuple[int, ...], View] = {}
    for label in [phase] if phase else ["ALL", *_PHASES]:
        try:
            if label == "ALL":
                indices, shown = tuple(range(len(net_param.layer))), net_param
            else:
                state = make_state(label, level, stages)
                indices = tuple(included_indices(net_param, state))
                shown = filter_net(net_param, state)
        except ValueError as exc:
            raise CaffeAlexError(str(exc)) from None
        if indices in groups:
            groups[indices].label += f" = {label}"
        else:
            groups[indices] = View(label, list(_PHASES) if label == "ALL" else [label], shown)
    return list(groups.values())


def _build_all(net_param, phases, level, stages, input_shapes, source) -> tuple[dict, list[str]]:
    """The net built (on the meta device) for each phase, and the reasons of those that fail
    (a data layer whose database is not here): their shapes are then left out, not fatal."""
    built, problems = {}, []
    for phase in phases:
        try:
            built[phase] = build_for_shapes(
                net_param,
                phase,
                input_shapes=input_shapes,
                source=source,
                level=level,
                stages=list(stages),
            )
        except CaffeAlexError as exc:
            problems.append(f"{phase} net: {exc}")
    return built, problems


def _parameters(layer: caffe_pb2.LayerParameter) -> str:
    """The fields set in the layer's prototxt block, besides name, type, bottoms and tops."""
    shown = caffe_pb2.LayerParameter()
    shown.CopyFrom(layer)
    for name in _NOT_PARAMETERS:
        shown.ClearField(name)
    return to_text(shown).strip()


def blob_statistics(values: np.ndarray) -> dict[str, float]:
    """mean, std, min, max and mean |x| of one stored blob (in float64)."""
    data = np.asarray(values, dtype=np.float64).reshape(-1)
    if not data.size:
        return {}
    return {
        "mean": float(data.mean()),
        "std": float(data.std()),
        "min": float(data.min()),
        "max": float(data.max()),
        "abs_mean": float(np.abs(data).mean()),
    }


def weight_statistics(paths: str) -> dict[str, list[dict | None]]:
    """Layer name -> statistics of each of its stored blobs; files given as 'a,b' are read in
    order, a later file's layer replacing an earlier's, as loading them into a net does."""
    stats: dict[str, list[dict | None]] = {}
    for path in [p for p in paths.split(",") if p]:
        for layer in read_weights(path).layers:
            stats[layer.name] = [
                None if blob is None else blob_statistics(blob.data) for blob in layer.blobs
            ]
    return stats


class _Blobs:
    """The parameter blobs of each layer, as the built nets have them (read once per net: a
    Net's ``params`` is assembled on each access)."""

    def __init__(self, built: Mapping, stats: Mapping):
        self.stats = stats
        self.nets = [(net.params, {(i.layer, i.index): i.owner for i in net.param_infos})
                     for net in built.values()]  # fmt: skip

    def rows(self, name: str) -> list[dict]:
        """Shape, count, the owner of a shared blob, and the statistics of the stored values."""
        for params, owners in self.nets:
            if name not in params:
                continue
            stored = self.stats.get(name, [])
            rows = []
            for index, blob in enumerate(params[name]):
                owner = owners.get((name, index))
                rows.append({
                    "shape": format_shape(tuple(blob.shape)),
                    "count": math.prod(blob.shape),
                    "shared": f"{owner[0]} #{owner[1]}" if owner else None,
                    "stats": stored[index] if index < len(stored) else None,
                })  # fmt: skip
            return rows
        return []


def _macs(built: Mapping) -> dict[str, int]:
    found: dict[str, int] = {}
    for net in built.values():
        for row in summarize(net).rows:
            found.setdefault(row.name, row.macs)
    return found


def _fill(view: View, number: int, built: Mapping, stats, display_lrm: bool, rankdir: str,
          label_shapes: bool) -> None:  # fmt: skip
    """Lay the view out with dot and describe each node, under ids unique in the page."""
    nets = {p: built[p] for p in view.phases if p in built}
    notes = notes_of(nets) if nets else {}
    graph = net_graph(view.net_param, rankdir=rankdir, phase=None, display_lrm=display_lrm,
                      blob_notes=notes if label_shapes else None)  # fmt: skip
    ids = {key: f"v{number}n{i}" for i, key in enumerate(graph.nodes)}
    for key, attrs in graph.nodes.items():
        attrs["id"] = ids[key]
    nodes = _Nodes(view.net_param, ids, notes, nets, stats)
    for key, node_id in ids.items():
        if key.startswith("blob:"):
            view.nodes[node_id] = nodes.blob(key[len("blob:") :])
        else:
            view.nodes[node_id] = nodes.layer(key)
    svg = render(graph, "svg").decode("utf-8")
    view.svg = svg[svg.index("<svg") :]


class _Nodes:
    """What each node of one view shows when clicked: from the view's layers (keyed as draw's
    graph keys them, ``layer:<name>:<type>``), the page ids of the graph's nodes, the blob
    shapes, the nets built for the view's phases and the stored weights' statistics."""

    def __init__(self, net_param, ids: dict[str, str], notes: Mapping, nets: Mapping, stats):
        self.ids, self.notes, self.stats = ids, notes, stats
        self.macs = _macs(nets) if nets else {}
        self.blob_rows = _Blobs(nets, stats)
        self.layers: dict[str, list[caffe_pb2.LayerParameter]] = {}
        self.producers: dict[str, list[str]] = {}
        self.readers: dict[str, list[str]] = {}
        for layer in net_param.layer:
            key = f"layer:{layer.name}:{layer.type}"
            self.layers.setdefault(key, []).append(layer)
            for bottom in layer.bottom:
                self.readers.setdefault(bottom, []).append(ids[key])
            for top in layer.top:
                self.producers.setdefault(top, []).append(ids[key])

    def blob(self, name: str) -> dict:
        return {
            "kind": "blob", "name": name, "shape": self.notes.get(name, ""),
            "producers": list(dict.fromkeys(self.producers.get(name, []))),
            "readers": list(dict.fromkeys(self.readers.get(name, []))),
        }  # fmt: skip

    def layer(self, key: str) -> dict:
        """The layer (or the layers of one name and type, shown as one node) under ``key``."""
        group = self.layers[key]
        name, kind = group[0].name, group[0].type
        blobs = self.blob_rows.rows(name)
        return {
            "kind": "layer", "name": name, "type": kind,
            "parameters": "\n\n".join(_parameters(layer) for layer in group),
            "bottoms": self._wired(b for layer in group for b in layer.bottom),
            "tops": self._wired(t for layer in group for t in layer.top),
            "blobs": blobs, "count": sum(b["count"] for b in blobs if not b["shared"]),
            # summary counts the multiply-adds of the weight layers only: no 0 for the others
            "macs": self.macs.get(name) or None, "stored": name in self.stats,
        }  # fmt: skip

    def _wired(self, names) -> list[list]:
        names = list(dict.fromkeys(names))
        return [[n, self.notes.get(n, ""), self.ids[f"blob:{n}"]] for n in names]


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _script_json(value) -> str:
    """JSON that an HTML <script> element holds literally: every '<' escaped, so no
    '</script>' or '<!--' inside a name can end it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def html_page(
    net_param: caffe_pb2.NetParameter,
    *,
    phase: str | None = None,
    level: int = 0,
    stages: Sequence[str] = (),
    rankdir: str = "LR",
    display_lrm: bool = False,
    label_shapes: bool = False,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    source=None,
    weights: str | None = None,
) -> str:
    """The page of ``net_param``: views of ``phase`` (None: all layers, TRAIN and TEST) under
    ``level``/``stages``; ``weights`` adds per-blob statistics; ``label_shapes`` writes the
    shapes under the blob names in the drawing too (draw's --shapes)."""
    views = _views(net_param, phase, level, stages)
    built, notes = _built_nets(net_param, views, level, stages, input_shapes, source)
    stats = weight_statistics(weights) if weights else {}
    for number, view in enumerate(views):
        _fill(view, number, built, stats, display_lrm, rankdir, label_shapes)
    data = {
        "net": net_param.name or "Net",
        "weights": weights or None,
        "notes": notes,
        "views": [{"label": v.label, "nodes": v.nodes} for v in views],
    }
    return _page(net_param.name or "Net", views, data)


def _built_nets(net_param, views, level, stages, input_shapes, source) -> tuple[dict, list[str]]:
    """The nets built for the views' phases, and the page's notes on those that cannot be."""
    phases = list(dict.fromkeys(p for view in views for p in view.phases))
    built, problems = _build_all(net_param, phases, level, stages, input_shapes, source)
    notes = [f"shapes unknown for the {p}" for p in problems]
    for problem in problems:
        log.warning("draw: shapes unknown for the %s", problem)
    return built, notes


def _page(title: str, views: list[View], data: dict) -> str:
    """The page template filled in: the views' drawings, the nodes' table, style and script."""
    sections = "\n".join(
        f'<div class="view" data-view="{i}" hidden>{view.svg}</div>' for i, view in enumerate(views)
    )
    parts = {
        "title": html.escape(title),
        "style": _asset("html_view.css"),
        "views": sections,
        "data": _script_json(data),
        "script": _asset("html_view.js"),
    }
    # one pass over the template: text put in is not searched for placeholders again
    return re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m.group(1)], _asset("html_view.html"))


def is_html(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in (".html", ".htm")


def write_page(page: str, path) -> None:
    """Write the page atomically: an interrupted write leaves no half page under ``path``."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
