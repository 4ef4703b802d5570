"""AdaGrad (Caffe's AdaGradSolver), type "AdaGrad"; momentum must be 0.

h += diff^2; update = local_lr * diff / (sqrt(h) + delta).
"""

from engine.solvers.base import register_solver
from engine.solvers.sgd import SGDSolver


@register_solver("AdaGrad")
class AdaGradSolver(SGDSolver):
    """Per-element learning rates from the running sum of squared gradients."""

    def check_param(self):
        super().check_param()
        if self.param.momentum != 0:
            raise self.error("momentum cannot be used with AdaGrad (set momentum: 0)")

    def compute_update_value(self, param_id, rate):
        p = self.net.learnable_params[param_id]
        h = self.history[param_id]
        tmp = self.temp(param_id)
        xp = self.xp(p)
        xp.multiply(p.diff, p.diff, out=tmp)
        h += tmp
        xp.sqrt(h, out=tmp)
        tmp += self._f32(self.param.delta)
        p.diff /= tmp
        p.diff *= self.local_rate(param_id, rate)
