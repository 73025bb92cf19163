"""``caffe-alex export --torch``: a net as plain PyTorch source plus its weights, runnable with
torch alone (no caffe-alex).

The plan is traced with torch.export (as for ONNX, onnx_export.py); the exported graph, ATen
operators with the parameters as arguments, is written as a Python function, and a small
``nn.Module`` holds the parameters under Caffe's names (``<layer>.<index>``, dots made
``__``) and calls it. The weights go beside it in a ``.pt`` state dict:

    import torch, net                      # the written net.py
    model = net.Net()
    model.load_state_dict(torch.load("net.pt"))
    outputs = model(data)                  # {output blob name: tensor}
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from torch.export.graph_signature import InputKind, OutputKind

from ..errors import CaffeAlexError
from ..formats.atomic import atomic_path
from ..net import Net
from .tracing import example_inputs, net_up_to, quiet_export, trace_net

# what the generated code may name besides torch's operators
_GLOBALS = {"torch": "import torch", "operator": "import operator", "math": "import math",
            "inf": "inf = float('inf')", "nan": "nan = float('nan')",
            "device": "from torch import device", "NoneType": "NoneType = type(None)"}  # fmt: skip


@dataclass
class TorchExport:
    source: str
    weights: str
    inputs: list[str]
    outputs: list[str]


def _python_name(target: str) -> str:
    """A state-dict key for a traced parameter: net.layers.<key>.blobs.<i> -> <key>__<i>."""
    match = re.fullmatch(r"net\.layers\.(.+)\.blobs\.(\d+)", target)
    name = f"{match.group(1)}__{match.group(2)}" if match else target
    return re.sub(r"\W", "_", name)


def export_torch(net: Net, path, *, dynamic_batch: bool = False, outputs=None) -> TorchExport:
    """Write ``net`` (its TEST forward) as PyTorch source ``path`` (.py) and its weights beside
    it (same stem, .pt)."""
    path = os.fspath(path)
    if not path.endswith(".py"):
        raise CaffeAlexError(f"{path}: --torch writes Python source: give a .py file")
    net = net_up_to(net, outputs) if outputs else net
    outputs = list(outputs or net.output_names)
    if not net.input_names:
        raise CaffeAlexError("the net has no inputs (Input or data layers) to export")
    net.eval()
    inputs = example_inputs(net, dynamic_batch)
    with quiet_export():
        program = trace_net(net, inputs, dynamic_batch, outputs, what="PyTorch source")
    graph = program.graph_module
    code = graph.code
    foreign = sorted(set(re.findall(r"torch\.ops\.(\w+)\.", code)) - {"aten", "prims"})
    if foreign:
        raise CaffeAlexError(f"the traced net calls operators of {', '.join(foreign)}, which "
                             "plain PyTorch does not have")  # fmt: skip
    state, names = {}, []
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            continue
        table = program.constants if spec.kind != InputKind.PARAMETER and (
            spec.target in program.constants) else program.state_dict  # fmt: skip
        name = _python_name(spec.target)
        state[name] = table[spec.target].detach().cpu().clone()
        names.append((name, spec.kind == InputKind.PARAMETER))
    # the graph returns any buffer a layer wrote (none in TEST) before the user outputs
    specs = program.graph_signature.output_specs
    first = sum(spec.kind != OutputKind.USER_OUTPUT for spec in specs)
    source = _module_source(net, graph, names, outputs, first)
    weights = os.path.splitext(path)[0] + ".pt"
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(source)
    with atomic_path(weights) as tmp:
        torch.save(state, tmp)
    return TorchExport(path, weights, list(net.input_names), outputs)


def _module_source(net: Net, graph, names, outputs, first: int) -> str:
    python = graph.graph.python_code(root_module="self")
    body = python.src.replace("def forward(self, ", "def _graph(", 1)
    inputs = list(net.input_names)
    arguments = ", ".join(_identifier(n) for n in inputs)
    lines = [
        f'"""{net.name or "net"}, written by caffe-alex export --torch: plain PyTorch (ATen',
        "operators), runnable with torch alone. Its weights: the .pt file of the same name",
        "(model.load_state_dict(torch.load(path))). Inputs and outputs keep Caffe's blob",
        'names."""',
        "",
        *dict.fromkeys(_imports(python)),
        "",
        f"INPUTS = {inputs!r}",
        f"OUTPUTS = {list(outputs)!r}",
        f"ARGUMENTS = {[name for name, _ in names]!r}  # the graph's, in order",
        f"PARAMETERS = {[name for name, learnable in names if learnable]!r}  # the rest: buffers",
        "",
        "",
        _NET_CLASS,
        f"    def forward(self, {arguments}):",
        f"        values = _graph(*[getattr(self, name) for name in ARGUMENTS], {arguments})",
        f"        return dict(zip(OUTPUTS, values[{first}:]))",
        "",
        "",
        body.strip("\n"),
        "",
    ]
    return "\n".join(lines)


def _imports(python) -> list[str]:
    """The import lines of the names the traced code uses, or an error naming one that torch
    alone does not give."""
    imports = []
    used = [name for name in sorted(python.globals) if re.search(rf"\b{name}\b", python.src)]
    for name in used:
        if name not in _GLOBALS:
            raise CaffeAlexError(f"the traced net uses '{name}', which the written source "
                                 "cannot import from torch alone")  # fmt: skip
        imports.append(_GLOBALS[name])
    return imports


# the written module's class up to its forward: the parameters under Caffe's names, each made
# with the shape the loaded state dict gives it
_NET_CLASS = """\
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for name in ARGUMENTS:  # shapes and values come with load_state_dict
            self._make(name, torch.empty(0))

    def _make(self, name, value):
        if name in PARAMETERS:
            self.register_parameter(name, torch.nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ARGUMENTS:  # take the stored shapes
            if prefix + name in state_dict:
                self._make(name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
"""


def _identifier(name: str) -> str:
    name = re.sub(r"\W", "_", name)
    return name if name.isidentifier() and not name[0].isdigit() else f"_{name}"
