"""Image decode, encode and resize the way Caffe's OpenCV path does it (BGR, H x W x C uint8),
with Pillow for the codecs and a NumPy copy of OpenCV's fixed-point INTER_LINEAR resize.

Decode modes follow cv::imread / cv::imdecode flags:
  COLOR      (IMREAD_COLOR)      3-channel BGR; grey is replicated, alpha dropped (not blended)
  GRAY       (IMREAD_GRAYSCALE)  1 channel; PNG uses libpng's rgb_to_gray (0.299, 0.587
                                 fixed point, truncating), JPEG libjpeg's own luma (Y plane)
  UNCHANGED  (IMREAD_UNCHANGED)  the file's own channels: grey 1, colour 3 (BGR), alpha 4 (BGRA)
COLOR and GRAY apply a JPEG's EXIF orientation like OpenCV; UNCHANGED does not.
"""

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

COLOR = "color"
GRAY = "gray"
UNCHANGED = "unchanged"

# libpng's png_set_rgb_to_gray(png, 1, 0.299, 0.587) as 15-bit fixed point (OpenCV PNG grey).
_PNG_RED = 29900 * 32768 // 100000
_PNG_GREEN = 58700 * 32768 // 100000
_PNG_BLUE = 32768 - _PNG_RED - _PNG_GREEN
# OpenCV's cvtColor BGR2GRAY (14-bit fixed point, rounded), used for other formats.
_CV_R, _CV_G, _CV_B = 4899, 9617, 1868

_RESIZE_BITS = 11
_RESIZE_ONE = 1 << _RESIZE_BITS


class ImageDecodeError(ValueError):
    """An image that cannot be decoded (the message names the file or record)."""


# --- decode ------------------------------------------------------------------------------------


def decode_image(data, mode=COLOR, what="<image>", contiguous=True):
    """Decode encoded image bytes to an H x W x C uint8 array in OpenCV's channel order.

    contiguous=False may return a strided view (e.g. RGB memory seen as BGR), saving a copy.
    """
    try:
        im = Image.open(io.BytesIO(data))
        return _pil_to_cv(im, mode, contiguous)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"{what}: cannot decode image ({len(data)} bytes): {e}") from None


def read_image(path, mode=COLOR):
    """cv::imread: decode an image file (H x W x C uint8, BGR)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageDecodeError(f"{path}: cannot read image: {e.strerror}") from None
    return decode_image(data, mode, what=str(path))


def _pil_to_cv(im, mode, contiguous=True):
    fmt = im.format
    if mode == GRAY and fmt in ("JPEG", "MPO") and im.mode in ("RGB", "YCbCr", "L"):
        # libjpeg's grey output is the decoded luma plane, not a conversion of RGB.
        im.draft("L", None)
    if mode != UNCHANGED:
        im = _exif_orient(im)
    im.load()
    pm = im.mode
    if pm in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        if mode == UNCHANGED:
            raise ValueError(f"{pm} images (more than 8 bits) are not supported")
        arr = np.asarray(im)
        im = Image.fromarray((arr.astype(np.uint32) >> 8).astype(np.uint8), "L")
        pm = "L"
    elif pm in ("1", "F"):
        im = im.convert("L")
        pm = "L"
    elif pm == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        pm = im.mode
    elif pm == "PA":
        im = im.convert("RGBA")
        pm = "RGBA"
    elif pm not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGBA" if "A" in pm else "RGB")
        pm = im.mode
    arr = np.asarray(im)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    out = _to_opencv_channels(arr, pm, mode, fmt == "PNG")
    return np.ascontiguousarray(out) if contiguous else out


def _to_opencv_channels(arr, pm, mode, png):
    """H x W x C in Pillow's order (L, LA, RGB, RGBA) -> OpenCV's channels for `mode`."""
    if mode == UNCHANGED:
        if pm == "L":
            return arr
        if pm == "LA":
            g, a = arr[:, :, 0], arr[:, :, 1]
            return np.stack([g, g, g, a], axis=2)
        if pm == "RGB":
            return arr[:, :, ::-1]
        return arr[:, :, [2, 1, 0, 3]]
    if pm in ("LA", "RGBA"):
        arr = arr[:, :, :-1]  # alpha is stripped, not composited
    if mode == COLOR:
        if arr.shape[2] == 1:
            return np.broadcast_to(arr, arr.shape[:2] + (3,))
        return arr[:, :, ::-1]
    if mode != GRAY:
        raise ValueError(f"unknown decode mode {mode!r}")
    if arr.shape[2] == 1:
        return arr
    return rgb_to_gray(arr, png=png)[:, :, None]


def _exif_orient(im):
    if im.format not in ("JPEG", "MPO") or "exif" not in im.info:
        return im
    if im.getexif().get(0x0112, 1) == 1:
        return im
    return ImageOps.exif_transpose(im)


def rgb_to_gray(rgb, png=False):
    """RGB (H x W x 3 uint8) to grey as libpng (png=True) or cv::cvtColor does it."""
    r = rgb[:, :, 0].astype(np.int32)
    g = rgb[:, :, 1].astype(np.int32)
    b = rgb[:, :, 2].astype(np.int32)
    if png:
        y = (_PNG_RED * r + _PNG_GREEN * g + _PNG_BLUE * b) >> 15
        y = np.where((r == g) & (r == b), r, y)
    else:
        y = (_CV_R * r + _CV_G * g + _CV_B * b + (1 << 13)) >> 14
    return y.astype(np.uint8)


# --- encode ------------------------------------------------------------------------------------


def encode_image(img, ext="png"):
    """cv::imencode: H x W x C uint8 in OpenCV channel order -> file bytes (png, jpg, bmp...)."""
    ext = ext.lower().lstrip(".")
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "jpe": "JPEG", "png": "PNG", "bmp": "BMP"}.get(ext)
    if fmt is None:
        fmt = ext.upper()
    if img.ndim == 2:
        img = img[:, :, None]
    c = img.shape[2]
    if c == 1:
        im = Image.fromarray(img[:, :, 0], "L")
    elif c == 3:
        im = Image.fromarray(np.ascontiguousarray(img[:, :, ::-1]), "RGB")
    elif c == 4:
        im = Image.fromarray(np.ascontiguousarray(img[:, :, [2, 1, 0, 3]]), "RGBA")
    else:
        raise ValueError(f"cannot encode a {c}-channel image")
    buf = io.BytesIO()
    kwargs = {"quality": 95} if fmt == "JPEG" else {}  # OpenCV's default JPEG quality
    try:
        im.save(buf, format=fmt, **kwargs)
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"cannot encode image as {ext!r}: {e}") from None
    return buf.getvalue()


# --- resize ------------------------------------------------------------------------------------


def _linear_taps(src, dst):
    """OpenCV's INTER_LINEAR source indices and 11-bit weights along one axis.

    Returns (i0, i1, w0, w1, w0_unclamped, w1_unclamped): x clamps the weight to the edge
    pixel (OpenCV's xmin/xmax), y keeps the unclamped weights and clips the rows instead.
    """
    scale = 1.0 / (dst / src)
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s.astype(np.float32)).astype(np.float32)
    wy0 = np.rint((np.float32(1.0) - f) * np.float32(_RESIZE_ONE)).astype(np.int32)
    wy1 = np.rint(f * np.float32(_RESIZE_ONE)).astype(np.int32)
    clamp = (s < 0) | (s >= src - 1)
    fx = np.where(clamp, np.float32(0.0), f).astype(np.float32)
    wx0 = np.rint((np.float32(1.0) - fx) * np.float32(_RESIZE_ONE)).astype(np.int32)
    wx1 = np.rint(fx * np.float32(_RESIZE_ONE)).astype(np.int32)
    i0 = np.clip(s, 0, src - 1)
    i1 = np.clip(s + 1, 0, src - 1)
    return i0, i1, wx0, wx1, wy0, wy1


def resize_linear(img, height, width):
    """cv::resize(img, Size(width, height)) with INTER_LINEAR on uint8 H x W x C, bit exact.

    Horizontal pass: S0 * a0 + S1 * a1 in int32 (11-bit weights); vertical pass as OpenCV's
    VResizeLinear for uchar: (((b0 * (T0 >> 4)) >> 16) + ((b1 * (T1 >> 4)) >> 16) + 2) >> 2.
    """
    squeeze = img.ndim == 2
    if squeeze:
        img = img[:, :, None]
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        out = img.copy()
        return out[:, :, 0] if squeeze else out
    if img.dtype != np.uint8:
        raise ValueError(f"resize_linear needs uint8 pixels, got {img.dtype}")
    x0, x1, a0, a1, _, _ = _linear_taps(w, width)
    y0, y1, _, _, b0, b1 = _linear_taps(h, height)
    src = img.astype(np.int32)
    # Rows first only gathers the rows OpenCV touches; the horizontal sums are exact ints.
    rows = np.union1d(y0, y1)
    pos = np.searchsorted(rows, rows)
    lut = np.empty(h, dtype=np.int64)
    lut[rows] = pos
    src_rows = src[rows]
    horiz = src_rows[:, x0] * a0[None, :, None] + src_rows[:, x1] * a1[None, :, None]
    t0 = horiz[lut[y0]] >> 4
    t1 = horiz[lut[y1]] >> 4
    out = ((b0[:, None, None] * t0) >> 16) + ((b1[:, None, None] * t1) >> 16) + 2
    out = np.clip(out >> 2, 0, 255).astype(np.uint8)
    return out[:, :, 0] if squeeze else out


def read_image_resized(path, height=0, width=0, is_color=True):
    """Caffe's ReadImageToCVMat: imread (COLOR or GRAYSCALE), then resize if both sizes set."""
    img = read_image(path, COLOR if is_color else GRAY)
    if height > 0 and width > 0:
        img = resize_linear(img, height, width)
    return img


def hwc_to_chw(img, copy=True):
    """H x W x C (cv::Mat order) to C x H x W (Caffe's blob order); copy=False: a view."""
    chw = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)
    return np.ascontiguousarray(chw) if copy else chw


def parse_image_list(text, source):
    """[(file, label, line number)] from the '<file> <label>' lines of a Caffe image list
    (convert_imageset, ImageData); the file name may contain spaces. Errors name the line."""
    from engine.data.sources import DataSourceError

    lines = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, sep, label = line.rstrip().rpartition(" ")
        try:
            if not sep or not name:
                raise ValueError
            lines.append((name, int(label), i))
        except ValueError:
            raise DataSourceError(
                f"{source}:{i}: expected '<file> <label>', got {line!r}"
            ) from None
    if not lines:
        raise DataSourceError(f"{source}: image list is empty")
    return lines


def read_image_list(path):
    """parse_image_list of a local list file."""
    from engine.data.sources import DataSourceError

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise DataSourceError(f"{path}: cannot read image list: {e.strerror}") from None
    return parse_image_list(text, path)
