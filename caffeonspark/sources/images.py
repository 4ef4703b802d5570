"""Image-folder source: an ImageData layer's list file ('<file> <label>' lines) and its
root_folder, read by the tasks (local, file://, hdfs:// or s3:// paths).

Each task decodes its images as Caffe's ImageData does (colour or grey, then resized to
new_height x new_width when set, or to the first image's size with -resize), spills them as
raw Datums to a local Arrow file, and the worker's net reads them through a Data layer with
the ImageData layer's transform. shuffle: true shuffles each shard once, with the solver's
random_seed.
"""

from caffeonspark import storage
from caffeonspark.sources import DataSource, SourceError
from caffeonspark.sources.dataframe import ArrowLocalizer
from engine.data import images
from engine.data.datum import image_to_datum
from engine.data.images import parse_image_list
from engine.data.sources import DataSourceError


class ImageListSource(DataSource):
    kind = "images"

    def __init__(self, conf, layer, phase):
        super().__init__(conf, layer, phase)
        ip = layer.image_data_param
        if not ip.source:
            raise SourceError(f"{self.name}: image_data_param.source (the list file) is not set")
        if (ip.new_height > 0) != (ip.new_width > 0):
            raise SourceError(f"{self.name}: new_height and new_width must be set together")
        self.list_uri = storage.absolute(ip.source)
        self.root = ip.root_folder
        self.is_color = ip.is_color
        self.lines = read_list(self.list_uri, self.name)
        self.size = (int(ip.new_height), int(ip.new_width)) if ip.new_height > 0 else None
        if self.size is None and conf.resize:
            first, _ = self.lines[0]
            img = load_image(self.root + first, self.is_color, None, self.name)
            self.size = (int(img.shape[0]), int(img.shape[1]))
        seed = conf.solver_param.random_seed
        self.shuffle_seed = (seed if seed >= 0 else None) if ip.shuffle else None
        if ip.shuffle and self.shuffle_seed is None:
            import random

            self.shuffle_seed = random.randrange(2**31)

    def count(self, spark=None):
        return len(self.lines)

    def _items(self):
        return [(i, {"file": f, "label": lab}) for i, (f, lab) in enumerate(self.lines)]

    def _localizer(self, shuffle):
        convert = ImageConverter(self.root, self.is_color, self.size, self.name)
        return ArrowLocalizer(convert, self.name, self.shuffle_seed if shuffle else None)

    def shards(self, spark, num):
        if len(self.lines) < num:
            raise SourceError(f"{self.name}: {len(self.lines)} images cannot fill {num} shards")
        rdd = spark.sparkContext.parallelize(self._items(), num)
        rdd = self._persist(
            ("shards", num), rdd.repartitionAndSortWithinPartitions(num, lambda i, n=num: i % n)
        )
        return rdd, self._localizer(shuffle=True)

    def partitions(self, spark):
        num = self.conf.lmdb_partitions or spark.sparkContext.defaultParallelism
        num = max(1, min(num, len(self.lines)))
        rdd = self._persist(("partitions",), spark.sparkContext.parallelize(self._items(), num))
        return rdd, self._localizer(shuffle=False)


def read_list(uri, name):
    """[(file, label)] from a list file of '<file> <label>' lines (any storage URI)."""
    try:
        text = storage.read_bytes(uri, "image list").decode("utf-8")
        return [(file, label) for file, label, _ in parse_image_list(text, uri)]
    except (storage.StorageError, DataSourceError) as e:
        raise SourceError(f"{name}: {e}") from None


def load_image(path, is_color, size, name):
    """Decode one image file as Caffe's ReadImageToCVMat: H x W x C uint8 (BGR or grey)."""
    try:
        data = storage.read_bytes(storage.absolute(path), "image")
        img = images.decode_image(data, images.COLOR if is_color else images.GRAY, what=path)
    except (storage.StorageError, images.ImageDecodeError) as e:
        raise SourceError(f"{name}: {e}") from None
    if size is not None:
        img = images.resize_linear(img, *size)
    return img


class ImageConverter:
    """An image-list item -> (key, raw Datum bytes)."""

    def __init__(self, root, is_color, size, name):
        self.root = root
        self.is_color = is_color
        self.size = size
        self.name = name

    def __call__(self, item, index):
        img = load_image(self.root + item["file"], self.is_color, self.size, self.name)
        datum = image_to_datum(img, item["label"])
        return item["file"].encode("utf-8"), datum.SerializeToString()
