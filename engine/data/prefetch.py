"""Background batch preparation: a daemon thread fills a bounded queue of `depth` batches
(Caffe's BasePrefetchingDataLayer), so the net rarely waits for decode and transform.

The thread stops on close() (or when the owner is garbage-collected); an exception in it is
re-raised in the consumer's thread by get(), with the original message (source and key).
"""

import queue
import threading
import weakref


class PrefetchError(RuntimeError):
    """The background producer failed; the message carries the original error."""


_STOP = object()


class _Failure:
    def __init__(self, exc):
        self.exc = exc


class Prefetcher:
    """Runs `produce(recycled_batch_or_None) -> batch` in a daemon thread, `depth` ahead.

    get() returns the next batch (blocking); hand it back with recycle(batch) once copied
    out, so produce() can reuse its buffers. `produce` must not touch the consumer's objects.
    """

    def __init__(self, produce, depth=4, name="data"):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.name = name
        self._produce = produce
        self._free = queue.SimpleQueue()
        self._full = queue.SimpleQueue()
        for _ in range(depth):
            self._free.put(None)
        self._closed = False
        self._failed = None
        self._thread = threading.Thread(
            target=_run,
            args=(produce, self._free, self._full),
            name=f"prefetch {name}",
            daemon=True,
        )
        self._thread.start()

    def get(self):
        if self._failed is not None:
            raise PrefetchError(f"{self.name}: prefetch failed earlier: {self._failed}")
        if self._closed:
            raise PrefetchError(f"{self.name}: prefetcher is closed")
        item = self._full.get()
        if isinstance(item, _Failure):
            self._failed = item.exc
            raise PrefetchError(f"{self.name}: {item.exc}") from item.exc
        return item

    def recycle(self, batch):
        if not self._closed:
            self._free.put(batch)

    def close(self, timeout=30.0):
        """Stop the thread (it finishes the batch in hand first); True once it has exited."""
        if not self._closed:
            self._closed = True
            self._free.put(_STOP)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self):
        return self._thread.is_alive()

    def attach(self, owner, cleanup=None):
        """Close this prefetcher (then run cleanup) when `owner` is garbage-collected."""

        def finalize(p=self, c=cleanup):
            if p.close() and c is not None:
                c()

        return weakref.finalize(owner, finalize)


def _run(produce, free, full):
    # A module-level function: the thread holds no reference to the Prefetcher or its owner.
    while True:
        slot = free.get()
        if slot is _STOP:
            return
        try:
            batch = produce(slot)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
            full.put(_Failure(e))
            return
        full.put(batch)
