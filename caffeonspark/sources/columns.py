"""CaffeOnSpark's DataFrameSource: a table whose columns feed the tops of a CoSData layer, one
column per top, named like it (source_class "com.yahoo.ml.caffe.DataFrameSource").

Spark reads the table (cos_data_param.source, in dataframe_format); the driver checks that
every top has a column of a type that fits it before any job starts. Each task spills its
rows (the tops' values, keyed by the `id` column where there is one) to a local Arrow file;
the engine's CoSData layer decodes and transforms them (engine/layers/cos_data.py). Shards
and partitions are those of the DataFrame source: row i -> rank i mod N.
"""

import pickle

from caffeonspark import dialect
from caffeonspark.sources import SourceError, describe_layer
from caffeonspark.sources.dataframe import (
    ArrowLocalizer,
    ArrowRecordSource,
    DataFrameSource,
    load_table,
)
from engine.data.table import ID_COLUMN
from engine.proto import caffe_pb2

_C = caffe_pb2.CoSDataParameter


def read(conf, layer, phase):
    """The ColumnsSource over the table a CoSData layer names."""
    name = describe_layer(layer, phase)
    if dialect.source_class(layer) not in (None, dialect.DATA_FRAME_SOURCE):
        raise SourceError(
            f"{name}: a CoSData layer reads through {dialect.PACKAGE}{dialect.DATA_FRAME_SOURCE},"
            f" not {layer.source_class!r}"
        )
    cp = layer.cos_data_param
    if not cp.source:
        raise SourceError(f"{name}: cos_data_param.source is not set")
    df = load_table(conf, name, cp.source, cp.dataframe_format)
    return ColumnsSource(conf, layer, phase, df)


class ColumnsSource(DataFrameSource):
    """A DataFrame whose columns feed a CoSData layer's tops (see the module docstring)."""

    kind = "columns"

    def _check_columns(self):
        fields = {f.name: f.dataType for f in self.df.schema.fields}
        tops = list(self.layer.cos_data_param.top)
        missing = [t.name for t in tops if t.name not in fields]
        if missing:
            raise SourceError(
                f"{self.name}: the DataFrame lacks column(s) {', '.join(missing)} for the "
                f"top(s) of the same name (it has {', '.join(fields) or 'none'})"
            )
        for t in tops:
            problem = type_problem(t.type, fields[t.name])
            if problem:
                raise SourceError(
                    f"{self.name}: column {t.name!r} is {fields[t.name].simpleString()}, but "
                    f"top {t.name!r} is {_C.DataType.Name(t.type)}, which {problem}"
                )
        self.tops = [t.name for t in tops]
        self.key_column = ID_COLUMN if ID_COLUMN in fields and ID_COLUMN not in self.tops else None
        self.columns = self.tops + ([self.key_column] if self.key_column else [])

    def _converter(self):
        return ColumnsRow(self.tops, self.key_column)

    def _localizer(self):
        extra = {"fields": True, "resize": bool(self.conf.resize)}
        return ArrowLocalizer(self._converter(), self.name, spec_extra=extra)


def type_problem(kind, dtype):
    """Why a Spark column type cannot feed a top of CoSData type `kind` (None when it can)."""
    from pyspark.sql import types as T

    numeric = (T.ByteType, T.ShortType, T.IntegerType, T.LongType, T.FloatType, T.DoubleType)
    integral = numeric[:4]
    if kind == _C.STRING:
        return None if isinstance(dtype, T.StringType) else "takes a string column"
    if kind == _C.INT:
        return None if isinstance(dtype, integral) else "takes an integer column"
    if kind == _C.FLOAT:
        return None if isinstance(dtype, numeric) else "takes a number column"
    if kind in (_C.INT_ARRAY, _C.FLOAT_ARRAY):
        want = integral if kind == _C.INT_ARRAY else numeric
        if isinstance(dtype, T.ArrayType) and isinstance(dtype.elementType, want):
            return None
        return "takes an array of " + ("integers" if kind == _C.INT_ARRAY else "numbers")
    if kind in (_C.RAW_IMAGE, _C.ENCODED_IMAGE):
        return None if _is_bytes(dtype) else "takes a binary column"
    if kind == _C.ENCODED_IMAGE_WITH_DIM:
        if isinstance(dtype, T.StructType):
            sub = {f.name: f.dataType for f in dtype.fields}
            if (
                _is_bytes(sub.get("image"))
                and isinstance(sub.get("height"), integral)
                and isinstance(sub.get("width"), integral)
            ):
                return None
        return "takes a struct of image (binary), height and width (integers)"
    return "is not a type this version knows"


def _is_bytes(dtype):
    from pyspark.sql import types as T

    return isinstance(dtype, T.BinaryType) or (
        isinstance(dtype, T.ArrayType) and isinstance(dtype.elementType, T.ByteType)
    )


class ColumnsRow:
    """A row (dict of columns) -> (key, the tops' values pickled in top order): Spark Rows in
    struct columns become dicts, binary values bytes."""

    def __init__(self, tops, key_column):
        self.tops = tops
        self.key_column = key_column

    def __call__(self, row, index):
        key = row.get(self.key_column) if self.key_column else None
        key = str(index) if key is None else str(key)
        values = tuple(_plain(row[c]) for c in self.tops)
        return key.encode("utf-8"), pickle.dumps(values, protocol=pickle.HIGHEST_PROTOCOL)


def _plain(value):
    if hasattr(value, "asDict"):
        return {k: _plain(v) for k, v in value.asDict().items()}
    if isinstance(value, bytearray):
        return bytes(value)
    return value


class ColumnsRecordSource(ArrowRecordSource):
    """The spilled rows of a ColumnsSource: (key, tuple of the tops' values). `resize_images`
    tells the CoSData layer to scale images to its tops' size (-resize)."""

    def __init__(self, path, name, resize=False):
        super().__init__(path, name)
        self.resize_images = bool(resize)

    def one_pass(self):
        for key, value in super().one_pass():
            yield key, pickle.loads(value)
