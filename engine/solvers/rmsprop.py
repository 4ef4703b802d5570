"""RMSProp (Caffe's RMSPropSolver), type "RMSProp"; momentum must be 0.

h = rms_decay * h + (1 - rms_decay) * diff^2; update = local_lr * diff / (sqrt(h) + delta).
"""

from engine.solvers.base import register_solver
from engine.solvers.sgd import SGDSolver


@register_solver("RMSProp")
class RMSPropSolver(SGDSolver):
    """Per-element learning rates from a decaying mean of squared gradients."""

    def check_param(self):
        super().check_param()
        p = self.param
        if p.momentum != 0:
            raise self.error("momentum cannot be used with RMSProp (set momentum: 0)")
        if not 0 <= p.rms_decay < 1:
            raise self.error(f"rms_decay must be in [0, 1), got {p.rms_decay}")

    def compute_update_value(self, param_id, rate):
        p = self.net.learnable_params[param_id]
        h = self.history[param_id]
        tmp = self.temp(param_id)
        xp = self.xp(p)
        decay = self._f32(self.param.rms_decay)
        xp.multiply(p.diff, p.diff, out=tmp)
        tmp *= self._f32(1) - decay
        h *= decay
        h += tmp
        xp.sqrt(h, out=tmp)
        tmp += self._f32(self.param.delta)
        p.diff /= tmp
        p.diff *= self.local_rate(param_id, rate)
