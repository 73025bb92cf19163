"""Read and write Caffe net and solver definitions (protobuf text or binary).

``read_net`` parses, upgrades legacy formats (see upgrade.py) and returns a SourceMap from
layer names to the line of their block, so later errors can point into the file. Parse errors
become one-line CaffeAlexErrors ``file:line:column: message`` with 1-based line and column
counted in characters (a tab is one column), as protobuf's text parser reports them.
"""

from __future__ import annotations

import bisect
import os
import re
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import message as pb_message
from google.protobuf import text_format
from google.protobuf.unknown_fields import UnknownFieldSet

from ..errors import CaffeAlexError, SourceMap, reading
from ..log import get_logger
from ..proto import caffe_pb2
from .atomic import atomic_path
from .upgrade import net_needs_upgrade, solver_needs_upgrade, upgrade_net, upgrade_solver
from .user_proto import active_proto, to_ours

# ---- token scanning (for the layer->line map and for naming the token of a parse error) ------

log = get_logger()

_TOKEN = re.compile(
    r"""(?P<space>\s+)|(?P<comment>\#[^\n]*)
      |(?P<string>"(?:[^"\\\n]|\\.)*"?|'(?:[^'\\\n]|\\.)*'?)
      |(?P<word>[A-Za-z0-9_.+-]+)|(?P<punct>.)""",
    re.VERBOSE,
)
_LAYER_KEYS = ("layer", "layers")
_INPUT_KEYS = ("input", "input_dim", "input_shape")


@dataclass
class _Token:
    text: str
    line: int  # 1-based
    column: int  # 1-based
    depth: int  # nesting depth of braces around the token


def _tokens(text: str) -> list[_Token]:
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    out, depth = [], 0
    for m in _TOKEN.finditer(text):
        if m.lastgroup in ("space", "comment"):
            continue
        tok = m.group()
        line = bisect.bisect_right(line_starts, m.start())
        if tok in "}>" and m.lastgroup == "punct":
            depth -= 1
        out.append(_Token(tok, line, m.start() - line_starts[line - 1] + 1, depth))
        if tok in "{<" and m.lastgroup == "punct":
            depth += 1
    return out


@dataclass
class _Blocks:
    layer: list[int]  # lines of top-level `layer {` blocks, in order
    layers: list[int]  # lines of top-level legacy `layers {` blocks, in order
    input_line: int | None  # first top-level input / input_dim / input_shape


def _scan_blocks(text: str) -> _Blocks:
    toks = _tokens(text)
    blocks = _Blocks([], [], None)
    for i, tok in enumerate(toks):
        if tok.depth != 0:
            continue
        if tok.text in _LAYER_KEYS:
            nxt = toks[i + 1 : i + 3]
            if nxt and nxt[0].text == ":":
                nxt = nxt[1:]
            if nxt and nxt[0].text in "{<":
                getattr(blocks, tok.text).append(tok.line)
        elif tok.text in _INPUT_KEYS and blocks.input_line is None:
            blocks.input_line = tok.line
    return blocks


def _named_lines(net: caffe_pb2.NetParameter, blocks: _Blocks) -> list[tuple[str, int]]:
    """(name, line) of each parsed layer entry, in file order."""
    pairs = [(layer.name, line) for layer, line in zip(net.layer, blocks.layer, strict=False)]
    pairs += [
        (conn.name or conn.layer.name, line)
        for conn, line in zip(net.layers, blocks.layers, strict=False)
    ]
    return pairs


def _index_lines(net: caffe_pb2.NetParameter, pairs, input_line: int | None) -> list[int | None]:
    """The line of each layer of the (upgraded) net: upgrades keep the order of the layers
    they keep, so the k-th layer called X is the k-th block called X; the Input layer made
    from net-level inputs points at the ``input`` line."""
    queues: dict[str, list[int]] = {}
    for name, line in pairs:
        queues.setdefault(name, []).append(line)
    lines: list[int | None] = []
    for index, layer in enumerate(net.layer):
        queue = queues.get(layer.name)
        if queue:
            lines.append(queue.pop(0))
        else:
            lines.append(input_line if index == 0 and layer.type == "Input" else None)
    return lines


def _layer_lines(net: caffe_pb2.NetParameter, blocks: _Blocks) -> dict[str, int]:
    """Pair the i-th block with the i-th parsed entry; the first layer of a name wins."""
    lines: dict[str, int] = {}
    for layer, line in zip(net.layer, blocks.layer, strict=False):
        lines.setdefault(layer.name, line)
    for conn, line in zip(net.layers, blocks.layers, strict=False):
        lines.setdefault(conn.name or conn.layer.name, line)
    return lines


# ---- parse errors ---------------------------------------------------------------------------

_ERROR_HEAD = re.compile(r"^(\d+):(\d+) : (.*)$", re.S)


def _strip_line_echo(reason: str, line_text: str) -> str:
    """protobuf prefixes some messages with the offending line in quotes; drop that echo."""
    if reason.startswith("'"):
        for m in re.finditer(r"': ", reason):
            if reason[1 : m.start()] in line_text:
                return reason[m.end() :]
    return reason


def _token_at(toks: list[_Token], line: int, column: int) -> _Token | None:
    for tok in toks:
        if (tok.line, tok.column + len(tok.text)) > (line, column):
            return tok
    return None


def _describe(reason: str, found: str) -> str:
    reason = reason.rstrip(".")
    m = re.match(r'Message type "caffe\.(\w+)" has no field named "(\w+)"', reason)
    if m:
        return (
            f'unknown field "{m[2]}" in {m[1]} (neither BVLC Caffe nor a fork caffe-alex reads '
            "has it; for another fork, give its caffe.proto: caffe-alex --proto FILE)"
        )
    m = re.match(r'Message type "caffe\.(\w+)" should not have multiple "(\w+)" fields', reason)
    if m:
        return f'field "{m[2]}" of {m[1]} holds one value but is given more than once'
    m = re.match(r'Enum type "caffe\.([\w.]+)" has no value named (\S+)', reason)
    if m:
        enum = _enum_values(m[1])
        return f'unknown value "{m[2]}" for {m[1]}' + (f" (one of {enum})" if enum else "")
    m = re.match(r"Expected (.+?)(?:,? (?:but found|got):? .*)?$", reason, re.S)
    if m:
        what = "a field name" if m[1] == "identifier or number" else m[1]
        what = _article(what) if what.isalpha() and what.islower() else what
        return f"syntax error: expected {what} but found {found}"
    m = re.match(r"Couldn't parse (\w+)", reason)
    if m:
        return f"syntax error: expected {_article(m[1])} but found {found}"
    m = re.match(r"Value out of range: (.*)", reason)
    if m:
        return f"value {m[1]} is out of range for this field"
    if reason.startswith("String missing ending quote"):
        return f"syntax error: string {found} has no closing quote on its line"
    return f"syntax error: {reason[:1].lower()}{reason[1:]} (at {found})"


def _article(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _enum_values(dotted: str) -> str:
    try:
        enum = caffe_pb2.DESCRIPTOR.pool.FindEnumTypeByName("caffe." + dotted)
    except KeyError:
        return ""
    return ", ".join(v.name for v in enum.values)


def _parse_error(exc: text_format.ParseError, text: str, path) -> CaffeAlexError:
    m = _ERROR_HEAD.match(str(exc))
    line, column = exc.GetLine(), exc.GetColumn()
    reason = m[3] if m else str(exc)
    lines = text.split("\n")
    line_text = lines[line - 1] if line and 0 < line <= len(lines) else ""
    reason = _strip_line_echo(reason, line_text)
    toks = _tokens(text)
    tok = _token_at(toks, line or 0, column or 0)
    unclosed = toks and toks[-1].depth + (toks[-1].text in "{<") > 0
    if tok is None or (tok is toks[-1] and unclosed and reason.startswith('Expected "')):
        found = "end of file"  # protobuf reports a missing "}" at the last token it read
    else:
        found = tok.text if tok.text[0] in "\"'" else f'"{tok.text}"'
    message = _describe(reason, found)
    return CaffeAlexError(message, file=_name(path), line=line, column=column)


# ---- reading --------------------------------------------------------------------------------


def _name(path) -> str | None:
    return None if path is None else os.fspath(path)


def _read_bytes(path) -> bytes:
    with reading(_name(path)):
        return Path(path).read_bytes()


_BINARY_BYTES = set(range(0x00, 0x09)) | set(range(0x0E, 0x20)) | {0x7F}


def _as_text(data: bytes) -> str | None:
    """The file's text when it looks like protobuf text format, else None (treat as binary)."""
    if any(b in _BINARY_BYTES for b in data[:65536]):
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")  # e.g. an old file with a Latin-1 comment
    return text[1:] if text.startswith("\ufeff") else text  # editors hide a BOM; so do we


def _fork_class(message):
    """The user's own fork's class for ``message`` (``use_proto``), or None."""
    schema = active_proto()
    if schema is None or message.DESCRIPTOR.file is not caffe_pb2.DESCRIPTOR:
        return None
    return {"NetParameter": schema.net, "SolverParameter": schema.solver}.get(
        message.DESCRIPTOR.name
    )


def _parse_text(text: str, message, path):
    fork = _fork_class(message)
    target = message if fork is None else fork()
    try:
        text_format.Parse(text, target)
    except text_format.ParseError as exc:
        raise _parse_error(exc, text, path) from None
    if fork is not None:  # read by their schema, handed over by field name
        message.CopyFrom(to_ours(target, type(message), _name(path), active_proto()))
    return message


def _parse_binary(data: bytes, message, path):
    fork = _fork_class(message)
    if fork is not None:
        theirs = _parse_binary(data, fork(), path)
        message.CopyFrom(to_ours(theirs, type(message), _name(path), active_proto()))
        return message
    try:
        message.ParseFromString(data)
    except pb_message.DecodeError:
        kind = message.DESCRIPTOR.name
        raise CaffeAlexError(
            f"{_name(path)}: neither protobuf text nor a valid binary {kind} "
            "(the binary parse failed)"
        ) from None
    return message


def parse_net_text(text: str, path=None, *, upgrade: bool = True):
    """Parse (and upgrade) net text; returns (NetParameter, SourceMap)."""
    net = parsed = _parse_text(text, caffe_pb2.NetParameter(), path)
    blocks = _scan_blocks(text)
    source = SourceMap(path=_name(path), layer_lines=_layer_lines(net, blocks))
    if upgrade:
        net = _upgrade_net(net, path, blocks, source.layer_lines)
        names = {layer.name for layer in net.layer}
        lines = {k: v for k, v in source.layer_lines.items() if k in names}  # V0 padding gone
        if blocks.input_line is not None and "input" in names:
            lines.setdefault("input", blocks.input_line)  # the Input layer made from input_dim
        source.layer_lines = lines
    source.index_lines = _index_lines(net, _named_lines(parsed, blocks), blocks.input_line)
    return net, source


def _upgrade_net(net, path, blocks: _Blocks | None = None, lines: dict | None = None):
    try:
        return upgrade_net(net, _name(path))
    except CaffeAlexError as exc:
        if exc.line is None and blocks is not None:
            exc.line = _upgrade_error_line(exc, blocks, lines or {})
        raise


def _upgrade_error_line(exc: CaffeAlexError, blocks: _Blocks, lines: dict) -> int | None:
    topic = getattr(exc, "topic", None)
    if exc.layer is not None:
        return lines.get(exc.layer)
    if topic == "mixed" and blocks.layer:
        return blocks.layer[0]  # the first current-format block of a mixed net
    if topic == "input":
        return blocks.input_line
    return None


def read_net(path, *, upgrade: bool = True):
    """Read a net definition (text or binary); returns (NetParameter, SourceMap)."""
    data = _read_bytes(path)
    text = _as_text(data)
    if text is not None:
        return parse_net_text(text, path, upgrade=upgrade)
    net = _parse_binary(data, caffe_pb2.NetParameter(), path)
    if upgrade:
        net = _upgrade_net(net, path)
    return net, SourceMap(path=_name(path))


def parse_solver_text(text: str, path=None, *, upgrade: bool = True) -> caffe_pb2.SolverParameter:
    solver = _parse_text(text, caffe_pb2.SolverParameter(), path)
    return upgrade_solver(solver, _name(path)) if upgrade else solver


def read_solver(path, *, upgrade: bool = True) -> caffe_pb2.SolverParameter:
    """Read a solver definition (text or binary), upgrading a legacy ``solver_type``.

    snapshot_prefix is left as written; see upgrade.resolve_snapshot_prefix for Caffe's default.
    """
    data = _read_bytes(path)
    text = _as_text(data)
    if text is not None:
        return parse_solver_text(text, path, upgrade=upgrade)
    solver = _parse_binary(data, caffe_pb2.SolverParameter(), path)
    return upgrade_solver(solver, _name(path)) if upgrade else solver


def read_any(path, *, upgrade: bool = True):
    """Read a file that may be a net or a solver; returns ("net" | "solver", message).

    Text is tried as both; when neither parses, the error of the parse that got further into
    the file is raised. Binary files are taken as whichever type leaves no unknown fields.
    """
    data = _read_bytes(path)
    text = _as_text(data)
    if text is None:
        return _binary_any(data, path, upgrade)
    # decide by parsing alone; only then upgrade, so an upgrade error is the one reported
    try:
        _parse_text(text, caffe_pb2.NetParameter(), path)
        kind = "net"
    except CaffeAlexError as net_error:
        try:
            _parse_text(text, caffe_pb2.SolverParameter(), path)
            kind = "solver"
        except CaffeAlexError as solver_error:
            further = (solver_error.line or 0, solver_error.column or 0) > (
                net_error.line or 0,
                net_error.column or 0,
            )
            raise (solver_error if further else net_error) from None
    if kind == "net":
        return kind, parse_net_text(text, path, upgrade=upgrade)[0]
    return kind, parse_solver_text(text, path, upgrade=upgrade)


def _binary_any(data: bytes, path, upgrade: bool):
    for kind, cls in (("net", caffe_pb2.NetParameter), ("solver", caffe_pb2.SolverParameter)):
        try:
            message = cls.FromString(data)
        except pb_message.DecodeError:
            continue
        if len(UnknownFieldSet(message)) == 0:
            if not upgrade:
                return kind, message
            up = _upgrade_net(message, path) if kind == "net" else upgrade_solver(message)
            return kind, up
    raise CaffeAlexError(f"{_name(path)}: not a Caffe net or solver (text or binary protobuf)")


# ---- writing --------------------------------------------------------------------------------


_WHOLE_FLOAT = re.compile(r"^(\s*\w+: -?\d+)\.0$", re.M)


def to_text(message) -> str:
    """Text format as Caffe writes it: Python prints a whole float as ``1.0``, C++ as ``1``."""
    return _WHOLE_FLOAT.sub(r"\1", text_format.MessageToString(message))


def net_to_text(net_param: caffe_pb2.NetParameter) -> str:
    return to_text(net_param)


def solver_to_text(solver_param: caffe_pb2.SolverParameter) -> str:
    return to_text(solver_param)


def write_text(path, message) -> None:
    """Write ``message`` as protobuf text atomically (temp file, fsync, rename over ``path``)."""
    _write_atomic(path, to_text(message).encode("utf-8"))


def write_binary(path, message) -> None:
    _write_atomic(path, message.SerializeToString())


def _write_atomic(path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def resolve_snapshot_prefix(solver: caffe_pb2.SolverParameter, param_file: str) -> None:
    """Caffe's reading of a solver file also fills snapshot_prefix (in place): when unset, the
    solver file's path without extension; when it names an existing folder, folder/<file stem>.
    """
    stem, _ = os.path.splitext(param_file)
    if not solver.HasField("snapshot_prefix"):
        solver.snapshot_prefix = stem
        log.info("snapshot_prefix was not specified and is set to %s", solver.snapshot_prefix)
    elif os.path.isdir(solver.snapshot_prefix):
        base = os.path.basename(stem)
        solver.snapshot_prefix = os.path.join(solver.snapshot_prefix, base)
        log.info("snapshot_prefix was a folder and is now %s", solver.snapshot_prefix)


def upgrade_file(src: str, dst: str) -> str:
    """Read a net or solver definition (text or binary), upgrade it, write it as text to ``dst``
    (atomically). Returns "net" or "solver", whichever the file turned out to be.
    """
    kind, original = read_any(src, upgrade=False)
    needed = net_needs_upgrade(original) if kind == "net" else solver_needs_upgrade(original)
    if needed:
        message = read_any(src, upgrade=True)[1]  # again, so errors can name their line
    else:
        log.info("File already in latest proto format: %s", src)
        message = original
    write_text(dst, message)
    what = "NetParameter" if kind == "net" else "SolverParameter"
    log.info("Wrote upgraded %s text proto to %s", what, dst)
    return kind
