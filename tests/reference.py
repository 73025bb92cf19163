"""Independent references for layer tests: OpenCV 4's Caffe importer and small helpers.

``opencv_forward`` writes the prototxt and a .caffemodel (built here with the generated
protobuf classes) to a temporary folder and runs ``cv2.dnn.readNetFromCaffe`` on them.
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import torch
from google.protobuf import text_format

from caffe_alex.net import Net
from caffe_alex.proto import caffe_pb2


def parse_net(text: str) -> caffe_pb2.NetParameter:
    return text_format.Parse(text, caffe_pb2.NetParameter())


def randomize(net: Net, seed: int = 0, scale: float = 0.5) -> None:
    """Random values in every blob (also BatchNorm statistics; its scale factor stays positive)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, blobs in net.params.items():
            for blob in blobs:
                values = torch.randn(blob.shape, generator=gen) * scale
                if net.layer(name).type_name == "BatchNorm":
                    values = values.abs() + 0.5
                blob.copy_(values)


def fan_in_weights(net: Net, seed: int = 0) -> None:
    """Random weights that keep a deep net's activations of order one (randomize's unit scale
    grows them by orders of magnitude per layer): weights N(0, 1/fan_in), small biases,
    BatchNorm statistics near (0, 1) with scale factor 1, Scale factors near 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, blobs in net.params.items():
            kind = net.layer(name).type_name
            for index, blob in enumerate(blobs):
                noise = torch.randn(blob.shape, generator=gen)
                if kind == "BatchNorm":
                    values = [noise * 0.1, noise.abs() * 0.2 + 0.8, torch.ones(blob.shape)][index]
                elif kind == "Scale":
                    values = 1 + 0.1 * noise if index == 0 else 0.1 * noise
                elif index == 0 and blob.dim() > 1:
                    values = noise / math.sqrt(blob[0].numel())
                else:
                    values = 0.1 * noise
                blob.copy_(values)


def varint(value: int) -> bytes:
    """A protobuf varint, encoded here (independent of caffe_alex's wire writer)."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _blob_bytes(array: np.ndarray) -> bytes:
    # BlobProto.shape = 7, BlobProto.data = 5 (packed floats): encoded by hand because filling
    # a repeated float field from Python costs seconds for AlexNet's 61M weights.
    shape = caffe_pb2.BlobShape(dim=array.shape).SerializeToString()
    data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    return _field(7, shape) + _field(5, data)


def caffemodel_bytes(net: Net) -> bytes:
    """A .caffemodel (binary NetParameter) holding the net's blobs under their layer names."""
    parts = [caffe_pb2.NetParameter(name=net.name).SerializeToString()]
    for name, blobs in net.params.items():
        layer = caffe_pb2.LayerParameter(name=name, type=net.layer(name).type_name)
        payload = layer.SerializeToString()
        payload += b"".join(_field(7, _blob_bytes(b.detach().cpu().numpy())) for b in blobs)
        parts.append(_field(100, payload))  # NetParameter.layer = 100
    return b"".join(parts)  # one join: appending to bytes is quadratic for large nets


def assert_caffemodel_round_trip(make_net, tmp_path, seed: int = 3) -> None:
    """``make_net()`` builds the net afresh. Both directions of the weights file go through an
    encoder or decoder other than ours: a randomized net saved by caffe-alex must parse with
    protobuf's own decoder to Caffe's blobs (layer names, shapes, values), and a file encoded
    by hand (caffemodel_bytes) must load into a fresh net as those values."""
    net = make_net()
    randomize(net, seed=seed)
    ours = tmp_path / "ours.caffemodel"
    net.save_weights(ours)
    decoded = caffe_pb2.NetParameter.FromString(ours.read_bytes())
    found = {lp.name: list(lp.blobs) for lp in decoded.layer if lp.blobs}
    assert list(found) == list(net.params)
    for name, blobs in net.params.items():
        assert len(found[name]) == len(blobs), name
        for blob, proto in zip(blobs, found[name]):
            assert tuple(proto.shape.dim) == tuple(blob.shape), name
            np.testing.assert_array_equal(
                np.array(proto.data, np.float32), blob.detach().numpy().ravel(), err_msg=name
            )
    hand = tmp_path / "hand.caffemodel"
    hand.write_bytes(caffemodel_bytes(net))
    fresh = make_net()
    fresh.load_weights(str(hand))
    for name, blobs in net.params.items():
        for blob, loaded in zip(blobs, fresh.params[name]):
            assert loaded.shape == blob.shape and torch.equal(loaded, blob), name


def opencv_forward(prototxt: str, net: Net, inputs: dict[str, np.ndarray], outputs: list[str]):
    import cv2

    with tempfile.TemporaryDirectory() as tmp:
        proto_path = os.path.join(tmp, "net.prototxt")
        model_path = os.path.join(tmp, "net.caffemodel")
        with open(proto_path, "w") as f:
            f.write(prototxt)
        with open(model_path, "wb") as f:
            f.write(caffemodel_bytes(net))
        cv_net = cv2.dnn.readNetFromCaffe(proto_path, model_path)
    cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    for name, value in inputs.items():
        cv_net.setInput(np.ascontiguousarray(value, dtype=np.float32), name)
    results = cv_net.forward(outputs)
    return {name: np.asarray(r) for name, r in zip(outputs, results)}


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64).reshape(ours.shape)
    denom = max(np.abs(reference).max(), 1e-30)
    return float(np.abs(ours - reference).max() / denom)


def compare_with_opencv(
    prototxt: str,
    outputs: list[str] | None = None,
    seed: int = 0,
    tol: float = 1e-5,
    input_scale: float = 1.0,
) -> dict[str, float]:
    """Build ``prototxt`` (TEST phase), fill it with random weights and inputs, run it here and in
    OpenCV, and assert max|ours - cv| / max|cv| <= tol for each output. Returns the errors."""
    net = Net(parse_net(prototxt), "TEST")
    randomize(net, seed)
    rng = np.random.default_rng(seed)
    inputs = {
        n: (rng.standard_normal(net.blob_shapes[n]) * input_scale).astype(np.float32)
        for n in net.input_names
    }
    outputs = outputs or net.output_names
    with torch.no_grad():
        ours = net(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    ours = {**net.blobs, **ours}
    theirs = opencv_forward(prototxt, net, inputs, outputs)
    errors = {}
    for name in outputs:
        assert tuple(ours[name].shape) == tuple(theirs[name].shape), (
            f"{name}: shape {tuple(ours[name].shape)} vs OpenCV {tuple(theirs[name].shape)}"
        )
        errors[name] = relative_error(ours[name].numpy(), theirs[name])
        assert errors[name] <= tol, f"{name}: relative error {errors[name]:.3g} > {tol}"
    return errors


def gradcheck_net(
    prototxt: str,
    outputs: list[str] | None = None,
    seed: int = 0,
    phase: str = "TEST",
    input_scale: float = 1.0,
    inputs: dict | None = None,
    check_inputs: list[str] | None = None,
) -> None:
    """float64 ``torch.autograd.gradcheck`` of a whole (small) net: gradients of the chosen
    outputs with respect to the inputs (all by default; labels can be left out with
    ``check_inputs``) and to every learnable blob."""
    net = Net(parse_net(prototxt), phase).double()
    randomize(net, seed)
    net.double()
    gen = torch.Generator().manual_seed(seed)
    given = dict(inputs or {})
    values = {
        n: given[n].double()
        if n in given
        else torch.randn(net.blob_shapes[n], generator=gen, dtype=torch.float64) * input_scale
        for n in net.input_names
    }
    check = (
        check_inputs if check_inputs is not None else [n for n in net.input_names if n not in given]
    )
    leaves = [values[n].requires_grad_() for n in check]
    params = [p for p in net.parameters() if p.requires_grad]
    outputs = outputs or net.output_names

    def run(*tensors):
        feed = dict(values)
        feed.update(zip(check, tensors[: len(check)]))
        result = net(**feed)
        merged = {**net.blobs, **result}
        return tuple(merged[o] for o in outputs)

    assert torch.autograd.gradcheck(run, (*leaves, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


def check_runtime_variants(net: Net, x: torch.Tensor, output: str = "out") -> None:
    """One-input net: channels_last input, bf16 input and torch.compile (fullgraph, forward and
    backward) all give the float32 eager result."""
    ref = net(data=x)[output]
    torch.testing.assert_close(net(data=x.to(memory_format=torch.channels_last))[output], ref)
    low = net(data=x.bfloat16())[output]
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=2e-2, atol=2e-2)
    torch._dynamo.reset()  # every Net shares Net.forward: stay under dynamo's recompile limit
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = compiled(data=xc)[output]
    out.sum().backward()
    net(data=xe)[output].sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(xc.grad, xe.grad)


def loss_net(kind, s_shape, l_shape, params="", tops=("loss",), extra="", name="loss") -> str:
    """An Input of scores "s" and labels "l" feeding one two-bottom layer ``kind`` (a loss or
    Accuracy) called ``name``, with ``params`` and ``extra`` fields pasted into it."""

    def dims(shape):
        return " ".join(f"dim: {d}" for d in shape)

    top_lines = " ".join(f'top: "{t}"' for t in tops)
    return f"""name: "{name}_test"
layer {{ name: "in" type: "Input" top: "s" top: "l"
  input_param {{ shape {{ {dims(s_shape)} }} shape {{ {dims(l_shape)} }} }} }}
layer {{ name: "{name}" type: "{kind}" bottom: "s" bottom: "l" {top_lines} {extra} {params} }}
"""


def build_error(tmp_path, text: str):
    """The CaffeAlexError building net ``text`` (written as tmp_path/net.prototxt) raises."""
    import pytest

    from caffe_alex.errors import CaffeAlexError

    path = tmp_path / "net.prototxt"
    path.write_text(text)
    with pytest.raises(CaffeAlexError) as info:
        Net.from_prototxt(str(path))
    return info.value
