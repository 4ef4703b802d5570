"""Weight fillers (FillerParameter): constant, uniform, gaussian, xavier, msra,
positive_unitball, bilinear; the numbers follow Caffe's filler.hpp."""

import numpy as np

from engine import backend
from engine.proto import caffe_pb2
from engine.rng import rng

_VN = caffe_pb2.FillerParameter


def _fans(shape):
    count = int(np.prod(shape)) if shape else 1
    fan_in = count // shape[0] if shape else 1
    fan_out = count // shape[1] if len(shape) > 1 else count
    return fan_in, fan_out


def _scale_n(param, shape):
    fan_in, fan_out = _fans(shape)
    if param.variance_norm == _VN.AVERAGE:
        return (fan_in + fan_out) / 2.0
    if param.variance_norm == _VN.FAN_OUT:
        return float(fan_out)
    return float(fan_in)


def _constant(param, shape):
    return np.full(shape, param.value, dtype=np.float32)


def _uniform(param, shape):
    return rng().uniform(param.min, param.max, size=shape)


def _gaussian(param, shape):
    w = rng().normal(param.mean, param.std, size=shape)
    if param.sparse >= 0:
        # Caffe keeps each weight with probability sparse / num_outputs (shape[0] for IP).
        if len(shape) < 2:
            raise ValueError("sparse gaussian filler needs a blob with at least 2 axes")
        num_outputs = shape[0]
        keep = rng().random(size=shape) < (param.sparse / num_outputs)
        w = w * keep
    return w


def _positive_unitball(param, shape):
    w = rng().uniform(0.0, 1.0, size=shape)
    w = w.reshape(shape[0] if shape else 1, -1)
    w = w / w.sum(axis=1, keepdims=True)
    return w.reshape(shape)


def _xavier(param, shape):
    a = np.sqrt(3.0 / _scale_n(param, shape))
    return rng().uniform(-a, a, size=shape)


def _msra(param, shape):
    return rng().normal(0.0, np.sqrt(2.0 / _scale_n(param, shape)), size=shape)


def _bilinear(param, shape):
    if len(shape) != 4 or shape[2] != shape[3]:
        raise ValueError(f"bilinear filler needs a 4-axis blob with square kernels, got {shape}")
    k = shape[3]
    f = np.ceil(k / 2.0)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    x = np.arange(k)
    w1 = 1 - np.abs(x / f - c)
    kernel = np.outer(w1, w1)
    return np.broadcast_to(kernel, shape).copy()


_FILLERS = {
    "constant": _constant,
    "uniform": _uniform,
    "gaussian": _gaussian,
    "positive_unitball": _positive_unitball,
    "xavier": _xavier,
    "msra": _msra,
    "bilinear": _bilinear,
}


def filled(param, shape):
    """A new float32 NumPy array of `shape` drawn as the FillerParameter says."""
    try:
        fn = _FILLERS[param.type]
    except KeyError:
        raise ValueError(
            f"unknown filler type {param.type!r} (known: {', '.join(sorted(_FILLERS))})"
        ) from None
    return np.asarray(fn(param, tuple(shape)), dtype=np.float32)


def fill(blob, param):
    """Fill a Blob's data in place."""
    xp = backend.xp()
    blob.data[...] = xp.asarray(filled(param, blob.shape))
