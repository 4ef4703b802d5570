"""Generates the long model-zoo prototxts (VGG-16, GoogLeNet, ResNet-50; train_val + deploy)
in conf/, so they are reproducible: `python conf/generate_zoo.py [--check]`.

The layer and blob names follow the published Caffe releases of these models (BVLC GoogLeNet,
the VGG group's VGG_ILSVRC_16_layers, Kaiming He's ResNet-50), so their released
.caffemodel weights load by name. The text is written by this script; `--check` only compares
the committed files with what it would write (exit status 1 on a difference).
"""

import argparse
import sys
from pathlib import Path

CONF = Path(__file__).resolve().parent

# --- a tiny prototxt writer -------------------------------------------------------------------
# A message is a list of (field, value) pairs (fields may repeat); a value is a scalar, an Enum
# (written bare) or a nested message.


class Enum(str):
    """An enum value, written without quotes (pool: MAX)."""


def _scalar(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Enum):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, float):
        return repr(v)
    return str(int(v))


def _is_msg(v):
    return isinstance(v, list)


def _depth(msg):
    return 1 + max((_depth(v) for _, v in msg if _is_msg(v)), default=0)


def _inline(msg):
    parts = []
    for k, v in msg:
        parts.append(f"{k} {{ {_inline(v)} }}" if _is_msg(v) else f"{k}: {_scalar(v)}")
    return " ".join(parts)


def write_msg(msg, indent=0):
    """Text format of a message: short leaf messages on one line, the rest as blocks."""
    pad = "  " * indent
    lines = []
    for k, v in msg:
        if not _is_msg(v):
            lines.append(f"{pad}{k}: {_scalar(v)}")
            continue
        one = f"{pad}{k} {{ {_inline(v)} }}"
        if _depth(v) <= 2 and len(one) <= 88 and len(v) <= 6:
            lines.append(one)
        else:
            lines.append(f"{pad}{k} {{")
            lines.append(write_msg(v, indent + 1))
            lines.append(f"{pad}}}")
    return "\n".join(lines)


# --- layer builders ---------------------------------------------------------------------------

TRAIN, TEST, LMDB = Enum("TRAIN"), Enum("TEST"), Enum("LMDB")


def layer(name, type_, bottom=(), top=(), *fields):
    bottom = [bottom] if isinstance(bottom, str) else list(bottom)
    top = [top] if isinstance(top, str) else list(top)
    return [
        ("name", name),
        ("type", type_),
        *[("bottom", b) for b in bottom],
        *[("top", t) for t in top],
        *fields,
    ]


LEARN = [
    ("param", [("lr_mult", 1), ("decay_mult", 1)]),
    ("param", [("lr_mult", 2), ("decay_mult", 0)]),
]
LEARN_NO_BIAS = [("param", [("lr_mult", 1), ("decay_mult", 1)])]


def filler(type_, **kw):
    return [("type", type_), *kw.items()]


def conv(name, bottom, num, k, stride=1, pad=0, top=None, bias=True, wf=None, bf=None, group=1):
    p = [("num_output", num)]
    if not bias:
        p.append(("bias_term", False))
    if pad:
        p.append(("pad", pad))
    p.append(("kernel_size", k))
    if stride != 1:
        p.append(("stride", stride))
    if group != 1:
        p.append(("group", group))
    p.append(("weight_filler", wf or filler("msra")))
    if bias:
        p.append(("bias_filler", bf or filler("constant", value=0.0)))
    return layer(
        name, "Convolution", bottom, top or name, *(LEARN if bias else LEARN_NO_BIAS),
        ("convolution_param", p),
    )  # fmt: skip


def fc(name, bottom, num, top=None, wf=None, bf=None):
    p = [
        ("num_output", num),
        ("weight_filler", wf or filler("gaussian", std=0.005)),
        ("bias_filler", bf or filler("constant", value=0.0)),
    ]
    return layer(name, "InnerProduct", bottom, top or name, *LEARN, ("inner_product_param", p))


def relu(name, blob):
    return layer(name, "ReLU", blob, blob)


def pool(name, bottom, method, k, stride, pad=0, top=None):
    p = [("pool", Enum(method)), ("kernel_size", k), ("stride", stride)]
    if pad:
        p.append(("pad", pad))
    return layer(name, "Pooling", bottom, top or name, ("pooling_param", p))


def lrn(name, bottom, top=None):
    p = [("local_size", 5), ("alpha", 0.0001), ("beta", 0.75)]
    return layer(name, "LRN", bottom, top or name, ("lrn_param", p))


def dropout(name, blob, ratio):
    return layer(name, "Dropout", blob, blob, ("dropout_param", [("dropout_ratio", ratio)]))


def imagenet_data(crop, batch_train, batch_test):
    """TRAIN and TEST Data layers over ImageNet LMDBs (BGR, 256 px), per-channel mean."""
    out = []
    for phase, source, batch, mirror in (
        (TRAIN, "work/ilsvrc12_train_lmdb", batch_train, True),
        (TEST, "work/ilsvrc12_val_lmdb", batch_test, False),
    ):
        transform = [("mirror", mirror), ("crop_size", crop)]
        transform += [("mean_value", v) for v in (104, 117, 123)]
        out.append(
            layer(
                "data", "Data", (), ("data", "label"),
                ("include", [("phase", phase)]),
                ("transform_param", transform),
                ("data_param", [("source", source), ("batch_size", batch), ("backend", LMDB)]),
            )
        )  # fmt: skip
    return out


def deploy_input(size, batch=10):
    shape = [("dim", batch), ("dim", 3), ("dim", size), ("dim", size)]
    return [layer("data", "Input", (), "data", ("input_param", [("shape", shape)]))]


def classifier_tail(kind, bottom, prefix=""):
    """Softmax for deploy; loss + top-1 / top-5 accuracy for train_val."""
    if kind == "deploy":
        return [layer("prob", "Softmax", bottom, "prob")]
    test = ("include", [("phase", TEST)])
    return [
        layer(f"{prefix}accuracy", "Accuracy", (bottom, "label"), f"{prefix}accuracy", test),
        layer(
            f"{prefix}accuracy_top5", "Accuracy", (bottom, "label"), f"{prefix}accuracy_top5",
            test, ("accuracy_param", [("top_k", 5)]),
        ),
        layer(f"{prefix}loss", "SoftmaxWithLoss", (bottom, "label"), f"{prefix}loss"),
    ]  # fmt: skip


def net_text(name, layers, header):
    body = "\n".join("layer {\n" + write_msg(lp, 1) + "\n}" for lp in layers)
    comments = "".join(f"# {line}\n" for line in header)
    note = "# Generated by conf/generate_zoo.py; edit that script, not this file.\n"
    return f'{comments}{note}name: "{name}"\n{body}\n'


# --- VGG-16 -----------------------------------------------------------------------------------


def vgg16(kind):
    layers = imagenet_data(224, 32, 50) if kind == "train_val" else deploy_input(224)
    bottom = "data"
    for stage, (width, depth) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)), 1):
        for i in range(1, depth + 1):
            name = f"conv{stage}_{i}"
            layers.append(conv(name, bottom, width, 3, pad=1))
            layers.append(relu(f"relu{stage}_{i}", name))
            bottom = name
        layers.append(pool(f"pool{stage}", bottom, "MAX", 2, 2))
        bottom = f"pool{stage}"
    for i in (6, 7):
        layers.append(fc(f"fc{i}", bottom, 4096))
        layers.append(relu(f"relu{i}", f"fc{i}"))
        layers.append(dropout(f"drop{i}", f"fc{i}", 0.5))
        bottom = f"fc{i}"
    layers.append(fc("fc8", bottom, 1000, wf=filler("gaussian", std=0.01)))
    layers += classifier_tail(kind, "fc8")
    return net_text(
        "VGG_ILSVRC_16_layers",
        layers,
        [
            "VGG-16 (Simonyan & Zisserman 2014, configuration D): 13 3x3 convolutions in five",
            "stages + three fully connected layers, 224x224 input; 138,357,544 parameters.",
        ],
    )


# --- GoogLeNet --------------------------------------------------------------------------------

# Inception modules: (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection).
INCEPTION = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}
G_WF = filler("xavier", std=0.1)
G_BF = filler("constant", value=0.2)


def g_conv(name, bottom, num, k, stride=1, pad=0, relu_name=None):
    out = [conv(name, bottom, num, k, stride, pad, wf=G_WF, bf=G_BF)]
    out.append(relu(relu_name, name))
    return out


def inception(tag, bottom):
    n1, n3r, n3, n5r, n5, npool = INCEPTION[tag]
    p = f"inception_{tag}"
    out = g_conv(f"{p}/1x1", bottom, n1, 1, relu_name=f"{p}/relu_1x1")
    out += g_conv(f"{p}/3x3_reduce", bottom, n3r, 1, relu_name=f"{p}/relu_3x3_reduce")
    out += g_conv(f"{p}/3x3", f"{p}/3x3_reduce", n3, 3, pad=1, relu_name=f"{p}/relu_3x3")
    out += g_conv(f"{p}/5x5_reduce", bottom, n5r, 1, relu_name=f"{p}/relu_5x5_reduce")
    out += g_conv(f"{p}/5x5", f"{p}/5x5_reduce", n5, 5, pad=2, relu_name=f"{p}/relu_5x5")
    out.append(pool(f"{p}/pool", bottom, "MAX", 3, 1, pad=1))
    out += g_conv(f"{p}/pool_proj", f"{p}/pool", npool, 1, relu_name=f"{p}/relu_pool_proj")
    branches = (f"{p}/1x1", f"{p}/3x3", f"{p}/5x5", f"{p}/pool_proj")
    out.append(layer(f"{p}/output", "Concat", branches, f"{p}/output"))
    return out, f"{p}/output"


def aux_head(n, bottom):
    """The auxiliary classifier of the training net (loss weight 0.3)."""
    p = f"loss{n}"
    out = [pool(f"{p}/ave_pool", bottom, "AVE", 5, 3)]
    out += g_conv(f"{p}/conv", f"{p}/ave_pool", 128, 1, relu_name=f"{p}/relu_conv")
    out.append(fc(f"{p}/fc", f"{p}/conv", 1024, wf=G_WF, bf=G_BF))
    out.append(relu(f"{p}/relu_fc", f"{p}/fc"))
    out.append(dropout(f"{p}/drop_fc", f"{p}/fc", 0.7))
    out.append(fc(f"{p}/classifier", f"{p}/fc", 1000, wf=G_WF, bf=filler("constant", value=0.0)))
    cls = f"{p}/classifier"
    test = ("include", [("phase", TEST)])
    out.append(
        layer(f"{p}/loss", "SoftmaxWithLoss", (cls, "label"), f"{p}/loss{n}", ("loss_weight", 0.3))
    )
    out.append(layer(f"{p}/top-1", "Accuracy", (cls, "label"), f"{p}/top-1", test))
    out.append(
        layer(f"{p}/top-5", "Accuracy", (cls, "label"), f"{p}/top-5", test,
              ("accuracy_param", [("top_k", 5)]))
    )  # fmt: skip
    return out


def googlenet(kind):
    train = kind == "train_val"
    layers = imagenet_data(224, 32, 50) if train else deploy_input(224)
    layers += g_conv("conv1/7x7_s2", "data", 64, 7, stride=2, pad=3, relu_name="conv1/relu_7x7")
    layers.append(pool("pool1/3x3_s2", "conv1/7x7_s2", "MAX", 3, 2))
    layers.append(lrn("pool1/norm1", "pool1/3x3_s2"))
    layers += g_conv("conv2/3x3_reduce", "pool1/norm1", 64, 1, relu_name="conv2/relu_3x3_reduce")
    layers += g_conv("conv2/3x3", "conv2/3x3_reduce", 192, 3, pad=1, relu_name="conv2/relu_3x3")
    layers.append(lrn("conv2/norm2", "conv2/3x3"))
    layers.append(pool("pool2/3x3_s2", "conv2/norm2", "MAX", 3, 2))
    bottom = "pool2/3x3_s2"
    for tag in INCEPTION:
        mod, bottom = inception(tag, bottom)
        layers += mod
        if tag in ("3b", "4e"):
            name = "pool3/3x3_s2" if tag == "3b" else "pool4/3x3_s2"
            layers.append(pool(name, bottom, "MAX", 3, 2))
            bottom = name
        if train and tag in ("4a", "4d"):
            layers += aux_head(1 if tag == "4a" else 2, bottom)
    layers.append(pool("pool5/7x7_s1", bottom, "AVE", 7, 1))
    layers.append(dropout("pool5/drop_7x7_s1", "pool5/7x7_s1", 0.4))
    cls = "loss3/classifier"
    layers.append(fc(cls, "pool5/7x7_s1", 1000, wf=G_WF, bf=filler("constant", value=0.0)))
    if train:
        test = ("include", [("phase", TEST)])
        layers.append(
            layer(
                "loss3/loss3",
                "SoftmaxWithLoss",
                (cls, "label"),
                "loss3/loss3",
                ("loss_weight", 1.0),
            )
        )
        layers.append(layer("loss3/top-1", "Accuracy", (cls, "label"), "loss3/top-1", test))
        layers.append(
            layer("loss3/top-5", "Accuracy", (cls, "label"), "loss3/top-5", test,
                  ("accuracy_param", [("top_k", 5)]))
        )  # fmt: skip
    else:
        layers += classifier_tail(kind, cls)
    return net_text(
        "GoogleNet",
        layers,
        [
            "GoogLeNet (Szegedy et al. 2014): nine Inception modules, 224x224 input.",
            "train_val adds the two auxiliary classifiers (loss weight 0.3); deploy has none.",
        ],
    )


# --- ResNet-50 --------------------------------------------------------------------------------


def conv_bn(name, bottom, num, k, stride=1, pad=0, suffix=None, bias=False, with_relu=True):
    """Convolution + BatchNorm + Scale (+ ReLU), named as in the ResNet release:
    res2a_branch2a / bn2a_branch2a / scale2a_branch2a / res2a_branch2a_relu."""
    suffix = suffix if suffix is not None else name[len("res") :]
    out = [conv(name, bottom, num, k, stride, pad, bias=bias)]
    out.append(layer(f"bn{suffix}", "BatchNorm", name, name))
    scale = [("bias_term", True)]
    out.append(layer(f"scale{suffix}", "Scale", name, name, ("scale_param", scale)))
    if with_relu:
        out.append(relu(f"{name}_relu", name))
    return out


def bottleneck(stage, block, bottom, width, stride, project):
    tag = f"{stage}{block}"
    out = []
    if project:
        out += conv_bn(f"res{tag}_branch1", bottom, 4 * width, 1, stride, with_relu=False)
        shortcut = f"res{tag}_branch1"
    else:
        shortcut = bottom
    out += conv_bn(f"res{tag}_branch2a", bottom, width, 1, stride)
    out += conv_bn(f"res{tag}_branch2b", f"res{tag}_branch2a", width, 3, pad=1)
    out += conv_bn(f"res{tag}_branch2c", f"res{tag}_branch2b", 4 * width, 1, with_relu=False)
    out.append(layer(f"res{tag}", "Eltwise", (shortcut, f"res{tag}_branch2c"), f"res{tag}"))
    out.append(relu(f"res{tag}_relu", f"res{tag}"))
    return out, f"res{tag}"


def resnet50(kind):
    layers = imagenet_data(224, 32, 25) if kind == "train_val" else deploy_input(224)
    # conv1 keeps its bias, as in the released ResNet-50 (the other convolutions have none).
    layers += conv_bn("conv1", "data", 64, 7, stride=2, pad=3, suffix="_conv1", bias=True)
    layers.append(pool("pool1", "conv1", "MAX", 3, 2))
    bottom = "pool1"
    for stage, width, blocks in ((2, 64, 3), (3, 128, 4), (4, 256, 6), (5, 512, 3)):
        for i in range(blocks):
            stride = 2 if (i == 0 and stage > 2) else 1
            mod, bottom = bottleneck(stage, "abcdef"[i], bottom, width, stride, project=i == 0)
            layers += mod
    layers.append(pool("pool5", bottom, "AVE", 7, 1))
    layers.append(fc("fc1000", "pool5", 1000, wf=filler("msra")))
    layers += classifier_tail(kind, "fc1000")
    return net_text(
        "ResNet-50",
        layers,
        [
            "ResNet-50 (He et al. 2015): bottleneck blocks 3-4-6-3, each convolution followed",
            "by BatchNorm (statistics) + Scale (learned gamma, beta); 224x224 input.",
        ],
    )


NETS = {"vgg16": vgg16, "googlenet": googlenet, "resnet50": resnet50}


def outputs():
    """{path: text} of every generated file."""
    return {
        CONF / name / f"{kind}.prototxt": build(kind)
        for name, build in NETS.items()
        for kind in ("train_val", "deploy")
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    for path in stale:
        print(f"out of date: {path} (run python conf/generate_zoo.py)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
