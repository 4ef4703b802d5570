"""LMDB reading and writing over the `lmdb` package: wrapping sequential cursors, key-range
cursors for shards, record counts, and a writer that commits like Caffe's tools.

Reading opens read-only without a lock file (readonly=True, lock=False), so LMDBs on read-only
media and LMDBs written by real Caffe (a directory with data.mdb / lock.mdb) open as they are.
"""

import itertools
import os
import threading

import lmdb

from engine.data.sources import DataSourceError, RecordSource

_INITIAL_MAP_SIZE = 1 << 26  # the writer doubles it whenever the map fills


# py-lmdb refuses to open one environment twice in a process: read-only environments are
# shared (reference counted) between every source reading the same LMDB.
_shared = {}
_shared_lock = threading.Lock()


def acquire_env(path):
    """The process-wide read-only Environment of an LMDB; pair with release_env(path)."""
    real = os.path.realpath(os.fspath(path))
    with _shared_lock:
        entry = _shared.get(real)
        if entry is None:
            entry = _shared[real] = [open_env(path), 0]
        entry[1] += 1
        return entry[0]


def release_env(path):
    real = os.path.realpath(os.fspath(path))
    with _shared_lock:
        entry = _shared.get(real)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _shared[real]
            entry[0].close()


def open_env(path, readonly=True):
    """An lmdb.Environment for an existing LMDB (directory or single file), read-only.

    Prefer acquire_env/release_env, which share one Environment per LMDB in the process.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataSourceError(f"{path}: LMDB not found (no such file or directory)")
    subdir = os.path.isdir(path)
    if subdir and not os.path.exists(os.path.join(path, "data.mdb")):
        raise DataSourceError(f"{path}: not an LMDB (directory has no data.mdb)")
    try:
        return lmdb.open(
            path,
            readonly=readonly,
            lock=not readonly,
            subdir=subdir,
            max_readers=512,
            max_dbs=0,
        )
    except lmdb.Error as e:
        raise DataSourceError(f"{path}: cannot open LMDB: {e}") from None


def is_lmdb(path):
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, "data.mdb")) or (
        os.path.isfile(path) and path.endswith(".mdb")
    )


def count_records(path):
    env = acquire_env(path)
    try:
        return env.stat()["entries"]
    finally:
        release_env(path)


class LMDBSource(RecordSource):
    """Records of an LMDB in key order, cycling forever; optionally only a key range.

    `start_key` + `count` restrict it to `count` records from the first key >= start_key
    (a shard: see shard_ranges); the shard wraps to its own start key.
    """

    def __init__(self, path, start_key=None, count=None):
        self.path = os.fspath(path)
        self.name = f"LMDB {self.path}"
        self._env = acquire_env(self.path)
        try:
            self._txn = self._env.begin(buffers=False)
            self._cursor = self._txn.cursor()
            total = self._env.stat()["entries"]
        except lmdb.Error as e:
            self._env = None
            release_env(self.path)
            raise DataSourceError(f"{self.name}: cannot read: {e}") from None
        if isinstance(start_key, str):
            start_key = start_key.encode("utf-8")
        self.start_key = start_key
        if start_key is None and count is None:
            self._count = total
        else:
            self._count = self._check_range(start_key, total if count is None else int(count))
        if self._count == 0:
            self.close()
            raise DataSourceError(f"{self.name}: no records")

    def _check_range(self, start_key, count):
        cur = self._txn.cursor()
        found = cur.set_range(start_key) if start_key is not None else cur.first()
        n = 0
        if found:
            for _ in cur.iternext(keys=True, values=False):
                n += 1
                if n == count:
                    break
        if n < count:
            raise DataSourceError(
                f"{self.name}: key range from {start_key!r} has {n} records, {count} asked"
            )
        return count

    def one_pass(self):
        try:
            if self.start_key is None:
                ok = self._cursor.first()
            else:
                ok = self._cursor.set_range(self.start_key)
        except lmdb.Error as e:
            raise DataSourceError(f"{self.name}: cannot read: {e}") from None
        if not ok:
            return iter(())
        it = self._cursor.iternext(keys=True, values=True)
        if self.start_key is None:
            return it
        return itertools.islice(it, self._count)

    def _next(self, n):
        # The cursor is iterated in C (islice over iternext); errors are mapped here.
        try:
            return super()._next(n)
        except lmdb.Error as e:
            raise DataSourceError(f"{self.name}: cannot read record: {e}") from None

    def __len__(self):
        return self._count

    def close(self):
        env, self._env = getattr(self, "_env", None), None
        if env is not None:
            try:
                self._txn.abort()
            except lmdb.Error:
                pass
            release_env(self.path)


def read_all(path):
    """Every (key, value) of an LMDB in key order (small databases: tests and tools)."""
    env = acquire_env(path)
    try:
        with env.begin(buffers=False) as txn:
            return list(txn.cursor())
    except lmdb.Error as e:
        raise DataSourceError(f"{path}: cannot read: {e}") from None
    finally:
        release_env(path)


def iter_records(path):
    """Iterate over (key, value) of an LMDB once, in key order, without loading it all."""
    env = acquire_env(path)
    try:
        with env.begin(buffers=False) as txn:
            try:
                yield from txn.cursor()
            except lmdb.Error as e:
                raise DataSourceError(f"{path}: cannot read record: {e}") from None
    finally:
        release_env(path)


def shard_ranges(path, num_shards):
    """Split an LMDB into num_shards key ranges [(start_key, count), ...] whose counts differ
    by at most one and together cover every record once (for LMDBSource(start_key, count))."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    env = acquire_env(path)
    try:
        with env.begin() as txn:
            keys = list(txn.cursor().iternext(keys=True, values=False))
    finally:
        release_env(path)
    total = len(keys)
    if total < num_shards:
        raise DataSourceError(f"{path}: {total} records cannot fill {num_shards} shards")
    base, extra = divmod(total, num_shards)
    ranges, pos = [], 0
    for r in range(num_shards):
        n = base + (1 if r < extra else 0)
        ranges.append((keys[pos], n))
        pos += n
    return ranges


class LMDBWriter:
    """Write (key, value) records into a new LMDB, committing every `commit_every` puts.

    Like Caffe's db::NEW the directory must not exist yet (overwrite=True replaces an LMDB).
    The map grows by doubling when full, so no size has to be guessed.
    """

    def __init__(self, path, commit_every=1000, overwrite=False, map_size=_INITIAL_MAP_SIZE):
        self.path = os.fspath(path)
        if os.path.exists(self.path):
            if not overwrite:
                raise DataSourceError(f"{self.path}: already exists (will not overwrite)")
            if not is_lmdb(self.path) and os.listdir(self.path):
                raise DataSourceError(f"{self.path}: exists and is not an LMDB")
            for name in ("data.mdb", "lock.mdb"):
                p = os.path.join(self.path, name)
                if os.path.exists(p):
                    os.unlink(p)
        try:
            os.makedirs(self.path, exist_ok=overwrite)
            self._env = lmdb.open(self.path, map_size=map_size, subdir=True, max_dbs=0)
        except (OSError, lmdb.Error) as e:
            raise DataSourceError(f"{self.path}: cannot create LMDB: {e}") from None
        self.commit_every = int(commit_every)
        self._pending = []
        self.count = 0

    def put(self, key, value):
        if isinstance(key, str):
            key = key.encode("utf-8")
        self._pending.append((key, bytes(value)))
        self.count += 1
        if len(self._pending) >= self.commit_every:
            self.commit()

    def commit(self):
        if not self._pending:
            return
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for k, v in self._pending:
                        txn.put(k, v)
                break
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
            except lmdb.Error as e:
                raise DataSourceError(f"{self.path}: write failed: {e}") from None
        self._pending = []

    def close(self):
        if self._env is not None:
            self.commit()
            self._env.sync()
            self._env.close()
            self._env = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        if exc_type is None:
            self.close()
        elif self._env is not None:
            self._env.close()
            self._env = None
