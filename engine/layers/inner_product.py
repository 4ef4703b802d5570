"""InnerProduct (fully connected): one GEMM over all rows of the flattened bottom."""

from engine import backend
from engine.layer import Layer, register


@register("InnerProduct")
class InnerProduct(Layer):
    """y = x W^T + b, with x the bottom flattened from `axis` on (M rows of K values).

    bottom (d0, ..., d_{axis-1}, ...) -> top (d0, ..., d_{axis-1}, num_output).
    Weights (num_output, K), or (K, num_output) with `transpose: true`; bias (num_output,).
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        ip = self.param.inner_product_param
        self.num_output = int(ip.num_output)
        if self.num_output <= 0:
            raise self.error("num_output must be positive")
        self.bias_term = bool(ip.bias_term)
        self.transpose = bool(ip.transpose)
        self.axis = bottom[0].canonical_axis(ip.axis)
        self.k = bottom[0].count_range(self.axis)
        wshape = (self.k, self.num_output) if self.transpose else (self.num_output, self.k)
        self.blobs.clear()
        self.add_blob(wshape, ip.weight_filler)
        if self.bias_term:
            self.add_blob((self.num_output,), ip.bias_filler)

    def reshape(self, bottom, top):
        b = bottom[0]
        axis = b.canonical_axis(self.param.inner_product_param.axis)
        k = b.count_range(axis)
        if k != self.k:
            raise self.error(
                f"input size incompatible with inner product parameters: bottom {b.shape} "
                f"gives {k} inputs per row from axis {axis}, the weights expect {self.k}"
            )
        self.axis = axis
        self.m = b.count_range(0, axis)
        top[0].reshape(b.shape[:axis] + (self.num_output,))

    def _w(self):
        """The weights as a (K, num_output) matrix (a view: no copy either way)."""
        w = self.blobs[0].data
        return w if self.transpose else w.T

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.m, self.k)
        y = top[0].data.reshape(self.m, self.num_output)
        xp = backend.get_array_module(x)
        xp.matmul(x, self._w(), out=y)
        if self.bias_term:
            y += self.blobs[1].data

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff.reshape(self.m, self.num_output)
        x = bottom[0].data.reshape(self.m, self.k)
        xp = backend.get_array_module(dy)
        if self.param_propagate(0):
            dw = self.blobs[0].diff
            if self.transpose:
                dw += x.T @ dy
            else:
                dw += dy.T @ x
        if self.bias_term and self.param_propagate(1):
            self.blobs[1].diff[...] += dy.sum(axis=0)
        if propagate_down[0]:
            dx = bottom[0].diff.reshape(self.m, self.k)
            xp.matmul(dy, self._w().T, out=dx)
