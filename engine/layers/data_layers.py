"""Data layers: Data (Datum records, prefetched in a thread), MemoryData, ImageData, HDF5Data
and HDF5Output, with Caffe's transform_param (engine/data/transformer.py).

Where Data reads from: by default the LMDB at data_param.source. Another source plugs in with
`set_source_factory(factory)`: `factory(layer_param, phase)` returns an
engine.data.sources.RecordSource (an endless stream of (key, serialized Datum) pairs that
wraps around, e.g. LMDBSource(path, start_key, count) for a key-range shard or an
IterableSource over a memory-mapped Arrow file), or None to fall back to the LMDB.
Random crops, mirrors, skips and shuffles use a Generator drawn from engine.rng at set-up.
"""

import numpy as np

from engine import rng as engine_rng
from engine.data import batches, images
from engine.data.datum import decode_mode
from engine.data.hdf5 import HDF5Appender, HDF5DataError, HDF5Rows, read_list_file
from engine.data.lmdb_io import LMDBSource, is_lmdb
from engine.data.prefetch import Prefetcher, PrefetchError
from engine.data.sources import DataSourceError, ListSource
from engine.data.transformer import DataTransformer, TransformError
from engine.layer import Layer, register
from engine.proto import caffe_pb2

_factory = {"fn": None}

_SETUP_ERRORS = (
    DataSourceError,
    TransformError,
    HDF5DataError,
    batches.BadRecordError,
    images.ImageDecodeError,
    ValueError,
)


def set_source_factory(factory):
    """Install `factory(layer_param, phase) -> RecordSource | None` for Data layers.

    Returns the previous factory (pass None to go back to plain LMDB sources).
    """
    previous, _factory["fn"] = _factory["fn"], factory
    return previous


def _layer_seed():
    """A seed for one layer, drawn from engine.rng (repeatable under a seed)."""
    return int(engine_rng.rng().integers(0, 2**63 - 1))


def _layer_rng():
    """A Generator for one layer, drawn from engine.rng (repeatable under a seed)."""
    return np.random.default_rng(_layer_seed())


def _transform_param(param, legacy):
    """transform_param with the deprecated data/image_data_param fields folded in."""
    tp = caffe_pb2.TransformationParameter()
    tp.CopyFrom(param.transform_param)
    if legacy is not None:
        for field in ("scale", "mean_file", "crop_size", "mirror"):
            if legacy.HasField(field) and not tp.HasField(field):
                setattr(tp, field, getattr(legacy, field))
    return tp


def _copy_into(blob, array):
    """Copy a host array into a blob's data (NumPy or CuPy)."""
    blob.reshape(array.shape)
    data = blob.data
    if isinstance(data, np.ndarray):
        data[...] = array
    else:  # a device array
        data.set(np.ascontiguousarray(array))


class _BatchLayer(Layer):
    """Shared forward of the prefetching layers: tops take the shape of each batch."""

    exact_num_bottom = 0
    min_num_top = 1
    max_num_top = 2
    _prefetcher = None
    _finalizer = None

    def _start(self, batcher, depth, source):
        self._batcher = batcher
        if depth > 0:
            self._prefetcher = Prefetcher(batcher, depth, name=f"layer {self.name!r}")
            self._finalizer = self._prefetcher.attach(self, source.close)
        else:
            self._source = source

    def reshape(self, bottom, top):
        pass  # Caffe: data layers shape their tops in forward, from each batch

    def forward(self, bottom, top):
        if self._prefetcher is None:
            try:
                batch = self._batcher(None)
            except (DataSourceError, batches.BadRecordError, TransformError) as e:
                raise self.error(str(e)) from None
        else:
            try:
                batch = self._prefetcher.get()
            except PrefetchError as e:
                raise self.error(str(e.__cause__ or e)) from e.__cause__
        self._fill_tops(batch, top)
        if self._prefetcher is not None:
            self._prefetcher.recycle(batch)

    def _fill_tops(self, batch, top):
        _copy_into(top[0], batch.data)
        if len(top) > 1:
            _copy_into(top[1], batch.label)

    def backward(self, top, propagate_down, bottom):
        pass

    @property
    def skipped(self):
        """Bad records skipped so far (only with skipping switched on)."""
        return self._batcher.skipped

    def close(self):
        """Stop the prefetch thread and close the source."""
        if self._finalizer is not None:
            self._finalizer()
        elif getattr(self, "_source", None) is not None:
            self._source.close()
            self._source = None


@register("Data")
class Data(_BatchLayer):
    """Reads Datum records (LMDB, or a plugged-in source), transforms them, prefetches.

    top[0]: batch_size x C x H' x W' (shape of the first record, cropped); top[1] (optional):
    batch_size labels. Records come in key order and wrap around; each output is
    (x - mean) * scale after crop / mirror (transform_param).
    """

    def layer_setup(self, bottom, top):
        dp = self.param.data_param
        if dp.batch_size <= 0:
            raise self.error("data_param.batch_size must be positive")
        try:
            source = self._open_source(dp)
        except DataSourceError as e:
            raise self.error(str(e)) from None
        try:
            seed = _layer_seed()
            rng = np.random.default_rng(seed)
            tp = _transform_param(self.param, dp)
            transformer = DataTransformer(tp, self.phase, rng, f"layer {self.name!r}")
            mode = decode_mode(tp.force_color or dp.force_encoded_color, tp.force_gray)
            if dp.rand_skip:
                source.skip(int(rng.integers(0, dp.rand_skip)))
            batcher = batches.RecordBatcher(
                source,
                transformer,
                dp.batch_size,
                batches.datum_decoder(source.name, mode),
                name=f"layer {self.name!r}",
                raw_fast_path=True,
                seed=seed,
            )
            shape = batcher.first_shape()
        except _SETUP_ERRORS as e:
            source.close()
            raise self.error(str(e)) from None
        top[0].reshape((dp.batch_size,) + shape)
        if len(top) > 1:
            top[1].reshape((dp.batch_size,))
        self._start(batcher, int(dp.prefetch), source)

    def _open_source(self, dp):
        factory = _factory["fn"]
        if factory is not None:
            source = factory(self.param, self.phase)
            if source is not None:
                return source
        if not dp.source:
            raise DataSourceError("data_param.source is not set")
        if dp.backend == caffe_pb2.DataParameter.LEVELDB:
            if dp.HasField("backend") or not is_lmdb(dp.source):
                raise DataSourceError(
                    f"{dp.source}: the LEVELDB backend is not supported (Caffe's default when "
                    "backend is unset); convert the data to LMDB and set backend: LMDB"
                )
        return LMDBSource(dp.source)


@register("ImageData")
class ImageData(_BatchLayer):
    """Reads images listed in a '<path> <label>' file (OpenCV-style decode, BGR, resize).

    top[0]: batch_size x C x H' x W' (C = 3 if is_color else 1; H, W = new_height/new_width or
    the first image's size, then cropped); top[1]: batch_size labels. Wraps around the list
    (reshuffled every pass with shuffle: true).
    """

    def layer_setup(self, bottom, top):
        ip = self.param.image_data_param
        if ip.batch_size <= 0:
            raise self.error("image_data_param.batch_size must be positive")
        nh, nw = int(ip.new_height), int(ip.new_width)
        if (nh > 0) != (nw > 0):
            raise self.error("new_height and new_width must be set together")
        seed = _layer_seed()
        rng = np.random.default_rng(seed)
        try:
            lines = images.read_image_list(ip.source)
            source = _ImageListSource(lines, ip.source, rng if ip.shuffle else None)
            transformer = DataTransformer(
                _transform_param(self.param, ip), self.phase, rng, f"layer {self.name!r}"
            )
            if ip.rand_skip:
                skip = int(rng.integers(0, ip.rand_skip))
                if skip >= len(lines):
                    raise DataSourceError(f"{ip.source}: cannot skip {skip} of {len(lines)} lines")
                source.skip(skip)
            batcher = batches.RecordBatcher(
                source,
                transformer,
                ip.batch_size,
                _image_decoder(ip.root_folder, nh, nw, ip.is_color),
                name=f"layer {self.name!r}",
                seed=seed,
            )
            shape = batcher.first_shape()
        except _SETUP_ERRORS as e:
            raise self.error(str(e)) from None
        top[0].reshape((ip.batch_size,) + shape)
        if len(top) > 1:
            top[1].reshape((ip.batch_size,))
        self._start(batcher, int(self.param.data_param.prefetch), source)


class _ImageListSource(ListSource):
    """The list file's lines as records: key 'file (line N)', value (file, label)."""

    def __init__(self, lines, name, rng=None):
        super().__init__([(f"{f} (line {i})", (f, lab)) for f, lab, i in lines], name)
        self.rng = rng

    def one_pass(self):
        if self.rng is None:
            return iter(self.records)
        order = self.rng.permutation(len(self.records))
        return (self.records[i] for i in order)


def _image_decoder(root, height, width, is_color):
    def decode(key, value):
        name, label = value
        img = images.read_image_resized(root + name, height, width, is_color)
        return images.hwc_to_chw(img), label

    return decode


@register("MemoryData")
class MemoryData(Layer):
    """Serves arrays set from Python: reset(data, labels) or set_input_arrays(net, ...).

    top[0]: batch_size x channels x height x width, top[1]: batch_size labels; each forward
    returns the next batch_size rows, wrapping around (the row count must be a multiple of
    batch_size). Arrays given to reset() are used as they are (no transform).
    """

    exact_num_bottom = 0
    exact_num_top = 2

    def layer_setup(self, bottom, top):
        mp = self.param.memory_data_param
        self.batch_size = int(mp.batch_size)
        self.shape = (int(mp.channels), int(mp.height), int(mp.width))
        if self.batch_size <= 0 or min(self.shape) <= 0:
            raise self.error(
                "memory_data_param batch_size, channels, height and width must be positive"
            )
        self._rng = _layer_rng()
        self.transformer = DataTransformer(
            self.param.transform_param, self.phase, self._rng, f"layer {self.name!r}"
        )
        self._data = self._labels = None
        self._pos = 0
        top[0].reshape((self.batch_size,) + self.shape)
        top[1].reshape((self.batch_size,))

    def reset(self, data, labels):
        """Serve `data` (N x C x H x W) and `labels` (N or N x 1 x 1 x 1) from the next forward."""
        data = np.ascontiguousarray(data, dtype=np.float32)
        labels = np.ascontiguousarray(labels, dtype=np.float32)
        if data.ndim != 4 or data.shape[1:] != self.shape:
            raise self.error(f"data must be N x {'x'.join(map(str, self.shape))}, got {data.shape}")
        if labels.size != data.shape[0] or labels.shape[0] != data.shape[0]:
            raise self.error(f"{data.shape[0]} data rows but labels of shape {labels.shape}")
        if data.shape[0] == 0 or data.shape[0] % self.batch_size:
            raise self.error(
                f"the number of rows ({data.shape[0]}) must be a positive multiple of the "
                f"batch size ({self.batch_size})"
            )
        self._data, self._labels = data, labels.reshape(-1)
        self._pos = 0

    def add_datum_vector(self, datums):
        """Decode and transform Datums (Caffe's AddDatumVector), then serve them."""
        from engine.data.datum import datum_to_array

        arrays = [datum_to_array(d, f"layer {self.name!r} datum {i}") for i, d in enumerate(datums)]
        out = self.transformer.transform_list(arrays)
        self.reset(out, np.array([d.label for d in datums], dtype=np.float32))

    def set_batch_size(self, n):
        if self._data is not None and self._data.shape[0] % n:
            raise self.error(f"batch size {n} does not divide the {self._data.shape[0]} rows")
        self.batch_size = int(n)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        if self._data is None:
            hint = ""
            if self.param.source_class or self.param.memory_data_param.source:
                # CaffeOnSpark's dialect: Spark feeds this layer from its source.
                hint = (
                    f"; it names a CaffeOnSpark source ({self.param.memory_data_param.source}):"
                    " run it with jobs/caffeonspark.py, or make it a Data layer"
                )
            raise self.error(f"no data: call reset(data, labels) or set_input_arrays first{hint}")
        b = self.batch_size
        _copy_into(top[0], self._data[self._pos : self._pos + b])
        _copy_into(top[1], self._labels[self._pos : self._pos + b])
        self._pos = (self._pos + b) % self._data.shape[0]

    def backward(self, top, propagate_down, bottom):
        pass

    def close(self):
        self._data = self._labels = None


def set_input_arrays(net, data, labels):
    """pycaffe's Net.set_input_arrays: feed the net's first layer, which must be MemoryData."""
    if not net.layers or not isinstance(net.layers[0], MemoryData):
        raise ValueError("set_input_arrays needs a net whose first layer is MemoryData")
    net.layers[0].reset(data, labels)


@register("HDF5Data")
class HDF5Data(Layer):
    """Rows of the HDF5 files listed in hdf5_data_param.source, one dataset per top name.

    top[i]: batch_size x (dataset shape without its first axis), as float32. At a file's end
    the rows continue in the next file; after the last file they wrap to the first.
    """

    exact_num_bottom = 0
    min_num_top = 1

    def layer_setup(self, bottom, top):
        hp = self.param.hdf5_data_param
        if hp.batch_size <= 0:
            raise self.error("hdf5_data_param.batch_size must be positive")
        try:
            files = read_list_file(hp.source)
            self.rows = HDF5Rows(
                files, list(self.param.top), hp.shuffle, _layer_rng() if hp.shuffle else None
            )
        except HDF5DataError as e:
            raise self.error(str(e)) from None
        self.batch_size = int(hp.batch_size)
        for name, t in zip(self.param.top, top):
            t.reshape((self.batch_size,) + self.rows.shapes[name])

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        outs = {}
        for name, t in zip(self.param.top, top):
            t.reshape((self.batch_size,) + self.rows.shapes[name])
            outs[name] = t.data if isinstance(t.data, np.ndarray) else np.empty(t.shape, np.float32)
        try:
            self.rows.take(self.batch_size, outs)
        except HDF5DataError as e:
            raise self.error(str(e)) from None
        for name, t in zip(self.param.top, top):
            if outs[name] is not t.data:
                _copy_into(t, outs[name])

    def backward(self, top, propagate_down, bottom):
        pass

    def close(self):
        pass  # files are read whole and closed at once


@register("HDF5Output")
class HDF5Output(Layer):
    """Appends each batch of bottom[0] (as dataset "data") and bottom[1] ("label") to
    hdf5_output_param.file_name. No tops, no gradient."""

    exact_num_bottom = 2
    exact_num_top = 0

    def layer_setup(self, bottom, top):
        name = self.param.hdf5_output_param.file_name
        if not name:
            raise self.error("hdf5_output_param.file_name is not set")
        try:
            self.writer = HDF5Appender(name)
        except HDF5DataError as e:
            raise self.error(str(e)) from None

    def reshape(self, bottom, top):
        if bottom[0].num != bottom[1].num:
            raise self.error(
                f"data and label differ in num: {bottom[0].shape} vs {bottom[1].shape}"
            )

    def forward(self, bottom, top):
        from engine.backend import to_numpy

        try:
            self.writer.append(
                {"data": to_numpy(bottom[0].data), "label": to_numpy(bottom[1].data)}
            )
        except HDF5DataError as e:
            raise self.error(str(e)) from None

    def backward(self, top, propagate_down, bottom):
        pass

    def close(self):
        self.writer.close()
