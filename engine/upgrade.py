"""Upgrades of legacy NetParameter / SolverParameter forms to the current format, as Caffe's
upgrade_proto does: V0 and V1 `layers`, old data-transform fields, net inputs, solver_type."""

import logging
import os

from engine.io import CaffeFileError
from engine.proto import caffe_pb2

log = logging.getLogger("engine")

V1 = caffe_pb2.V1LayerParameter


class UpgradeError(CaffeFileError):
    """A legacy net or solver that cannot be upgraded; names the file and the layer."""


# --- V0 (`layers { layer { type: "conv" ... } }`) -> V1 -------------------------------------

# V0 type strings and the V1 enum they became.
V0_LAYER_TYPES = {
    "accuracy": V1.ACCURACY,
    "bnll": V1.BNLL,
    "concat": V1.CONCAT,
    "conv": V1.CONVOLUTION,
    "data": V1.DATA,
    "dropout": V1.DROPOUT,
    "euclidean_loss": V1.EUCLIDEAN_LOSS,
    "flatten": V1.FLATTEN,
    "hdf5_data": V1.HDF5_DATA,
    "hdf5_output": V1.HDF5_OUTPUT,
    "im2col": V1.IM2COL,
    "images": V1.IMAGE_DATA,
    "infogain_loss": V1.INFOGAIN_LOSS,
    "innerproduct": V1.INNER_PRODUCT,
    "lrn": V1.LRN,
    "multinomial_logistic_loss": V1.MULTINOMIAL_LOGISTIC_LOSS,
    "pool": V1.POOLING,
    "relu": V1.RELU,
    "sigmoid": V1.SIGMOID,
    "softmax": V1.SOFTMAX,
    "softmax_loss": V1.SOFTMAX_LOSS,
    "split": V1.SPLIT,
    "tanh": V1.TANH,
    "window_data": V1.WINDOW_DATA,
}

# V0 field -> {V0 type (or "*" for any): "param_field.target"}; a trailing "+" appends to a
# repeated target. Fields not listed here (or listed for other types) are reported.
_ANY = "*"
_V0_FIELDS = {
    "num_output": {
        "conv": "convolution_param.num_output",
        "innerproduct": "inner_product_param.num_output",
    },
    "biasterm": {
        "conv": "convolution_param.bias_term",
        "innerproduct": "inner_product_param.bias_term",
    },
    "weight_filler": {
        "conv": "convolution_param.weight_filler",
        "innerproduct": "inner_product_param.weight_filler",
    },
    "bias_filler": {
        "conv": "convolution_param.bias_filler",
        "innerproduct": "inner_product_param.bias_filler",
    },
    "pad": {"conv": "convolution_param.pad+", "pool": "pooling_param.pad"},
    "kernelsize": {"conv": "convolution_param.kernel_size+", "pool": "pooling_param.kernel_size"},
    "group": {"conv": "convolution_param.group"},
    "stride": {"conv": "convolution_param.stride+", "pool": "pooling_param.stride"},
    "pool": {"pool": "pooling_param.pool"},
    "dropout_ratio": {"dropout": "dropout_param.dropout_ratio"},
    "local_size": {"lrn": "lrn_param.local_size"},
    "alpha": {"lrn": "lrn_param.alpha"},
    "beta": {"lrn": "lrn_param.beta"},
    "k": {"lrn": "lrn_param.k"},
    "source": {
        "data": "data_param.source",
        "hdf5_data": "hdf5_data_param.source",
        "images": "image_data_param.source",
        "window_data": "window_data_param.source",
        "infogain_loss": "infogain_loss_param.source",
    },
    "scale": {_ANY: "transform_param.scale"},
    "meanfile": {_ANY: "transform_param.mean_file"},
    "cropsize": {_ANY: "transform_param.crop_size"},
    "mirror": {_ANY: "transform_param.mirror"},
    "batchsize": {
        "data": "data_param.batch_size",
        "hdf5_data": "hdf5_data_param.batch_size",
        "images": "image_data_param.batch_size",
        "window_data": "window_data_param.batch_size",
    },
    "rand_skip": {"data": "data_param.rand_skip", "images": "image_data_param.rand_skip"},
    "shuffle_images": {"images": "image_data_param.shuffle"},
    "new_height": {"images": "image_data_param.new_height"},
    "new_width": {"images": "image_data_param.new_width"},
    "concat_dim": {"concat": "concat_param.concat_dim"},
    "det_fg_threshold": {"window_data": "window_data_param.fg_threshold"},
    "det_bg_threshold": {"window_data": "window_data_param.bg_threshold"},
    "det_fg_fraction": {"window_data": "window_data_param.fg_fraction"},
    "det_context_pad": {"window_data": "window_data_param.context_pad"},
    "det_crop_mode": {"window_data": "window_data_param.crop_mode"},
    "hdf5_output_param": {"hdf5_output": "hdf5_output_param"},
}
# Handled directly, not through the table.
_V0_OWN_FIELDS = {"name", "type", "blobs", "blobs_lr", "weight_decay"}


def net_needs_v0_upgrade(param):
    return any(v1.HasField("layer") for v1 in param.layers)


def _fold_v0_padding(param, source):
    """Caffe's UpgradeV0PaddingLayers: drop V0 "padding" layers, moving their `pad` into the
    conv / pool layer that reads them (which then reads the padding layer's input)."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layers[:]
    producer = {}  # blob name -> index (in `param.layers`) of the layer that last wrote it
    for i, conn in enumerate(param.layers):
        v0 = conn.layer
        if v0.type == "padding":
            for name in conn.top:
                producer[name] = i
            continue
        new = out.layers.add()
        new.CopyFrom(conn)
        for j, name in enumerate(conn.bottom):
            src_i = producer.get(name)
            if src_i is None:
                continue
            src = param.layers[src_i]
            if src.layer.type != "padding":
                continue
            where = f"{source}: V0 layer {v0.name!r}"
            if v0.type not in ("conv", "pool"):
                raise UpgradeError(
                    f"{where}: a padding layer ({src.layer.name!r}) feeds a {v0.type!r} layer; "
                    "only conv and pool layers can absorb padding"
                )
            if len(conn.bottom) != 1:
                raise UpgradeError(f"{where}: a padded {v0.type} layer takes a single bottom")
            if len(src.bottom) != 1 or len(src.top) != 1:
                raise UpgradeError(
                    f"{source}: V0 padding layer {src.layer.name!r} must have one bottom and "
                    "one top"
                )
            new.layer.pad = src.layer.pad
            new.bottom[j] = src.bottom[0]
        for name in conn.top:
            producer[name] = i
    return out


def _set_path(msg, path, value):
    """Set `a.b` (or append for a trailing `+`) on a message from a V0 field value."""
    append = path.endswith("+")
    parts = path.rstrip("+").split(".")
    for part in parts[:-1]:
        msg = getattr(msg, part)
    last = parts[-1]
    target = getattr(msg, last)
    if append:
        target.append(value)
    elif hasattr(target, "CopyFrom"):
        target.CopyFrom(value)
    else:
        setattr(msg, last, value)


def _upgrade_v0_layer(conn, source, problems):
    """Caffe's UpgradeV0LayerParameter: one V0 connection -> one V1LayerParameter."""
    out = V1()
    out.CopyFrom(conn)
    out.ClearField("layer")
    v0 = conn.layer
    out.name = v0.name
    where = f"{source}: V0 layer {v0.name!r}"
    if v0.type not in V0_LAYER_TYPES:
        raise UpgradeError(f"{where}: unknown V0 layer type {v0.type!r}")
    out.type = V0_LAYER_TYPES[v0.type]
    out.blobs.extend(v0.blobs)
    out.blobs_lr.extend(v0.blobs_lr)
    out.weight_decay.extend(v0.weight_decay)
    for field, value in v0.ListFields():
        if field.name in _V0_OWN_FIELDS:
            continue
        targets = _V0_FIELDS.get(field.name, {})
        path = targets.get(v0.type, targets.get(_ANY))
        if path is None:
            problems.append(f"{where}: unknown parameter {field.name!r} for layer type {v0.type!r}")
            continue
        if field.name == "pool":
            value = caffe_pb2.PoolingParameter.PoolMethod.Value(
                caffe_pb2.V0LayerParameter.PoolMethod.Name(value)
            )
        _set_path(out, path, value)
    return out


def _upgrade_v0_net(param, source, problems):
    padded = _fold_v0_padding(param, source)
    out = caffe_pb2.NetParameter()
    out.CopyFrom(padded)
    del out.layers[:]
    for conn in padded.layers:
        if conn.HasField("layer"):
            out.layers.add().CopyFrom(_upgrade_v0_layer(conn, source, problems))
        else:
            out.layers.add().CopyFrom(conn)
    return out


# --- old data-transformation fields -> transform_param --------------------------------------

_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")
# V1 enum / current type name -> the layer parameter that used to hold the transform fields.
_DATA_PARAM_V1 = {
    V1.DATA: "data_param",
    V1.IMAGE_DATA: "image_data_param",
    V1.WINDOW_DATA: "window_data_param",
}
_DATA_PARAM = {
    "Data": "data_param",
    "ImageData": "image_data_param",
    "WindowData": "window_data_param",
}


def _data_param_name(layer):
    if isinstance(layer, V1):
        return _DATA_PARAM_V1.get(layer.type)
    return _DATA_PARAM.get(layer.type)


def _has_old_transform(layer):
    field = _data_param_name(layer)
    if field is None or not layer.HasField(field):
        return False
    sub = getattr(layer, field)
    return any(sub.HasField(f) for f in _TRANSFORM_FIELDS)


def net_needs_data_upgrade(param):
    return any(_has_old_transform(lp) for lp in list(param.layers) + list(param.layer))


def _upgrade_data_transform(param):
    """Caffe's UpgradeNetDataTransformation: move scale / mean_file / crop_size / mirror out of
    data_param (image_data_param, window_data_param) into transform_param. Caffe does this for
    V1 layers; we also do it for current-format layers, where Caffe would ignore the fields."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    for layer in list(out.layers) + list(out.layer):
        if not _has_old_transform(layer):
            continue
        sub = getattr(layer, _data_param_name(layer))
        for f in _TRANSFORM_FIELDS:
            if sub.HasField(f):
                setattr(layer.transform_param, f, getattr(sub, f))
                sub.ClearField(f)
    return out


# --- V1 (`layers { type: CONVOLUTION blobs_lr: 1 ... }`) -> current `layer` ------------------

# V1 enum name -> current type string (Caffe's UpgradeV1LayerType).
V1_LAYER_TYPES = {
    "ABSVAL": "AbsVal",
    "ACCURACY": "Accuracy",
    "ARGMAX": "ArgMax",
    "BNLL": "BNLL",
    "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution",
    "DATA": "Data",
    "DECONVOLUTION": "Deconvolution",
    "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise",
    "EXP": "Exp",
    "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN",
    "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN",
    "POOLING": "Pooling",
    "POWER": "Power",
    "RELU": "ReLU",
    "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split",
    "SLICE": "Slice",
    "TANH": "TanH",
    "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}


def net_needs_v1_upgrade(param):
    return len(param.layers) > 0


def _upgrade_v1_layer(v1, index, source, problems):
    """Caffe's UpgradeV1LayerParameter: one V1LayerParameter -> one LayerParameter."""
    where = f"{source}: V1 layer {v1.name or index!r}"
    lp = caffe_pb2.LayerParameter()
    lp.name = v1.name
    lp.bottom.extend(v1.bottom)
    lp.top.extend(v1.top)
    lp.include.extend(v1.include)
    lp.exclude.extend(v1.exclude)
    if v1.type == V1.NONE:
        # Caffe maps NONE to an empty type: harmless in a weights file, fatal when built.
        problems.append(f"{where}: has no layer type")
    else:
        lp.type = V1_LAYER_TYPES[V1.LayerType.Name(v1.type)]
    lp.blobs.extend(v1.blobs)
    n_specs = max(len(v1.param), len(v1.blob_share_mode), len(v1.blobs_lr), len(v1.weight_decay))
    for _ in range(n_specs):
        lp.param.add()
    for i, name in enumerate(v1.param):
        lp.param[i].name = name
    for i, mode in enumerate(v1.blob_share_mode):
        lp.param[i].share_mode = caffe_pb2.ParamSpec.DimCheckMode.Value(V1.DimCheckMode.Name(mode))
    for i, lr in enumerate(v1.blobs_lr):
        lp.param[i].lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        lp.param[i].decay_mult = decay
    lp.loss_weight.extend(v1.loss_weight)
    for field, value in v1.ListFields():
        if field.name.endswith("_param") and field.type == field.TYPE_MESSAGE:
            getattr(lp, field.name).CopyFrom(value)
    if v1.HasField("layer"):
        problems.append(f"{where}: holds a V0 layer as well; the V0 part is ignored")
    return lp


def _upgrade_v1_net(param, source, problems):
    if len(param.layer):
        raise UpgradeError(
            f"{source}: refusing to upgrade a net that has both 'layer' (current format) and "
            "'layers' (V1 format) entries; convert it to 'layer { type: \"...\" }' entries by hand"
        )
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layers[:]
    for i, v1 in enumerate(param.layers):
        out.layer.add().CopyFrom(_upgrade_v1_layer(v1, i, source, problems))
    return out


# --- deprecated net inputs -> Input layer ---------------------------------------------------


def net_needs_input_upgrade(param):
    return len(param.input) > 0


def upgrade_net_input(param, source="<net>"):
    """Turn the deprecated net-level `input` with `input_shape` or `input_dim` (4 values per
    input) into an Input layer placed first, as Caffe's UpgradeNetInput does."""
    if not param.input:
        return param
    n = len(param.input)
    if param.input_shape and param.input_dim:
        raise UpgradeError(f"{source}: give net inputs either input_shape or input_dim, not both")
    if param.input_shape and len(param.input_shape) != n:
        raise UpgradeError(
            f"{source}: exactly one input_shape must be given per input: {n} inputs "
            f"({', '.join(param.input)}), {len(param.input_shape)} input_shape"
        )
    if param.input_dim and len(param.input_dim) != 4 * n:
        raise UpgradeError(
            f"{source}: input_dim needs 4 values per input: {n} inputs "
            f"({', '.join(param.input)}), {len(param.input_dim)} input_dim values"
        )
    if not param.input_shape and not param.input_dim:
        raise UpgradeError(
            f"{source}: net input(s) {', '.join(param.input)} have no input_shape or input_dim"
        )
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    layer = out.layer.add()
    layer.name = "input"
    layer.type = "Input"
    for i, name in enumerate(param.input):
        layer.top.append(name)
        shape = layer.input_param.shape.add()
        if param.input_shape:
            shape.CopyFrom(param.input_shape[i])
        else:
            shape.dim.extend(param.input_dim[4 * i : 4 * i + 4])
    out.layer.extend(param.layer)
    del out.input[:]
    del out.input_shape[:]
    del out.input_dim[:]
    return out


# --- BatchNorm's old parameter specs --------------------------------------------------------


def _old_batchnorm(lp):
    return (
        lp.type == "BatchNorm"
        and len(lp.param) == 3
        and any(p.lr_mult != 0 or p.decay_mult != 0 for p in lp.param)
    )


def net_needs_batchnorm_upgrade(param):
    return any(_old_batchnorm(lp) for lp in param.layer)


def _upgrade_batchnorm(param):
    """Caffe's UpgradeNetBatchNorm: BatchNorm's three blobs are statistics, not learned, so
    old nets that listed three param specs get lr_mult and decay_mult 0 on each."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    for lp in out.layer:
        if _old_batchnorm(lp):
            for spec in lp.param:
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0
    return out


# --- the net upgrade --------------------------------------------------------------------------


def net_needs_upgrade(param):
    return (
        net_needs_v0_upgrade(param)
        or net_needs_v1_upgrade(param)
        or net_needs_data_upgrade(param)
        or net_needs_input_upgrade(param)
        or net_needs_batchnorm_upgrade(param)
    )


def _advice(source):
    text = "python -m engine.tools.upgrade_net_proto_text"
    binary = "python -m engine.tools.upgrade_net_proto_binary"
    ext = os.path.splitext(str(source))[1].lower()
    if ext in (".prototxt", ".pbtxt", ".txt"):
        return f"rewrite the file with `{text} IN OUT`"
    if ext in (".caffemodel", ".binaryproto", ".pb"):
        return f"rewrite the file with `{binary} IN OUT`"
    return f"rewrite it with `{text}` (prototxt) or `{binary}` (caffemodel)"


def upgrade_net_param(param, source="<net>", problems=None):
    """Return `param` in the current format (a copy only when something changed).

    Logs a warning naming `source` for each kind of upgrade done. Parameters a legacy layer
    cannot carry over are logged as errors (Caffe goes on in that case too) and, when
    `problems` is a list, appended to it. Structural faults raise UpgradeError."""
    source = str(source)
    found = []
    if net_needs_v0_upgrade(param):
        param = _upgrade_v0_net(param, source, found)
        log.warning(
            "%s: upgraded deprecated V0 layer definitions (layers { layer { ... } }) to the "
            "current format; %s",
            source,
            _advice(source),
        )
    if net_needs_data_upgrade(param):
        param = _upgrade_data_transform(param)
        log.warning(
            "%s: moved deprecated data-layer transformation fields (scale, mean_file, crop_size, "
            "mirror) into transform_param; %s",
            source,
            _advice(source),
        )
    if net_needs_v1_upgrade(param):
        param = _upgrade_v1_net(param, source, found)
        log.warning(
            "%s: upgraded deprecated V1 'layers' (V1LayerParameter) to 'layer'; %s",
            source,
            _advice(source),
        )
    if net_needs_input_upgrade(param):
        param = upgrade_net_input(param, source)
        log.warning(
            "%s: turned the deprecated net-level input / input_dim / input_shape into an Input "
            "layer; %s",
            source,
            _advice(source),
        )
    if net_needs_batchnorm_upgrade(param):
        param = _upgrade_batchnorm(param)
        log.warning(
            "%s: set lr_mult and decay_mult to 0 on BatchNorm's three statistics blobs "
            "(old BatchNorm param specs); %s",
            source,
            _advice(source),
        )
    for msg in found:
        log.error("%s", msg)
    if problems is not None:
        problems.extend(found)
    return param


# --- the solver upgrade -----------------------------------------------------------------------

SOLVER_TYPES = {
    caffe_pb2.SolverParameter.SGD: "SGD",
    caffe_pb2.SolverParameter.NESTEROV: "Nesterov",
    caffe_pb2.SolverParameter.ADAGRAD: "AdaGrad",
    caffe_pb2.SolverParameter.RMSPROP: "RMSProp",
    caffe_pb2.SolverParameter.ADADELTA: "AdaDelta",
    caffe_pb2.SolverParameter.ADAM: "Adam",
}


def solver_needs_upgrade(param):
    nets = [param.net_param, param.train_net_param, *param.test_net_param]
    return param.HasField("solver_type") or any(net_needs_upgrade(n) for n in nets)


def upgrade_solver_param(param, source="<solver>", problems=None):
    """Return `param` with the deprecated `solver_type` enum turned into the `type` string
    (Caffe's UpgradeSolverType) and any nets it embeds upgraded; a copy only when changed."""
    source = str(source)
    if not solver_needs_upgrade(param):
        return param
    out = caffe_pb2.SolverParameter()
    out.CopyFrom(param)
    if out.HasField("solver_type"):
        new_type = SOLVER_TYPES[out.solver_type]
        if out.HasField("type") and out.type != new_type:
            # Caffe lets solver_type win silently; a contradiction is more likely a mistake.
            raise UpgradeError(
                f"{source}: the deprecated solver_type "
                f"{caffe_pb2.SolverParameter.SolverType.Name(out.solver_type)} and type "
                f"{out.type!r} disagree; give only `type`"
            )
        out.type = new_type
        out.ClearField("solver_type")
        log.warning(
            "%s: upgraded the deprecated 'solver_type' enum to type: %r; rewrite the file with "
            "`python -m engine.tools.upgrade_solver_proto_text IN OUT`",
            source,
            new_type,
        )
    for field in ("net_param", "train_net_param"):
        if out.HasField(field):
            net = upgrade_net_param(getattr(out, field), f"{source} {field}", problems)
            getattr(out, field).CopyFrom(net)
    for i, net in enumerate(out.test_net_param):
        net.CopyFrom(upgrade_net_param(net, f"{source} test_net_param[{i}]", problems))
    return out


# --- whole files (the upgrade_* tools) ------------------------------------------------------

FILE_KINDS = {
    # kind: (message class, binary?, needs-upgrade check, upgrade function)
    "net_text": (caffe_pb2.NetParameter, False, net_needs_upgrade, upgrade_net_param),
    "net_binary": (caffe_pb2.NetParameter, True, net_needs_upgrade, upgrade_net_param),
    "solver_text": (caffe_pb2.SolverParameter, False, solver_needs_upgrade, upgrade_solver_param),
}


def upgrade_file(in_path, out_path, kind):
    """Read `in_path`, upgrade it and write `out_path` (atomically; also when nothing changed,
    like Caffe's tools). Returns (whether anything was upgraded, list of problems)."""
    from engine import io

    msg_class, binary, needs, upgrade = FILE_KINDS[kind]
    in_path, out_path = os.fspath(in_path), os.fspath(out_path)
    if binary:
        param = io.read_binary(in_path, msg_class())
    else:
        param = io.read_prototxt(in_path, msg_class())
    problems = []
    upgraded = needs(param)
    if upgraded:
        param = upgrade(param, in_path, problems)
    else:
        log.info("%s: already in the latest format", in_path)
    if binary:
        io.write_binary(out_path, param)
    else:
        io.write_prototxt(out_path, param)
    return upgraded, problems


def tool_main(argv, kind, description):
    """Command line of the upgrade_* tools: IN OUT; exit status 1 on errors or problems."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("input", help="file to upgrade")
    parser.add_argument("output", help="where to write the upgraded file (may equal input)")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers and not log.handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        upgraded, problems = upgrade_file(args.input, args.output, kind)
    except (CaffeFileError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    what = FILE_KINDS[kind][0].DESCRIPTOR.name
    form = "binary" if FILE_KINDS[kind][1] else "text"
    if problems:
        print(
            f"error: {len(problems)} problem(s) while upgrading {args.input} (see above); "
            f"wrote {args.output} anyway",
            file=sys.stderr,
        )
        return 1
    state = "upgraded" if upgraded else "already up to date;"
    print(f"{args.input}: {state} wrote {what} {form} proto to {args.output}")
    return 0
