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


# What the JVM writes for the classes in CaffeOnSpark's keys: (class name, serialVersionUID,
# fields as (type code, name, class signature or None), superclass). The tuples' UIDs are
# Scala 2.13's, the Scala that pyspark's JVM runs (our reader ignores UIDs; a JVM reader
# checks them only when it rebuilds the object).
_OBJECT = "Ljava/lang/Object;"
_NUMBER = ("java.lang.Number", 0x86AC951D0B94E08B, (), None)
_CLASSES = {
    "Integer": ("java.lang.Integer", 0x12E2A0A4F7818738, (("I", "value", None),), _NUMBER),
    "Boolean": ("java.lang.Boolean", 0xCD207280D59CFAEE, (("Z", "value", None),), None),
    2: ("scala.Tuple2", 0x01FBDDCD22E7347A, (("L", "_1", _OBJECT), ("L", "_2", _OBJECT)), None),
    6: (
        "scala.Tuple6",
        0x89E6CD0B84E7F030,
        tuple(("L", f"_{i}", _OBJECT) for i in range(1, 7)),
        None,
    ),
}


def _modified_utf8(text):
    """Java's modified UTF-8 (DataOutput.writeUTF's bytes): UTF-16 code units, NUL as C0 80."""
    units = text.encode("utf-16-be", "surrogatepass")
    out = bytearray()
    for i in range(0, len(units), 2):
        u = (units[i] << 8) | units[i + 1]
        if 0 < u < 0x80:
            out.append(u)
        elif u < 0x800:
            out += bytes((0xC0 | u >> 6, 0x80 | u & 0x3F))
        else:
            out += bytes((0xE0 | u >> 12, 0x80 | u >> 6 & 0x3F, 0x80 | u & 0x3F))
    return bytes(out)


class _Writer:
    """ObjectOutputStream's bytes for strings, boxed Integer / Boolean and scala tuples of
    them, with the JVM's back-references: a class or field signature written once, and
    Integer.valueOf's cached -128..127 and the two Booleans shared, as boxing shares them."""

    def __init__(self):
        self.out = bytearray(struct.pack(">HH", _MAGIC, _VERSION))
        self.handles = {}  # key -> handle number

    def _assign(self, key):
        self.handles[key] = _BASE_HANDLE + len(self.handles)

    def _reference(self, key):
        if key not in self.handles:
            return False
        self.out += struct.pack(">Bi", TC_REFERENCE, self.handles[key])
        return True

    def string(self, text, shared=False):
        """A new String object (shared: one instance, such as a field signature)."""
        if shared and self._reference(("string", text)):
            return
        data = _modified_utf8(text)
        if len(data) <= 0xFFFF:
            self.out += struct.pack(">BH", TC_STRING, len(data)) + data
        else:
            self.out += struct.pack(">Bq", TC_LONGSTRING, len(data)) + data
        self._assign(("string", text) if shared else ("new", len(self.handles)))

    def class_desc(self, desc):
        if desc is None:
            self.out.append(TC_NULL)
            return
        name, uid, fields, superclass = desc
        if self._reference(("class", name)):
            return
        data = _modified_utf8(name)
        self.out += struct.pack(">BH", TC_CLASSDESC, len(data)) + data
        self.out += struct.pack(">QBH", uid, SC_SERIALIZABLE, len(fields))
        self._assign(("class", name))
        for code, field, signature in fields:
            data = _modified_utf8(field)
            self.out += struct.pack(">cH", code.encode(), len(data)) + data
            if signature is not None:
                self.string(signature, shared=True)
        self.out.append(TC_ENDBLOCKDATA)
        self.class_desc(superclass)

    def value(self, v):
        if isinstance(v, str):
            self.string(v)
        elif isinstance(v, bool):
            if not self._reference(("bool", v)):
                self.out.append(TC_OBJECT)
                self.class_desc(_CLASSES["Boolean"])
                self._assign(("bool", v))
                self.out.append(int(v))
        elif isinstance(v, int):
            if not -(2**31) <= v < 2**31:
                raise ValueError(f"{v} does not fit a Java int")
            cached = -128 <= v <= 127
            if not (cached and self._reference(("int", v))):
                self.out.append(TC_OBJECT)
                self.class_desc(_CLASSES["Integer"])
                self._assign(("int", v) if cached else ("new", len(self.handles)))
                self.out += struct.pack(">i", v)
        else:
            raise TypeError(f"cannot serialize a {type(v).__name__} into a CaffeOnSpark key")

    def tuple(self, values):
        self.out.append(TC_OBJECT)
        self.class_desc(_CLASSES[len(values)])
        self._assign(("new", len(self.handles)))
        for v in values:
            self.value(v)
        return bytes(self.out)


def encode_key(sample_id, label, channels=None, height=None, width=None, encoded=None):
    """A sequence file key as CaffeOnSpark's tools wrote it: scala.Tuple2(id, label)
    (Binary2Sequence: the value is an image file), or with a shape scala.Tuple6(id, label,
    channels, height, width, encoded) (LMDB2Sequence). id and label are strings."""
    values = [str(sample_id), str(label)]
    if channels is not None:
        values += [int(channels), int(height), int(width), bool(encoded)]
    return _Writer().tuple(values)


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
