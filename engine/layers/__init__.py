"""The layer catalog: one module per layer (or small family), registered by Caffe type name.

Every module in this package is imported here, so adding a file adds its layers.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
