"""Caffe's extract_features: run a trained net forward (TEST phase) and store blobs as Datums.

Each item of each named blob becomes a Datum with float_data (legacy channels/height/width of
the blob, so a N x K blob gives channels = K, height = width = 1), keyed by the item index as a
10-digit decimal; blobs are read after the whole forward pass. Usage:
python -m engine.tools.extract_features pretrained_net_param feature_extraction_proto_file \
    blob1[,blob2,...] db1[,db2,...] num_mini_batches db_type [CPU|GPU] [DEVICE_ID=0]
"""

import numpy as np

import engine
from engine.backend import to_numpy
from engine.data import datum as datum_mod
from engine.data.lmdb_io import LMDBWriter
from engine.data.sources import DataSourceError
from engine.tools import FlagParser, run_main, setup_logging

USAGE = (
    "extract_features pretrained_net_param feature_extraction_proto_file "
    "extract_feature_blob_name1[,name2,...] save_feature_dataset_name1[,name2,...] "
    "num_mini_batches db_type [CPU/GPU] [DEVICE_ID=0]"
)


def extract(
    weights, proto, blob_names, db_names, num_batches, db_type, log, device="CPU", dev_id=0
):
    """Write the features; returns {blob name: number of items written}."""
    if db_type.lower() != "lmdb":
        raise DataSourceError(f"db type {db_type!r} is not supported (use lmdb)")
    if len(blob_names) != len(db_names):
        raise ValueError(
            f"the number of blob names ({len(blob_names)}) and dataset names "
            f"({len(db_names)}) must be equal"
        )
    if device.upper() == "GPU":
        log.info("Using GPU %d", dev_id)
        engine.set_device(dev_id)
        engine.set_mode_gpu()
    else:
        log.info("Using CPU")
        engine.set_mode_cpu()
    net = engine.Net(proto, engine.TEST, weights=weights)
    for name in blob_names:
        if name not in net.blobs:
            raise ValueError(f"Unknown feature blob name {name} in the network {proto}")
    log.info("Extracting Features")
    writers = [LMDBWriter(d) for d in db_names]
    counts = dict.fromkeys(blob_names, 0)
    try:
        for _ in range(num_batches):
            net.forward()
            for name, db in zip(blob_names, writers):
                blob = net.blobs[name]
                feats = to_numpy(blob.data).reshape(blob.num, -1).astype(np.float32)
                for row in feats:
                    d = datum_mod.features_datum(row, blob.channels, blob.height, blob.width)
                    db.put(f"{counts[name]:010d}", d.SerializeToString())
                    counts[name] += 1
                    if counts[name] % 1000 == 0:
                        db.commit()
                        log.info(
                            "Extracted features of %d query images for feature blob %s",
                            counts[name],
                            name,
                        )
        for name in blob_names:
            if counts[name] % 1000 != 0:
                log.info(
                    "Extracted features of %d query images for feature blob %s",
                    counts[name],
                    name,
                )
    finally:
        for db in writers:
            db.close()
        for layer in net.layers:
            close = getattr(layer, "close", None)
            if close is not None:
                close()
    log.info("Successfully extracted the features!")
    return counts


def main(argv):
    parser = FlagParser("extract_features", USAGE, "Extract features of a trained net.")
    _, args = parser.parse(argv)
    if len(args) < 6:
        parser.fail("needs at least 6 arguments")
    try:
        num_batches = int(args[4])
        dev_id = int(args[7]) if len(args) > 7 else 0
    except ValueError:
        parser.fail(f"num_mini_batches and DEVICE_ID must be integers: {args[4:]}")
    if len(args) > 6 and args[6].upper() not in ("CPU", "GPU"):
        parser.fail(f"device must be CPU or GPU, got {args[6]!r}")
    log = setup_logging("extract_features")
    extract(
        args[0],
        args[1],
        args[2].split(","),
        args[3].split(","),
        num_batches,
        args[5],
        log,
        device=args[6] if len(args) > 6 else "CPU",
        dev_id=dev_id,
    )
    return 0


if __name__ == "__main__":
    run_main(main)
