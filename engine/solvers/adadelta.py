"""AdaDelta (Caffe's AdaDeltaSolver), type "AdaDelta"; `momentum` is the decay.

h = m*h + (1-m)*diff^2; s = diff*sqrt((u+delta)/(h+delta)); u = m*u + (1-m)*s^2;
update = local_lr * s. History: all h (one per param), then all u.
"""

from engine.solvers.base import register_solver
from engine.solvers.sgd import SGDSolver


@register_solver("AdaDelta")
class AdaDeltaSolver(SGDSolver):
    """Updates scaled by the ratio of running RMS of past updates to that of gradients."""

    num_history_sets = 2

    def compute_update_value(self, param_id, rate):
        p = self.net.learnable_params[param_id]
        n = len(self.net.learnable_params)
        h = self.history[param_id]
        u = self.history[n + param_id]
        tmp = self.temp(param_id)
        xp = self.xp(p)
        m = self._f32(self.param.momentum)
        one_minus = self._f32(1) - m
        delta = self._f32(self.param.delta)
        xp.multiply(p.diff, p.diff, out=tmp)
        tmp *= one_minus
        h *= m
        h += tmp
        # s = diff * sqrt((u + delta) / (h + delta))
        xp.add(u, delta, out=tmp)
        tmp /= h + delta
        xp.sqrt(tmp, out=tmp)
        p.diff *= tmp
        xp.multiply(p.diff, p.diff, out=tmp)
        tmp *= one_minus
        u *= m
        u += tmp
        p.diff *= self.local_rate(param_id, rate)
