"""RNN and LSTM (recurrent_param): Caffe's RecurrentLayer family.

Caffe builds an unrolled net of T steps; here the same computation is a loop over time, with
the layer's blobs in the order in which the unrolled net creates them (its params in layer
order, each shared blob listed once, at its first use), so trained .caffemodels load:
  RNN:  W_xh (D x K), b_h (D), [W_xh_static (D x K_s)], W_hh (D x D), W_ho (D x D), b_o (D)
  LSTM: W_xc (4D x K), b_c (4D), [W_xc_static (4D x K_s)], W_hc (4D x D)
(D = num_output, K = count of x from axis 2, K_s = count of x_static from axis 1.)

Bottoms: x (T x N x ...), cont (T x N), optionally x_static (N x ...), then with expose_hidden
the initial state h_0 (and c_0 for LSTM), each 1 x N x D. Tops: the T x N x D output, then
with expose_hidden the final state h_T (and c_T). Honours num_output, weight_filler,
bias_filler, expose_hidden and debug_info (logging only in Caffe; no effect on numbers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LayerConfigError
from ..registry import CaffeLayer, count, register
from .lstm_unit import lstm_unit


class _DataOnly(torch.autograd.Function):
    """An exposed h_0/c_0 bottom: Caffe shares its data, not its diff, with the unrolled net,
    so its gradient stays zero."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, dy):
        return torch.zeros_like(dy)


class _RecurrentLayer(CaffeLayer):
    """What RNN and LSTM share: Caffe's setup checks, shapes and the hidden state's plumbing."""

    params = {
        "recurrent_param": frozenset(
            {"num_output", "weight_filler", "bias_filler", "debug_info", "expose_hidden"}
        )
    }
    states: tuple[str, ...] = ()  # the recurrent blobs, in Caffe's bottom/top order

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        rp = layer_param.recurrent_param
        self.num_output, self.expose_hidden = rp.num_output, rp.expose_hidden
        if self.num_output <= 0:
            raise LayerConfigError("recurrent_param.num_output must be positive")
        exposed = len(self.states) * self.expose_hidden
        names = ", ".join(("x", "cont", "[x_static]", *(f"{s}_0" for s in self.states[:exposed])))
        if not 2 + exposed <= len(bottom_shapes) <= 3 + exposed:
            raise LayerConfigError(
                f"with recurrent_param.expose_hidden {str(self.expose_hidden).lower()} takes "
                f"bottoms {names}: {2 + exposed} or {3 + exposed}, got {len(bottom_shapes)}"
            )
        if len(layer_param.top) != 1 + exposed:
            tops = ", ".join(("output", *(f"{s}_T" for s in self.states[:exposed])))
            raise LayerConfigError(
                f"with recurrent_param.expose_hidden {str(self.expose_hidden).lower()} takes "
                f"{1 + exposed} top(s) ({tops}), got {len(layer_param.top)}"
            )
        self.static_input = len(bottom_shapes) > 2 + exposed
        x = tuple(bottom_shapes[0])
        if len(x) < 3:  # Caffe needs 2 axes, then its inner product at axis 2 a third one
            raise LayerConfigError(
                f"bottom 0 (x) must be T x N x ... (3 or more axes), got {list(x)}"
            )
        self.timesteps, self.k = x[0], count(x, 2)
        self.k_static = count(bottom_shapes[2], 1) if self.static_input else 0
        self.top_shapes(bottom_shapes)
        self._make_blobs(rp)
        self._carried: list[torch.Tensor] = [torch.zeros(0) for _ in self.states]

    def _make_blobs(self, rp) -> None:
        raise NotImplementedError

    def _add_weight(self, rows, cols, rp):
        self.new_blob((rows, cols), rp.weight_filler)

    def top_shapes(self, bottom_shapes):
        x, cont = (tuple(s) for s in bottom_shapes[:2])
        if len(x) < 3 or x[0] != self.timesteps:
            raise LayerConfigError(
                f"bottom 0 (x) must be T x N x ... with T = {self.timesteps} (the number of "
                f"time steps cannot change), got {list(x)}"
            )
        n, d = x[1], self.num_output
        if len(cont) != 2 or cont != x[:2]:
            raise LayerConfigError(
                f"bottom 1 (cont) must be T x N = {list(x[:2])}, got {list(cont)}"
            )
        self._check_inputs(x, "x", 0, 2, self.k)
        if self.static_input:
            xs = tuple(bottom_shapes[2])
            if len(xs) < 2 or xs[0] != n:  # the x_static inner product is at axis 1
                raise LayerConfigError(
                    f"bottom 2 (x_static) must be N x ... with N = {n}, got {list(xs)}"
                )
            self._check_inputs(xs, "x_static", 2, 1, self.k_static)
        first = 2 + self.static_input
        for index, shape in enumerate(bottom_shapes[first:], first):
            if tuple(shape) != (1, n, d):
                name = f"{self.states[index - first]}_0"
                raise LayerConfigError(
                    f"bottom {index} ({name}) must be 1 x N x num_output = {[1, n, d]}, "
                    f"got {list(shape)}"
                )
        exposed = len(self.states) * self.expose_hidden
        return [(x[0], n, d)] + [(1, n, d)] * exposed

    def _check_inputs(self, shape, what, index, axis, k) -> None:
        if count(shape, axis) != k:
            raise LayerConfigError(
                f"bottom {index} ({what}) shape {list(shape)} gives {count(shape, axis)} inputs "
                f"from axis {axis}, but the weights were set up for {k}"
            )

    def forward(self, x, cont, *rest):
        cont = cont.detach().to(x.dtype)  # Caffe cannot backpropagate to the markers
        x_static = rest[0] if self.static_input else None
        if self.expose_hidden:
            state = [_DataOnly.apply(h) for h in rest[self.static_input :]]
        else:
            state = self._carried_state(x)
        static = None
        if x_static is not None:
            static = F.linear(x_static.flatten(1), self.blobs[2]).view(1, x.shape[1], -1)
        out, final = self._run(x.flatten(2), cont, static, state)
        if not self.expose_hidden:
            self._carry(final)
            return out
        # Caffe's exposed final state shares the data only: a gradient arriving there is lost.
        return (out, *(f.detach() for f in final))

    def _carried_state(self, x):
        """Without expose_hidden, Caffe copies the previous call's final state into h_0 (c_0)
        before each forward, through blobs that keep their memory when they shrink and come
        back zeroed when they grow: we keep the same flat memory per state."""
        n = x.shape[1] * self.num_output
        zeros = x.new_zeros(1, x.shape[1], self.num_output)
        return [m[:n].to(x).view(zeros.shape) if m.numel() >= n else zeros for m in self._carried]

    def _carry(self, final) -> None:
        for index, value in enumerate(final):
            flat, old = value.detach().reshape(-1), self._carried[index]
            if old.numel() > flat.numel():
                flat = torch.cat((flat, old[flat.numel() :].to(flat)))
            self._carried[index] = flat

    def reset(self) -> None:
        """Caffe's RecurrentLayer::Reset: zero the carried state."""
        self._carried = [torch.zeros_like(m) for m in self._carried]

    def _hidden_input(self, h, cont_t, weight, input_t, static):
        """W * (cont_t * h_{t-1}) + input_t (+ static), summed in Caffe's Eltwise order."""
        total = F.linear(h * cont_t, weight) + input_t
        return total + static if static is not None else total


@register("RNN")
class RNNLayer(_RecurrentLayer):
    """h_t = tanh(W_hh (cont_t h_{t-1}) + W_xh x_t + b_h [+ W_xh_static x_static]);
    top o_t = tanh(W_ho h_t + b_o)."""

    states = ("h",)
    bottoms = (2, 4)
    tops = (1, 2)

    def _make_blobs(self, rp):
        d = self.num_output
        self._add_weight(d, self.k, rp)
        self.new_blob((d,), rp.bias_filler)
        if self.static_input:
            self._add_weight(d, self.k_static, rp)
        self._add_weight(d, d, rp)
        self._add_weight(d, d, rp)
        self.new_blob((d,), rp.bias_filler)

    def _run(self, x, cont, static, state):
        w_xh, b_h, *_, w_hh, w_ho, b_o = self.blobs
        x_in = F.linear(x, w_xh, b_h)
        (h,) = state
        hs = []
        for t in range(x.shape[0]):
            cont_t = cont[t : t + 1].unsqueeze(-1)
            h = torch.tanh(self._hidden_input(h, cont_t, w_hh, x_in[t : t + 1], static))
            hs.append(h)
        return torch.tanh(F.linear(torch.cat(hs), w_ho, b_o)), [h]


@register("LSTM")
class LSTMLayer(_RecurrentLayer):
    """Gates (i, f, o, g) = W_hc (cont_t h_{t-1}) + W_xc x_t + b_c [+ W_xc_static x_static],
    then Caffe's LSTMUnit: c_t = cont_t f c_{t-1} + i g, h_t = o tanh(c_t); top h."""

    states = ("h", "c")
    bottoms = (2, 5)
    tops = (1, 3)

    def _make_blobs(self, rp):
        d4 = 4 * self.num_output
        self._add_weight(d4, self.k, rp)
        self.new_blob((d4,), rp.bias_filler)
        if self.static_input:
            self._add_weight(d4, self.k_static, rp)
        self._add_weight(d4, self.num_output, rp)

    def _run(self, x, cont, static, state):
        w_xc, b_c, *_, w_hc = self.blobs
        x_in = F.linear(x, w_xc, b_c)
        h, c = state
        hs = []
        for t in range(x.shape[0]):
            cont_t = cont[t : t + 1]
            gates = self._hidden_input(h, cont_t.unsqueeze(-1), w_hc, x_in[t : t + 1], static)
            c, h = lstm_unit(c, gates, cont_t)
            hs.append(h)
        return torch.cat(hs), [h, c]
