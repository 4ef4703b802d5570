"""CaffeOnSpark's Python API: train, train with validation, test and feature extraction of a
Caffe net on a Spark cluster, with the data coming from a DataSource.

Training runs one barrier stage of MPI-connected engine workers (caffeonspark.launch); test
and features run the engine inside plain Spark tasks, batch by batch, with no MPI.
"""

import base64
import collections
import dataclasses
import json
import logging
import os
import socket
import time
import uuid

import numpy as np

from caffeonspark import launch, storage
from caffeonspark.config import TEST, TRAIN, ConfigError, spark_session
from caffeonspark.sources import (
    DataSource,
    SourceError,
    SourceFactory,
    key_text,
    layer_batch_size,
    partition_source,
    rewrite_net,
)
from caffeonspark.worker import metrics_file
from engine.data.sources import RecordSource

log = logging.getLogger("caffeonspark")


@dataclasses.dataclass
class TrainSummary:
    """What a training run did: where the model is, how fast it went, what it reported.
    `iterations` and the speed figures are the last stage attempt's; `losses` (the smoothed
    loss of every iteration) and `validation` cover the whole run, earlier attempts included."""

    model: str
    ranks: int
    iterations: int
    final_iter: int
    loss: float
    images_per_s: float
    step_s: float
    step_median_s: float
    batch_per_rank: int
    allreduce_s: float
    wait_s: float
    startup_s: float
    snapshots: list
    validation: list
    losses: list

    @property
    def images_per_s_median(self):
        """Throughput from the median iteration time (robust to bursts of other load)."""
        return self.ranks * self.batch_per_rank / self.step_median_s

    @property
    def allreduce_fraction(self):
        return self.allreduce_s / self.step_s if self.step_s else float("nan")


class CaffeOnSpark:
    """Train / test / extract features with a Caffe net on the cluster of `spark` (a
    SparkSession; CaffeOnSpark's `CaffeOnSpark(sc)` and `CaffeOnSpark(sc, sqlContext)` work
    too)."""

    def __init__(self, spark, sqlContext=None):  # noqa: N803 - CaffeOnSpark's name
        del sqlContext  # CaffeOnSpark 0.x's second argument: the session has what it held
        self.spark = spark_session(spark)
        self.last_summary = None  # the TrainSummary of the latest train / trainWithValidation
        _ensure_log_handler()

    # --- training ------------------------------------------------------------------------------
    def train(self, source):
        """Train the solver of `source.conf` on `source` (one shard per rank); writes -model
        and snapshots beside it. Returns a TrainSummary."""
        return self._train(source, None)

    def trainWithValidation(self, train_source, validation_source):
        """Train as `train`, testing on `validation_source` every test_interval (each rank
        its shard, averaged); returns a DataFrame: iteration plus one column per test output."""
        sp = train_source.conf.solver_param
        if not len(sp.test_iter) or sp.test_interval <= 0:
            raise ConfigError(
                f"{train_source.conf.conf}: trainWithValidation needs test_iter and "
                "test_interval > 0 in the solver"
            )
        summary = self._train(train_source, validation_source)
        return validation_frame(self.spark, summary.validation)

    train_with_validation = trainWithValidation

    def _train(self, source, validation):
        conf = source.conf
        conf.check_train()
        sc = self.spark.sparkContext
        started = time.monotonic()
        size = launch.cluster_size(sc, conf)
        ranks = size * conf.devices
        rdd, localizer = source.shards(self.spark, ranks)
        localizers = {0: localizer}
        if validation is not None:
            vrdd, vlocalizer = validation.shards(self.spark, ranks)
            rdd = launch.tag_partitions([rdd, vrdd], ranks)
            localizers[1] = vlocalizer
        threads = int(sc.getConf().get("spark.task.cpus", "1"))
        job = dict(self._job(conf, validation, ranks), threads=threads)
        _note_cpu_only(conf)
        _note_local_model(sc, conf)
        log.info(
            "training %s on %d rank(s) (%d executor(s) x %d device(s)), %s, model %s",
            conf.conf,
            ranks,
            size,
            conf.devices,
            source.name,
            storage.shown(conf.model_uri),
        )
        timeouts = (conf.rendezvousTimeout, conf.idleTimeout)
        with launch.Monitor(sc, ranks, *timeouts, metrics=metrics_file(job)) as monitor:
            task = launch.make_barrier_task(
                job, localizers, timeouts, monitor.address, conf.connection, threads
            )
            results = [json.loads(r) for r in launch.run_stage(self.spark, rdd, task, monitor)]
            first = monitor.first_iteration_at
        lead = min(results, key=lambda r: r["rank"])
        # After a stage retry the last attempt reports from where it resumed; the monitor
        # heard the earlier iterations' validation and losses.
        validation = monitor.validation
        validation.update((row["iteration"], row) for row in lead["validation"])
        losses = monitor.losses
        resumed_at = lead["final_iter"] - lead["iterations"]
        losses.update(zip(range(resumed_at, lead["final_iter"]), lead["losses"]))
        _check_model_seen(lead["model"], lead.get("host"))
        summary = TrainSummary(
            model=lead["model"],
            ranks=ranks,
            iterations=lead["iterations"],
            final_iter=lead["final_iter"],
            loss=lead["loss"],
            images_per_s=lead["images_per_s"],
            step_s=lead["step_s"],
            step_median_s=lead["step_median_s"],
            batch_per_rank=lead["batch_per_rank"],
            allreduce_s=float(np.mean([r["allreduce_s"] for r in results])),
            wait_s=float(np.mean([r["wait_s"] for r in results])),
            startup_s=(first - started) if first is not None else float("nan"),
            snapshots=lead["snapshots"],
            validation=[validation[i] for i in sorted(validation)],
            losses=[losses[i] for i in sorted(losses)],
        )
        log.info(
            "trained %d iterations (%d to %d) on %d rank(s): loss %.4g, %.0f images/s, "
            "all-reduce %.2f ms per iteration (%.1f%% of a step) + %.2f ms waiting for the "
            "slowest rank, %.1f s to the first iteration; model %s",
            summary.iterations,
            summary.final_iter - summary.iterations,
            summary.final_iter,
            ranks,
            summary.loss,
            summary.images_per_s,
            1e3 * summary.allreduce_s,
            100 * summary.allreduce_fraction,
            1e3 * summary.wait_s,
            summary.startup_s,
            storage.shown(summary.model),
        )
        # The metrics file ends with the run's figures (its losses and validation rows are
        # already there, one record per event).
        record = dataclasses.asdict(summary)
        del record["losses"], record["validation"]
        monitor.add_summary(record)
        self.last_summary = summary
        return summary

    @staticmethod
    def _job(conf, validation, ranks):
        sp = conf.solver_param
        model = conf.model_uri
        train_layer = conf.data_layer(TRAIN)
        stem = os.path.basename(sp.snapshot_prefix.rstrip("/")) if sp.snapshot_prefix else ""
        return {
            "run_id": uuid.uuid4().hex,
            "size": ranks,
            "solver": base64.b64encode(sp.SerializeToString()).decode("ascii"),
            # The sources give the records; the layers they feed are the net's own (a source
            # made for the other phase still feeds the TRAIN / TEST layer).
            "train_layer": train_layer.name,
            "train_top": train_layer.top[0],
            "validation_layer": conf.data_layer(TEST).name if validation is not None else None,
            "model": model,
            "snapshot_dir": storage.dirname(model),
            "snapshot_stem": stem or "snapshot",
            "snapshot": storage.absolute(conf.snapshot) if conf.snapshot else None,
            "weights": ",".join(storage.absolute(w) for w in conf.weights.split(","))
            if conf.weights
            else None,
            "rendezvous_timeout": conf.rendezvousTimeout,
            "pin_cpus": conf.pinCpus,
        }

    # --- test and features ---------------------------------------------------------------------
    def test(self, source):
        """Run -model over every record of `source`; returns {output blob: [its mean over the
        dataset, per element]}: always a list, as CaffeOnSpark's Map[String, Seq[Double]]
        (so `result["accuracy"][0]`, even for a scalar output)."""
        conf = source.conf
        conf.check_inference(after_training=True)
        results = self._inference(source, "test", ()).collect()
        sums, counts = {}, collections.Counter()
        order = []
        for name, values, count in results:
            if name not in sums:
                sums[name] = np.zeros(len(values), dtype=np.float64)
                order.append(name)
            sums[name] += np.asarray(values, dtype=np.float64)
            counts[name] += count
        out = {}
        for name in order:
            mean = sums[name] / max(counts[name], 1)
            out[name] = mean.tolist()
        for name, values in out.items():
            log.info("%s = %s", name, format_values(values))
        return out

    def features(self, source):
        """A DataFrame with one row per record of `source`: SampleID and one array<float>
        column per blob of -features, the -label blob last (CaffeOnSpark appends it to the
        features: a label is a one-element array)."""
        from pyspark.sql import types as T

        conf = source.conf
        conf.check_inference(after_training=True)
        if not conf.features:
            raise ConfigError("features() needs -features: the blobs to extract")
        blobs = list(conf.features)
        if conf.label and conf.label not in blobs:
            blobs.append(conf.label)
        _check_blobs(conf, blobs)
        fields = [T.StructField("SampleID", T.StringType(), False)]
        fields += [T.StructField(b, T.ArrayType(T.FloatType(), False), False) for b in blobs]
        rows = self._inference(source, "features", blobs)
        df = self.spark.createDataFrame(rows, T.StructType(fields))
        if conf.persistent:
            df = df.persist()
        return df

    def _inference(self, source, mode, what):
        conf = source.conf
        sc = self.spark.sparkContext
        rdd, localizer = source.partitions(self.spark)
        layer = conf.data_layer(TEST).name  # the TEST net's data layer reads the source
        net = rewrite_net(conf.net_param(TEST), layer, TEST)
        _note_cpu_only(conf)
        model = sc.broadcast(storage.read_bytes(conf.model_uri, "model"))
        num = rdd.getNumPartitions()
        board = launch.progress_board(sc)
        pass_id = board.add(f"{mode} of {source.name}", num)
        task = _inference_task(
            net.SerializeToString(),
            layer,
            model,
            mode,
            what,
            localizer,
            num,
            (board.address, pass_id),
        )
        return rdd.mapPartitionsWithIndex(task)

    # --- writing -----------------------------------------------------------------------------
    @staticmethod
    def write_features(df, conf):
        """Write a features DataFrame to -output in -outputFormat (json or parquet); returns
        (uri, rows written). The rows are counted in the output (Parquet's footers, JSON's
        lines): counting `df` would run the net over the whole dataset a second time."""
        uri = check_output(df.sparkSession, conf)
        writer = df.write.mode("overwrite")
        reader = df.sparkSession.read
        if conf.outputFormat == "parquet":
            writer.parquet(uri)
            rows = reader.parquet(uri).count()
        else:
            writer.json(uri)
            rows = reader.text(uri).count()  # one JSON object per line
        log.info(
            "wrote %d rows of features (%s) to %s", rows, conf.outputFormat, storage.shown(uri)
        )
        return uri, rows


def _as_list(values):
    return list(values) if isinstance(values, (list, tuple, np.ndarray)) else [values]


def format_values(values):
    """A test output as CaffeOnSpark's result file writes it: "0.98", or "0.1,0.9" for a
    vector (the same text in the file, the job's output and the log)."""
    return ",".join(repr(float(v)) for v in _as_list(values))


def write_test_result(spark, result, conf):
    """Write a test result to -output as CaffeOnSpark did: one text file, a line per output
    blob ("accuracy: 0.98", a vector's values comma-separated). -output means what it means
    for -features (check_output); the file is never seen half-written: storage writes it
    where it is local, else Hadoop's filesystem (hdfs, s3a, ...) writes a hidden name and
    renames it into place. Returns the file's URI."""
    uri = check_output(spark, conf)
    lines = []
    for name, values in result.items():
        lines.append(f"{name}: {format_values(values)}")
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if storage.is_local(uri):  # Hadoop's local filesystem would add a .crc file beside it
        storage.write_bytes(uri, data)
    else:
        _hadoop_write(spark, uri, data)
    log.info("wrote the test result to %s", storage.shown(uri))
    return uri


def _hadoop_write(spark, uri, data):
    jvm = spark.sparkContext._jvm
    hadoop_fs = jvm.org.apache.hadoop.fs
    path = hadoop_fs.Path(uri)
    fs = path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    temp = hadoop_fs.Path(path.getParent(), f".{path.getName()}.{uuid.uuid4().hex}")
    out = fs.create(temp, True)
    try:
        out.write(bytearray(data))
    finally:
        out.close()
    if fs.exists(path):
        fs.delete(path, True)
    if not fs.rename(temp, path):
        fs.delete(temp, False)
        raise storage.StorageError(f"{storage.shown(uri)}: could not write it")


def check_output(spark, conf):
    """-output as Spark will write it, fully qualified: Spark writes it, so a path without a
    scheme means Spark's default filesystem (HDFS on most clusters, the driver's working
    folder locally), as for any DataFrame write. Fails here, before training or extracting,
    when Spark has no filesystem for the scheme."""
    if not conf.output:
        raise ConfigError("-output is not set")
    jvm = spark.sparkContext._jvm
    hadoop_conf = spark.sparkContext._jsc.hadoopConfiguration()
    hadoop_fs = jvm.org.apache.hadoop.fs
    path = hadoop_fs.Path(conf.output)
    given = path.toUri().getScheme()
    scheme = given or hadoop_fs.FileSystem.getDefaultUri(hadoop_conf).getScheme()
    try:
        hadoop_fs.FileSystem.getFileSystemClass(scheme, hadoop_conf)  # no I/O, just the class
    except Exception:  # noqa: BLE001 - py4j wraps Hadoop's UnsupportedFileSystemException
        raise ConfigError(
            f"-output {storage.shown(conf.output)}: Spark writes it and has no "
            f"filesystem for '{scheme}://' (on S3 use s3a:// with hadoop-aws on Spark's "
            "classpath; -model, -snapshot and -weights take s3:// through pyarrow)"
        ) from None
    if given and path.isAbsolute():
        return conf.output
    # Relative or without a scheme: qualified on the driver, as the writers will see it.
    return str(path.getFileSystem(hadoop_conf).makeQualified(path).toString())


def check_new_output(spark, conf):
    """check_output for a tool that writes a new table: -output must not exist yet (a table
    is never replaced)."""
    uri = check_output(spark, conf)
    if output_exists(spark, uri):
        raise ConfigError(f"-output {storage.shown(uri)} exists: remove it or choose another")
    return uri


def output_exists(spark, uri):
    """Whether a path Spark writes (see check_output) is there already."""
    sc = spark.sparkContext
    path = sc._jvm.org.apache.hadoop.fs.Path(uri)
    return bool(path.getFileSystem(sc._jsc.hadoopConfiguration()).exists(path))


def _note_cpu_only(conf):
    """Say so when the solver asks for the GPU: the workers compute on the CPU (NumPy) in this
    version, whatever solver_mode says (CaffeOnSpark's sample solvers say GPU)."""
    sp = conf.solver_param
    if sp.HasField("solver_mode") and sp.solver_mode == sp.GPU:
        log.warning(
            "%s: solver_mode GPU, but the workers of this version compute on the CPU", conf.conf
        )


def _note_local_model(sc, conf):
    """Warn when -model is a path on local disks and the executors may be other machines:
    rank 0 writes the model and snapshots on its own host (fine where every host shares the
    path, e.g. NFS; lost to the driver otherwise)."""
    master = launch.spark_master(sc)
    if storage.is_local(conf.model_uri) and not master.startswith("local"):
        log.warning(
            "-model %s is a local path and the master is %s: rank 0 writes the model and its "
            "snapshots on its executor's own disk, which the driver and later jobs see only if "
            "every host shares that path; otherwise use hdfs:// (or s3://)",
            storage.shown(conf.model_uri),
            master,
        )


def _check_model_seen(model, host):
    """After training: say where the model is when rank 0 wrote it on a local path that this
    driver does not see (another host's disk)."""
    if storage.is_local(model) and not os.path.exists(storage.local_path(model)):
        log.warning(
            "rank 0 wrote the model on host %s at %s, a path this driver (host %s) does not "
            "see: copy it from there, and give -model an hdfs:// (or s3://) URI or a shared "
            "path next time",
            host,
            storage.shown(model),
            socket.gethostname(),
        )


def validation_frame(spark, rows):
    """The validation rows of a training run as a DataFrame (iteration + output columns)."""
    from pyspark.sql import types as T

    names = list(rows[0]["outputs"]) if rows else []
    fields = [T.StructField("iteration", T.IntegerType(), False)]
    for name in names:
        vector = isinstance(rows[0]["outputs"][name], list)
        kind = T.ArrayType(T.DoubleType(), False) if vector else T.DoubleType()
        fields.append(T.StructField(name, kind, False))
    data = [(r["iteration"], *[r["outputs"][n] for n in names]) for r in rows]
    return spark.createDataFrame(data, T.StructType(fields))


def _check_blobs(conf, names):
    """Fail on the driver when a requested blob is not produced by the TEST net."""
    net = conf.net_param(TEST)
    tops = {t for lp in net.layer for t in lp.top}
    missing = [n for n in names if n not in tops]
    if missing:
        raise ConfigError(
            f"{conf.conf}: the TEST net {net.name!r} has no blob(s) {', '.join(missing)} "
            f"(blobs: {', '.join(sorted(tops))})"
        )


def _ensure_log_handler():
    """Progress goes to the 'caffeonspark' logger; show it when nothing is configured."""
    logger = logging.getLogger("caffeonspark")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s caffeonspark] %(message)s"))
        logger.addHandler(handler)


# --- the inference task (runs in an executor) ----------------------------------------------------


class KeyedSource(RecordSource):
    """Wraps a RecordSource and remembers the keys of the records read, in order, so each
    batch's rows can be named."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.keys = collections.deque()
        self.resize_images = getattr(inner, "resize_images", False)  # for a CoSData layer

    def one_pass(self):
        for key, value in self.inner.one_pass():
            self.keys.append(key)
            yield key, value

    def __len__(self):
        return len(self.inner)

    def close(self):
        self.inner.close()


def _inference_task(net_bytes, layer, model, mode, what, localizer, num, progress_to=None):
    """mapPartitionsWithIndex function: the engine over one partition's records, reporting
    how far it is to the driver's ProgressBoard at `progress_to` (address, pass id)."""

    def task(index, items):
        address, pass_id = progress_to or (None, None)
        progress = launch.record_reporter(address, pass_id, index)
        progress(0)
        try:
            with partition_source(localizer, items, index, num, mode) as source:
                if len(source):
                    yield from run_inference(
                        net_bytes, layer, model.value, source, mode, what, progress
                    )
                progress(len(source), final=True)
        finally:
            progress(None)

    return task


def run_inference(net_bytes, layer, model_bytes, source, mode, what, progress=None):
    """Forward every record of `source` once through the TEST net: full batches, then one
    net of the remainder's size for the last partial batch. Yields feature rows (mode
    'features') or (output, sums, rows) per output blob (mode 'test'); calls progress(records
    run so far) after each batch."""
    from engine.layers.data_layers import set_source_factory
    from engine.net import Net
    from engine.proto import caffe_pb2

    net_param = caffe_pb2.NetParameter.FromString(net_bytes)
    weights = caffe_pb2.NetParameter.FromString(model_bytes)
    batch = next(layer_batch_size(lp) for lp in net_param.layer if lp.name == layer)
    keyed = KeyedSource(source)
    factory = SourceFactory()
    factory.add(layer, TEST, keyed)
    previous = factory.install()
    sums, counts, order = {}, collections.Counter(), []
    try:
        total = len(source)
        full, rem = divmod(total, batch)
        plan = [(batch, full), (rem, 1 if rem else 0)]
        shared = None
        done = 0
        for size, times in plan:
            if not times:
                continue
            param = rewrite_net(net_param, layer, TEST, batch_size=size, prefetch=0)
            net = Net(param, phase=TEST, name_hint=f"TEST net (batch {size})")
            if shared is None:
                net.copy_from(weights)
                shared = net
            else:
                net.share_trained_layers_with(shared)
            for _ in range(times):
                net.forward_from_to()
                keys = [keyed.keys.popleft() for _ in range(size)]
                if mode == "features":
                    yield from _feature_rows(net, keys, what)
                else:
                    _accumulate(net, size, sums, counts, order)
                done += size
                if progress is not None:
                    progress(done)
    finally:
        set_source_factory(previous)
    if mode == "test":
        for name in order:
            yield name, sums[name].tolist(), counts[name]


def _sequence_lengths(net):
    """T of every transposed (T x N) CoSData top: blobs computed from one (Embed, LSTM)
    keep that T x N order, so their records lie along axis 1."""
    from engine.layers.cos_data import CoSData

    return {
        t.out_shape[0]
        for layer in net.layers
        if isinstance(layer, CoSData)
        for t in layer.tops
        if t.transpose
    }


def _by_record(name, arr, n, lengths):
    """`arr` with its records along axis 0: as it is (N x ...), or swapped from a transposed
    top's T x N x ... order (record i is arr[:, i], in time order); None for a batch-level
    blob (a loss, an accuracy)."""
    per_record = arr.ndim >= 1 and arr.shape[0] == n
    time_major = arr.ndim >= 2 and arr.shape[1] == n and arr.shape[0] in lengths
    if per_record and time_major:
        raise SourceError(
            f"blob {name!r} has shape {arr.shape}: its first axis could be the batch or "
            f"the sequences of a transposed top (both {n} long); give the data layer a "
            "batch_size other than the sequence length"
        )
    if time_major:
        return arr.swapaxes(0, 1)
    return arr if per_record else None


def _feature_rows(net, keys, blobs):
    from engine.backend import to_numpy

    n = len(keys)
    lengths = _sequence_lengths(net)
    arrays = []
    for name in blobs:
        arr = to_numpy(net.blobs[name].data)
        rec = _by_record(name, arr, n, lengths)
        if rec is None:
            raise SourceError(
                f"blob {name!r} has shape {arr.shape}: not one row per record (batch of {n}); "
                "-features takes per-record blobs"
            )
        arrays.append(rec.reshape(n, -1))
    for i, key in enumerate(keys):
        yield (key_text(key), *(a[i].tolist() for a in arrays))


def _accumulate(net, n, sums, counts, order):
    """Add a batch's outputs: per-record outputs summed over records, batch-level outputs
    (loss, accuracy: means over the batch) weighted by the batch's record count."""
    from engine.backend import to_numpy

    lengths = _sequence_lengths(net)
    for name in net.outputs:
        arr = np.asarray(to_numpy(net.blobs[name].data), dtype=np.float64)
        rec = _by_record(name, arr, n, lengths)
        if rec is not None and n > 1:
            total = rec.reshape(n, -1).sum(axis=0)
        else:
            total = arr.reshape(-1) * n
        if name not in sums:
            sums[name] = np.zeros_like(total)
            order.append(name)
        sums[name] += total
        counts[name] += n


__all__ = ["CaffeOnSpark", "DataSource", "TrainSummary", "validation_frame"]
