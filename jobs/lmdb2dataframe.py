r"""spark-submit entry point of CaffeOnSpark's LMDB2DataFrame tool: an LMDB of Caffe Datum
records as a Parquet (or ORC) table that a data layer, or any Spark job, reads; with
-outputFormat sequence, its LMDB2Sequence tool: a Hadoop sequence file instead.

    spark-submit jobs/lmdb2dataframe.py -imageRoot work/mnist_train_lmdb \
        -output work/mnist_train.parquet [-outputFormat parquet|orc|sequence] [-lmdb_partitions N]

Columns: SampleID (the record's key), label, channels, height, width, encoded, data (see
caffeonspark.export). Every record becomes one row, in the LMDB's key order; the job counts
the rows written against the LMDB and fails if they differ. An existing -output is refused,
not overwritten. A data layer reads the table with `source: "<output>"` (a .parquet suffix or
a folder of .parquet parts), or a CaffeOnSpark prototxt with source_class ImageDataFrame.
A sequence file's keys are scala.Tuple6(id, label, channels, height, width, encoded) as
CaffeOnSpark serialized them, its values the images (raw pixels in OpenCV's HWC order); a
prototxt reads it with source_class SeqImageDataSource. Datums of float_data have no
sequence file form: the job stops at the first, naming it.
"""

import argparse
import logging
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from caffeonspark import Config, export, storage  # noqa: E402
from caffeonspark.api import check_new_output  # noqa: E402
from caffeonspark.launch import run_job  # noqa: E402

log = logging.getLogger("caffeonspark")


def parse(argv):
    p = argparse.ArgumentParser(
        prog="lmdb2dataframe.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("-imageRoot", required=True, help="the LMDB (a folder with data.mdb; any URI)")
    p.add_argument("-output", required=True, help="where the table goes (Spark's path rules)")
    p.add_argument("-outputFormat", default="parquet", choices=export.OUTPUT_FORMATS)
    p.add_argument(
        "-lmdb_partitions", type=int, default=0, help="partitions (0: the default parallelism)"
    )
    return p.parse_args(argv)


def run(args, spark):
    conf = Config(spark, output=args.output, lmdb_partitions=args.lmdb_partitions)
    uri = check_new_output(spark, conf)
    source = export.lmdb_source(conf, storage.absolute(args.imageRoot))
    records = source.count(spark)
    log.info("converting %d records of %s to %s", records, storage.shown(source.uri), uri)
    if args.outputFormat == "sequence":
        rows = export.write_sequence(spark, export.source_rows(spark, source), uri, records)
    else:
        frame = export.source_frame(spark, source)
        rows = export.write_frame(frame, uri, args.outputFormat, records)
    print(f"{rows} records of {storage.shown(source.uri)} written to {uri}", flush=True)
    return 0


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    return run_job("LMDB2DataFrame", lambda spark: run(args, spark))


if __name__ == "__main__":
    sys.exit(main())
