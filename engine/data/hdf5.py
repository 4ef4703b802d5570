"""HDF5 data for the HDF5Data and HDF5Output layers (h5py): list files of .h5 paths, row
batches that move to the next file at a file's end and wrap, and an appending writer.

Datasets are read whole (like Caffe) and converted to float32; dataset names are the layer's
top names.
"""

import os

import numpy as np


def _h5py():
    import h5py  # imported on first use: every net loads this module, few use HDF5

    return h5py


class HDF5DataError(ValueError):
    """An HDF5 list or file that cannot be used (names the file and dataset)."""


def read_list_file(path):
    """Non-empty lines of a list file, stripped (Caffe's HDF5Data source)."""
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f]
    except OSError as e:
        raise HDF5DataError(f"{path}: cannot read HDF5 list file: {e.strerror}") from None
    names = [n for n in names if n]
    if not names:
        raise HDF5DataError(f"{path}: HDF5 list file names no files")
    return names


def load_file(path, names):
    """{name: float32 array} for the datasets `names` of one .h5 file, equal row counts."""
    h5py = _h5py()
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise HDF5DataError(f"{path}: cannot open HDF5 file: {e}") from None
    out = {}
    with f:
        for name in names:
            if name not in f:
                raise HDF5DataError(
                    f"{path}: no dataset {name!r} (datasets are named after the tops; "
                    f"file has {sorted(f.keys())})"
                )
            ds = f[name]
            if not isinstance(ds, h5py.Dataset) or ds.ndim < 1:
                raise HDF5DataError(f"{path}: {name!r} must be a dataset with at least 1 axis")
            try:
                out[name] = np.ascontiguousarray(ds[()], dtype=np.float32)
            except (TypeError, ValueError) as e:
                raise HDF5DataError(f"{path}: dataset {name!r} is not numeric: {e}") from None
    rows = {n: a.shape[0] for n, a in out.items()}
    if len(set(rows.values())) > 1:
        raise HDF5DataError(f"{path}: datasets have different row counts {rows}")
    if next(iter(rows.values())) == 0:
        raise HDF5DataError(f"{path}: datasets have no rows")
    return out


class HDF5Rows:
    """Rows of a list of HDF5 files in order (optionally shuffled), cycling forever.

    As Caffe's HDF5DataLayer: at a file's end move to the next file; after the last file
    wrap to the first (reshuffling the file order when shuffling); with shuffle, the rows of
    each file are permuted every time it is (re)entered.
    """

    def __init__(self, files, names, shuffle=False, rng=None, base=""):
        if shuffle and rng is None:
            raise ValueError("HDF5 shuffle needs a random generator")
        self.files = [os.path.join(base, f) if base else f for f in files]
        self.names = list(names)
        self.shuffle = shuffle
        self.rng = rng
        self.order = np.arange(len(self.files))
        if shuffle:
            self.rng.shuffle(self.order)
        self.file_pos = 0
        self._load(self.order[0])

    def _load(self, index):
        self.current = load_file(self.files[index], self.names)
        shapes = {n: a.shape[1:] for n, a in self.current.items()}
        if hasattr(self, "shapes") and shapes != self.shapes:
            raise HDF5DataError(
                f"{self.files[index]}: dataset shapes {shapes} differ from the first file's "
                f"{self.shapes}"
            )
        self.shapes = shapes
        self.rows = next(iter(self.current.values())).shape[0]
        self.perm = np.arange(self.rows)
        if self.shuffle:
            self.rng.shuffle(self.perm)
        self.row = 0

    def _advance_file(self):
        if len(self.files) > 1:
            self.file_pos += 1
            if self.file_pos == len(self.files):
                self.file_pos = 0
                if self.shuffle:
                    self.rng.shuffle(self.order)
            self._load(self.order[self.file_pos])
        else:
            self.row = 0
            if self.shuffle:
                self.rng.shuffle(self.perm)

    def take(self, n, outs):
        """Fill outs[name][:n] with the next n rows (copied in runs, not row by row)."""
        done = 0
        while done < n:
            k = min(n - done, self.rows - self.row)
            idx = self.perm[self.row : self.row + k]
            for name in self.names:
                src = self.current[name]
                if self.shuffle:
                    outs[name][done : done + k] = src[idx]
                else:
                    outs[name][done : done + k] = src[self.row : self.row + k]
            done += k
            self.row += k
            if self.row == self.rows:
                self._advance_file()


class HDF5Appender:
    """Appends batches to growing datasets of one .h5 file (flushed after every batch)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            self.file = _h5py().File(self.path, "w")
        except OSError as e:
            raise HDF5DataError(f"{self.path}: cannot create HDF5 file: {e}") from None

    def append(self, arrays):
        for name, arr in arrays.items():
            arr = np.asarray(arr, dtype=np.float32)
            if name not in self.file:
                self.file.create_dataset(
                    name, data=arr, maxshape=(None,) + arr.shape[1:], chunks=True
                )
                continue
            ds = self.file[name]
            if ds.shape[1:] != arr.shape[1:]:
                raise HDF5DataError(
                    f"{self.path}: dataset {name!r} rows are {ds.shape[1:]}, "
                    f"new batch has {arr.shape[1:]}"
                )
            n = ds.shape[0]
            ds.resize(n + arr.shape[0], axis=0)
            ds[n:] = arr
        self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
