"""The background thread that executes exchanges one at a time, in submission order.

Why a thread: a pure-Python ring only makes progress while Python code drives it. Running it
on its own thread (as Horovod's background thread does) lets an all-reduce proceed while the
main thread is still inside backward; MPI waits, numpy reductions and torch kernels all
release the GIL. Submission order is execution order, so every rank issues its collectives
in the same order as long as every rank submits in the same order.

Needs MPI_THREAD_MULTIPLE or MPI_THREAD_SERIALIZED with only this thread touching the
communicator that the submitted functions use (each scheme duplicates its own).
"""
from __future__ import annotations

import queue
import threading
import time


class Handle:
    """A submitted operation. `wait()` blocks until it finished and re-raises its error.

    t_submit / t_begin / t_end are time.perf_counter() readings: queued at t_submit, started
    executing at t_begin, finished at t_end. `t_end - t_begin` is the time the operation itself
    took; `t_begin - t_submit` is time spent queued behind earlier operations.

    Completion is signalled by releasing a lock that was taken at creation (a bare lock costs
    far less to create than a threading.Event, and a handle is made per all-reduce call).
    """

    __slots__ = ("_lock", "_finished", "result", "error", "t_submit", "t_begin", "t_end", "info")

    def __init__(self):
        self._lock = threading.Lock()
        self._lock.acquire()
        self._finished = False
        self.result = None
        self.error: BaseException | None = None
        self.t_submit = time.perf_counter()
        self.t_begin = self.t_end = float("nan")
        self.info: dict = {}

    def done(self) -> bool:
        return self._finished

    def _finish(self) -> None:
        self._finished = True
        self._lock.release()

    def wait(self):
        if not self._finished:
            # A timed acquire in a loop keeps Ctrl-C deliverable to the main thread.
            while not self._lock.acquire(timeout=0.5):
                pass
            self._lock.release()  # later waits return at once
        if self.error is not None:
            raise self.error
        return self.result


class Engine:
    """One background thread, one FIFO queue. Created lazily, stopped by close()."""

    def __init__(self, name: str = "ringtrain-comm"):
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def idle(self) -> bool:
        """True when nothing submitted is pending. Only the submitting thread should ask: it
        alone adds work, so a True cannot go stale before it acts on it (reading the count
        needs no lock; the worker lowers it only after an operation has finished)."""
        return self._pending == 0

    def submit(self, fn, *args) -> Handle:
        h = Handle()
        with self._lock:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._queue.put((h, fn, args))
        return h

    def _execute(self, h: Handle, fn, args) -> None:
        h.t_begin = time.perf_counter()
        try:
            h.result = fn(h, *args)
        except BaseException as e:  # handed to whoever waits on the handle
            h.error = e
        h.t_end = time.perf_counter()
        h._finish()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            h, fn, args = item
            self._execute(h, fn, args)
            with self._lock:
                self._pending -= 1

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
