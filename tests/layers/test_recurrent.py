"""RNN and LSTM against a NumPy transcription of the net Caffe unrolls (rnn_layer.cpp,
lstm_layer.cpp, recurrent_layer.cpp), float64 gradcheck, and Caffe's blob order.

OpenCV 4 is no second reference here: its Caffe importer knows no "RNN" type ("Can't create
layer"), and its "LSTM" reads OpenCV's own blob layout (Wh, Wx, b, h0, c0, five blobs) with
one or three bottoms, so it cannot run Caffe's three-blob LSTM with its cont bottom.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from caffe_alex.proto import caffe_pb2
from tests.reference import assert_caffemodel_round_trip, gradcheck_net, parse_net, randomize

STATES = {"RNN": ("h",), "LSTM": ("h", "c")}

# The layer's blobs are the unrolled net's params in the order Net::AppendParam meets them
# (layer order; a blob shared by name across time steps is listed once, at its first use),
# as RecurrentLayer::LayerSetUp collects them. RNN's unrolled layers: inputs, cont_slice,
# x_transform (W_xh, b_h), [W_xh_x_static (W_xh_static), its reshape], W_xh_x_slice, then per
# step h_conted (a Scale by cont, no blob), W_hh_h (W_hh), the sum, tanh, W_ho_h (W_ho, b_o),
# tanh. LSTM's: inputs, cont_slice, x_transform (W_xc, b_c), [W_xc_x_static (W_xc_static),
# reshape], W_xc_x_slice, then per step h_conted, transform (W_hc), gate_input, LSTMUnit.
ROLES = {
    "RNN": ("W_xh", "b_h", "W_xh_static", "W_hh", "W_ho", "b_o"),
    "LSTM": ("W_xc", "b_c", "W_xc_static", "W_hc"),
}

# Sequences restart (cont 0) in the middle of the batch; stream 2 continues from h_0 at t = 0.
CONT = np.array([[0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=np.float64)


def roles(kind, static):
    return [r for r in ROLES[kind] if static or not r.endswith("_static")]


def recurrent_net(
    kind, *, T=4, N=3, x_tail=(3, 2), static=None, expose=False, D=5, extra="", overrides=None
):
    """An Input feeding one ``kind`` layer "r": bottoms x, cont[, xs][, h_0[, c_0]], tops
    y[, h_T[, c_T]]; ``overrides`` replaces input shapes."""
    shapes = {"x": (T, N, *x_tail), "cont": (T, N)}
    if static:
        shapes["xs"] = (N, *static)
    states = STATES[kind] if expose else ()
    shapes.update({f"{s}_0": (1, N, D) for s in states})
    tops = ["y", *(f"{s}_T" for s in states)]
    shapes.update(overrides or {})
    dims = " ".join(f"shape {{ {' '.join(f'dim: {d}' for d in s)} }}" for s in shapes.values())
    return f"""name: "rec"
layer {{ name: "in" type: "Input" {" ".join(f'top: "{n}"' for n in shapes)}
  input_param {{ {dims} }} }}
layer {{ name: "r" type: "{kind}" {" ".join(f'bottom: "{n}"' for n in shapes)}
  {" ".join(f'top: "{t}"' for t in tops)}
  recurrent_param {{ num_output: {D} {"expose_hidden: true" if expose else ""} {extra} }} }}
"""


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def caffe_unrolled(kind, blobs, x, cont, x_static=None, h0=None, c0=None):
    """Caffe's unrolled net in float64: an InnerProduct of all of x at axis 2 (with the bias),
    of x_static at axis 1 (no bias); per step a Scale of h_{t-1} by cont_t, the recurrent
    InnerProduct (no bias), an Eltwise sum (recurrent, input, static), then tanh (RNN, with
    o_t = tanh(W_ho h_t + b_o)) or LSTMUnit (i, f, o, g; f times cont_t). Returns (top, h_T,
    c_T)."""
    T, N = cont.shape
    p = "xh" if kind == "RNN" else "xc"
    x_in = x.reshape(T, N, -1) @ blobs[f"W_{p}"].T + blobs[f"b_{p[1]}"]
    static = 0.0 if x_static is None else x_static.reshape(N, -1) @ blobs[f"W_{p}_static"].T
    D = blobs["W_hh" if kind == "RNN" else "W_hc"].shape[1]
    h = np.zeros((N, D)) if h0 is None else h0.reshape(N, D)
    c = np.zeros((N, D)) if c0 is None else c0.reshape(N, D)
    tops = []
    for t in range(T):
        h_conted = cont[t][:, None] * h
        if kind == "RNN":
            h = np.tanh(h_conted @ blobs["W_hh"].T + x_in[t] + static)
            tops.append(np.tanh(h @ blobs["W_ho"].T + blobs["b_o"]))
            continue
        i, f, o, g = np.split(h_conted @ blobs["W_hc"].T + x_in[t] + static, 4, axis=1)
        f = np.where(cont[t][:, None] == 0, 0.0, cont[t][:, None] * sigmoid(f))
        c = f * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        tops.append(h)
    return np.stack(tops), h[None], c[None]


def net_blobs(net, kind, static):
    return {r: b.detach().numpy() for r, b in zip(roles(kind, static), net.params["r"])}


def random_inputs(net, cont=CONT, seed=1):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(net.parameters()).dtype
    feed = {n: torch.randn(net.blob_shapes[n], generator=gen, dtype=dtype) for n in net.input_names}
    feed["cont"] = torch.as_tensor(cont, dtype=dtype)
    return feed


def reference(net, kind, feed, static):
    args = {k: v.numpy() for k, v in feed.items()}
    return caffe_unrolled(
        kind, net_blobs(net, kind, static), args["x"], args["cont"], args.get("xs"),
        args.get("h_0"), args.get("c_0"),
    )  # fmt: skip


CASES = [(k, s, e) for k in ("RNN", "LSTM") for s in (None, (2, 3)) for e in (False, True)]


@pytest.mark.parametrize("kind,static,expose", CASES)
def test_forward_matches_unrolled_caffe(kind, static, expose):
    net = Net(parse_net(recurrent_net(kind, static=static, expose=expose)), "TEST").double()
    randomize(net, seed=3)
    cont = CONT.copy()
    cont[3, 1] = 0.5  # any marker value simply multiplies
    feed = random_inputs(net, cont)
    out = net(**feed)
    top, h_t, c_t = reference(net, kind, feed, static)
    np.testing.assert_allclose(out["y"].detach().numpy(), top, rtol=1e-12, atol=1e-12)
    if expose:
        np.testing.assert_allclose(out["h_T"].numpy(), h_t, rtol=1e-12, atol=1e-12)
        if kind == "LSTM":
            np.testing.assert_allclose(out["c_T"].numpy(), c_t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_float32(kind):
    net = Net(parse_net(recurrent_net(kind, static=(4,), expose=True)), "TEST")
    randomize(net, seed=4)
    feed = random_inputs(net)
    top, _, _ = caffe_unrolled(
        kind,
        {r: v.astype(np.float64) for r, v in net_blobs(net, kind, True).items()},
        *(feed[n].double().numpy() for n in ("x", "cont", "xs", "h_0")),
        feed["c_0"].double().numpy() if kind == "LSTM" else None,
    )
    np.testing.assert_allclose(net(**feed)["y"].detach().numpy(), top, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_state_carries_into_the_next_call(kind):
    """Without expose_hidden Caffe starts each forward from the previous one's final state, so
    a sequence fed one step at a time equals it fed whole (Caffe's TestForward)."""
    whole = Net(parse_net(recurrent_net(kind, T=4)), "TEST").double()
    randomize(whole, seed=5)
    cont = np.array([[0, 1, 0], [1, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=np.float64)
    feed = random_inputs(whole, cont)
    first, second = whole(**feed)["y"], whole(**feed)["y"]
    top, h_t, c_t = reference(whole, kind, feed, None)
    np.testing.assert_allclose(first.detach().numpy(), top, rtol=1e-12)
    again, _, _ = caffe_unrolled(
        kind, net_blobs(whole, kind, False), feed["x"].numpy(), cont, None, h_t, c_t
    )
    np.testing.assert_allclose(second.detach().numpy(), again, rtol=1e-12)
    assert not np.allclose(again, top)  # stream 1 continues at t = 0

    step = Net(parse_net(recurrent_net(kind, T=1)), "TEST").double()
    with torch.no_grad():
        for mine, theirs in zip(step.params["r"], whole.params["r"]):
            mine.copy_(theirs)
    steps = [step(x=feed["x"][t : t + 1], cont=feed["cont"][t : t + 1])["y"] for t in range(4)]
    np.testing.assert_allclose(torch.cat(steps).detach().numpy(), top, rtol=1e-12)


def test_carried_state_follows_caffe_blob_memory():
    """Caffe's state blobs keep their memory when N shrinks (the first streams' states carry
    on) and are reallocated as zeros when N grows; Reset() zeroes them."""
    net = Net(parse_net(recurrent_net("RNN", T=1, N=3)), "TEST").double()
    randomize(net, seed=6)
    layer, ones = net.layer("r"), torch.ones(1, 3, dtype=torch.float64)
    x = torch.randn(1, 3, 3, 2, dtype=torch.float64)
    net(x=x, cont=ones)
    h3 = layer._carried[0][:10].clone()
    blobs = net_blobs(net, "RNN", False)
    small = net(x=x[:, :2], cont=ones[:, :2])["y"].detach().numpy()
    want, _, _ = caffe_unrolled("RNN", blobs, x[:, :2].numpy(), np.ones((1, 2)), None, h3.numpy())
    np.testing.assert_allclose(small, want, rtol=1e-12)
    grown = torch.randn(1, 4, 3, 2, dtype=torch.float64)
    big = net(x=grown, cont=torch.ones(1, 4, dtype=torch.float64))["y"].detach().numpy()
    want, _, _ = caffe_unrolled("RNN", blobs, grown.numpy(), np.ones((1, 4)))
    np.testing.assert_allclose(big, want, rtol=1e-12)
    layer.reset()
    fresh = net(x=grown, cont=torch.ones(1, 4, dtype=torch.float64))["y"].detach().numpy()
    np.testing.assert_allclose(fresh, want, rtol=1e-12)


GRAD_CONT = np.array([[0, 0], [1, 0], [0, 1]], dtype=np.float64)  # resets mid-sequence


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
@pytest.mark.parametrize("static,expose", [(None, False), ((3,), False), ((3,), True)])
def test_gradcheck(kind, static, expose):
    """Every blob and x, x_static over three steps with resets. With expose_hidden, h_0 (and
    c_0) are fixed inputs whose own gradient is zero (test_exposed_state_gradients); without
    it, t = 0 starts a sequence, so the state carried between gradcheck's calls is unused."""
    text = recurrent_net(kind, T=3, N=2, x_tail=(4,), static=static, expose=expose, D=3)
    net = Net(parse_net(text), "TEST")
    cont = GRAD_CONT.copy()
    if expose:
        cont[0, 0] = 1  # stream 0 continues from the given h_0 / c_0
    gen = torch.Generator().manual_seed(2)
    given = {"cont": torch.from_numpy(cont)}
    for name in ("h_0", "c_0"):
        if name in net.input_names:
            given[name] = torch.randn(net.blob_shapes[name], generator=gen)
    check = ["x", "xs"] if static else ["x"]
    gradcheck_net(text, outputs=["y"], inputs=given, check_inputs=check, seed=7)


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_exposed_state_gradients(kind):
    """Caffe shares only the data of h_0/c_0 and h_T/c_T with its unrolled net: the initial
    state gets a zero gradient and a gradient reaching the final-state tops is dropped."""
    net = Net(parse_net(recurrent_net(kind, expose=True)), "TEST").double()
    randomize(net, seed=8)
    feed = random_inputs(net, np.ones((4, 3)))
    for value in feed.values():
        value.requires_grad_()
    out = net(**feed)
    assert not out["h_T"].requires_grad
    out["y"].sum().backward()
    for s in STATES[kind]:
        assert torch.equal(feed[f"{s}_0"].grad, torch.zeros(1, 3, 5, dtype=torch.float64))
    assert feed["cont"].grad is None  # Caffe cannot backpropagate to the markers
    assert feed["x"].grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_lstm_and_rnn_blob_layout_and_fillers(kind):
    extra = (
        "weight_filler { type: 'gaussian' std: 0.1 } bias_filler { type: 'constant' value: 0.3 }"
    )
    text = recurrent_net(kind, static=(2, 3), x_tail=(4,), D=5, extra=extra + " debug_info: true")
    blobs = Net(parse_net(text), "TEST").params["r"]
    g = 4 if kind == "LSTM" else 1
    shapes = {"W_x": (5 * g, 4), "b": (5 * g,), "static": (5 * g, 6), "W_h": (5 * g, 5)}
    expected = [shapes["W_x"], shapes["b"], shapes["static"], shapes["W_h"]]
    if kind == "RNN":
        expected += [(5, 5), (5,)]
    assert [tuple(b.shape) for b in blobs] == expected
    for role, blob in zip(roles(kind, True), blobs):
        if role[0] == "b":
            assert torch.all(blob == np.float32(0.3))
        else:
            assert 0.03 < blob.std().item() < 0.3


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_shapes(kind):
    net = Net(parse_net(recurrent_net(kind, expose=True, static=(2,))), "TEST")
    assert net.blob_shapes["y"] == (4, 3, 5) and net.blob_shapes["h_T"] == (1, 3, 5)
    # N may change between calls; T and the input sizes may not
    shapes = {"x": (4, 2, 3, 2), "cont": (4, 2), "xs": (2, 2)}
    shapes.update({f"{s}_0": (1, 2, 5) for s in STATES[kind]})
    net.reshape(**shapes)
    assert net.blob_shapes["y"] == (4, 2, 5)
    assert net.blob_shapes[f"{STATES[kind][-1]}_T"] == (1, 2, 5)
    with pytest.raises(CaffeAlexError, match=r"layer 'r'.*T = 4 \(the number of time steps"):
        net.reshape(x=(5, 2, 3, 2), cont=(5, 2))
    with pytest.raises(CaffeAlexError, match=r"layer 'r'.*gives 8 inputs.*set up for 6"):
        net.reshape(x=(4, 2, 4, 2))
    with pytest.raises(CaffeAlexError, match=r"layer 'r'.*\(x_static\).*set up for 2"):
        net.reshape(xs=(2, 3))


@pytest.mark.parametrize(
    "kind,edit,message",
    [
        ("RNN", lambda t: t.replace("num_output: 5", ""), "num_output must be positive"),
        ("LSTM", lambda t: t.replace(' bottom: "xs"', ' bottom: "xs" bottom: "x"'), "3, got 4"),
        ("LSTM", lambda t: t.replace(' top: "y"', ' top: "y" top: "z"'), r"1 top\(s\).*got 2"),
        ("RNN", {"cont": (4, 3, 1)}, r"\(cont\) must be T x N = \[4, 3\]"),
        ("RNN", {"cont": (4, 2)}, r"\(cont\) must be T x N = \[4, 3\]"),
        ("LSTM", {"x": (4, 3)}, r"\(x\) must be T x N x \.\.\. \(3 or more"),
        ("LSTM", {"xs": (2, 2)}, r"\(x_static\) must be N x .* N = 3"),
        ("RNN", {"xs": (3,)}, r"\(x_static\) must be N x \.\.\."),
    ],
)  # fmt: skip
def test_setup_errors(kind, edit, message):
    if isinstance(edit, dict):
        text = recurrent_net(kind, static=(2,), overrides=edit)
    else:
        text = edit(recurrent_net(kind, static=(2,)))
    with pytest.raises(CaffeAlexError, match=r"layer 'r'.*" + message):
        Net(parse_net(text), "TEST")


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_exposed_bottoms_and_tops_counts(kind):
    text = recurrent_net(kind, expose=True)
    with pytest.raises(CaffeAlexError, match=r"expose_hidden true takes bottoms x, cont"):
        Net(parse_net(text.replace(' bottom: "h_0"', "")), "TEST")
    with pytest.raises(CaffeAlexError, match=r"\(h_0\) must be 1 x N x num_output = \[1, 3, 5\]"):
        Net(parse_net(text.replace("dim: 1 dim: 3 dim: 5", "dim: 1 dim: 3 dim: 4", 1)), "TEST")
    with pytest.raises(CaffeAlexError, match=r"expose_hidden true takes \d top"):
        Net(parse_net(text.replace(' top: "h_T"', "")), "TEST")


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_caffemodel_round_trip(kind, tmp_path):
    text = recurrent_net(kind, static=(2,))
    assert_caffemodel_round_trip(lambda: Net(parse_net(text), "TEST"), tmp_path, seed=9)


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_hand_built_caffemodel_blobs_take_caffes_roles(kind, tmp_path):
    """A .caffemodel written here blob by blob in Caffe's order (see ROLES): the forward must
    use each blob in its role. Sizes K = 6, K_s = 4, D = 5 differ, and the RNN's two square
    weights and two biases get different values, so any swap changes the output."""
    text = recurrent_net(kind, static=(4,), x_tail=(2, 3), expose=True)
    rng = np.random.default_rng(10)
    g, d = (4 if kind == "LSTM" else 1), 5
    shapes = {"W_x": (g * d, 6), "b": (g * d,), "W_h": (g * d, d), "W_o": (d, d), "st": (g * d, 4)}
    blobs = {}
    for role in roles(kind, True):
        key = "st" if role.endswith("static") else "b" if role[0] == "b" else role[:3]
        blobs[role] = (rng.standard_normal(shapes[key]) * 0.6).astype(np.float32)
    model = caffe_pb2.NetParameter(name="hand")
    layer = model.layer.add(name="r", type=kind)
    for role in roles(kind, True):
        blob = layer.blobs.add()
        blob.shape.dim.extend(blobs[role].shape)
        blob.data.extend(blobs[role].ravel().tolist())
    (tmp_path / "hand.caffemodel").write_bytes(model.SerializeToString())
    net = Net(parse_net(text), "TEST").double()
    net.load_weights(str(tmp_path / "hand.caffemodel"))
    feed = random_inputs(net)
    args = {k: v.numpy() for k, v in feed.items()}
    top, h_t, _ = caffe_unrolled(
        kind, {k: v.astype(np.float64) for k, v in blobs.items()}, args["x"], args["cont"],
        args["xs"], args["h_0"], args.get("c_0"),
    )  # fmt: skip
    out = net(**feed)
    np.testing.assert_allclose(out["y"].detach().numpy(), top, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["h_T"].numpy(), h_t, rtol=1e-6, atol=1e-7)


def test_lstm_gate_order_is_i_f_o_g():
    """Only the bias b_c: blocks i, f, o, g of 4D. Step 1 starts a sequence, step 2 continues."""
    net = Net(parse_net(recurrent_net("LSTM", T=2, N=1, D=1)), "TEST").double()
    bias = torch.tensor([0.3, -1.2, 0.8, 0.5], dtype=torch.float64)
    with torch.no_grad():
        net.params["r"][1].copy_(bias)
    y = net(x=torch.zeros(2, 1, 3, 2, dtype=torch.float64), cont=torch.tensor([[0.0], [1.0]]))
    i, f, o = torch.sigmoid(bias[:3])
    g = torch.tanh(bias[3])
    c1 = i * g
    c2 = f * c1 + i * g
    expected = torch.stack([o * torch.tanh(c1), o * torch.tanh(c2)])
    torch.testing.assert_close(y["y"].view(2), expected, rtol=1e-14, atol=0)


def test_rnn_output_layer():
    """RNN's top is o_t = tanh(W_ho h_t + b_o), not the hidden state h_t."""
    net = Net(parse_net(recurrent_net("RNN", T=1, N=1, D=1)), "TEST").double()
    with torch.no_grad():
        net.params["r"][1].fill_(0.4)  # b_h
        net.params["r"][3].fill_(2.0)  # W_ho
        net.params["r"][4].fill_(-0.1)  # b_o
    y = net(x=torch.zeros(1, 1, 3, 2, dtype=torch.float64), cont=torch.zeros(1, 1))["y"]
    assert y.item() == pytest.approx(np.tanh(2.0 * np.tanh(0.4) - 0.1), abs=1e-15)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_cuda_matches_cpu(kind):
    text = recurrent_net(kind, static=(2,), expose=True)
    cpu = Net(parse_net(text), "TEST").double()
    randomize(cpu, seed=11)
    feed = random_inputs(cpu)
    for v in feed.values():
        v.requires_grad_(v is not feed["cont"])
    out = cpu(**feed)["y"]
    out.sum().backward()
    gpu = Net(parse_net(text), "TEST").double()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    feed_gpu = {k: v.detach().cuda().requires_grad_(k == "x") for k, v in feed.items()}
    out_gpu = gpu(**feed_gpu)["y"]
    out_gpu.sum().backward()
    torch.testing.assert_close(out_gpu.cpu(), out)
    torch.testing.assert_close(feed_gpu["x"].grad.cpu(), feed["x"].grad)
    for mine, theirs in zip(gpu.params["r"], cpu.params["r"]):
        torch.testing.assert_close(mine.grad.cpu(), theirs.grad)
