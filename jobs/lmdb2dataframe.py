r"""spark-submit entry point of CaffeOnSpark's LMDB2DataFrame tool: an LMDB of Caffe Datum
records as a Parquet (or ORC) table that a data layer, or any Spark job, reads.

    spark-submit jobs/lmdb2dataframe.py -imageRoot work/mnist_train_lmdb \
        -output work/mnist_train.parquet [-outputFormat parquet|orc] [-lmdb_partitions N]

Columns: SampleID (the record's key), label, channels, height, width, encoded, data (see
caffeonspark.export). Every record becomes one row, in the LMDB's key order; the job counts
the rows written against the LMDB and fails if they differ. An existing -output is refused,
not overwritten. A data layer reads the table with `source: "<output>"` (a .parquet suffix or
a folder of .parquet parts), or a CaffeOnSpark prototxt with source_class ImageDataFrame.
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
    p.add_argument("-outputFormat", default="parquet", choices=export.FORMATS)
    p.add_argument(
        "-lmdb_partitions", type=int, default=0, help="partitions (0: the default parallelism)"
    )
    return p.parse_args(argv)


def run(args, spark):
    from caffeonspark.export import lmdb_source, source_frame, write_frame

    conf = Config(spark, output=args.output, lmdb_partitions=args.lmdb_partitions)
    uri = check_new_output(spark, conf)
    source = lmdb_source(conf, storage.absolute(args.imageRoot))
    records = source.count(spark)
    log.info("converting %d records of %s to %s", records, storage.shown(source.uri), uri)
    rows = write_frame(source_frame(spark, source), uri, args.outputFormat, records)
    print(f"{rows} records of {storage.shown(source.uri)} written to {uri}", flush=True)
    return 0


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    return run_job("LMDB2DataFrame", lambda spark: run(args, spark))


if __name__ == "__main__":
    sys.exit(main())
