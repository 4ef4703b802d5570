"""CaffeOnSpark's sequence-file keys: Java's serialization format, read without a JVM.

The byte strings are what Java 17's ObjectOutputStream wrote (through pyspark's py4j
gateway, Scala 2.13) for the objects named beside them."""

import pytest

from caffeonspark.sources import SourceError
from caffeonspark.sources.sequence import (
    JavaObject,
    JavaSerializationError,
    SequenceRows,
    decode_key,
    encode_key,
    read_java_object,
)

# scala.Tuple2("img-0", "3")
TUPLE2 = bytes.fromhex(
    "aced00057372000c7363616c612e5475706c653201fbddcd22e7347a0200024c00025f317400124c6a6176"
    "612f6c616e672f4f626a6563743b4c00025f3271007e00017870740005696d672d3074000133"
)
# scala.Tuple6("img-1", "7", 3, 32, 32, false): boxed Integer / Boolean fields, and the second
# 32 a back-reference to the first (Integer.valueOf caches it)
TUPLE6 = bytes.fromhex(
    "aced00057372000c7363616c612e5475706c653689e6cd0b84e7f0300200064c00025f317400124c6a6176"
    "612f6c616e672f4f626a6563743b4c00025f3271007e00014c00025f3371007e00014c00025f3471007e00"
    "014c00025f3571007e00014c00025f3671007e00017870740005696d672d3174000137737200116a617661"
    "2e6c616e672e496e746567657212e2a0a4f781873802000149000576616c7565787200106a6176612e6c61"
    "6e672e4e756d62657286ac951d0b94e08b0200007870000000037371007e00050000002071007e00087372"
    "00116a6176612e6c616e672e426f6f6c65616ecd207280d59cfaee0200015a000576616c7565787000"
)
# scala.Tuple2("é\0😀", "12"): modified UTF-8 (NUL as C0 80, the emoji as two surrogates)
TUPLE2_UNICODE = bytes.fromhex(
    "aced00057372000c7363616c612e5475706c653201fbddcd22e7347a0200024c00025f317400124c6a6176"
    "612f6c616e672f4f626a6563743b4c00025f3271007e0001787074000ac3a9c080eda0bdedb8807400023132"
)
# new java.util.HashMap(): a class with writeObject (its extras in block data)
HASHMAP = bytes.fromhex(
    "aced0005737200116a6176612e7574696c2e486173684d61700507dac1c31660d103000246000a6c6f6164"
    "466163746f724900097468726573686f6c6478703f400000000000007708000000100000000078"
)


def test_reads_scala_tuples_with_boxed_values_and_references():
    t2 = read_java_object(TUPLE2)
    assert isinstance(t2, JavaObject) and t2.class_name == "scala.Tuple2"
    assert t2.fields == {"_1": "img-0", "_2": "3"}
    t6 = read_java_object(TUPLE6)
    assert t6.class_name == "scala.Tuple6"
    assert t6.fields == {"_1": "img-1", "_2": "7", "_3": 3, "_4": 32, "_5": 32, "_6": False}


def test_reads_modified_utf8_strings_and_write_method_extras():
    assert read_java_object(TUPLE2_UNICODE).fields["_1"] == "é\x00😀"
    m = read_java_object(HASHMAP)
    assert m.class_name == "java.util.HashMap"
    assert m.fields == {"loadFactor": pytest.approx(0.75), "threshold": 0}
    assert read_java_object(bytes.fromhex("aced0005740003616263")) == "abc"


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x00\x01hello", "no AC ED 00 05 header"),
        (TUPLE2[:-3], "truncated"),
        (TUPLE2 + b"\x00", "bytes left after the object"),
        (TUPLE2[:4] + b"\x7b" + TUPLE2[5:], "unsupported type code 0x7b"),
    ],
)
def test_bad_streams_say_what_is_wrong(data, message):
    with pytest.raises(JavaSerializationError, match=message):
        read_java_object(data)


def test_keys_give_caffeonspark_headers():
    assert decode_key(TUPLE2, "r") == {
        "SampleID": "img-0",
        "label": "3",
        "channels": None,
        "height": None,
        "width": None,
        "encoded": True,  # a pair's value is an encoded image
    }
    assert decode_key(TUPLE6, "r") == {
        "SampleID": "img-1",
        "label": "7",
        "channels": 3,
        "height": 32,
        "width": 32,
        "encoded": False,
    }


def test_bad_keys_name_the_record():
    rows = SequenceRows("layer 'data' (TRAIN) (file:/seq)")
    assert list(rows(0, [(TUPLE2, b"\x89PNG")])) == [
        ("img-0", "3", None, None, None, True, b"\x89PNG")
    ]
    with pytest.raises(SourceError, match=r"file:/seq\): record 1 of partition 2: the key is null"):
        list(rows(2, [(TUPLE2, b""), (None, b"")]))
    with pytest.raises(SourceError, match="partition 0: the key is a java.util.HashMap, not"):
        list(rows(0, [(HASHMAP, b"")]))
    with pytest.raises(SourceError, match="not a Java-serialized .*no AC ED 00 05 header"):
        list(rows(0, [(b"img-0", b"")]))


def test_keys_are_written_as_the_jvm_writes_them():
    """encode_key gives ObjectOutputStream's bytes: the fixtures above came from the JVM
    (the Spark tests compare against it again, with integers past Integer's cache)."""
    assert encode_key("img-0", "3") == TUPLE2
    assert encode_key("img-1", 7, 3, 32, 32, False) == TUPLE6
    assert encode_key("é\x00😀", 12) == TUPLE2_UNICODE
    # 300 is not a cached Integer: two objects, the class written once; a long id.
    long_id = "x" * 70000
    key = encode_key(long_id, "1", 3, 300, 300, True)
    assert key.count(b"java.lang.Integer") == 1 and key.count(b"\x00\x00\x01\x2c") == 2
    assert decode_key(key, "r") == {
        "SampleID": long_id,
        "label": "1",
        "channels": 3,
        "height": 300,
        "width": 300,
        "encoded": True,
    }
    with pytest.raises(ValueError, match="does not fit a Java int"):
        encode_key("a", "1", 3, 2**31, 1, False)
