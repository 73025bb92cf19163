"""The registry: every registered type is tested, duplicates and unknown types are errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from caffe_alex.errors import LayerConfigError
from caffe_alex.layers import layer_types
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
