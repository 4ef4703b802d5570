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
        # Caffe's axpby: h = local_lr * diff + momentum * h; the update is h.
        h *= self._f32(self.param.momentum)
        self.xp(p).multiply(p.diff, self.local_rate(param_id, rate), out=tmp)
        h += tmp
        p.diff[...] = h
