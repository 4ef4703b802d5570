"""CaffeOnSpark's own prototxts: a MemoryData layer names its records with `source_class` and
`memory_data_param { source ... }` (fields of CaffeOnSpark's caffe.proto, kept in engine/proto):

    layer { name: "data" type: "MemoryData" top: "data" top: "label"
            source_class: "com.yahoo.ml.caffe.LMDB"
            memory_data_param { source: "file:///data/mnist_train_lmdb" batch_size: 64
                                channels: 1 height: 28 width: 28 } }

`standard_net` turns such a layer into the Data layer the rest of caffeonspark feeds, so the
prototxts of a CaffeOnSpark deployment run unchanged. The layer keeps `source_class` and
`memory_data_param` (DataSource.get reads the DataFrame settings from them).
"""

from engine.proto import caffe_pb2

PACKAGE = "com.yahoo.ml.caffe."
LMDB = "LMDB"
IMAGE_DATA_FRAME = "ImageDataFrame"
SEQ_IMAGE = "SeqImageDataSource"  # Hadoop sequence files (caffeonspark.sources.sequence)
DATA_FRAME_SOURCE = "DataFrameSource"  # CoSData layers' tables (caffeonspark.sources.columns)
SOURCE_CLASSES = (LMDB, IMAGE_DATA_FRAME, SEQ_IMAGE)
# A MemoryData layer with a source but no source_class reads an LMDB, as in CaffeOnSpark.
DEFAULT_SOURCE_CLASS = LMDB


def source_class(layer):
    """The short name of a layer's CaffeOnSpark source class ("LMDB", "ImageDataFrame",
    "SeqImageDataSource"), or None for a layer that is not fed that way."""
    if not (layer.source_class or layer.memory_data_param.source):
        return None
    name = layer.source_class or DEFAULT_SOURCE_CLASS
    return name[len(PACKAGE) :] if name.startswith(PACKAGE) else name


def is_cos_layer(layer):
    return layer.type == "MemoryData" and source_class(layer) is not None


def standard_net(net):
    """Rewrite (in place) every CaffeOnSpark MemoryData layer of `net` as a Data layer with
    the same source, batch, transform and tops; ValueError names a layer that cannot be."""
    for layer in net.layer:
        if not is_cos_layer(layer):
            continue
        what = f"layer {layer.name!r}"
        kind = source_class(layer)
        if kind not in SOURCE_CLASSES:
            known = ", ".join(PACKAGE + k for k in SOURCE_CLASSES)
            raise ValueError(f"{what}: unknown source_class {layer.source_class!r}; known: {known}")
        mp = layer.memory_data_param
        if not mp.source:
            raise ValueError(f"{what}: memory_data_param.source is not set")
        if mp.batch_size < 1:
            raise ValueError(f"{what}: memory_data_param.batch_size must be at least 1")
        layer.type = "Data"
        layer.data_param.source = mp.source
        layer.data_param.batch_size = mp.batch_size
        layer.data_param.backend = caffe_pb2.DataParameter.LMDB
        layer.source_class = PACKAGE + kind
        if kind == SEQ_IMAGE or (kind == IMAGE_DATA_FRAME and encoded_images(layer)):
            # CaffeOnSpark decodes encoded images as gray for 1 channel, color for 3.
            tp = layer.transform_param
            if mp.channels == 1 and not tp.force_color:
                tp.force_gray = True
            elif mp.channels == 3 and not tp.force_gray:
                tp.force_color = True
    return net


def encoded_images(layer):
    """Whether the layer's DataFrame holds encoded images (when it has no `encoded` column)."""
    return layer.image_encoded or layer.memory_data_param.image_encoded


def raw_shape(layer):
    """(channels, height, width) that raw pixels in a DataFrame without those columns have,
    from memory_data_param, or None when it does not give all three."""
    mp = layer.memory_data_param
    shape = (mp.channels, mp.height, mp.width)
    return shape if all(shape) else None


def resize_target(layer):
    """(height, width) that -resize scales a CaffeOnSpark layer's images to (its
    memory_data_param height and width, as CaffeOnSpark did), or None when it gives none."""
    mp = layer.memory_data_param
    if source_class(layer) is None or not (mp.height and mp.width):
        return None
    return int(mp.height), int(mp.width)
