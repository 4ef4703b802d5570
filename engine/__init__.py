"""A Caffe-compatible deep-learning engine on NumPy (CPU) and CuPy (GPU).

Mirrors pycaffe, so a pycaffe script runs with `import engine as caffe`.
"""

import os

# OpenBLAS worker threads otherwise spin ~0.1 s after every call and steal the cores from the
# Python work between GEMMs (measured: LeNet 22.7 -> 14.2 ms/batch). Read once, when NumPy
# loads: worker processes get it in their environment (caffeonspark.launch).
BLAS_ENV_DEFAULTS = {"OPENBLAS_THREAD_TIMEOUT": "4"}
for _k, _v in BLAS_ENV_DEFAULTS.items():
    os.environ.setdefault(_k, _v)

# The imports below load NumPy, so they come after the environment above.
from engine import io  # noqa: E402, F401  (pycaffe's caffe.io)
from engine.backend import set_device, set_mode_cpu, set_mode_gpu  # noqa: E402
from engine.blob import Blob  # noqa: E402
from engine.layer import Layer, register  # noqa: E402
from engine.layer import registered_types as layer_type_list  # noqa: E402  (pycaffe's name)
from engine.net import TEST, TRAIN, Net  # noqa: E402
from engine.proto import caffe_pb2  # noqa: E402
from engine.rng import set_random_seed  # noqa: E402

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


# pycaffe's caffe.NetSpec / caffe.params / caffe.to_proto; caffe.layers is engine.layers, whose
# CamelCase attributes are the net_spec layer factories.
_NET_SPEC_NAMES = ("NetSpec", "params", "to_proto")
_CLASSIFIER_NAMES = ("Classifier", "Detector")
_SUBMODULES = ("draw", "layers", "net_spec")


def __getattr__(name):
    # Solvers import the net machinery; load them (and net_spec) on first use.
    if name in _SOLVER_NAMES:
        import engine.solvers

        return getattr(engine.solvers, name)
    if name in _NET_SPEC_NAMES:
        import engine.net_spec

        return getattr(engine.net_spec, name)
    if name in _CLASSIFIER_NAMES:
        import engine.classifier

        return getattr(engine.classifier, name)
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"engine.{name}")
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
    *_NET_SPEC_NAMES,
    *_CLASSIFIER_NAMES,
    "layer_type_list",
    *_SUBMODULES,
]
