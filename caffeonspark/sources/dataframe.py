"""DataFrame / Parquet source: Spark reads the table, each task turns its partition's rows into
Caffe Datum records and spills them to a local Arrow file that the engine memory-maps.

Columns: `data` (binary: an encoded image, raw uint8 pixels, or a serialized Datum) and
`label` (a number); optional `SampleID` (the record's id in -features output), `channels`,
`height`, `width` (the shape of raw pixels) and `encoded` (bool). Training shards are row
i -> rank i mod N, in row order, so shard sizes differ by at most one.

Raw pixels are in Caffe's Datum order (channels, height, width), as our export writes them,
except in CaffeOnSpark's own tables and sequence files: its LMDB2DataFrame and LMDB2Sequence
stored OpenCV's order (height, width, channels), which its data sources read back.
"""

import math
import os

import numpy as np

from caffeonspark import dialect, storage
from caffeonspark.sources import DataSource, SourceError
from engine.data import images
from engine.data.datum import DatumError, array_to_datum, encoded_datum, parse_datum
from engine.data.sources import DataSourceError, RecordSource

TABLE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".json": "json", ".orc": "orc"}
OPTIONAL_COLUMNS = ("SampleID", "channels", "height", "width", "encoded")
CHW, HWC = "chw", "hwc"  # raw pixel orders: Caffe's Datum, CaffeOnSpark's (OpenCV's Mat)
_ARROW_BATCH = 512


def table_format(path):
    """The table format of a source path: by its suffix, else (a local folder) by the suffix
    of the part files Spark wrote in it; None if neither tells."""
    path = path.rstrip("/")
    for suffix, fmt in TABLE_SUFFIXES.items():
        if path.endswith(suffix):
            return fmt
    uri = storage.absolute(path)
    if storage.is_local(uri) and os.path.isdir(storage.local_path(uri)):
        for name in sorted(os.listdir(storage.local_path(uri))):
            for suffix in (".parquet", ".orc"):
                if name.endswith(suffix):
                    return TABLE_SUFFIXES[suffix]
    return None


def is_table_path(path):
    """Whether a data_param.source names a table (by suffix, or a folder of table parts)."""
    return table_format(path) is not None


def load_table(conf, name, source, fmt=None, select=()):
    """The DataFrame Spark reads from the table at `source` in `fmt` (None: by the path, else
    parquet), with the `select` expressions applied; SourceError names `name` and the path."""
    spark = conf.spark
    if spark is None:
        raise SourceError(f"{name}: reading a table needs a SparkSession (Config(spark, ...))")
    path = storage.absolute(source)
    if storage.is_local(path) and not os.path.exists(storage.local_path(path)):
        raise SourceError(f"{name}: table {storage.shown(path)} not found")
    fmt = fmt or table_format(path) or "parquet"
    try:
        df = spark.read.format(fmt).load(path)
        if len(select):
            df = df.selectExpr(*select)
    except Exception as e:  # noqa: BLE001 - AnalysisException and py4j errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(
            f"{name}: cannot read {fmt} table {storage.shown(path)}: {first}"
        ) from None
    return df


class DataFrameSource(DataSource):
    """A DataFrame fed to the data layer; `read` opens the table at data_param.source."""

    kind = "dataframe"

    def __init__(self, conf, layer, phase, df, pixel_order=CHW):
        super().__init__(conf, layer, phase)
        if pixel_order not in (CHW, HWC):
            raise ValueError(f"pixel_order must be {CHW!r} or {HWC!r}, got {pixel_order!r}")
        self.df = df
        self.pixel_order = pixel_order
        self._check_columns()
        self._resize_to = None

    @classmethod
    def read(cls, conf, layer, phase):
        from caffeonspark.sources import describe_layer

        cos = dialect.source_class(layer) is not None
        mp = layer.memory_data_param
        df = load_table(
            conf,
            describe_layer(layer, phase),
            layer.data_param.source,
            mp.dataframe_format if cos else None,
            mp.dataframe_column_select if cos else (),
        )
        if not cos:
            return cls(conf, layer, phase, df)
        # A CaffeOnSpark table keeps its raw pixels in OpenCV's order; one our export wrote
        # (it has a SampleID column) keeps Caffe's.
        order = CHW if "SampleID" in df.columns else HWC
        return cls(conf, layer, phase, cos_columns(df, layer), pixel_order=order)

    def _check_columns(self):
        cols = dict(self.df.dtypes)
        missing = [c for c in ("data", "label") if c not in cols]
        if missing:
            raise SourceError(
                f"{self.name}: the DataFrame lacks column(s) {', '.join(missing)} (has "
                f"{', '.join(cols) or 'none'}); it needs data (binary) and label"
            )
        if cols["data"] != "binary":
            raise SourceError(f"{self.name}: column data must be binary, got {cols['data']}")
        self.columns = ["data", "label"] + [c for c in OPTIONAL_COLUMNS if c in cols]

    def count(self, spark=None):
        return self.df.count()

    def _converter(self):
        from engine.data.datum import decode_mode

        resize = self.conf.resize and (dialect.resize_target(self.layer) or self._first_size())
        tp, dp = self.layer.transform_param, self.layer.data_param
        mode = decode_mode(tp.force_color or dp.force_encoded_color, tp.force_gray)
        return RowConverter(self.columns, self.name, resize or None, mode, self.pixel_order)

    def _first_size(self):
        """(height, width) of the first record, the target of -resize."""
        if self._resize_to is None:
            row = self.df.select(*self.columns).first()
            if row is None:
                raise SourceError(f"{self.name}: the DataFrame is empty")
            convert = RowConverter(self.columns, self.name, None, pixel_order=self.pixel_order)
            arr = convert.array(row.asDict(), "row 0")
            self._resize_to = (int(arr.shape[1]), int(arr.shape[2]))
        return self._resize_to

    def shards(self, spark, num):
        def key_by_index(pair):
            row, idx = pair
            return idx, row

        def rank_of(idx, n=num):
            return idx % n

        rdd = self._persist(
            ("shards", num),
            self.df.select(*self.columns)
            .rdd.zipWithIndex()
            .map(key_by_index)
            .repartitionAndSortWithinPartitions(num, rank_of),
        )
        return rdd, self._localizer()

    def partitions(self, spark):
        def key_by_index(pair):
            row, idx = pair
            return idx, row

        rdd = self._persist(
            ("partitions",), self.df.select(*self.columns).rdd.zipWithIndex().map(key_by_index)
        )
        return rdd, self._localizer()

    def _localizer(self):
        return ArrowLocalizer(self._converter(), self.name)


def cos_columns(df, layer):
    """A DataFrame in CaffeOnSpark's ImageDataFrame layout (label, data: binary or string;
    optional id, channels, height, width, encoded) with our column names: id -> SampleID,
    data as binary, `encoded` from the layer's image_encoded and raw pixels' shape from its
    memory_data_param where the table has no such columns."""
    from pyspark.sql import functions as F

    cols = dict(df.dtypes)
    if "id" in cols and "SampleID" not in cols:
        df = df.withColumnRenamed("id", "SampleID")
    if cols.get("data") == "string":
        df = df.withColumn("data", F.col("data").cast("binary"))
    if "encoded" not in cols:
        df = df.withColumn("encoded", F.lit(dialect.encoded_images(layer)))
    shape = dialect.raw_shape(layer)
    if shape is not None and not any(k in cols for k in ("channels", "height", "width")):
        for key, value in zip(("channels", "height", "width"), shape):
            df = df.withColumn(key, F.lit(value))
    return df


class RowConverter:
    """A row (dict of the source columns) -> (key, serialized Datum); raw pixels are read in
    `pixel_order` (CHW or HWC) and stored in the Datum's CHW."""

    def __init__(self, columns, name, resize_to, mode=images.UNCHANGED, pixel_order=CHW):
        self.columns = columns
        self.name = name
        self.resize_to = resize_to
        self.mode = mode  # how encoded images are decoded when they must be (-resize)
        self.pixel_order = pixel_order

    def key(self, row, index):
        sid = row.get("SampleID")
        return str(index) if sid is None else str(sid)

    def array(self, row, what):
        """The record's pixels as C x H x W (encoded images decoded)."""
        datum = self._datum(row, what, decode=True)
        from engine.data.datum import datum_to_array

        return datum_to_array(datum, what)

    def _datum(self, row, what, decode):
        data = row["data"]
        if data is None:
            raise SourceError(f"{self.name} {what}: data is null")
        data = bytes(data)
        label = row.get("label")
        if label is None:
            raise SourceError(f"{self.name} {what}: label is null")
        try:
            number = float(label)  # CaffeOnSpark's tables hold labels as strings
            whole = math.isfinite(number) and number == int(number)
        except (TypeError, ValueError):
            whole = False
        if not whole:
            raise SourceError(f"{self.name} {what}: label {label!r} is not an integer")
        label = int(number)
        shape = [row.get(k) for k in ("channels", "height", "width")]
        encoded = row.get("encoded")
        if encoded is None:
            encoded = looks_encoded(data)
        if encoded:
            if decode or self.resize_to:
                try:
                    img = images.decode_image(data, self.mode, what=f"{self.name} {what}")
                except images.ImageDecodeError as e:
                    raise SourceError(str(e)) from None
                if self.resize_to:
                    img = images.resize_linear(img, *self.resize_to)
                return array_to_datum(images.hwc_to_chw(img), label)
            return encoded_datum(data, label)
        if all(v is not None for v in shape):
            c, h, w = (int(v) for v in shape)
            if c * h * w != len(data):
                hint = ""
                if looks_encoded(data):
                    hint = " (the data look like an encoded image: set its encoded column, or "
                    hint += "the layer's image_encoded, to true)"
                raise SourceError(
                    f"{self.name} {what}: {len(data)} bytes of data but channels x height x "
                    f"width = {c}x{h}x{w} = {c * h * w}{hint}"
                )
            arr = np.frombuffer(data, dtype=np.uint8)
            if self.pixel_order == HWC:
                arr = arr.reshape(h, w, c).transpose(2, 0, 1)
            else:
                arr = arr.reshape(c, h, w)
            return array_to_datum(self._resized(arr), label)
        try:
            datum = parse_datum(data, what)
            n = datum.channels * datum.height * datum.width
            if n == 0 or (
                len(datum.data) != n and len(datum.float_data) != n and not datum.encoded
            ):
                raise DatumError("shape does not match its data")
        except DatumError:
            raise SourceError(
                f"{self.name} {what}: column data ({len(data)} bytes) is neither an encoded "
                "image nor a serialized Datum; for raw pixels add channels, height and width "
                "columns"
            ) from None
        datum.label = label
        if self.resize_to and not datum.encoded and len(datum.data):
            from engine.data.datum import datum_to_array

            return array_to_datum(self._resized(datum_to_array(datum, what)), label)
        return datum

    def _resized(self, chw):
        if not self.resize_to or chw.shape[1:] == tuple(self.resize_to):
            return chw
        hwc = chw.transpose(1, 2, 0)
        return (
            images.resize_linear(np.ascontiguousarray(hwc), *self.resize_to)
            .reshape(self.resize_to[0], self.resize_to[1], -1)
            .transpose(2, 0, 1)
        )

    def __call__(self, row, index):
        what = f"row {index}"
        if row.get("SampleID") is not None:
            what += f" (SampleID {row['SampleID']!r})"
        return self.key(row, index).encode("utf-8"), self._datum(
            row, what, decode=False
        ).SerializeToString()


def looks_encoded(data):
    """Whether bytes start like an image file (JPEG, PNG, BMP, GIF, TIFF, WebP)."""
    return (
        data[:3] == b"\xff\xd8\xff"
        or data[:8] == b"\x89PNG\r\n\x1a\n"
        or (
            data[:2] == b"BM"
            or data[:4] in (b"GIF8", b"II*\x00", b"MM\x00*")
            or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
        )
    )


class ArrowLocalizer:
    """Runs in the task: converts the partition's (index, row) items to Datum records and
    spills them to `<workdir>/records-<index>.arrow`; returns the spec (with `spec_extra`'s
    entries)."""

    def __init__(self, convert, name, shuffle_seed=None, spec_extra=None):
        self.convert = convert
        self.name = name
        self.shuffle_seed = shuffle_seed
        self.spec_extra = dict(spec_extra or {})

    def __call__(self, items, workdir, index, num):
        def records():
            for idx, row in items:
                yield self.convert(row.asDict() if hasattr(row, "asDict") else row, idx)

        path = os.path.join(workdir, f"records-{index}.arrow")
        count = write_arrow(path, records(), self.shuffle_seed)
        spec = {"kind": "arrow", "path": path, "count": count, "name": f"{self.name} part {index}"}
        spec.update(self.spec_extra)
        return spec


def write_arrow(path, records, shuffle_seed=None):
    """Write (key, value) byte pairs to an Arrow IPC file; returns the record count."""
    import pyarrow as pa

    schema = pa.schema([("key", pa.binary()), ("value", pa.binary())])
    if shuffle_seed is not None:
        records = list(records)
        order = np.random.default_rng(shuffle_seed).permutation(len(records))
        records = [records[i] for i in order]
    count = 0
    keys, values = [], []
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for key, value in records:
            keys.append(key)
            values.append(value)
            if len(keys) == _ARROW_BATCH:
                writer.write_batch(pa.record_batch([keys, values], schema=schema))
                count += len(keys)
                keys, values = [], []
        if keys:
            writer.write_batch(pa.record_batch([keys, values], schema=schema))
            count += len(keys)
    return count


class ArrowRecordSource(RecordSource):
    """The engine's record stream over a memory-mapped Arrow file of (key, value) records."""

    def __init__(self, path, name):
        import pyarrow as pa

        self.path = path
        self.name = name
        try:
            self._map = pa.memory_map(path)
            self._reader = pa.ipc.open_file(self._map)
        except (OSError, pa.ArrowInvalid) as e:
            raise DataSourceError(f"{name}: cannot open {path}: {e}") from None
        self._count = sum(
            self._reader.get_batch(i).num_rows for i in range(self._reader.num_record_batches)
        )

    def one_pass(self):
        for i in range(self._reader.num_record_batches):
            batch = self._reader.get_batch(i)
            yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())

    def __len__(self):
        return self._count

    def close(self):
        m, self._map = getattr(self, "_map", None), None
        if m is not None:
            m.close()
