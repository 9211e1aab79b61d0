"""Device slots: one request runs at a time on each device, a bounded number wait, the rest are turned away.

A :class:`Slot` counts the requests it has admitted (running or waiting). :meth:`Slot.reserve` refuses a request
with :class:`QueueFull` (the portal answers 503 with ``Retry-After``) when ``capacity`` are already admitted; an
admitted request then fetches its image and waits for the device in arrival order. A client that disconnects while
waiting gives its place up (:class:`ClientGone`); a request already running on the device runs to its end (a
network pass cannot be interrupted), and its answer is dropped.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")

#: How often a waiting request checks whether its client is still there, seconds.
DISCONNECT_POLL_S = 0.25


class QueueFull(Exception):
    """The slot has admitted as many requests as it may; ``retry_after_s``: a fair estimate of when to retry."""

    def __init__(self, slot: str, retry_after_s: int) -> None:
        super().__init__(f"device slot '{slot}' is busy (queue full); retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ClientGone(Exception):
    """The client disconnected before its request reached the device."""


class Slot:
    """One device (``cpu``, ``cuda:0``): a single worker thread and a bounded queue in front of it."""

    def __init__(self, name: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"slot capacity must be at least 1, got {capacity}")
        self.name = name
        self.capacity = capacity
        self.admitted = 0
        self.running = 0
        self._lock: asyncio.Lock | None = None
        # One thread: the model's networks stay on it, and requests run strictly one after another.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"portal-{name}")
        self._recent_s: deque[float] = deque(maxlen=20)

    def retry_after_s(self) -> int:
        """Seconds until a place is likely free: the recent mean run time times the requests ahead."""
        mean = sum(self._recent_s) / len(self._recent_s) if self._recent_s else 5.0
        return max(1, min(600, math.ceil(mean * max(1, self.admitted))))

    def reserve(self) -> "Ticket":
        """A place in the queue, or :class:`QueueFull`. Use the ticket as a context manager to give it back."""
        if self.admitted >= self.capacity:
            raise QueueFull(self.name, self.retry_after_s())
        self.admitted += 1
        return Ticket(self)

    def run_blocking(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the slot's thread now (start-up work such as loading and warming the model)."""
        return self._executor.submit(fn).result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class Ticket:
    """An admitted request's place in its slot's queue."""

    def __init__(self, slot: Slot) -> None:
        self.slot = slot
        self.released = False
        self.wait_s = 0.0

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.slot.admitted -= 1

    async def run(self, fn: Callable[[], T], disconnected: Callable[[], Awaitable[bool]]) -> T:
        """Wait for the device in arrival order (giving up when the client leaves), then run ``fn`` on it."""
        slot = self.slot
        if slot._lock is None:
            slot._lock = asyncio.Lock()  # made inside the server's event loop
        t = time.perf_counter()
        acquire = asyncio.ensure_future(slot._lock.acquire())
        while True:
            done, _ = await asyncio.wait({acquire}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if await disconnected():
                acquire.cancel()
                try:
                    await acquire
                except asyncio.CancelledError:
                    pass
                else:  # acquired just as it was cancelled
                    slot._lock.release()
                raise ClientGone()
        self.wait_s = time.perf_counter() - t
        try:
            slot.running += 1
            t = time.perf_counter()
            try:
                return await asyncio.get_running_loop().run_in_executor(slot._executor, fn)
            finally:
                slot._recent_s.append(time.perf_counter() - t)
                slot.running -= 1
        finally:
            slot._lock.release()
