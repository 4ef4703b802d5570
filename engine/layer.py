"""Layer base classes and the type-name registry, as in Caffe's layer.hpp / layer_factory.

A layer has setup (layer_setup + reshape), forward, backward and its parameter `blobs`.
"""

from engine.blob import Blob, BlobVec

_REGISTRY = {}


def register(*type_names):
    """Class decorator: record the class under Caffe type name(s), e.g. @register("ReLU")."""

    def deco(cls):
        for name in type_names:
            if name in _REGISTRY and _REGISTRY[name] is not cls:
                raise ValueError(f"layer type {name!r} registered twice")
            _REGISTRY[name] = cls
        cls.type_name = type_names[0]
        return cls

    return deco


def layer_class(type_name):
    _load_catalog()
    try:
        return _REGISTRY[type_name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown layer type {type_name!r} (known: {known})") from None


def registered_types():
    _load_catalog()
    return sorted(_REGISTRY)


def create_layer(param, phase):
    """Instantiate the layer for a LayerParameter (type looked up in the registry)."""
    return layer_class(param.type)(param, phase)


def _load_catalog():
    # Importing the package registers every layer module it lists.
    import engine.layers  # noqa: F401


class LayerError(ValueError):
    """A configuration or shape error, always naming the layer."""


class Layer:
    """Base of every layer.

    Subclasses override `layer_setup`, `reshape`, `forward`, `backward` and may set the
    bottom/top count limits below. `bottom` and `top` are lists of Blob; `propagate_down` a
    list of bool, one per bottom. Parameter blobs go in `self.blobs` (list of Blob).
    """

    type_name = "Layer"
    exact_num_bottom = None
    min_num_bottom = None
    max_num_bottom = None
    exact_num_top = None
    min_num_top = None
    max_num_top = None
    # A loss layer gets loss_weight 1 on its first top unless the prototxt says otherwise.
    auto_loss_weight = False
    # Whether the layer may write its top into its bottom blob (ReLU, Dropout, ...).
    allow_in_place = False
    # Bottom indices that can never receive a gradient (labels, indices).
    no_grad_bottoms = ()

    def __init__(self, param, phase=None):
        # pycaffe constructs a Python layer's class with the LayerParameter alone and sets
        # `phase` before `setup`, hence the default.
        self.param = param
        self.phase = phase
        self.blobs = BlobVec()
        self.param_propagate_down = []

    @property
    def name(self):
        return self.param.name

    @property
    def type(self):
        """The Caffe type name from the prototxt (pycaffe's `layer.type`)."""
        return self.param.type

    def error(self, message):
        return LayerError(f"layer {self.param.name!r} ({self.param.type}): {message}")

    # --- set-up ----------------------------------------------------------------------------
    def setup(self, bottom, top):
        self.check_blob_counts(bottom, top)
        self.layer_setup(bottom, top)
        self.reshape(bottom, top)

    def check_blob_counts(self, bottom, top):
        def check(kind, n, exact, lo, hi):
            if exact is not None and n != exact:
                raise self.error(f"takes exactly {exact} {kind} blob(s), got {n}")
            if lo is not None and n < lo:
                raise self.error(f"takes at least {lo} {kind} blob(s), got {n}")
            if hi is not None and n > hi:
                raise self.error(f"takes at most {hi} {kind} blob(s), got {n}")

        check(
            "bottom", len(bottom), self.exact_num_bottom, self.min_num_bottom, self.max_num_bottom
        )
        check("top", len(top), self.exact_num_top, self.min_num_top, self.max_num_top)

    def layer_setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        raise NotImplementedError

    # --- compute ---------------------------------------------------------------------------
    def forward(self, bottom, top):
        raise NotImplementedError

    def backward(self, top, propagate_down, bottom):
        """Write bottom diffs (overwrite) and accumulate parameter diffs (add)."""
        if any(propagate_down):
            raise self.error("cannot back-propagate")

    # --- parameters ------------------------------------------------------------------------
    def add_blob(self, shape, filler_param=None):
        """Append a parameter blob, filled by a FillerParameter (None leaves zeros)."""
        blob = Blob(shape)
        if filler_param is not None:
            from engine.fillers import fill

            fill(blob, filler_param)
        self.blobs.append(blob)
        return blob

    def param_propagate(self, i):
        """Whether parameter blob i needs its gradient (Caffe's param_propagate_down)."""
        if i < len(self.param_propagate_down):
            return self.param_propagate_down[i]
        return True


class NeuronLayer(Layer):
    """One bottom, one top of the same shape; may run in place."""

    exact_num_bottom = 1
    exact_num_top = 1
    allow_in_place = True

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)


class LossLayer(Layer):
    """Bottoms (prediction, target, ...); one scalar top whose diff is its loss weight."""

    min_num_bottom = 2
    exact_num_top = 1
    auto_loss_weight = True
    no_grad_bottoms = (1,)

    def reshape(self, bottom, top):
        if bottom[0].shape[:1] != bottom[1].shape[:1]:
            raise self.error(
                f"bottoms must have the same num: {bottom[0].shape} vs {bottom[1].shape}"
            )
        top[0].reshape(())


def class_axis(layer, scores, labels, axis):
    """(axis, outer, inner, channels) of a scores blob whose `axis` holds the classes, checking
    that `labels` has one entry per prediction (outer * inner), as Caffe's loss layers do."""
    try:
        axis = scores.canonical_axis(axis)
    except IndexError as e:
        raise layer.error(str(e)) from None
    outer, inner = scores.count_range(0, axis), scores.count_range(axis + 1)
    if outer * inner != labels.count:
        raise layer.error(
            f"number of labels must match number of predictions: scores {scores.shape} "
            f"(axis {axis}) give {outer * inner}, labels {labels.shape} give {labels.count}"
        )
    return axis, outer, inner, scores.shape[axis]


def normalizer(loss_param, valid_count, outer_num, inner_num, legacy_default="VALID"):
    """Caffe's LossLayer::GetNormalizer: the divisor for a loss, clamped to >= 1."""
    from engine.proto import caffe_pb2

    lp = caffe_pb2.LossParameter
    if loss_param.HasField("normalization"):
        mode = loss_param.normalization
    elif loss_param.HasField("normalize"):
        mode = lp.VALID if loss_param.normalize else lp.BATCH_SIZE
    else:
        mode = getattr(lp, legacy_default)
    if mode == lp.FULL:
        n = outer_num * inner_num
    elif mode == lp.VALID:
        n = outer_num * inner_num if valid_count == -1 else valid_count
    elif mode == lp.BATCH_SIZE:
        n = outer_num
    elif mode == lp.NONE:
        n = 1
    else:
        raise ValueError(f"unknown normalization mode {mode}")
    return max(float(n), 1.0)
