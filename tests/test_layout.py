"""The house rules of caffe_alex/: imports run one way, down the pipeline's stages, with no
cycle at any depth, and a function-level import only for an optional or heavy dependency.

Read from the source (ast), so an import inside a function counts as much as one at the top.
An import under ``if TYPE_CHECKING:`` never runs and is left out.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "caffe_alex"

# Lowest first: a module may import from its own stage and the stages before it, never after.
STAGES = [
    (
        "errors, log, proto, blob, memory",
        [
            "caffe_alex.errors",
            "caffe_alex.log",
            "caffe_alex.proto",
            "caffe_alex.blob",
            "caffe_alex.memory",
        ],  # fmt: skip
    ),
    ("formats", ["caffe_alex.formats"]),
    ("data", ["caffe_alex.data"]),
    ("registry, fillers", ["caffe_alex.registry", "caffe_alex.fillers"]),
    ("layers", ["caffe_alex.layers"]),
    (
        "net: the plan and its executors",
        ["caffe_alex.net", "caffe_alex.netparts", "caffe_alex.layerwise"],
    ),
    ("solvers", ["caffe_alex.solvers"]),
    ("tools", ["caffe_alex.tools"]),
    ("pycaffe", ["caffe_alex.pycaffe"]),
    ("commands", ["caffe_alex.commands"]),
    ("cli", ["caffe_alex.cli", "caffe_alex.__main__"]),
    ("public API", ["caffe_alex"]),
]

# Imported inside functions on purpose: optional extras, or heavy and rarely needed; and the
# optional packages pycaffe code may reach for (pydot, Selective Search); cv2 where compare
# reports a missing OpenCV in one line; grpc_tools (protoc) for --proto, the 'proto' extra.
LAZY_ALLOWED = {"h5py", "plyvel", "matplotlib", "onnx", "onnxscript", "torch", "pydot",
                "pydotplus", "selective_search_ijcv_with_python", "torchvision",
                "cv2", "grpc_tools", "skimage", "scipy"}  # fmt: skip
# What may sit at the package root: entry points and the lowest shared modules.
ROOT_MODULES = {
    "__init__", "__main__", "cli", "net", "layerwise", "registry", "fillers", "errors", "log",
    "blob", "memory",
}  # fmt: skip


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


MODULES = _modules()


def _stage(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(STAGES):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} belongs to no stage of STAGES: add it"
    return best[0]


def _targets(module: str, is_package: bool, node) -> list[str]:
    """The caffe_alex modules an import statement loads (a name imported from a package that
    is one of its submodules counts as that submodule, not the package)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in MODULES]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        if sub in MODULES:
            out.append(sub)
        elif source in MODULES:
            out.append(source)
    return out


def _type_checking_nodes(tree) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    return skipped


@functools.cache
def _scan():
    """(imports by module, function-level imports): read when a test asks, not at collection."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    lazy: list[tuple[str, int, str]] = []
    for module, (path, is_package) in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        skipped = _type_checking_nodes(tree)
        in_function = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_function.update(id(n) for n in ast.walk(fn))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in skipped:
                continue
            targets = [t for t in _targets(module, is_package, node) if t != module]
            edges[module].update(targets)
            if id(node) in in_function:
                lazy.append((module, node.lineno, ast.unparse(node)))
    return edges, lazy


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


@pytest.mark.slow
def test_the_scan_sees_the_package():
    assert {"caffe_alex.net", "caffe_alex.formats.prototxt", "caffe_alex.cli"} <= set(MODULES)
    assert "caffe_alex.formats.prototxt" in _scan()[0]["caffe_alex.net"]


def test_no_import_cycle():
    assert _cycles(_scan()[0]) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_down_the_stages(module):
    mine = _stage(module)
    upward = [
        f"{target} ({STAGES[_stage(target)][0]})"
        for target in sorted(_scan()[0][module])
        if _stage(target) > mine
    ]
    assert not upward, f"{module} ({STAGES[mine][0]}) imports a later stage: {upward}"


def test_function_level_imports_only_for_optional_or_heavy_packages():
    unexpected = [
        f"{module}:{line}: {statement}"
        for module, line, statement in _scan()[1]
        if statement.split()[1].split(".")[0] not in LAZY_ALLOWED
    ]
    assert not unexpected, "\n".join(unexpected)


def test_each_function_level_import_says_why():
    for module, line, statement in _scan()[1]:
        path = MODULES[module][0]
        lines = path.read_text().splitlines()
        context = "\n".join(lines[max(0, line - 3) : line + 1])
        assert "#" in context, f"{module}:{line}: say why '{statement}' is imported on use"


def test_package_root_holds_only_entry_points():
    root = {p.stem for p in PACKAGE.glob("*.py")}
    assert root <= ROOT_MODULES, f"move these into a stage folder: {sorted(root - ROOT_MODULES)}"


@pytest.mark.subprocess
def test_importing_the_package_and_its_cli_does_not_load_torch():
    import subprocess
    import sys

    code = "import sys, caffe_alex, caffe_alex.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_api_names_resolve():
    import caffe_alex

    for name in caffe_alex.__all__:
        assert getattr(caffe_alex, name) is not None, name
    with pytest.raises(AttributeError):
        caffe_alex.no_such_thing  # noqa: B018


def test_public_api_table_and_all_agree():
    import caffe_alex

    assert sorted(caffe_alex.__all__) == sorted(caffe_alex._EXPORTS)


def _layer_calls_in_step_loops(modules=None) -> list[str]:
    """Functions with a loop over a net's steps that calls a layer module (``layers[key](...)``,
    or a name bound in the loop from ``.layers[...]`` / ``.layer(...)``: called, its ``forward``
    called, or handed to another call, which would run it)."""
    found = []
    for module, (path, _) in (modules or MODULES).items():
        tree = ast.parse(path.read_text(), str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for loop in ast.walk(fn):
                if not isinstance(loop, ast.For) or "steps" not in ast.unparse(loop):
                    continue  # (a loop over positions reads the steps in its body)
                names = _layer_names(loop, _layer_containers(fn))
                if any(_runs_a_layer(call, names) for call in ast.walk(loop)):
                    found.append(f"{module}.{fn.name}")
    return sorted(set(found))


def _assigned(tree, pattern: re.Pattern) -> set[str]:
    """Names bound in ``tree`` to an expression that ``pattern`` finds."""
    return {
        t.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and pattern.search(ast.unparse(node.value))
        for t in node.targets
        if isinstance(t, ast.Name)
    }


def _layer_containers(fn) -> set[str]:
    """Names a function binds to the net's layers as a mapping (``self._modules["layers"]``)."""
    return _assigned(fn, re.compile(r"""_modules\[['"]layers['"]\]"""))


def _layer_names(loop, containers: set[str] = frozenset()) -> set[str]:
    """Names a loop binds to one layer: from ``.layers[...]``, ``.layer(...)`` or a subscript
    of a container of layers."""
    held = "".join(rf"|\b{re.escape(name)}\[" for name in containers)
    return _assigned(loop, re.compile(r"\.layers\[|\.layer\(" + held))


def _runs_a_layer(call, names: set[str]) -> bool:
    if not isinstance(call, ast.Call):
        return False
    f = call.func
    if isinstance(f, ast.Subscript) and ast.unparse(f.value).endswith("layers"):
        return True
    if isinstance(f, ast.Name) and f.id in names:
        return True
    if isinstance(f, ast.Attribute) and f.attr == "forward" and ast.unparse(f.value) in names:
        return True
    if (
        isinstance(f, ast.Attribute)
        and f.attr in _CONTAINER_METHODS
        or (isinstance(f, ast.Name) and f.id in _LOOKS_AT_OBJECTS)
    ):
        return False  # kept or inspected, not run
    return any(isinstance(a, ast.Name) and a.id in names for a in call.args)


_CONTAINER_METHODS = {"append", "add", "extend", "insert", "setdefault", "remove", "index"}
_LOOKS_AT_OBJECTS = {"isinstance", "id", "getattr", "hasattr", "setattr", "type", "len", "repr"}


@pytest.mark.slow
def test_one_executor_no_second_forward_loop_anywhere():
    """The builder's plan (Net.steps) has one loop that runs its layers, Net.run: the module's
    forward, pycaffe's Net, the solvers and caffe-alex time all go through it (layerwise.py
    runs it over Caffe's blobs). A second loop over the steps calling layers is a second
    engine that drifts from the first."""
    assert _layer_calls_in_step_loops() == ["caffe_alex.net.run"]


SECOND_LOOPS = """
def by_subscript(self, blobs):
    for step in self._steps:
        blobs[step.tops[0]] = self.layers[step.key](blobs[step.bottoms[0]])

def by_name(self, blobs):
    for position in range(len(self._steps)):
        layer = self.layer(self.layer_names[position])
        layer.forward(blobs)

def by_container(self, blobs):
    held = self._modules["layers"]._modules
    for step in self._steps:
        layer = held[step.key]
        blobs[step.tops[0]] = layer(blobs[step.bottoms[0]])

def not_a_loop_that_runs_layers(self):
    held = self._modules["layers"]._modules
    return [held[step.key].extra_repr() for step in self._steps]
"""


def test_the_loop_detector_finds_each_form_of_a_second_loop(tmp_path):
    path = tmp_path / "second.py"
    path.write_text(SECOND_LOOPS)
    found = _layer_calls_in_step_loops({"second": (path, False)})
    assert found == ["second.by_container", "second.by_name", "second.by_subscript"]
