"""Tests for engine/proto: the Caffe schema and its generated module.

Checks BVLC field numbers / defaults, gencode freshness and golden files.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, text_format

from engine.proto import caffe_pb2

PROTO_DIR = Path(__file__).resolve().parents[1] / "engine" / "proto"
GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"

needs_golden = pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"golden data not found at {GOLDEN}")


# ---------------------------------------------------------------------------
# (a) the committed caffe_pb2.py matches caffe.proto
# ---------------------------------------------------------------------------

STALE_HINT = "caffe_pb2.py is stale: run `python -m engine.proto.generate`"
_VERSION_RE = re.compile(rb"^# Protobuf Python Version: (\S+)$", re.MULTILINE)


def _gencode_version(source: bytes) -> bytes | None:
    match = _VERSION_RE.search(source)
    return match.group(1) if match else None


def _descriptor_from_protoc(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    from grpc_tools import protoc

    out = tmp_path / "caffe.desc"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_DIR}",
            f"--descriptor_set_out={out}",
            "caffe.proto",
        ]
    )
    assert rc == 0, "protoc failed on caffe.proto"
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return fds.file[0]


_SERIALIZED_RE = re.compile(rb"AddSerializedFile\((b'.*?')\)\n", re.DOTALL)


def _embedded_descriptor(source: bytes) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto literal embedded in a generated *_pb2.py."""
    match = _SERIALIZED_RE.search(source)
    assert match, "no AddSerializedFile(...) literal in caffe_pb2.py"
    raw = ast.literal_eval(match.group(1).decode("ascii"))
    return descriptor_pb2.FileDescriptorProto.FromString(raw)


def _strip_json_names(fdp: descriptor_pb2.FileDescriptorProto) -> None:
    def walk(msgs):
        for msg in msgs:
            for field in msg.field:
                field.ClearField("json_name")
            walk(msg.nested_type)

    walk(fdp.message_type)


def test_generated_module_is_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools not installed: cannot regenerate")
    from engine.proto.generate import generate

    fresh = generate(tmp_path).read_bytes()
    committed = (PROTO_DIR / "caffe_pb2.py").read_bytes()
    if fresh != committed and _gencode_version(fresh) != _gencode_version(committed):
        pytest.skip(
            "installed grpcio-tools emits a different gencode version "
            f"({_gencode_version(fresh)!r} vs committed "
            f"{_gencode_version(committed)!r}); schema checked by "
            "test_embedded_schema_matches_proto"
        )
    assert fresh == committed, STALE_HINT


def test_embedded_schema_matches_proto(tmp_path):
    """Version-independent check: the schema inside caffe_pb2.py is caffe.proto."""
    pytest.importorskip("grpc_tools", reason="grpcio-tools not installed")
    expected = _descriptor_from_protoc(tmp_path)
    embedded = _embedded_descriptor((PROTO_DIR / "caffe_pb2.py").read_bytes())
    _strip_json_names(expected)
    _strip_json_names(embedded)
    assert embedded == expected, STALE_HINT


def test_package_reexport():
    import engine.proto

    assert engine.proto.caffe_pb2 is caffe_pb2
    assert "caffe_pb2" in engine.proto.__all__
    assert caffe_pb2.DESCRIPTOR.package == "caffe"
    fdp = descriptor_pb2.FileDescriptorProto.FromString(caffe_pb2.DESCRIPTOR.serialized_pb)
    assert fdp.syntax in ("", "proto2")


# ---------------------------------------------------------------------------
# (b) field numbers, types and labels (BVLC Caffe master)
# ---------------------------------------------------------------------------

FIELD_NUMBERS = [
    ("BlobShape", "dim", 1),
    ("BlobProto", "num", 1),
    ("BlobProto", "channels", 2),
    ("BlobProto", "height", 3),
    ("BlobProto", "width", 4),
    ("BlobProto", "data", 5),
    ("BlobProto", "diff", 6),
    ("BlobProto", "shape", 7),
    ("BlobProto", "double_data", 8),
    ("BlobProto", "double_diff", 9),
    ("BlobProtoVector", "blobs", 1),
    ("Datum", "channels", 1),
    ("Datum", "data", 4),
    ("Datum", "label", 5),
    ("Datum", "float_data", 6),
    ("Datum", "encoded", 7),
    ("FillerParameter", "sparse", 7),
    ("FillerParameter", "variance_norm", 8),
    ("NetParameter", "name", 1),
    ("NetParameter", "layers", 2),
    ("NetParameter", "input", 3),
    ("NetParameter", "input_dim", 4),
    ("NetParameter", "force_backward", 5),
    ("NetParameter", "state", 6),
    ("NetParameter", "debug_info", 7),
    ("NetParameter", "input_shape", 8),
    ("NetParameter", "layer", 100),
    ("SolverParameter", "train_net", 1),
    ("SolverParameter", "test_net", 2),
    ("SolverParameter", "test_iter", 3),
    ("SolverParameter", "test_interval", 4),
    ("SolverParameter", "base_lr", 5),
    ("SolverParameter", "display", 6),
    ("SolverParameter", "max_iter", 7),
    ("SolverParameter", "lr_policy", 8),
    ("SolverParameter", "gamma", 9),
    ("SolverParameter", "power", 10),
    ("SolverParameter", "momentum", 11),
    ("SolverParameter", "weight_decay", 12),
    ("SolverParameter", "stepsize", 13),
    ("SolverParameter", "snapshot", 14),
    ("SolverParameter", "snapshot_prefix", 15),
    ("SolverParameter", "snapshot_diff", 16),
    ("SolverParameter", "solver_mode", 17),
    ("SolverParameter", "device_id", 18),
    ("SolverParameter", "test_compute_loss", 19),
    ("SolverParameter", "random_seed", 20),
    ("SolverParameter", "train_net_param", 21),
    ("SolverParameter", "test_net_param", 22),
    ("SolverParameter", "debug_info", 23),
    ("SolverParameter", "net", 24),
    ("SolverParameter", "net_param", 25),
    ("SolverParameter", "train_state", 26),
    ("SolverParameter", "test_state", 27),
    ("SolverParameter", "snapshot_after_train", 28),
    ("SolverParameter", "regularization_type", 29),
    ("SolverParameter", "solver_type", 30),
    ("SolverParameter", "delta", 31),
    ("SolverParameter", "test_initialization", 32),
    ("SolverParameter", "average_loss", 33),
    ("SolverParameter", "stepvalue", 34),
    ("SolverParameter", "clip_gradients", 35),
    ("SolverParameter", "iter_size", 36),
    ("SolverParameter", "snapshot_format", 37),
    ("SolverParameter", "rms_decay", 38),
    ("SolverParameter", "momentum2", 39),
    ("SolverParameter", "type", 40),
    ("SolverParameter", "layer_wise_reduce", 41),
    ("SolverParameter", "weights", 42),
    ("SolverState", "iter", 1),
    ("SolverState", "learned_net", 2),
    ("SolverState", "history", 3),
    ("SolverState", "current_step", 4),
    ("NetState", "phase", 1),
    ("NetState", "level", 2),
    ("NetState", "stage", 3),
    ("NetStateRule", "not_stage", 5),
    ("ParamSpec", "name", 1),
    ("ParamSpec", "share_mode", 2),
    ("ParamSpec", "lr_mult", 3),
    ("ParamSpec", "decay_mult", 4),
    ("LayerParameter", "name", 1),
    ("LayerParameter", "type", 2),
    ("LayerParameter", "bottom", 3),
    ("LayerParameter", "top", 4),
    ("LayerParameter", "loss_weight", 5),
    ("LayerParameter", "param", 6),
    ("LayerParameter", "blobs", 7),
    ("LayerParameter", "include", 8),
    ("LayerParameter", "exclude", 9),
    ("LayerParameter", "phase", 10),
    ("LayerParameter", "propagate_down", 11),
    ("LayerParameter", "transform_param", 100),
    ("LayerParameter", "loss_param", 101),
    ("LayerParameter", "accuracy_param", 102),
    ("LayerParameter", "argmax_param", 103),
    ("LayerParameter", "concat_param", 104),
    ("LayerParameter", "contrastive_loss_param", 105),
    ("LayerParameter", "convolution_param", 106),
    ("LayerParameter", "data_param", 107),
    ("LayerParameter", "dropout_param", 108),
    ("LayerParameter", "dummy_data_param", 109),
    ("LayerParameter", "eltwise_param", 110),
    ("LayerParameter", "exp_param", 111),
    ("LayerParameter", "hdf5_data_param", 112),
    ("LayerParameter", "hdf5_output_param", 113),
    ("LayerParameter", "hinge_loss_param", 114),
    ("LayerParameter", "image_data_param", 115),
    ("LayerParameter", "infogain_loss_param", 116),
    ("LayerParameter", "inner_product_param", 117),
    ("LayerParameter", "lrn_param", 118),
    ("LayerParameter", "memory_data_param", 119),
    ("LayerParameter", "mvn_param", 120),
    ("LayerParameter", "pooling_param", 121),
    ("LayerParameter", "power_param", 122),
    ("LayerParameter", "relu_param", 123),
    ("LayerParameter", "sigmoid_param", 124),
    ("LayerParameter", "softmax_param", 125),
    ("LayerParameter", "slice_param", 126),
    ("LayerParameter", "tanh_param", 127),
    ("LayerParameter", "threshold_param", 128),
    ("LayerParameter", "window_data_param", 129),
    ("LayerParameter", "cos_data_param", 1151),  # CaffeOnSpark (our number: see caffe.proto)
    ("LayerParameter", "python_param", 130),
    ("LayerParameter", "prelu_param", 131),
    ("LayerParameter", "spp_param", 132),
    ("LayerParameter", "reshape_param", 133),
    ("LayerParameter", "log_param", 134),
    ("LayerParameter", "flatten_param", 135),
    ("LayerParameter", "reduction_param", 136),
    ("LayerParameter", "embed_param", 137),
    ("LayerParameter", "tile_param", 138),
    ("LayerParameter", "batch_norm_param", 139),
    ("LayerParameter", "elu_param", 140),
    ("LayerParameter", "bias_param", 141),
    ("LayerParameter", "scale_param", 142),
    ("LayerParameter", "input_param", 143),
    ("LayerParameter", "crop_param", 144),
    ("LayerParameter", "parameter_param", 145),
    ("LayerParameter", "recurrent_param", 146),
    ("LayerParameter", "swish_param", 147),
    ("LayerParameter", "clip_param", 148),
    ("TransformationParameter", "crop_size", 3),
    ("TransformationParameter", "mean_file", 4),
    ("TransformationParameter", "mean_value", 5),
    ("TransformationParameter", "force_gray", 7),
    ("LossParameter", "ignore_label", 1),
    ("LossParameter", "normalize", 2),
    ("LossParameter", "normalization", 3),
    ("ConcatParameter", "concat_dim", 1),
    ("ConcatParameter", "axis", 2),
    ("ConvolutionParameter", "group", 5),
    ("ConvolutionParameter", "stride", 6),
    ("ConvolutionParameter", "weight_filler", 7),
    ("ConvolutionParameter", "engine", 15),
    ("ConvolutionParameter", "axis", 16),
    ("ConvolutionParameter", "force_nd_im2col", 17),
    ("ConvolutionParameter", "dilation", 18),
    ("DataParameter", "batch_size", 4),
    ("DataParameter", "rand_skip", 7),
    ("DataParameter", "backend", 8),
    ("DataParameter", "prefetch", 10),
    ("InnerProductParameter", "axis", 5),
    ("InnerProductParameter", "transpose", 6),
    ("LRNParameter", "k", 5),
    ("PoolingParameter", "kernel_size", 2),
    ("PoolingParameter", "stride", 3),
    ("PoolingParameter", "pad", 4),
    ("PoolingParameter", "global_pooling", 12),
    ("PoolingParameter", "round_mode", 13),
    ("SliceParameter", "slice_dim", 1),
    ("SliceParameter", "slice_point", 2),
    ("SliceParameter", "axis", 3),
    ("SPPParameter", "engine", 6),
    ("ClipParameter", "min", 1),
    ("ClipParameter", "max", 2),
    ("SwishParameter", "beta", 1),
    ("PReLUParameter", "channel_shared", 2),
    ("V1LayerParameter", "layer", 1),
    ("V1LayerParameter", "bottom", 2),
    ("V1LayerParameter", "top", 3),
    ("V1LayerParameter", "name", 4),
    ("V1LayerParameter", "type", 5),
    ("V1LayerParameter", "blobs", 6),
    ("V1LayerParameter", "blobs_lr", 7),
    ("V1LayerParameter", "weight_decay", 8),
    ("V1LayerParameter", "convolution_param", 10),
    ("V1LayerParameter", "pooling_param", 19),
    ("V1LayerParameter", "include", 32),
    ("V1LayerParameter", "exclude", 33),
    ("V1LayerParameter", "loss_weight", 35),
    ("V1LayerParameter", "transform_param", 36),
    ("V1LayerParameter", "loss_param", 42),
    ("V1LayerParameter", "param", 1001),
    ("V1LayerParameter", "blob_share_mode", 1002),
    ("V0LayerParameter", "k", 22),
    ("V0LayerParameter", "blobs", 50),
    ("V0LayerParameter", "det_context_pad", 58),
    ("V0LayerParameter", "concat_dim", 65),
    ("V0LayerParameter", "hdf5_output_param", 1001),
]


@pytest.mark.parametrize(("message", "field", "number"), FIELD_NUMBERS)
def test_field_number(message, field, number):
    desc = getattr(caffe_pb2, message).DESCRIPTOR
    assert field in desc.fields_by_name, f"{message}.{field} missing"
    assert desc.fields_by_name[field].number == number


def _field(message: str, field: str):
    return getattr(caffe_pb2, message).DESCRIPTOR.fields_by_name[field]


def test_field_numbers_unique_and_layer_params_complete():
    for desc in caffe_pb2.DESCRIPTOR.message_types_by_name.values():
        numbers = [f.number for f in desc.fields]
        assert len(numbers) == len(set(numbers)), desc.name
    layer = caffe_pb2.LayerParameter.DESCRIPTOR
    params = {f.name for f in layer.fields if f.name.endswith("_param")}
    expected = {name for (msg, name, _) in FIELD_NUMBERS if msg == "LayerParameter"}
    assert params <= expected, sorted(params - expected)


def test_wire_types_and_packing():
    fd = descriptor_pb2.FieldDescriptorProto
    cases = [
        ("BlobShape", "dim", fd.TYPE_INT64, True),
        ("BlobProto", "data", fd.TYPE_FLOAT, True),
        ("BlobProto", "diff", fd.TYPE_FLOAT, True),
        ("BlobProto", "double_data", fd.TYPE_DOUBLE, True),
        ("BlobProto", "double_diff", fd.TYPE_DOUBLE, True),
        ("BlobProto", "num", fd.TYPE_INT32, False),
        ("Datum", "channels", fd.TYPE_INT32, False),
        ("Datum", "data", fd.TYPE_BYTES, False),
        ("Datum", "float_data", fd.TYPE_FLOAT, False),
        ("NetParameter", "input_dim", fd.TYPE_INT32, False),
        ("SolverParameter", "test_iter", fd.TYPE_INT32, False),
        ("SolverParameter", "random_seed", fd.TYPE_INT64, False),
        ("SolverState", "iter", fd.TYPE_INT32, False),
        ("ConvolutionParameter", "num_output", fd.TYPE_UINT32, False),
        ("ConvolutionParameter", "kernel_size", fd.TYPE_UINT32, False),
        ("LayerParameter", "loss_weight", fd.TYPE_FLOAT, False),
        ("LayerParameter", "propagate_down", fd.TYPE_BOOL, False),
        ("V1LayerParameter", "blobs_lr", fd.TYPE_FLOAT, False),
    ]
    for message, name, ftype, packed in cases:
        f = _field(message, name)
        assert f.type == ftype, f"{message}.{name} type"
        assert f.is_packed == packed, f"{message}.{name} packing"


def test_labels():
    assert _field("ConvolutionParameter", "kernel_size").is_repeated
    assert _field("ConvolutionParameter", "pad").is_repeated
    assert _field("ConvolutionParameter", "stride").is_repeated
    assert _field("ConvolutionParameter", "dilation").is_repeated
    # Pooling keeps scalar kernel / stride / pad.
    for name in ("kernel_size", "stride", "pad"):
        assert not _field("PoolingParameter", name).is_repeated
    assert _field("ClipParameter", "min").is_required
    assert _field("ClipParameter", "max").is_required
    assert _field("NetParameter", "layer").is_repeated
    assert _field("SolverParameter", "test_iter").is_repeated
    assert _field("SolverParameter", "weights").is_repeated


def test_enum_values():
    v1 = caffe_pb2.V1LayerParameter
    assert v1.CONVOLUTION == 4
    assert v1.DATA == 5
    assert v1.INNER_PRODUCT == 14
    assert v1.POOLING == 17
    assert v1.RELU == 18
    assert v1.SOFTMAX_LOSS == 21
    assert v1.ABSVAL == 35
    assert v1.DECONVOLUTION == 39
    assert caffe_pb2.TRAIN == 0
    assert caffe_pb2.TEST == 1
    assert caffe_pb2.PoolingParameter.CEIL == 0
    assert caffe_pb2.PoolingParameter.FLOOR == 1
    assert caffe_pb2.PoolingParameter.STOCHASTIC == 2
    assert caffe_pb2.SolverParameter.ADAM == 5
    assert caffe_pb2.SolverParameter.BINARYPROTO == 1
    assert caffe_pb2.DataParameter.LMDB == 1
    assert caffe_pb2.HingeLossParameter.L1 == 1
    assert caffe_pb2.ReductionParameter.SUM == 1
    assert caffe_pb2.ReductionParameter.MEAN == 4
    assert caffe_pb2.LossParameter.NONE == 3
    assert caffe_pb2.FillerParameter.AVERAGE == 2


# ---------------------------------------------------------------------------
# (c) default values
# ---------------------------------------------------------------------------


def test_solver_defaults():
    s = caffe_pb2.SolverParameter()
    assert s.test_initialization is True
    assert s.delta == pytest.approx(1e-8, rel=1e-6)
    assert s.momentum2 == pytest.approx(0.999)
    assert s.rms_decay == pytest.approx(0.99)
    assert s.clip_gradients == -1.0
    assert s.type == "SGD"
    assert s.regularization_type == "L2"
    assert s.average_loss == 1
    assert s.iter_size == 1
    assert s.random_seed == -1
    assert s.snapshot_prefix == ""
    assert not s.HasField("snapshot_prefix")
    assert s.snapshot_format == caffe_pb2.SolverParameter.BINARYPROTO
    assert s.solver_mode == caffe_pb2.SolverParameter.GPU
    assert s.solver_type == caffe_pb2.SolverParameter.SGD
    assert s.snapshot_after_train is True
    assert s.layer_wise_reduce is True
    assert caffe_pb2.SolverState().current_step == 0
    assert caffe_pb2.NetState().phase == caffe_pb2.TEST


def test_layer_defaults():
    conv = caffe_pb2.ConvolutionParameter()
    assert conv.bias_term is True
    assert conv.group == 1
    assert conv.axis == 1
    assert caffe_pb2.InnerProductParameter().bias_term is True

    assert caffe_pb2.LossParameter().normalization == caffe_pb2.LossParameter.VALID

    pool = caffe_pb2.PoolingParameter()
    assert pool.round_mode == caffe_pb2.PoolingParameter.CEIL
    assert pool.pool == caffe_pb2.PoolingParameter.MAX
    assert pool.stride == 1
    assert pool.pad == 0

    lrn = caffe_pb2.LRNParameter()
    assert lrn.local_size == 5
    assert lrn.alpha == 1.0
    assert lrn.beta == 0.75
    assert lrn.k == 1.0
    assert lrn.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS

    data = caffe_pb2.DataParameter()
    assert not data.HasField("batch_size")
    assert data.backend == caffe_pb2.DataParameter.LEVELDB
    assert data.prefetch == 4

    assert caffe_pb2.TransformationParameter().scale == 1.0
    assert caffe_pb2.ParamSpec().lr_mult == 1.0
    assert caffe_pb2.ParamSpec().decay_mult == 1.0

    filler = caffe_pb2.FillerParameter()
    assert filler.type == "constant"
    assert filler.std == 1.0
    assert filler.max == 1.0
    assert filler.sparse == -1

    bn = caffe_pb2.BatchNormParameter()
    assert bn.moving_average_fraction == pytest.approx(0.999)
    assert bn.eps == pytest.approx(1e-5)
    assert caffe_pb2.MVNParameter().eps == pytest.approx(1e-9)
    assert caffe_pb2.EltwiseParameter().operation == caffe_pb2.EltwiseParameter.SUM
    assert caffe_pb2.EltwiseParameter().stable_prod_grad is True
    assert caffe_pb2.DropoutParameter().dropout_ratio == 0.5
    assert caffe_pb2.ExpParameter().base == -1.0
    assert caffe_pb2.FlattenParameter().end_axis == -1
    assert caffe_pb2.ReshapeParameter().num_axes == -1
    assert caffe_pb2.CropParameter().axis == 2
    assert caffe_pb2.SwishParameter().beta == 1.0
    assert caffe_pb2.ELUParameter().alpha == 1.0
    assert caffe_pb2.ImageDataParameter().batch_size == 1
    assert caffe_pb2.ImageDataParameter().is_color is True
    assert caffe_pb2.WindowDataParameter().crop_mode == "warp"
    assert caffe_pb2.AccuracyParameter().top_k == 1
    assert caffe_pb2.HingeLossParameter().norm == caffe_pb2.HingeLossParameter.L1
    assert caffe_pb2.ReductionParameter().operation == caffe_pb2.ReductionParameter.SUM
    assert caffe_pb2.V0LayerParameter().biasterm is True
    assert caffe_pb2.V0LayerParameter().det_crop_mode == "warp"


def test_clip_requires_min_and_max():
    clip = caffe_pb2.ClipParameter(min=-1.0)
    assert not clip.IsInitialized()
    clip.max = 1.0
    assert clip.IsInitialized()


# ---------------------------------------------------------------------------
# (d) golden files produced by BVLC Caffe
# ---------------------------------------------------------------------------


def _golden(pattern: str) -> list[Path]:
    if not GOLDEN.is_dir():
        return []
    return sorted(GOLDEN.rglob(pattern))


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(GOLDEN)) for p in paths]


def _assert_no_unknown_fields(msg, path: Path) -> None:
    # Unknown fields mean a field number in the file is not in our schema.
    size = msg.ByteSize()
    msg.DiscardUnknownFields()
    assert msg.ByteSize() == size, f"{path}: unknown fields (schema mismatch)"


def _check_binary(path: Path, cls):
    raw = path.read_bytes()
    msg = cls.FromString(raw)
    # Caffe writes fields in number order, as does python protobuf: an exact
    # round trip proves types and packing agree with the writer's schema.
    assert msg.SerializeToString() == raw, f"{path}: round trip differs"
    _assert_no_unknown_fields(msg, path)
    return msg


def _binary_cases() -> list[tuple[Path, type]]:
    cases = [(p, caffe_pb2.NetParameter) for p in _golden("*.caffemodel")]
    cases += [(p, caffe_pb2.BlobProto) for p in _golden("*.binaryproto")]
    cases += [(p, caffe_pb2.SolverState) for p in _golden("*.solverstate")]
    return cases


_BINARY = _binary_cases()


@needs_golden
@pytest.mark.parametrize(("path", "cls"), _BINARY, ids=_ids([p for p, _ in _BINARY]) or None)
def test_golden_binary_parses(path, cls):
    _check_binary(path, cls)


@needs_golden
def test_golden_weights_present():
    weights = _golden("weights.caffemodel")
    assert weights, "no weights.caffemodel under golden/"
    for path in weights:
        net = _check_binary(path, caffe_pb2.NetParameter)
        assert any(len(layer.blobs) for layer in net.layer), path


_NET_TEXT = [p for p in _golden("*.prototxt") if p.name != "solver.prototxt"]


@needs_golden
@pytest.mark.parametrize("path", _NET_TEXT, ids=_ids(_NET_TEXT) or None)
def test_golden_net_prototxt_parses(path):
    net = text_format.Parse(path.read_text(), caffe_pb2.NetParameter())
    assert len(net.layer) + len(net.layers) > 0


_SOLVER_TEXT = [p for p in _golden("solver.prototxt") if "solvers" in p.parts]


@needs_golden
@pytest.mark.parametrize("path", _SOLVER_TEXT, ids=_ids(_SOLVER_TEXT) or None)
def test_golden_solver_prototxt_parses(path):
    solver = text_format.Parse(path.read_text(), caffe_pb2.SolverParameter())
    assert solver.HasField("base_lr")


@needs_golden
def test_golden_solverstate():
    path = GOLDEN / "solvers" / "snapshot_restore" / "lenet_iter_15.solverstate"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    state = _check_binary(path, caffe_pb2.SolverState)
    assert state.iter == 15
    assert state.learned_net.endswith(".caffemodel")
    assert len(state.history) > 0


@needs_golden
def test_golden_mean_binaryproto():
    path = GOLDEN / "data" / "mean.binaryproto"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    blob = _check_binary(path, caffe_pb2.BlobProto)
    if blob.HasField("shape"):
        dims = list(blob.shape.dim)
    else:
        dims = [blob.num, blob.channels, blob.height, blob.width]
    count = 1
    for d in dims:
        count *= d
    assert count == len(blob.data) > 0
