"""Element-wise activations ReLU, Sigmoid and TanH (Caffe's relu/sigmoid/tanh layers).

All keep the bottom's shape and may run in place (top is bottom).
"""

from engine.backend import get_array_module
from engine.layer import NeuronLayer, register


@register("ReLU")
class ReLU(NeuronLayer):
    """y = max(x, 0) + negative_slope * min(x, 0); N x ... in, same shape out.

    Backward: dx = dy * (x > 0 ? 1 : negative_slope), with x read from bottom[0] as Caffe
    does (in place that is y, which has the same sign for a non-negative slope).
    """

    def layer_setup(self, bottom, top):
        self.slope = float(self.param.relu_param.negative_slope)

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        x = bottom[0].data
        if self.slope == 0.0:
            xp.maximum(x, 0, out=top[0].data)
        else:
            top[0].data[...] = xp.where(x > 0, x, x * self.slope)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = get_array_module(bottom[0].data)
        x = bottom[0].data
        dy = top[0].diff
        if self.slope == 0.0:
            xp.multiply(dy, x > 0, out=bottom[0].diff)
        else:
            bottom[0].diff[...] = xp.where(x > 0, dy, dy * self.slope)


@register("Sigmoid")
class Sigmoid(NeuronLayer):
    """y = 1 / (1 + exp(-x)), computed as 0.5 * tanh(0.5 x) + 0.5 (overflow-free, as Caffe).

    Backward: dx = dy * y * (1 - y). Any shape in, same shape out.
    """

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        y = top[0].data
        xp.multiply(bottom[0].data, 0.5, out=y)
        xp.tanh(y, out=y)
        y *= 0.5
        y += 0.5

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            y = top[0].data
            g = 1 - y
            g *= y
            get_array_module(g).multiply(g, top[0].diff, out=bottom[0].diff)


@register("TanH")
class TanH(NeuronLayer):
    """y = tanh(x); backward dx = dy * (1 - y^2). Any shape in, same shape out."""

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        xp.tanh(bottom[0].data, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            y = top[0].data
            g = y * y
            xp = get_array_module(g)
            xp.subtract(1, g, out=g)
            xp.multiply(g, top[0].diff, out=bottom[0].diff)
