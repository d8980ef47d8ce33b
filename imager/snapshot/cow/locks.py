"""Striped block locks: blocks that share a bitmap byte share a stripe, so a bit update never
races with its neighbours; stripes are taken in order, so two lockers never deadlock."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

LOCK_STRIPES = 1024


class StripedLocks:
    def __init__(self, stripes: int = LOCK_STRIPES):
        self._stripes = [threading.Lock() for _ in range(stripes)]

    @contextmanager
    def blocks(self, first: int, last: int) -> Iterator[None]:
        """Hold the stripes of blocks first..last."""
        first_byte, last_byte = first >> 3, last >> 3
        count = len(self._stripes)
        if last_byte - first_byte + 1 >= count:
            numbers: range | list[int] = range(count)
        else:
            numbers = sorted({b % count for b in range(first_byte, last_byte + 1)})
        held = [self._stripes[n] for n in numbers]
        for lock in held:
            lock.acquire()
        try:
            yield
        finally:
            for lock in reversed(held):
                lock.release()

    @contextmanager
    def everything(self) -> Iterator[None]:
        """Hold every stripe: waits for all I/O in flight, lets none start."""
        for lock in self._stripes:
            lock.acquire()
        try:
            yield
        finally:
            for lock in reversed(self._stripes):
                lock.release()
