"""Config (CaffeOnSpark's flags and keywords, cross-flag checks, solver loading) and storage
(local / file:// paths, atomic writes), without a Spark cluster."""

import os
from pathlib import Path

import pytest
from google.protobuf import text_format

from caffeonspark import Config, ConfigError, storage
from caffeonspark.config import TEST, TRAIN
from engine.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def solver(tmp_path, monkeypatch):
    """conf/lenet's solver and net copied into tmp_path; cwd = tmp_path (relative paths)."""
    (tmp_path / "conf").mkdir()
    net = (REPO / "conf/lenet/lenet_train_test.prototxt").read_text()
    (tmp_path / "conf/net.prototxt").write_text(net)
    (tmp_path / "conf/solver.prototxt").write_text(
        'net: "conf/net.prototxt" base_lr: 0.01 lr_policy: "fixed" max_iter: 10 '
        'snapshot_prefix: "work/lenet" test_iter: 2 test_interval: 5'
    )
    monkeypatch.chdir(tmp_path)
    return "conf/solver.prototxt"


def test_from_args_parses_caffeonspark_flags(solver):
    conf = Config.from_args(
        [
            "-train",
            "-conf",
            solver,
            "-model",
            "out/m.caffemodel",
            "-clusterSize",
            "2",
            "-features",
            "ip1, ip2",
            "-outputFormat=parquet",
            "-devices",
            "1",
            "-persistent",
        ]
    )
    assert conf.train and not conf.test and conf.persistent
    assert conf.clusterSize == 2 and conf.devices == 1
    assert conf.features == ("ip1", "ip2")
    assert conf.outputFormat == "parquet" and conf.connection == "ethernet"
    assert conf.label == "label" and conf.lmdb_partitions == 0


def test_keywords_are_the_flags(solver):
    conf = Config(conf=solver, train=True, model="m.caffemodel", features=["ip2"])
    assert conf.features == ("ip2",)
    assert conf.set(clusterSize=3) is conf and conf.clusterSize == 3
    with pytest.raises(ConfigError, match="unknown flag -clustersize .*did you mean -clusterSize"):
        conf.set(clustersize=3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-train"], "-conf is required"),
        (["-conf", "S"], "nothing to do"),
        (["-conf", "S", "-train"], "-train needs -model"),
        (["-conf", "S", "-train", "-model", "m", "-snapshot", "a", "-weights", "b,c"], "one .caf"),
        (["-conf", "S", "-test", "-model", "m", "-snapshot", "s"], "-snapshot resumes training"),
        (["-conf", "S", "-test", "-model", "m", "-weights", "w"], "-weights fine-tunes"),
        (["-conf", "S", "-test"], "-test needs -model"),
        (["-conf", "S", "-test", "-model", "missing.caffemodel"], "missing.caffemodel: no such"),
        (["-conf", "S", "-train", "-model", "m", "-output", "o"], "-output is where -features"),
        (["-conf", "S", "-train", "-model", "m", "-snapshot", "x.solverstate"], "no such .solv"),
        (["-conf", "S", "-train", "-model", "m", "-weights", "w.caffemodel"], "no such file"),
        (["-conf", "S", "-outputFormat", "csv"], "'csv' is not one of json, parquet"),
        (["-conf", "S", "-connection", "rdma"], "not one of ethernet, infiniband"),
        (["-conf", "S", "-clusterSize", "two"], "expected int"),
        (["-conf", "S", "-devices", "0"], "must be >= 1"),
        (["-conf", "S", "-model"], "-model needs a value"),
        (["-conf", "S", "-modle", "m"], "did you mean -model"),
        (["-conf", "S", "extra"], "unexpected argument 'extra'"),
        (["-conf", "S", "-conf", "S"], "given twice"),
        (["-conf", "nope.prototxt", "-train", "-model", "m"], "nope.prototxt: cannot read"),
    ],
)
def test_bad_flags_are_clear_errors(solver, tmp_path, argv, message):
    (tmp_path / "m").write_bytes(b"")
    argv = [solver if a == "S" else a for a in argv]
    with pytest.raises(ConfigError, match=message):
        Config.from_args(argv).check()


def test_snapshot_without_its_model_is_rejected(solver, tmp_path):
    state = caffe_pb2.SolverState(iter=5, learned_net="gone_iter_5.caffemodel")
    (tmp_path / "s.solverstate").write_bytes(state.SerializeToString())
    conf = Config(conf=solver, train=True, model="m.caffemodel", snapshot="s.solverstate")
    with pytest.raises(ConfigError, match="its model 'gone_iter_5.caffemodel' is missing"):
        conf.check()
    (tmp_path / "gone_iter_5.caffemodel").write_bytes(b"")
    conf.check()


def test_caffeonspark_python_api_forms(solver):
    # Config(sc, args) took a dict of flags (its notebooks) or a list (its Scala API), and
    # CaffeOnSpark's attribute names read and write our flags.
    cfg = Config(None, {"-conf": solver, "train": "", "clusterSize": "2", "-features": "ip1"})
    assert cfg.train and cfg.clusterSize == 2 and cfg.protoFile == solver
    assert cfg.isTraining and not cfg.isTest and cfg.isFeature
    assert Config(None, ["-conf", solver, "-test"]).isTest
    cfg.modelPath, cfg.outputPath = "file:/m/lenet.caffemodel", "out"
    cfg.snapshotStateFile, cfg.snapshotModelFile = "s.solverstate", "s.caffemodel"
    cfg.isRddPersistent = True
    assert (cfg.model, cfg.output, cfg.persistent) == ("file:/m/lenet.caffemodel", "out", True)
    assert (cfg.snapshot, cfg.weights) == ("s.solverstate", "s.caffemodel")
    cfg.isFeature = False
    assert cfg.features == () and not cfg.isFeature
    assert cfg.solverParameter.max_iter == cfg.solver_param.max_iter
    assert cfg.netParam.name == "LeNet"
    assert Config(protoFile=solver).conf == solver


def test_misspelt_setting_is_an_error_not_a_new_attribute(solver):
    cfg = Config(conf=solver)
    with pytest.raises(ConfigError, match="no setting 'modelpath' .*did you mean modelPath"):
        cfg.modelpath = "m.caffemodel"
    with pytest.raises(ConfigError, match="no setting 'clustersize' .*clusterSize"):
        cfg.clustersize = 2
    with pytest.raises(ConfigError, match="expected a dict or a list"):
        Config(None, "-conf x")
    with pytest.raises(TypeError, match="expected a SparkSession"):
        Config(object())


def test_snapshot_with_weights_is_caffeonsparks_resume(solver, tmp_path):
    # CaffeOnSpark resumed with `-snapshot S -weights M` (it refused S alone): M stands in
    # for the model the .solverstate names, which need not exist then.
    state = caffe_pb2.SolverState(iter=5, learned_net="/elsewhere/lenet_iter_5.caffemodel")
    (tmp_path / "s.solverstate").write_bytes(state.SerializeToString())
    conf = Config(
        conf=solver, train=True, model="m.caffemodel", snapshot="s.solverstate", weights="w"
    )
    with pytest.raises(ConfigError, match="-weights w: no such file"):
        conf.check()
    (tmp_path / "w").write_bytes(b"")
    assert conf.check() is conf


def test_unwritable_model_folder_fails(solver, tmp_path):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    try:
        if os.access(tmp_path / "ro", os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        conf = Config(conf=solver, train=True, model=str(tmp_path / "ro" / "m.caffemodel"))
        with pytest.raises(ConfigError, match="not writable"):
            conf.check()
    finally:
        os.chmod(tmp_path / "ro", 0o700)


def test_solver_is_self_contained(solver, tmp_path):
    sp = Config(conf=solver).solver_param
    assert not sp.HasField("net") and sp.net_param.name == "LeNet"
    sources = {lp.data_param.source for lp in sp.net_param.layer if lp.type == "Data"}
    assert sources == {
        str(tmp_path / "work/digits_train_lmdb"),
        str(tmp_path / "work/digits_test_lmdb"),
    }
    assert sp.snapshot_prefix == str(tmp_path / "work/lenet")


def test_net_param_and_data_layer_by_phase(solver):
    conf = Config(conf=solver)
    train, test = conf.data_layer(TRAIN), conf.data_layer(TEST)
    assert train.data_param.batch_size == 64 and test.data_param.batch_size == 100
    assert "accuracy" not in [lp.name for lp in conf.net_param(TRAIN).layer]
    assert "accuracy" in [lp.name for lp in conf.net_param(TEST).layer]


def test_net_file_resolved_against_cwd_like_caffe(solver, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "conf")
    with pytest.raises(ConfigError, match="net file conf/net.prototxt: no such file"):
        Config(conf="solver.prototxt").solver_param  # noqa: B018


def test_net_without_data_layer_is_rejected(tmp_path):
    (tmp_path / "net.prototxt").write_text(
        'name: "n" layer { name: "in" type: "Input" top: "x" '
        "input_param { shape { dim: 1 dim: 2 } } }"
    )
    (tmp_path / "s.prototxt").write_text(f'net: "{tmp_path}/net.prototxt" lr_policy: "fixed"')
    with pytest.raises(ConfigError, match="no Data, ImageData or CoSData layer in the TRAIN phase"):
        Config(conf=str(tmp_path / "s.prototxt")).data_layer(TRAIN)


def test_usage_lists_every_flag():
    text = Config.usage()
    for flag in ("-conf", "-train", "-lmdb_partitions", "-connection", "-outputFormat"):
        assert flag in text


# --- storage -------------------------------------------------------------------------------------


def test_storage_local_and_file_uris(tmp_path):
    uri = f"file://{tmp_path}/a/b/model.bin"
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(str(tmp_path / "a/b/model.bin")) == b"hello"
    assert storage.is_file(uri) and storage.is_dir(storage.dirname(uri))
    assert storage.list_names(tmp_path / "a/b") == ["model.bin"]
    assert storage.fetch(uri, str(tmp_path)) == str(tmp_path / "a/b/model.bin")
    storage.write_bytes(uri, b"again")  # atomic replace, no temp left behind
    assert storage.read_bytes(uri) == b"again"
    assert storage.list_names(tmp_path / "a/b") == ["model.bin"]
    with pytest.raises(storage.StorageError, match="missing.bin: cannot read"):
        storage.read_bytes(tmp_path / "missing.bin")


def test_hadoop_one_slash_uris_are_not_relative_paths(tmp_path, monkeypatch):
    """`-model file:/models/m.caffemodel` (Hadoop's form, in CaffeOnSpark's docs) names
    /models, not a folder called "file:" under the working directory."""
    monkeypatch.chdir(tmp_path)
    uri = f"file:{tmp_path}/m/model.bin"
    assert storage.absolute(uri) == f"file://{tmp_path}/m/model.bin"
    assert storage.absolute("hdfs:/models/m") == "hdfs:///models/m"
    assert storage.dirname(uri) == f"{tmp_path}/m" and storage.basename(uri) == "model.bin"
    storage.write_bytes(uri, b"x")
    assert (tmp_path / "m" / "model.bin").read_bytes() == b"x"
    assert not (tmp_path / "file:").exists()
    conf = Config(model=uri)
    assert conf.model_uri == f"file://{tmp_path}/m/model.bin"


def test_storage_uri_helpers():
    assert storage.has_scheme("hdfs://nn:8020/m/x.caffemodel")
    assert not storage.has_scheme("/m/x") and not storage.has_scheme("C:/x")
    assert storage.dirname("hdfs://nn/m/x.caffemodel") == "hdfs://nn/m"
    assert storage.join("hdfs://nn/m/", "y") == "hdfs://nn/m/y"
    assert storage.basename("hdfs://nn/m/x.caffemodel") == "x.caffemodel"
    assert storage.absolute("rel/x") == os.path.join(os.getcwd(), "rel/x")


def test_storage_remote_scheme_error_is_clear():
    with pytest.raises(storage.StorageError, match="nosuch://x/y"):
        storage.read_bytes("nosuch://x/y")


def test_hdfs_without_hadoop_libraries_is_one_line_with_the_fix(monkeypatch):
    # pyarrow's own message lists every path it tried for libjvm / libhdfs (~100 lines here).
    monkeypatch.setenv("JAVA_HOME", "/nonexistent/jvm")
    with pytest.raises(storage.StorageError) as info:
        storage.read_bytes("hdfs://nn:8020/m/x.caffemodel")
    message = str(info.value)
    assert message.startswith("hdfs://nn:8020/m/x.caffemodel: cannot open its filesystem: ")
    assert "\n" not in message and len(message) < 600
    assert "CLASSPATH=$(hadoop classpath --glob)" in message


def test_text_format_roundtrip_of_embedded_solver(solver):
    sp = Config(conf=solver).solver_param
    again = text_format.Parse(text_format.MessageToString(sp), caffe_pb2.SolverParameter())
    assert again == sp


# --- the spark-submit entry point --------------------------------------------------------


def load_job(name="caffeonspark"):
    """jobs/<name>.py as a module (jobs/caffeonspark.py has the package's name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_job", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_job_rejects_bad_flags_before_starting_spark(solver, capsys):
    assert load_job().main(["-conf", solver, "-train"]) == 2
    err = capsys.readouterr().err
    assert "-train needs -model" in err and "-lmdb_partitions" in err


def test_job_help_lists_flags(capsys):
    assert load_job().main(["-help"]) == 0
    assert "-clusterSize" in capsys.readouterr().out
