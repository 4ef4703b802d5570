"""CaffeOnSpark on a real local Spark cluster (local-cluster[2,1,1024]: two executor JVMs of
one core) with real MPI: training end to end, 2 ranks x batch B == 1 rank x batch 2B, resume,
validation, test, features (partial last batch), DataFrame and image sources, fast failures.
"""

import io
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from s3server import local_s3
from test_spark_config import load_job

from caffeonspark import CaffeOnSpark, Config, ConfigError, DataSource, LaunchError, SourceError
from caffeonspark.sources.sequence import KEY_CLASS, VALUE_CLASS, encode_key
from engine.data import LMDBWriter, array_to_datum
from engine.proto import caffe_pb2

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.xdist_group("spark")]

REPO = Path(__file__).resolve().parents[1]
LENET = REPO / "conf" / "lenet" / "lenet_train_test.prototxt"


# --- data and configuration --------------------------------------------------------------------


def digits(n, split="train", offset=0):
    d = np.load(REPO / "data" / "digits.npz")
    return d[f"{split}_images"][offset : offset + n], d[f"{split}_labels"][offset : offset + n]


def write_lmdb(path, images, labels):
    with LMDBWriter(str(path)) as db:
        for i, (img, lab) in enumerate(zip(images, labels)):
            db.put(f"{i:08d}", array_to_datum(img[None], int(lab)).SerializeToString())
    return str(path)


def lmdb_keys(path):
    from engine.data.lmdb_io import read_all

    return [k.decode() for k, _ in read_all(path)]


def write_solver(folder, train_source, test_source, train_batch, test_batch=10, **solver):
    """A LeNet solver + net in `folder` reading the given sources."""
    net = caffe_pb2.NetParameter()
    text_format.Parse(LENET.read_text(), net)
    for lp in net.layer:
        if lp.type == "Data":
            train = lp.include[0].phase == caffe_pb2.TRAIN
            lp.data_param.source = str(train_source if train else test_source)
            lp.data_param.batch_size = train_batch if train else test_batch
    net_path = Path(folder) / "net.prototxt"
    net_path.write_text(text_format.MessageToString(net))
    param = caffe_pb2.SolverParameter()
    text_format.Parse(
        f"""net: "{net_path}" base_lr: 0.01 momentum: 0.9 weight_decay: 0.0005
        lr_policy: "inv" gamma: 0.0001 power: 0.75 display: 2 max_iter: 10
        snapshot_prefix: "{folder}/lenet" random_seed: 1701 type: "SGD" """,
        param,
    )
    for key, value in solver.items():
        field = getattr(param, key)
        if hasattr(field, "extend"):
            field.extend(value if isinstance(value, list) else [value])
        else:
            setattr(param, key, value)
    path = Path(folder) / "solver.prototxt"
    path.write_text(text_format.MessageToString(param))
    return str(path)


def write_lenet(folder, data_layer, solver=""):
    """LeNet in `folder` with each Data layer (data_param cleared) rewritten in place by
    data_layer(lp), and a solver over it with `solver` settings added; returns its path."""
    net = caffe_pb2.NetParameter()
    text_format.Parse(LENET.read_text(), net)
    for lp in net.layer:
        if lp.type == "Data":
            lp.ClearField("data_param")
            data_layer(lp)
    (folder / "net.prototxt").write_text(text_format.MessageToString(net))
    path = folder / "solver.prototxt"
    path.write_text(f'net: "{folder}/net.prototxt" base_lr: 0.01 lr_policy: "fixed" {solver}')
    return str(path)


def model_weights(path):
    net = caffe_pb2.NetParameter.FromString(Path(path).read_bytes())
    return {
        f"{lp.name}/{i}": np.asarray(b.data, dtype=np.float32)
        for lp in net.layer
        for i, b in enumerate(lp.blobs)
    }


def start_spark(app, **conf):
    """A local-cluster[2,1,1024] session: two executor JVMs of one core, as CI has."""
    from pyspark.sql import SparkSession

    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    builder = (
        SparkSession.builder.master("local-cluster[2,1,1024]")
        .appName(app)
        .config("spark.executorEnv.PYTHONPATH", str(REPO))
        .config("spark.executorEnv.OMP_NUM_THREADS", "1")
        .config("spark.executorEnv.OPENBLAS_NUM_THREADS", "1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "4")
    )
    for key, value in conf.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session


@pytest.fixture(scope="module")
def spark():
    session = start_spark(
        "caffeonspark-tests",
        **{"spark.stage.maxConsecutiveAttempts": "1", "spark.task.maxFailures": "1"},
    )
    yield session
    session.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """LMDBs: 160 training digits (two shards of 80 = 5 batches of 16), the same records
    interleaved for one rank with batch 32, and 103 test digits (partial batches)."""
    root = tmp_path_factory.mktemp("digits")
    images, labels = digits(160)
    train = write_lmdb(root / "train_lmdb", images, labels)
    order = []
    for i in range(5):  # 1 rank x 32 == rank 0's 16 + rank 1's 16 of each iteration
        order += list(range(16 * i, 16 * i + 16)) + list(range(80 + 16 * i, 80 + 16 * i + 16))
    interleaved = write_lmdb(root / "interleaved_lmdb", images[order], labels[order])
    timages, tlabels = digits(103, "test")
    test = write_lmdb(root / "test_lmdb", timages, tlabels)
    return {"root": root, "train": train, "interleaved": interleaved, "test": test}


@pytest.fixture(scope="module")
def trained(spark, data):
    """A 2-rank run of 10 iterations with snapshots every 5 (shared by several tests)."""
    folder = data["root"] / "run2"
    folder.mkdir()
    solver = write_solver(folder, data["train"], data["test"], 16, snapshot=5)
    conf = Config(spark, conf=solver, model=str(folder / "model" / "lenet.caffemodel"))
    t = time.monotonic()
    summary = CaffeOnSpark(spark).train(DataSource.get(conf, is_train=True))
    return {"conf": conf, "summary": summary, "folder": folder, "seconds": time.monotonic() - t}


# --- training ------------------------------------------------------------------------------------


def test_train_end_to_end(trained):
    s = trained["summary"]
    folder = trained["folder"] / "model"
    assert s.ranks == 2 and s.iterations == 10 and s.final_iter == 10
    assert os.path.isfile(folder / "lenet.caffemodel")
    assert {"lenet_iter_5.solverstate", "lenet_iter_10.caffemodel"} <= set(os.listdir(folder))
    assert not [n for n in os.listdir(folder) if n.startswith(".")], "temp files left behind"
    assert len(s.losses) == 10 and s.losses[-1] < s.losses[0]
    assert s.images_per_s > 0 and s.startup_s < 60
    state = caffe_pb2.SolverState.FromString((folder / "lenet_iter_5.solverstate").read_bytes())
    assert state.iter == 5 and state.learned_net == "lenet_iter_5.caffemodel"
    # The driver's metrics file (JSON lines): the events as they came, then the summary.
    records = [json.loads(line) for line in (folder / "lenet_metrics.jsonl").open()]
    assert all(r["time"] > 0 and r.get("attempt", 1) == 1 for r in records)
    assert [r["iter"] for r in records if r["kind"] == "snapshot"] == [5, 10]
    progress = [r for r in records if r["kind"] == "progress"]
    assert progress[0]["iter"] == 0 and progress[-1]["iter"] == 9
    assert all(r["loss"] > 0 and r["max_iter"] == 10 for r in progress)
    assert records[-1]["kind"] == "summary"
    assert (records[-1]["final_iter"], records[-1]["ranks"]) == (10, 2)


def test_two_ranks_match_one_rank_with_double_batch(spark, data, trained):
    folder = data["root"] / "run1"
    folder.mkdir()
    solver = write_solver(folder, data["interleaved"], data["test"], 32)
    conf = Config(spark, conf=solver, model=str(folder / "lenet.caffemodel"), clusterSize=1)
    one = CaffeOnSpark(spark).train(DataSource.get(conf, is_train=True))
    assert one.ranks == 1
    np.testing.assert_allclose(one.losses, trained["summary"].losses, rtol=1e-4, atol=1e-5)
    two = model_weights(trained["summary"].model)
    for name, w in model_weights(one.model).items():
        np.testing.assert_allclose(w, two[name], rtol=1e-4, atol=2e-6, err_msg=name)


@pytest.mark.parametrize("form", ["caffe", "caffeonspark"])
def test_resume_from_snapshot_continues(spark, data, trained, form):
    # Each shard is 5 batches, so a run restarted at iteration 5 sees the batches of
    # iterations 5..9 again: resuming must reproduce the uninterrupted run. Caffe's form
    # takes the weights the .solverstate names; CaffeOnSpark's `-snapshot S -weights M` takes
    # M's, so there the state is copied alone and names a model that is nowhere.
    folder = data["root"] / f"resumed_{form}"
    folder.mkdir()
    model = trained["folder"] / "model"
    snap, weights = model / "lenet_iter_5.solverstate", None
    if form == "caffeonspark":
        state = caffe_pb2.SolverState.FromString(snap.read_bytes())
        state.learned_net = "gone_iter_5.caffemodel"
        snap = folder / snap.name
        snap.write_bytes(state.SerializeToString())
        weights = f"file:{model / 'lenet_iter_5.caffemodel'}"
    conf = Config(
        spark,
        conf=trained["conf"].conf,
        model=str(folder / "lenet.caffemodel"),
        snapshot=f"file://{snap}",
        weights=weights,
    )
    s = CaffeOnSpark(spark).train(DataSource.get(conf, is_train=True))
    assert s.iterations == 5 and s.final_iter == 10
    np.testing.assert_allclose(s.losses, trained["summary"].losses[5:], rtol=1e-4, atol=1e-5)
    ref = model_weights(trained["summary"].model)
    for name, w in model_weights(s.model).items():
        np.testing.assert_allclose(w, ref[name], rtol=1e-4, atol=2e-6, err_msg=name)


PY_RELU = """
import numpy as np

import engine as caffe


class PyReLU(caffe.Layer):
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        np.maximum(bottom[0].data, 0, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff * (top[0].data > 0)
"""


def test_python_layer_shipped_with_py_files(spark, data, trained, tmp_path):
    # LeNet with relu1 as a Python layer whose module reaches the executors only through
    # addPyFile (spark-submit --py-files): it must train exactly like the built-in ReLU.
    module = tmp_path / "shipped_relu_layer.py"
    module.write_text(PY_RELU)
    spark.sparkContext.addPyFile(str(module))
    solver = write_solver(tmp_path, data["train"], data["test"], 16)
    net = caffe_pb2.NetParameter()
    text_format.Parse((tmp_path / "net.prototxt").read_text(), net)
    (relu,) = [lp for lp in net.layer if lp.type == "ReLU"]
    relu.type = "Python"
    relu.python_param.module, relu.python_param.layer = "shipped_relu_layer", "PyReLU"
    (tmp_path / "net.prototxt").write_text(text_format.MessageToString(net))
    conf = Config(spark, conf=solver, model=str(tmp_path / "lenet.caffemodel"))
    s = CaffeOnSpark(spark).train(DataSource.get(conf, is_train=True))
    np.testing.assert_allclose(s.losses, trained["summary"].losses, rtol=1e-5, atol=1e-6)
    ref = model_weights(trained["summary"].model)
    for name, w in model_weights(s.model).items():
        np.testing.assert_allclose(w, ref[name], rtol=1e-5, atol=1e-7, err_msg=name)
    feats = Config(spark, conf=solver, model=s.model, features="ip2")
    assert CaffeOnSpark(spark).features(DataSource.get(feats, is_train=False)).count() == 103


def test_train_with_validation(spark, data):
    folder = data["root"] / "validated"
    folder.mkdir()
    solver = write_solver(
        folder, data["train"], data["test"], 16, max_iter=6, test_iter=[2], test_interval=3
    )
    conf = Config(spark, conf=solver, model=str(folder / "lenet.caffemodel"))
    df = CaffeOnSpark(spark).trainWithValidation(
        DataSource.get(conf, is_train=True), DataSource.get(conf, is_train=False)
    )
    rows = df.orderBy("iteration").collect()
    assert [r.iteration for r in rows] == [0, 3, 6]
    assert set(df.columns) == {"iteration", "accuracy", "loss"}
    assert all(0.0 <= r.accuracy <= 1.0 for r in rows)


# --- test and features ---------------------------------------------------------------------------


def local_outputs(solver, model, test_lmdb, count):
    """Every test record through the TEST net in one batch, on the driver (the reference)."""
    from engine.net import Net

    conf = Config(conf=solver)
    param = conf.net_param(caffe_pb2.TEST)
    for lp in param.layer:
        if lp.type == "Data":
            lp.data_param.batch_size = count
            lp.data_param.source = test_lmdb
    net = Net(param, phase=caffe_pb2.TEST, weights=model)
    net.forward()
    return {k: v.data.copy() for k, v in net.blobs.items()}


def test_lmdb_model_and_snapshots_on_s3(spark, data):
    # The s3:// branch of storage is pyarrow's filesystem layer, the one hdfs:// uses too.
    with local_s3() as s3:
        s3.upload_folder(data["train"], "data/train_lmdb")
        folder = data["root"] / "s3run"
        folder.mkdir()
        solver = write_solver(
            folder, s3.uri("data/train_lmdb"), data["test"], 16, max_iter=4, snapshot=2
        )
        model = s3.uri("model/lenet.caffemodel")
        conf = Config(spark, conf=solver, model=model)
        s = CaffeOnSpark(spark).train(DataSource.get(conf, is_train=True))
        assert (s.final_iter, s.model) == (4, model)
        assert s3.names("model") == [
            "lenet.caffemodel",
            "lenet_iter_2.caffemodel",
            "lenet_iter_2.solverstate",
            "lenet_iter_4.caffemodel",
            "lenet_iter_4.solverstate",
            "lenet_metrics.jsonl",
            "lenet_snapshots.json",
        ]
        conf = Config(spark, conf=solver, model=model, features="ip2")
        df = CaffeOnSpark(spark).features(DataSource.get(conf, is_train=False))
        assert df.count() == 103
        resumed = Config(
            spark,
            conf=solver,
            model=s3.uri("resumed/lenet.caffemodel"),
            snapshot=s3.uri("model/lenet_iter_2.solverstate"),
        )
        again = CaffeOnSpark(spark).train(DataSource.get(resumed, is_train=True))
        assert (again.iterations, again.final_iter) == (2, 4)
        assert "lenet.caffemodel" in s3.names("resumed")


def test_features_one_row_per_record(spark, data, trained, caplog):
    model = trained["summary"].model
    conf = Config(
        spark, conf=trained["conf"].conf, model=model, features="ip2,ip1", lmdb_partitions=2
    )
    source = DataSource.get(conf, is_train=False)
    df = CaffeOnSpark(spark).features(source)
    rows = df.collect()
    assert df.columns == ["SampleID", "ip2", "ip1", "label"]
    assert len(rows) == source.count() == 103  # 2 partitions of 52 + 51: both end partially
    keys = lmdb_keys(data["test"])
    assert sorted(r.SampleID for r in rows) == keys
    ref = local_outputs(trained["conf"].conf, model, data["test"], 103)
    by_key = {r.SampleID: r for r in rows}
    for i, key in enumerate(keys):
        row = by_key[key]
        assert len(row.ip1) == 500
        np.testing.assert_allclose(row.ip2, ref["ip2"][i], rtol=1e-4, atol=1e-4)
        assert row.label == [ref["label"][i]]  # a one-element array, as CaffeOnSpark's
    # The driver heard every partition finish: one line with the whole count.
    assert re.search(r"features of layer 'mnist' \(Data, TEST\): 103 records in", caplog.text)


def test_features_of_the_training_records(spark, data, trained):
    conf = Config(spark, conf=trained["conf"].conf, model=trained["summary"].model, features="ip2")
    df = CaffeOnSpark(spark).features(DataSource.get(conf, is_train=True))  # TEST net, train data
    assert df.count() == 160 and df.select("SampleID").distinct().count() == 160


def test_test_returns_dataset_means(spark, data, trained):
    model = trained["summary"].model
    conf = Config(spark, conf=trained["conf"].conf, model=model, lmdb_partitions=3)
    result = CaffeOnSpark(spark).test(DataSource.get(conf, is_train=False))
    ref = local_outputs(trained["conf"].conf, model, data["test"], 103)
    # CaffeOnSpark's shape: {blob: a list of per-element means}, a list even for scalars.
    assert set(result) == {"accuracy", "loss"}
    assert result["accuracy"] == pytest.approx([float(ref["accuracy"])], abs=1e-6)
    assert result["loss"] == pytest.approx([float(ref["loss"])], rel=1e-4)


def test_lmdbs_shipped_as_archives(spark, data, tmp_path):
    """LMDBs on no shared path, shipped with the job as `spark-submit --archives` does: the
    prototxt names them by folder name only, and driver and executors find Spark's copies."""
    import tarfile

    train_tgz = tmp_path / "shipped_train_lmdb.tgz"  # one folder inside
    with tarfile.open(train_tgz, "w:gz") as tar:
        tar.add(data["train"], arcname="shipped_train_lmdb")
    test_tgz = tmp_path / "digits.tgz"  # the LMDB's files, unpacked under the #name
    with tarfile.open(test_tgz, "w:gz") as tar:
        for name in os.listdir(data["test"]):
            tar.add(os.path.join(data["test"], name), arcname=name)
    spark.sparkContext.addArchive(str(train_tgz))
    spark.sparkContext.addArchive(f"{test_tgz}#shipped_test_lmdb")
    folder = tmp_path / "run"
    folder.mkdir()
    solver = write_solver(folder, "shipped_train_lmdb", "shipped_test_lmdb", 16, max_iter=4)
    assert not os.path.exists("shipped_train_lmdb") and not os.path.exists("shipped_test_lmdb")
    conf = Config(spark, conf=solver, model=str(folder / "lenet.caffemodel"))
    s = CaffeOnSpark(spark).train(DataSource.get(conf, is_train=True))
    assert s.ranks == 2 and s.final_iter == 4
    conf = Config(spark, conf=solver, model=s.model, features="ip2", lmdb_partitions=2)
    rows = CaffeOnSpark(spark).features(DataSource.get(conf, is_train=False)).collect()
    assert sorted(r.SampleID for r in rows) == lmdb_keys(data["test"])


def test_write_features_parquet(spark, data, trained):
    out = data["root"] / "features.parquet"
    conf = Config(
        spark,
        conf=trained["conf"].conf,
        model=trained["summary"].model,
        features="ip2",
        output=str(out),
        outputFormat="parquet",
    )
    cos = CaffeOnSpark(spark)
    uri, rows = cos.write_features(cos.features(DataSource.get(conf, is_train=False)), conf)
    assert rows == spark.read.parquet(uri).count() == 103


def test_binary2dataframe_reads_every_listed_file(spark, trained, tmp_path, capsys):
    """CaffeOnSpark's Binary2DataFrame: '<file> <label> <id>' lines (one without an id, a
    file in a subfolder) -> SampleID, label, the file's bytes; a data layer tests on the
    table; a missing file fails the job naming its line."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    images, labels = digits(25, "test")
    lines = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        name = f"sub/d{i}.png" if i % 5 == 0 else f"d{i}.png"
        (root / name).write_bytes(png_bytes(img))
        lines.append(f"{name} {int(lab)}" + ("" if i == 3 else f" id{i}"))
    (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n\n")
    job = load_job("binary2dataframe")
    table = tmp_path / "images.parquet"
    argv = ["-imageRoot", str(root), "-labelFile", str(tmp_path / "labels.txt")]
    args = job.parse(argv + ["-output", str(table), "-lmdb_partitions", "3"])
    assert job.run(args, spark) == 0
    assert "25 files of " in capsys.readouterr().out
    rows = {r.SampleID: r for r in spark.read.parquet(str(table)).collect()}
    ids = [f"id{i}" if i != 3 else "d3.png" for i in range(25)]
    assert sorted(rows) == sorted(ids)
    assert [rows[i].label for i in ids] == [int(x) for x in labels]
    assert rows["id5"].data == (root / "sub" / "d5.png").read_bytes()

    folder = tmp_path / "test_on_table"
    folder.mkdir()
    solver = write_solver(folder, table, table, 16, test_batch=10)
    conf = Config(spark, conf=solver, model=str(trained["summary"].model), clusterSize=2)
    conf.test = True
    assert 0 <= CaffeOnSpark(spark).test(DataSource.get(conf, False))["accuracy"][0] <= 1

    (root / "d7.png").unlink()
    args = job.parse(argv + ["-output", str(tmp_path / "again.parquet")])
    with pytest.raises(Exception, match=r"d7.png: cannot read image.*labels.txt:8"):
        job.run(args, spark)


def test_binary2dataframe_label_list_errors_name_the_line():
    from caffeonspark.export import parse_label_list

    assert parse_label_list("a.png 1 x\n\nb.png 2\n", "l") == [
        ("a.png", 1, "x", 1),
        ("b.png", 2, "b.png", 3),
    ]
    with pytest.raises(SourceError, match=r"l:2: expected '<file> <label> <id>', got 'b.png two'"):
        parse_label_list("a.png 1\nb.png two\n", "l")
    with pytest.raises(SourceError, match="names no file"):
        parse_label_list("\n", "l")


def test_lmdb2dataframe_keeps_every_record(spark, data, trained, tmp_path, capsys):
    """CaffeOnSpark's LMDB2DataFrame: each record one row (raw pixels, an encoded image,
    float_data, a non-UTF-8 key), 3 partitions, a table that tests as the LMDB does."""
    from test_spark_sources import mixed_records

    from engine.data.lmdb_io import read_all

    lmdb = tmp_path / "mixed_lmdb"
    images, labels = digits(103, "test")
    with LMDBWriter(str(lmdb)) as db:
        for i, (img, lab) in enumerate(zip(images, labels)):
            db.put(f"{i:08d}", array_to_datum(img[None], int(lab)).SerializeToString())
        for key, datum in mixed_records():
            db.put(key, datum.SerializeToString())
    job = load_job("lmdb2dataframe")
    table = tmp_path / "mixed.parquet"
    args = job.parse(["-imageRoot", f"file:{lmdb}", "-output", str(table), "-lmdb_partitions", "3"])
    assert job.run(args, spark) == 0
    assert f"107 records of file://{lmdb} written to file:{table}" in capsys.readouterr().out
    rows = {r.SampleID: r for r in spark.read.parquet(str(table)).collect()}
    expected = {
        key.decode() if key != b"\xff\x01" else key.hex(): caffe_pb2.Datum.FromString(v)
        for key, v in read_all(str(lmdb))
    }
    assert sorted(rows) == sorted(expected) and len(rows) == 107
    assert rows["00000007"].data == images[7].tobytes() and rows["00000007"].label == labels[7]
    assert rows["png"].encoded and rows["float"].channels is None
    with pytest.raises(ConfigError, match="mixed.parquet exists: remove it"):
        job.run(args, spark)

    # A data layer reads the table back (ORC, in a folder named without a suffix): tested, it
    # gives what the LMDB gives.
    digits_table = tmp_path / "test_table"
    args = job.parse(
        ["-imageRoot", data["test"], "-output", str(digits_table)] + ["-outputFormat", "orc"]
    )
    assert job.run(args, spark) == 0
    model = str(trained["summary"].model)
    results = []
    for name, source in (("from_lmdb", data["test"]), ("from_table", digits_table)):
        folder = tmp_path / name
        folder.mkdir()
        conf = Config(spark, conf=write_solver(folder, data["train"], source, 16), model=model)
        results.append(CaffeOnSpark(spark).test(DataSource.get(conf, is_train=False)))
    assert results[0]["accuracy"] == pytest.approx(results[1]["accuracy"], abs=1e-6)
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)


def test_conversion_jobs_write_caffeonspark_sequence_files(spark, data, trained, tmp_path, capsys):
    """-outputFormat sequence: LMDB2Sequence (Tuple6 keys) and Binary2Sequence (Tuple2 keys),
    keys byte for byte what the JVM serializes; a net tests on the sequence file as on the
    LMDB it came from."""
    seq = str(tmp_path / "test_seq")
    job = load_job("lmdb2dataframe")
    args = job.parse(["-imageRoot", data["test"], "-output", seq, "-outputFormat", "sequence"])
    assert job.run(args, spark) == 0
    assert "103 records of " in capsys.readouterr().out
    sc = spark.sparkContext
    pairs = {bytes(k): bytes(v) for k, v in sc.sequenceFile(seq, KEY_CLASS, VALUE_CLASS).collect()}
    images, labels = digits(103, "test")
    tuple2, tuple6 = spark._jvm.scala.Tuple2, spark._jvm.scala.Tuple6
    key = java_serialized(spark, tuple6("00000005", str(labels[5]), 1, 28, 28, False))
    assert pairs[key] == images[5].tobytes() and len(pairs) == 103
    # past Integer's cache the JVM writes each int as its own object: so does encode_key
    big = java_serialized(spark, tuple6("k", "1", 3, 256, 256, True))
    assert encode_key("k", 1, 3, 256, 256, True) == big

    def memory_data(lp):
        lp.type = "MemoryData"
        text_format.Merge(
            f"""source_class: "com.yahoo.ml.caffe.SeqImageDataSource"
            memory_data_param {{ source: "{seq}" batch_size: 10
            channels: 1 height: 28 width: 28 }}""",
            lp,
        )

    model = str(trained["summary"].model)
    folder = tmp_path / "on_seq"
    folder.mkdir()
    conf = Config(spark, conf=write_lenet(folder, memory_data), model=model)
    on_seq = CaffeOnSpark(spark).test(DataSource.get(conf, is_train=False))
    conf = Config(spark, conf=trained["conf"].conf, model=model)
    on_lmdb = CaffeOnSpark(spark).test(DataSource.get(conf, is_train=False))
    assert on_seq["accuracy"] == pytest.approx(on_lmdb["accuracy"], abs=1e-6)
    assert on_seq["loss"] == pytest.approx(on_lmdb["loss"], rel=1e-5)

    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        (root / f"d{i}.png").write_bytes(png_bytes(images[i]))
    (tmp_path / "labels.txt").write_text("".join(f"d{i}.png {labels[i]}\n" for i in range(3)))
    job = load_job("binary2dataframe")
    out = str(tmp_path / "files_seq")
    argv = ["-imageRoot", str(root), "-labelFile", str(tmp_path / "labels.txt"), "-output", out]
    assert job.run(job.parse(argv + ["-outputFormat", "sequence"]), spark) == 0
    pairs = {bytes(k): bytes(v) for k, v in sc.sequenceFile(out, KEY_CLASS, VALUE_CLASS).collect()}
    key = java_serialized(spark, tuple2("d1.png", str(labels[1])))
    assert pairs[key] == (root / "d1.png").read_bytes() and len(pairs) == 3


def test_coco2dataframe_makes_the_captioning_table(spark, tmp_path, capsys):
    """CaffeOnSpark's CocoDataSetConverter: captions joined to their images, the vocabulary
    (UNK, then by count), the caption arrays; a CoSData net reads the table; a second run
    reuses the vocabulary; an unreadable image fails naming its row."""
    import engine
    from caffeonspark.captions import Conversions, DFConversions, Vocab

    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(3)
    pixels = {name: rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for name in "ab"}
    for name, img in pixels.items():
        (root / f"{name}.png").write_bytes(png_bytes(img))
    coco = {
        "images": [
            {"id": i, "height": 8, "width": 8, "file_name": f"{n}.png", "flickr_url": f"f/{n}"}
            for i, n in ((1, "a"), (2, "b"))
        ],
        "annotations": [
            {"image_id": 1, "id": 11, "caption": "A dog runs."},
            {"image_id": 1, "id": 12, "caption": "A dog."},
            {"image_id": 2, "id": 21, "caption": "Two cats sleep on a bed."},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco, indent=1))
    job = load_job("coco2dataframe")
    out = tmp_path / "out"
    argv = ["-imageRoot", str(root), "-captionFile", str(tmp_path / "captions.json")]
    argv += ["-output", str(out), "-captionLength", "5"]
    args = job.parse(argv + ["-vocabSize", "4", "-imageCaptionDFDir", "captions"])
    assert job.run(args, spark) == 0
    assert "3 rows of " in capsys.readouterr().out
    sc = spark.sparkContext
    assert sc.textFile(str(out / "vocab")).collect() == ["UNK", "a", "dog", "bed", "cats"]
    table = {r.id: r for r in spark.read.json(str(out / "captions")).collect()}
    assert table[21].caption == "Two cats sleep on a bed." and table[21].url == "f/b"
    rows = {r.id: r for r in spark.read.parquet(str(out / "embedding")).collect()}
    assert sorted(rows) == ["11", "12", "21"]
    assert rows["11"].input_sentence == [0, 1, 2, 1, -1]  # "runs" is unknown: 1
    assert rows["11"].cont_sentence == [0, 1, 1, 1, -1]
    assert rows["11"].target_sentence == [1, 2, 1, 0, -1]
    assert rows["21"].input_sentence == [0, 1, 4, 1, 1]  # 4 of its 6 words fit
    assert rows["21"].target_sentence == [1, 4, 1, 1, 0]
    assert rows["21"].data.image == (root / "b.png").read_bytes()
    assert (rows["21"].data.height, rows["21"].data.width, rows["21"].label) == (8, 8, 0)

    # The LRCN data layer (CaffeOnSpark's lrcn_cos.prototxt tops) reads the table.
    tops = (
        'top { name: "data" type: ENCODED_IMAGE_WITH_DIM channels: 3 height: 8 width: 8 } '
        'top { name: "input_sentence" type: INT_ARRAY channels: 5 sample_num_axes: 1 '
        "transpose: true }"
    )
    text = f"""layer {{ name: "d" type: "CoSData" top: "data" top: "input_sentence"
      source_class: "com.yahoo.ml.caffe.DataFrameSource"
      cos_data_param {{ source: "{out / "embedding"}" batch_size: 3 {tops} }} }}"""
    net = engine.Net(text_format.Parse(text, caffe_pb2.NetParameter()), phase=engine.TEST)
    net.forward()
    assert net.blobs["input_sentence"].data.shape == (5, 3)
    assert net.blobs["data"].data.shape == (3, 3, 8, 8)

    # ...and an LRCN (lrcn_cos.prototxt's layout, small) trains on it on 2 ranks.
    sentence = "type: INT_ARRAY channels: 5 sample_num_axes: 1 transpose: true"
    lrcn = f"""name: "lrcn"
      layer {{ name: "data" type: "CoSData" top: "data" top: "label" top: "cont_sentence"
        top: "input_sentence" top: "target_sentence"
        source_class: "com.yahoo.ml.caffe.DataFrameSource"
        cos_data_param {{ source: "{out / "embedding"}" batch_size: 1
          top {{ name: "data" type: ENCODED_IMAGE_WITH_DIM channels: 3 height: 8 width: 8
                 transform_param {{ mean_value: 104 mean_value: 117 mean_value: 123 }} }}
          top {{ name: "label" type: INT channels: 1 height: 1 width: 1 }}
          top {{ name: "cont_sentence" {sentence} }}
          top {{ name: "input_sentence" {sentence} }}
          top {{ name: "target_sentence" {sentence} }} }} }}
      layer {{ name: "silence" type: "Silence" bottom: "label" }}
      layer {{ name: "fc8" type: "InnerProduct" bottom: "data" top: "fc8"
        inner_product_param {{ num_output: 4 weight_filler {{ type: "xavier" }} }} }}
      layer {{ name: "embedding" type: "Embed" bottom: "input_sentence" top: "embedded"
        embed_param {{ bias_term: false input_dim: 5 num_output: 4
          weight_filler {{ type: "uniform" min: -0.08 max: 0.08 }} }} }}
      layer {{ name: "lstm1" type: "LSTM" bottom: "embedded" bottom: "cont_sentence"
        bottom: "fc8" top: "lstm1" recurrent_param {{ num_output: 6
          weight_filler {{ type: "uniform" min: -0.08 max: 0.08 }} }} }}
      layer {{ name: "predict" type: "InnerProduct" bottom: "lstm1" top: "predict"
        inner_product_param {{ num_output: 5 axis: 2 weight_filler {{ type: "xavier" }} }} }}
      layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "predict"
        bottom: "target_sentence" top: "loss" loss_param {{ ignore_label: -1 }}
        softmax_param {{ axis: 2 }} }}"""
    (tmp_path / "lrcn.prototxt").write_text(lrcn)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "lrcn.prototxt"}" base_lr: 0.1 lr_policy: "fixed" max_iter: 2 '
        "random_seed: 5"
    )
    conf = Config(
        spark, conf=str(tmp_path / "solver.prototxt"), model=str(tmp_path / "lrcn.caffemodel")
    )
    conf.clusterSize = 2
    summary = CaffeOnSpark(spark).train(DataSource.get(conf, is_train=True))
    assert summary.iterations == 2 and summary.ranks == 2
    assert all(np.isfinite(loss) for loss in summary.losses)

    # Back to words (index 1 is both "a" and the unknown word, as in CaffeOnSpark).
    vocab = Vocab(spark).load(str(out / "vocab"))
    assert DFConversions is Conversions  # CaffeOnSpark's tools copy of the class
    back = Conversions(sc).Embedding2Caption(
        spark.read.parquet(str(out / "embedding")), vocab, "target_sentence", "caption"
    )
    assert {r.id: r.caption for r in back.collect()}["21"] == "a cats a a"

    # A second set with the first one's vocabulary; an unreadable image names its row.
    args = job.parse(argv + ["-vocabSize", "2", "-embeddingDFDir", "val"])
    assert job.run(args, spark) == 0
    assert sc.textFile(str(out / "vocab")).count() == 5
    (root / "b.png").unlink()
    args = job.parse(argv + ["-embeddingDFDir", "val2"])
    with pytest.raises(Exception, match=r"row id 21: .*b.png"):
        job.run(args, spark)
    with pytest.raises(ConfigError, match="val exists"):
        job.run(job.parse(argv + ["-embeddingDFDir", "val"]), spark)

    # Image info without annotations: one row per image, no sentences, no vocabulary.
    del coco["annotations"]
    (tmp_path / "images.json").write_text(json.dumps(coco))
    images_only = ["-imageRoot", str(root), "-captionFile", str(tmp_path / "images.json")]
    (root / "b.png").write_bytes(png_bytes(pixels["b"]))
    args = job.parse(images_only + ["-output", str(tmp_path / "out2")])
    assert job.run(args, spark) == 0
    table = spark.read.parquet(str(tmp_path / "out2" / "embedding"))
    assert table.columns == ["id", "data", "label"] and table.count() == 2
    assert not (tmp_path / "out2" / "vocab").exists()
    for image in coco["images"]:
        del image["height"]
    (tmp_path / "bad.json").write_text(json.dumps(coco))
    bad = ["-imageRoot", str(root), "-captionFile", str(tmp_path / "bad.json")]
    with pytest.raises(SourceError, match="bad.json: the images have no height"):
        job.run(job.parse(bad + ["-output", str(tmp_path / "out3")]), spark)


def test_output_without_a_filesystem_fails_before_training(spark, data, tmp_path):
    solver = write_solver(tmp_path, data["train"], data["test"], 16)
    model = tmp_path / "lenet.caffemodel"
    conf = Config(
        spark, conf=solver, model=str(model), train=True, features="ip2", output="nosuch://b/f"
    )
    with pytest.raises(ConfigError, match=r"-output nosuch://b/f: .*no filesystem for 'nosuch://'"):
        load_job().run(conf, spark)
    assert not model.exists() and not list(tmp_path.glob("lenet_iter_*"))


def test_the_job_runs_the_net_once_to_write_features(
    spark, data, trained, tmp_path, monkeypatch, capsys
):
    """-features with -output: written and counted without running the net a second time."""
    from pyspark import cloudpickle

    import caffeonspark.api as api

    job = load_job()
    runs = tmp_path / "partitions_run"
    real = api._inference_task

    def counted(*args):
        task = real(*args)

        def run(index, items):
            with open(runs, "a") as f:
                f.write(f"{index}\n")
            yield from task(index, items)

        return run

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # executors lack tests/
    monkeypatch.setattr(api, "_inference_task", counted)
    conf = Config(
        spark,
        conf=trained["conf"].conf,
        model=trained["summary"].model,
        features="ip2",
        output=str(tmp_path / "features.json"),  # no scheme: Spark's default filesystem
        lmdb_partitions=2,
    )
    assert job.run(conf, spark) == 0
    assert sorted(runs.read_text().split()) == ["0", "1"]
    assert spark.read.json(str(tmp_path / "features.json")).count() == 103
    assert f"written to file:{tmp_path}/features.json" in capsys.readouterr().out


def test_test_with_output_writes_the_result_file(spark, trained, tmp_path, capsys):
    """-test -output (no -features): a "name: value" line per output blob, as CaffeOnSpark
    wrote; a second run replaces the file."""
    job = load_job()
    out = tmp_path / "results" / "test_result"
    out.parent.mkdir()
    out.write_text("stale\n")
    conf = Config(
        spark,
        conf=trained["conf"].conf,
        model=trained["summary"].model,
        test=True,
        output=f"file:{out}",  # Hadoop's one-slash form, as CaffeOnSpark's docs write it
    ).check()
    assert job.run(conf, spark) == 0
    printed = capsys.readouterr().out
    lines = dict(line.split(": ") for line in out.read_text().splitlines())
    assert set(lines) == {"accuracy", "loss"}
    assert f"accuracy = {lines['accuracy']}\n" in printed
    assert 0 <= float(lines["accuracy"]) <= 1 and float(lines["loss"]) > 0
    assert os.listdir(out.parent) == ["test_result"]  # no temp file left
    # The path for remote filesystems (hdfs://, s3a://) goes through Hadoop's API: run it on
    # the local filesystem (which adds its .crc files) to check the calls and the replace.
    from caffeonspark.api import _hadoop_write

    _hadoop_write(spark, f"file:{out}", b"accuracy: 0.5\n")
    assert out.read_text() == "accuracy: 0.5\n"
    temps = [n for n in os.listdir(out.parent) if n.startswith(".test_result.")]
    assert temps == [".test_result.crc"]  # Hadoop's checksum of the file, no temp file


# --- DataFrame and image sources -----------------------------------------------------------------


def png_bytes(img):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_dataframe_source_train_and_features(spark, data, trained, caplog):
    folder = data["root"] / "frame"
    folder.mkdir()
    images, labels = digits(45, "test")
    rows = [
        (png_bytes(img), int(lab), f"img{i}") for i, (img, lab) in enumerate(zip(images, labels))
    ]
    table = str(folder / "digits.parquet")
    spark.createDataFrame(rows, "data binary, label int, SampleID string").repartition(
        3
    ).write.parquet(table)
    solver = write_solver(
        folder, table, table, 8, test_batch=10, max_iter=3, test_iter=[1], test_interval=3
    )
    conf = Config(spark, conf=solver, model=str(folder / "lenet.caffemodel"), features="ip2")
    cos = CaffeOnSpark(spark)
    source = DataSource.get(conf, is_train=False)
    validation = cos.trainWithValidation(DataSource.get(conf, is_train=True), source)
    assert [r.iteration for r in validation.collect()] == [0, 3]
    # Each task spilled its two shards (45 rows = 23 + 22) before training, and said so.
    ready = re.findall(
        r"rank (\d) on .*: its data is ready \((\d+) training records, (\d+) validation",
        caplog.text,
    )
    assert sorted(ready) == [("0", "23", "23"), ("1", "22", "22")]
    assert os.path.isfile(folder / "lenet.caffemodel")
    assert source.kind == "dataframe"
    feats = cos.features(source).collect()
    assert len(feats) == 45 and {r.SampleID for r in feats} == {f"img{i}" for i in range(45)}
    assert sorted(int(r.label[0]) for r in feats) == sorted(int(x) for x in labels)


def test_image_list_source_train_and_features(spark, data):
    folder = data["root"] / "images"
    folder.mkdir()
    images, labels = digits(23, "test", offset=200)
    lines = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        (folder / f"d{i}.png").write_bytes(png_bytes(img))
        lines.append(f"d{i}.png {int(lab)}")
    (folder / "list.txt").write_text("\n".join(lines) + "\n")

    def image_data(lp):
        lp.type = "ImageData"
        lp.image_data_param.source = str(folder / "list.txt")
        lp.image_data_param.root_folder = str(folder) + "/"
        lp.image_data_param.batch_size = 5
        lp.image_data_param.is_color = False

    solver = write_lenet(folder, image_data, "max_iter: 2")
    conf = Config(spark, conf=solver, model=str(folder / "m.caffemodel"), features="ip2")
    cos = CaffeOnSpark(spark)
    s = cos.train(DataSource.get(conf, is_train=True))  # ImageData runs as a Data layer
    assert s.iterations == 2 and s.ranks == 2
    source = DataSource.get(conf, is_train=False)
    assert source.kind == "images"
    rows = cos.features(source).collect()
    assert sorted(r.SampleID for r in rows) == sorted(f"d{i}.png" for i in range(23))
    assert sorted(int(r.label[0]) for r in rows) == sorted(int(x) for x in labels)


def test_caffeonspark_prototxts_run_unchanged(spark, data, caplog):
    """CaffeOnSpark's dialect: MemoryData + source_class. TRAIN reads an LMDB by file:// URI;
    TEST an ImageDataFrame in a folder without a .parquet suffix, laid out as CaffeOnSpark's
    tables are (string id and label, raw pixels whose shape only the layer gives), reached
    through dataframe_column_select."""
    folder = data["root"] / "cos"
    folder.mkdir()
    images, labels = digits(27, "test", offset=300)
    rows = [(f"s{i}", int(lab), img.tobytes()) for i, (img, lab) in enumerate(zip(images, labels))]
    table = folder / "mnist_test_dataframe"
    spark.createDataFrame(rows, "sampleId string, digit int, pixels binary").repartition(
        2
    ).write.parquet(str(table))
    shape = "channels: 1 height: 28 width: 28 share_in_parallel: false"
    train = f"""source_class: "com.yahoo.ml.caffe.LMDB"
        memory_data_param {{ source: "file://{data["train"]}" batch_size: 16 {shape} }}"""
    test = f"""source_class: "com.yahoo.ml.caffe.ImageDataFrame"
        memory_data_param {{ source: "{table}/" batch_size: 10 {shape}
          dataframe_column_select: "sampleId as id"
          dataframe_column_select: "cast(digit as string) as label"
          dataframe_column_select: "pixels as data" }}"""

    def memory_data(lp):
        lp.type = "MemoryData"
        text_format.Merge(train if lp.include[0].phase == caffe_pb2.TRAIN else test, lp)

    # solver_mode GPU as CaffeOnSpark's sample solvers have it
    solver = write_lenet(folder, memory_data, "max_iter: 3 solver_mode: GPU")
    # CaffeOnSpark's Python API, as its notebooks used it: a SparkContext, a dict of flags,
    # its attribute names, DataSource(sc).getSource.
    sc = spark.sparkContext
    cos = CaffeOnSpark(sc, None)
    cfg = Config(sc, {"-conf": solver, "clusterSize": "2"})
    cfg.modelPath = f"file:{folder / 'm.caffemodel'}"
    cfg.isFeature = True
    with caplog.at_level("WARNING", logger="caffeonspark"):
        s = cos.train(DataSource(sc).getSource(cfg, True))
    assert "solver_mode GPU, but the workers of this version compute on the CPU" in caplog.text
    assert s.iterations == 3 and s.ranks == 2
    cfg.features = ["ip2"]
    cfg.label = "label"
    source = DataSource(sc).getSource(cfg, False)
    assert source.kind == "dataframe"
    feats = cos.features(source)
    assert feats.sparkSession is not None  # a pyspark DataFrame, as CaffeOnSpark returned
    feats = feats.collect()
    assert sorted(r.SampleID for r in feats) == sorted(f"s{i}" for i in range(27))
    assert {r.SampleID: int(r.label[0]) for r in feats} == {
        f"s{i}": int(lab) for i, lab in enumerate(labels)
    }
    assert 0 <= cos.test(source)["accuracy"][0] <= 1


def test_caffeonspark_tables_keep_opencv_pixel_order(spark, tmp_path):
    """Colour raw pixels in a CaffeOnSpark table (its LMDB2DataFrame interleaved them: height,
    width, channels) reach the records in Caffe's planes; a table our export wrote (SampleID,
    Caffe's order already) is read as it is."""
    from caffeonspark.export import source_frame

    hwc = [np.arange(12, dtype=np.uint8).reshape(2, 2, 3) + 20 * i for i in range(3)]
    theirs = [(f"r{i}", str(i), 3, 2, 2, False, a.tobytes()) for i, a in enumerate(hwc)]
    ours = [(f"r{i}", i, 3, 2, 2, False, a.transpose(2, 0, 1).tobytes()) for i, a in enumerate(hwc)]
    tables = {
        "theirs": spark.createDataFrame(
            theirs,
            "id string, label string, channels int, height int, width int, "
            "encoded boolean, data binary",
        ),
        "ours": spark.createDataFrame(
            ours,
            "SampleID string, label int, channels int, height int, width int, "
            "encoded boolean, data binary",
        ),
    }
    tail = """layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
      inner_product_param { num_output: 2 } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }"""
    for name, df in tables.items():
        df.write.parquet(str(tmp_path / name))
        layer = f"""layer {{ name: "data" type: "MemoryData" top: "data" top: "label"
          source_class: "com.yahoo.ml.caffe.ImageDataFrame"
          memory_data_param {{ source: "{tmp_path / name}" batch_size: 2 channels: 3
            height: 2 width: 2 }} }}"""
        (tmp_path / f"{name}.prototxt").write_text(f'name: "n"\n{layer}\n{tail}')
        solver = tmp_path / f"{name}_solver.prototxt"
        solver.write_text(f'net: "{tmp_path / name}.prototxt" base_lr: 0.1 lr_policy: "fixed"')
        conf = Config(spark, conf=str(solver))
        got = {
            r.SampleID: r.data for r in source_frame(spark, DataSource.get(conf, False)).collect()
        }
        want = {f"r{i}": a.transpose(2, 0, 1).tobytes() for i, a in enumerate(hwc)}
        assert got == want, name


def test_caffeonspark_cos_data_layer(spark, data, tmp_path):
    """CaffeOnSpark's CoSData layer over DataFrameSource tables, as its lenet_cos prototxt
    has it: TRAIN raw pixels and string labels; TEST 30x30 PNGs that -resize brings to
    28x28, integer labels, no id column. Trains on 2 ranks; features and test see every row
    (27: a partial last batch)."""
    images, labels = digits(64)
    train_rows = [
        (f"t{i}", str(int(lab)), img.tobytes()) for i, (img, lab) in enumerate(zip(images, labels))
    ]
    spark.createDataFrame(train_rows, "id string, label string, data binary").repartition(
        3
    ).write.parquet(str(tmp_path / "train"))
    timages, tlabels = digits(27, "test")
    big = [np.pad(img, 1) for img in timages]  # 30x30: only -resize makes them fit
    test_rows = [(int(lab), png_bytes(img)) for img, lab in zip(big, tlabels)]
    # One part file: rows keep their order, so the row numbers (the keys) name the digits.
    spark.createDataFrame(test_rows, "label int, data binary").coalesce(1).write.parquet(
        str(tmp_path / "test")
    )

    def cos_data(lp):
        train = lp.include[0].phase == caffe_pb2.TRAIN
        lp.type = "CoSData"
        lp.ClearField("transform_param")
        lp.source_class = "com.yahoo.ml.caffe.DataFrameSource"
        image = "RAW_IMAGE" if train else "ENCODED_IMAGE"
        label = "STRING" if train else "INT"
        text_format.Merge(
            f"""cos_data_param {{ source: "{tmp_path / ("train" if train else "test")}"
              batch_size: {16 if train else 10}
              top {{ name: "data" type: {image} channels: 1 height: 28 width: 28
                     transform_param {{ scale: 0.00390625 }} }}
              top {{ name: "label" type: {label} channels: 1 height: 1 width: 1 }} }}""",
            lp,
        )

    solver = write_lenet(tmp_path, cos_data, "max_iter: 4 random_seed: 3")
    conf = Config(spark, conf=solver, model=str(tmp_path / "m.caffemodel"), clusterSize=2)
    cos = CaffeOnSpark(spark)
    summary = cos.train(DataSource.get(conf, True))
    assert summary.iterations == 4 and summary.ranks == 2
    conf.features, conf.label, conf.resize = ["ip2"], "label", True
    source = DataSource.get(conf, False)
    assert source.kind == "columns" and source.count() == 27
    rows = cos.features(source).collect()
    assert sorted(r.SampleID for r in rows) == sorted(str(i) for i in range(27))
    assert {r.SampleID: int(r.label[0]) for r in rows} == {
        str(i): int(lab) for i, lab in enumerate(tlabels)
    }
    assert all(len(r.ip2) == 10 for r in rows)
    assert 0 <= cos.test(source)["accuracy"][0] <= 1
    conf.resize = False  # without -resize the 30x30 images do not fit the top
    with pytest.raises(Exception, match="the image is 30x30, the top takes 28x28"):
        cos.test(DataSource.get(conf, False))


def test_cos_data_column_types_are_checked_before_any_job(spark, tmp_path):
    spark.createDataFrame([(1, b"x")], "label int, data binary").write.parquet(str(tmp_path / "t"))
    layer = f"""layer {{ name: "d" type: "CoSData" top: "data" top: "label"
      cos_data_param {{ source: "{tmp_path / "t"}" batch_size: 1
        top {{ name: "data" type: ENCODED_IMAGE channels: 1 height: 2 width: 2 }}
        top {{ name: "label" type: STRING }} }} }}"""
    (tmp_path / "net.prototxt").write_text(f'name: "n"\n{layer}')
    (tmp_path / "s.prototxt").write_text(f'net: "{tmp_path}/net.prototxt" base_lr: 0.1')
    conf = Config(spark, conf=str(tmp_path / "s.prototxt"))
    with pytest.raises(SourceError, match="column 'label' is int, but top 'label' is STRING"):
        DataSource.get(conf, False)


# --- failing fast --------------------------------------------------------------------------------


def java_serialized(spark, obj):
    """The bytes Java's ObjectOutputStream writes for a JVM object (CaffeOnSpark's keys)."""
    jvm = spark._jvm
    out = jvm.java.io.ByteArrayOutputStream()
    stream = jvm.java.io.ObjectOutputStream(out)
    stream.writeObject(obj)
    stream.close()
    return bytes(out.toByteArray())


def test_caffeonspark_sequence_files(spark, data):
    """source_class SeqImageDataSource: Hadoop sequence files as CaffeOnSpark's tools wrote
    them. TRAIN: scala.Tuple6 keys (id, label, channels, height, width, encoded = false) and raw
    pixels; TEST: scala.Tuple2 keys (id, label) and PNG images."""
    folder = data["root"] / "seq"
    folder.mkdir()
    sc = spark.sparkContext
    tuple2, tuple6 = spark._jvm.scala.Tuple2, spark._jvm.scala.Tuple6
    train_images, train_labels = digits(40)
    train = [
        (java_serialized(spark, tuple6(f"t{i}", str(lab), 1, 28, 28, False)), img.tobytes())
        for i, (img, lab) in enumerate(zip(train_images, train_labels))
    ]
    test_images, test_labels = digits(23, "test")
    test = [
        (java_serialized(spark, tuple2(f"v{i}", str(lab))), png_bytes(img))
        for i, (img, lab) in enumerate(zip(test_images, test_labels))
    ]
    for name, pairs in (("train_seq", train), ("test_seq", test)):
        rdd = sc.parallelize([(bytearray(k), bytearray(v)) for k, v in pairs], 2)
        rdd.saveAsSequenceFile(str(folder / name))
    shape = "channels: 1 height: 28 width: 28"

    def memory_data(lp):
        lp.type = "MemoryData"
        name = "train_seq" if lp.include[0].phase == caffe_pb2.TRAIN else "test_seq"
        text_format.Merge(
            f"""source_class: "com.yahoo.ml.caffe.SeqImageDataSource"
            memory_data_param {{ source: "file:{folder / name}" batch_size: 8 {shape} }}""",
            lp,
        )

    solver = write_lenet(folder, memory_data, "max_iter: 4")
    conf = Config(spark, conf=solver, model=str(folder / "m.caffemodel"), clusterSize=2)
    cos = CaffeOnSpark(spark)
    source = DataSource.get(conf, is_train=True)
    assert source.kind == "dataframe" and source.count() == 40
    s = cos.train(source)
    assert s.iterations == 4 and s.ranks == 2
    conf.features, conf.label = ["ip2"], "label"
    feats = cos.features(DataSource.get(conf, is_train=False)).collect()
    assert {r.SampleID: int(r.label[0]) for r in feats} == {
        f"v{i}": int(lab) for i, lab in enumerate(test_labels)
    }
    assert all(len(r.ip2) == 10 for r in feats)
    # A sequence file whose keys are not CaffeOnSpark's headers is named with the record.
    bad = folder / "bad_seq"
    sc.parallelize([(bytearray(b"t0"), bytearray(b"x"))], 1).saveAsSequenceFile(str(bad))
    net = (folder / "net.prototxt").read_text().replace(str(folder / "test_seq"), str(bad))
    (folder / "net.prototxt").write_text(net)
    bad_conf = Config(spark, conf=solver, model=str(folder / "m.caffemodel"), clusterSize=2)
    with pytest.raises(SourceError, match="the first record of .*bad_seq: the key is not a Java"):
        DataSource.get(bad_conf, is_train=False)


def test_missing_model_fails_fast(spark, trained, tmp_path):
    conf = Config(spark, conf=trained["conf"].conf, model=str(tmp_path / "nope.caffemodel"))
    t = time.monotonic()
    with pytest.raises(ConfigError, match="nope.caffemodel: no such file"):
        CaffeOnSpark(spark).test(DataSource.get(conf, is_train=False))
    assert time.monotonic() - t < 5


def test_unreadable_source_fails_fast(spark, data, tmp_path):
    solver = write_solver(tmp_path, tmp_path / "missing_lmdb", data["test"], 16)
    conf = Config(spark, conf=solver, model=str(tmp_path / "m.caffemodel"))
    with pytest.raises(SourceError, match="missing_lmdb not found"):
        DataSource.get(conf, is_train=True)


def test_cluster_too_small_fails_fast(spark, data, tmp_path):
    solver = write_solver(tmp_path, data["train"], data["test"], 16)
    conf = Config(spark, conf=solver, model=str(tmp_path / "m.caffemodel"), clusterSize=3)
    t = time.monotonic()
    with pytest.raises(LaunchError, match="needs 3 concurrent tasks.*2 task slot"):
        CaffeOnSpark(spark).train(DataSource.get(conf, is_train=True))
    assert time.monotonic() - t < 10


def test_worker_failure_names_rank_and_cause(spark, data, tmp_path):
    bad = tmp_path / "bad.caffemodel"
    bad.write_bytes(b"not a model")
    solver = write_solver(tmp_path, data["train"], data["test"], 16)
    conf = Config(spark, conf=solver, model=str(tmp_path / "m.caffemodel"), weights=str(bad))
    t = time.monotonic()
    with pytest.raises(LaunchError, match=r"rank 0 .*bad\.caffemodel"):
        CaffeOnSpark(spark).train(DataSource.get(conf, is_train=True))
    assert time.monotonic() - t < 60
