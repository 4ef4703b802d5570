"""Caffe's compute_image_mean: the per-pixel mean of every Datum in a database, written as a
BlobProto (1 x C x H x W) and logged per channel.

Usage: python -m engine.tools.compute_image_mean [FLAGS] INPUT_DB [OUTPUT_FILE]
"""

import numpy as np

from engine import io
from engine.data import datum as datum_mod
from engine.data import images
from engine.data.lmdb_io import iter_records
from engine.data.sources import DataSourceError
from engine.proto import caffe_pb2
from engine.tools import FlagParser, run_main, setup_logging

USAGE = "compute_image_mean [FLAGS] INPUT_DB [OUTPUT_FILE]"


def flags():
    p = FlagParser("compute_image_mean", USAGE, "Compute the mean image of a set of images.")
    p.string("backend", "lmdb", "The backend {leveldb, lmdb} containing the images")
    p.boolean("skip_bad", False, "Skip records that cannot be decoded (counted in the log)")
    return p


def compute_mean(db_path, log, skip_bad=False):
    """(mean as float32 1 x C x H x W, record count, skipped count), summed like Caffe in
    float32, record after record, then divided by the count."""
    total = None
    count = skipped = 0
    for key, value in iter_records(db_path):
        what = datum_mod.record_name(f"LMDB {db_path}", key)
        try:
            arr, _ = datum_mod.decode_record(value, what, images.UNCHANGED)
            if total is None:
                total = np.zeros(arr.shape, dtype=np.float32)
                if datum_mod.parse_datum(value, what).encoded:
                    log.info("Decoding Datum")
                log.info("Starting iteration")
            elif arr.shape != total.shape:
                raise datum_mod.DatumError(
                    f"{what}: incorrect data field size {arr.size} (shape "
                    f"{'x'.join(map(str, arr.shape))}, first record "
                    f"{'x'.join(map(str, total.shape))})"
                )
        except datum_mod.DatumError as e:
            if not skip_bad:
                raise
            skipped += 1
            log.warning("Skipped bad record (%d skipped so far): %s", skipped, e)
            continue
        np.add(total, arr, out=total)
        count += 1
        if count % 10000 == 0:
            log.info("Processed %d files.", count)
    if count == 0:
        raise DataSourceError(f"LMDB {db_path}: no records to average")
    if count % 10000 != 0:
        log.info("Processed %d files.", count)
    if skipped:
        log.warning("Skipped %d bad records.", skipped)
    mean = total / np.float32(count)
    return mean[None].astype(np.float32), count, skipped


def mean_blobproto(mean):
    """BlobProto with Caffe's legacy num/channels/height/width fields, as the tool writes it."""
    blob = caffe_pb2.BlobProto()
    blob.num, blob.channels, blob.height, blob.width = (int(d) for d in mean.shape)
    blob.data.extend(mean.ravel().tolist())
    return blob


def main(argv):
    parser = flags()
    opts, args = parser.parse(argv)
    if len(args) not in (1, 2):
        parser.fail("needs INPUT_DB [OUTPUT_FILE]")
    if opts.backend.lower() != "lmdb":
        raise DataSourceError(f"backend {opts.backend!r} is not supported (use --backend=lmdb)")
    log = setup_logging("compute_image_mean")
    mean, _, _ = compute_mean(args[0], log, opts.skip_bad)
    if len(args) == 2:
        log.info("Write to %s", args[1])
        io.write_binary(args[1], mean_blobproto(mean))
    c = mean.shape[1]
    log.info("Number of channels: %d", c)
    per_channel = mean[0].reshape(c, -1).astype(np.float32)
    for i in range(c):
        log.info("mean_value channel [%d]: %g", i, float(per_channel[i].mean(dtype=np.float64)))
    return 0


if __name__ == "__main__":
    run_main(main)
