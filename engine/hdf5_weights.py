"""Net weights in HDF5 (pycaffe's Net.save_hdf5 / load_hdf5, Caffe's ToHDF5 and
CopyTrainedLayersFromHDF5): one dataset `data/<layer>/<i>` per parameter blob."""

import io as _pyio
import os

import numpy as np

from engine import backend, io
from engine.layer import LayerError


def _net_param_ids(net):
    """(layer index, param index) -> index into net_params (Caffe's param_id_vecs_)."""
    return {key: i for i, key in enumerate(net.param_layer_indices)}


def save(net, path, write_diff=False):
    """pycaffe's Net.save_hdf5 (Caffe's ToHDF5): group `data/<layer>/<i>` per parameter
    (shared ones only under their owner), plus `diff/...` for all with write_diff;
    written atomically."""
    import h5py

    path = os.fspath(path)
    ids = _net_param_ids(net)
    buf = _pyio.BytesIO()
    with h5py.File(buf, "w") as f:
        groups = [f.create_group("data")] + ([f.create_group("diff")] if write_diff else [])
        for lid, layer in enumerate(net.layers):
            try:
                layer_groups = [g.create_group(layer.name) for g in groups]
            except ValueError as e:
                raise io.CaffeFileError(
                    f"{path}: cannot save layer {layer.name!r} to HDF5: {e}"
                ) from None
            for j, blob in enumerate(layer.blobs):
                if net.param_owners[ids[(lid, j)]] == -1:
                    data = backend.to_numpy(blob.data).astype(np.float32)
                    layer_groups[0].create_dataset(str(j), data=data)
                if write_diff:
                    diff = backend.to_numpy(blob.diff).astype(np.float32)
                    layer_groups[1].create_dataset(str(j), data=diff)
    io.atomic_write_bytes(path, buf.getvalue())


def load(net, path):
    """pycaffe's Net.load_hdf5 (Caffe's CopyTrainedLayersFromHDF5): copy `data/<layer>/<i>`
    into same-named layers; a missing dataset is allowed only for a shared parameter."""
    import h5py

    path = os.fspath(path)
    ids = _net_param_ids(net)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise io.CaffeFileError(f"{path}: cannot open as HDF5: {e}") from None
    with f:
        data = f.get("data")
        if not isinstance(data, h5py.Group):
            raise io.CaffeFileError(f"{path}: error reading weights: no 'data' group")
        for name, lid in net._layer_index.items():
            group = data.get(name)
            if not isinstance(group, h5py.Group):
                continue
            layer = net.layers[lid]
            stored = [k for k, v in group.items() if isinstance(v, h5py.Dataset)]
            if len(stored) > len(layer.blobs):
                raise LayerError(
                    f"{path} layer {name!r}: incompatible number of blobs: file has "
                    f"{len(stored)}, layer has {len(layer.blobs)}"
                )
            for j, blob in enumerate(layer.blobs):
                ds = group.get(str(j))
                if not isinstance(ds, h5py.Dataset):
                    if net.param_owners[ids[(lid, j)]] != -1:
                        continue  # shared in this net: its owner's dataset fills it
                    raise LayerError(
                        f"{path} layer {name!r}: incompatible number of blobs: "
                        f"no dataset {j} for parameter {j}"
                    )
                if tuple(ds.shape) != blob.shape:
                    raise LayerError(
                        f"{path} layer {name!r}: cannot load blob {j} from hdf5; shape "
                        f"mismatch. Source shape is {tuple(ds.shape)}, target shape is "
                        f"{blob.shape}"
                    )
                arr = np.asarray(ds[()], dtype=np.float32)
                blob.data[...] = backend.xp().asarray(arr)


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def is_hdf5(path):
    """Whether `path` is an HDF5 file, as Caffe's H5Fis_hdf5 checks: the format signature at
    offset 0 or, after a user block, at 512, 1024, 2048, ... bytes."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset = 0
            while offset + 8 <= size:
                f.seek(offset)
                if f.read(8) == _HDF5_SIGNATURE:
                    return True
                offset = 512 if offset == 0 else offset * 2
    except OSError:
        return False
    return False
