"""pycaffe's net_spec: write a net in Python (`n.conv1 = L.Convolution(n.data, ...)`) and get
the caffe_pb2.NetParameter, so prototxt-generating pycaffe scripts run on this engine unchanged.

Rules (BVLC python/caffe/net_spec.py): `L.<Type>(*bottoms, **kw)` returns a Top, a tuple of
`ntop` Tops, or with ntop=0 the layer itself; `in_place=True` makes the tops the bottoms. A
keyword ending in "param" is a LayerParameter field; any other goes to the type's own message
(`FooParameter` serves type `Foo`) and, if that has no such field, to LayerParameter. Values:
dict -> sub-message, list/tuple -> repeated field (a single value is wrapped), else assigned.
Layers come out depth-first from the named tops, each once; an unnamed top or layer is named
`<Type><counter>`, and a layer takes the name of its first top. `P.Pooling.MAX` reads the
constants of message PoolingParameter.
"""

import collections
import difflib
from collections.abc import Iterable

from google.protobuf.message import Message

from engine.proto import caffe_pb2

_LAYER = caffe_pb2.LayerParameter.DESCRIPTOR

# Layer types that read another type's message (Caffe's layer sources), besides the
# FooParameter -> Foo rule; searched in this order.
_PARAM_ALIASES = {
    "Deconvolution": ("convolution_param",),
    "Im2col": ("convolution_param",),
    "RNN": ("recurrent_param",),
    "LSTM": ("recurrent_param",),
    "SoftmaxWithLoss": ("softmax_param", "loss_param"),
    "SigmoidCrossEntropyLoss": ("loss_param",),
    "InfogainLoss": ("infogain_loss_param", "loss_param"),
}


def _param_fields_by_type():
    """Layer type -> the LayerParameter `*_param` fields its keywords may fill."""
    fields = {
        f.message_type.name.removesuffix("Parameter"): (f.name,)
        for f in _LAYER.fields
        if f.name.endswith("_param") and f.message_type is not None
    }
    fields.update(_PARAM_ALIASES)
    return fields


_PARAM_FIELDS = _param_fields_by_type()


class NetSpecError(TypeError, ValueError):
    """A layer's keywords do not fit caffe.proto (both a TypeError and a ValueError, so the
    except clauses written for pycaffe's protobuf errors still catch it)."""


class _MissingTop(AttributeError, KeyError):
    """A NetSpec name that was never assigned: `n.x` and `n['x']` both raise it."""

    def __str__(self):
        return str(self.args[0])


# --- keywords -> LayerParameter fields --------------------------------------------------------


def _did_you_mean(name, candidates):
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _as_list(value):
    """A repeated field's items: sequences as they are, a single value wrapped (pycaffe)."""
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes, dict, Message)):
        return list(value)
    return [value]


def _scalar(field, value, where):
    """`value` for a scalar field; enum fields also take their value names ("MAX")."""
    if field.enum_type is not None and isinstance(value, str):
        known = field.enum_type.values_by_name
        if value not in known:
            names = ", ".join(known)
            raise NetSpecError(f"{where}: {value!r} is not a {field.enum_type.name} ({names})")
        return known[value].number
    return value


def _fill(msg, value, where):
    """Fill sub-message `msg` from a dict (field by field) or a message of its type."""
    if isinstance(value, dict):
        for key, item in value.items():
            _assign(msg, key, item, where)
    elif isinstance(value, Message) and value.DESCRIPTOR is msg.DESCRIPTOR:
        msg.MergeFrom(value)
    else:
        raise NetSpecError(
            f"{where} is a {msg.DESCRIPTOR.name} message: give a dict, not {value!r}"
        )


def _assign(msg, key, value, where):
    """Set field `key` of `msg` from a Python value, following pycaffe's assign_proto."""
    field = msg.DESCRIPTOR.fields_by_name.get(key)
    if field is None:
        hint = _did_you_mean(key, list(msg.DESCRIPTOR.fields_by_name))
        raise NetSpecError(f"{where}: {msg.DESCRIPTOR.name} has no field {key!r}{hint}")
    where = f"{where}.{key}"
    try:
        if field.is_repeated:
            container = getattr(msg, key)
            for item in _as_list(value):
                if field.message_type is not None:
                    _fill(container.add(), item, where)
                else:
                    container.append(_scalar(field, item, where))
        elif field.message_type is not None:
            _fill(getattr(msg, key), value, where)
        elif isinstance(value, (list, tuple, dict)):
            raise NetSpecError(f"{where} takes one value, not {value!r}")
        else:
            setattr(msg, key, _scalar(field, value, where))
    except NetSpecError:
        raise
    except (TypeError, ValueError) as err:  # protobuf's own checks: wrong type, range, enum
        raise NetSpecError(f"{where}: bad value {value!r}: {err}") from None


def _owner(layer, type_name, key, label):
    """The message a keyword belongs to: the type's own message(s) first, then the layer."""
    if not key.endswith("param"):
        for field_name in _PARAM_FIELDS.get(type_name, ()):
            sub = getattr(layer, field_name)
            if key in sub.DESCRIPTOR.fields_by_name:
                return sub, f"{label}: {field_name}"
    if key in _LAYER.fields_by_name:
        return layer, f"{label}: layer"
    own = _PARAM_FIELDS.get(type_name, ())
    candidates = list(_LAYER.fields_by_name)
    for field_name in own:
        candidates += list(getattr(layer, field_name).DESCRIPTOR.fields_by_name)
    hint = _did_you_mean(key, candidates)
    if key.endswith("param"):
        reason = "LayerParameter has no such field"
    elif own:
        messages = ", ".join(f"{getattr(layer, f).DESCRIPTOR.name} ({f})" for f in own)
        reason = f"not a field of {messages} or of LayerParameter"
    else:
        reason = (
            f"layer type {type_name!r} has no parameter message "
            f"(no {type_name}Parameter in caffe.proto) and LayerParameter has no such field"
        )
    raise NetSpecError(f"{label}: unknown keyword {key!r}: {reason}{hint}")


def _layer_fields(type_name, params, label=None):
    """The LayerParameter that a layer's keywords (`params`) describe, nothing else set."""
    label = label or f"L.{type_name}"
    layer = caffe_pb2.LayerParameter()
    for key, value in params.items():
        msg, where = _owner(layer, type_name, key, label)
        _assign(msg, key, value, where)
    return layer


# --- the graph: Tops and Functions -------------------------------------------------------------


class Top:
    """One output blob of a layer (`fn`), the `n`-th of its tops."""

    def __init__(self, fn, n):
        self.fn = fn
        self.n = n

    def to_proto(self):
        """The NetParameter of every layer needed to compute this top (auto-named)."""
        return to_proto(self)

    def _update(self, params):
        self.fn._update(params)

    def __repr__(self):
        return f"<Top {self.n} of {self.fn!r}>"


class Function:
    """One layer: its type, its bottoms (Tops of other layers), its keywords and its tops."""

    def __init__(self, type_name, inputs, params):
        for index, inp in enumerate(inputs):
            if not isinstance(inp, Top):
                # pycaffe's exact message: its own tests match it.
                raise TypeError(f"{type_name} input {index} is not a Top (type is {type(inp)})")
        self.type_name = type_name
        self.inputs = tuple(inputs)
        self.params = dict(params)
        self.ntop = self.params.pop("ntop", 1)
        self.in_place = self.params.pop("in_place", False)
        if isinstance(self.ntop, bool) or not isinstance(self.ntop, int) or self.ntop < 0:
            raise NetSpecError(f"L.{type_name}: ntop must be an int >= 0, not {self.ntop!r}")
        if self.in_place and not self.inputs:
            raise NetSpecError(f"L.{type_name}: in_place=True needs a bottom to write into")
        self.tops = tuple(Top(self, n) for n in range(self.ntop))
        _layer_fields(type_name, self.params)  # fail at the call, where the traceback helps

    def _update(self, params):
        """NetSpec.update: add or replace keywords (checked now)."""
        merged = {**self.params, **params}
        _layer_fields(self.type_name, merged)
        self.params.update(params)

    def _layer(self, layers, names, autonames):
        """This layer's LayerParameter; its bottoms' layers are already in `layers`."""
        layer = caffe_pb2.LayerParameter(type=self.type_name)
        layer.bottom.extend(_bottom_name(top, layers) for top in self.inputs)
        if self.in_place:
            layer.top.extend(layer.bottom)
        else:
            layer.top.extend(_top_name(top, names, autonames) for top in self.tops)
        if self not in names:
            if self.tops:
                names[self] = _top_name(self.tops[0], names, autonames)
            else:
                names[self] = _autoname(self, autonames)
        layer.name = names[self]
        label = f"{self.type_name} layer {layer.name!r}"
        layer.MergeFrom(_layer_fields(self.type_name, self.params, label))  # `name=` wins
        return layer

    def __repr__(self):
        return f"<{self.type_name} layer, {len(self.inputs)} bottom(s), {self.ntop} top(s)>"


def _autoname(fn, autonames):
    autonames[fn.type_name] += 1
    return f"{fn.type_name}{autonames[fn.type_name]}"


def _top_name(top, names, autonames):
    if top not in names:
        names[top] = _autoname(top.fn, autonames)
    return names[top]


def _bottom_name(top, layers):
    produced = layers[top.fn].top
    if top.n >= len(produced):
        raise NetSpecError(
            f"{top.fn.type_name} layer {layers[top.fn].name!r} is in place with "
            f"{len(produced)} top(s), so it has no top {top.n}"
        )
    return produced[top.n]


def _collect(root, layers, names, autonames):
    """Add `root`'s layer after the layers it reads: depth-first, bottoms in order, each layer
    once (pycaffe's recursive _to_proto, as a loop so deep nets stay under the recursion
    limit)."""
    if root in layers:
        return
    stack = [(root, iter(root.inputs))]
    while stack:
        fn, pending = stack[-1]
        for top in pending:
            if top.fn not in layers:
                stack.append((top.fn, iter(top.fn.inputs)))
                break
        else:
            stack.pop()
            layers[fn] = fn._layer(layers, names, autonames)


def _function_of(value, what):
    if isinstance(value, Top):
        return value.fn
    if isinstance(value, Function):
        return value
    hint = ""
    if isinstance(value, tuple):
        hint = "; a layer with ntop > 1 returns a tuple: unpack it (n.data, n.label = ...)"
    raise NetSpecError(f"{what}: expected a Top (or an ntop=0 layer), got {type(value)}{hint}")


def _net(layers):
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


def to_proto(*tops):
    """The NetParameter of every layer needed to compute `tops`, with auto-generated names."""
    layers, names, autonames = {}, {}, collections.Counter()
    for i, top in enumerate(tops):
        _collect(_function_of(top, f"to_proto argument {i}"), layers, names, autonames)
    return _net(layers)


class NetSpec:
    """Named tops (`n.conv1 = L.Convolution(n.data, ...)` or `n['conv1'] = ...`); to_proto()
    emits every layer they need, naming blobs and layers after the attributes."""

    def __init__(self):
        object.__setattr__(self, "tops", collections.OrderedDict())

    def __setattr__(self, name, value):
        _function_of(value, f"NetSpec.{name}")
        self.tops[name] = value

    def __getattr__(self, name):
        tops = self.__dict__.get("tops", {})  # absent while copy/pickle rebuilds the object
        if name not in tops:
            raise _MissingTop(f"NetSpec has no top {name!r}")
        return tops[name]

    def __delattr__(self, name):
        self.__delitem__(name)

    __setitem__ = __setattr__
    __getitem__ = __getattr__

    def __delitem__(self, name):
        if name not in self.tops:
            raise _MissingTop(f"NetSpec has no top {name!r}")
        del self.tops[name]

    def keys(self):
        return list(self.tops)

    def vals(self):
        return list(self.tops.values())

    def update(self, name, params):
        """Add or replace keywords of the layer that produced top `name`."""
        self[name]._update(params)

    def to_proto(self):
        names = {value: name for name, value in self.tops.items()}
        layers, autonames = {}, collections.Counter()
        for name, value in self.tops.items():
            _collect(_function_of(value, f"NetSpec.{name}"), layers, names, autonames)
        return _net(layers)

    def __repr__(self):
        return f"NetSpec({', '.join(self.tops)})"


# --- the L and P pseudo-modules -----------------------------------------------------------------


def layer_factory(type_name):
    """`L.<type_name>`: builds a layer of that Caffe type from bottoms and keywords."""

    def make(*bottoms, **kwargs):
        fn = Function(type_name, bottoms, kwargs)
        if fn.ntop == 0:
            return fn
        return fn.tops[0] if fn.ntop == 1 else fn.tops

    make.__name__ = make.__qualname__ = type_name
    make.__doc__ = (
        f"A {type_name} layer reading the given bottom Tops; returns its Top (a tuple with "
        "ntop > 1, the layer with ntop=0). Keywords set its LayerParameter (engine.net_spec)."
    )
    return make


class Layers:
    """pycaffe's `caffe.layers` (usually L): any attribute is a layer factory."""

    def __getattr__(self, type_name):
        if type_name.startswith("_"):  # leave dunders/privates to copy, pickle, IPython
            raise AttributeError(type_name)
        return layer_factory(type_name)


class _Constants:
    """`P.<Name>`: the constants (enum values and enums) of message <Name>Parameter."""

    def __init__(self, name, message):
        self._name = name
        self._message = message

    def __getattr__(self, attr):
        if attr.startswith("_"):
            raise AttributeError(attr)
        try:
            return getattr(self._message, attr)
        except AttributeError:
            hint = _did_you_mean(attr, self.__dir__())
            raise AttributeError(
                f"P.{self._name}: {self._name}Parameter has no constant {attr!r}{hint}"
            ) from None

    def __dir__(self):
        enums = self._message.DESCRIPTOR.enum_types
        return [e.name for e in enums] + [v.name for e in enums for v in e.values]


class Parameters:
    """pycaffe's `caffe.params` (usually P): `P.Pooling.MAX` is PoolingParameter.MAX."""

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        message = getattr(caffe_pb2, f"{name}Parameter", None)
        if message is None:
            raise AttributeError(f"P.{name}: caffe.proto has no message {name}Parameter")
        return _Constants(name, message)


layers = Layers()
params = Parameters()

__all__ = ["NetSpec", "NetSpecError", "Top", "Function", "layers", "params", "to_proto"]
