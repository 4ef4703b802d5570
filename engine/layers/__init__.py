"""The layer catalog: one module per layer (or small family), registered by Caffe type name.

Every module in this package is imported here, so adding a file adds its layers. As in
pycaffe (`from caffe import layers as L`), a CamelCase attribute is a net_spec layer factory:
`engine.layers.Convolution(n.data, num_output=20)`. Keep the package's own names lowercase.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")


def __getattr__(name):
    """`L.Convolution`: pycaffe's layer factories; other missing names stay missing."""
    if name[:1].isupper():
        from engine import net_spec

        return net_spec.layer_factory(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
