"""A fork we do not ship: the user's own ``caffe.proto``, compiled when it is given.

Text prototxts are read by field name, so a fork's numbers only matter for binary net and
solver files. With ``use_proto(path)`` (``caffe-alex --proto path``) such files are parsed
with the user's schema, then handed to ours by field name: the fork's numbers are honoured,
and every field our schema lacks is named (with its layer) instead of being dropped silently.
Caffemodels need no schema: their blobs are matched by layer name (caffemodel.py).

protoc comes from grpcio-tools (the ``proto`` extra), the protobuf project's own compiler
packaged for pip; without it the error names the package.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from ..errors import CaffeAlexError, reading
from ..proto import caffe_pb2


@dataclass
class UserSchema:
    path: str
    net: type  # the fork's NetParameter class
    solver: type | None  # its SolverParameter, if it has one


_ACTIVE: UserSchema | None = None


def use_proto(path: str | None) -> UserSchema | None:
    """Make ``path`` (a fork's caffe.proto) the schema of binary net/solver files read from
    now on in this process; None goes back to caffe-alex's own."""
    global _ACTIVE
    _ACTIVE = None if path is None else load_proto(path)
    return _ACTIVE


def active_proto() -> UserSchema | None:
    return _ACTIVE


def load_proto(path: str) -> UserSchema:
    path = os.fspath(path)
    with reading(path):
        open(path, "rb").close()  # a missing file is the usual one-line error
    files = _compile(path)
    pool = descriptor_pool.DescriptorPool()
    for file_proto in files.file:
        pool.Add(file_proto)
    messages = {
        m.name: f"{f.package}.{m.name}".lstrip(".") for f in files.file for m in f.message_type
    }
    if "NetParameter" not in messages:
        raise CaffeAlexError(f"{path}: defines no NetParameter message; is it a caffe.proto?")

    def cls(name):
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(messages[name]))

    solver = cls("SolverParameter") if "SolverParameter" in messages else None
    return UserSchema(path, cls("NetParameter"), solver)


def _compile(path: str) -> descriptor_pb2.FileDescriptorSet:
    try:
        from grpc_tools import protoc  # optional: only --proto needs protoc
    except ImportError:
        raise CaffeAlexError(
            f"{path}: compiling a .proto needs protoc: pip install 'caffe-alex[proto]' "
            "(grpcio-tools)"
        ) from None
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "schema.pb")
        args = ["protoc", f"--proto_path={folder}", "--include_imports"]
        args += [f"--descriptor_set_out={out}", os.path.abspath(path)]
        code, said = _with_stderr(lambda: protoc.main(args), os.path.join(tmp, "stderr"))
        if code != 0:
            first = said.strip().splitlines()[:1]
            raise CaffeAlexError(f"{path}: protoc refused it: {first[0] if first else '?'}")
        with open(out, "rb") as f:
            return descriptor_pb2.FileDescriptorSet.FromString(f.read())


def _with_stderr(run, file: str):
    """Run protoc in this process (no interpreter start-up) with its C++ stderr in ``file``:
    (exit code, what it wrote)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(file, "w+b") as sink:
            os.dup2(sink.fileno(), 2)
            try:
                code = run()
            finally:
                os.dup2(saved, 2)
            sink.seek(0)
            return code, sink.read().decode(errors="replace")
    finally:
        os.close(saved)


# ---- a fork's message -> ours, by field name -----------------------------------------------


def _unknown_fields(theirs, ours_descriptor, where: str) -> list[str]:
    """Paths of the fields set in ``theirs`` that ``ours_descriptor`` has no field for."""
    missing = []
    for fd, value in theirs.ListFields():
        ours = ours_descriptor.fields_by_name.get(fd.name)
        if ours is None:
            missing.append(f"{where}{fd.name}")
        elif fd.type == fd.TYPE_MESSAGE and ours.message_type is not None:
            for item in value if fd.is_repeated else [value]:
                missing += _unknown_fields(item, ours.message_type, f"{where}{fd.name}.")
    return missing


def to_ours(theirs, ours_cls, path: str, schema: UserSchema):
    """The fork's parsed message as ours: written as text, read back by field name. A field we
    have no name for is an error naming it (and its layer), never a silent drop."""
    proto = os.path.basename(schema.path)
    fields = theirs.DESCRIPTOR.fields_by_name
    layers = [item for key in ("layer", "layers") if key in fields for item in getattr(theirs, key)]
    for layer in layers:
        ours = getattr(caffe_pb2, layer.DESCRIPTOR.name, caffe_pb2.LayerParameter).DESCRIPTOR
        missing = _unknown_fields(layer, ours, "")
        if missing:
            name = layer.name or getattr(getattr(layer, "layer", None), "name", "")
            raise CaffeAlexError(
                f"{path}: layer '{name}': field {missing[0]} of {proto} has no counterpart in "
                "caffe-alex (docs/forks.md, 'Your own fork')"
            )
    missing = _unknown_fields(theirs, ours_cls.DESCRIPTOR, "")
    if missing:
        raise CaffeAlexError(
            f"{path}: field {missing[0]} of {proto} has no counterpart in caffe-alex "
            "(docs/forks.md, 'Your own fork')"
        )
    return text_format.Parse(text_format.MessageToString(theirs), ours_cls())
