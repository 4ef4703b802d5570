"""Where models, snapshots and data live: local paths, file://, hdfs:// and s3:// through
pyarrow's filesystem layer, with writes that go to a temp name and are renamed into place.

A reader never sees half a file: local writes fsync a temp file beside the target and rename
it; remote writes stream to a hidden temp name in the same folder and `move` it (a rename on
HDFS; a server-side copy on S3, where an object appears whole or not at all).

Filesystem options ride in the URI's query (s3://bucket/m?endpoint_override=host:9000) and
stay last when a path is derived from it; a secret in the URI's user part is shown as ***.
"""

import os
import posixpath
import re
import shutil
import tempfile
import uuid

from engine import io as engine_io


class StorageError(OSError):
    """A path that cannot be read or written (the message names the path)."""


_SECRET = re.compile(r"^([A-Za-z][\w+.-]*://[^/@?#:]*):[^/@?#]*@")


def shown(uri):
    """`uri` as it may appear in logs and errors: a password or secret key given in its user
    part (s3://KEY:SECRET@bucket/...) is replaced by ***."""
    return _SECRET.sub(r"\1:***@", os.fspath(uri))


# Hadoop writes URIs without an authority with one slash (file:/data/x, hdfs:/models/m):
# CaffeOnSpark's docs and Spark's logs use that form.
_NO_AUTHORITY = re.compile(r"^([A-Za-z][\w+.-]+):/(?!/)")


def canonical(uri):
    """`uri` with Hadoop's one-slash form (file:/x, hdfs:/x) written as scheme:///x."""
    return _NO_AUTHORITY.sub(r"\1:///", os.fspath(uri))


def has_scheme(uri):
    """Whether `uri` names a filesystem scheme other than a plain local path."""
    head, sep, _ = canonical(uri).partition("://")
    return bool(sep) and head.isidentifier() and len(head) > 1


def is_local(uri):
    uri = canonical(uri)
    return not has_scheme(uri) or uri.startswith("file://")


def local_path(uri):
    """The local filesystem path of a plain path or file:// URI (absolute)."""
    uri = canonical(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif has_scheme(uri):
        raise StorageError(f"{shown(uri)}: not a local path")
    return os.path.abspath(os.path.expanduser(uri))


def absolute(uri):
    """`uri` with a relative local path made absolute against the working directory."""
    uri = canonical(uri)
    if has_scheme(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def resolve(uri):
    """(pyarrow FileSystem, path inside it) for any supported URI."""
    uri = canonical(uri)
    try:
        from pyarrow import fs as pafs
    except ImportError as e:  # pragma: no cover - pyarrow is a dependency
        raise StorageError(f"{shown(uri)}: pyarrow is needed for remote paths: {e}") from None
    if is_local(uri):
        return pafs.LocalFileSystem(), local_path(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types (no libhdfs, bad URI)
        # pyarrow lists every place it looked for libjvm / libhdfs: keep its first line.
        lines = str(e).strip().splitlines() or [type(e).__name__]
        more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
        hint = ""
        if uri.split(":", 1)[0].lower() in ("hdfs", "viewfs"):
            hint = (
                "; pyarrow reaches HDFS through Hadoop's libhdfs in a JVM: set JAVA_HOME, "
                "HADOOP_HOME (or ARROW_LIBHDFS_DIR) and CLASSPATH=$(hadoop classpath --glob)"
            )
        raise StorageError(
            f"{shown(uri)}: cannot open its filesystem: {lines[0]}{more}{hint}"
        ) from None


def _split_query(uri):
    """(URI without its query, "?query" or ""): pyarrow takes filesystem options in the
    query (s3://bucket/path?endpoint_override=host:port&scheme=http), which must stay at
    the end when a path is derived from the URI."""
    base, sep, query = uri.partition("?")
    return base, sep + query


def dirname(uri):
    uri = canonical(uri)
    if is_local(uri):
        return os.path.dirname(local_path(uri))
    base, query = _split_query(uri)
    scheme, rest = base.split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}{query}"


def basename(uri):
    uri = canonical(uri)
    if not has_scheme(uri):
        return os.path.basename(uri.rstrip("/"))
    return posixpath.basename(_split_query(uri)[0].rstrip("/"))


def join(uri, name):
    uri = canonical(uri)
    if is_local(uri):
        return os.path.join(local_path(uri), name)
    base, query = _split_query(uri)
    return base.rstrip("/") + "/" + name + query


def _info(uri):
    from pyarrow import fs as pafs

    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path), fs, path, pafs.FileType
    except OSError as e:
        raise StorageError(f"{shown(uri)}: cannot stat: {e}") from None


def exists(uri):
    info, _, _, ftype = _info(uri)
    return info.type != ftype.NotFound


def is_dir(uri):
    info, _, _, ftype = _info(uri)
    return info.type == ftype.Directory


def is_file(uri):
    info, _, _, ftype = _info(uri)
    return info.type == ftype.File


def read_bytes(uri, what="file"):
    """The whole content of a file; StorageError naming the file if it is missing."""
    uri = os.fspath(uri)
    if is_local(uri):
        path = local_path(uri)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise StorageError(f"{shown(uri)}: cannot read {what}: {e.strerror}") from None
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (OSError, FileNotFoundError) as e:
        raise StorageError(f"{shown(uri)}: cannot read {what}: {e}") from None


def makedirs(uri):
    uri = os.fspath(uri)
    if is_local(uri):
        try:
            os.makedirs(local_path(uri), exist_ok=True)
        except OSError as e:
            raise StorageError(f"{shown(uri)}: cannot create directory: {e.strerror}") from None
        return
    fs, path = resolve(uri)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as e:
        raise StorageError(f"{shown(uri)}: cannot create directory: {e}") from None


def write_bytes(uri, data):
    """Write `data` to `uri` atomically (temp name in the same folder, then rename)."""
    uri = os.fspath(uri)
    makedirs(dirname(uri))
    if is_local(uri):
        try:
            engine_io.atomic_write_bytes(local_path(uri), data)
        except OSError as e:
            raise StorageError(f"{shown(uri)}: cannot write: {e.strerror or e}") from None
        return
    fs, path = resolve(uri)
    tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex}")
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except OSError as e:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise StorageError(f"{shown(uri)}: cannot write: {e}") from None


def put_file(local, uri):
    """Copy a local file to `uri` atomically."""
    with open(local, "rb") as f:
        write_bytes(uri, f.read())


def check_writable_dir(uri):
    """Create the folder `uri` if needed and prove a file can be written there."""
    makedirs(uri)
    probe = join(uri, f".caffeonspark-probe-{uuid.uuid4().hex}")
    write_bytes(probe, b"")
    fs, path = resolve(probe)
    try:
        fs.delete_file(path)
    except OSError as e:
        raise StorageError(f"{shown(uri)}: wrote a probe file but cannot delete it: {e}") from None


def list_names(uri):
    """Names of the entries directly inside the folder `uri` ([] if it does not exist)."""
    from pyarrow import fs as pafs

    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise StorageError(f"{shown(uri)}: cannot list: {e}") from None
    return sorted(posixpath.basename(i.path) for i in infos)


def fetch(uri, local_dir):
    """A local path holding the content of `uri` (a file or a folder, e.g. an LMDB).

    Local paths are returned as they are; remote ones are copied into `local_dir`.
    """
    uri = os.fspath(uri)
    if is_local(uri):
        return local_path(uri)
    from pyarrow import fs as pafs

    fs, path = resolve(uri)
    target = os.path.join(local_dir, basename(uri))
    os.makedirs(local_dir, exist_ok=True)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise StorageError(f"{shown(uri)}: cannot stat: {e}") from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{shown(uri)}: not found")
    try:
        if info.type == pafs.FileType.Directory:
            os.makedirs(target, exist_ok=True)
            pafs.copy_files(path, target, source_filesystem=fs, destination_filesystem=None)
        else:
            tmp = tempfile.NamedTemporaryFile(dir=local_dir, delete=False)
            with tmp, fs.open_input_stream(path) as src:
                shutil.copyfileobj(src, tmp, 1 << 22)
            os.replace(tmp.name, target)
    except OSError as e:
        raise StorageError(f"{shown(uri)}: cannot copy to {target}: {e}") from None
    return target
