"""Gradient exchange between data-parallel solvers: every learnable parameter packed into one
contiguous float32 buffer, so one collective call per iteration moves all of them.

comm/mpi.py carries the buffer over MPI on CPUs (NCCL on GPUs comes later).
"""

import numpy as np


class FlatBuffer:
    """One contiguous float32 buffer laid over a list of Blobs (data or diff), plus `extra`
    trailing slots for scalars that ride along (e.g. the loss).

    gather_*() copies the blobs into the buffer, scatter_*() copies it back (optionally
    scaled); views of each blob's slice are made once.
    """

    def __init__(self, blobs, extra=0, xp=np):
        self.blobs = list(blobs)
        self.sizes = [int(b.count) for b in self.blobs]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)]).tolist()
        self.count = self.offsets[-1]
        self.extra = int(extra)
        self.buffer = xp.zeros(self.count + self.extra, dtype=np.float32)
        self._slices = [
            self.buffer[a:b].reshape(blob.shape)
            for a, b, blob in zip(self.offsets, self.offsets[1:], self.blobs)
        ]

    @property
    def tail(self):
        """The `extra` trailing slots."""
        return self.buffer[self.count :]

    @property
    def nbytes(self):
        return int(self.buffer.nbytes)

    def alias_diffs(self, others=()):
        """Make each blob's diff *be* its slice of the buffer (Blob.set_diff), so backward
        writes gradients straight into the buffer and gather/scatter copy nothing. A blob
        whose diff memory another blob in `others` also uses (a shared parameter seen through
        a reshaped view) keeps its own array and is copied. Returns how many are aliased."""
        count = 0
        for view, blob in zip(self._slices, self.blobs):
            shared = any(
                o is not blob and o.diff is not None and _shares_memory(o.diff, blob.diff)
                for o in others
            )
            if shared or type(blob.diff) is not type(view):
                continue
            view[...] = blob.diff
            blob.set_diff(view)
            count += 1
        return count

    def gather_diff(self):
        for view, blob in zip(self._slices, self.blobs):
            if blob.diff is not view:
                view[...] = blob.diff

    def scatter_diff(self, scale=None):
        if scale is not None and scale != 1:
            self.buffer[: self.count] *= np.float32(scale)
        for view, blob in zip(self._slices, self.blobs):
            if blob.diff is not view:
                blob.diff[...] = view

    def gather_data(self):
        for view, blob in zip(self._slices, self.blobs):
            view[...] = blob.data

    def scatter_data(self):
        for view, blob in zip(self._slices, self.blobs):
            blob.data[...] = view


def _shares_memory(a, b):
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.shares_memory(a, b)
    return a.data.ptr == b.data.ptr  # device arrays: same allocation start


def flat_arrays(arrays, xp=np):
    """(buffer, views): one float32 buffer and a view shaped like each array (solver history)."""
    sizes = [int(a.size) for a in arrays]
    buffer = xp.zeros(sum(sizes), dtype=np.float32)
    views, pos = [], 0
    for a, n in zip(arrays, sizes):
        views.append(buffer[pos : pos + n].reshape(a.shape))
        pos += n
    return buffer, views
