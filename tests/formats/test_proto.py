"""proto/caffe.proto: in sync with the shipped caffe_pb2, and wire-compatible with BVLC Caffe."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from caffe_alex.proto import caffe_pb2
from tests.paths import ROOT

FINGERPRINT = Path(__file__).with_name("caffe_schema_fingerprint.json")


def _serialized_descriptor(module_path: Path) -> bytes:
    """The FileDescriptorProto bytes protoc wrote into a generated module (a bytes literal).

    Read from the file rather than the runtime: the runtime re-serialises, normalising float
    defaults (0.999 -> "0.999000013"), and a second module could not load as "caffe.proto".
    """
    source = module_path.read_text()
    start = source.index("AddSerializedFile(") + len("AddSerializedFile(")
    end = source.index(")\n", start)
    return ast.literal_eval(source[start:end])


def _shipped_file_proto() -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(
        _serialized_descriptor(Path(caffe_pb2.__file__))
    )


@pytest.mark.subprocess
def test_regenerated_module_matches_shipped(tmp_path):
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed, so the proto cannot be regenerated here")
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={ROOT / 'proto'}"]
    cmd += [f"--python_out={tmp_path}", str(ROOT / "proto" / "caffe.proto")]
    subprocess.run(cmd, check=True, capture_output=True)
    fresh = descriptor_pb2.FileDescriptorProto.FromString(
        _serialized_descriptor(tmp_path / "caffe_pb2.py")
    )
    assert fresh == _shipped_file_proto(), "caffe_pb2.py is stale: run scripts/gen_proto.sh"


TOP_LEVEL = ["V0LayerParameter", "V1LayerParameter", "SolverParameter", "SolverState", "Datum",
             "BlobProto", "BlobProtoVector", "BlobShape", "NetParameter", "LayerParameter",
             "ParamSpec", "NetState", "NetStateRule", "FillerParameter"]  # fmt: skip


def test_top_level_messages():
    fd = _shipped_file_proto()
    names = {m.name for m in fd.message_type}
    assert len(names) == 63 + len(FORK_MESSAGES)
    assert set(TOP_LEVEL) <= names
    assert fd.package == "caffe"
    assert fd.syntax in ("", "proto2")
    assert [e.name for e in fd.enum_type] == ["Phase"]


# Messages added for the forks (docs/forks.md), and where their fields start in BVLC messages.
FORK_MESSAGES = {
    "LabelMapItem", "LabelMap", "Sampler", "SampleConstraint", "BatchSampler", "EmitConstraint",
    "NormalizedBBox", "Annotation", "AnnotationGroup", "AnnotatedDatum", "ResizeParameter",
    "SaltPepperParameter", "NoiseParameter", "DistortionParameter", "ExpansionParameter",
    "AnnotatedDataParameter", "NonMaximumSuppressionParameter", "SaveOutputParameter",
    "PriorBoxParameter", "DetectionOutputParameter", "DetectionEvaluateParameter",
    "MultiBoxLossParameter", "NormalizeParameter", "PermuteParameter", "VideoDataParameter",
    "InterpParameter", "ROIPoolingParameter", "SmoothL1LossParameter", "PSROIPoolingParameter",
    "ProposalParameter", "BNParameter", "UpsampleParameter", "ShuffleChannelParameter",
    "ReLU6Parameter", "ReorgParameter", "RegionParameter", "DenseImageDataParameter",
    "SegAccuracyParameter",
}  # fmt: skip
FORK_FIELD_BASE = 3001
# Enums a fork declares inside a BVLC message, for its fields there (DeepLab v2's label_type).
FORK_ENUMS = {"ImageDataParameter": {"LabelType"}}


def test_fork_messages_have_no_required_fields():
    """A fork's `required` must never make a read fail: every field we declare is optional."""
    fd = _shipped_file_proto()
    for m in fd.message_type:
        if m.name in FORK_MESSAGES:
            assert all(f.label != f.LABEL_REQUIRED for f in m.field), m.name


def _field(path: str):
    message, name = path.split(".")
    return getattr(caffe_pb2, message).DESCRIPTOR.fields_by_name[name]


# message.field -> (number, default as the Python runtime reports it)
FIELDS = {
    "NetParameter.layer": (100, None),
    "NetParameter.layers": (2, None),
    "NetParameter.input": (3, None),
    "NetParameter.input_shape": (8, None),
    "NetParameter.input_dim": (4, None),
    "NetParameter.force_backward": (5, False),
    "LayerParameter.name": (1, ""),
    "LayerParameter.type": (2, ""),
    "LayerParameter.param": (6, None),
    "LayerParameter.include": (8, None),
    "LayerParameter.transform_param": (100, None),
    "LayerParameter.convolution_param": (106, None),
    "LayerParameter.pooling_param": (121, None),
    "LayerParameter.batch_norm_param": (139, None),
    "LayerParameter.input_param": (143, None),
    "ParamSpec.lr_mult": (3, 1.0),
    "ParamSpec.decay_mult": (4, 1.0),
    "ConvolutionParameter.bias_term": (2, True),
    "ConvolutionParameter.group": (5, 1),
    "ConvolutionParameter.axis": (16, 1),
    "PoolingParameter.round_mode": (13, caffe_pb2.PoolingParameter.CEIL),
    "PoolingParameter.pool": (1, caffe_pb2.PoolingParameter.MAX),
    "LRNParameter.local_size": (1, 5),
    "LRNParameter.beta": (3, 0.75),
    "LRNParameter.k": (5, 1.0),
    "BatchNormParameter.moving_average_fraction": (2, pytest.approx(0.999)),
    "BatchNormParameter.eps": (3, pytest.approx(1e-5)),
    "SolverParameter.type": (40, "SGD"),
    "SolverParameter.solver_type": (30, caffe_pb2.SolverParameter.SGD),
    "SolverParameter.delta": (31, pytest.approx(1e-8)),
    "SolverParameter.momentum2": (39, pytest.approx(0.999)),
    "SolverParameter.test_initialization": (32, True),
    "SolverParameter.regularization_type": (29, "L2"),
    "SolverParameter.clip_gradients": (35, -1.0),
    "FillerParameter.type": (1, "constant"),
    "FillerParameter.std": (6, 1.0),
    "DropoutParameter.dropout_ratio": (1, 0.5),
    "ReLUParameter.negative_slope": (1, 0.0),
    "TransformationParameter.scale": (1, 1.0),
    "V1LayerParameter.blobs_lr": (7, None),
    "V1LayerParameter.weight_decay": (8, None),
    "V1LayerParameter.layer": (1, None),
    "V0LayerParameter.kernelsize": (8, 0),
    "BlobProto.shape": (7, None),
    "BlobShape.dim": (1, None),
}


@pytest.mark.parametrize("path", sorted(FIELDS))
def test_field_numbers_and_defaults(path):
    number, default = FIELDS[path]
    field = _field(path)
    assert field.number == number
    if default is not None:
        message, name = path.split(".")
        assert getattr(getattr(caffe_pb2, message)(), name) == default


@pytest.mark.parametrize(
    "enum, values",
    [
        (caffe_pb2.V1LayerParameter.LayerType, {"NONE": 0, "CONVOLUTION": 4, "DATA": 5,
         "INNER_PRODUCT": 14, "POOLING": 17, "RELU": 18, "SOFTMAX_LOSS": 21, "ABSVAL": 35,
         "DECONVOLUTION": 39}),
        (caffe_pb2.PoolingParameter.RoundMode, {"CEIL": 0, "FLOOR": 1}),
        (caffe_pb2.SolverParameter.SolverType, {"SGD": 0, "NESTEROV": 1, "ADAGRAD": 2,
         "RMSPROP": 3, "ADADELTA": 4, "ADAM": 5}),
        (caffe_pb2.Phase, {"TRAIN": 0, "TEST": 1}),
        (caffe_pb2.ParamSpec.DimCheckMode, {"STRICT": 0, "PERMISSIVE": 1}),
    ],
)  # fmt: skip
def test_enum_values(enum, values):
    for name, number in values.items():
        assert enum.Value(name) == number


def test_packed_blob_data():
    # BlobProto data must stay packed, or .caffemodel files would not read back.
    for name in ("data", "diff", "double_data", "double_diff"):
        assert caffe_pb2.BlobProto.DESCRIPTOR.fields_by_name[name].is_packed
    assert caffe_pb2.BlobShape.DESCRIPTOR.fields_by_name["dim"].is_packed


def _our_schema():
    fd = _shipped_file_proto()
    labels = {1: "optional", 2: "required", 3: "repeated"}
    types = {v: k[5:].lower() for k, v in descriptor_pb2.FieldDescriptorProto.Type.items()}

    def fields(m):
        return {
            f.name: [
                f.number, labels[f.label], types[f.type], f.type_name or None,
                f.default_value if f.HasField("default_value") else None,
                f.options.packed if f.options.HasField("packed") else None,
            ]
            for f in m.field
        }  # fmt: skip

    def enums(es):
        return {e.name: [[v.name, v.number] for v in e.value] for e in es}

    messages = {m.name: {"fields": fields(m), "enums": enums(m.enum_type)} for m in fd.message_type}
    return enums(fd.enum_type), messages


def test_schema_matches_bvlc_fingerprint():
    """Every message, field (number, label, type, default, packed) and enum value of BVLC Caffe
    master's caffe.proto, recorded in caffe_schema_fingerprint.json, is ours too."""
    expected = json.loads(FINGERPRINT.read_text())
    enums, messages = _our_schema()
    assert expected["package"] == "caffe"
    assert set(messages) == set(expected["messages"]) | FORK_MESSAGES
    for name, want in expected["messages"].items():
        ours = messages[name]["fields"]
        added = {k: v for k, v in ours.items() if k not in want["fields"]}
        assert {k: v for k, v in ours.items() if k in want["fields"]} == want["fields"], name
        # fork fields in a BVLC message sit at 3001 and up, clear of every BVLC and fork number
        assert all(v[0] >= FORK_FIELD_BASE for v in added.values()), (name, added)
        got_enums = messages[name]["enums"]
        assert set(got_enums) - FORK_ENUMS.get(name, set()) == set(want["enums"]), name
        for enum_name, values in want["enums"].items():
            # same values; same first value, since that is a proto2 enum field's default
            assert sorted(map(tuple, got_enums[enum_name])) == sorted(map(tuple, values))
            assert got_enums[enum_name][0] == values[0]
    assert {k: sorted(map(tuple, v)) for k, v in enums.items()} == {
        k: sorted(map(tuple, v)) for k, v in expected["enums"].items()
    }
