"""The change tracker on its own: which bits a backup gets, when they are trusted, and that no
roll, failure or restart can make a written block disappear from the next incremental."""

from __future__ import annotations

import json
import random
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imager.snapshot.cow.state import StateDir
from imager.snapshot.cow.tracker import TRACKER_FILE, ChangeTracker

MiB = 1 << 20
VOLUME = 64 * MiB                       # a 64 KiB tracking block: 1024 bits
FINGERPRINT = {"boot": "b1", "writes": 10}


@pytest.fixture
def state(tmp_path):
    device = tmp_path / "volume.img"
    device.write_bytes(b"")
    opened = []

    def open_tracker(fingerprint=FINGERPRINT, size=VOLUME):
        directory = StateDir(str(tmp_path / "state"), str(device))
        tracker = ChangeTracker(directory, size, fingerprint)
        opened.append(directory)
        return tracker, directory

    yield open_tracker
    for directory in opened:
        directory.close()


def bits_of(tracker: ChangeTracker, sequence: int) -> np.ndarray:
    raw = tracker.changes(sequence)
    assert raw is not None
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=tracker.block_count, bitorder="little").astype(bool)


def blocks_of(tracker: ChangeTracker, offset: int, length: int) -> set[int]:
    return set(range(offset // tracker.block_size, (offset + length - 1) // tracker.block_size + 1))


@settings(max_examples=200, deadline=None)
@given(writes=st.lists(st.tuples(st.integers(0, VOLUME - 1), st.integers(1, 3 * MiB)), max_size=20))
def test_a_roll_holds_exactly_the_blocks_written_since_the_last_one(tmp_path_factory, writes):
    directory_root = tmp_path_factory.mktemp("tracker")
    device = directory_root / "volume.img"
    device.write_bytes(b"")
    directory = StateDir(str(directory_root / "state"), str(device))
    try:
        tracker = ChangeTracker(directory, VOLUME, FINGERPRINT)
        expected: set[int] = set()
        for offset, length in writes:
            length = min(length, VOLUME - offset)
            tracker.mark(offset, length)
            expected |= blocks_of(tracker, offset, length)
        roll = tracker.roll()
        assert set(np.flatnonzero(bits_of(tracker, roll.sequence)).tolist()) == expected
        tracker.close(None)
    finally:
        directory.close()


def test_a_committed_backup_is_the_base_and_its_bits_are_gone(state):
    tracker, _ = state()
    tracker.mark(0, 1)
    first = tracker.roll()
    assert first.base is None and first.restarted
    assert tracker.commit(first.sequence)
    tracker.mark(5 * tracker.block_size, 1)
    second = tracker.roll()
    assert second.base == first.sequence and not second.restarted
    assert np.flatnonzero(bits_of(tracker, second.sequence)).tolist() == [5]


def test_a_backup_that_gives_up_leaves_its_bits_for_the_next(state):
    tracker, _ = state()
    tracker.roll()
    tracker.commit(1)
    tracker.mark(3 * tracker.block_size, 1)
    failed = tracker.roll()
    tracker.give_up(failed.sequence)
    assert tracker.changes(failed.sequence) is None
    tracker.mark(7 * tracker.block_size, 1)
    retry = tracker.roll()
    # The retry still starts from the last committed backup and sees both writes.
    assert retry.base == 1
    assert np.flatnonzero(bits_of(tracker, retry.sequence)).tolist() == [3, 7]


def test_a_roll_without_a_finished_backup_keeps_the_earlier_bits(state):
    """A backup process killed before it could give up: the next roll merges, never drops."""
    tracker, _ = state()
    tracker.roll()
    tracker.commit(1)
    tracker.mark(2 * tracker.block_size, 1)
    tracker.roll()
    tracker.mark(9 * tracker.block_size, 1)
    later = tracker.roll()
    assert later.base == 1
    assert np.flatnonzero(bits_of(tracker, later.sequence)).tolist() == [2, 9]
    assert not tracker.commit(later.sequence - 1)


def test_a_clean_stop_with_the_same_fingerprint_keeps_the_series(state):
    tracker, directory = state()
    tracker.roll()
    tracker.commit(1)
    tracker.mark(4 * tracker.block_size, 10)
    series = tracker.state.series
    tracker.close(FINGERPRINT)
    directory.close()
    again, _ = state()
    assert again.restarted == "" and again.state.series == series
    roll = again.roll()
    assert roll.base == 1 and np.flatnonzero(bits_of(again, roll.sequence)).tolist() == [4]


@pytest.mark.parametrize("how", ["killed", "written while detached", "fingerprint unknown", "resized"])
def test_an_untrusted_tracker_starts_a_new_series_with_nothing_assumed(state, how):
    tracker, directory = state()
    tracker.roll()
    tracker.commit(1)
    series = tracker.state.series
    if how == "killed":
        # The daemon never reached close: the state on disk still says in use.
        tracker._current_map.flush()
        assert json.load(open(directory.file(TRACKER_FILE)))["state"] == "in-use"
    else:
        tracker.close(FINGERPRINT)
    directory.close()
    fingerprint = {"written while detached": {"boot": "b1", "writes": 11},
                   "fingerprint unknown": None}.get(how, FINGERPRINT)
    again, _ = state(fingerprint=fingerprint, size=VOLUME + (MiB if how == "resized" else 0))
    assert again.restarted and again.state.series != series
    roll = again.roll()
    # A new series has no base: no incremental may use these bits, it must compare digests.
    assert roll.base is None and roll.restarted


def test_a_stop_with_a_backup_pending_merges_its_bits_back(state):
    tracker, directory = state()
    tracker.roll()
    tracker.commit(1)
    tracker.mark(6 * tracker.block_size, 1)
    tracker.roll()
    tracker.close(FINGERPRINT)
    directory.close()
    again, _ = state()
    roll = again.roll()
    assert roll.base == 1 and np.flatnonzero(bits_of(again, roll.sequence)).tolist() == [6]


def test_writes_while_a_backup_gives_up_are_never_lost(state):
    """The write path stores without a lock; a give-up merging bits back at the same moment must
    not put a zero over a block marked meanwhile."""
    tracker, _ = state()
    rng = random.Random(7)
    marked: set[int] = set()
    for _ in range(30):
        for block in rng.sample(range(tracker.block_count), 50):
            tracker.mark(block * tracker.block_size, 1)
        failed = tracker.roll()             # writes stopped for the roll, as the store does it
        stop = threading.Event()

        def writer():
            while not stop.is_set():
                block = rng.randrange(tracker.block_count)
                tracker.mark(block * tracker.block_size, 1)
                marked.add(block)

        thread = threading.Thread(target=writer)
        thread.start()
        tracker.give_up(failed.sequence)
        stop.set()
        thread.join()
        retry = tracker.roll()
        assert marked <= set(np.flatnonzero(bits_of(tracker, retry.sequence)).tolist())
        tracker.give_up(retry.sequence)
