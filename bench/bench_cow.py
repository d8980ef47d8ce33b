"""The in-process COW write path and snapshot reads, on a loop device over a file.

    python -m pytest -q bench/bench_cow.py

Each bench reports the throughput of one 16 MiB pass in MB/s (extra_info) besides the timing.
`first writes` pays for copying every original into the cache; `rewrites` hits blocks whose
bit is already set (the steady state of a busy volume); `no snapshot` is the floor.
"""

import os

import numpy as np
import pytest

from devices import loop
from devices.block import BlockDevice
from devices.buffers import AlignedBuffer
from imager.snapshot.cow import CowStore

VOLUME_SIZE = 64 << 20
PASS_BYTES = 16 << 20
WRITE_SIZE = 1 << 20

pytestmark = pytest.mark.skipif(not os.access("/dev/loop-control", os.W_OK),
                                reason="needs root and /dev/loop-control")


@pytest.fixture
def volume(tmp_path):
    backing = tmp_path / "volume.img"
    backing.write_bytes(np.random.default_rng(0).integers(0, 256, VOLUME_SIZE, dtype=np.uint8).tobytes())
    device = loop.attach(str(backing))
    try:
        with BlockDevice(device, writable=True) as dev:
            yield dev
    finally:
        loop.detach(device)


@pytest.fixture(params=[16 << 10, 64 << 10, 256 << 10], ids=lambda n: f"block{n >> 10}k")
def store(request, volume, tmp_path):
    with CowStore(volume, str(tmp_path / "state"), block_size=request.param) as s:
        yield s


def _payload() -> AlignedBuffer:
    buf = AlignedBuffer(WRITE_SIZE)
    buf.array[:] = np.random.default_rng(1).integers(0, 256, WRITE_SIZE, dtype=np.uint8)
    return buf


def _write_pass(store, payload, base):
    for offset in range(base, base + PASS_BYTES, WRITE_SIZE):
        store.write(offset, payload.view)


def _report(benchmark, nbytes):
    benchmark.extra_info["MB/s"] = round(nbytes / benchmark.stats.stats.mean / 1e6, 1)


def test_write_no_snapshot(benchmark, store):
    payload = _payload()
    benchmark(_write_pass, store, payload, 0)
    _report(benchmark, PASS_BYTES)


def test_first_writes(benchmark, store):
    payload = _payload()
    regions = iter(range(0, VOLUME_SIZE, PASS_BYTES))

    def setup():
        # every round gets a fresh snapshot, so every block written is a first write
        if store.snapshot_active:
            store.end_snapshot()
        store.start_snapshot()
        return (store, payload, next(regions, 0)), {}

    benchmark.pedantic(_write_pass, setup=setup, rounds=4, iterations=1)
    _report(benchmark, PASS_BYTES)


def test_rewrites(benchmark, store):
    payload = _payload()
    store.start_snapshot()
    _write_pass(store, payload, 0)
    benchmark(_write_pass, store, payload, 0)
    _report(benchmark, PASS_BYTES)


@pytest.mark.parametrize("changed", [0.0, 0.5], ids=["unchanged", "half-changed"])
def test_view_reads(benchmark, store, changed):
    payload = _payload()
    store.start_snapshot()
    _write_pass(store, payload, 0) if changed else None
    view = store.view()
    buf = AlignedBuffer(4 << 20)
    span = int(PASS_BYTES / changed) if changed else PASS_BYTES

    def read_pass():
        for offset in range(0, span, len(buf.view)):
            view.read_into(buf.view, offset)

    benchmark(read_pass)
    _report(benchmark, span)


@pytest.mark.parametrize("tracker", ["tracking", "no tracker"])
def test_small_writes_with_and_without_the_change_tracker(benchmark, volume, tmp_path, tracker):
    """4 KiB writes through the store with no snapshot: what marking the change tracker costs on
    the write path (the tracker replaced by a no-op for the comparison). Through the front each
    write also pays a FUSE round trip, so the share there is smaller still."""
    with CowStore(volume, str(tmp_path / "state")) as store:
        if tracker == "no tracker":
            store.tracker.mark = lambda offset, length: None
        payload = AlignedBuffer(4096)
        payload.array[:] = 7
        offsets = np.random.default_rng(2).integers(0, VOLUME_SIZE // 4096, 2048) * 4096

        def writes():
            for offset in offsets.tolist():
                store.write(offset, payload.view)

        benchmark(writes)
        _report(benchmark, 4096 * len(offsets))


def test_marking_the_change_tracker_for_a_4k_write(benchmark, tmp_path):
    """The tracker's whole cost on a write: one mark() (compare with a write's cost above)."""
    from imager.snapshot.cow.state import StateDir
    from imager.snapshot.cow.tracker import ChangeTracker

    (tmp_path / "volume.img").write_bytes(b"")
    state = StateDir(str(tmp_path / "state"), str(tmp_path / "volume.img"))
    try:
        tracker = ChangeTracker(state, VOLUME_SIZE, None)
        offsets = (np.random.default_rng(3).integers(0, VOLUME_SIZE // 4096, 4096) * 4096).tolist()

        def marks():
            for offset in offsets:
                tracker.mark(offset, 4096)

        benchmark(marks)
        benchmark.extra_info["us per mark"] = round(benchmark.stats.stats.mean / len(offsets) * 1e6, 2)
        tracker.close(None)
    finally:
        state.close()
