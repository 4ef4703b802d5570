"""Nesterov's accelerated gradient (Caffe's NesterovSolver), type "Nesterov".

h' = momentum * h + local_lr * diff; update = (1 + momentum) * h' - momentum * h.
"""

from engine.solvers.base import register_solver
from engine.solvers.sgd import SGDSolver


@register_solver("Nesterov")
class NesterovSolver(SGDSolver):
    """SGD that steps back by the old momentum and over by the new one."""

    def compute_update_value(self, param_id, rate):
        p = self.net.learnable_params[param_id]
        h = self.history[param_id]
        old = self.temp(param_id)
        momentum = self._f32(self.param.momentum)
        old[...] = h
        h *= momentum
        p.diff *= self.local_rate(param_id, rate)
        h += p.diff
        # update = (1 + m) * h' - m * h_old, written into the diff
        p.diff[...] = h
        p.diff *= self._f32(1) + momentum
        old *= momentum
        p.diff -= old
