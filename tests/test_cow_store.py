"""CowStore and SnapshotView on a real loop device: point-in-time reads under writes and races."""

import logging
import mmap
import os
import random
import subprocess
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices import loop
from devices.block import BlockDevice
from devices.buffers import AlignedBuffer
from imager.errors import CacheFullError, SnapshotError
from imager.snapshot.cow import CowStore
from imager.snapshot.cow.direct import DirectSnapshotReader
from conftest import sweep_size
from lab import dirty_bytes

BS = 64 * 1024
VOLUME_SIZE = 16 * 1024 * 1024

pytestmark = pytest.mark.skipif(not os.access("/dev/loop-control", os.W_OK),
                                reason="needs root and /dev/loop-control")


@pytest.fixture
def loop_device(tmp_path):
    """A loop device over a sparse file filled with a known random pattern; detached even on failure."""
    backing = tmp_path / "volume.img"
    content = np.random.default_rng(1).integers(0, 256, VOLUME_SIZE, dtype=np.uint8)
    backing.write_bytes(content.tobytes())
    device = loop.attach(str(backing))
    try:
        yield device
    finally:
        loop.detach(device)


@pytest.fixture(params=[False, True], ids=["buffered", "o_direct"])
def volume(loop_device, request):
    """The device as the front daemon opens it (buffered), and with O_DIRECT, whose unaligned
    writes go through the store's read-modify-write path."""
    with BlockDevice(loop_device, writable=True, direct=request.param) as dev:
        yield dev


@pytest.fixture
def store(volume, tmp_path):
    with CowStore(volume, str(tmp_path / "state")) as s:
        yield s


def read_all(reader, size=VOLUME_SIZE, chunk=1 << 20) -> bytes:
    buf = AlignedBuffer(chunk)
    out = bytearray()
    try:
        for offset in range(0, size, chunk):
            n = reader.read_into(buf.view[:min(chunk, size - offset)], offset)
            out += buf.view[:n]
    finally:
        buf.close()
    return bytes(out)


def direct_reader(store) -> DirectSnapshotReader:
    """The store's snapshot as a backup in another process reads it: the device and the
    store's files, with no lock of the store; its view only for blocks the files cannot give."""
    return DirectSnapshotReader(store.device.path, store.state_dir, generation=store.generation,
                                started_at=store.snapshot_started_at, view=store.view())


def snapshot_reader(store, kind: str):
    return store.view() if kind == "view" else direct_reader(store)


def read_at(reader, length: int, offset: int) -> bytes:
    buf = AlignedBuffer(length + 4096)
    try:
        start = offset % 512 + 512        # an unaligned place in the buffer, for an unaligned read
        got = reader.read_into(buf.view[start:start + length], offset)
        return bytes(buf.view[start:start + got])
    finally:
        buf.close()


def test_view_equals_pre_snapshot_bytes_after_many_writes(store, volume):
    before = read_all(volume)
    store.start_snapshot()
    view = store.view()
    rng = random.Random(2)
    expected = bytearray(before)
    for _ in range(400):
        length = rng.choice([512, 4096, BS, 3 * BS + 17, rng.randrange(1, 300_000)])
        offset = rng.randrange(0, VOLUME_SIZE - length)
        data = rng.randbytes(length)
        store.write(offset, data)
        expected[offset:offset + length] = data
    assert read_all(view) == before
    assert read_all(view, chunk=BS * 3 + 4096) == before
    assert view.pread(100_000, 12345) == before[12345:112345]
    store.flush()
    assert read_all(volume) == bytes(expected)


def test_a_direct_reader_gives_the_snapshot_after_many_writes(store, volume):
    before = read_all(volume)
    store.start_snapshot()
    rng = random.Random(4)
    for _ in range(400):
        length = rng.choice([512, 4096, BS, 3 * BS + 17, rng.randrange(1, 300_000)])
        store.write(rng.randrange(0, VOLUME_SIZE - length), rng.randbytes(length))
    assert store.changed_blocks() > 100
    with direct_reader(store) as reader:
        assert read_all(reader) == before
        assert read_all(reader, chunk=BS * 3 + 4096) == before
        for offset, length in ((12345, 100_000), (BS - 1, 2), (VOLUME_SIZE - 1000, 4096), (5 * BS, BS)):
            assert read_at(reader, length, offset) == before[offset:offset + length]
        assert read_at(reader, 10, VOLUME_SIZE) == b""
        assert reader.fallbacks == 0


def test_a_direct_reader_opens_only_its_own_snapshot(store, volume, tmp_path):
    store.start_snapshot()
    generation, started = store.generation, store.snapshot_started_at
    view = store.view()
    with pytest.raises(SnapshotError, match="not the active one"):
        DirectSnapshotReader(volume.path, store.state_dir, generation=generation - 1, started_at=started, view=view)
    with pytest.raises(SnapshotError, match="not the active one"):
        DirectSnapshotReader(volume.path, store.state_dir, generation=generation, started_at=started + 1, view=view)
    other_file = tmp_path / "other.img"
    other_file.write_bytes(bytes(VOLUME_SIZE))
    other = loop.attach(str(other_file))
    try:
        with pytest.raises(SnapshotError, match="another device"):
            DirectSnapshotReader(other, store.state_dir, generation=generation, started_at=started, view=view)
    finally:
        loop.detach(other)
    store.end_snapshot()
    with pytest.raises(SnapshotError, match="not the active one"):
        DirectSnapshotReader(volume.path, store.state_dir, generation=generation, started_at=started, view=view)


def test_a_direct_snapshot_reader_sees_writes_still_in_the_page_cache(loop_device, tmp_path):
    """The daemon writes the source through its page cache and reads the snapshot's blocks
    with O_DIRECT past it: the writes made before the snapshot, not yet on the disk, must be
    in the snapshot all the same (an O_DIRECT read writes back the dirty pages it covers)."""
    rng = np.random.default_rng(7)
    with BlockDevice(loop_device, writable=True, direct=False) as device, \
            BlockDevice(loop_device, direct=True) as reader, \
            CowStore(device, str(tmp_path / "state"), snapshot_reader=reader) as store:
        assert reader.direct
        before = bytearray(read_all(store))
        for offset in range(0, VOLUME_SIZE, 1 << 20):
            data = rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes()
            store.write(offset + 12_345, data)
            before[offset + 12_345:offset + 12_345 + len(data)] = data
        assert dirty_bytes(device.fd, VOLUME_SIZE) > 0          # not on the disk yet
        store.start_snapshot()
        after = rng.integers(0, 256, VOLUME_SIZE // 2, dtype=np.uint8).tobytes()
        store.write(0, after)                                  # half the blocks keep originals
        with store.view() as view:
            assert read_all(view) == bytes(before)
        with direct_reader(store) as direct:
            assert read_all(direct) == bytes(before)
        store.end_snapshot()


def test_unaligned_writes_spanning_blocks(store, volume):
    before = read_all(volume)
    store.start_snapshot()
    offset, length = BS - 100, 2 * BS + 300          # touches blocks 0..3
    data = os.urandom(length)
    store.write(offset, data)
    store.write(5 * BS + 1, b"x")                      # one byte inside block 5
    assert store.changed_blocks() == 5
    with store.view() as view:
        assert read_all(view) == before
        # unaligned reads of the view go through the same paths
        assert view.pread(2 * BS + 1000, BS - 500) == before[BS - 500:3 * BS + 500]
    after = read_all(volume)
    assert after[offset:offset + length] == data
    assert after[5 * BS + 1] == ord("x")
    assert after[:offset] == before[:offset]
    assert after[5 * BS + 2:] == before[5 * BS + 2:]


def test_read_past_the_end_is_short(store, volume):
    store.start_snapshot()
    view = store.view()
    assert len(view.pread(4096, VOLUME_SIZE - 1000)) == 1000
    assert view.pread(10, VOLUME_SIZE) == b""
    buf = AlignedBuffer(8192)
    assert view.read_into(buf.view, VOLUME_SIZE - 4096) == 4096
    buf.close()


def test_writes_without_snapshot_do_not_use_the_cache(store, volume, tmp_path):
    store.write(0, b"a" * BS)
    assert store.cache_bytes_used() == 0
    assert store.changed_blocks() == 0
    with pytest.raises(SnapshotError, match="no active snapshot"):
        store.view()


@pytest.mark.sweep
@pytest.mark.parametrize("kind", ["view", "direct"])
def test_racing_writes_never_leak_into_the_snapshot(store, volume, kind):
    """Writers hammer the same few blocks while readers read them through the view (under the
    store's locks) or directly (with none), all released at once by a barrier; each round what
    they read must equal the volume as it was at the snapshot."""
    region = 6 * BS
    writers, readers, rounds = 4, 2, sweep_size(300, 100)
    rng = np.random.default_rng(3)
    errors = []
    for round_number in range(rounds):
        before = volume.pread(region, 0)
        store.start_snapshot()
        view = snapshot_reader(store, kind)
        barrier = threading.Barrier(writers + readers)
        payloads = [rng.integers(0, 256, region, dtype=np.uint8).tobytes() for _ in range(writers)]

        def write(payload, seed):
            r = random.Random(seed)
            barrier.wait()
            for _ in range(6):
                length = r.choice([512, 4096, BS, 2 * BS + 512, r.randrange(1, 2 * BS)])
                offset = r.randrange(0, region - length)
                store.write(offset, payload[offset:offset + length])

        def read():
            barrier.wait()
            for _ in range(3):
                got = read_at(view, region, 0)
                if got != before:
                    first_bad = next(i for i in range(region) if got[i] != before[i])
                    errors.append(f"round {round_number}: view differs at byte {first_bad}")

        threads = [threading.Thread(target=write, args=(payloads[i], round_number * 10 + i))
                   for i in range(writers)] + [threading.Thread(target=read) for _ in range(readers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert read_at(view, region, 0) == before
        if kind == "direct":
            # Every original came from the cache the reader found through the index, none
            # through the view it falls back to when it cannot.
            assert view.fallbacks == 0
        view.close()
        store.end_snapshot()


def test_cache_full_keeps_writes_going_and_fails_the_view(volume, tmp_path):
    state = str(tmp_path / "state")
    with CowStore(volume, state, cache_capacity=4 * BS) as store:
        store.start_snapshot()
        view = store.view()
        writes = {block * BS + 100: os.urandom(BS - 200) for block in range(0, 20, 2)}
        for offset, data in writes.items():
            store.write(offset, data)                   # never raises, never blocks
        store.flush()
        for offset, data in writes.items():
            assert volume.pread(len(data), offset) == data
        assert store.snapshot_invalid
        with pytest.raises(CacheFullError) as caught:
            view.pread(4096, 0)
        needed = 10 * BS
        assert caught.value.needed_bytes == needed
        assert str(needed) in str(caught.value)
        assert "larger cache" in str(caught.value)
    # the invalid state is persisted: a restarted store still refuses the view
    with CowStore(volume, state, cache_capacity=4 * BS) as store:
        assert store.snapshot_active and store.snapshot_invalid
        with pytest.raises(CacheFullError):
            store.view().pread(10, 0)
        store.end_snapshot()
        store.start_snapshot()
        store.write(0, b"y" * 10)
        assert store.view().pread(4096, 0) != b"y" * 10


def test_a_direct_reader_never_reads_a_block_whose_original_was_lost(volume, tmp_path):
    """The cache fills while a direct reader is open: the blocks whose originals were kept still
    read as the snapshot; a read of one whose original is lost fails, as the view says why."""
    with CowStore(volume, str(tmp_path / "state"), cache_capacity=4 * BS) as store:
        before = read_all(volume)
        store.start_snapshot()
        with direct_reader(store) as reader:
            for block in range(0, 20, 2):
                store.write(block * BS + 100, os.urandom(BS - 200))
            assert store.snapshot_invalid
            assert read_at(reader, 4 * BS, 0) == before[:4 * BS]            # blocks 0-3: kept
            assert read_at(reader, BS, 11 * BS) == before[11 * BS:12 * BS]  # never written
            with pytest.raises(CacheFullError):
                read_at(reader, 2 * BS, 15 * BS)                           # block 16: lost
            assert reader.fallbacks == 1


def test_a_stale_index_entry_never_stands_for_a_lost_original(volume, tmp_path):
    """A crash can leave an index entry whose bit is clear (between the copy and the bit, or
    inside end_snapshot). When a later snapshot cannot keep that block's original, the entry
    must not be read as its slot: it points at another block's original in the new cache."""
    with CowStore(volume, str(tmp_path / "state"), cache_capacity=BS) as store:
        before = read_all(volume)
        store.start_snapshot()
        store._index_array[5] = 1                  # what the crash left: slot 0, bit clear
        with direct_reader(store) as reader:
            store.write(2 * BS, os.urandom(BS))   # block 2's original takes slot 0
            store.write(5 * BS, os.urandom(BS))   # no room left for block 5's
            assert read_at(reader, BS, 2 * BS) == before[2 * BS:3 * BS]
            with pytest.raises(CacheFullError):
                read_at(reader, BS, 5 * BS)
        with pytest.raises(CacheFullError):
            store.view().pread(BS, 5 * BS)


def test_a_snapshot_whose_end_cannot_be_recorded_never_comes_back_wrong(volume, tmp_path, monkeypatch):
    """The end of a snapshot cannot be written to the state directory: the snapshot stays, and a
    worker that loads it from there, still active, must read each block as it was or fail on it,
    never read what was written after the failed end."""
    state = str(tmp_path / "state")
    with CowStore(volume, state) as store:
        before = read_all(volume)
        store.start_snapshot()
        store.write(0, os.urandom(BS))                      # kept in the cache, which goes

        def full(*args):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(store, "_persist", full)
        with pytest.raises(SnapshotError, match="cannot record the end"):
            store.end_snapshot()
        assert store.snapshot_active and store.snapshot_invalid
        store.write(BS, os.urandom(BS))                      # after the failed end
    monkeypatch.undo()
    with CowStore(volume, state) as store:                   # the next worker
        assert store.snapshot_active
        for reader in (store.view(), direct_reader(store)):
            for block in (0, 1):
                with pytest.raises(SnapshotError, match="not kept|no longer point-in-time"):
                    read_at(reader, BS, block * BS)
            assert read_at(reader, BS, 2 * BS) == before[2 * BS:3 * BS]
            reader.close()
        store.end_snapshot()
        assert not store.snapshot_active


def test_a_flush_puts_an_invalid_snapshots_lost_marks_on_the_disk(volume, tmp_path, monkeypatch):
    """The state filesystem is full: the snapshot goes invalid without the flag reaching the
    disk, and a later write's block is marked lost in memory. Once a writer's flush returns,
    that mark is on the disk too, so that after a power loss the snapshot, loaded as valid,
    fails on that block rather than reading its new data."""
    state = tmp_path / "state"
    with CowStore(volume, str(state), cache_capacity=BS) as store:
        store.start_snapshot()

        def full(*args):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(store, "_persist", full)
        store.write(0, os.urandom(BS))                      # takes the cache's one slot
        store.write(9 * BS, os.urandom(BS))                 # no room: invalid, block 9 lost
        assert store.snapshot_invalid
        store.write(12 * BS, os.urandom(BS))                # invalid already: block 12 lost
        store.flush()
        for name in ("bitmap", "index"):
            fd = os.open(state / name, os.O_RDONLY)
            try:
                pages = -(-os.fstat(fd).st_size // mmap.PAGESIZE) * mmap.PAGESIZE
                assert dirty_bytes(fd, pages) == 0, f"the {name} is not on the disk"
            finally:
                os.close(fd)
        with pytest.raises(SnapshotError, match="not kept|no longer point-in-time|larger cache"):
            store.view().pread(BS, 12 * BS)


class _FailingSync:
    """A store's mapped file whose sync fails, like msync on a failing state filesystem."""

    def __init__(self, mapped):
        self.mapped = mapped
        self.failing = True

    def flush(self):
        if self.failing:
            raise OSError(5, "Input/output error")
        self.mapped.flush()


def test_marks_that_cannot_be_synced_are_said_once_and_when_they_are_again(volume, tmp_path, monkeypatch, caplog):
    """A writer flushes again and again: a state filesystem that fails the marks' sync is one
    warning in the daemon's log, not one per flush, and the log says when the marks are on the
    disk again."""
    caplog.set_level(logging.WARNING, logger="imager.cow")
    with CowStore(volume, str(tmp_path / "state"), cache_capacity=BS) as store:
        store.start_snapshot()
        store.write(0, os.urandom(BS))
        store.write(9 * BS, os.urandom(BS))                 # no room: invalid
        assert store.snapshot_invalid
        index = store._index_map
        failing = _FailingSync(index)
        monkeypatch.setattr(store, "_index_map", failing)
        try:
            for n in range(5):
                store.write((12 + n) * BS, os.urandom(BS))
                store.flush()
            said = [r.getMessage() for r in caplog.records]
            assert len(said) == 1 and "could not be made durable" in said[0] and "Input/output error" in said[0]
            failing.failing = False
            store.flush()
            store.flush()
            said = [r.getMessage() for r in caplog.records]
            assert len(said) == 2 and "durable again" in said[1]
            failing.failing = True
            store.flush()
            assert len(caplog.records) == 3 and "could not be made durable" in caplog.records[2].getMessage()
        finally:
            monkeypatch.setattr(store, "_index_map", index)


def test_snapshot_survives_reopening_the_store(volume, tmp_path):
    state = str(tmp_path / "state")
    before = read_all(volume)
    with CowStore(volume, state) as store:
        store.start_snapshot()
        for block in (0, 7, 100, 200):
            store.write(block * BS + 3, os.urandom(BS))
        changed = store.changed_blocks()
        generation = store.generation
    with CowStore(volume, state) as store:
        assert store.snapshot_active
        assert store.generation == generation
        assert store.changed_blocks() == changed == 8
        view = store.view()
        assert read_all(view) == before
        store.write(50 * BS, os.urandom(BS))
        assert read_all(view) == before


def test_changed_blocks_of_an_ended_snapshot_survive_reopening(volume, tmp_path):
    state = str(tmp_path / "state")
    with CowStore(volume, state) as store:
        store.start_snapshot()
        store.write(3 * BS, b"z" * (2 * BS))
        store.end_snapshot()
        assert store.changed_blocks() == 2
    with CowStore(volume, state) as store:
        assert not store.snapshot_active
        assert store.changed_blocks() == 2
    with CowStore(volume, state, block_size=2 * BS) as store:   # another geometry starts anew
        assert store.changed_blocks() == 0


def test_reopening_with_another_block_size_is_refused_while_active(volume, tmp_path):
    state = str(tmp_path / "state")
    with CowStore(volume, state) as store:
        store.start_snapshot()
    with pytest.raises(SnapshotError, match="active snapshot"):
        CowStore(volume, state, block_size=BS * 2)


def test_end_snapshot_discards_the_cache_and_stales_views(store, volume):
    store.start_snapshot()
    view = store.view()
    store.write(0, os.urandom(3 * BS))
    assert store.cache_bytes_used() == 3 * BS
    store.end_snapshot()
    assert os.path.getsize(os.path.join(store.state_dir, "cache")) == 0
    with pytest.raises(SnapshotError, match="deleted"):
        view.pread(10, 0)
    store.start_snapshot()
    with pytest.raises(SnapshotError, match="deleted"):
        view.pread(10, 0)


def test_state_dir_on_the_snapshotted_volume_is_refused(loop_device, tmp_path):
    subprocess.run(["mkfs.ext4", "-q", "-F", loop_device], check=True)
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    subprocess.run(["mount", loop_device, str(mount_point)], check=True)
    try:
        with BlockDevice(loop_device, writable=True) as dev:
            with pytest.raises(SnapshotError, match="is on .*being snapshotted"):
                CowStore(dev, str(mount_point / "state"))
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_state_dir_on_a_file_backed_by_the_volume_file_is_refused(tmp_path):
    # the volume is a plain file; the state dir sits on a filesystem inside that very file
    image = tmp_path / "volume.img"
    with open(image, "wb") as f:
        f.truncate(VOLUME_SIZE)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    device = loop.attach(str(image))
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    try:
        subprocess.run(["mount", device, str(mount_point)], check=True)
        try:
            with BlockDevice(str(image), writable=True) as dev:
                with pytest.raises(SnapshotError, match="being snapshotted"):
                    CowStore(dev, str(mount_point / "state"))
        finally:
            subprocess.run(["umount", str(mount_point)], check=True)
    finally:
        loop.detach(device)


def test_block_size_must_be_a_power_of_two_multiple_of_the_sector(volume, tmp_path):
    for bad in (1000, 256, 3 * 4096):
        with pytest.raises(SnapshotError, match="power of two"):
            CowStore(volume, str(tmp_path / "state"), block_size=bad)


SMALL_BS = 4096
MODEL_REGION = 256 * 1024
MAX_READ = 40_000


@given(writes=st.lists(st.tuples(st.integers(0, MODEL_REGION - 1), st.integers(1, 20_000),
                                 st.binary(min_size=1, max_size=1)), max_size=25),
       read=st.tuples(st.integers(0, MODEL_REGION - 1), st.integers(0, MAX_READ)))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_view_matches_a_model_for_any_writes(volume, tmp_path, writes, read):
    """Any unaligned writes, any unaligned read: the view is the volume before, the device after."""
    with CowStore(volume, str(tmp_path / "model-state"), block_size=SMALL_BS) as store:
        if store.snapshot_active:
            store.end_snapshot()
        before = volume.pread(MODEL_REGION + MAX_READ, 0)
        store.start_snapshot()
        after = bytearray(before)
        for offset, length, fill in writes:
            length = min(length, MODEL_REGION - offset)
            store.write(offset, fill * length)
            after[offset:offset + length] = fill * length
        offset, length = read
        view = store.view()
        assert view.pread(length, offset) == before[offset:offset + length]
        assert view.pread(len(before), 0) == before
        assert store.read(0, len(after)) == bytes(after)
        store.end_snapshot()


@pytest.fixture
def tiny_state_fs(tmp_path):
    """A 1 MiB tmpfs for the state directory, so the cache's filesystem itself fills up."""
    point = tmp_path / "tiny"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_full_cache_filesystem_never_fails_or_loses_a_write(volume, tiny_state_fs):
    with CowStore(volume, str(tiny_state_fs / "state")) as s:
        s.start_snapshot()
        with open(tiny_state_fs / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        data = os.urandom(4 * BS)
        s.write(0, data)  # must not raise, although no original can be kept
        s.flush()
        assert s.snapshot_invalid
        assert not list(tiny_state_fs.joinpath("state").glob("*.tmp"))
        with pytest.raises(CacheFullError):
            read_all(s.view(), size=BS)
    assert read_all(volume, size=4 * BS, chunk=4 * BS) == data


def test_a_state_directory_serves_only_its_own_device(volume, tmp_path):
    state = str(tmp_path / "state")
    with CowStore(volume, state) as s:
        s.start_snapshot()
        s.write(0, b"x" * BS)
        with pytest.raises(SnapshotError, match="in use"):
            CowStore(volume, state)
    other_file = tmp_path / "other.img"
    other_file.write_bytes(bytes(VOLUME_SIZE))
    other = loop.attach(str(other_file))
    try:
        with BlockDevice(other, writable=True) as dev:
            with pytest.raises(SnapshotError, match="another device"):
                CowStore(dev, state)
    finally:
        loop.detach(other)
