r"""spark-submit entry point of CaffeOnSpark's Binary2DataFrame tool: the image files a label
list names, as a Parquet (or ORC) table that a data layer, or any Spark job, reads; with
-outputFormat sequence, its Binary2Sequence tool: a Hadoop sequence file instead.

    spark-submit jobs/binary2dataframe.py -imageRoot work/images -labelFile work/labels.txt \
        -output work/images.parquet [-outputFormat parquet|orc|sequence] [-lmdb_partitions N]

Each line of -labelFile is '<file> <label> <id>' (the file relative to -imageRoot; without
an id, the file name is the id). Columns: SampleID (the id), label, data (the file's bytes,
as they are). Every listed file becomes one row; a line that does not parse,
or a file that cannot be read, fails the job naming it (CaffeOnSpark wrote null rows). The
job counts the rows written against the list. An existing -output is refused. A data layer
reads the table with `source: "<output>"`; encoded images are recognised by their bytes.
A sequence file's keys are scala.Tuple2(id, label) as CaffeOnSpark serialized them, its
values the files' bytes; a prototxt reads it with source_class SeqImageDataSource.
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
        prog="binary2dataframe.py",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("-imageRoot", required=True, help="the folder the listed files are in")
    p.add_argument("-labelFile", required=True, help="'<file> <label> <id>' lines (any URI)")
    p.add_argument("-output", required=True, help="where the table goes (Spark's path rules)")
    p.add_argument("-outputFormat", default="parquet", choices=export.OUTPUT_FORMATS)
    p.add_argument(
        "-lmdb_partitions", type=int, default=0, help="partitions (0: the default parallelism)"
    )
    return p.parse_args(argv)


def run(args, spark):
    conf = Config(spark, output=args.output)
    uri = check_new_output(spark, conf)
    rdd, count = export.image_list_rows(spark, args.imageRoot, args.labelFile, args.lmdb_partitions)
    log.info("converting the %d files of %s to %s", count, storage.shown(args.labelFile), uri)
    if args.outputFormat == "sequence":
        rows = export.write_sequence(spark, rdd, uri, count)
    else:
        df = spark.createDataFrame(rdd, export.LIST_SCHEMA)
        rows = export.write_frame(df, uri, args.outputFormat, count)
    print(f"{rows} files of {storage.shown(args.labelFile)} written to {uri}", flush=True)
    return 0


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    return run_job("Binary2DataFrame", lambda spark: run(args, spark))


if __name__ == "__main__":
    sys.exit(main())
