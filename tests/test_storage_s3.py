"""caffeonspark.storage on a remote filesystem (s3:// against a local S3 service): URIs that
carry filesystem options in their query, atomic writes, folders fetched to local disk,
errors that name the URI without its secret."""

import pytest
from s3server import SECRET, local_s3

from caffeonspark import storage
from engine.data import LMDBWriter
from engine.data.lmdb_io import read_all


@pytest.fixture(scope="module")
def s3():
    with local_s3() as server:
        yield server


def test_uri_helpers_keep_the_query_last(s3):
    uri = s3.uri("run/model/lenet.caffemodel")
    folder = storage.dirname(uri)
    assert folder == s3.uri("run/model")
    assert storage.basename(uri) == "lenet.caffemodel"
    assert storage.join(folder, "lenet_iter_5.solverstate") == s3.uri(
        "run/model/lenet_iter_5.solverstate"
    )
    assert storage.join(s3.uri("run/model/"), "x") == s3.uri("run/model/x")
    assert not storage.is_local(uri)


def test_write_read_list_and_replace(s3):
    uri = s3.uri("rw/model.bin")
    storage.write_bytes(uri, b"first")
    assert storage.read_bytes(uri) == b"first"
    storage.write_bytes(uri, b"second")  # replaced; no temp object left beside it
    assert storage.read_bytes(uri) == b"second"
    assert storage.list_names(s3.uri("rw")) == ["model.bin"]
    assert s3.names("rw") == ["model.bin"]
    assert storage.exists(uri) and storage.is_file(uri) and storage.is_dir(s3.uri("rw"))
    assert not storage.exists(s3.uri("rw/other.bin"))
    assert storage.list_names(s3.uri("nothing/here")) == []


def test_put_file_and_fetch_file(s3, tmp_path):
    local = tmp_path / "weights.caffemodel"
    local.write_bytes(bytes(range(256)) * 1000)
    uri = s3.uri("put/weights.caffemodel")
    storage.put_file(str(local), uri)
    got = storage.fetch(uri, str(tmp_path / "down"))
    assert got == str(tmp_path / "down" / "weights.caffemodel")
    assert (tmp_path / "down" / "weights.caffemodel").read_bytes() == local.read_bytes()


def test_fetch_folder_copies_an_lmdb(s3, tmp_path):
    db = tmp_path / "digits_lmdb"
    with LMDBWriter(str(db)) as w:
        for i in range(5):
            w.put(f"{i:08d}", bytes([i]) * 10)
    s3.upload_folder(db, "data/digits_lmdb")
    (tmp_path / "down").mkdir()
    local = storage.fetch(s3.uri("data/digits_lmdb"), str(tmp_path / "down"))
    assert [v for _, v in read_all(local)] == [bytes([i]) * 10 for i in range(5)]


def test_check_writable_dir_leaves_nothing(s3):
    storage.check_writable_dir(s3.uri("probe/dir"))
    assert storage.list_names(s3.uri("probe/dir")) == []


def test_errors_name_the_uri_but_not_its_secret(s3):
    uri = s3.uri("missing/model.caffemodel")
    with pytest.raises(storage.StorageError) as e:
        storage.read_bytes(uri, "model")
    message = str(e.value)
    assert "missing/model.caffemodel" in message and "cannot read model" in message
    assert SECRET not in message and ":***@" in message
    with pytest.raises(storage.StorageError) as e:
        storage.fetch(uri, "/tmp")
    assert "not found" in str(e.value) and SECRET not in str(e.value)


def test_shown_hides_only_a_password():
    assert storage.shown("s3://key:secret@bucket/m?x=1") == "s3://key:***@bucket/m?x=1"
    assert storage.shown("hdfs://user:pw@nn:8020/m") == "hdfs://user:***@nn:8020/m"
    for uri in ("hdfs://nn:8020/m/x", "s3://bucket/x", "s3://key@bucket/x", "/tmp/a:b@c"):
        assert storage.shown(uri) == uri
