"""Changed-block tracking between backups: a mark per block for every write through the front,
whether a snapshot exists or not, so that an incremental reads only what changed since its
parent. Separate from the COW bitmap, which only records writes while a snapshot is active.

    tracker.json     series (UUID), sequence, base, block size, state in-use | clean, and on a
                     clean stop the device's write fingerprint
    tracker.current  a byte per block (1: written) since the last roll (mmap): the write path
                     stores a 1, with no lock and no read-modify-write of a byte other
                     writes share (a bit per block needs both)
    tracker.pending  the same for the rolled-out interval, until its backup commits or gives up

A roll (taking a backup's snapshot, in the freeze window) moves the current bits into pending,
merged with any pending bits of a backup that never finished, and numbers the new snapshot:
pending then holds every write since the snapshot of sequence `base`, the last one whose
backup committed. A backup may use the bits only when its parent is that image (the same
series, the parent's sequence == base); then it commits (base = its sequence) or gives up
(pending merged back into current).

Trust: while the daemon runs the tracker is "in-use" on disk; only a clean stop (bits flushed,
then the state written) marks it "clean" with the device's write fingerprint. A worker replaced
on purpose (a live upgrade) marks it "handed-over" with its supervisor's token, with no write in
flight: the supervisor holds the source exclusively meanwhile, so the next worker of that same
supervisor (same boot, same process) may go on with the series; anyone else may not. Opening anything
else (a killed daemon, a crash, a fingerprint that moved: the device was written while
detached, or the machine rebooted and the counters are gone) starts a new series: nothing
recorded before can be trusted, and the next incremental finds its changes by digests.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np

from ...ends.atomic import write_atomically
from ...format import chain_block_size
from ...units import now_iso
from .state import StateDir

TRACKER_FILE = "tracker.json"
CURRENT_FILE = "tracker.current"
PENDING_FILE = "tracker.pending"
TRACKER_FORMAT = 2      # 1 kept a bit per block
# IMAGER_CHANGE_TRACKING=off in the daemon's environment: no bit is set on the write path, and
# every roll starts a new series, so an incremental always compares digests. For measuring what
# tracking costs (bench/front.py), or for a volume that is never backed up incrementally.
TRACKING_ENV = "IMAGER_CHANGE_TRACKING"
TRACKING_OFF = f"change tracking is off ({TRACKING_ENV}=off)"

log = logging.getLogger(__name__)


def tracking_off() -> bool:
    return os.environ.get(TRACKING_ENV, "").lower() == "off"


@dataclass
class TrackerState:
    format: int
    series: str
    block_size: int
    volume_size: int
    sequence: int = 0                 # the last roll's number
    base: int | None = None           # the last roll whose backup committed
    pending: int | None = None        # the roll whose bits are in tracker.pending
    state: str = "in-use"             # in-use | clean | handed-over
    since: str = ""                   # when this series started
    fingerprint: dict = field(default_factory=dict)
    handover: str = ""                # handed-over: to the next worker of this supervisor (its token)
    restarted: str = ""               # why this series began, until its first roll says so


@dataclass
class Roll:
    """What a snapshot's roll tells its backup."""

    series: str
    sequence: int
    base: int | None                  # pending holds every write since this roll's snapshot
    block_size: int
    restarted: str = ""               # why a new series began since the last roll, if one did

    def to_dict(self) -> dict:
        return asdict(self)


class ChangeTracker:
    def __init__(self, state_dir: StateDir, volume_size: int, fingerprint: dict | None, handover: str = ""):
        """Open (or start) the tracker in `state_dir`; `fingerprint` is the device's write
        fingerprint now, before anything writes to it (None: cannot be known, never trusted);
        `handover`: the token of the supervisor this worker serves under ("" when none)."""
        self._dir = state_dir
        self.volume_size = volume_size
        self._lock = threading.Lock()
        self.restarted = ""
        self.off = tracking_off()
        stored = self._load()
        block_size = chain_block_size(volume_size)
        reason = TRACKING_OFF if self.off else self._distrust(stored, block_size, fingerprint, handover)
        if reason:
            stored = TrackerState(TRACKER_FORMAT, uuid.uuid4().hex, block_size, volume_size, since=now_iso(),
                                  restarted=reason)
        assert stored is not None
        self.restarted = stored.restarted
        self.fresh = bool(reason)           # this open began a new series
        self.state = stored
        self.block_size = stored.block_size
        self.block_count = -(-volume_size // self.block_size)
        self._current_map = state_dir.mapped(CURRENT_FILE, self.block_count)
        self._pending_map = state_dir.mapped(PENDING_FILE, self.block_count)
        self._current = np.frombuffer(self._current_map, dtype=np.uint8)
        self._pending = np.frombuffer(self._pending_map, dtype=np.uint8)
        self._current_bytes = memoryview(self._current_map)
        # A killed worker's writes may still be in the page cache, which outlives it: its marks
        # count as marks until the next worker has written the source back and checked what was
        # written (watch.py), then forget_inherited() drops them.
        self._inherited: np.ndarray | None = None
        if reason:
            self._inherited = (self._current | self._pending) != 0
            self._current[:] = 0
            self._pending[:] = 0
        self.state.state = "in-use"
        self.state.fingerprint = {}
        self.state.handover = ""
        self._persist()

    def _load(self) -> TrackerState | None:
        try:
            with open(self._dir.file(TRACKER_FILE)) as f:
                return TrackerState(**json.load(f))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            return None

    def _distrust(self, stored: TrackerState | None, block_size: int, fingerprint: dict | None,
                  handover: str) -> str:
        """Why the stored bits cannot be trusted ("" when they can)."""
        if stored is None:
            return "no changes were tracked on this volume before"
        if stored.format != TRACKER_FORMAT or stored.block_size != block_size or stored.volume_size != self.volume_size:
            return "the volume's size or the tracker's layout changed"
        if stored.state == "handed-over":
            if handover and stored.handover == handover:
                return ""
            return ("the volume's worker was replaced, but the machine or the volume's supervisor changed "
                    "before the next one started")
        if stored.state != "clean":
            return "the volume's daemon did not stop cleanly (killed, crashed or the machine went down)"
        if fingerprint is None or stored.fingerprint != fingerprint:
            return ("the source device may have been written while it was detached (its write counters "
                    "moved, or the machine restarted)")
        return ""

    def _persist(self) -> None:
        write_atomically(self._dir.file(TRACKER_FILE), json.dumps(asdict(self.state)).encode())

    # -- the write path: under the store's block locks, before the data is written --------------

    def mark(self, offset: int, length: int) -> None:
        if self.off:
            return
        first = offset // self.block_size
        last = (offset + length - 1) // self.block_size
        # One store of ones (a single bytecode under the GIL): a roll, which zeroes the bytes,
        # runs only while the store holds every block lock, so no write is in flight then.
        if first == last:
            self._current_bytes[first] = 1
        else:
            self._current_bytes[first:last + 1] = b"\x01" * (last - first + 1)

    # -- snapshots and backups ---------------------------------------------------------------------

    def roll(self) -> Roll:
        """Start the next interval (while no write is in flight: the store holds every lock)."""
        with self._lock:
            self._pending |= self._current
            self._current[:] = 0
            if self.off:
                # Bits that were never set must never be trusted: no parent shares this series.
                self.state.series = uuid.uuid4().hex
                self.restarted = TRACKING_OFF
            self.state.sequence += 1
            self.state.pending = self.state.sequence
            roll = Roll(self.state.series, self.state.sequence, self.state.base, self.block_size, self.restarted)
            self.restarted = self.state.restarted = ""
            return roll

    def distrust(self, reason: str) -> None:
        """What was tracked so far may miss writes (the source was written past the front): a new
        series begins, and the next roll says why. The bits stay (the daemon's own writes that
        are still on their way to the disk stay marked); a pending roll can no longer commit, as
        the next backup could not continue from its image."""
        with self._lock:
            if self.state.pending is not None:
                self._merge_pending_back()
                self.state.pending = None
            self.state.series = uuid.uuid4().hex
            self.state.since = now_iso()
            self.state.base = None
            self.restarted = self.state.restarted = reason
            self._persist()

    def first_unmarked(self, starts: np.ndarray, ends: np.ndarray) -> int:
        """The index of the first of the byte ranges [starts[i], ends[i]) with a block not marked
        since the last commit; -1 when every block of every range is."""
        if len(starts) == 0:
            return -1
        first, last = starts // self.block_size, (ends - 1) // self.block_size
        with self._lock:
            unmarked = (self._current | self._pending) == 0
            if self._inherited is not None:
                unmarked &= ~self._inherited
            if np.array_equal(first, last):
                bad = unmarked[first]
            else:
                before = np.concatenate(([0], np.cumsum(unmarked, dtype=np.int64)))
                bad = before[last + 1] > before[first]
        hits = np.flatnonzero(bad)
        return int(hits[0]) if len(hits) else -1

    def forget_inherited(self) -> None:
        with self._lock:
            self._inherited = None

    def changes(self, sequence: int) -> bytes | None:
        """The bits of roll `sequence` (every block written since its base's snapshot), while it
        is pending; None once committed or given up."""
        with self._lock:
            if self.state.pending != sequence:
                return None
            return np.packbits(self._pending.astype(bool), bitorder="little").tobytes()

    def commit(self, sequence: int) -> bool:
        """The backup of roll `sequence` is safely stored: it is the base of the next one."""
        with self._lock:
            if self.state.pending != sequence:
                return False
            self._pending[:] = 0
            self.state.base = sequence
            self.state.pending = None
            return True

    def give_up(self, sequence: int) -> None:
        """The backup of roll `sequence` did not finish: its bits go back to be found next time."""
        with self._lock:
            if self.state.pending != sequence:
                return
            self._merge_pending_back()
            self.state.pending = None

    def _merge_pending_back(self) -> None:
        # Writes may be in flight: only ones are stored into current (a read-modify-write of it
        # could put back a zero over a mark made meanwhile).
        np.putmask(self._current, self._pending != 0, 1)
        self._pending[:] = 0

    def describe(self) -> dict:
        with self._lock:
            current = int(np.count_nonzero(self._current))
            return {"series": self.state.series, "sequence": self.state.sequence, "base": self.state.base,
                    "block_size": self.block_size, "changed_blocks": current, "since": self.state.since}

    def hand_over(self, token: str) -> None:
        """A live upgrade: the next worker under supervisor `token` goes on with this series.
        Called with no write in flight and none to come from this process."""
        with self._lock:
            self._current_map.flush()
            self._pending_map.flush()
            self.state.state = "handed-over"
            self.state.handover = token
            self._persist()

    def close(self, fingerprint: dict | None) -> None:
        """A clean stop: the bits made durable first, then the state marked clean with the
        device's write fingerprint (taken after the device was flushed and closed). Pending bits
        of an unfinished backup are merged back (no backup can commit them any more)."""
        with self._lock:
            if self.state.pending is not None:
                self._merge_pending_back()
                self.state.pending = None
            self._current_map.flush()
            self._pending_map.flush()
            if fingerprint is not None and not self.off:
                self.state.state = "clean"
                self.state.fingerprint = fingerprint
                try:
                    self._persist()
                except OSError as e:
                    # The state stays "in-use" on disk: the next incremental compares digests.
                    # A full state filesystem must not stop a volume from detaching.
                    log.warning("the change tracker could not be saved (%s): the next incremental of this "
                                "volume will compare digests", e.strerror)
            del self._current, self._pending, self._current_bytes
            self._current_map.close()
            self._pending_map.close()
