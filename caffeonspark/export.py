"""A data source's records as a DataFrame, as CaffeOnSpark's LMDB2DataFrame tool made them:
one row per record, in the source's order, in the columns a DataFrame source reads back, so an
LMDB (or an image list) moves to Parquet with no record lost or changed.

Columns: SampleID (the record's key), label, channels, height, width, encoded, data. Raw
pixels keep their shape; an encoded image keeps its file's bytes; a Datum of float_data, which
a byte column of pixels cannot hold, is kept whole (the DataFrame source parses it back).

Also CaffeOnSpark's Binary2DataFrame: the files a label list names ('<file> <label> <id>'
lines) as rows of SampleID, label and data (the file's bytes), every listed file read.
"""

from caffeonspark import storage
from caffeonspark.sources import SourceError, key_text, partition_source
from caffeonspark.storage import StorageError
from engine.data.datum import DatumError, parse_datum
from engine.proto import caffe_pb2

SCHEMA = (
    "SampleID string, label int, channels int, height int, width int, encoded boolean, data binary"
)
# Formats that keep the data column as bytes (JSON would turn them into base64 text).
FORMATS = ("parquet", "orc")


def datum_row(key, value, what):
    """(SampleID, label, channels, height, width, encoded, data) of one serialized Datum."""
    try:
        datum = parse_datum(value, what)
    except DatumError as e:
        raise SourceError(str(e)) from None
    sid = key_text(key)
    if datum.encoded:
        return (sid, datum.label, None, None, None, True, datum.data)
    c, h, w = datum.channels, datum.height, datum.width
    if len(datum.data) and len(datum.data) == c * h * w:
        return (sid, datum.label, c, h, w, False, datum.data)
    if len(datum.float_data) and len(datum.float_data) == c * h * w:
        return (sid, datum.label, None, None, None, False, bytes(value))
    raise SourceError(
        f"{what}: a Datum of shape {c}x{h}x{w} with {len(datum.data)} data bytes and "
        f"{len(datum.float_data)} float_data values: nothing a data layer could read"
    )


def _rows_task(localizer, num):
    def task(index, items):
        with partition_source(localizer, items, index, num, "export") as source:
            for key, value in source.one_pass():
                yield datum_row(key, value, f"{source.name}: record {key_text(key)!r}")

    return task


def source_frame(spark, source):
    """A DataFrame of every record of `source` (a DataSource; its test / features
    partitions), in its order."""
    rdd, localizer = source.partitions(spark)
    rows = rdd.mapPartitionsWithIndex(_rows_task(localizer, rdd.getNumPartitions()))
    return spark.createDataFrame(rows, SCHEMA)


def lmdb_source(conf, uri):
    """A DataSource over the LMDB at `uri` alone (no net): a TEST Data layer reading it."""
    from caffeonspark.sources.lmdb import LMDBDataSource

    layer = caffe_pb2.LayerParameter(name=storage.basename(uri.rstrip("/")), type="Data")
    layer.data_param.source = uri
    layer.data_param.backend = caffe_pb2.DataParameter.LMDB
    layer.data_param.batch_size = 1
    return LMDBDataSource(conf, layer, caffe_pb2.TEST)


def write_frame(df, uri, fmt, expected):
    """Write `df` to `uri` in `fmt` and check the written table holds `expected` rows."""
    if fmt not in FORMATS:
        raise ValueError(
            f"format {fmt!r}: use {' or '.join(FORMATS)} (JSON would store the images' bytes "
            "as base64 text, which a data layer does not read back)"
        )
    df.write.mode("error").format(fmt).save(uri)  # a table already there is never replaced
    written = df.sparkSession.read.format(fmt).load(uri).count()
    if written != expected:
        raise SourceError(f"{storage.shown(uri)}: wrote {written} rows, the source has {expected}")
    return written


LIST_SCHEMA = "SampleID string, label int, data binary"


def parse_label_list(text, source):
    """[(file, label, id, line number)] of a Binary2DataFrame label list: '<file> <label>
    <id>' lines (CaffeOnSpark's form) or '<file> <label>' (the id is then the file name);
    blank lines are skipped, any other line that does not parse is an error naming it."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) not in (2, 3):
                raise ValueError
            label = int(fields[1])
        except ValueError:
            raise SourceError(
                f"{source}:{number}: expected '<file> <label> <id>', got {line!r}"
            ) from None
        entries.append((fields[0], label, fields[2] if len(fields) == 3 else fields[0], number))
    if not entries:
        raise SourceError(f"{source}: the label list names no file")
    return entries


def _read_listed(root, label_file):
    def task(entries):
        for name, label, sample_id, number in entries:
            try:
                data = storage.read_bytes(storage.join(root, name), "image")
            except StorageError as e:
                raise SourceError(f"{e} (listed at {label_file}:{number})") from None
            yield (sample_id, label, data)

    return task


def image_list_frame(spark, root, label_file, partitions=0):
    """(DataFrame of the files `label_file` lists under `root`, and their count): each task
    reads its files (any filesystem storage reads: local, hdfs://, s3://); a file that
    cannot be read fails the job, naming the file and its line."""
    label_file = storage.absolute(label_file)
    text = storage.read_bytes(label_file, "label list").decode("utf-8")
    entries = parse_label_list(text, storage.shown(label_file))
    sc = spark.sparkContext
    slices = partitions or sc.defaultParallelism
    rdd = sc.parallelize(entries, min(slices, len(entries))).mapPartitions(
        _read_listed(storage.absolute(root), storage.shown(label_file))
    )
    return spark.createDataFrame(rdd, LIST_SCHEMA), len(entries)
