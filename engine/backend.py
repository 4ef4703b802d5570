"""The CPU/GPU switch: which array module (NumPy or CuPy) the engine computes with.

Layers call `xp()` or `get_array_module(arr)` and are written once for both.
"""

import numpy as np

_state = {"mode": "cpu", "device": 0, "xp": np}


def xp():
    """The array module of the current mode (numpy on CPU, cupy on GPU)."""
    return _state["xp"]


def get_array_module(*arrays):
    """The array module an array belongs to (numpy unless one of them is a CuPy array)."""
    for a in arrays:
        mod = type(a).__module__
        if mod.startswith("cupy"):
            import cupy

            return cupy
    return np


def set_mode_cpu():
    _state["mode"] = "cpu"
    _state["xp"] = np


def set_mode_gpu():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "GPU mode needs CuPy: pip install 'caffeonspark[cuda12]' (or cuda13)"
        ) from e
    cupy.cuda.Device(_state["device"]).use()
    _state["mode"] = "gpu"
    _state["xp"] = cupy


def set_device(device_id):
    _state["device"] = int(device_id)
    if _state["mode"] == "gpu":
        import cupy

        cupy.cuda.Device(_state["device"]).use()


def mode():
    return _state["mode"]


def to_numpy(a):
    """A host (NumPy) copy or view of an array from either module."""
    if isinstance(a, np.ndarray):
        return a
    get = getattr(a, "get", None)
    return get() if get is not None else np.asarray(a)
