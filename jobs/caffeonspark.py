r"""spark-submit entry point of CaffeOnSpark: train, extract features and/or test a Caffe net
on the cluster, with CaffeOnSpark's flags.

    spark-submit jobs/caffeonspark.py -train -features ip2 -test \
        -conf conf/lenet/lenet_solver.prototxt -model work/lenet.caffemodel \
        -output work/lenet_features -outputFormat json -clusterSize 2

Runs, in this order: -train (writes -model), -features (writes -output, or shows a few rows),
-test (prints the mean of every output blob, e.g. accuracy; with -output and no -features it
also writes them there, a "name: value" line each, as CaffeOnSpark did). `-help` lists every
flag.
"""

import logging
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from caffeonspark import CaffeOnSpark, Config, ConfigError, DataSource  # noqa: E402
from caffeonspark.api import check_output, format_values, write_test_result  # noqa: E402
from caffeonspark.launch import job_logging, run_job  # noqa: E402

log = logging.getLogger("caffeonspark")


def run(conf, spark):
    cos = CaffeOnSpark(spark)
    if conf.output:
        check_output(spark, conf)  # before hours of training, not after
    if conf.train:
        summary = cos.train(DataSource.get(conf, is_train=True))
        print(
            f"trained {summary.iterations} iterations on {summary.ranks} rank(s): "
            f"loss {summary.loss:.4f}, {summary.images_per_s:.0f} images/s, model {summary.model}",
            flush=True,
        )
    if conf.features:
        df = cos.features(DataSource.get(conf, is_train=False))
        if conf.output:
            uri, rows = cos.write_features(df, conf)
            print(f"features of {rows} records written to {uri}", flush=True)
        else:
            df.show(5, truncate=60)
    if conf.test:
        result = cos.test(DataSource.get(conf, is_train=False))
        for name, values in result.items():
            print(f"{name} = {format_values(values)}", flush=True)
        if conf.output and not conf.features:  # as CaffeOnSpark: -output holds the features
            print(f"test result written to {write_test_result(spark, result, conf)}", flush=True)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    job_logging()
    if any(a in ("-help", "--help", "-h") for a in argv):
        print(__doc__ + "\n" + Config.usage())
        return 0
    try:
        conf = Config.from_args(argv).check()
    except ConfigError as e:
        print(f"caffeonspark: {e}\n\n{Config.usage()}", file=sys.stderr)
        return 2

    def body(spark):
        conf.spark = spark
        return run(conf, spark)

    return run_job("CaffeOnSpark", body)


if __name__ == "__main__":
    sys.exit(main())
