"""CaffeOnSpark: distributed training, test and feature extraction of Caffe nets on Spark,
on the NumPy/CuPy engine in `engine/` (which never imports this package).

    from caffeonspark import CaffeOnSpark, Config, DataSource
    conf = Config(spark, conf="solver.prototxt", model="hdfs:///m/lenet.caffemodel")
    CaffeOnSpark(spark).train(DataSource.get(conf, is_train=True))
"""

from caffeonspark.api import CaffeOnSpark, TrainSummary
from caffeonspark.config import Config, ConfigError
from caffeonspark.launch import LaunchError
from caffeonspark.sources import DataSource, SourceError

__version__ = "0.1.0"

__all__ = [
    "CaffeOnSpark",
    "Config",
    "ConfigError",
    "DataSource",
    "LaunchError",
    "SourceError",
    "TrainSummary",
]
