"""Adam (Caffe's AdamSolver), type "Adam"; beta1 = momentum, beta2 = momentum2, eps = delta.

m = b1*m + (1-b1)*diff; v = b2*v + (1-b2)*diff^2;
update = local_lr * sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v)+delta), t = iter+1.
"""

import math

from engine.solvers.base import register_solver
from engine.solvers.sgd import SGDSolver


@register_solver("Adam")
class AdamSolver(SGDSolver):
    """Bias-corrected first and second moment estimates. History: all m, then all v."""

    num_history_sets = 2

    def compute_update_value(self, param_id, rate):
        p = self.net.learnable_params[param_id]
        n = len(self.net.learnable_params)
        m = self.history[param_id]
        v = self.history[n + param_id]
        tmp = self.temp(param_id)
        xp = self.xp(p)
        f32 = self._f32
        beta1, beta2 = f32(self.param.momentum), f32(self.param.momentum2)
        t = self.iter + 1
        # Caffe: sqrt(Dtype(1) - pow(beta2, t)) / (Dtype(1) - pow(beta1, t)), pow in double.
        correction = f32(math.sqrt(1.0 - float(beta2) ** t) / (1.0 - float(beta1) ** t))
        xp.multiply(p.diff, f32(1) - beta1, out=tmp)
        m *= beta1
        m += tmp
        xp.multiply(p.diff, p.diff, out=tmp)
        tmp *= f32(1) - beta2
        v *= beta2
        v += tmp
        xp.sqrt(v, out=tmp)
        tmp += f32(self.param.delta)
        xp.divide(m, tmp, out=p.diff)
        p.diff *= self.local_rate(param_id, rate) * correction
