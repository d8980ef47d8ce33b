"""A tape drive's speed matching, modelled for a virtual tape: a buffer in front of a tape that
moves no slower than the drive's slowest speed-matching rate. Fed faster, the buffer fills and
the host waits; fed slower, the buffer runs dry, the tape stops, rewinds a little and starts
again when data comes: a back-hitch (shoe-shining), which costs seconds on a real drive and wears
tape and heads. Counting them shows whether a way of writing keeps the drive streaming.

The tape starts moving once the buffer holds `start_bytes` (a quarter of it unless said), as a
drive waits for enough data to stream before it starts (or restarts after a stop). A filemark,
a rewind or a close lets the drive write out its buffer and stop on purpose: not a back-hitch.
The clock is injectable, so that tests decide the host's rate exactly."""

from __future__ import annotations

import time
from typing import Callable


class StreamingModel:
    def __init__(self, min_rate: float, buffer_bytes: int, clock: Callable[[], float] = time.monotonic,
                 start_bytes: int | None = None):
        if min_rate <= 0 or buffer_bytes <= 0:
            raise ValueError("a streaming model needs a positive rate and buffer")
        self.min_rate, self.buffer_bytes, self._clock = min_rate, buffer_bytes, clock
        self.start_bytes = buffer_bytes // 4 if start_bytes is None else start_bytes
        self.back_hitches = 0
        self.fill = 0.0
        self._moving = False
        self._last = 0.0

    def wrote(self, count: int) -> None:
        now = self._clock()
        if self._moving:
            self.fill -= (now - self._last) * self.min_rate
            if self.fill < 0:
                self.back_hitches += 1
                self.fill = 0.0
                self._moving = False
        self.fill = min(float(self.buffer_bytes), self.fill + count)
        if self.fill >= self.start_bytes:
            self._moving = True
        self._last = now

    def stopped(self) -> None:
        self._moving = False
        self.fill = 0.0
