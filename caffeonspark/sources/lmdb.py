"""LMDB source: every rank (or test partition) reads its own key range of the LMDB directly,
so no record passes through the driver.

The LMDB sits on a path every executor sees (a shared filesystem), or is shipped with the job:
a local path missing on a machine (driver or executor) is looked up in SparkFiles by its folder
name, so `--archives train_lmdb.tgz#train_lmdb` (or `train_lmdb.tgz`, `.tar.gz`, `.tar`,
`.zip`) serves `source: "train_lmdb"` or any path ending in that name; the archive may hold the
LMDB's files or one folder holding them. `sc.addFile(dir, recursive=True)` of an hdfs:// folder
works the same way. hdfs:// and s3:// LMDBs are copied to the task's local dir.
"""

import os

from caffeonspark import storage
from caffeonspark.sources import DataSource, SourceError, partition_source
from engine.data import lmdb_io
from engine.data.sources import DataSourceError


class LMDBDataSource(DataSource):
    """The LMDB at the data layer's data_param.source, split into key ranges."""

    kind = "lmdb"

    def __init__(self, conf, layer, phase):
        super().__init__(conf, layer, phase)
        self.uri = storage.absolute(layer.data_param.source)
        self.local = None  # where the driver reads it: the path, or its shipped copy
        self._count = None
        self._check()

    def _check(self):
        if storage.is_local(self.uri):
            path = given = storage.local_path(self.uri)
            if not os.path.exists(path):
                path = shipped_lmdb(given)
                if path is None:
                    raise SourceError(
                        f"{self.name}: LMDB {given} not found (no such directory, and none "
                        f"shipped with the job as {_shipped_names(self.uri)})"
                    )
            if not lmdb_io.is_lmdb(path):
                raise SourceError(f"{self.name}: {path} is not an LMDB (no data.mdb)")
            self.local = path
        elif not storage.exists(self.uri):
            raise SourceError(f"{self.name}: LMDB {storage.shown(self.uri)} not found")

    @property
    def readable_here(self):
        return self.local is not None

    def count(self, spark=None):
        if self._count is None:
            if self.readable_here:
                try:
                    self._count = lmdb_io.count_records(self.local)
                except DataSourceError as e:
                    raise SourceError(f"{self.name}: {e}") from None
            else:
                rdd, localizer = self.partitions(spark, num=1)
                self._count = rdd.mapPartitions(_count_task(localizer)).sum()
        return self._count

    def _ranges(self, num):
        """Key ranges [(hex start key, count)] computed here when the driver can read the
        LMDB; None lets each task compute its own."""
        if not self.readable_here:
            return None
        try:
            ranges = lmdb_io.shard_ranges(self.local, num)
        except (DataSourceError, ValueError) as e:
            raise SourceError(f"{self.name}: {e}") from None
        return [(key.hex(), n) for key, n in ranges]

    def shards(self, spark, num):
        return self._plan(spark, num)

    def partitions(self, spark, num=None):
        if num is None:
            num = self.conf.lmdb_partitions or spark.sparkContext.defaultParallelism
            if self.readable_here:
                num = max(1, min(num, self.count()))
        return self._plan(spark, num)

    def _plan(self, spark, num):
        ranges = self._ranges(num)
        rdd = spark.sparkContext.parallelize(range(num), num)
        return rdd, LMDBLocalizer(self.uri, self.name, num, ranges)


class LMDBLocalizer:
    """Runs in the task: the spec of key range `index` of `num` (the partition's items are
    ignored: the LMDB is read directly)."""

    def __init__(self, uri, name, num, ranges):
        self.uri = uri
        self.name = name
        self.num = num
        self.ranges = ranges

    def __call__(self, items, workdir, index, num):
        for _ in items:
            pass
        path = locate_lmdb(self.uri, workdir, self.name)
        spec = {"kind": "lmdb", "path": path, "name": self.name, "shard": index, "num": self.num}
        if self.ranges is not None:
            spec["start"], spec["count"] = self.ranges[index]
        return spec


def locate_lmdb(uri, workdir, name):
    """A local path of the LMDB in this executor: as given, shipped with the job, or copied."""
    if not storage.is_local(uri):
        try:
            return storage.fetch(uri, workdir)
        except storage.StorageError as e:
            raise SourceError(f"{name}: {e}") from None
    path = storage.local_path(uri)
    if os.path.exists(path):
        return path
    shipped = shipped_lmdb(path)
    if shipped is not None:
        return shipped
    raise SourceError(
        f"{name}: LMDB {path} is not on this executor; put it on a shared path or ship it "
        f"with the job as {_shipped_names(uri)} (spark-submit --archives, or sc.addArchive / "
        "sc.addFile(hdfs_folder, recursive=True))"
    )


ARCHIVE_SUFFIXES = ("", ".tgz", ".tar.gz", ".tar", ".zip")


def _shipped_names(uri):
    name = os.path.basename(storage.local_path(uri).rstrip(os.sep))
    return " or ".join(name + suffix for suffix in ARCHIVE_SUFFIXES)


def shipped_lmdb(path):
    """The copy of LMDB `path` shipped with the job, found in SparkFiles' folder under the
    LMDB's folder name (plain, or the name of an archive Spark unpacked there), or None.
    An unpacked archive may hold the LMDB's files or one folder holding them."""
    try:
        from pyspark import SparkFiles

        root = os.path.abspath(SparkFiles.getRootDirectory())  # "." on an executor
    except Exception:  # noqa: BLE001 - no SparkContext / SparkFiles outside Spark
        return None
    name = os.path.basename(path.rstrip(os.sep))
    for suffix in ARCHIVE_SUFFIXES:
        candidate = os.path.join(root, name + suffix)
        if lmdb_io.is_lmdb(candidate):
            return candidate
        if os.path.isdir(candidate):
            inner = [os.path.join(candidate, d) for d in sorted(os.listdir(candidate))]
            found = [d for d in inner if os.path.isdir(d) and lmdb_io.is_lmdb(d)]
            if len(found) == 1:
                return found[0]
    return None


def open_lmdb_spec(spec):
    """An engine LMDBSource over the spec's key range (computed here if the driver could not)."""
    path, name = spec["path"], spec["name"]
    try:
        if "start" in spec:
            start, count = bytes.fromhex(spec["start"]), spec["count"]
        else:
            start, count = lmdb_io.shard_ranges(path, spec["num"])[spec["shard"]]
        return lmdb_io.LMDBSource(path, start_key=start, count=count)
    except DataSourceError as e:
        raise SourceError(f"{name}: {e}") from None


def _count_task(localizer):
    def count(items):
        with partition_source(localizer, items, 0, 1, "count") as source:
            yield len(source)

    return count
