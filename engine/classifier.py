"""pycaffe's deploy-time wrappers: `Classifier` (resize, centre crop or 10-crop oversampling,
averaged predictions) and `Detector` (classify given windows of image files, R-CNN style)."""

import numpy as np

from engine import preprocess
from engine.net import TEST, Net
from engine.preprocess import Transformer, load_image, resize_image


def _configure_transformer(net, mean, input_scale, raw_scale, channel_swap):
    """A Transformer for the net's first input: H x W x K images to its C x H x W layout."""
    if not net.inputs:
        raise ValueError(f"net {net.name!r} ({net.source}) has no input blob to feed images to")
    in_ = net.inputs[0]
    transformer = Transformer({in_: net.blobs[in_].data.shape})
    transformer.set_transpose(in_, (2, 0, 1))
    if mean is not None:
        transformer.set_mean(in_, mean)
    if input_scale is not None:
        transformer.set_input_scale(in_, input_scale)
    if raw_scale is not None:
        transformer.set_raw_scale(in_, raw_scale)
    if channel_swap is not None:
        transformer.set_channel_swap(in_, channel_swap)
    return transformer


def _predict(net, images):
    """The net's first output for H x W x K images: each preprocessed into the first input,
    all run with forward_all."""
    in_ = net.inputs[0]
    batch = np.zeros((len(images),) + net.blobs[in_].data.shape[1:], dtype=np.float32)
    for ix, image in enumerate(images):
        batch[ix] = net.transformer.preprocess(in_, image)
    return net.forward_all(**{in_: batch})[net.outputs[0]]


class Classifier(Net):
    """pycaffe's caffe.Classifier: a TEST-phase Net that predicts class probabilities of
    H x W x K images. Images are resized to `image_dims` (default: the input's H x W), then
    cropped to the input size (centre crop, or the 10 corner/centre crops and mirrors when
    oversampling, whose predictions are averaged), preprocessed and run with forward_all."""

    def __init__(
        self,
        model_file,
        pretrained_file=None,
        image_dims=None,
        mean=None,
        input_scale=None,
        raw_scale=None,
        channel_swap=None,
    ):
        super().__init__(model_file, TEST, weights=pretrained_file)
        self.transformer = _configure_transformer(self, mean, input_scale, raw_scale, channel_swap)
        in_ = self.inputs[0]
        self.crop_dims = np.array(self.blobs[in_].data.shape[2:])
        if image_dims is None or len(image_dims) == 0:
            image_dims = self.crop_dims
        self.image_dims = np.array([int(d) for d in image_dims])
        if self.image_dims.shape != (2,) or (self.image_dims < self.crop_dims).any():
            raise ValueError(
                f"Classifier: image_dims {tuple(self.image_dims)} must be (height, width) no "
                f"smaller than the net input's {tuple(self.crop_dims)}"
            )

    def predict(self, inputs, oversample=True):
        """(N x classes) probabilities of N images (H x W x K arrays, e.g. from load_image):
        averaged over the 10 oversampled crops, or of the centre crop alone."""
        inputs = list(inputs)
        if not inputs:
            raise ValueError("Classifier.predict: no images given")
        ih, iw = (int(d) for d in self.image_dims)
        images = np.zeros((len(inputs), ih, iw, inputs[0].shape[2]), dtype=np.float32)
        for ix, image in enumerate(inputs):
            images[ix] = resize_image(image, (ih, iw))
        if oversample:
            crops = preprocess.oversample(images, self.crop_dims)
        else:
            # pycaffe's centre crop: [centre - crop/2, centre + crop/2), truncated to int.
            centre = self.image_dims / 2.0
            box = np.concatenate([centre - self.crop_dims / 2.0, centre + self.crop_dims / 2.0])
            y0, x0, y1, x1 = box.astype(int)
            crops = images[:, y0:y1, x0:x1, :]
        predictions = _predict(self, crops)
        if oversample:
            predictions = predictions.reshape((len(predictions) // 10, 10, -1)).mean(1)
        return predictions


class Detector(Net):
    """pycaffe's caffe.Detector: a TEST-phase Net that classifies windows (ymin, xmin, ymax,
    xmax) of image files, each warped to the input size; with `context_pad`, a border of that
    many input pixels is filled with context around the window (R-CNN), and with the mean
    where the context leaves the image. Selective-search proposals are not included: give
    the windows explicitly."""

    def __init__(
        self,
        model_file,
        pretrained_file=None,
        mean=None,
        input_scale=None,
        raw_scale=None,
        channel_swap=None,
        context_pad=None,
    ):
        super().__init__(model_file, TEST, weights=pretrained_file)
        self.transformer = _configure_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows):
        """[{'window', 'prediction', 'filename'}] for each window of each (image file, windows)
        pair, in order."""
        images_windows = [(fname, list(windows)) for fname, windows in images_windows]
        window_inputs = []
        for fname, windows in images_windows:
            image = load_image(fname).astype(np.float32)
            for window in windows:
                window_inputs.append(self.crop(image, window))
        if not window_inputs:
            raise ValueError("Detector.detect_windows: no windows given")
        predictions = _predict(self, window_inputs)
        detections = []
        ix = 0
        for fname, windows in images_windows:
            for window in windows:
                detections.append(
                    {"window": window, "prediction": predictions[ix], "filename": fname}
                )
                ix += 1
        return detections

    def crop(self, im, window):
        """The H x W x K window of `im` (rows ymin:ymax, cols xmin:xmax); with context_pad, the
        window grown by the context scale, placed on a mean-filled input-sized canvas."""
        window = np.asarray(window)
        y0, x0, y1, x1 = (int(v) for v in window[:4])
        crop = im[y0:y1, x0:x1]
        if not self.context_pad:
            return crop
        crop_size = self.blobs[self.inputs[0]].width  # pycaffe assumes a square input
        scale = crop_size / (1.0 * crop_size - self.context_pad * 2)
        box = window[:4].astype(np.float64)
        half_h = (box[2] - box[0] + 1) / 2.0
        half_w = (box[3] - box[1] + 1) / 2.0
        centre = np.array([box[0] + half_h, box[1] + half_w])
        box = np.round(np.tile(centre, 2) + scale * np.array([-half_h, -half_w, half_h, half_w]))
        scale_h = crop_size / (box[2] - box[0] + 1)
        scale_w = crop_size / (box[3] - box[1] + 1)
        pad_y = round(float(max(0.0, -box[0]) * scale_h))  # rows of context outside the image
        pad_x = round(float(max(0.0, -box[1]) * scale_w))
        im_h, im_w = im.shape[:2]
        box = np.clip(box, 0.0, [im_h, im_w, im_h, im_w])
        clip_h, clip_w = box[2] - box[0] + 1, box[3] - box[1] + 1
        if not (clip_h > 0 and clip_w > 0):
            raise ValueError(f"Detector.crop: window {window.tolist()} lies outside the image")
        crop_h = min(round(float(clip_h * scale_h)), crop_size - pad_y)
        crop_w = min(round(float(clip_w * scale_w)), crop_size - pad_x)
        by0, bx0, by1, bx1 = (int(v) for v in box)
        context = resize_image(im[by0:by1, bx0:bx1], (crop_h, crop_w))
        canvas = np.ones(tuple(self.crop_dims), dtype=np.float32) * self.crop_mean
        canvas[pad_y : pad_y + crop_h, pad_x : pad_x + crop_w] = context
        return canvas

    def configure_crop(self, context_pad):
        """Set `crop_dims` (the input as H x W x K) and `context_pad`; with context, the mean
        mapped back to raw image space (`crop_mean`) to fill context outside the image."""
        in_ = self.inputs[0]
        inv_transpose = np.argsort(self.transformer.transpose[in_])
        self.crop_dims = np.array(self.blobs[in_].data.shape[1:])[inv_transpose]
        self.context_pad = context_pad
        if not context_pad:
            return
        mean = self.transformer.mean.get(in_)
        if mean is None:
            self.crop_mean = np.zeros(tuple(self.crop_dims), dtype=np.float32)
            return
        crop_mean = np.array(mean, dtype=np.float32).transpose(inv_transpose)
        channel_order = self.transformer.channel_swap.get(in_)
        if channel_order is not None:
            crop_mean = crop_mean[:, :, np.argsort(channel_order)]
        raw_scale = self.transformer.raw_scale.get(in_)
        if raw_scale is not None:
            crop_mean = crop_mean / raw_scale
        self.crop_mean = crop_mean
