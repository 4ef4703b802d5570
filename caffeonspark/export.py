"""A data source's records as a DataFrame, as CaffeOnSpark's LMDB2DataFrame tool made them:
one row per record, in the source's order, in the columns a DataFrame source reads back, so an
LMDB (or an image list) moves to Parquet with no record lost or changed.

Columns: SampleID (the record's key), label, channels, height, width, encoded, data. Raw
pixels keep their shape; an encoded image keeps its file's bytes; a Datum of float_data, which
a byte column of pixels cannot hold, is kept whole (the DataFrame source parses it back).

Also CaffeOnSpark's Binary2DataFrame: the files a label list names ('<file> <label> <id>'
lines) as rows of SampleID, label and data (the file's bytes), every listed file read.

Either as a Hadoop sequence file instead (CaffeOnSpark's LMDB2Sequence and Binary2Sequence,
`write_sequence`): BytesWritable pairs whose key is the Java-serialized record header that
SeqImageDataSource reads (caffeonspark.sources.sequence) and whose value is the image: an
encoded file's bytes, or raw pixels in OpenCV's (height, width, channels) order.
"""

import numpy as np

from caffeonspark import storage
from caffeonspark.sources import SourceError, key_text, partition_source
from caffeonspark.sources.sequence import KEY_CLASS, VALUE_CLASS, encode_key
from caffeonspark.storage import StorageError
from engine.data.datum import DatumError, parse_datum
from engine.proto import caffe_pb2

SCHEMA = (
    "SampleID string, label int, channels int, height int, width int, encoded boolean, data binary"
)
# Formats that keep the data column as bytes (JSON would turn them into base64 text).
FORMATS = ("parquet", "orc")
# ...and what the conversion jobs write: those tables, or CaffeOnSpark's sequence files.
OUTPUT_FORMATS = FORMATS + ("sequence",)


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


def source_rows(spark, source):
    """An RDD of the SCHEMA rows of every record of `source` (a DataSource; its test /
    features partitions), in its order."""
    rdd, localizer = source.partitions(spark)
    return rdd.mapPartitionsWithIndex(_rows_task(localizer, rdd.getNumPartitions()))


def source_frame(spark, source):
    """`source_rows` as a DataFrame."""
    return spark.createDataFrame(source_rows(spark, source), SCHEMA)


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


def image_list_rows(spark, root, label_file, partitions=0):
    """(RDD of the LIST_SCHEMA rows of the files `label_file` lists under `root`, and their
    count): each task reads its files (any filesystem storage reads: local, hdfs://, s3://);
    a file that cannot be read fails the job, naming the file and its line."""
    label_file = storage.absolute(label_file)
    text = storage.read_bytes(label_file, "label list").decode("utf-8")
    entries = parse_label_list(text, storage.shown(label_file))
    sc = spark.sparkContext
    slices = partitions or sc.defaultParallelism
    rdd = sc.parallelize(entries, min(slices, len(entries))).mapPartitions(
        _read_listed(storage.absolute(root), storage.shown(label_file))
    )
    return rdd, len(entries)


def sequence_pair(row):
    """(key, value) of a sequence file record for a SCHEMA row (LMDB2Sequence: a Tuple6 key)
    or a LIST_SCHEMA row (Binary2Sequence: a Tuple2 key, the file's bytes)."""
    if len(row) == 3:
        sample_id, label, data = row
        return bytearray(encode_key(sample_id, label)), bytearray(data)
    sample_id, label, c, h, w, encoded, data = row
    if encoded:
        return bytearray(encode_key(sample_id, label, 0, 0, 0, True)), bytearray(data)
    if c is None:
        raise SourceError(
            f"record {sample_id!r}: a Datum of float_data; a sequence file record holds "
            "image bytes only (write a table: -outputFormat parquet)"
        )
    pixels = np.frombuffer(data, np.uint8).reshape(c, h, w).transpose(1, 2, 0)
    return bytearray(encode_key(sample_id, label, c, h, w, False)), bytearray(pixels.tobytes())


def write_sequence(spark, rows, uri, expected):
    """Write an RDD of SCHEMA or LIST_SCHEMA rows to `uri` as CaffeOnSpark's sequence files
    and check that the files hold `expected` records."""
    rows.map(sequence_pair).saveAsSequenceFile(uri)
    written = spark.sparkContext.sequenceFile(uri, KEY_CLASS, VALUE_CLASS).count()
    if written != expected:
        raise SourceError(
            f"{storage.shown(uri)}: wrote {written} records, the source has {expected}"
        )
    return written
