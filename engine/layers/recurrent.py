"""Recurrent layers RNN and LSTM (Caffe's recurrent/rnn/lstm layers) and LSTMUnit, computed
directly: one batched input projection for all T steps, a loop over time, and BPTT."""

import numpy as np

from engine.backend import get_array_module
from engine.layer import Layer, register


def _sigmoid(xp, x):
    return np.float32(1) / (np.float32(1) + xp.exp(-x))


def _lstm_unit_forward(xp, c_prev, gates, cont):
    """One LSTM step, Caffe's LSTMUnit: c_prev (N, H), gates (N, 4H) pre-activations in the
    order i, f, o, g, cont (N,). Returns c, h and the activations (f includes cont)."""
    hd = c_prev.shape[1]
    acts = xp.empty_like(gates)
    acts[:, : 3 * hd] = _sigmoid(xp, gates[:, : 3 * hd])
    acts[:, 3 * hd :] = xp.tanh(gates[:, 3 * hd :])
    cont = cont[:, None]
    # Caffe: f = cont == 0 ? 0 : cont * sigmoid(x_f)
    acts[:, hd : 2 * hd] = xp.where(cont == 0, np.float32(0), cont * acts[:, hd : 2 * hd])
    i, f, o, g = (acts[:, k * hd : (k + 1) * hd] for k in range(4))
    c = f * c_prev + i * g
    h = o * xp.tanh(c)
    return c, h, acts


def _lstm_unit_backward(xp, c_prev, acts, c, dc, dh):
    """Gradients of one LSTMUnit step: returns (dc_prev, dgates). As Caffe, the forget
    gate's derivative is f (1 - f) with f = cont * sigmoid(x_f) (exact for cont in {0, 1})."""
    hd = c_prev.shape[1]
    i, f, o, g = (acts[:, k * hd : (k + 1) * hd] for k in range(4))
    tanh_c = xp.tanh(c)
    c_term = dc + dh * o * (1 - tanh_c * tanh_c)
    dgates = xp.empty_like(acts)
    dgates[:, :hd] = c_term * g * i * (1 - i)
    dgates[:, hd : 2 * hd] = c_term * c_prev * f * (1 - f)
    dgates[:, 2 * hd : 3 * hd] = dh * tanh_c * o * (1 - o)
    dgates[:, 3 * hd :] = c_term * i * (1 - g * g)
    return c_term * f, dgates


class _Recurrent(Layer):
    """Shared set-up of RNN and LSTM: bottoms x (T x N x ...), cont (T x N), [x_static
    (N x ...)], [exposed initial states (1 x N x H each)]; tops: output (T x N x H),
    [exposed final states]. Without expose_hidden the final state of one forward is the
    initial state of the next (cont = 0 at t = 0 discards it), as Caffe does."""

    num_recur = 1
    min_num_bottom = 2
    max_num_bottom = 5
    min_num_top = 1
    max_num_top = 3

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.expose_hidden = param.recurrent_param.expose_hidden
        exposed = self.num_recur if self.expose_hidden else 0
        self.static_input = len(param.bottom) == 3 + exposed
        first = 2 + int(self.static_input)
        # cont and the exposed initial states never get a gradient (Caffe leaves them).
        self.no_grad_bottoms = (1,) + tuple(range(first, first + exposed))
        self._state = None

    def layer_setup(self, bottom, top):
        rp = self.param.recurrent_param
        exposed = self.num_recur if self.expose_hidden else 0
        if len(bottom) != 2 + int(self.static_input) + exposed:
            raise self.error(
                f"takes x, cont{', x_static' if self.static_input else ''} and "
                f"{exposed} exposed state bottom(s); got {len(bottom)} bottoms"
            )
        if len(top) != 1 + exposed:
            raise self.error(f"needs {1 + exposed} top(s), got {len(top)}")
        self.hidden = rp.num_output
        if self.hidden <= 0:
            raise self.error("recurrent_param.num_output must be positive")
        if len(bottom[0].shape) < 2:
            raise self.error(f"x must be T x N x ..., got shape {bottom[0].shape}")
        dim = bottom[0].count_range(2)
        static_dim = bottom[2].count_range(1) if self.static_input else 0
        self._make_blobs(dim, static_dim, rp.weight_filler, rp.bias_filler)

    def reshape(self, bottom, top):
        x, cont = bottom[0], bottom[1]
        if len(x.shape) < 2:
            raise self.error(f"x must be T x N x ..., got shape {x.shape}")
        t_steps, n = x.shape[:2]
        if cont.shape != (t_steps, n):
            raise self.error(f"cont must be T x N = {(t_steps, n)}, got {cont.shape}")
        if x.count_range(2) != self.blobs[0].shape[1]:
            raise self.error(
                f"x has {x.count_range(2)} features per step, the layer was set up for "
                f"{self.blobs[0].shape[1]}"
            )
        state_shape = (1, n, self.hidden)
        if self.static_input and bottom[2].shape[:1] != (n,):
            raise self.error(f"x_static must have N = {n} rows, got shape {bottom[2].shape}")
        if self.expose_hidden:
            for b in bottom[len(bottom) - self.num_recur :]:
                if b.shape != state_shape:
                    raise self.error(f"exposed state bottoms must be {state_shape}, got {b.shape}")
            for t in top[1:]:
                t.reshape(state_shape)
        top[0].reshape((t_steps, n, self.hidden))

    def _initial_state(self, xp, bottom, n):
        if self.expose_hidden:
            return [b.data.reshape(n, self.hidden) for b in bottom[-self.num_recur :]]
        if self._state is None or self._state[0].shape != (n, self.hidden):
            self._state = [xp.zeros((n, self.hidden), np.float32) for _ in range(self.num_recur)]
        return self._state

    def _finish_forward(self, top, final):
        if self.expose_hidden:
            for t, s in zip(top[1:], final):
                t.data[...] = s.reshape(t.shape)
        else:
            self._state = [s.copy() for s in final]

    def _check_cont(self, propagate_down):
        if propagate_down[1]:
            raise self.error("cannot back-propagate to sequence indicators (cont)")

    def _input_projection(self, xp, bottom, w, b, w_static):
        """W x_t + b for every step at once (T x N x G), plus W_static x_static."""
        t_steps, n = bottom[1].shape
        x2 = bottom[0].data.reshape(t_steps * n, -1)
        pre = (x2 @ w.T + b).reshape(t_steps, n, -1)
        if self.static_input:
            pre += (bottom[2].data.reshape(n, -1) @ w_static.T)[None]
        return pre

    def _input_backward(self, propagate_down, bottom, dpre, w_i, b_i, ws_i):
        """Accumulate the input-projection gradients given d(pre) (T x N x G)."""
        t_steps, n = bottom[1].shape
        d2 = dpre.reshape(t_steps * n, -1)
        x2 = bottom[0].data.reshape(t_steps * n, -1)
        if self.param_propagate(w_i):
            self.blobs[w_i].diff[...] += d2.T @ x2
        if self.param_propagate(b_i):
            self.blobs[b_i].diff[...] += d2.sum(axis=0)
        if propagate_down[0]:
            bottom[0].diff[...] = (d2 @ self.blobs[w_i].data).reshape(bottom[0].shape)
        if self.static_input:
            ds = dpre.sum(axis=0)
            xs = bottom[2].data.reshape(n, -1)
            if self.param_propagate(ws_i):
                self.blobs[ws_i].diff[...] += ds.T @ xs
            if propagate_down[2]:
                bottom[2].diff[...] = (ds @ self.blobs[ws_i].data).reshape(bottom[2].shape)


@register("RNN")
class RNN(_Recurrent):
    """h_t = tanh(W_hh (cont_t h_{t-1}) + W_xh x_t + b_h [+ W_xh_static x_static]),
    o_t = tanh(W_ho h_t + b_o); top: o (T x N x H), [h_T with expose_hidden].

    Blobs: W_xh (H x D), b_h (H), [W_xh_static (H x D_s)], W_hh (H x H), W_ho (H x H),
    b_o (H). Backward: BPTT; no gradient to cont, h0 or through the hT top.
    """

    def _make_blobs(self, dim, static_dim, wf, bf):
        hd = self.hidden
        self.add_blob((hd, dim), wf)
        self.add_blob((hd,), bf)
        if self.static_input:
            self.add_blob((hd, static_dim), wf)
        self.add_blob((hd, hd), wf)
        self.add_blob((hd, hd), wf)
        self.add_blob((hd,), bf)
        s = int(self.static_input)
        self.i_xs, self.i_hh, self.i_ho, self.i_bo = 2 if s else None, 2 + s, 3 + s, 4 + s

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        t_steps, n = bottom[1].shape
        blobs = self.blobs
        w_xs = blobs[self.i_xs].data if self.static_input else None
        pre = self._input_projection(xp, bottom, blobs[0].data, blobs[1].data, w_xs)
        w_hh = blobs[self.i_hh].data
        cont = bottom[1].data
        (h_prev,) = self._initial_state(xp, bottom, n)
        self.h_conted = xp.empty((t_steps, n, self.hidden), np.float32)
        self.h = xp.empty((t_steps, n, self.hidden), np.float32)
        for t in range(t_steps):
            self.h_conted[t] = cont[t][:, None] * h_prev
            h_prev = self.h[t] = xp.tanh(self.h_conted[t] @ w_hh.T + pre[t])
        h2 = self.h.reshape(t_steps * n, self.hidden)
        o = xp.tanh(h2 @ blobs[self.i_ho].data.T + blobs[self.i_bo].data)
        top[0].data[...] = o.reshape(top[0].shape)
        self._finish_forward(top, [self.h[-1]])

    def backward(self, top, propagate_down, bottom):
        self._check_cont(propagate_down)
        xp = get_array_module(top[0].diff)
        t_steps, n = bottom[1].shape
        hd = self.hidden
        blobs = self.blobs
        o = top[0].data.reshape(t_steps * n, hd)
        do = top[0].diff.reshape(t_steps * n, hd) * (1 - o * o)
        h2 = self.h.reshape(t_steps * n, hd)
        if self.param_propagate(self.i_ho):
            blobs[self.i_ho].diff[...] += do.T @ h2
        if self.param_propagate(self.i_bo):
            blobs[self.i_bo].diff[...] += do.sum(axis=0)
        dh_out = (do @ blobs[self.i_ho].data).reshape(t_steps, n, hd)
        w_hh = blobs[self.i_hh].data
        cont = bottom[1].data
        da = xp.empty_like(dh_out)
        dh_next = 0
        for t in range(t_steps - 1, -1, -1):
            da[t] = (dh_out[t] + dh_next) * (1 - self.h[t] * self.h[t])
            dh_next = (da[t] @ w_hh) * cont[t][:, None]
        if self.param_propagate(self.i_hh):
            blobs[self.i_hh].diff[...] += da.reshape(-1, hd).T @ self.h_conted.reshape(-1, hd)
        self._input_backward(propagate_down, bottom, da, 0, 1, self.i_xs)


@register("LSTM")
class LSTM(_Recurrent):
    """gates_t = W_hc (cont_t h_{t-1}) + W_xc x_t + b_c [+ W_xc_static x_static] (order i, f,
    o, g), c_t = cont_t f_t c_{t-1} + i_t g_t, h_t = o_t tanh(c_t) (sigmoid i, f, o; tanh g).

    top: h (T x N x H), [h_T, c_T with expose_hidden]. Blobs: W_xc (4H x D), b_c (4H),
    [W_xc_static (4H x D_s)], W_hc (4H x H). Backward: BPTT; no gradient to cont, h0, c0.
    """

    num_recur = 2

    def _make_blobs(self, dim, static_dim, wf, bf):
        g = 4 * self.hidden
        self.add_blob((g, dim), wf)
        self.add_blob((g,), bf)
        if self.static_input:
            self.add_blob((g, static_dim), wf)
        self.add_blob((g, self.hidden), wf)
        self.i_xs = 2 if self.static_input else None
        self.i_hc = 3 if self.static_input else 2

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        t_steps, n = bottom[1].shape
        hd = self.hidden
        blobs = self.blobs
        w_xs = blobs[self.i_xs].data if self.static_input else None
        pre = self._input_projection(xp, bottom, blobs[0].data, blobs[1].data, w_xs)
        w_hc = blobs[self.i_hc].data
        cont = bottom[1].data
        h_prev, c_prev = self._initial_state(xp, bottom, n)
        self.h_conted = xp.empty((t_steps, n, hd), np.float32)
        self.c = xp.empty((t_steps + 1, n, hd), np.float32)  # c[t] = c_{t-1}; c[0] = c0
        self.acts = xp.empty((t_steps, n, 4 * hd), np.float32)
        h = top[0].data
        self.c[0] = c_prev
        for t in range(t_steps):
            self.h_conted[t] = cont[t][:, None] * h_prev
            gates = self.h_conted[t] @ w_hc.T + pre[t]
            self.c[t + 1], h[t], self.acts[t] = _lstm_unit_forward(xp, self.c[t], gates, cont[t])
            h_prev = h[t]
        self._finish_forward(top, [h[-1], self.c[-1]])

    def backward(self, top, propagate_down, bottom):
        self._check_cont(propagate_down)
        xp = get_array_module(top[0].diff)
        t_steps, n = bottom[1].shape
        hd = self.hidden
        w_hc = self.blobs[self.i_hc].data
        cont = bottom[1].data
        dh_top = top[0].diff
        dgates = xp.empty((t_steps, n, 4 * hd), np.float32)
        dh_next = xp.zeros((n, hd), np.float32)
        dc_next = xp.zeros((n, hd), np.float32)
        for t in range(t_steps - 1, -1, -1):
            dc_next, dgates[t] = _lstm_unit_backward(
                xp, self.c[t], self.acts[t], self.c[t + 1], dc_next, dh_top[t] + dh_next
            )
            dh_next = (dgates[t] @ w_hc) * cont[t][:, None]
        if self.param_propagate(self.i_hc):
            dg2 = dgates.reshape(-1, 4 * hd)
            self.blobs[self.i_hc].diff[...] += dg2.T @ self.h_conted.reshape(-1, hd)
        self._input_backward(propagate_down, bottom, dgates, 0, 1, self.i_xs)


@register("LSTMUnit")
class LSTMUnit(Layer):
    """One LSTM step: i, f, o = sigmoid, g = tanh of the gate blocks of x (order i, f, o, g),
    f' = cont * f, c = f' c_prev + i g, h = o tanh(c).

    bottoms: c_prev (1 x N x H), gates x (1 x N x 4H), cont (1 x N); tops: c, h (1 x N x H).
    No gradient to cont.
    """

    exact_num_bottom = 3
    exact_num_top = 2
    no_grad_bottoms = (2,)

    def reshape(self, bottom, top):
        n = bottom[0].shape[1] if len(bottom[0].shape) > 1 else -1
        for i, b in enumerate(bottom):
            axes = 2 if i == 2 else 3
            if len(b.shape) != axes or b.shape[0] != 1 or b.shape[1] != n:
                raise self.error(
                    f"bottom {i} must be 1 x N{' x ...' if i < 2 else ''} with N = {n}, "
                    f"got shape {b.shape}"
                )
        self.hidden = bottom[0].shape[2]
        if bottom[1].shape[2] != 4 * self.hidden:
            raise self.error(
                f"gates must have 4 * H = {4 * self.hidden} channels, got {bottom[1].shape}"
            )
        top[0].reshape(bottom[0].shape)
        top[1].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        c, h, self.acts = _lstm_unit_forward(
            xp, bottom[0].data[0], bottom[1].data[0], bottom[2].data[0]
        )
        top[0].data[0] = c
        top[1].data[0] = h

    def backward(self, top, propagate_down, bottom):
        if propagate_down[2]:
            raise self.error("cannot back-propagate to sequence indicators (cont)")
        if not (propagate_down[0] or propagate_down[1]):
            return
        xp = get_array_module(bottom[0].data)
        dc_prev, dgates = _lstm_unit_backward(
            xp, bottom[0].data[0], self.acts, top[0].data[0], top[0].diff[0], top[1].diff[0]
        )
        if propagate_down[0]:
            bottom[0].diff[0] = dc_prev
        if propagate_down[1]:
            bottom[1].diff[0] = dgates
