"""Tests of the conf/ model zoo: every deploy net builds, runs forward and backward and has the
published parameter count and output shape; train_val nets build over tiny LMDBs; nets that
BVLC Caffe ran in the golden suite match it; draw_net renders them all."""

import dataclasses
import importlib.util
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

import engine
from engine import io
from engine.layer import registered_types
from engine.proto import caffe_pb2
from engine.tools import draw_net
from tests import golden

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@dataclasses.dataclass
class Model:
    name: str
    deploy: str  # file under conf/<name>/, or "" to derive one from train_val (LeNet)
    train_val: str
    inputs: dict  # deploy input blob -> shape used here
    output: str
    out_shape: tuple
    params: int  # every parameter blob, as Caffe stores them in a .caffemodel
    types: tuple  # layer types the net needs
    slow: bool = False
    learnable: int = None  # without BatchNorm's statistics blobs, where they differ
    golden: str = ""  # golden nets/ case with the same architecture


CNN = ("Convolution", "Pooling", "InnerProduct", "ReLU", "Softmax")
MODELS = [
    # LeNet: conv 20*1*5*5+20 = 520, conv 50*20*5*5+50 = 25,050, ip 500*800+500 = 400,500,
    # ip 10*500+10 = 5,010.
    Model("lenet", "", "lenet_train_test.prototxt", {"data": (2, 1, 28, 28), "label": (2,)},
          "ip2", (2, 10), 431_080, CNN + ("SoftmaxWithLoss",), golden="lenet"),
    # 2,432 + 25,632 + 51,264 + ip1 64*(64*4*4)+64 = 65,600 + ip2 650.
    Model("cifar10_quick", "deploy.prototxt", "train_val.prototxt", {"data": (2, 3, 32, 32)},
          "prob", (2, 10), 145_578, CNN, golden="cifar10_quick"),
    # 2,432 + 25,632 + 51,264 + ip1 10*1024+10 = 10,250.
    Model("cifar10_full", "deploy.prototxt", "train_val.prototxt", {"data": (2, 3, 32, 32)},
          "prob", (2, 10), 89_578, CNN + ("LRN",), golden="cifar10_full"),
    # conv1 34,944; conv2 (group 2) 307,456; conv3 885,120; conv4 663,936; conv5 442,624;
    # fc6 37,752,832; fc7 16,781,312; fc8 4,097,000.
    Model("caffenet", "deploy.prototxt", "train_val.prototxt", {"data": (1, 3, 227, 227)},
          "prob", (1, 1000), 60_965_224, CNN + ("LRN", "Dropout"), slow=True,
          golden="caffenet"),
    # Deploy net without the two auxiliary heads: 6,998,552 (the sum over the parameter
    # shapes Caffe reported for bvlc_googlenet in the golden case).
    Model("googlenet", "deploy.prototxt", "train_val.prototxt", {"data": (1, 3, 224, 224)},
          "prob", (1, 1000), 6_998_552, CNN + ("LRN", "Dropout", "Concat"), slow=True,
          golden="googlenet"),
    Model("vgg16", "deploy.prototxt", "train_val.prototxt", {"data": (1, 3, 224, 224)},
          "prob", (1, 1000), 138_357_544, CNN + ("Dropout",), slow=True),
    # ResNet-50 is usually quoted as 25,557,032 parameters: conv weights (no biases),
    # BatchNorm gamma / beta and fc1000. Caffe stores gamma / beta in the Scale layers (same
    # count), and the released Caffe model keeps a bias on conv1 (+64): 25,557,096 learned
    # values. Each of the 53 BatchNorm layers also stores mean (C), variance (C) and the
    # moving-average factor (1): 2 * 26,560 + 53 = 53,173 more, 25,610,269 in the caffemodel.
    Model("resnet50", "deploy.prototxt", "train_val.prototxt", {"data": (1, 3, 224, 224)},
          "prob", (1, 1000), 25_610_269, CNN + ("BatchNorm", "Scale", "Eltwise"), slow=True,
          learnable=25_557_096),
    # image CNN: 2,432 + 18,496 + 73,856 + fc 256*128+256 = 33,024; embed 4000*256 = 1,024,000;
    # lstm1 4*512*(256+512)+4*512 = 1,574,912; lstm2 with the 256-d static input
    # 4*512*(512+256+512)+4*512 = 2,623,488; predict 4000*512+4000 = 2,052,000.
    Model("lrcn", "deploy.prototxt", "train_val.prototxt",
          {"data": (2, 3, 64, 64), "input_sentence": (5, 2), "cont_sentence": (5, 2)},
          "probs", (5, 2, 4000), 7_402_208, CNN + ("Embed", "LSTM")),
]  # fmt: skip


def params_of(models, slow_mark=True):
    out = []
    for m in models:
        marks = []
        missing = sorted(set(m.types) - set(registered_types()))
        if missing:
            marks.append(pytest.mark.skip(reason=f"layer types not registered yet: {missing}"))
        if m.slow and slow_mark:
            marks.append(pytest.mark.slow)
        out.append(pytest.param(m, id=m.name, marks=marks))
    return out


def read_net(path):
    return io.read_prototxt(path, caffe_pb2.NetParameter())


def derived_deploy(train_val, inputs):
    """A TEST-phase net with Input layers in place of the Data layers (LeNet has no deploy)."""
    param = caffe_pb2.NetParameter()
    param.CopyFrom(train_val)
    del param.layer[:]
    first = param.layer.add(name="input", type="Input", top=list(inputs))
    for shape in inputs.values():
        first.input_param.shape.add(dim=shape)
    for lp in train_val.layer:
        # Drop the data layers and the phase-specific ones (LeNet's TEST-only Accuracy).
        if lp.type != "Data" and not lp.include and not lp.exclude:
            param.layer.add().CopyFrom(lp)
    return param


def deploy_param(model, inputs=None):
    """The model's deploy NetParameter with its Input shapes set and force_backward on."""
    inputs = inputs or model.inputs
    folder = CONF / model.name
    if not model.deploy:
        param = derived_deploy(read_net(folder / model.train_val), inputs)
    else:
        param = read_net(folder / model.deploy)
        for lp in param.layer:
            if lp.type == "Input":
                for top, shape in zip(lp.top, lp.input_param.shape):
                    del shape.dim[:]
                    shape.dim.extend(inputs[top])
    param.force_backward = True
    return param


def fill_inputs(net, model, rng):
    for name, shape in model.inputs.items():
        if name == "input_sentence":
            value = rng.integers(0, 4000, shape)
        elif name == "cont_sentence":
            value = np.ones(shape)
            value[0] = 0
        elif name == "label":
            value = rng.integers(0, 10, shape)
        else:
            value = rng.standard_normal(shape)
        net.blobs[name].data[...] = value


def calibrate_batchnorm(net):
    """Give BatchNorm layers the statistics of the current input, layer by layer, as trained
    ones would be. Fresh layers hold zeros: with zero variance each of ResNet's 53 BatchNorms
    multiplies by 1/sqrt(eps), and unnormalised random nets saturate the softmax."""
    for i, layer in enumerate(net.layers):
        if layer.param.type == "BatchNorm":
            x = np.asarray(net.bottom_vecs[i][0].data, dtype=np.float64)
            axes = (0,) + tuple(range(2, x.ndim))
            mean, var, factor = layer.blobs
            mean.data[...], var.data[...] = x.mean(axis=axes), x.var(axis=axes)
            factor.data[...] = 1
        net.forward_from_to(i, i)


def count(net, skip_types=()):
    return sum(
        b.count for layer in net.layers if layer.param.type not in skip_types for b in layer.blobs
    )


# --- deploy nets -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", params_of(MODELS))
def test_deploy_net_forward_backward(model):
    engine.set_random_seed(5)
    net = engine.Net(deploy_param(model), engine.TEST)
    assert count(net) == model.params
    if model.learnable is not None:
        assert count(net, ("BatchNorm",)) == model.learnable
    out = net.blobs[model.output]
    assert out.shape == model.out_shape
    rng = np.random.default_rng(0)
    fill_inputs(net, model, rng)
    calibrate_batchnorm(net)
    net.forward()
    y = np.asarray(out.data)
    assert np.isfinite(y).all()
    if model.output in ("prob", "probs"):
        np.testing.assert_allclose(y.sum(axis=-1), 1.0, rtol=1e-4)
    net.clear_param_diffs()
    if not any(any(layer.loss_weights) for layer in net.layers):
        out.diff[...] = rng.standard_normal(out.shape)  # no loss: start from a random top diff
    net.backward()
    grad = np.asarray(net.blobs["data"].diff)
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0
    first = net.learnable_params[0]
    assert np.abs(np.asarray(first.diff)).max() > 0
    assert all(np.isfinite(np.asarray(p.diff)).all() for p in net.learnable_params)


def test_zoo_covers_every_folder():
    folders = {p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    assert folders == {m.name for m in MODELS}


@pytest.mark.parametrize("model", params_of(MODELS, slow_mark=False))
def test_files_parse_and_are_current(model):
    from engine.upgrade import net_needs_upgrade, solver_needs_upgrade

    folder = CONF / model.name
    nets = [folder / model.train_val] + ([folder / model.deploy] if model.deploy else [])
    for path in nets:
        param = read_net(path)
        assert not net_needs_upgrade(param), path
        names = [lp.name for lp in param.layer]
        # Layer names are unique within each phase (TRAIN / TEST data layers share a name).
        for phase in (caffe_pb2.TRAIN, caffe_pb2.TEST):
            kept = draw_net.select_phase(param, caffe_pb2.Phase.Name(phase)).layer
            kept = [lp.name for lp in kept]
            assert len(kept) == len(set(kept)), (path, phase)
        assert names
    solvers = sorted(folder.glob("*solver*.prototxt"))
    assert len(solvers) == 1
    solver = io.read_prototxt(solvers[0], caffe_pb2.SolverParameter())
    assert not solver_needs_upgrade(solver)
    assert (ROOT / solver.net) == folder / model.train_val
    assert solver.base_lr > 0 and solver.max_iter > 0 and solver.lr_policy
    assert len(solver.test_iter) == 1 and solver.test_interval > 0


def test_generated_files_are_up_to_date():
    spec = importlib.util.spec_from_file_location("generate_zoo", CONF / "generate_zoo.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    outputs = gen.outputs()
    assert {p.parent.name for p in outputs} == {"vgg16", "googlenet", "resnet50"}
    for path, text in outputs.items():
        assert path.read_text() == text, f"{path} is stale: run python conf/generate_zoo.py"
        text_format.Parse(text, caffe_pb2.NetParameter())


# --- the nets Caffe itself ran (golden nets/) --------------------------------------------------


def golden_models():
    out = []
    for p in params_of([m for m in MODELS if m.golden]):
        model = p.values[0]
        marks = list(p.marks)
        if not (golden.GOLDEN / "nets" / model.golden).is_dir():
            marks.append(pytest.mark.skip(reason="no golden suite"))
        out.append(pytest.param(model, id=model.name, marks=marks))
    return out


@pytest.mark.parametrize("model", golden_models())
def test_matches_caffe_golden(model):
    """Our zoo file, with the golden case's weights and input, gives Caffe's numbers: the same
    layer names, parameter shapes, blobs and (where the case ran one) gradients."""
    case = golden.GOLDEN / "nets" / model.golden
    meta, arrays = golden.load_case(case)
    inputs = {k[len("input/") :]: v.shape for k, v in arrays.items() if k.startswith("input/")}
    inputs = {k: inputs[k] for k in model.inputs}
    net = engine.Net(deploy_param(model, inputs), engine.TEST)
    ours = [(n, i, list(b.shape)) for n, blobs in net.params.items() for i, b in enumerate(blobs)]
    theirs = [(p["layer"], p["index"], p["shape"]) for p in meta["params"]]
    assert ours == theirs
    if meta.get("weights"):
        net.copy_from(str(case / meta["weights"]))
    else:
        golden.recipe_weights(net, meta)
    for name in inputs:
        net.blobs[name].data[...] = arrays[f"input/{name}"]
    net.forward()
    compared = [k for k in arrays if k.startswith("output/") and k[7:] in net.blobs]
    assert len(compared) >= 3
    golden.compare(net, meta, {k: arrays[k] for k in compared}, ("output",))
    # Backward where our net ends like Caffe's: the loss (LeNet) or a diff on prob.
    top_diffs = {k: v for k, v in arrays.items() if k.startswith("top_diff/")}
    has_loss = any(k[len("output/") :] in net.outputs for k in compared if "loss" in k)
    if not (top_diffs or has_loss):
        return
    net.clear_param_diffs()
    for key, value in top_diffs.items():
        net.blobs[key[len("top_diff/") :]].diff[...] = value
    net.backward()
    kinds = ("bottom_diff", "param_diff", "blob_diff")
    checked = {}
    for key, value in arrays.items():
        kind, name, _ = golden.split_key(key)
        if kind in kinds and name in (net.params if kind == "param_diff" else net.blobs):
            checked[key] = value
    assert checked
    golden.compare(net, meta, checked, kinds)


# --- train_val nets over tiny data -------------------------------------------------------------


def write_lmdb(path, shape, n=4, seed=0):
    from engine.data.lmdb_io import LMDBWriter

    rng = np.random.default_rng(seed)
    with LMDBWriter(path) as db:
        for i in range(n):
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            db.put(f"{i:08d}", io.array_to_datum(pixels, label=i % 10).SerializeToString())
    return str(path)


def write_sentences(folder, streams, rows=8, vocab=4000, seed=0):
    import h5py

    rng = np.random.default_rng(seed)
    cont = np.ones((rows, streams), np.float32)
    cont[::4] = 0  # a new sentence every 4 steps
    words = rng.integers(1, vocab, (rows, streams)).astype(np.float32)
    target = np.roll(words, -1, axis=0)
    target[3::4] = -1  # nothing to predict after the last word
    h5 = folder / "sentences.h5"
    with h5py.File(h5, "w") as f:
        f["cont_sentence"], f["input_sentence"], f["target_sentence"] = cont, words, target
    listing = folder / "sentences.txt"
    listing.write_text(f"{h5}\n")
    return str(listing)


TRAIN_VAL_DATA = {
    # model: stored image shape (C, H, W) of its tiny LMDB
    "lenet": (1, 28, 28),
    "cifar10_quick": (3, 32, 32),
    "cifar10_full": (3, 32, 32),
    "caffenet": (3, 240, 240),
    "googlenet": (3, 232, 232),
    "vgg16": (3, 232, 232),
    "resnet50": (3, 232, 232),
    "lrcn": (3, 72, 72),
}


def point_at_tiny_data(param, folder, image_shape, batch=2, steps=3):
    """Rewrite the Data / HDF5Data layers of a train_val net to read tiny temporary files."""
    db = write_lmdb(folder / "images_lmdb", image_shape)
    mean = folder / "mean.binaryproto"
    io.write_binary(mean, io.array_to_blobproto(np.full((1,) + image_shape, 100, np.float32)))
    for lp in param.layer:
        if lp.type == "Data":
            lp.data_param.source = db
            lp.data_param.batch_size = batch
            if lp.transform_param.HasField("mean_file"):
                lp.transform_param.mean_file = str(mean)
        elif lp.type == "HDF5Data":
            if not (folder / "sentences.txt").exists():
                write_sentences(folder, batch)
            lp.hdf5_data_param.source = str(folder / "sentences.txt")
            lp.hdf5_data_param.batch_size = steps
    return param


def close_data_layers(net):
    for layer in net.layers:
        close = getattr(layer, "close", None)
        if close is not None:
            close()


@pytest.mark.parametrize("model", params_of(MODELS))
def test_train_val_builds_on_tiny_data(model, tmp_path):
    needed = {"Data", "SoftmaxWithLoss", "Accuracy"}
    if model.name == "lrcn":
        needed.add("HDF5Data")
    missing = sorted(needed - set(registered_types()))
    if missing:
        pytest.skip(f"layer types not registered yet: {missing}")
    engine.set_random_seed(7)
    param = read_net(CONF / model.name / model.train_val)
    point_at_tiny_data(param, tmp_path, TRAIN_VAL_DATA[model.name])
    big = model.slow
    extra = 0
    if model.name == "googlenet":
        # The training net adds two auxiliary heads: per head a 1x1 conv 128*C+128 (C = 512
        # after inception_4a, 528 after 4d), fc 1024*2048+1024, classifier 1000*1024+1000.
        extra = 128 * 512 + 128 * 528 + 2 * (128 + 1024 * 2048 + 1024 + 1000 * 1024 + 1000)
    for phase in (engine.TRAIN, engine.TEST):
        net = engine.Net(param, phase)
        try:
            assert net.blobs["data"].shape[0] == 2
            assert count(net) == model.params + extra
            losses = [n for n in net.outputs if "loss" in n]
            assert losses
            has_accuracy = any("accuracy" in n or "top-1" in n for n in net.outputs)
            assert has_accuracy == (phase == engine.TEST)
            if big:
                continue
            loss = net.forward_backward() if phase == engine.TRAIN else net.forward_from_to()
            assert np.isfinite(loss) and loss > 0
            if phase == engine.TEST:
                acc = [float(net.blobs[n].data) for n in net.outputs if "accuracy" in n]
                assert all(0.0 <= a <= 1.0 for a in acc)
        finally:
            close_data_layers(net)


# --- draw_net ----------------------------------------------------------------------------------


def zoo_nets():
    out = []
    for m in MODELS:
        for f in (m.train_val, m.deploy):
            if f:
                out.append(pytest.param(CONF / m.name / f, id=f"{m.name}/{f}"))
    return out


@pytest.mark.parametrize("path", zoo_nets())
def test_draw_net_svg_names_every_layer(path, tmp_path):
    out = tmp_path / "net.svg"
    assert draw_net.main([str(path), str(out), "--rankdir", "TB"]) == 0
    root = ET.parse(out).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    ns = {"s": "http://www.w3.org/2000/svg"}
    titles = [t.text for t in root.findall(".//s:g[@class='layer']/s:title", ns)]
    texts = {t.text for t in root.iter("{http://www.w3.org/2000/svg}text")}
    param = read_net(path)
    assert titles == [lp.name for lp in param.layer]
    assert all(lp.name in texts for lp in param.layer)
    # Nodes lie inside the picture and boxes of one rank do not overlap.
    width, height = float(root.get("width")), float(root.get("height"))
    boxes = []
    for rect in root.iter("{http://www.w3.org/2000/svg}rect"):
        x, y, w, h = (float(rect.get(k)) for k in ("x", "y", "width", "height"))
        assert 0 <= x and x + w <= width and 0 <= y and y + h <= height
        boxes.append((x, y, w, h))
    for i, (x, y, w, h) in enumerate(boxes):
        for x2, y2, w2, h2 in boxes[i + 1 :]:
            assert not (x < x2 + w2 and x2 < x + w and y < y2 + h2 and y2 < y + h)
    edges = root.findall(".//s:g[@class='edges']/s:path", ns)
    n_edges = sum(len(lp.bottom) + len(lp.top) for lp in param.layer)
    assert len(edges) == n_edges


def test_draw_net_phase_and_dot(tmp_path):
    path = CONF / "lenet" / "lenet_train_test.prototxt"
    dot = tmp_path / "lenet.dot"
    assert draw_net.main([str(path), str(dot), "--phase", "TRAIN"]) == 0
    text = dot.read_text()
    assert text.startswith('digraph "LeNet" {') and "rankdir=LR;" in text
    assert "accuracy" not in text and "batch 64" in text and "batch 100" not in text
    assert text.count("->") == 2 + 2 * 7 + 3  # data layer, seven 1-in-1-out layers, loss
    svg = tmp_path / "lenet.svg"
    assert draw_net.main([str(path), str(svg), "--phase", "TEST", "--rankdir", "LR"]) == 0
    root = ET.parse(svg).getroot()
    titles = {t.text for t in root.iter("{http://www.w3.org/2000/svg}title")}
    assert "accuracy" in titles and float(root.get("width")) > float(root.get("height"))


def test_pycaffe_draw_module(tmp_path):
    # pycaffe's python/draw_net.py: caffe.draw.draw_net_to_file(net, file, rankdir, phase).
    param = read_net(CONF / "lenet" / "lenet_train_test.prototxt")
    dot = tmp_path / "lenet.dot"
    engine.draw.draw_net_to_file(param, str(dot), "TB", engine.TEST)
    text = dot.read_text()
    assert "rankdir=TB;" in text and "accuracy" in text and "batch 64" not in text
    engine.draw.draw_net_to_file(param, str(tmp_path / "all.dot"), "LR", None)
    assert "batch 64" in (tmp_path / "all.dot").read_text()
    with pytest.raises(ValueError, match=r"cannot draw to \.png: write \.svg, or \.dot"):
        engine.draw.draw_net_to_file(param, str(tmp_path / "net.png"))
    assert not (tmp_path / "net.png").exists()


def test_draw_net_escapes_and_reports_errors(tmp_path, capsys):
    param = text_format.Parse(
        'name: "a<b>&c" layer { name: "in \\"x\\" & <y>" type: "Input" top: "d<1>" '
        "input_param { shape { dim: 1 } } }",
        caffe_pb2.NetParameter(),
    )
    svg = draw_net.to_svg(param)
    root = ET.fromstring(svg.encode())
    assert {t.text for t in root.iter("{http://www.w3.org/2000/svg}text")} >= {
        'in "x" & <y>',
        "d<1>",
    }
    assert '\\"x\\"' in draw_net.to_dot(param)
    missing = tmp_path / "nope.prototxt"
    assert draw_net.main([str(missing), str(tmp_path / "o.svg")]) == 1
    assert str(missing) in capsys.readouterr().err


def test_draw_net_v1_prototxt(tmp_path):
    path = tmp_path / "v1.prototxt"
    path.write_text(
        'name: "old" input: "x" input_dim: 1 input_dim: 1 input_dim: 2 input_dim: 2\n'
        'layers { name: "r" type: RELU bottom: "x" top: "x" }\n'
    )
    svg = draw_net.draw_net_to_file(str(path), tmp_path / "v1.svg")
    titles = [t.text for t in ET.fromstring(svg.encode()).iter("{http://www.w3.org/2000/svg}title")]
    assert "r" in titles and "input" in titles


def test_golden_googlenet_count_matches_the_case():
    """The 6,998,552 used above is the parameter total of Caffe's own bvlc_googlenet deploy."""
    case = golden.GOLDEN / "nets" / "googlenet" / "case.json"
    if not case.exists():
        pytest.skip("no golden suite")
    meta, _ = golden.load_case(case.parent)
    assert sum(math.prod(p["shape"]) for p in meta["params"]) == 6_998_552
