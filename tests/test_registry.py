"""The registry: every registered type is tested, duplicates and unknown types are errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from caffe_alex.errors import LayerConfigError
from caffe_alex.layers import layer_types
from caffe_alex.proto import caffe_pb2
from caffe_alex.registry import CaffeLayer, get_layer_class, register

LAYER_TESTS = Path(__file__).parent / "layers"


def test_every_registered_type_has_a_layer_test():
    """Tests mirror the package: the type defined in caffe_alex/layers/X.py is named, as a
    quoted string (prototxt text or its net builder's argument), in tests/layers/test_X.py."""
    missing = []
    for name in layer_types():
        module = get_layer_class(name).__module__.rsplit(".", 1)[-1]
        test_file = LAYER_TESTS / f"test_{module}.py"
        if not test_file.is_file() or f'"{name}"' not in test_file.read_text():
            missing.append(f"{name} (tests/layers/test_{module}.py)")
    assert not missing, f"layer types without a test: {missing}"


def test_registering_a_type_twice_is_an_error():
    with pytest.raises(ValueError, match="layer type 'ReLU' registered twice"):
        register("ReLU")(type("Again", (CaffeLayer,), {}))


def test_learnable_blobs_are_checked_before_they_are_filled():
    layer = CaffeLayer(caffe_pb2.LayerParameter(name="x", type="T"), [], "TEST")
    layer.new_blob((2, 3), caffe_pb2.FillerParameter(type="constant", value=2))
    assert torch.equal(layer.blobs[0], torch.full((2, 3), 2.0))
    with pytest.raises(LayerConfigError, match=r"^learnable blob 1 would have shape \[4, -1\]"):
        layer.new_blob((4, -1))
    with pytest.raises(LayerConfigError, match=r"blob 1 would have shape \[1, 65536, 32768\]"):
        layer.add_blob(torch.empty(1, 1 << 16, 1 << 15, device="meta"))
    assert len(layer.blobs) == 1
    layer.new_blob((0,), requires_grad=False)
    assert not layer.blobs[1].requires_grad


def test_unknown_type_lists_the_known_ones():
    with pytest.raises(
        LayerConfigError,
        match=r"unknown layer type 'Nope': .* caffe_alex.register .*; known types: .*Convolution",
    ):
        get_layer_class("Nope")


# The type names BVLC Caffe master registers (REGISTER_LAYER_CLASS / REGISTER_LAYER_CREATOR in
# src/caffe/layers/*.cpp and layer_factory.cpp), written down as facts.
BVLC_MASTER_TYPES = """AbsVal Accuracy ArgMax BNLL BatchNorm BatchReindex Bias Clip Concat
ContrastiveLoss Convolution Crop Data Deconvolution Dropout DummyData ELU Eltwise Embed
EuclideanLoss Exp Filter Flatten HDF5Data HDF5Output HingeLoss Im2col ImageData InfogainLoss
InnerProduct Input LRN LSTM LSTMUnit Log MVN MemoryData MultinomialLogisticLoss PReLU Parameter
Pooling Power Python RNN ReLU Reduction Reshape SPP Scale Sigmoid SigmoidCrossEntropyLoss Silence
Slice Softmax SoftmaxWithLoss Split Swish TanH Threshold Tile WindowData""".split()


FORKS_DOC = Path(__file__).parents[1] / "docs" / "forks.md"


def _fork_types_in_docs() -> set[str]:
    """Type names in the first column of docs/forks.md's tables (`| `Type` | fork | ...`)."""
    import re

    return set(re.findall(r"^\| `([A-Za-z0-9_]+)` \|", FORKS_DOC.read_text(), re.MULTILINE))


def test_every_bvlc_master_type_is_registered_and_others_are_documented_forks():
    ours = set(layer_types())
    assert sorted(set(BVLC_MASTER_TYPES) - ours) == []
    forks = _fork_types_in_docs()
    assert sorted(ours - set(BVLC_MASTER_TYPES) - forks) == [], "fork types not in docs/forks.md"
    assert sorted(forks - ours) == [], "docs/forks.md names types that are not registered"
