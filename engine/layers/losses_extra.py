"""The remaining loss layers of Caffe's catalog: HingeLoss, SigmoidCrossEntropyLoss,
InfogainLoss, ContrastiveLoss and MultinomialLogisticLoss, with Caffe's normalizers."""

import numpy as np

from engine import io
from engine.backend import get_array_module
from engine.layer import LossLayer, class_axis, normalizer, register
from engine.layers.softmax import _softmax
from engine.proto import caffe_pb2

LOG_THRESHOLD = np.float32(1e-20)


def _int_labels(data):
    """Labels as Caffe reads them: static_cast<int> (truncation toward zero)."""
    return data.astype(np.int64)


def _check_label_range(layer, lab, valid, num_classes):
    bad = valid & ((lab < 0) | (lab >= num_classes))
    if bool(bad.any()):
        raise layer.error(f"label {int(lab[bad][0])} outside [0, {num_classes})")


def _rows_and_labels(layer, bottom):
    """bottom[0] as an N x K matrix and bottom[1] as N checked integer labels; keeps
    layer.rows (0..N-1) and layer.lab for indexing each row's labelled entry."""
    xp = get_array_module(bottom[0].data)
    n = bottom[0].shape[0]
    x = bottom[0].data.reshape(n, -1)
    lab = _int_labels(bottom[1].data.reshape(-1))
    _check_label_range(layer, lab, xp.ones(lab.shape, dtype=bool), x.shape[1])
    layer.rows = xp.arange(n)
    layer.lab = lab
    return x


@register("HingeLoss")
class HingeLoss(LossLayer):
    """loss = sum_{n,k} max(0, 1 - d_nk x_nk)^p / N, d_nk = 1 if k == label_n else -1,
    p = 1 (norm L1, default) or 2 (L2).

    bottom[0]: scores N x K (any trailing shape, flattened); bottom[1]: labels N.
    As Caffe, forward also leaves the margins max(0, 1 - d x) in bottom[0].diff.
    Backward: dx = w/N * -d * [margin > 0] (L1), w/N * -2 d * margin (L2).
    """

    exact_num_bottom = 2

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        n = bottom[0].shape[0]
        x = _rows_and_labels(self, bottom)
        margin = x.copy()
        margin[self.rows, self.lab] *= -1
        margin += 1
        xp.maximum(margin, 0, out=margin)
        # Caffe leaves the margins in bottom[0].diff; keep our own copy for backward too, so
        # nothing that clears diffs in between can change the gradient.
        bottom[0].diff[...] = margin.reshape(bottom[0].shape)
        self.margin = margin
        if self.param.hinge_loss_param.norm == caffe_pb2.HingeLossParameter.L2:
            loss = (margin * margin).sum()
        else:
            loss = xp.abs(margin).sum()
        top[0].data[...] = loss / np.float32(n)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[1]:
            raise self.error("cannot back-propagate to label inputs")
        if not propagate_down[0]:
            return
        xp = get_array_module(bottom[0].data)
        n = bottom[0].shape[0]
        d = self.margin.copy()
        d[self.rows, self.lab] *= -1
        w = top[0].diff.reshape(())
        if self.param.hinge_loss_param.norm == caffe_pb2.HingeLossParameter.L2:
            d *= w * np.float32(2) / np.float32(n)
        else:
            d = xp.sign(d) * (w / np.float32(n))
        bottom[0].diff[...] = d.reshape(bottom[0].shape)


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLoss(LossLayer):
    """loss = -sum [t log s(x) + (1 - t) log(1 - s(x))] / normalizer, s = sigmoid, summed
    stably as x (t - [x >= 0]) - log(1 + exp(-|x|)); entries whose int(t) is ignore_label
    are skipped. Normalization default BATCH_SIZE (N), unlike SoftmaxWithLoss.

    bottom[0]: scores N x ...; bottom[1]: targets, same count. No gradient to the targets.
    Backward: dx = w (s(x) - t) / normalizer, zero for ignored entries.
    """

    exact_num_bottom = 2

    def layer_setup(self, bottom, top):
        lp = self.param.loss_param
        self.ignore_label = lp.ignore_label if lp.HasField("ignore_label") else None

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[0].count != bottom[1].count:
            raise self.error(
                f"inputs must have the same count: {bottom[0].shape} vs {bottom[1].shape}"
            )

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        x = bottom[0].data
        t = bottom[1].data.reshape(x.shape)
        self.sigmoid = xp.tanh(x * np.float32(0.5)) * np.float32(0.5) + np.float32(0.5)
        term = x * (t - (x >= 0)) - xp.log1p(xp.exp(-xp.abs(x)))
        if self.ignore_label is None:
            self.valid = None
            valid_count = x.size
        else:
            self.valid = _int_labels(t) != self.ignore_label
            term = term * self.valid
            valid_count = int(self.valid.sum())
        self.norm = normalizer(
            self.param.loss_param,
            valid_count,
            bottom[0].shape[0],
            bottom[0].count_range(1),
            legacy_default="BATCH_SIZE",
        )
        top[0].data[...] = -term.sum(dtype=np.float64) / self.norm

    def backward(self, top, propagate_down, bottom):
        if propagate_down[1]:
            raise self.error("cannot back-propagate to label inputs")
        if not propagate_down[0]:
            return
        d = self.sigmoid - bottom[1].data.reshape(bottom[0].shape)
        if self.valid is not None:
            d *= self.valid
        d *= top[0].diff.reshape(()) / np.float32(self.norm)
        bottom[0].diff[...] = d


@register("InfogainLoss")
class InfogainLoss(LossLayer):
    """loss = -sum_{i,j} sum_l H[y_ij, l] log(max(p_ilj, 1e-20)) / normalizer, p = softmax of
    bottom[0] along infogain_loss_param.axis (this Caffe takes scores, not probabilities).

    bottom[0]: scores outer x L x inner; bottom[1]: labels outer x inner; H (L x L) from
    infogain_loss_param.source (a BlobProto file) or bottom[2]. Optional top[1]: p.
    Normalization default VALID; ignore_label honoured. No gradient to labels or H.
    Backward: dx_l = w (p_l * sum_k H[y, k] - H[y, l]) / normalizer.
    """

    min_num_bottom = 2
    max_num_bottom = 3
    exact_num_top = None
    min_num_top = 1
    max_num_top = 2
    no_grad_bottoms = (1, 2)

    def layer_setup(self, bottom, top):
        lp = self.param.loss_param
        if lp.HasField("normalize"):
            raise self.error('normalize is deprecated; use "normalization"')
        self.ignore_label = lp.ignore_label if lp.HasField("ignore_label") else None
        self.infogain = None
        if len(bottom) < 3:
            source = self.param.infogain_loss_param.source
            if not source:
                raise self.error("infogain matrix source must be specified (or give bottom 2)")
            try:
                proto = io.read_binary(source, caffe_pb2.BlobProto())
                h = io.blobproto_to_array(proto)
            except (OSError, ValueError) as e:
                raise self.error(f"cannot read infogain matrix {source!r}: {e}") from None
            self.infogain = get_array_module(bottom[0].data).asarray(h)

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        self.axis, self.outer, self.inner, self.num_labels = class_axis(
            self, bottom[0], bottom[1], self.param.infogain_loss_param.axis
        )
        h = self.infogain if len(bottom) < 3 else bottom[2].data
        if h.size != self.num_labels**2:
            raise self.error(
                f"infogain matrix has {h.size} entries, needs {self.num_labels}^2 "
                f"for {self.num_labels} labels"
            )
        if len(top) > 1:
            top[1].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        nl = self.num_labels
        self.prob = _softmax(bottom[0].data, self.axis, xp.empty_like(bottom[0].data))
        h = (self.infogain if len(bottom) < 3 else bottom[2].data).reshape(nl, nl)
        lab = _int_labels(bottom[1].data.reshape(self.outer, self.inner))
        if self.ignore_label is None:
            valid = xp.ones(lab.shape, dtype=bool)
        else:
            valid = lab != self.ignore_label
        _check_label_range(self, lab, valid, nl)
        self.lab = xp.where(valid, lab, 0)
        self.valid = valid
        p = self.prob.reshape(self.outer, nl, self.inner)
        logp = xp.log(xp.maximum(p, LOG_THRESHOLD))
        rows = h[self.lab]  # outer x inner x L: H[y_ij, :]
        per_item = (rows * logp.transpose(0, 2, 1)).sum(axis=2)
        loss = -(per_item * valid).sum(dtype=np.float64)
        self.norm = normalizer(self.param.loss_param, int(valid.sum()), self.outer, self.inner)
        top[0].data[...] = loss / self.norm
        if len(top) > 1:
            top[1].data[...] = self.prob

    def backward(self, top, propagate_down, bottom):
        if propagate_down[1]:
            raise self.error("cannot back-propagate to label inputs")
        if len(propagate_down) > 2 and propagate_down[2]:
            raise self.error("cannot back-propagate to infogain inputs")
        if not propagate_down[0]:
            return
        nl = self.num_labels
        h = (self.infogain if len(bottom) < 3 else bottom[2].data).reshape(nl, nl)
        p = self.prob.reshape(self.outer, nl, self.inner)
        sum_rows = h.sum(axis=1)[self.lab]  # outer x inner
        d = p * sum_rows[:, None, :] - h[self.lab].transpose(0, 2, 1)
        d *= self.valid[:, None, :]
        d *= top[0].diff.reshape(()) / np.float32(self.norm)
        bottom[0].diff[...] = d.reshape(bottom[0].shape)


@register("ContrastiveLoss")
class ContrastiveLoss(LossLayer):
    """loss = sum_n [y_n d_n^2 + (1 - y_n) max(margin - d_n, 0)^2] / 2N, d_n = ||a_n - b_n||;
    legacy_version uses max(margin - d_n^2, 0) for dissimilar pairs (margin default 1).

    bottoms: a, b (N x C x 1 x 1, or N x C), similarity y (N; int(y) != 0 is similar).
    Backward into a (b gets the negative), as Caffe: similar w/N (a - b); dissimilar
    -w/N * (margin - d) / (d + 1e-4) (a - b) when margin - d > 0 (legacy: -w/N (a - b)).
    """

    exact_num_bottom = 3
    no_grad_bottoms = (2,)

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        a, b, y = bottom
        if a.channels != b.channels or a.count != b.count:
            raise self.error(f"bottoms 0 and 1 must have the same shape: {a.shape} vs {b.shape}")
        if a.height != 1 or a.width != 1 or len(a.shape) > 4:
            raise self.error(f"bottoms 0 and 1 must be N x C x 1 x 1, got {a.shape}")
        if y.channels != 1 or y.height != 1 or y.width != 1 or y.num != a.num:
            raise self.error(f"similarity bottom must be N x 1 x 1 x 1, got {y.shape}")

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        p = self.param.contrastive_loss_param
        margin = np.float32(p.margin)
        n = bottom[0].num
        self.delta = (bottom[0].data - bottom[1].data).reshape(n, -1)
        self.dist_sq = (self.delta * self.delta).sum(axis=1)
        self.similar = _int_labels(bottom[2].data.reshape(-1)) != 0
        if p.legacy_version:
            dissimilar = xp.maximum(margin - self.dist_sq, 0)
        else:
            dissimilar = xp.maximum(margin - xp.sqrt(self.dist_sq), 0) ** 2
        per_pair = xp.where(self.similar, self.dist_sq, dissimilar)
        top[0].data[...] = per_pair.sum(dtype=np.float64) / n / 2

    def backward(self, top, propagate_down, bottom):
        if propagate_down[2]:
            raise self.error("cannot back-propagate to the similarity input")
        xp = get_array_module(bottom[0].data)
        p = self.param.contrastive_loss_param
        margin = np.float32(p.margin)
        n = bottom[0].num
        if p.legacy_version:
            mdist = margin - self.dist_sq
            beta = xp.full(mdist.shape, np.float32(-1))
        else:
            dist = xp.sqrt(self.dist_sq)
            mdist = margin - dist
            beta = -mdist / (dist + np.float32(1e-4))
        coef = xp.where(self.similar, np.float32(1), xp.where(mdist > 0, beta, 0))
        g = self.delta * coef[:, None].astype(np.float32)
        w = top[0].diff.reshape(()) / np.float32(n)
        for i, sign in ((0, 1), (1, -1)):
            if propagate_down[i]:
                bottom[i].diff[...] = (g * (w * sign)).reshape(bottom[i].shape)


@register("MultinomialLogisticLoss")
class MultinomialLogisticLoss(LossLayer):
    """loss = -sum_n log(max(p[n, y_n], 1e-20)) / N.

    bottom[0]: probabilities N x K (trailing axes flattened); bottom[1]: labels N (N x 1 x
    1 x 1). Backward: dp[n, y_n] = -w / (N max(p[n, y_n], 1e-20)), zero elsewhere.
    """

    exact_num_bottom = 2

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        lab = bottom[1]
        if lab.channels != 1 or lab.height != 1 or lab.width != 1:
            raise self.error(f"labels must be N x 1 x 1 x 1, got {lab.shape}")

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        n = bottom[0].shape[0]
        prob = _rows_and_labels(self, bottom)
        self.p = xp.maximum(prob[self.rows, self.lab], LOG_THRESHOLD)
        top[0].data[...] = -xp.log(self.p).sum(dtype=np.float64) / n

    def backward(self, top, propagate_down, bottom):
        if propagate_down[1]:
            raise self.error("cannot back-propagate to label inputs")
        if not propagate_down[0]:
            return
        n = bottom[0].shape[0]
        d = bottom[0].diff.reshape(n, -1)
        d[...] = 0
        scale = -top[0].diff.reshape(()) / np.float32(n)
        d[self.rows, self.lab] = scale / self.p
