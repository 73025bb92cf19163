"""The registry: every registered type is tested, duplicates and unknown types are errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from caffe_alex.errors import LayerConfigError
from caffe_alex.registry import CaffeLayer, get_layer_class, layer_types, register

LAYER_TESTS = Path(__file__).parent / "layers"


def test_every_registered_type_has_a_layer_test():
    tested = set()
    for path in LAYER_TESTS.glob("test_*.py"):
        # a type counts as tested where a layer test names it as a string: in prototxt text
        # (type: "X") or as the value its net builder puts there
        tested.update(re.findall(r'"(\w+)"', path.read_text()))
    missing = [t for t in layer_types() if t not in tested]
    assert not missing, f"layer types without a test under tests/layers: {missing}"


def test_registering_a_type_twice_is_an_error():
    with pytest.raises(ValueError, match="layer type 'ReLU' registered twice"):
        register("ReLU")(type("Again", (CaffeLayer,), {}))


def test_unknown_type_lists_the_known_ones():
    with pytest.raises(
        LayerConfigError, match=r"unknown layer type 'Nope'; known types: .*Convolution"
    ):
        get_layer_class("Nope")


def test_the_issue_catalogue_is_registered():
    catalogue = """Convolution Deconvolution Pooling LRN Crop ReLU PReLU ELU Sigmoid TanH AbsVal
    Power
    Dropout BatchNorm Scale Bias Eltwise Concat Slice Split Flatten Reshape InnerProduct Softmax
    ArgMax Silence Input DummyData SoftmaxWithLoss EuclideanLoss SigmoidCrossEntropyLoss Accuracy
    Data ImageData HDF5Data MemoryData WindowData""".split()
    assert not set(catalogue) - set(layer_types())
