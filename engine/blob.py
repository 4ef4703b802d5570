"""Blob: Caffe's N-d array pair (data and diff), float32, NCHW.

Layers share Blob objects: an in-place layer's top is its bottom's Blob.
"""

import numpy as np

from engine import backend


class Blob:
    """Holds `data` and `diff` of one shape; `reshape` reallocates only on a change."""

    __slots__ = ("_data", "_diff", "_shape")

    def __init__(self, shape=(), dtype=np.float32):
        self._shape = ()
        self._data = None
        self._diff = None
        self.reshape(shape)

    # --- shape -----------------------------------------------------------------------------
    @property
    def shape(self):
        return self._shape

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"blob shape has a negative dimension: {shape}")
        if shape == self._shape and self._data is not None:
            return
        xp = backend.xp()
        self._shape = shape
        self._data = xp.zeros(shape, dtype=np.float32)
        self._diff = xp.zeros(shape, dtype=np.float32)

    def reshape_like(self, other):
        self.reshape(other.shape)

    @property
    def count(self):
        n = 1
        for d in self._shape:
            n *= d
        return n

    def count_range(self, start, end=None):
        end = len(self._shape) if end is None else end
        n = 1
        for d in self._shape[start:end]:
            n *= d
        return n

    @property
    def num_axes(self):
        return len(self._shape)

    def canonical_axis(self, axis):
        n = len(self._shape)
        if not -n <= axis < max(n, 1):
            raise IndexError(f"axis {axis} out of range for a {n}-axis blob {self._shape}")
        return axis + n if axis < 0 else axis

    # pycaffe-style legacy accessors (Caffe pads missing axes with 1)
    @property
    def num(self):
        return self._shape[0] if len(self._shape) > 0 else 1

    @property
    def channels(self):
        return self._shape[1] if len(self._shape) > 1 else 1

    @property
    def height(self):
        return self._shape[2] if len(self._shape) > 2 else 1

    @property
    def width(self):
        return self._shape[3] if len(self._shape) > 3 else 1

    # --- storage ---------------------------------------------------------------------------
    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        self._data[...] = value

    @property
    def diff(self):
        return self._diff

    @diff.setter
    def diff(self, value):
        self._diff[...] = value

    def set_data(self, array):
        """Replace the data array itself (no copy), e.g. to share it with another blob."""
        if tuple(array.shape) != self._shape:
            raise ValueError(f"set_data shape {tuple(array.shape)} != blob shape {self._shape}")
        self._data = array

    def set_diff(self, array):
        if tuple(array.shape) != self._shape:
            raise ValueError(f"set_diff shape {tuple(array.shape)} != blob shape {self._shape}")
        self._diff = array

    def __repr__(self):
        return f"Blob{self._shape}"


class BlobVec(list):
    """A layer's parameter blobs: a list of Blob with pycaffe's `add_blob(*shape)`, which
    Python layers call in `setup` to create their learnable parameters (zero-filled)."""

    def add_blob(self, *shape):
        blob = Blob(shape)
        self.append(blob)
        return blob
