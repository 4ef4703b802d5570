"""CaffeOnSpark's sequence files (source_class com.yahoo.ml.caffe.SeqImageDataSource).

A Hadoop SequenceFile of (BytesWritable key, BytesWritable value) pairs, as CaffeOnSpark's
Binary2Sequence and LMDB2Sequence tools wrote them: the value holds the image bytes, the key a
Java-serialized record header, one of
  scala.Tuple2(id, label) or com.yahoo.ml.dl.caffe.Pair(id, label): an encoded image;
  scala.Tuple6(id, label, channels, height, width, encoded): raw pixels when not encoded,
  interleaved in OpenCV's order (height, width, channels).
Spark's JVM reads the files (any Hadoop file system); the keys are decoded here, in the
tasks, by a reader of Java's object serialization stream format (the subset those headers
use: objects, strings, boxed primitives, references, arrays). The rows then take the
DataFrame source's path (RowConverter, Arrow spill).
"""

import struct

from caffeonspark import storage
from caffeonspark.sources import SourceError, describe_layer

KEY_CLASS = VALUE_CLASS = "org.apache.hadoop.io.BytesWritable"
COLUMNS = ("SampleID", "label", "channels", "height", "width", "encoded", "data")

# Java object serialization stream constants (java.io.ObjectStreamConstants).
_MAGIC, _VERSION = 0xACED, 5
_BASE_HANDLE = 0x7E0000
TC_NULL, TC_REFERENCE, TC_CLASSDESC, TC_OBJECT, TC_STRING, TC_ARRAY = range(0x70, 0x76)
TC_CLASS, TC_BLOCKDATA, TC_ENDBLOCKDATA, TC_RESET, TC_BLOCKDATALONG = range(0x76, 0x7B)
TC_EXCEPTION, TC_LONGSTRING, TC_PROXYCLASSDESC, TC_ENUM = range(0x7B, 0x7F)
SC_WRITE_METHOD, SC_SERIALIZABLE, SC_EXTERNALIZABLE, SC_BLOCK_DATA = 0x01, 0x02, 0x04, 0x08
_PRIMITIVES = {
    "B": ">b",
    "C": ">H",
    "D": ">d",
    "F": ">f",
    "I": ">i",
    "J": ">q",
    "S": ">h",
    "Z": ">?",
}
_BOXED = {
    "java.lang." + n for n in ("Integer", "Long", "Short", "Byte", "Boolean", "Float", "Double")
}


class JavaSerializationError(ValueError):
    """Bytes that are not (or not a supported part of) Java's serialization format."""


class JavaObject:
    """A deserialized Java object: its class name and its serialized fields by name."""

    def __init__(self, class_name):
        self.class_name = class_name
        self.fields = {}

    def __repr__(self):
        return f"JavaObject({self.class_name!r}, {self.fields!r})"


class _ClassDesc:
    def __init__(self, name):
        self.name = name
        self.flags = 0
        self.fields = []  # (type code, name) in stream order
        self.superclass = None


class _Reader:
    def __init__(self, data):
        self.data = bytes(data)
        self.pos = 0
        self.handles = []

    def fail(self, message):
        raise JavaSerializationError(f"{message} (at byte {self.pos} of {len(self.data)})")

    def take(self, n):
        if self.pos + n > len(self.data):
            self.fail(f"truncated: {n} more byte(s) needed")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt):
        (value,) = struct.unpack(fmt, self.take(struct.calcsize(fmt)))
        return value

    def u1(self):
        return self.unpack(">B")

    def utf(self, length):
        """Java's modified UTF-8: NUL as C0 80, characters beyond the BMP as surrogates."""
        raw = self.take(length).replace(b"\xc0\x80", b"\x00")
        try:
            text = raw.decode("utf-8", "surrogatepass")
            return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le")
        except UnicodeError:
            self.fail("a string that is not modified UTF-8")

    def new_handle(self, value):
        self.handles.append(value)
        return len(self.handles) - 1

    def reference(self):
        handle = self.unpack(">i") - _BASE_HANDLE
        if not 0 <= handle < len(self.handles):
            self.fail(f"reference to unknown handle {handle + _BASE_HANDLE:#x}")
        return self.handles[handle]

    # --- grammar (Java Object Serialization Specification, chapter 6) -----------------------
    def stream(self):
        if self.unpack(">H") != _MAGIC or self.unpack(">H") != _VERSION:
            self.pos = 0
            self.fail("not a Java serialization stream (no AC ED 00 05 header)")
        obj = self.content()
        if self.pos != len(self.data):
            self.fail("bytes left after the object")
        return obj

    def content(self):
        tc = self.u1()
        if tc == TC_NULL:
            return None
        if tc == TC_REFERENCE:
            return self.reference()
        if tc == TC_STRING:
            return self._string(self.unpack(">H"))
        if tc == TC_LONGSTRING:
            return self._string(self.unpack(">q"))
        if tc == TC_OBJECT:
            return self._object()
        if tc == TC_ARRAY:
            return self._array()
        if tc == TC_ENUM:
            desc = self.class_desc()
            handle = self.new_handle(None)
            name = self.content()
            self.handles[handle] = f"{desc.name}.{name}"
            return self.handles[handle]
        if tc == TC_CLASS:
            desc = self.class_desc()
            self.new_handle(desc)
            return desc
        if tc == TC_CLASSDESC:
            self.pos -= 1
            return self.class_desc()
        self.pos -= 1
        self.fail(f"unsupported type code {tc:#04x}")

    def _string(self, length):
        text = self.utf(length)
        self.new_handle(text)
        return text

    def class_desc(self):
        tc = self.u1()
        if tc == TC_NULL:
            return None
        if tc == TC_REFERENCE:
            desc = self.reference()
            if not isinstance(desc, _ClassDesc):
                self.fail("a reference to something that is not a class description")
            return desc
        if tc != TC_CLASSDESC:
            self.pos -= 1
            self.fail(f"expected a class description, got type code {tc:#04x}")
        desc = _ClassDesc(self.utf(self.unpack(">H")))
        self.take(8)  # serialVersionUID
        self.new_handle(desc)
        desc.flags = self.u1()
        for _ in range(self.unpack(">H")):
            code = chr(self.u1())
            name = self.utf(self.unpack(">H"))
            if code in "L[":
                self.content()  # the field's class name, a string
            elif code not in _PRIMITIVES:
                self.fail(f"field {name!r} of {desc.name} has unknown type code {code!r}")
            desc.fields.append((code, name))
        self.annotation()
        desc.superclass = self.class_desc()
        return desc

    def annotation(self):
        """Block data and objects up to TC_ENDBLOCKDATA (a class's or writeObject's extras)."""
        while True:
            tc = self.u1()
            if tc == TC_ENDBLOCKDATA:
                return
            if tc == TC_BLOCKDATA:
                self.take(self.u1())
            elif tc == TC_BLOCKDATALONG:
                self.take(self.unpack(">i"))
            else:
                self.pos -= 1
                self.content()

    def value(self, code):
        if code in "L[":
            return self.content()
        value = self.unpack(_PRIMITIVES[code])
        return chr(value) if code == "C" else value

    def _object(self):
        desc = self.class_desc()
        if desc is None:
            self.fail("an object without a class")
        obj = JavaObject(desc.name)
        handle = self.new_handle(obj)
        chain = []
        while desc is not None:
            chain.append(desc)
            desc = desc.superclass
        for d in reversed(chain):  # superclass fields first
            if d.flags & SC_EXTERNALIZABLE:
                if not d.flags & SC_BLOCK_DATA:
                    self.fail(f"{d.name} is externalizable in the old protocol: unsupported")
                self.annotation()
                continue
            for code, name in d.fields:
                obj.fields[name] = self.value(code)
            if d.flags & SC_WRITE_METHOD:
                self.annotation()
        if obj.class_name in _BOXED:
            self.handles[handle] = obj.fields.get("value")
        return self.handles[handle]

    def _array(self):
        desc = self.class_desc()
        if desc is None or not desc.name.startswith("["):
            self.fail("an array without an array class")
        handle = self.new_handle(None)
        size = self.unpack(">i")
        code = desc.name[1]
        if code == "B":
            items = self.take(size)
        else:
            items = [self.value(code) for _ in range(size)]
        self.handles[handle] = items
        return items


def read_java_object(data):
    """The object a Java ObjectOutputStream wrote into `data` (one writeObject): strings as
    str, boxed primitives as their values, objects as JavaObject, arrays as lists (bytes for
    byte[])."""
    return _Reader(data).stream()


def decode_key(key, what):
    """The record header in a sequence file key: a dict of SampleID, label, channels, height,
    width, encoded (shape None for a pair: the value is an encoded image)."""
    if key is None:
        raise SourceError(f"{what}: the key is null (CaffeOnSpark keys hold the id and label)")
    try:
        obj = read_java_object(key)
    except JavaSerializationError as e:
        raise SourceError(f"{what}: the key is not a Java-serialized (id, label): {e}") from None
    fields = obj.fields if isinstance(obj, JavaObject) else {}
    out = dict.fromkeys(COLUMNS[:-1])
    if "_1" in fields and "_2" in fields:
        out["SampleID"], out["label"] = fields["_1"], fields["_2"]
    elif "first" in fields and "second" in fields:
        out["SampleID"], out["label"] = fields["first"], fields["second"]
    else:
        kind = obj.class_name if isinstance(obj, JavaObject) else type(obj).__name__
        raise SourceError(
            f"{what}: the key is a {kind}, not one of CaffeOnSpark's headers (scala.Tuple2 or "
            "com.yahoo.ml.dl.caffe.Pair of id and label, scala.Tuple6 of id, label, channels, "
            "height, width, encoded)"
        )
    if "_6" in fields:
        out["channels"], out["height"], out["width"] = fields["_3"], fields["_4"], fields["_5"]
        out["encoded"] = bool(fields["_6"])
        if not (out["height"] and out["width"]):  # CaffeOnSpark: no shape, an encoded image
            out["channels"] = out["height"] = out["width"] = None
    else:
        out["encoded"] = True
    for name in ("SampleID", "label"):
        if out[name] is not None and not isinstance(out[name], str):
            out[name] = str(out[name])
    return out


class SequenceRows:
    """mapPartitionsWithIndex function over (key, value) byte pairs -> row tuples (COLUMNS),
    naming a bad record by partition and position."""

    def __init__(self, name):
        self.name = name

    def __call__(self, partition, pairs):
        for i, (key, value) in enumerate(pairs):
            header = decode_key(key, f"{self.name}: record {i} of partition {partition}")
            data = None if value is None else bytes(value)
            yield tuple(header[c] for c in COLUMNS[:-1]) + (data,)


def read(conf, layer, phase):
    """A DataFrameSource over the layer's sequence files (memory_data_param.source)."""
    from pyspark.sql import types as T

    from caffeonspark.sources.dataframe import HWC, DataFrameSource

    name = describe_layer(layer, phase)
    spark = conf.spark
    if spark is None:
        raise SourceError(f"{name}: reading sequence files needs a SparkSession")
    path = storage.absolute(layer.data_param.source)
    if storage.is_local(path) and not storage.exists(path):
        raise SourceError(f"{name}: sequence file(s) {path} not found")
    sc = spark.sparkContext
    try:
        pairs = sc.sequenceFile(path, KEY_CLASS, VALUE_CLASS, minSplits=conf.clusterSize or None)
        head = pairs.take(1)
    except Exception as e:  # noqa: BLE001 - py4j errors carry the Hadoop message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"{name}: cannot read sequence file(s) {path}: {first}") from None
    if not head:
        raise SourceError(f"{name}: sequence file(s) {path} hold no records")
    # The first key here, on the driver: files of other keys fail before any job starts.
    decode_key(head[0][0], f"{name}: the first record of {storage.shown(path)}")
    schema = T.StructType(
        [
            T.StructField("SampleID", T.StringType(), True),
            T.StructField("label", T.StringType(), True),
            T.StructField("channels", T.IntegerType(), True),
            T.StructField("height", T.IntegerType(), True),
            T.StructField("width", T.IntegerType(), True),
            T.StructField("encoded", T.BooleanType(), True),
            T.StructField("data", T.BinaryType(), True),
        ]
    )
    rows = pairs.mapPartitionsWithIndex(SequenceRows(f"{name} ({storage.shown(path)})"))
    # CaffeOnSpark wrote raw pixels in OpenCV's order (LMDB2Sequence), as its reader expects.
    df = spark.createDataFrame(rows, schema)
    return DataFrameSource(conf, layer, phase, df, pixel_order=HWC)
