"""Caffe's Python layer (`type: "Python"`): a layer the user writes in Python, named in the
prototxt by `python_param { module layer param_str }`, as in Caffe built WITH_PYTHON_LAYER.
"""

import importlib
import sys

from engine.blob import BlobVec
from engine.layer import Layer, register


@register("Python")
class PythonLayer(Layer):
    """Runs the user's class `python_param.layer` from module `python_param.module`.

    As in pycaffe, the class is constructed with the LayerParameter, gets `param_str` and
    `phase` (0 TRAIN, 1 TEST) before `setup(bottom, top)`, then `reshape(bottom, top)`,
    `forward(bottom, top)` and `backward(top, propagate_down, bottom)`; its learnable
    parameters are the blobs it adds with `self.blobs.add_blob(*shape)` in `setup`. Any
    numbers of bottoms and tops; in place allowed (Caffe does not check Python layers).
    Blob arrays are the backend's: NumPy, or CuPy under set_mode_gpu (Caffe hands a Python
    layer host copies there).
    """

    allow_in_place = True

    def __init__(self, param, phase):
        super().__init__(param, phase)
        pp = param.python_param
        if not pp.module or not pp.layer:
            raise self.error("python_param needs both `module` and `layer` (the class name)")
        where = f"{pp.module}.{pp.layer}"
        try:
            module = importlib.import_module(pp.module)
        except ModuleNotFoundError as e:
            if e.name != pp.module and not pp.module.startswith(f"{e.name}."):
                raise self._import_failed(where, e) from e  # the module itself imports badly
            raise self.error(
                f"cannot import module {pp.module!r}: {e}. Put its folder on PYTHONPATH "
                "(on Spark: ship it with spark-submit --py-files). Searched: "
                + ", ".join(dict.fromkeys(p or "." for p in sys.path))
            ) from None
        except Exception as e:  # noqa: BLE001 - the user's module failed while loading
            raise self._import_failed(where, e) from e
        cls = getattr(module, pp.layer, None)
        if cls is None:
            raise self.error(f"module {pp.module!r} ({module.__file__}) has no {pp.layer!r}")
        try:
            impl = cls(param)
        except Exception as e:  # noqa: BLE001 - name the layer, keep the user's traceback
            raise self.error(f"constructing {where}(param) failed: {e!r}") from e
        if not isinstance(getattr(impl, "blobs", None), BlobVec):
            impl.blobs = self.blobs
        self.blobs = impl.blobs  # one list: the net, solvers and snapshots see the user's params
        impl.param_str = pp.param_str
        impl.phase = int(phase)
        self.impl = impl
        self.where = where

    def _import_failed(self, where, e):
        return self.error(f"importing the module of {where} failed: {type(e).__name__}: {e}")

    def _call(self, method, *args):
        fn = getattr(self.impl, method, None)
        if fn is None:
            raise self.error(f"{self.where} has no method {method}()")
        try:
            return fn(*args)
        except Exception as e:
            e.add_note(f"in {self.where}.{method}() of Python layer {self.name!r}")
            raise

    def layer_setup(self, bottom, top):
        self._call("setup", bottom, top)

    def reshape(self, bottom, top):
        self._call("reshape", bottom, top)

    def forward(self, bottom, top):
        self._call("forward", bottom, top)

    def backward(self, top, propagate_down, bottom):
        self._call("backward", top, list(propagate_down), bottom)
