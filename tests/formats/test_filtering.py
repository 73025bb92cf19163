"""Net state filtering (Caffe's Net::FilterNet and StateMeetsRule)."""

from __future__ import annotations

import pytest
from google.protobuf import text_format

from caffe_alex.formats.filtering import filter_net, layer_included, make_state, state_meets_rule
from caffe_alex.proto import caffe_pb2


def rule(text: str) -> caffe_pb2.NetStateRule:
    return text_format.Parse(text, caffe_pb2.NetStateRule())


@pytest.mark.parametrize(
    "rule_text, phase, level, stages, meets",
    [
        ("", "TEST", 0, (), True),
        ("phase: TRAIN", "TRAIN", 0, (), True),
        ("phase: TRAIN", "TEST", 0, (), False),
        ("min_level: 1", "TEST", 0, (), False),
        ("min_level: 1", "TEST", 1, (), True),
        ("max_level: 1", "TEST", 2, (), False),
        ("max_level: 1", "TEST", 1, (), True),
        ('stage: "a" stage: "b"', "TEST", 0, ("a",), False),  # every stage is required
        ('stage: "a" stage: "b"', "TEST", 0, ("b", "a", "c"), True),
        ('not_stage: "deploy"', "TEST", 0, ("deploy",), False),
        ('not_stage: "deploy"', "TEST", 0, ("train",), True),
        ('phase: TEST stage: "x" not_stage: "y"', "TEST", 0, ("x",), True),
    ],
)
def test_state_meets_rule(rule_text, phase, level, stages, meets):
    assert state_meets_rule(make_state(phase, level, stages), rule(rule_text)) is meets


def test_include_any_exclude_any():
    layer = text_format.Parse(
        "include { phase: TRAIN } include { stage: 'x' }", caffe_pb2.LayerParameter()
    )
    assert layer_included(layer, make_state("TRAIN"))
    assert layer_included(layer, make_state("TEST", stages=["x"]))
    assert not layer_included(layer, make_state("TEST"))
    layer = text_format.Parse("exclude { phase: TEST }", caffe_pb2.LayerParameter())
    assert layer_included(layer, make_state("TRAIN"))
    assert not layer_included(layer, make_state("TEST"))


NET = """
name: "n"
state { stage: "from_file" level: 3 }
layer { name: "train_data" type: "Data" include { phase: TRAIN } }
layer { name: "test_data" type: "Data" include { phase: TEST } }
layer { name: "both" type: "ReLU" }
layer { name: "staged" type: "ReLU" include { stage: "from_file" stage: "extra" } }
layer { name: "leveled" type: "ReLU" include { max_level: 0 } }
"""


def test_filter_net_merges_the_given_state_over_the_files():
    net = text_format.Parse(NET, caffe_pb2.NetParameter())
    names = [layer.name for layer in filter_net(net, make_state("TRAIN")).layer]
    assert names == ["train_data", "both", "leveled"]  # the given level 0 replaces the file's 3
    filtered = filter_net(net, make_state("TEST", stages=["extra"]))
    assert [layer.name for layer in filtered.layer] == ["test_data", "both", "staged", "leveled"]
    assert list(filtered.state.stage) == ["from_file", "extra"]
    assert len(net.layer) == 5  # the argument is unchanged


def test_include_and_exclude_together_is_refused():
    net = text_format.Parse(
        "layer { name: 'bad' include { phase: TRAIN } exclude { phase: TEST } }",
        caffe_pb2.NetParameter(),
    )
    with pytest.raises(ValueError, match="'bad' specifies both include and exclude"):
        filter_net(net, make_state("TRAIN"))


def test_make_state_rejects_unknown_phase():
    with pytest.raises(ValueError, match="TRAIN or TEST"):
        make_state("VAL")
