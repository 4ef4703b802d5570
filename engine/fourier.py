"""Stride-1 2-D convolution through the discrete Fourier transform, every transform a matrix
product: for small images and 5x5-like kernels this needs a third of im2col's multiply-adds.

Each signal (an image, a top map or a kernel) sits at an offset inside one padded frame
Fh x Fw (Fh = H + 2 ph, Fw = W + 2 pw); in that frame the circular correlation of image and
kernel equals Caffe's convolution on the output pixels (no wrap-around reaches them), and the
adjoint products give both gradients, so forward and backward are exact up to float rounding
(about 2e-7 of the largest value, like the GEMM path).

A spectrum is a real array (2, Fh, Fr, B): real and imaginary parts, every row frequency u,
the column frequencies v < Fr = Fw // 2 + 1 (the rest follow by symmetry), then B signals. So
the channel sums at one frequency are one small complex matrix product over the B axis, and
the transforms are GEMMs that read and write NCHW arrays in place (their strides go to BLAS;
no transposed copies).
"""

import functools
import math
import os

import numpy as np

from engine import backend
from engine.im2col import parallel_gemms, workspace

FORWARD_ENV = "ENGINE_FOURIER_FORWARD"
# Signals are transformed in blocks whose intermediate (between the row and the column
# transforms) holds at most this many values (1 MB), each thread on its own blocks.
TRANSFORM_BLOCK = 1 << 18


FORWARD_MODES = ("test", "all", "none")
_FORWARD_ALIASES = {"1": "all", "true": "all", "yes": "all", "on": "all"}
_FORWARD_ALIASES.update({"0": "none", "false": "none", "no": "none", "off": "none"})


def forward_mode():
    """Which forward passes may run through the transform (ENGINE_FOURIER_FORWARD): "test"
    (the default: TEST-phase nets), "all" (or 1) or "none" (or 0).

    Gradients through the transform round differently from Caffe's GEMMs by ~2e-7 of their
    size, which training shrugs off. A TRAIN forward output that differs from Caffe's even
    by an ulp can flip a max-pool or ReLU near-tie and send training on another path (one
    golden LeNet run then leaves Caffe's loss by 8e-4 after 26 iterations; nudging each
    conv2 output by a random +-2^-22 of itself failed it in one of two tries), so TRAIN
    forwards stay on the GEMM path, bit for bit Caffe's, unless "all" is asked for. TEST nets
    (test, features) train nothing: their outputs differ from Caffe's by rounding only, as
    under another BLAS.
    """
    value = os.environ.get(FORWARD_ENV, "").strip().lower() or "test"
    mode = _FORWARD_ALIASES.get(value, value)
    if mode not in FORWARD_MODES:
        raise ValueError(
            f"{FORWARD_ENV}={os.environ[FORWARD_ENV]!r}: expected one of test, all, none "
            "(or 1 for all, 0 for none)"
        )
    return mode


def forward_enabled(train):
    """Whether a forward pass of a TRAIN (train=True) or TEST net goes through the transform."""
    mode = forward_mode()
    return mode == "all" or (mode == "test" and not train)


@functools.lru_cache(maxsize=256)
def _row_forward(frame, length, offset, dtype):
    """(2 Fr, length): the half-spectrum DFT of a real row placed at `offset` in `frame`
    samples; output rows are (real/imag, v)."""
    v = np.arange(frame // 2 + 1)[:, None]
    angle = 2 * np.pi * v * (np.arange(length) + offset)[None, :] / frame
    return np.concatenate([np.cos(angle), -np.sin(angle)]).astype(dtype)


@functools.lru_cache(maxsize=256)
def _col_forward(frame, length, offset, dtype):
    """(2 F, 2 length): the complex DFT along a column, on inputs ordered (t, real/imag) and
    giving outputs ordered (real/imag, u)."""
    u = np.arange(frame)[:, None]
    angle = 2 * np.pi * u * (np.arange(length) + offset)[None, :] / frame
    c, s = np.cos(angle), np.sin(angle)
    m = np.empty((2, frame, length, 2))
    m[0, :, :, 0], m[0, :, :, 1] = c, s  # (a + ib)(c - is): real c a + s b
    m[1, :, :, 0], m[1, :, :, 1] = -s, c  # imaginary c b - s a
    return m.reshape(2 * frame, 2 * length).astype(dtype)


@functools.lru_cache(maxsize=256)
def _col_inverse(frame, length, offset, dtype):
    """(2 length, 2 F): the inverse complex DFT along a column (1/F included), evaluated at
    positions offset..offset+length-1, on inputs (real/imag, u), outputs (t, real/imag)."""
    t = (np.arange(length) + offset)[:, None]
    angle = 2 * np.pi * t * np.arange(frame)[None, :] / frame
    c, s = np.cos(angle) / frame, np.sin(angle) / frame
    m = np.empty((length, 2, 2, frame))
    m[:, 0, 0], m[:, 0, 1] = c, -s  # (a + ib)(c + is): real c a - s b
    m[:, 1, 0], m[:, 1, 1] = s, c  # imaginary s a + c b
    return m.reshape(2 * length, 2 * frame).astype(dtype)


@functools.lru_cache(maxsize=256)
def _row_inverse(frame, length, offset, dtype):
    """(2 Fr, length): the real inverse DFT of a half spectrum (real/imag, v), evaluated at
    positions offset..offset+length-1; the missing half is counted by doubling."""
    half = frame // 2 + 1
    weight = np.full(half, 2.0)
    weight[0] = 1.0
    if frame % 2 == 0:
        weight[-1] = 1.0
    angle = 2 * np.pi * np.arange(half)[:, None] * (np.arange(length) + offset)[None, :] / frame
    scale = (weight / frame)[:, None]
    return np.concatenate([scale * np.cos(angle), -scale * np.sin(angle)]).astype(dtype)


class Plan:
    """The transforms of one geometry: images (H, W) padded by (ph, pw), kernel (kh, kw),
    stride 1, dilation 1. The three kinds of signal: images (at the pad offset), maps (top
    blobs, at 0) and kernels (at 0)."""

    def __init__(self, in_spatial, kernel, pad, dtype=np.float32):
        (h, w), (kh, kw), (ph, pw) = in_spatial, kernel, pad
        self.frame = (h + 2 * ph, w + 2 * pw)
        self.out_spatial = (self.frame[0] - kh + 1, self.frame[1] - kw + 1)
        self.half = self.frame[1] // 2 + 1
        self.freqs = self.frame[0] * self.half
        self.dtype = np.dtype(dtype)
        self.sides = {
            "image": (tuple(in_spatial), tuple(pad)),
            "map": (self.out_spatial, (0, 0)),
            "kernel": (tuple(kernel), (0, 0)),
        }

    def spectrum_shape(self, count):
        return (2, self.frame[0], self.half, count)

    def transform_macs(self, side, count):
        """Multiply-adds of the forward (or inverse) transform of `count` signals."""
        (h, w), _ = self.sides[side]
        return count * (h * w * 2 * self.half + 4 * self.frame[0] * h * self.half)

    def macs(self, num, c_in, c_out):
        """Multiply-adds of one forward pass: image and map transforms and the products."""
        products = 4 * self.freqs * num * c_in * c_out
        return (
            self.transform_macs("image", num * c_in)
            + self.transform_macs("map", num * c_out)
            + self.transform_macs("kernel", c_in * c_out)
            + products
        )

    def _chunks(self, side, count, fn):
        """fn(b0, b1) over blocks of the B signals small enough (TRANSFORM_BLOCK) that the
        intermediate between the two transforms stays in cache, split between threads."""
        (h, _), _ = self.sides[side]
        block = max(16, TRANSFORM_BLOCK // (2 * h * self.half))

        def run(r0, r1):
            for b0 in range(r0, r1, block):
                fn(b0, min(r1, b0 + block))

        if not parallel_gemms(count, run, count * 2 * self.freqs):
            run(0, count)

    def spectrum(self, side, signals, out):
        """out (2, Fh, Fr, B) = the spectrum of `signals` (B, h, w) placed in the frame."""
        (h, w), (oh, ow) = self.sides[side]
        count = signals.shape[0]
        fh, fw = self.frame
        row = _row_forward(fw, w, ow, self.dtype)
        col = _col_forward(fh, h, oh, self.dtype)
        out3 = _matrix(out, 2 * fh).reshape(2 * fh, self.half, count)

        def run(b0, b1):
            rows = workspace("fourier_rows", (h, 2, self.half, b1 - b0), self.dtype)
            # Row transform, one GEMM per image row: (2 Fr, w) @ (w, b) reading NCHW.
            np.matmul(row, signals[b0:b1].transpose(1, 2, 0), out=rows.reshape(h, -1, b1 - b0))
            # Column transform, one GEMM per column frequency v: (2 Fh, 2 h) @ (2 h, b),
            # the inputs ordered (t, re/im).
            src = rows.reshape(2 * h, self.half, b1 - b0).transpose(1, 0, 2)
            np.matmul(col, src, out=out3[:, :, b0:b1].transpose(1, 0, 2))

        self._chunks(side, count, run)
        return out

    def inverse(self, side, spectrum, out):
        """out (B, h, w) = the real signal of `spectrum` (2, Fh, Fr, B) at the side's place."""
        (h, w), (oh, ow) = self.sides[side]
        fh, fw = self.frame
        count = spectrum.shape[-1]
        icol = _col_inverse(fh, h, oh, self.dtype)
        irow = _row_inverse(fw, w, ow, self.dtype)
        spec3 = _matrix(spectrum, 2 * fh).reshape(2 * fh, self.half, count)

        def run(b0, b1):
            cols = workspace("fourier_cols", (h, 2, self.half, b1 - b0), self.dtype)
            # Inverse column transform per v: (2 h, 2 Fh) @ (2 Fh, b), outputs (t, re/im).
            dst = cols.reshape(2 * h, self.half, b1 - b0).transpose(1, 0, 2)
            np.matmul(icol, spec3[:, :, b0:b1].transpose(1, 0, 2), out=dst)
            # One GEMM per output row, (b, 2 Fr) @ (2 Fr, w), written straight into NCHW.
            src = cols.reshape(h, 2 * self.half, b1 - b0).transpose(0, 2, 1)
            np.matmul(src, irow, out=out[b0:b1].transpose(1, 0, 2))

        self._chunks(side, count, run)
        return out


def _matrix(spectrum, rows):
    """A contiguous spectrum as a (rows, -1) matrix view (a copy would lose the writes)."""
    if not spectrum.flags.c_contiguous:
        raise ValueError("spectra must be contiguous arrays")
    return spectrum.reshape(rows, -1)


def cmatmul(a, b, out, conj_a=False, conj_b=False):
    """out = a @ b over stacks of complex matrices held as (2, F, m, k) real/imaginary parts
    (either operand optionally conjugated): four real products per item, the F items split
    between threads in one parallel section (each hand-off costs ~50 us here)."""
    xp = backend.get_array_module(out)
    sa = -1.0 if conj_a else 1.0
    sb = -1.0 if conj_b else 1.0

    def run(f0, f1):
        a0, a1, b0, b1 = a[0, f0:f1], a[1, f0:f1], b[0, f0:f1], b[1, f0:f1]
        re, im = out[0, f0:f1], out[1, f0:f1]
        extra = workspace("fourier_product", re.shape, out.dtype, xp)
        xp.matmul(a0, b0, out=re)
        xp.matmul(a1, b1, out=extra)
        if sa * sb > 0:
            xp.subtract(re, extra, out=re)
        else:
            xp.add(re, extra, out=re)
        xp.matmul(a0, b1, out=im)
        xp.matmul(a1, b0, out=extra)
        # imaginary part: sb * re(a) im(b) + sa * im(a) re(b)
        if sb < 0:
            xp.negative(im, out=im)
        if sa > 0:
            xp.add(im, extra, out=im)
        else:
            xp.subtract(im, extra, out=im)

    macs = out[0].size * a.shape[-1]  # of one of the four products
    if not parallel_gemms(out.shape[1], run, macs, xp):
        run(0, out.shape[1])
    return out


def direct_macs(num, c_in, c_out, kernel, out_spatial):
    """Multiply-adds of one im2col GEMM forward pass, for comparison with Plan.macs."""
    return num * c_in * c_out * math.prod(kernel) * math.prod(out_spatial)
