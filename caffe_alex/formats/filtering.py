"""Net state filtering: which layers belong to a phase/level/stages (Caffe's Net::FilterNet)."""

from __future__ import annotations

from collections.abc import Iterable

from ..proto import caffe_pb2

PHASES = ("TRAIN", "TEST")


def make_state(
    phase: str = "TEST", level: int = 0, stages: Iterable[str] = ()
) -> caffe_pb2.NetState:
    phase = phase.upper()
    if phase not in PHASES:
        raise ValueError(f"phase must be TRAIN or TEST, got {phase!r}")
    state = caffe_pb2.NetState(phase=caffe_pb2.Phase.Value(phase), level=level)
    state.stage.extend(stages)
    return state


def state_meets_rule(state: caffe_pb2.NetState, rule: caffe_pb2.NetStateRule) -> bool:
    """True when every condition the rule sets holds for the state (Caffe's StateMeetsRule)."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(stage not in stages for stage in rule.stage):
        return False
    return not any(stage in stages for stage in rule.not_stage)


def layer_included(layer: caffe_pb2.LayerParameter, state: caffe_pb2.NetState) -> bool:
    """Caffe's rule: with include rules, any one met includes; else any exclude rule met drops.

    A layer may not have both (Caffe refuses such a net); callers check that first.
    """
    if layer.include:
        return any(state_meets_rule(state, rule) for rule in layer.include)
    return not any(state_meets_rule(state, rule) for rule in layer.exclude)


def merged_state(net: caffe_pb2.NetParameter, state: caffe_pb2.NetState) -> caffe_pb2.NetState:
    """The given state over the net's own ``state`` field, as Caffe's Net constructor merges
    them: phase and level replace the file's, stages are added to the file's stages."""
    merged = caffe_pb2.NetState()
    merged.CopyFrom(net.state)
    merged.MergeFrom(state)
    return merged


def included_indices(net: caffe_pb2.NetParameter, state: caffe_pb2.NetState) -> list[int]:
    """Indices into ``net.layer`` of the layers that ``state`` (merged as above) includes."""
    merged = merged_state(net, state)
    kept = []
    for index, layer in enumerate(net.layer):
        if layer.include and layer.exclude:
            raise ValueError(
                f"layer '{layer.name}' specifies both include and exclude; only one is allowed"
            )
        if layer_included(layer, merged):
            kept.append(index)
    return kept


def filter_net(net: caffe_pb2.NetParameter, state: caffe_pb2.NetState) -> caffe_pb2.NetParameter:
    """A copy of ``net`` holding only the layers that ``state`` includes (Caffe's FilterNet)."""
    filtered = caffe_pb2.NetParameter()
    filtered.CopyFrom(net)
    del filtered.layer[:]
    filtered.state.CopyFrom(merged_state(net, state))
    for index in included_indices(net, state):
        filtered.layer.add().CopyFrom(net.layer[index])
    return filtered
