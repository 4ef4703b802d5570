"""SGD with momentum (Caffe's SGDSolver): the default solver type "SGD".

h = momentum * h + local_lr * diff; update = h.
"""

from engine.solvers.base import Solver, register_solver


@register_solver("SGD")
class SGDSolver(Solver):
    """Stochastic gradient descent with momentum; history = the momentum buffer per param."""

    def compute_update_value(self, param_id, rate):
        p = self.net.learnable_params[param_id]
        h = self.history[param_id]
        tmp = self.temp(param_id)
        h *= self._f32(self.param.momentum)
        tmp[...] = p.diff
        tmp *= self.local_rate(param_id, rate)
        h += tmp
        p.diff[...] = h
