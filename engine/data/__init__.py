"""Caffe's data pipeline: Datum codec, LMDB reader/writer, record sources, the transformer,
background prefetch, OpenCV-compatible image decode/resize, and HDF5 data.

The Data layer reads an endless, wrapping stream of (key, value) records from a
RecordSource (engine/data/sources.py); LMDBSource is the default, and other sources plug in
through engine.layers.data_layers.set_source_factory.
"""

from engine.data.batches import SKIP_BAD_ENV, set_skip_bad, skip_bad_records
from engine.data.datum import DatumError, array_to_datum, decode_record, parse_datum
from engine.data.lmdb_io import LMDBSource, LMDBWriter, count_records, shard_ranges
from engine.data.sources import DataSourceError, IterableSource, ListSource, RecordSource
from engine.data.transformer import DataTransformer, TransformError

__all__ = [
    "SKIP_BAD_ENV",
    "DataSourceError",
    "DataTransformer",
    "DatumError",
    "IterableSource",
    "LMDBSource",
    "LMDBWriter",
    "ListSource",
    "RecordSource",
    "TransformError",
    "array_to_datum",
    "count_records",
    "decode_record",
    "parse_datum",
    "set_skip_bad",
    "shard_ranges",
    "skip_bad_records",
]
