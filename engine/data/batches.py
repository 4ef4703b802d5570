"""Batch assembly for the data layers: take records from a source, decode, check, transform.

A RecordBatcher is the `produce` function a Prefetcher runs in its thread. Bad records raise
an error naming the source and key, unless skipping is asked for (ENGINE_SKIP_BAD_RECORDS=1 or
set_skip_bad(True)): then each skipped record is logged with the running count.
"""

import logging
import os

import numpy as np

from engine.data import datum as datum_mod
from engine.data import images
from engine.data.sources import DataSourceError, RecordSource
from engine.data.transformer import TransformError

log = logging.getLogger("engine.data")

SKIP_BAD_ENV = "ENGINE_SKIP_BAD_RECORDS"
_skip_override = {"value": None}


def set_skip_bad(value):
    """Force skipping of bad records on (True), off (False) or back to the env var (None)."""
    _skip_override["value"] = value


def skip_bad_records():
    """Whether bad records are skipped (and counted in the log) instead of raising."""
    if _skip_override["value"] is not None:
        return bool(_skip_override["value"])
    return os.environ.get(SKIP_BAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class BadRecordError(ValueError):
    """A record that cannot be decoded or does not fit the batch (names source and key)."""


class Batch:
    """One prepared batch: float32 data (N x C x H x W), float32 labels (N,), record keys."""

    __slots__ = ("data", "label", "keys")

    def __init__(self, data, label, keys):
        self.data = data
        self.label = label
        self.keys = keys


class BadRecords:
    """What a batcher does with a bad record: raise BadRecordError naming the source and key,
    or, with skipping on, log and count it (`skipped`). Needs `source`, `name`, `skip_bad`."""

    skipped = 0

    def what(self, key):
        return datum_mod.record_name(self.source.name, key)

    def _bad(self, key, err):
        what = self.what(key)
        msg = str(err)
        if what not in msg:
            err = f"{what}: {msg}"
        if not self.skip_bad:
            raise BadRecordError(str(err)) from None
        self.skipped += 1
        log.warning("%s: skipped bad record (%d skipped so far): %s", self.name, self.skipped, err)

    def _bad_in_run(self, key, err, run):
        """_bad for the next of `run` bad records in a row; returns run + 1, and fails once
        the run is longer than the source (every record is bad)."""
        self._bad(key, err)
        if run + 1 > len(self.source):
            raise DataSourceError(
                f"{self.source.name}: every record is bad ({self.skipped} skipped)"
            ) from None
        return run + 1


class RecordBatcher(BadRecords):
    """Turns records of a RecordSource into transformed batches.

    `decode(key, value)` returns (C x H x W array, label). With `raw_fast_path`, batches of
    uniform raw uint8 Datums are decoded in one vectorised step (datum.decode_raw_batch).
    With a `seed`, each batch's random crops and mirrors come from a generator keyed on
    (seed, the source's position at the batch's first record): the draws of a batch depend on
    where it stands in the stream, not on the batches before it, so a stream resumed with
    source.go_on_at draws what the uninterrupted one drew.
    """

    def __init__(
        self,
        source,
        transformer,
        batch_size,
        decode,
        name,
        raw_fast_path=False,
        skip_bad=None,
        seed=None,
    ):
        if not isinstance(source, RecordSource):
            raise TypeError(f"{name}: source must be a RecordSource, got {type(source).__name__}")
        self.source = source
        self.transformer = transformer
        self.batch_size = int(batch_size)
        self.decode = decode
        self.name = name
        self.raw_fast_path = raw_fast_path
        self.skip_bad = skip_bad_records() if skip_bad is None else skip_bad
        self.seed = seed

    def first_shape(self):
        """Output C x H x W of the next record (Caffe's DataLayerSetUp reads one datum)."""
        for _ in range(max(len(self.source), 1)):
            key, value = self.source.peek()
            try:
                arr, _ = self.decode(key, value)
                self.transformer.check(arr.shape, self.what(key))
                return self.transformer.output_shape(arr.shape)
            except (datum_mod.DatumError, images.ImageDecodeError, TransformError) as e:
                self._bad(key, e)
                self.source.take(1)
        raise DataSourceError(f"{self.source.name}: no valid record ({self.skipped} skipped)")

    def __call__(self, slot=None):
        n = self.batch_size
        if self.seed is not None and self.transformer.random:
            self.transformer.rng = np.random.default_rng((self.seed, self.source.position))
        records = self.source.take(n)
        keys, values = zip(*records)
        if self.raw_fast_path:
            got = datum_mod.decode_raw_batch(values)
            if got is not None and self._fits(got[0].shape[1:], keys[0]):
                raw, labels = got
                out = self._out(slot, (n,) + self.transformer.output_shape(raw.shape[1:]))
                self.transformer.transform(raw, out.data)
                out.label[...] = labels
                out.keys = list(keys)
                return out
        arrays, labels, keys = self._decode_each(records)
        oshape = self.transformer.output_shape(arrays[0].shape)
        out = self._out(slot, (n,) + oshape)
        self.transformer.transform_list(arrays, out.data)
        out.label[...] = labels
        out.keys = keys
        return out

    def _fits(self, shape, key):
        try:
            self.transformer.check(shape, self.what(key))
        except TransformError:
            return False  # the record-by-record path reports (or skips) each record
        return True

    def _decode_each(self, records):
        arrays, labels, keys = [], [], []
        oshape = None
        bad_run = 0
        queue = list(records)
        qi = 0
        while len(arrays) < self.batch_size:
            if qi == len(queue):
                queue.extend(self.source.take(self.batch_size - len(arrays)))
            key, value = queue[qi]
            qi += 1
            try:
                arr, label = self.decode(key, value)
                what = self.what(key)
                self.transformer.check(arr.shape, what)
                shape = self.transformer.output_shape(arr.shape)
                if oshape is None:
                    oshape = shape
                elif shape != oshape:
                    raise BadRecordError(
                        f"{what}: shape {'x'.join(map(str, arr.shape))} does not match the "
                        f"batch (first record gives {'x'.join(map(str, oshape))})"
                    )
            except (
                datum_mod.DatumError,
                images.ImageDecodeError,
                TransformError,
                BadRecordError,
            ) as e:
                bad_run = self._bad_in_run(key, e, bad_run)
                continue
            bad_run = 0
            arrays.append(arr)
            labels.append(label)
            keys.append(key)
        return arrays, np.asarray(labels, dtype=np.float32), keys

    @staticmethod
    def _out(slot, shape):
        if slot is not None and slot.data.shape == shape:
            return slot
        return Batch(np.empty(shape, dtype=np.float32), np.empty(shape[0], dtype=np.float32), [])


def datum_decoder(source_name, mode):
    """decode(key, value) for serialized Datums, decoding encoded images with `mode`."""

    def decode(key, value):
        return datum_mod.decode_record(value, datum_mod.record_name(source_name, key), mode)

    return decode
