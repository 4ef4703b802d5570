"""Caffe's convert_imageset: images listed in LISTFILE ('<file> <label>' lines) under ROOTFOLDER
become Datums in an LMDB, keyed '%08d_<file>' by list position.

Usage: python -m engine.tools.convert_imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME
"""

import os

import numpy as np

from engine.data import datum as datum_mod
from engine.data import images
from engine.data.lmdb_io import LMDBWriter
from engine.data.sources import DataSourceError
from engine.tools import FlagParser, run_main, setup_logging

USAGE = "convert_imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME"


def flags():
    p = FlagParser(
        "convert_imageset",
        USAGE,
        "Convert a set of images to the leveldb/lmdb format used as input for Caffe.",
    )
    p.boolean("gray", False, "When this option is on, treat images as grayscale ones")
    p.boolean("shuffle", False, "Randomly shuffle the order of images and their labels")
    p.string("backend", "lmdb", "The backend {lmdb, leveldb} for storing the result")
    p.integer("resize_width", 0, "Width images are resized to")
    p.integer("resize_height", 0, "Height images are resized to")
    p.boolean(
        "check_size", False, "When this option is on, check that all the datum have the same size"
    )
    p.boolean("encoded", False, "When this option is on, the encoded image will be save in datum")
    p.string(
        "encode_type", "", "Optional: What type should we encode the image as ('png','jpg',...)."
    )
    p.boolean(
        "skip_bad", False, "Skip images that cannot be read (counted in the log) instead of failing"
    )
    p.integer("seed", 0, "Seed of the shuffle (0: unseeded)")
    return p


def _matches_ext(filename, encoding):
    ext = os.path.splitext(filename)[1].lower().lstrip(".")
    enc = encoding.lower()
    return ext == enc or (ext in ("jpg", "jpeg") and enc in ("jpg", "jpeg"))


def image_to_datum_bytes(path, label, height, width, is_color, encoding):
    """Caffe's ReadImageToDatum, serialized: raw BGR pixels, re-encoded or original bytes."""
    img = images.read_image_resized(path, height, width, is_color)
    if encoding:
        if (
            (img.shape[2] == 3) == is_color
            and not height
            and not width
            and _matches_ext(path, encoding)
        ):
            with open(path, "rb") as f:
                return datum_mod.encoded_datum(f.read(), label).SerializeToString(), None
        data = images.encode_image(img, encoding)
        return datum_mod.encoded_datum(data, label).SerializeToString(), None
    datum = datum_mod.image_to_datum(img, label)
    return datum.SerializeToString(), len(datum.data)


def convert(root, list_file, db_name, opts, log):
    if opts.backend.lower() != "lmdb":
        raise DataSourceError(f"backend {opts.backend!r} is not supported (use --backend=lmdb)")
    if (opts.resize_height > 0) != (opts.resize_width > 0) and (
        opts.resize_height or opts.resize_width
    ):
        log.warning("resize needs both --resize_height and --resize_width; not resizing")
    lines = [(name, label) for name, label, _ in images.read_image_list(list_file)]
    if opts.shuffle:
        log.info("Shuffling data")
        rng = np.random.default_rng(opts.seed or None)
        lines = [lines[i] for i in rng.permutation(len(lines))]
    log.info("A total of %d images.", len(lines))
    if opts.encode_type and not opts.encoded:
        log.info("encode_type specified, assuming encoded=true.")
    encoded = opts.encoded or bool(opts.encode_type)
    height = opts.resize_height if opts.resize_width > 0 else 0
    width = opts.resize_width if opts.resize_height > 0 else 0
    count = skipped = 0
    data_size = None
    with LMDBWriter(db_name) as db:
        for line_id, (name, label) in enumerate(lines):
            enc = opts.encode_type
            if encoded and not enc:
                p = name.rfind(".")
                if p < 0:
                    log.warning("Failed to guess the encoding of '%s'", name)
                enc = name[p + 1 :].lower() if p >= 0 else ""
                if not enc:
                    enc = "png"
            path = root + name
            try:
                value, size = image_to_datum_bytes(
                    path, label, height, width, not opts.gray, enc if encoded else ""
                )
            except images.ImageDecodeError as e:
                if not opts.skip_bad:
                    raise DataSourceError(f"{list_file} line {line_id + 1}: {e}") from None
                skipped += 1
                log.warning("Skipped %s (%d skipped so far): %s", path, skipped, e)
                continue
            if opts.check_size and size is not None:
                if data_size is None:
                    data_size = size
                elif size != data_size:
                    raise DataSourceError(
                        f"{path}: incorrect data field size {size} (first image gave {data_size})"
                    )
            db.put(f"{line_id:08d}_{name}", value)
            count += 1
            if count % 1000 == 0:
                db.commit()
                log.info("Processed %d files.", count)
    if count % 1000 != 0:
        log.info("Processed %d files.", count)
    if skipped:
        log.warning("Skipped %d unreadable images.", skipped)
    return count, skipped


def main(argv):
    parser = flags()
    opts, args = parser.parse(argv)
    if len(args) < 3:
        parser.fail("needs ROOTFOLDER/ LISTFILE DB_NAME")
    log = setup_logging("convert_imageset")
    convert(args[0], args[1], args[2], opts, log)
    return 0


if __name__ == "__main__":
    run_main(main)
