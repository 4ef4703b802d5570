"""Source layers without a data file: Input (the user writes the tops) and DummyData (tops
filled by fillers), as in Caffe's input_layer and dummy_data_layer."""

from engine import backend
from engine.fillers import filled
from engine.layer import Layer, register
from engine.proto import caffe_pb2


def _shape_of(blob_shape):
    return tuple(int(d) for d in blob_shape.dim)


@register("Input")
class Input(Layer):
    """Net inputs: each top gets input_param.shape (one shape for all tops or one per top).

    top[i]: the given shape. Forward does nothing, so the tops keep whatever the user wrote
    into them (and any reshape the user made). No bottoms, no backward.
    """

    exact_num_bottom = 0
    min_num_top = 1

    def layer_setup(self, bottom, top):
        shapes = self.param.input_param.shape
        if len(shapes) not in (0, 1, len(top)):
            raise self.error(
                f"input_param must give 0, 1 or {len(top)} (one per top) shapes, got {len(shapes)}"
            )
        for i, t in enumerate(top):
            if shapes:
                t.reshape(_shape_of(shapes[0 if len(shapes) == 1 else i]))

    def reshape(self, bottom, top):
        pass  # the user may reshape the input blobs; keep what they set

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        pass


@register("DummyData")
class DummyData(Layer):
    """Tops filled by dummy_data_param.data_filler (none: constant 0; one for all; one per top).

    top[i]: shape[i] (or shape[0]), or the legacy num/channels/height/width. Constant fillers
    fill once at set-up; other fillers refill on every forward, as in Caffe. Reshape does
    nothing, so the top shapes stay as set up.
    """

    exact_num_bottom = 0
    min_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.param.dummy_data_param
        n = len(top)
        if len(p.data_filler) not in (0, 1, n):
            raise self.error(
                f"data_filler must be given 0, 1 or {n} times, got {len(p.data_filler)}"
            )
        legacy = [p.num, p.channels, p.height, p.width]
        if any(len(v) for v in legacy):
            if len(p.shape):
                raise self.error("give either shape or num/channels/height/width, not both")
            for name, v in zip(("num", "channels", "height", "width"), legacy):
                if len(v) not in (1, n):
                    raise self.error(f"{name} must be given 1 or {n} times, got {len(v)}")
            shapes = [tuple(int(v[0 if len(v) == 1 else i]) for v in legacy) for i in range(n)]
        else:
            if len(p.shape) not in (1, n):
                raise self.error(f"shape must be given 1 or {n} times, got {len(p.shape)}")
            shapes = [_shape_of(p.shape[0 if len(p.shape) == 1 else i]) for i in range(n)]
        if len(p.data_filler) == 0:
            self._fillers = [caffe_pb2.FillerParameter(type="constant", value=0.0)]
        else:
            self._fillers = list(p.data_filler)
        self._refill = [f.type != "constant" for f in self._fillers]
        for t, shape in zip(top, shapes):
            t.reshape(shape)
        # Constant tops are filled here once; the others on every forward.
        self._fill(top, [not r for r in self._refill])

    def _fill(self, top, which):
        xp = backend.xp()
        for i, t in enumerate(top):
            k = i if len(self._fillers) > 1 else 0
            if which[k]:
                t.data[...] = xp.asarray(filled(self._fillers[k], t.shape))

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        self._fill(top, self._refill)

    def backward(self, top, propagate_down, bottom):
        pass
