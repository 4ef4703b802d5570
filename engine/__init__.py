"""A Caffe-compatible deep-learning engine on NumPy (CPU) and CuPy (GPU).

Mirrors pycaffe, so a pycaffe script runs with `import engine as caffe`.
"""

from engine import io  # noqa: F401  (pycaffe's caffe.io)
from engine.backend import set_device, set_mode_cpu, set_mode_gpu
from engine.blob import Blob
from engine.layer import Layer, register
from engine.net import TEST, TRAIN, Net
from engine.proto import caffe_pb2
from engine.rng import set_random_seed

__version__ = "0.1.0"

_SOLVER_NAMES = (
    "Solver",
    "get_solver",
    "SGDSolver",
    "NesterovSolver",
    "AdaGradSolver",
    "RMSPropSolver",
    "AdaDeltaSolver",
    "AdamSolver",
)


def __getattr__(name):
    # Solvers import the net machinery; load them on first use.
    if name in _SOLVER_NAMES:
        import engine.solvers

        return getattr(engine.solvers, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


__all__ = [
    "Blob",
    "Layer",
    "Net",
    "TEST",
    "TRAIN",
    "caffe_pb2",
    "io",
    "register",
    "set_device",
    "set_mode_cpu",
    "set_mode_gpu",
    "set_random_seed",
    *_SOLVER_NAMES,
]
