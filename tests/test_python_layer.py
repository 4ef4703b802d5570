"""Python layers (`type: "Python"`): user classes loaded from python_param, run pycaffe-style."""

import numpy as np
import pytest
from google.protobuf import text_format

import engine
from engine.layer import LayerError, create_layer
from engine.proto import caffe_pb2
from tests.gradient_check import check_gradient, make_blobs

USER_LAYERS = '''
import numpy as np

import engine as caffe


class EuclideanLossLayer(caffe.Layer):
    """The loss of Caffe's pycaffe example: sum((a - b)^2) / 2 / num."""

    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise Exception("Need two inputs to compute distance.")

    def reshape(self, bottom, top):
        if bottom[0].count != bottom[1].count:
            raise Exception("Inputs must have the same dimension.")
        self.diff = np.zeros_like(bottom[0].data, dtype=np.float32)
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.diff[...] = bottom[0].data - bottom[1].data
        top[0].data[...] = np.sum(self.diff**2) / bottom[0].num / 2.0

    def backward(self, top, propagate_down, bottom):
        for i in range(2):
            if not propagate_down[i]:
                continue
            sign = 1 if i == 0 else -1
            bottom[i].diff[...] = sign * self.diff / bottom[i].num


class ChannelScale(caffe.Layer):
    """y = x * w[c] with a learnable w (one per channel), set to param_str's value."""

    def setup(self, bottom, top):
        self.seen = (self.param_str, self.phase)
        w = self.blobs.add_blob(bottom[0].channels)
        w.data[...] = float(self.param_str or 1)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        shape = (1, -1) + (1,) * (bottom[0].data.ndim - 2)
        top[0].data[...] = bottom[0].data * self.blobs[0].data.reshape(shape)

    def backward(self, top, propagate_down, bottom):
        shape = (1, -1) + (1,) * (bottom[0].data.ndim - 2)
        axes = (0,) + tuple(range(2, bottom[0].data.ndim))
        self.blobs[0].diff[...] += (top[0].diff * bottom[0].data).sum(axis=axes)
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff * self.blobs[0].data.reshape(shape)


class Double:
    """Not a caffe.Layer subclass: duck typing is enough. Runs in place."""

    def __init__(self, param):
        self.name = param.name

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = 2 * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = 2 * top[0].diff


class Broken(caffe.Layer):
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        raise RuntimeError("boom")
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_layers.py").write_text(USER_LAYERS)
    (tmp_path / "needs_missing.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def layer_param(text):
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def net_from(text, phase=engine.TRAIN):
    return engine.Net(text_format.Parse(text, caffe_pb2.NetParameter()), phase)


INPUTS = """
layer { name: "in" type: "Input" top: "a" top: "b"
        input_param { shape { dim: 4 dim: 3 dim: 2 dim: 2 }
                      shape { dim: 4 dim: 3 dim: 2 dim: 2 } } }
"""


def test_python_loss_matches_builtin_euclidean_loss(user_module):
    rs = np.random.RandomState(0)
    a, b = rs.randn(2, 4, 3, 2, 2).astype(np.float32)
    results = []
    for layer in (
        'type: "Python" python_param { module: "user_layers" layer: "EuclideanLossLayer" } '
        "loss_weight: 1",
        'type: "EuclideanLoss"',
    ):
        net = net_from(
            INPUTS + f'layer {{ name: "loss" {layer} bottom: "a" bottom: "b" top: "loss" }} '
            "force_backward: true"
        )
        out = net.forward(a=a, b=b)
        net.backward()
        results.append((out["loss"].item(), net.blobs["a"].diff.copy(), net.blobs["b"].diff))
    (loss, da, db), (ref_loss, ref_da, ref_db) = results
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    np.testing.assert_allclose(da, ref_da, rtol=1e-6)
    np.testing.assert_allclose(db, ref_db, rtol=1e-6)
    assert net.layers[-1].type == "EuclideanLoss"


def test_param_str_phase_and_learnable_blobs(user_module, tmp_path):
    text = INPUTS + (
        'layer { name: "scale" type: "Python" bottom: "a" top: "s" '
        'python_param { module: "user_layers" layer: "ChannelScale" param_str: "0.5" } }'
    )
    for phase in (engine.TRAIN, engine.TEST):
        net = net_from(text, phase)
        impl = net.layers[1].impl
        assert impl.seen == ("0.5", int(phase))
        assert net.layers[1].type == "Python"
    assert [b.shape for b in net.params["scale"]] == [(3,)]
    np.testing.assert_array_equal(net.params["scale"][0].data, 0.5)
    a = np.random.RandomState(1).randn(4, 3, 2, 2).astype(np.float32)
    np.testing.assert_allclose(net.forward(a=a)["s"], 0.5 * a)
    # The user's blobs are the net's parameters: saved in the caffemodel and loaded back.
    net.params["scale"][0].data[...] = [1, 2, 3]
    net.save(str(tmp_path / "w.caffemodel"))
    again = net_from(text)
    again.copy_from(str(tmp_path / "w.caffemodel"))
    np.testing.assert_array_equal(again.params["scale"][0].data, [1, 2, 3])


def test_gradients_of_a_python_layer(user_module):
    layer = create_layer(
        layer_param(
            'name: "s" type: "Python" '
            'python_param { module: "user_layers" layer: "ChannelScale" param_str: "1.5" }'
        ),
        engine.TRAIN,
    )
    rs = np.random.RandomState(2)
    bottom = make_blobs(rs.randn(2, 3, 2, 2).astype(np.float32))
    top = make_blobs(np.zeros(1, np.float32))
    check_gradient(layer, bottom, top)


SOLVER_NET = """
layer { name: "in" type: "Input" top: "x" top: "y"
        input_param { shape { dim: 8 dim: 2 dim: 1 dim: 1 }
                      shape { dim: 8 dim: 2 dim: 1 dim: 1 } } }
layer { name: "scale" type: "Python" bottom: "x" top: "s"
        python_param { module: "user_layers" layer: "ChannelScale" param_str: "1" }
        %s }
layer { name: "loss" type: "Python" bottom: "s" bottom: "y" top: "loss" loss_weight: 1
        python_param { module: "user_layers" layer: "EuclideanLossLayer" } }
"""


@pytest.mark.parametrize("lr_mult", [1, 0])
def test_solver_trains_python_layer_params(user_module, tmp_path, lr_mult):
    (tmp_path / "net.prototxt").write_text(SOLVER_NET % f"param {{ lr_mult: {lr_mult} }}")
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path}/net.prototxt" base_lr: 0.5 lr_policy: "fixed" momentum: 0.0 '
        f'max_iter: 60 display: 0 snapshot_prefix: "{tmp_path}/py"'
    )
    solver = engine.get_solver(str(tmp_path / "solver.prototxt"))
    x = np.random.RandomState(3).randn(8, 2, 1, 1).astype(np.float32)
    solver.net.blobs["x"].data[...] = x
    solver.net.blobs["y"].data[...] = x * np.array([3.0, -2.0], np.float32).reshape(1, 2, 1, 1)
    solver.step(60)
    w = solver.net.params["scale"][0].data
    if lr_mult:
        np.testing.assert_allclose(w, [3.0, -2.0], atol=1e-3)  # y = x * [3, -2] learned
    else:
        np.testing.assert_array_equal(w, [1.0, 1.0])  # frozen: lr_mult 0
        assert not solver.net.layers[1].param_propagate_down[0]


def test_duck_typed_class_in_place(user_module):
    net = net_from(
        INPUTS + 'layer { name: "d" type: "Python" bottom: "a" top: "a" '
        'python_param { module: "user_layers" layer: "Double" } } force_backward: true'
    )
    a = np.arange(48, dtype=np.float32).reshape(4, 3, 2, 2)
    np.testing.assert_array_equal(net.forward(a=a.copy())["a"], 2 * a)
    net.blobs["a"].diff[...] = 1
    net.backward()
    np.testing.assert_array_equal(net.blobs["a"].diff, 2)


@pytest.mark.parametrize(
    "python_param, message",
    [
        ('module: "user_layers"', "needs both `module` and `layer`"),
        ('module: "no_such_module_abc" layer: "X"', "cannot import module 'no_such_module_abc'"),
        ('module: "needs_missing" layer: "X"', "no_such_dependency_xyz"),
        ('module: "user_layers" layer: "Nope"', "has no 'Nope'"),
    ],
)
def test_load_errors_name_the_layer(user_module, python_param, message):
    with pytest.raises(LayerError, match="layer 'bad'") as err:
        net_from(
            INPUTS + 'layer { name: "bad" type: "Python" bottom: "a" top: "t" '
            f"python_param {{ {python_param} }} }}"
        )
    assert message in str(err.value) and str(err.value).count("layer 'bad'") == 1
    if "cannot import" in message:
        assert "PYTHONPATH" in str(err.value) and str(user_module) in str(err.value)


def test_error_inside_user_code_keeps_traceback_and_names_layer(user_module):
    net = net_from(
        INPUTS + 'layer { name: "bad" type: "Python" bottom: "a" top: "t" '
        'python_param { module: "user_layers" layer: "Broken" } }'
    )
    with pytest.raises(RuntimeError, match="boom") as err:
        net.forward()
    assert any(
        "user_layers.Broken.forward() of Python layer 'bad'" in n for n in err.value.__notes__
    )
