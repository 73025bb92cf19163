"""Every net in ../shared/corpus that Caffe accepts builds with inferred shapes in both phases:
every layer type BVLC Caffe registers is here. Nets with Python layers build with stand-ins of
their modules on sys.path (tests/corpus_layers/), as a user's PYTHONPATH would provide them.
The folder is enumerated, so new files are covered."""

from __future__ import annotations

from pathlib import Path

import pytest

from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.filtering import filter_net, make_state
from caffe_alex.formats.prototxt import read_any, read_net
from caffe_alex.formats.upgrade import upgrade_net
from caffe_alex.layers import layer_types
from caffe_alex.net import Net
from caffe_alex.proto import caffe_pb2
from tests.corpus import CORPUS, corpus_table

SOURCE_TYPES = {"Data", "ImageData", "HDF5Data", "WindowData"}


def _corpus_files(kind: str) -> list[Path]:
    """The corpus's nets or solvers, as SOURCES.md's format column says (test_corpus_formats
    checks that column against each file; reading the table keeps collection quick)."""
    if not (CORPUS / "SOURCES.md").is_file():
        return []
    table = corpus_table()
    return [
        CORPUS / p
        for p in sorted(table)
        if table[p].format.startswith("solver") == (kind == "solver")
    ]


def corpus_nets() -> list[Path]:
    return _corpus_files("net")


def corpus_solvers_with_nets() -> list[Path]:
    """Solvers that carry their net inline (net_param / train_net_param / test_net_param)."""
    found = []
    for path in _corpus_files("solver"):
        try:
            solver = read_any(str(path))[1]
        except CaffeAlexError:  # a fork's solver (covered by test_corpus_formats)
            continue
        if (
            solver.HasField("net_param")
            or solver.HasField("train_net_param")
            or solver.test_net_param
        ):
            found.append(path)
    return found


def _read_or_skip(path: Path):
    """The net, or a skip for the files SOURCES.md says Caffe refuses (fork-only fields, the
    file mixing `layer` and `layers`; test_corpus_formats checks how they fail)."""
    try:
        return read_net(str(path))
    except CaffeAlexError as exc:
        entry = corpus_table().get(str(path.relative_to(CORPUS)))
        mixed = "both 'layer' and" in str(exc) and entry is not None and "INVALID" in entry.format
        if entry is None or (entry.bvlc_accepts and not mixed):
            raise
        pytest.skip(f"Caffe refuses it too: {exc}")


# What the corpus's databases hold, by a word of their path (the databases are not here).
KNOWN_SOURCES = {"siamese": (2, 28, 28), "mnist": (1, 28, 28), "cifar": (3, 32, 32)}


def _image_shape(source: str, crop: int) -> tuple[int, int, int]:
    for word, shape in KNOWN_SOURCES.items():
        if word in source:
            return shape[0], crop or shape[1], crop or shape[2]
    return 3, crop or 32, crop or 32


def _guessed_source_shapes(net_param: caffe_pb2.NetParameter) -> dict[str, tuple[int, ...]]:
    """Shapes for data layers whose database is not here: declared batch and crop, the rest
    from KNOWN_SOURCES or a guessed 3 x 32 x 32 (HDF5 features stay 2-D)."""
    shapes = {}
    for layer in net_param.layer:
        if layer.type not in SOURCE_TYPES or not layer.top:
            continue
        param = {
            "Data": layer.data_param,
            "ImageData": layer.image_data_param,
            "HDF5Data": layer.hdf5_data_param,
            "WindowData": layer.window_data_param,
        }
        batch = param[layer.type].batch_size or 1
        crop = layer.transform_param.crop_size or getattr(param[layer.type], "crop_size", 0)
        source = getattr(param[layer.type], "source", "")
        shapes[layer.top[0]] = (batch, *_image_shape(source, crop))
        for top in layer.top[1:]:
            shapes[top] = (batch,)
    return shapes


def _states(net_param: caffe_pb2.NetParameter, phase: str) -> list[list[str]]:
    """The stage sets a solver would use for this phase: each stage named by an include rule
    of the phase, or no stage when the file names none."""
    stages = {
        stage
        for layer in net_param.layer
        for rule in layer.include
        if not rule.HasField("phase") or caffe_pb2.Phase.Name(rule.phase) == phase
        for stage in rule.stage
    }
    return [[stage] for stage in sorted(stages)] or [[]]


def _first_unsupported(net_param, phase, stages):
    known = set(layer_types())
    for layer in filter_net(net_param, make_state(phase, 0, stages)).layer:
        if layer.type not in known:
            return layer
    return None


CORPUS_LAYERS = Path(__file__).parent / "corpus_layers"


@pytest.mark.corpus
@pytest.mark.parametrize("path", corpus_nets(), ids=lambda p: str(p.relative_to(CORPUS)))
@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_corpus_net_builds(path: Path, phase: str, monkeypatch):
    monkeypatch.syspath_prepend(str(CORPUS_LAYERS))
    net_param, source = _read_or_skip(path)
    shapes = _guessed_source_shapes(net_param)
    for stages in _states(net_param, phase):
        assert _first_unsupported(net_param, phase, stages) is None
        net = Net(net_param, phase, stages=stages, source=source, input_shapes=shapes)
        assert net.layer_names
        for name, shape in net.blob_shapes.items():
            assert all(d >= 0 for d in shape), f"{name}: {shape}"


@pytest.mark.corpus
@pytest.mark.parametrize(
    "path", corpus_solvers_with_nets(), ids=lambda p: str(p.relative_to(CORPUS))
)
def test_inline_nets_of_corpus_solvers_build(path: Path):
    solver = read_any(str(path))[1]
    nets = (
        [(solver.net_param, "TRAIN"), (solver.net_param, "TEST")]
        if solver.HasField("net_param")
        else [(solver.train_net_param, "TRAIN")]
    )
    nets += [(net, "TEST") for net in solver.test_net_param]
    for legacy, phase in nets:
        # Caffe master does not upgrade an inline net (this V1 one would build empty there);
        # we upgrade it, as the solver will
        net_param = upgrade_net(legacy, str(path))
        for stages in _states(net_param, phase):
            net = Net(
                net_param, phase, stages=stages, input_shapes=_guessed_source_shapes(net_param)
            )
            assert net.layer_names
