"""Micro-batching: requests that arrive together are encoded together, in one device call.

    batcher = MicroBatcher(encode_rows, max_batch=16, max_wait_ms=5, max_queue=256)
    future = batcher.submit(row)          # concurrent.futures.Future of that row's result
    row_result = await asyncio.wrap_future(future)

One worker thread takes the first waiting item, then waits at most ``max_wait_ms`` for more (up
to ``max_batch``) and calls ``fn(items)`` once; ``fn`` returns one result per item. A full queue
refuses new items at once (``Busy``) instead of growing; ``fn`` raising fails that batch's futures
only. ``calls`` and ``items`` count the batches and the items, for tests and the load benchmark.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["MicroBatcher", "Busy"]


class Busy(RuntimeError):
    """The queue is full: the caller should answer 503 and let the client retry."""


_STOP = object()


class MicroBatcher:
    def __init__(
        self,
        fn: Callable[[Sequence[Any]], Sequence[Any]],
        *,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        name: str = "batcher",
    ):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError(
                f"max_batch and max_queue must be >= 1, max_wait_ms >= 0; got {max_batch}, {max_queue}, {max_wait_ms}"
            )
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000.0
        self.calls = self.items = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._queue.put_nowait((item, future))
        except queue.Full:
            raise Busy(f"the {self._thread.name} queue is full ({self._queue.maxsize} waiting); retry") from None
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Stops the worker after the items already queued (blocks while the queue is full)."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _take(self) -> list | None:
        first = self._queue.get()
        if first is _STOP:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                self._queue.put(_STOP)  # stop after this batch
                break
            batch.append(nxt)
        return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            live = [(item, f) for item, f in batch if f.set_running_or_notify_cancel()]
            if not live:
                continue
            self.calls += 1
            self.items += len(live)
            try:
                results = self.fn([item for item, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"{self._thread.name}: {len(results)} results for {len(live)} items")
            except Exception as e:  # noqa: BLE001 - the batch's callers get the error, the worker goes on
                for _, f in live:
                    f.set_exception(e)
                continue
            for (_, f), r in zip(live, results):
                f.set_result(r)
