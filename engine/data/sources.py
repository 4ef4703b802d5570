"""The record-source interface the Data layer reads from: (key, value bytes) pairs that cycle
forever, so LMDB files, key-range shards, Arrow files or in-memory lists plug in alike.

A source subclasses RecordSource and implements `one_pass()` (a fresh iterator over one
pass of its records, in order) and `__len__`; `take(n)` and `peek()` come from the base class:
`take` returns the next n records and wraps to the first record at the end of a pass (a
batch may straddle the wrap, like Caffe's cursor), `peek` returns the next record without
consuming it. `name` is used in every error message. Sources are used from one thread.
"""

import collections
import itertools


class DataSourceError(ValueError):
    """A data source that cannot be opened or read (the message names the source)."""


class RecordSource:
    """Base of all record sources: an endless, wrapping stream of (key, value) bytes pairs."""

    name = "<records>"

    def one_pass(self):
        raise NotImplementedError

    def __len__(self):
        raise NotImplementedError

    def _ensure_started(self):
        if not hasattr(self, "_pending"):
            self._pending = collections.deque()
            self._iter = None
            self._pass_empty = True
            self.epochs = 0
            self._position = 0

    @property
    def position(self):
        """Records taken or skipped since the stream began (not wrapped): where the next
        take() stands in the endless stream. Random transforms are keyed on it, so a stream
        that goes on at a position draws what the stream that got there drew."""
        self._ensure_started()
        return self._position

    def go_on_at(self, position):
        """Stand where a stream of this source stood after `position` records (a stage
        retry of a run): skip position modulo the length, and count `position`."""
        if position:
            self.skip(position % len(self))
        self._ensure_started()
        self._position = int(position)

    def take(self, n):
        """The next n records (a list of (key, value)), wrapping around at the end."""
        out = self._next(n)
        self._position += len(out)
        return out

    def _next(self, n):
        """take() without counting: peek() fills its look-ahead from here."""
        self._ensure_started()
        out = []
        while self._pending and len(out) < n:
            out.append(self._pending.popleft())
        while len(out) < n:
            if self._iter is None:
                self._iter = iter(self.one_pass())
                self._pass_empty = True
            got = list(itertools.islice(self._iter, n - len(out)))
            if got:
                self._pass_empty = False
                out.extend(got)
            if len(out) < n:
                if self._pass_empty:
                    raise DataSourceError(f"{self.name}: no records")
                self._iter = None
                self.epochs += 1
        return out

    def peek(self):
        """The record the next take() starts with, without consuming it."""
        self._ensure_started()
        if not self._pending:
            self._pending.extend(self._next(1))
        return self._pending[0]

    def skip(self, n):
        """Drop the next n records (e.g. Caffe's rand_skip)."""
        while n > 0:
            k = min(n, 4096)
            self.take(k)
            n -= k

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ListSource(RecordSource):
    """Records held in memory (a list of (key, value) pairs): tests, small sets, adapters."""

    def __init__(self, records, name="<list>"):
        self.records = list(records)
        self.name = name

    def one_pass(self):
        return iter(self.records)

    def __len__(self):
        return len(self.records)


class IterableSource(RecordSource):
    """Records from a callable that returns a fresh one-pass iterator each time it is called.

    The hook for other storage (e.g. a memory-mapped Arrow file of Datum bytes): pass
    `one_pass=lambda: ((key, value) for ...)` and the record count.
    """

    def __init__(self, one_pass, count, name="<iterable>", on_close=None):
        self._factory = one_pass
        self._count = int(count)
        self.name = name
        self._on_close = on_close

    def one_pass(self):
        return self._factory()

    def __len__(self):
        return self._count

    def close(self):
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
