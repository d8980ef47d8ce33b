"""Writes to a managed volume's source that did not come through its front.

The change tracker marks what the front writes. Root can still write the source's node while it
is attached (`dd of=/dev/sdb`: the supervisor's O_EXCL claim stops mounts, not writes), and such
a write would be missing from the next tracked incremental. So the kernel reports every write
made to the source's disk (devices.tracefs), and each is checked against the tracker: a write
the daemon made covers only blocks it marked first, and stays marked until it is on the disk (a
roll writes everything back before it moves the marks). A write to any block not marked was
made by someone else: the series is not trusted any more, and a snapshot that exists is no
longer the volume as it was.

The trace belongs to the supervisor, which makes it before the first worker starts and removes
it when the volume is detached; workers read it in turn, so nothing written between two workers
goes unseen.
"""

from __future__ import annotations

import logging
import threading

from devices.tracefs import TraceUnavailable, WriteTrace

log = logging.getLogger(__name__)

# How often a worker reads the trace between rolls, so that its buffer never fills and a foreign
# write is reported (and a snapshot it spoils invalidated) soon after it is made.
POLL_INTERVAL = 0.5
TRACE_PREFIX = "imager-writes-"


def trace_name(volume: str) -> str:
    return TRACE_PREFIX + volume


class SourceWatch:
    def __init__(self, trace: WriteTrace):
        self.trace = trace
        self._lock = threading.Lock()

    @classmethod
    def open(cls, volume: str, device_path: str) -> "SourceWatch":
        """The supervisor's trace of `device_path`, read by this process from now on. Raises
        TraceUnavailable when it cannot be (then nothing tracked can be trusted past a roll)."""
        trace = WriteTrace(trace_name(volume), device_path)
        trace.open()
        return cls(trace)

    def discard(self) -> None:
        """Forget what was recorded so far: writes before a series began are not its business."""
        with self._lock:
            self.trace.writes()

    def foreign(self, covered) -> str:
        """Read what was written since the last call; what shows a write nobody marked ("" when
        none did). `covered(start, end)`: whether the tracker marked every block of those bytes.
        Writes still in the page cache are not seen yet: flush the source first for all of them."""
        with self._lock:
            problem = self.trace.problem()
            writes = self.trace.writes()
            if problem:
                return problem
            for write in writes:
                span = self.trace.on_device(write)
                if span is not None and not covered(*span):
                    return (f"{self.trace.device_path} was written outside the front while attached "
                            f"({span[1] - span[0]} bytes at {span[0]})")
            return ""

    def close(self) -> None:
        with self._lock:
            self.trace.close()


def start_trace(volume: str, device_path: str) -> tuple[WriteTrace | None, str]:
    """The supervisor's part: the trace of `device_path` made, recording from now on; or None and
    why not."""
    try:
        trace = WriteTrace(trace_name(volume), device_path)
        trace.create()
        return trace, ""
    except (TraceUnavailable, OSError) as e:
        return None, str(e.strerror if isinstance(e, TraceUnavailable) and e.strerror else e)
