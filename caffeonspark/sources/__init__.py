"""Data sources: where a net's data layer gets its records on the cluster (an LMDB read by key
range, a DataFrame / Parquet table, or a folder of images with a label list).

A DataSource lives on the driver. It hands Spark an RDD (one partition per rank for training,
plain partitions for test / features) and a small picklable `localizer` that runs in the
task: it turns the partition into a *spec* (a JSON-able dict naming a key range of an LMDB or
a local Arrow file). `open_spec(spec)` opens the spec as an engine RecordSource, which the
engine's Data layer reads through `engine.layers.data_layers.set_source_factory`.
"""

import contextlib
import shutil
import tempfile

from caffeonspark import dialect
from caffeonspark.config import DATA_LAYER_TYPES
from engine.proto import caffe_pb2


class SourceError(ValueError):
    """A data source that cannot be used (names the layer, the path or the record)."""


class DataSource:
    """Base of the sources: the data layer it feeds (`layer`, a LayerParameter), its phase and
    the job's Config. Subclasses implement `shards`, `partitions` and `count`."""

    kind = None

    def __new__(cls, *args, **kwargs):
        if cls is DataSource and len(args) == 1 and not kwargs:
            return _SourceChooser()  # CaffeOnSpark's DataSource(sc).getSource(conf, isTraining)
        return super().__new__(cls)

    def __init__(self, conf, layer, phase):
        self.conf = conf
        self.layer = layer
        self.phase = phase
        self.is_train = phase == caffe_pb2.TRAIN
        self._persisted = {}

    # --- choosing a source -------------------------------------------------------------------
    @staticmethod
    def get(conf, is_train):
        """The source the net's TRAIN (is_train) or TEST data layer reads, chosen from its
        type and source path: ImageData -> image list; CoSData -> its table's columns; a
        Data layer's LMDB -> LMDB; a Parquet / JSON / ORC path -> DataFrame; in
        CaffeOnSpark's prototxts, its source_class (caffeonspark.dialect), sequence files
        included."""
        from caffeonspark.sources import columns, dataframe, images, lmdb, sequence

        phase = caffe_pb2.TRAIN if is_train else caffe_pb2.TEST
        layer = conf.data_layer(phase)
        if layer.type == "ImageData":
            return images.ImageListSource(conf, layer, phase)
        if layer.type == "CoSData":
            return columns.read(conf, layer, phase)
        path = layer.data_param.source
        if not path:
            raise SourceError(f"{describe_layer(layer, phase)}: data_param.source is not set")
        kind = dialect.source_class(layer)  # CaffeOnSpark's prototxts name it
        if kind == dialect.SEQ_IMAGE:
            return sequence.read(conf, layer, phase)
        if kind == dialect.IMAGE_DATA_FRAME or (kind is None and dataframe.is_table_path(path)):
            return dataframe.DataFrameSource.read(conf, layer, phase)
        return lmdb.LMDBDataSource(conf, layer, phase)

    getSource = get

    @staticmethod
    def from_dataframe(conf, df, is_train):
        """A source over a DataFrame with columns data (binary) and label (+ optional
        SampleID, channels, height, width, encoded), feeding the net's data layer."""
        from caffeonspark.sources import dataframe

        phase = caffe_pb2.TRAIN if is_train else caffe_pb2.TEST
        return dataframe.DataFrameSource(conf, conf.data_layer(phase), phase, df)

    # --- what the launcher uses ---------------------------------------------------------------
    @property
    def name(self):
        return describe_layer(self.layer, self.phase)

    @property
    def batch_size(self):
        return layer_batch_size(self.layer)

    def count(self, spark):
        """Records in the whole source."""
        raise NotImplementedError

    def shards(self, spark, num):
        """(RDD with `num` partitions, localizer) for training: shard sizes differ by at most
        one record and together hold every record once."""
        raise NotImplementedError

    def partitions(self, spark):
        """(RDD, localizer) for test / features: every record once, in plain partitions."""
        raise NotImplementedError

    def _persist(self, key, rdd):
        """With -persistent, keep the prepared RDD cached and reuse it for the same `key`."""
        if not self.conf.persistent:
            return rdd
        if key not in self._persisted:
            from pyspark import StorageLevel

            self._persisted[key] = rdd.persist(StorageLevel.MEMORY_AND_DISK)
        return self._persisted[key]

    def __repr__(self):
        return f"{type(self).__name__}({self.name})"


class _SourceChooser:
    """What CaffeOnSpark's `DataSource(sc)` gave: an object whose getSource(conf, isTraining)
    picks the source, as DataSource.get does."""

    @staticmethod
    def getSource(conf, isTraining):  # noqa: N803 - CaffeOnSpark's name
        return DataSource.get(conf, isTraining)


def key_text(key):
    """A record's key as the SampleID of a table: its UTF-8 text, else its bytes in hex."""
    if isinstance(key, (bytes, bytearray, memoryview)):
        key = bytes(key)
        try:
            return key.decode("utf-8")
        except UnicodeDecodeError:
            return key.hex()
    return str(key)


def layer_batch_size(layer):
    """The batch size of a fed data layer (a LayerParameter)."""
    return int(getattr(layer, DATA_LAYER_TYPES.get(layer.type, "data_param")).batch_size)


def set_layer_batch_size(layer, n):
    getattr(layer, DATA_LAYER_TYPES.get(layer.type, "data_param")).batch_size = int(n)


def describe_layer(layer, phase):
    return f"layer {layer.name!r} ({layer.type}, {caffe_pb2.Phase.Name(phase)})"


def open_spec(spec):
    """The engine RecordSource for a spec made by a localizer (in the task or the worker)."""
    kind = spec.get("kind")
    if kind == "lmdb":
        from caffeonspark.sources.lmdb import open_lmdb_spec

        return open_lmdb_spec(spec)
    if kind == "arrow" and spec.get("fields"):
        from caffeonspark.sources.columns import ColumnsRecordSource

        return ColumnsRecordSource(spec["path"], spec["name"], spec.get("resize", False))
    if kind == "arrow":
        from caffeonspark.sources.dataframe import ArrowRecordSource

        return ArrowRecordSource(spec["path"], spec["name"])
    raise SourceError(f"unknown source spec kind {kind!r}")


@contextlib.contextmanager
def partition_source(localizer, items, index, num, what):
    """The RecordSource of partition `index` of `num` in a task: localized into a temporary
    folder (named for `what` and the partition), closed and removed after."""
    workdir = tempfile.mkdtemp(prefix=f"caffeonspark-{what}{index}-")
    try:
        source = open_spec(localizer(items, workdir, index, num))
        try:
            yield source
        finally:
            source.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def as_data_layer(layer):
    """The LayerParameter the worker's net uses for a fed layer: ImageData becomes a Data
    layer over already decoded (and resized) records, with its transform kept; Data and
    CoSData layers are kept as they are. Prefetch is left as configured."""
    out = caffe_pb2.LayerParameter()
    out.CopyFrom(layer)
    if layer.type != "ImageData":
        return out
    ip = layer.image_data_param
    out.type = "Data"
    out.ClearField("image_data_param")
    tp = out.transform_param
    for field in ("scale", "mean_file", "crop_size", "mirror"):
        if ip.HasField(field) and not tp.HasField(field):
            setattr(tp, field, getattr(ip, field))
    out.data_param.batch_size = ip.batch_size
    return out


def rewrite_net(net_param, layer_name, phase, batch_size=None, prefetch=None):
    """A copy of `net_param` whose layer `layer_name` (in `phase`) is fed by the Spark side:
    ImageData turned into Data, batch size / prefetch overridden when given."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net_param)
    for i in _fed_indices(out, layer_name, phase):
        new = as_data_layer(out.layer[i])
        if batch_size is not None:
            set_layer_batch_size(new, batch_size)
        if prefetch is not None:
            new.data_param.prefetch = int(prefetch)
        out.layer[i].CopyFrom(new)
    return out


def fed_layer(net_param, layer_name, phase):
    """The fed data layer `layer_name` of `net_param` in `phase` (the first one)."""
    return net_param.layer[_fed_indices(net_param, layer_name, phase)[0]]


def _fed_indices(net_param, layer_name, phase):
    found = [
        i
        for i, lp in enumerate(net_param.layer)
        if lp.name == layer_name
        and lp.type in DATA_LAYER_TYPES
        and _layer_in_phase(lp, phase, net_param.state)
    ]
    if not found:
        raise SourceError(f"net {net_param.name!r} has no data layer {layer_name!r}")
    return found


def _layer_in_phase(lp, phase, state):
    from engine.net import state_meets_rule

    st = caffe_pb2.NetState()
    st.CopyFrom(state)
    st.phase = phase
    if lp.include:
        return any(state_meets_rule(st, r) for r in lp.include)
    return not any(state_meets_rule(st, r) for r in lp.exclude)


class SourceFactory:
    """The engine Data layers' source factory: the RecordSource opened for (layer, phase)
    pairs fed by Spark, None (the layer's own LMDB) for any other."""

    def __init__(self):
        self.sources = {}

    def add(self, layer_name, phase, record_source):
        self.sources[(layer_name, phase)] = record_source

    def __call__(self, layer_param, phase):
        return self.sources.get((layer_param.name, phase))

    def install(self):
        from engine.layers.data_layers import set_source_factory

        return set_source_factory(self)


__all__ = [
    "DataSource",
    "SourceError",
    "SourceFactory",
    "as_data_layer",
    "describe_layer",
    "fed_layer",
    "layer_batch_size",
    "open_spec",
    "rewrite_net",
]
