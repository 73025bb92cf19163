"""Every file of ../shared/corpus reads as SOURCES.md says BVLC Caffe reads it.

The table in SOURCES.md records, per file, whether it parses against BVLC master's caffe.proto
(and where it fails if not), its format (V0, V1, current, solver) and its layer types. Here:
a file BVLC parses reads and upgrades to the current format with the listed layer types; a file
with a fork's fields (where BVLC's parser stops) reads with those fields kept by name; the
file that mixes ``layers`` and ``layer`` is refused, as Caffe refuses it.
"""

from __future__ import annotations

import re

import pytest

from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.prototxt import read_any
from caffe_alex.proto import caffe_pb2
from tests.corpus import CORPUS, Entry, corpus_table

pytestmark = pytest.mark.corpus
if not (CORPUS / "SOURCES.md").is_file():
    pytest.skip("../shared/corpus (with SOURCES.md) is not present", allow_module_level=True)

TABLE = corpus_table()


def _corpus_files() -> list[str]:
    files = [p for p in CORPUS.rglob("*") if p.suffix in (".prototxt", ".pt") and p.is_file()]
    return sorted(str(p.relative_to(CORPUS)) for p in files)


def test_every_corpus_file_is_in_the_table():
    assert len(TABLE) >= 80
    assert _corpus_files() == sorted(TABLE)


def _kind(entry: Entry) -> str:
    return "solver" if entry.format.startswith("solver") else "net"


ACCEPTED = [p for p, e in TABLE.items() if e.bvlc_parse == "yes" and "INVALID" not in e.format]
REJECTED = [p for p, e in TABLE.items() if e.bvlc_parse.startswith("no")]


def _bvlc_stop_field(entry: Entry) -> str:
    return re.search(r'no field named "(\w+)"', entry.bvlc_parse)[1]


def _we_know(field: str) -> bool:
    messages = caffe_pb2.DESCRIPTOR.message_types_by_name.values()
    return any(field in m.fields_by_name for m in messages)


# Fork files whose fork field we read (docs/forks.md), and those of forks we do not know (the
# triplet loss of an unmerged BVLC pull request): those still stop where BVLC's parser stops.
FORK_READ = [p for p in REJECTED if _we_know(_bvlc_stop_field(TABLE[p]))]
FORK_UNKNOWN = [p for p in REJECTED if not _we_know(_bvlc_stop_field(TABLE[p]))]
MIXED = [p for p, e in TABLE.items() if "INVALID" in e.format and "mixed" in e.format]


def _expected_layer_types(entry: Entry) -> set[str]:
    types = {t.strip() for t in entry.layer_types.split(",")}
    types.discard("padding (V0)")  # folded into the next convolution by the upgrade
    if "input_dim" in entry.format or "input_shape" in entry.format:
        types.add("Input")  # the Input layer the upgrade makes of the net-level inputs
    return types


@pytest.mark.parametrize("rel", ACCEPTED)
def test_bvlc_accepted_file_reads_and_upgrades(rel):
    entry = TABLE[rel]
    kind, message = read_any(CORPUS / rel)
    assert kind == _kind(entry)
    if kind == "solver":
        m = re.search(r"type: (\w+).*lr_policy: (\w+)", entry.layer_types)
        assert message.type.lower() == m[1].lower()  # legacy enum names upgraded
        assert not message.HasField("solver_type")
        assert message.lr_policy == m[2]
        return
    assert len(message.layers) == 0 and len(message.layer) > 0
    assert not (message.input or message.input_dim or message.input_shape)
    assert {layer.type for layer in message.layer} == _expected_layer_types(entry)


def _field_names_set(message) -> set[str]:
    names = set()
    for fd, value in message.ListFields():
        names.add(fd.name)
        if fd.type == fd.TYPE_MESSAGE:
            for item in value if fd.is_repeated else [value]:
                names |= _field_names_set(item)
    return names


@pytest.mark.parametrize("rel", FORK_READ)
def test_fork_file_reads_with_the_fork_fields(rel):
    """Files BVLC's parser stops on (a fork's field) read here, the fork field kept by name."""
    entry = TABLE[rel]
    field = _bvlc_stop_field(entry)
    kind, message = read_any(CORPUS / rel)
    assert kind == _kind(entry)
    assert field in _field_names_set(message)
    if kind == "net":
        assert {layer.type for layer in message.layer} == _expected_layer_types(entry)


def test_unknown_forks_files_exist_and_only_they_stop():
    assert FORK_UNKNOWN == ["BVLC__caffe/examples/triplet/mnist_triplet_train_test.prototxt"]
    assert len(FORK_READ) >= 4


@pytest.mark.parametrize("rel", FORK_UNKNOWN)
def test_unknown_fork_file_stops_at_bvlc_position(rel):
    entry = TABLE[rel]
    line, column = map(int, re.match(r"no: (\d+):(\d+)", entry.bvlc_parse).groups())
    path = CORPUS / rel
    with pytest.raises(CaffeAlexError) as info:
        read_any(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f'{path}:{line}:{column}: unknown field "{_bvlc_stop_field(entry)}"')
    assert "--proto" in message  # the way to read a fork we do not know


@pytest.mark.parametrize("rel", MIXED)
def test_mixed_layers_and_layer_file_is_refused(rel):
    assert rel == "AbhimanyuKulkarni__caffe/models/nin_imagenet/deploy.prototxt"
    path = CORPUS / rel
    with pytest.raises(CaffeAlexError) as info:
        read_any(path)
    error = info.value
    assert error.file == str(path) and error.line is not None
    assert path.read_text().splitlines()[error.line - 1].lstrip().startswith("layer")
    assert "both 'layer' and legacy 'layers'" in error.message
