"""Net: a NetParameter built into a DAG of layers, with Caffe's rules for phases, splits,
in-place blobs, shared parameters, loss weights and need-backward analysis (net.cpp)."""

import collections
import copy
import itertools
import os

import numpy as np

from engine import backend, io
from engine.blob import Blob
from engine.layer import LayerError, create_layer
from engine.proto import caffe_pb2
from engine.upgrade import upgrade_net_input

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST


# --- NetParameter rewriting (filter by state, insert splits) ----------------------------------


def state_meets_rule(state, rule, layer_name=""):
    """Caffe's Net::StateMeetsRule: whether a NetState satisfies one NetStateRule."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def filter_net(param):
    """Keep the layers whose include/exclude rules admit `param.state` (FilterNet)."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    for lp in param.layer:
        if lp.include and lp.exclude:
            raise LayerError(
                f"layer {lp.name!r}: specify either include rules or exclude rules; not both"
            )
        included = not lp.include
        if any(state_meets_rule(param.state, r) for r in lp.exclude):
            included = False
        if any(state_meets_rule(param.state, r) for r in lp.include):
            included = True
        if included:
            out.layer.add().CopyFrom(lp)
    return out


def split_layer_name(layer, blob, top_idx):
    return f"{blob}_{layer}_{top_idx}_split"


def split_blob_name(layer, blob, top_idx, k):
    return f"{blob}_{layer}_{top_idx}_split_{k}"


def insert_splits(param):
    """Caffe's InsertSplits: a Split layer after every top read by more than one bottom
    (a top with a non-zero loss_weight counts as one reader)."""
    last_top = {}
    source_of_bottom = {}
    readers = collections.Counter()
    loss_weight_of = {}
    for i, lp in enumerate(param.layer):
        for j, name in enumerate(lp.bottom):
            if name not in last_top:
                raise LayerError(
                    f"layer {lp.name!r}: unknown bottom blob {name!r} (bottom index {j})"
                )
            source_of_bottom[(i, j)] = last_top[name]
            readers[last_top[name]] += 1
        for j, name in enumerate(lp.top):
            last_top[name] = (i, j)
        for j in range(min(len(lp.loss_weight), len(lp.top))):
            idx = last_top[lp.top[j]]
            loss_weight_of[idx] = lp.loss_weight[j]
            if lp.loss_weight[j]:
                readers[idx] += 1
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    next_split = collections.Counter()
    for i, src in enumerate(param.layer):
        lp = out.layer.add()
        lp.CopyFrom(src)
        for j in range(len(lp.bottom)):
            top_idx = source_of_bottom[(i, j)]
            if readers[top_idx] > 1:
                producer = param.layer[top_idx[0]].name
                lp.bottom[j] = split_blob_name(
                    producer, lp.bottom[j], top_idx[1], next_split[top_idx]
                )
                next_split[top_idx] += 1
        for j, name in enumerate(lp.top):
            n = readers[(i, j)]
            if n > 1:
                split = out.layer.add()
                split.name = split_layer_name(lp.name, name, j)
                split.type = "Split"
                split.bottom.append(name)
                weight = loss_weight_of.get((i, j), 0.0)
                for k in range(n):
                    split.top.append(split_blob_name(lp.name, name, j, k))
                    if weight:
                        split.loss_weight.append(weight if k == 0 else 0.0)
                if weight:
                    del lp.loss_weight[:]
                    next_split[(i, j)] += 1
    return out


# --- the Net ------------------------------------------------------------------------------------


class Net:
    """A Caffe net: `Net(prototxt, phase)`, `Net(prototxt, weights, phase)` or keywords
    `Net(prototxt, phase=TEST, weights=...)`, like pycaffe. `prototxt` may also be a
    NetParameter."""

    def __init__(self, net, *args, phase=None, weights=None, level=0, stages=(), name_hint=None):
        if args:
            if isinstance(args[0], (str, os.PathLike)):
                weights = args[0]
                args = args[1:]
            if args:
                phase = args[0]
        if phase is None:
            raise TypeError("Net needs a phase: Net(prototxt, engine.TRAIN or engine.TEST)")
        if isinstance(net, caffe_pb2.NetParameter):
            param = copy.deepcopy(net)
            self.source = name_hint or "<NetParameter>"
        else:
            self.source = os.fspath(net)
            param = io.read_net_param(self.source)
        from engine.upgrade import upgrade_net_param

        param = upgrade_net_param(param, source=self.source)
        param.state.phase = phase
        if level:
            param.state.level = level
        param.state.stage.extend(stages or ())  # pycaffe passes stages=None
        self._init(param)
        if weights is not None:
            self.copy_from(weights)

    # --- building -----------------------------------------------------------------------------
    def _init(self, in_param):
        self.phase = in_param.state.phase
        # Caffe's Net::Callback lists: callables run with the layer index (pycaffe's
        # before_forward / after_forward / before_backward / after_backward).
        self._before_forward, self._after_forward = [], []
        self._before_backward, self._after_backward = [], []
        filtered = filter_net(upgrade_net_input(in_param))
        param = insert_splits(filtered)
        self.param = param
        self.name = param.name
        self.layers = []
        self.layer_names = []
        self.bottom_vecs, self.top_vecs = [], []
        self.bottom_ids, self.top_ids = [], []
        self.bottom_need_backward = []
        self.layer_need_backward = []
        self.blob_names = []
        self._blobs = []
        self.blob_need_backward = []
        self._blob_loss_weights = []  # per blob id; pycaffe's raw vector of the same name
        self._input_ids = []
        self.net_params = []  # every layer parameter blob, in layer order (Caffe's params_)
        self.param_owners = []
        self.param_layer_indices = []
        self.param_display_names = []
        self.learnable_params = []
        self.learnable_param_ids = []
        self.params_lr = []
        self.params_weight_decay = []
        self._has_lr, self._has_decay = [], []
        param_names_index = {}
        name_to_id = {}
        available = set()

        for layer_id, lp in enumerate(param.layer):
            if not lp.HasField("phase"):
                lp.phase = self.phase
            try:
                layer = create_layer(lp, lp.phase)
            except LayerError:
                raise  # already names the layer
            except ValueError as e:
                raise LayerError(f"layer {lp.name!r}: {e}") from None
            self.layers.append(layer)
            self.layer_names.append(lp.name)
            bottoms, bottom_ids, bottom_nb = [], [], []
            need_backward = False
            for j, bname in enumerate(lp.bottom):
                if bname not in available:
                    raise LayerError(
                        f"layer {lp.name!r}: unknown bottom blob {bname!r} (bottom index {j})"
                    )
                bid = name_to_id[bname]
                available.discard(bname)
                bottoms.append(self._blobs[bid])
                bottom_ids.append(bid)
                nb = self.blob_need_backward[bid]
                if lp.propagate_down:
                    nb = bool(lp.propagate_down[j])
                bottom_nb.append(nb)
                need_backward |= self.blob_need_backward[bid]
            tops, top_ids = [], []
            for j, tname in enumerate(lp.top):
                if j < len(lp.bottom) and tname == lp.bottom[j]:
                    if not layer.allow_in_place:
                        raise LayerError(f"layer {lp.name!r} ({lp.type}) cannot run in place")
                    bid = name_to_id[tname]
                elif tname in name_to_id:
                    # Caffe: a name may be produced again only in place (same index as bottom).
                    raise LayerError(
                        f"layer {lp.name!r}: top blob {tname!r} produced by multiple sources "
                        "(an in-place top must sit at the same index as its bottom)"
                    )
                else:
                    bid = len(self._blobs)
                    self._blobs.append(Blob())
                    self.blob_names.append(tname)
                    self.blob_need_backward.append(False)
                    self._blob_loss_weights.append(0.0)
                    name_to_id[tname] = bid
                    if lp.type == "Input":
                        self._input_ids.append(bid)
                available.add(tname)
                tops.append(self._blobs[bid])
                top_ids.append(bid)
            try:
                layer.setup(bottoms, tops)
            except LayerError:
                raise
            except (ValueError, IndexError, KeyError, TypeError) as e:
                raise LayerError(f"layer {lp.name!r} ({lp.type}): set-up failed: {e}") from e
            if lp.blobs:
                self._load_layer_blobs(layer, list(lp.blobs), f"{self.source} layer {lp.name!r}")
            layer.loss_weights = self._loss_weights(layer, lp, tops)
            for j, bid in enumerate(top_ids):
                self._blob_loss_weights[bid] = layer.loss_weights[j]
            # Parameters: lr_mult 0 freezes a blob's gradient.
            if len(lp.param) > len(layer.blobs):
                raise LayerError(
                    f"layer {lp.name!r}: {len(lp.param)} param specs but only "
                    f"{len(layer.blobs)} parameter blobs"
                )
            frozen = getattr(layer, "frozen_params", False)
            layer.param_propagate_down = []
            for i in range(len(layer.blobs)):
                spec = lp.param[i] if i < len(lp.param) else caffe_pb2.ParamSpec()
                need = spec.lr_mult != 0 and not frozen
                need_backward |= need
                layer.param_propagate_down.append(need)
            for i in range(len(layer.blobs)):
                self._append_param(layer_id, i, param_names_index)
            self.bottom_vecs.append(bottoms)
            self.top_vecs.append(tops)
            self.bottom_ids.append(bottom_ids)
            self.top_ids.append(top_ids)
            self.bottom_need_backward.append(bottom_nb)
            self.layer_need_backward.append(need_backward)
            if need_backward:
                for bid in top_ids:
                    self.blob_need_backward[bid] = True

        self._analyse_backward(param)
        # Caffe keeps the unconsumed blobs in a std::set: outputs come in name order.
        self._output_ids = [name_to_id[n] for n in sorted(available)]
        self.blobs = collections.OrderedDict(zip(self.blob_names, self._blobs))
        self._layer_index = {n: i for i, n in enumerate(self.layer_names)}

    @staticmethod
    def _loss_weights(layer, lp, tops):
        weights = list(lp.loss_weight)
        if not weights and layer.auto_loss_weight:
            weights = [1.0]
        if weights and len(weights) != len(tops):
            raise LayerError(
                f"layer {lp.name!r}: loss_weight must be unspecified or given once per top "
                f"({len(tops)} tops, {len(weights)} loss weights)"
            )
        weights = weights or [0.0] * len(tops)
        for t, w in zip(tops, weights):
            if w:
                t.diff[...] = w
        return weights

    def _append_param(self, layer_id, param_id, names_index):
        layer = self.layers[layer_id]
        lp = layer.param
        spec = lp.param[param_id] if param_id < len(lp.param) else caffe_pb2.ParamSpec()
        name = spec.name
        self.param_display_names.append(name or str(param_id))
        net_param_id = len(self.net_params)
        self.net_params.append(layer.blobs[param_id])
        self.param_layer_indices.append((layer_id, param_id))
        if not name or name not in names_index:
            self.param_owners.append(-1)
            if name:
                names_index[name] = net_param_id
            self.learnable_param_ids.append(len(self.learnable_params))
            self.learnable_params.append(layer.blobs[param_id])
            self._has_lr.append(spec.HasField("lr_mult"))
            self._has_decay.append(spec.HasField("decay_mult"))
            frozen = getattr(layer, "frozen_params", False)
            self.params_lr.append(0.0 if frozen else spec.lr_mult)
            self.params_weight_decay.append(0.0 if frozen else spec.decay_mult)
            return
        owner_id = names_index[name]
        self.param_owners.append(owner_id)
        owner_layer, owner_param = self.param_layer_indices[owner_id]
        owner = self.layers[owner_layer].blobs[owner_param]
        mine = layer.blobs[param_id]
        if spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE:
            if mine.count != owner.count:
                raise LayerError(
                    f"layer {lp.name!r}: cannot share param {name!r} owned by layer "
                    f"{self.layer_names[owner_layer]!r}: count {mine.count} != {owner.count}"
                )
        elif mine.shape != owner.shape:
            raise LayerError(
                f"layer {lp.name!r}: cannot share param {name!r} owned by layer "
                f"{self.layer_names[owner_layer]!r}: shape {mine.shape} != {owner.shape} "
                "(use share_mode PERMISSIVE to compare counts only)"
            )
        if mine.shape == owner.shape:
            layer.blobs[param_id] = owner
        else:
            mine.set_data(owner.data.reshape(mine.shape))
            mine.set_diff(owner.diff.reshape(mine.shape))
        self.net_params[net_param_id] = layer.blobs[param_id]
        lid = self.learnable_param_ids[owner_id]
        self.learnable_param_ids.append(lid)
        for has, values, field in (
            (self._has_lr, self.params_lr, "lr_mult"),
            (self._has_decay, self.params_weight_decay, "decay_mult"),
        ):
            if spec.HasField(field):
                if has[lid] and values[lid] != getattr(spec, field):
                    raise LayerError(f"shared param {name!r} has mismatched {field}")
                has[lid] = True
                values[lid] = getattr(spec, field)

    def _analyse_backward(self, param):
        """Skip backward for layers that do not lead to a loss; honour force_backward."""
        under_loss, skip = set(), set()
        for lid in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[lid]
            contributes, skip_down = False, True
            for j, bid in enumerate(self.top_ids[lid]):
                name = self.blob_names[bid]
                if layer.loss_weights[j] or name in under_loss:
                    contributes = True
                if name not in skip:
                    skip_down = False
                if contributes and not skip_down:
                    break
            if self.layer_need_backward[lid] and skip_down:
                self.layer_need_backward[lid] = False
                self.bottom_need_backward[lid] = [False] * len(self.bottom_ids[lid])
            if not contributes:
                self.layer_need_backward[lid] = False
            for j, bid in enumerate(self.bottom_ids[lid]):
                name = self.blob_names[bid]
                if contributes:
                    under_loss.add(name)
                else:
                    self.bottom_need_backward[lid][j] = False
                if not self.bottom_need_backward[lid][j]:
                    skip.add(name)
        if param.force_backward:
            for lid, layer in enumerate(self.layers):
                self.layer_need_backward[lid] = True
                for j, bid in enumerate(self.bottom_ids[lid]):
                    allow = j not in layer.no_grad_bottoms
                    nb = self.bottom_need_backward[lid][j] or allow
                    self.bottom_need_backward[lid][j] = nb
                    self.blob_need_backward[bid] = self.blob_need_backward[bid] or nb
                if not getattr(layer, "frozen_params", False):
                    layer.param_propagate_down = [True] * len(layer.blobs)

    # --- pycaffe-style views ----------------------------------------------------------------
    @property
    def inputs(self):
        return [self.blob_names[i] for i in self._input_ids]

    @property
    def outputs(self):
        return [self.blob_names[i] for i in self._output_ids]

    @property
    def layer_dict(self):
        return collections.OrderedDict(zip(self.layer_names, self.layers))

    @property
    def params(self):
        """pycaffe's `net.params`: layer name -> list of parameter Blobs (layers with any)."""
        return collections.OrderedDict(
            (n, layer.blobs) for n, layer in zip(self.layer_names, self.layers) if layer.blobs
        )

    @property
    def _layer_names(self):
        """pycaffe scripts read `net._layer_names` directly."""
        return self.layer_names

    @property
    def _blob_names(self):
        """pycaffe's `net._blob_names` (ours is `blob_names`, the same list)."""
        return self.blob_names

    @property
    def _inputs(self):
        """pycaffe's `net._inputs`: blob indices of the net inputs."""
        return list(self._input_ids)

    @property
    def _outputs(self):
        """pycaffe's `net._outputs`: blob indices of the net outputs."""
        return list(self._output_ids)

    def _top_ids(self, i):
        """pycaffe's `net._top_ids(i)`: blob indices of layer i's tops."""
        return list(self.top_ids[i])

    def _bottom_ids(self, i):
        """pycaffe's `net._bottom_ids(i)`: blob indices of layer i's bottoms."""
        return list(self.bottom_ids[i])

    @property
    def blob_loss_weights(self):
        """pycaffe's `net.blob_loss_weights`: blob name -> loss weight, in blob order."""
        return collections.OrderedDict(zip(self.blob_names, self._blob_loss_weights))

    @property
    def top_names(self):
        """pycaffe's `net.top_names`: layer name -> its top blob names, for the net as built
        (auto-inserted Split layers and their `<blob>_<layer>_<i>_split_<k>` tops included)."""
        return collections.OrderedDict(
            (name, [self.blob_names[b] for b in ids])
            for name, ids in zip(self.layer_names, self.top_ids)
        )

    @property
    def bottom_names(self):
        """pycaffe's `net.bottom_names`: layer name -> its bottom blob names (as built)."""
        return collections.OrderedDict(
            (name, [self.blob_names[b] for b in ids])
            for name, ids in zip(self.layer_names, self.bottom_ids)
        )

    # --- callbacks (Caffe's Net::Callback, pycaffe's Net.before_forward etc.) ----------------
    def before_forward(self, callback):
        """Run `callback(layer_index)` before each layer's forward."""
        self._before_forward.append(callback)

    def after_forward(self, callback):
        """Run `callback(layer_index)` after each layer's forward."""
        self._after_forward.append(callback)

    def before_backward(self, callback):
        """Run `callback(layer_index)` before each layer's backward step (also for layers
        that need no backward, as Caffe does)."""
        self._before_backward.append(callback)

    def after_backward(self, callback):
        """Run `callback(layer_index)` after each layer's backward step."""
        self._after_backward.append(callback)

    def layer_index(self, name):
        try:
            return self._layer_index[name]
        except KeyError:
            raise KeyError(f"net {self.name!r} has no layer {name!r}") from None

    # --- compute ------------------------------------------------------------------------------
    def forward_from_to(self, start=0, end=None):
        end = len(self.layers) - 1 if end is None else end
        before, after = self._before_forward, self._after_forward
        loss = 0.0
        for i in range(start, end + 1):
            for callback in before:
                callback(i)
            layer, bottom, top = self.layers[i], self.bottom_vecs[i], self.top_vecs[i]
            layer.reshape(bottom, top)
            layer.forward(bottom, top)
            for t, w in zip(top, layer.loss_weights):
                if w:
                    loss += float((t.data * t.diff).sum())
            for callback in after:
                callback(i)
        return loss

    def backward_from_to(self, start=None, end=0):
        start = len(self.layers) - 1 if start is None else start
        before, after = self._before_backward, self._after_backward
        for i in range(start, end - 1, -1):
            for callback in before:
                callback(i)
            if self.layer_need_backward[i]:
                self.layers[i].backward(
                    self.top_vecs[i], self.bottom_need_backward[i], self.bottom_vecs[i]
                )
            for callback in after:
                callback(i)

    # pycaffe's private names for the two (Net._forward(start, end), Net._backward(...)).
    _forward = forward_from_to
    _backward = backward_from_to

    def forward_prefilled(self):
        return self.forward_from_to()

    def forward(self, blobs=None, start=None, end=None, **kwargs):
        """pycaffe's Net.forward: set input blobs from keywords, run, return the outputs."""
        outputs = set(self.outputs + list(blobs or []))
        for name, value in kwargs.items():
            if name not in self.blobs:
                raise KeyError(f"forward: net has no blob {name!r}")
            blob = self.blobs[name]
            if tuple(value.shape) != blob.shape:
                raise ValueError(
                    f"forward: input {name!r} has shape {tuple(value.shape)}, blob is {blob.shape}"
                )
            blob.data[...] = value
        start_i = self.layer_index(start) if start is not None else 0
        if end is not None:
            end_i = self.layer_index(end)
            outputs = set([self.blob_names[b] for b in self.top_ids[end_i]] + list(blobs or []))
        else:
            end_i = len(self.layers) - 1
        self.forward_from_to(start_i, end_i)
        return {name: self.blobs[name].data for name in outputs}

    def backward(self, diffs=None, start=None, end=None, **kwargs):
        """pycaffe's Net.backward: set output diffs from keywords, run, return input diffs."""
        for name, value in kwargs.items():
            if name not in self.blobs:
                raise KeyError(f"backward: net has no blob {name!r}")
            self.blobs[name].diff[...] = value
        start_i = self.layer_index(start) if start is not None else len(self.layers) - 1
        end_i = self.layer_index(end) if end is not None else 0
        if end is not None:
            names = [self.blob_names[b] for b in self.bottom_ids[end_i]]
        else:
            names = self.inputs
        self.backward_from_to(start_i, end_i)
        return {n: self.blobs[n].diff for n in set(names + list(diffs or []))}

    # --- batched runs (pycaffe's forward_all / forward_backward_all) -------------------------
    def _batch(self, blobs):
        """pycaffe's Net._batch: split {name: array} into {name: batch} dicts of the net's
        batch size (the num of the net's first blob, as pycaffe takes it); a last partial
        batch is padded with zeros to full size."""
        if not blobs:
            raise ValueError(f"net {self.name!r}: nothing to batch (no arrays given)")
        blobs = {n: a if hasattr(a, "shape") else np.asarray(a) for n, a in blobs.items()}
        lengths = {name: len(arr) for name, arr in blobs.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"net {self.name!r}: arrays to batch differ in length: {lengths}")
        num = next(iter(lengths.values()))
        batch_size = self._blobs[0].num if self._blobs else 1
        full, remainder = divmod(num, batch_size)
        for b in range(full):
            lo = b * batch_size
            yield {name: arr[lo : lo + batch_size] for name, arr in blobs.items()}
        if remainder:
            padded = {}
            for name, arr in blobs.items():
                xp = backend.get_array_module(arr)
                tail = arr[num - remainder :]
                pad = xp.zeros((batch_size - remainder,) + tail.shape[1:], dtype=tail.dtype)
                padded[name] = xp.concatenate([tail, pad])
            yield padded

    def _gather(self, chunks, num):
        """Join per-batch copies into one array per name and drop the padding: outputs with
        one row per item are concatenated and cut to `num`; any other output (a scalar loss,
        an accuracy) is stacked, one entry per batch."""
        out = {}
        for name, parts in chunks.items():
            blob = self.blobs[name]
            if not parts:
                out[name] = np.zeros((0,) + tuple(blob.shape[1:]), dtype=np.float32)
            elif parts[0].ndim and parts[0].shape[0] == self._blobs[0].num:
                out[name] = np.concatenate(parts)[:num]
            else:
                out[name] = np.stack(parts)
        return out

    @staticmethod
    def _host_copy(arr):
        return arr.copy() if isinstance(arr, np.ndarray) else backend.to_numpy(arr)

    def forward_all(self, blobs=None, **kwargs):
        """pycaffe's Net.forward_all: run any number of inputs (keyword arrays, all of the
        same length) through the net in batches of its batch size, the last one zero-padded.
        Returns {blob name: array} for the outputs and `blobs`, cut to the input count."""
        if not kwargs:
            raise ValueError(
                f"net {self.name!r}: forward_all needs the inputs as keyword arrays, "
                f"e.g. forward_all({(self.inputs or ['data'])[0]}=array)"
            )
        chunks = {name: [] for name in set(self.outputs + list(blobs or []))}
        for batch in self._batch(kwargs):
            outs = self.forward(blobs=blobs, **batch)
            for name, arr in outs.items():
                chunks[name].append(self._host_copy(arr))
        return self._gather(chunks, len(next(iter(kwargs.values()))))

    def forward_backward_all(self, blobs=None, diffs=None, **kwargs):
        """pycaffe's Net.forward_backward_all: keyword arrays name inputs (fed to forward)
        and outputs (their diffs fed to backward); both run in padded batches. Returns
        ({output or `blobs` name: data}, {input or `diffs` name: diff}), cut to the count."""
        if not kwargs:
            raise ValueError(f"net {self.name!r}: forward_backward_all needs keyword arrays")
        fwd = {n: kwargs[n] for n in self.inputs if n in kwargs}
        bwd = {n: kwargs[n] for n in self.outputs if n in kwargs}
        unknown = sorted(set(kwargs) - set(fwd) - set(bwd))
        if unknown:
            raise KeyError(
                f"net {self.name!r}: forward_backward_all got {unknown}, which are neither "
                f"inputs {self.inputs} nor outputs {self.outputs}"
            )
        outs = {name: [] for name in set(self.outputs + list(blobs or []))}
        grads = {name: [] for name in set(self.inputs + list(diffs or []))}
        fwd_batches = self._batch(fwd) if fwd else ()
        bwd_batches = self._batch(bwd) if bwd else ()
        for fb, bb in itertools.zip_longest(fwd_batches, bwd_batches, fillvalue={}):
            for name, arr in self.forward(blobs=blobs, **fb).items():
                outs[name].append(self._host_copy(arr))
            for name, arr in self.backward(diffs=diffs, **bb).items():
                grads[name].append(self._host_copy(arr))
        num = len(next(iter(kwargs.values())))
        return self._gather(outs, num), self._gather(grads, num)

    def set_input_arrays(self, data, labels):
        """pycaffe's Net.set_input_arrays: feed a MemoryData first layer."""
        from engine.layers.data_layers import set_input_arrays

        set_input_arrays(self, data, labels)

    def forward_backward(self):
        loss = self.forward_from_to()
        self.backward_from_to()
        return loss

    def reshape(self):
        for layer, bottom, top in zip(self.layers, self.bottom_vecs, self.top_vecs):
            layer.reshape(bottom, top)
            for t, w in zip(top, layer.loss_weights):
                if w:
                    t.diff[...] = w

    def clear_param_diffs(self):
        for p in self.learnable_params:
            p.diff[...] = 0

    # --- weights ----------------------------------------------------------------------------
    def copy_from(self, weights):
        """Copy trained layers by name from a .caffemodel path or NetParameter (shape-checked)."""
        if isinstance(weights, caffe_pb2.NetParameter):
            src, source = weights, "<NetParameter>"
        else:
            source = os.fspath(weights)
            from engine import hdf5_weights

            if hdf5_weights.is_hdf5(source):  # Caffe's CopyTrainedLayersFrom checks this first
                self.load_hdf5(source)
                return
            src = io.read_binary(source, caffe_pb2.NetParameter())
        from engine.upgrade import upgrade_net_param

        src = upgrade_net_param(src, source=source)
        for lp in src.layer:
            idx = self._layer_index.get(lp.name)
            if idx is None or not lp.blobs:
                continue
            self._load_layer_blobs(self.layers[idx], list(lp.blobs), f"{source} layer {lp.name!r}")

    copy_trained_layers_from = copy_from

    @staticmethod
    def _load_layer_blobs(layer, protos, where):
        if len(protos) != len(layer.blobs):
            raise LayerError(
                f"{where}: incompatible number of blobs: file has {len(protos)}, "
                f"layer {layer.name!r} has {len(layer.blobs)}"
            )
        for j, (proto, blob) in enumerate(zip(protos, layer.blobs)):
            shape = io.blobproto_shape(proto)
            legacy = not proto.HasField("shape")
            ok = shape == blob.shape
            if not ok and legacy and len(blob.shape) <= 4:
                ok = shape == (1,) * (4 - len(blob.shape)) + blob.shape
            if not ok:
                raise LayerError(
                    f"{where}: cannot copy param {j}: shape mismatch; source param shape is "
                    f"{' '.join(map(str, shape))}; target param shape is "
                    f"{' '.join(map(str, blob.shape))}"
                )
            arr = io.blobproto_to_array(proto).reshape(blob.shape)
            blob.data[...] = backend.xp().asarray(arr)

    def _shared_params(self, other, what):
        """(layer, j, other's blob) for each parameter of `other`'s layers that this net has
        by name, with Caffe's ShareTrainedLayersWith checks (blob count, shapes)."""
        for name, src in zip(other.layer_names, other.layers):
            idx = self._layer_index.get(name)
            if idx is None:
                continue
            mine = self.layers[idx]
            if len(mine.blobs) != len(src.blobs):
                raise LayerError(
                    f"{what}: layer {name!r}: incompatible number of blobs: "
                    f"{len(mine.blobs)} in net {self.name!r}, {len(src.blobs)} in {other.name!r}"
                )
            for j, (a, b) in enumerate(zip(mine.blobs, src.blobs)):
                if a.shape != b.shape:
                    raise LayerError(
                        f"{what}: cannot share param {j} weights from layer {name!r}; "
                        f"shape mismatch. Source param shape is {b.shape}; target param "
                        f"shape is {a.shape}"
                    )
                yield mine, j, b

    def share_trained_layers_with(self, other):
        """Make same-named layers of this net use `other`'s parameter blobs, data and diff
        (the solver's test nets)."""
        for layer, j, blob in self._shared_params(other, "sharing the trained layers"):
            layer.blobs[j] = blob
        self.net_params = [self.layers[li].blobs[pi] for li, pi in self.param_layer_indices]

    def share_with(self, other):
        """pycaffe's Net.share_with (Caffe's ShareTrainedLayersWith): each layer of `other`
        whose name this net has lends its parameter DATA arrays (no copy); diffs stay this
        net's own, so this net can be trained or back-propagated separately."""
        for layer, j, blob in self._shared_params(other, "share_with"):
            layer.blobs[j].set_data(blob.data)

    def save_hdf5(self, path, write_diff=False):
        """pycaffe's Net.save_hdf5 (Caffe's ToHDF5), written atomically."""
        from engine import hdf5_weights

        hdf5_weights.save(self, path, write_diff)

    def load_hdf5(self, path):
        """pycaffe's Net.load_hdf5 (Caffe's CopyTrainedLayersFromHDF5)."""
        from engine import hdf5_weights

        hdf5_weights.load(self, path)

    def to_proto(self, write_diff=False):
        out = caffe_pb2.NetParameter()
        out.name = self.name
        for layer in self.layers:
            lp = out.layer.add()
            lp.CopyFrom(layer.param)
            del lp.blobs[:]
            for blob in layer.blobs:
                bp = lp.blobs.add()
                bp.shape.dim.extend(blob.shape)
                bp.data.extend(backend.to_numpy(blob.data).astype(np.float32).ravel().tolist())
                if write_diff:
                    bp.diff.extend(backend.to_numpy(blob.diff).astype(np.float32).ravel().tolist())
        return out

    def save(self, path, write_diff=False):
        """Write the weights as a binary .caffemodel (atomically)."""
        io.write_binary(path, self.to_proto(write_diff))
