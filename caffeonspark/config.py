"""CaffeOnSpark's job configuration: the flags of its spark-submit entry point (-conf -train
-model ...) and the same settings as Python keywords, declared once and checked in one place.

`Config` also loads the solver: its nets are embedded (net -> net_param) and relative paths in
them are made absolute against the driver's working directory, as Caffe resolves them, so
executors whose working directory differs read the same files.
"""

import difflib
import os

from google.protobuf import text_format

from caffeonspark import dialect, storage
from engine.proto import caffe_pb2

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST

# Layer types the Spark side can feed (DataSource.get picks the source from them), and the
# parameter that holds each one's batch size.
DATA_LAYER_TYPES = {
    "Data": "data_param",
    "ImageData": "image_data_param",
    "CoSData": "cos_data_param",
}


class ConfigError(ValueError):
    """A missing, malformed or contradictory setting (the message names the flag)."""


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _to_bool(value, name):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"-{name}: expected true or false, got {value!r}")


def _to_list(value, name):
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    out = tuple(str(v).strip() for v in items if str(v).strip())
    if not out:
        raise ConfigError(f"-{name}: expected comma-separated names, got {value!r}")
    return out


class Flag:
    """One setting: a CLI flag `-<name>` and a keyword of the same name, with its type,
    default, allowed values and help text."""

    def __init__(self, kind, default, doc, choices=None, minimum=None):
        self.kind = kind
        self.default = default
        self.doc = doc
        self.choices = choices
        self.minimum = minimum
        self.name = None

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return obj._values.get(self.name, self.default)

    def __set__(self, obj, value):
        obj._values[self.name] = self.convert(value)
        obj._solver = None

    @property
    def takes_value(self):
        return self.kind is not bool

    def convert(self, value):
        name = self.name
        if value is None:
            return self.default
        if self.kind is bool:
            return _to_bool(value, name)
        if self.kind is list:
            return _to_list(value, name)
        try:
            out = self.kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"-{name}: expected {self.kind.__name__}, got {value!r}") from None
        if self.kind is str and not out:
            raise ConfigError(f"-{name}: empty value")
        if self.choices and out not in self.choices:
            raise ConfigError(f"-{name}: {out!r} is not one of {', '.join(self.choices)}")
        if self.minimum is not None and out < self.minimum:
            raise ConfigError(f"-{name}: must be >= {self.minimum}, got {out}")
        return out


class Alias:
    """A name CaffeOnSpark's Config gave a setting (`cfg.protoFile` for -conf), read and
    written through the flag, so its notebooks run unchanged."""

    def __init__(self, flag):
        self.flag = flag

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj, self.flag)

    def __set__(self, obj, value):
        setattr(obj, self.flag, value)


def spark_session(spark):
    """`spark` as a SparkSession: CaffeOnSpark's API took a SparkContext where ours takes the
    session; both are accepted (None stays None: no Spark needed yet)."""
    if spark is None or hasattr(spark, "read"):
        return spark
    if hasattr(spark, "_jsc"):  # a SparkContext
        from pyspark.sql import SparkSession

        return SparkSession(spark)
    raise TypeError(f"expected a SparkSession (or a SparkContext), got {type(spark).__name__}")


class Config:
    """Settings of a CaffeOnSpark job.

    `Config(spark, conf="solver.prototxt", model="hdfs:///m/lenet.caffemodel", clusterSize=2)`
    or `Config.from_args(["-conf", "solver.prototxt", "-train", ...], spark)`. Keywords have
    the names of CaffeOnSpark's flags. `set(**kw)` changes settings and returns the Config.

    CaffeOnSpark's Python forms work too: `Config(sc, {"-conf": "solver.prototxt", ...})` (a
    dict or a list of flags), then `cfg.protoFile = ...`, `cfg.modelPath = ...` and its other
    attribute names (`ALIASES`). Setting a name that is none of these is an error, not a new
    attribute nobody reads.
    """

    conf = Flag(str, None, "solver .prototxt: the net, its data layers and the solver settings")
    train = Flag(bool, False, "train the net on the cluster (writes -model)")
    test = Flag(bool, False, "test -model on the TEST data: mean of every output blob")
    features = Flag(list, (), "comma-separated blobs to extract for every TEST record")
    label = Flag(str, "label", "blob holding each record's label (a column of -features)")
    model = Flag(str, None, "the .caffemodel: written by -train, read by -test / -features")
    output = Flag(
        str, None, "where -features writes its table (without -features: -test its result)"
    )
    outputFormat = Flag(str, "json", "format of -output", choices=("json", "parquet"))
    devices = Flag(int, 1, "solver processes per executor", minimum=1)
    connection = Flag(
        str,
        "ethernet",
        "MPI transport: ethernet (TCP / shared memory) or infiniband (UCX over IB verbs)",
        choices=("ethernet", "infiniband"),
    )
    clusterSize = Flag(
        int, 0, "executors to train on (0: every executor the cluster has)", minimum=0
    )
    persistent = Flag(bool, False, "cache the data source's records between jobs (Spark persist)")
    snapshot = Flag(str, None, ".solverstate to resume training from")
    weights = Flag(
        str,
        None,
        ".caffemodel to initialise (fine-tune) the training net from; with -snapshot, the "
        "snapshot's weights (CaffeOnSpark's -snapshot S -weights M)",
    )
    resize = Flag(
        bool,
        False,
        "resize every image to the layer's memory_data_param height x width (CaffeOnSpark "
        "prototxts), else to the size of the first one (image sources)",
    )
    lmdb_partitions = Flag(
        int,
        0,
        "partitions of an LMDB for -test / -features (0: the default parallelism)",
        minimum=0,
    )
    pinCpus = Flag(
        bool, False, "bind each training worker to its own spark.task.cpus cores of the host"
    )
    rendezvousTimeout = Flag(
        float, 180.0, "seconds for every worker to start and join the communicator", minimum=1
    )
    idleTimeout = Flag(
        float, 900.0, "seconds a training worker may run without reporting progress", minimum=1
    )
    executorWaitTimeout = Flag(
        float, 60.0, "seconds to wait for executors to register before sizing the cluster"
    )

    # CaffeOnSpark's attribute names (its Config.scala / Config.py) for the flags above.
    protoFile = Alias("conf")
    modelPath = Alias("model")
    outputPath = Alias("output")
    isTraining = Alias("train")
    isTest = Alias("test")
    isRddPersistent = Alias("persistent")
    snapshotStateFile = Alias("snapshot")
    snapshotModelFile = Alias("weights")

    _INTERNAL = ("spark", "_values", "_solver")

    def __init__(self, spark=None, args=None, **settings):
        self.spark = spark_session(spark)
        self._values = {}
        self._solver = None
        if args is not None:
            self.set(**self._args_settings(args))
        self.set(**settings)

    @classmethod
    def flags(cls):
        return {k: v for k, v in vars(cls).items() if isinstance(v, Flag)}

    @classmethod
    def aliases(cls):
        return {k: v.flag for k, v in vars(cls).items() if isinstance(v, Alias)}

    def set(self, **settings):
        flags, aliases = self.flags(), self.aliases()
        for name, value in settings.items():
            if name not in flags and name not in aliases:
                raise ConfigError(_unknown(name, flags))
            setattr(self, name, value)
        return self

    def __setattr__(self, name, value):
        cls = type(self)
        if name not in self._INTERNAL and not isinstance(
            getattr(cls, name, None), (Flag, Alias, property)
        ):
            known = list(self.flags()) + list(self.aliases()) + ["isFeature"]
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"Config has no setting {name!r}{hint}")
        object.__setattr__(self, name, value)

    # --- CaffeOnSpark's names that are not one flag ---------------------------------------------
    @property
    def isFeature(self):
        """True when -features names blobs (CaffeOnSpark's flag; setting False clears them)."""
        return bool(self.features)

    @isFeature.setter
    def isFeature(self, value):
        if not _to_bool(value, "isFeature"):
            self.features = None

    @property
    def solverParameter(self):
        return self.solver_param

    @property
    def netParam(self):
        """The solver's net, as CaffeOnSpark's Config held it (every phase's layers)."""
        return solver_train_net(self.solver_param)

    # --- command line -----------------------------------------------------------------------
    @classmethod
    def _args_settings(cls, args):
        """Settings from CaffeOnSpark's `args`: a dict of flags (`{"-conf": "s.prototxt",
        "clusterSize": "2"}`, an empty value switching a boolean flag on) or a list of them."""
        if isinstance(args, dict):
            flags = cls.flags()
            settings = {}
            for key, value in args.items():
                name = str(key).lstrip("-")
                flag = flags.get(name)
                if flag is not None and flag.kind is bool and value in (None, ""):
                    value = True
                settings[name] = value
            return settings
        if isinstance(args, (list, tuple)):
            return cls._parse_args(args)
        raise ConfigError(f"Config args: expected a dict or a list of flags, got {args!r}")

    @classmethod
    def from_args(cls, argv, spark=None):
        """Parse CaffeOnSpark-style flags (`-train -conf x.prototxt -clusterSize 2`)."""
        return cls(spark, **cls._parse_args(argv))

    @classmethod
    def _parse_args(cls, argv):
        flags = cls.flags()
        settings = {}
        args = list(argv)
        i = 0
        while i < len(args):
            token = args[i]
            if not token.startswith("-") or token in ("-", "--"):
                raise ConfigError(f"unexpected argument {token!r} (flags look like -conf FILE)")
            name, eq, inline = token.lstrip("-").partition("=")
            if name not in flags:
                raise ConfigError(_unknown(name, flags))
            flag = flags[name]
            if eq:
                value = inline
            elif flag.takes_value:
                if i + 1 >= len(args):
                    raise ConfigError(f"-{name} needs a value ({flag.doc})")
                i += 1
                value = args[i]
            else:
                value = True
            if name in settings:
                raise ConfigError(f"-{name} given twice")
            settings[name] = value
            i += 1
        return settings

    @classmethod
    def usage(cls):
        lines = ["flags:"]
        for name, flag in cls.flags().items():
            arg = f" {flag.kind.__name__.upper()}" if flag.takes_value else ""
            default = "" if flag.default in (None, (), False) else f" (default {flag.default})"
            lines.append(f"  -{name}{arg}: {flag.doc}{default}")
        return "\n".join(lines)

    def __repr__(self):
        shown = ", ".join(f"{k}={v!r}" for k, v in sorted(self._values.items()))
        return f"Config({shown})"

    # --- checks ------------------------------------------------------------------------------
    def check(self):
        """Every cross-flag rule for the actions the flags ask for (-train/-test/-features)."""
        if not (self.train or self.test or self.features):
            raise ConfigError("nothing to do: give -train, -test and/or -features")
        self._check_common()
        if self.train:
            self.check_train()
        if self.test or self.features:
            self.check_inference()
        return self

    def _check_common(self):
        if not self.conf:
            raise ConfigError("-conf is required: the solver .prototxt")
        self.solver_param  # noqa: B018 - loads and validates the solver and its nets
        if self.output and not (self.features or self.test):
            raise ConfigError(
                "-output is where -features (or else -test) writes: give -features BLOBS or -test"
            )

    def check_train(self):
        self._check_common()
        if not self.model:
            raise ConfigError("-train needs -model: where to write the trained .caffemodel")
        if self.snapshot and self.weights and "," in self.weights:
            raise ConfigError(
                "-snapshot with -weights resumes from the snapshot with those weights (as "
                f"CaffeOnSpark did): give one .caffemodel, not {self.weights!r}"
            )
        if self.snapshot:
            _check_snapshot(self.snapshot, with_weights=bool(self.weights))
        if self.weights:
            for path in self.weights.split(","):
                if not storage.exists(storage.absolute(path)):
                    raise ConfigError(f"-weights {storage.shown(path)}: no such file")
        folder = storage.dirname(storage.absolute(self.model))
        try:
            storage.check_writable_dir(folder)
        except storage.StorageError as e:
            raise ConfigError(
                f"-model {storage.shown(self.model)}: its folder is not writable: {e}"
            ) from None
        return self

    def check_inference(self, after_training=False):
        self._check_common()
        what = "-features" if self.features and not self.test else "-test"
        if self.snapshot and not self.train:
            raise ConfigError("-snapshot resumes training: it needs -train")
        if self.weights and not self.train:
            raise ConfigError(f"-weights fine-tunes training; {what} reads the weights from -model")
        if not self.model:
            raise ConfigError(f"{what} needs -model: the trained .caffemodel")
        if not (self.train and not after_training) and not storage.is_file(self.model_uri):
            raise ConfigError(f"-model {storage.shown(self.model)}: no such file (nothing to test)")
        return self

    # --- derived -----------------------------------------------------------------------------
    @property
    def model_uri(self):
        return storage.absolute(self.model) if self.model else None

    @property
    def solver_param(self):
        """The SolverParameter of -conf with its nets embedded and paths made absolute."""
        if self._solver is None:
            if not self.conf:
                raise ConfigError("-conf is required: the solver .prototxt")
            self._solver = load_solver(self.conf)
        return self._solver

    def net_param(self, phase):
        """The NetParameter the solver trains (TRAIN) or tests (TEST), filtered to `phase`."""
        from engine.net import filter_net

        sp = self.solver_param
        source = solver_train_net(sp) if phase == TRAIN else solver_test_net(sp)
        param = caffe_pb2.NetParameter()
        param.CopyFrom(source)
        param.state.phase = phase
        if phase == TRAIN and sp.HasField("train_state"):
            param.state.MergeFrom(sp.train_state)
        if phase == TEST and len(sp.test_state):
            param.state.MergeFrom(sp.test_state[0])
        return filter_net(param)

    def data_layer(self, phase):
        """The LayerParameter of the net's data layer in `phase` (Data, ImageData or
        CaffeOnSpark's CoSData)."""
        net = self.net_param(phase)
        found = [lp for lp in net.layer if lp.type in DATA_LAYER_TYPES]
        phase_name = caffe_pb2.Phase.Name(phase)
        if not found:
            types = ", ".join(sorted({lp.type for lp in net.layer})) or "none"
            raise ConfigError(
                f"{self.conf}: net {net.name!r} has no Data, ImageData or CoSData layer in the "
                f"{phase_name} phase (layer types: {types}); CaffeOnSpark feeds the net "
                "through one"
            )
        if len(found) > 1:
            names = ", ".join(repr(lp.name) for lp in found)
            raise ConfigError(
                f"{self.conf}: net {net.name!r} has {len(found)} data layers in the "
                f"{phase_name} phase ({names}); CaffeOnSpark feeds exactly one"
            )
        return found[0]


def solver_train_net(param):
    """A loaded SolverParameter's train net (train_net_param, else net_param)."""
    return param.train_net_param if param.HasField("train_net_param") else param.net_param


def solver_test_net(param):
    """A loaded SolverParameter's (first) test net (test_net_param[0], else net_param)."""
    return param.test_net_param[0] if len(param.test_net_param) else param.net_param


def _unknown(name, flags):
    close = difflib.get_close_matches(name, list(flags), n=1)
    hint = f" (did you mean -{close[0]}?)" if close else ""
    return f"unknown flag -{name}{hint}; known: " + " ".join(f"-{f}" for f in flags)


def _check_snapshot(path, with_weights=False):
    """Fail fast on a -snapshot whose .solverstate or model is missing (its model is -weights
    when given, CaffeOnSpark's form; else the one the .solverstate names, as in Caffe)."""
    uri = storage.absolute(path)
    if not storage.is_file(uri):
        raise ConfigError(f"-snapshot {storage.shown(path)}: no such .solverstate file")
    state = caffe_pb2.SolverState()
    try:
        state.ParseFromString(storage.read_bytes(uri))
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ConfigError(f"-snapshot {storage.shown(path)}: not a .solverstate: {e}") from None
    if state.learned_net and not with_weights:
        beside = storage.join(storage.dirname(uri), storage.basename(state.learned_net))
        if not (storage.exists(storage.absolute(state.learned_net)) or storage.exists(beside)):
            raise ConfigError(
                f"-snapshot {path}: its model {state.learned_net!r} is missing (looked beside "
                "the .solverstate too): nothing to resume"
            )


# --- loading the solver ------------------------------------------------------------------------


def _read_text(uri, msg, what):
    from engine import io as engine_io

    try:
        text = storage.read_bytes(uri, what).decode("utf-8")
    except storage.StorageError as e:
        raise ConfigError(str(e)) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{storage.shown(uri)}: {what} is not UTF-8 text") from None
    try:
        return engine_io.parse_prototxt(text, msg, source=uri)
    except engine_io.CaffeFileError as e:
        raise ConfigError(str(e)) from None


def load_solver(conf):
    """Read -conf into a self-contained SolverParameter (nets embedded, paths absolute)."""
    from engine.solvers import upgrade_solver_param

    uri = storage.absolute(conf)
    param = _read_text(uri, caffe_pb2.SolverParameter(), "solver prototxt")
    try:
        upgrade_solver_param(param, source=uri if storage.is_local(uri) else None)
    except ValueError as e:
        raise ConfigError(f"{conf}: {e}") from None
    for field, target in (("net", "net_param"), ("train_net", "train_net_param")):
        if param.HasField(field):
            if param.HasField(target):
                raise ConfigError(f"{conf}: both {field} and {target} are given")
            net = _read_net(getattr(param, field), conf)
            getattr(param, target).CopyFrom(net)
            param.ClearField(field)
    for path in param.test_net:
        param.test_net_param.add().CopyFrom(_read_net(path, conf))
    del param.test_net[:]
    if not (param.HasField("net_param") or param.HasField("train_net_param")):
        raise ConfigError(f"{conf}: the solver names no net (net: or train_net:)")
    nets = [param.net_param, param.train_net_param, *param.test_net_param]
    for net in nets:
        try:
            dialect.standard_net(net)
        except ValueError as e:
            raise ConfigError(f"{conf}: net {net.name!r}: {e}") from None
        absolutize_net_paths(net)
    weights = [",".join(storage.absolute(w) for w in entry.split(",")) for entry in param.weights]
    del param.weights[:]
    param.weights.extend(weights)
    if param.snapshot_prefix:
        param.snapshot_prefix = storage.absolute(param.snapshot_prefix)
    return param


def _read_net(path, conf):
    from engine.upgrade import upgrade_net_param

    uri = storage.absolute(path)
    if storage.is_local(uri) and not os.path.exists(storage.local_path(uri)):
        beside = os.path.join(os.path.dirname(storage.local_path(storage.absolute(conf))), path)
        hint = ""
        if os.path.exists(beside):
            hint = (
                f"; relative net paths are resolved against the working directory {os.getcwd()}"
                f", like Caffe (the file exists beside the solver: run from "
                f"{os.path.dirname(beside)})"
            )
        raise ConfigError(f"{conf}: net file {path}: no such file{hint}")
    net = _read_text(uri, caffe_pb2.NetParameter(), "net prototxt")
    try:
        return upgrade_net_param(net, source=uri)
    except ValueError as e:
        raise ConfigError(f"{uri}: {e}") from None


def _abs_keep_sep(path):
    out = storage.absolute(path)
    if path.endswith(("/", os.sep)) and not out.endswith("/"):
        out += "/"
    return out


def absolutize_net_paths(net):
    """Make the relative file paths of a NetParameter's layers absolute (in place)."""
    for lp in net.layer:
        for sub, field in (
            ("data_param", "source"),
            ("image_data_param", "source"),
            ("hdf5_data_param", "source"),
            ("window_data_param", "source"),
            ("cos_data_param", "source"),
            ("data_param", "mean_file"),
            ("image_data_param", "mean_file"),
            ("transform_param", "mean_file"),
            ("infogain_loss_param", "source"),
        ):
            if not lp.HasField(sub):
                continue
            msg = getattr(lp, sub)
            if field in msg.DESCRIPTOR.fields_by_name and msg.HasField(field):
                setattr(msg, field, storage.absolute(getattr(msg, field)))
        if lp.HasField("image_data_param") and lp.image_data_param.root_folder:
            lp.image_data_param.root_folder = _abs_keep_sep(lp.image_data_param.root_folder)
        for top in lp.cos_data_param.top:  # CoSData: a transform per top
            if top.transform_param.HasField("mean_file"):
                top.transform_param.mean_file = storage.absolute(top.transform_param.mean_file)


def solver_text(param):
    """A SolverParameter as prototxt text (for logs and the worker's job file)."""
    return text_format.MessageToString(param)
