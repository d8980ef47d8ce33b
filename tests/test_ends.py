"""The conformance suites of the ends: every Sink, every Feed and every VolumeSource the engine has
runs through the same checks, as restic runs every backend through one suite. A new end passes
these or it is not an end."""

from __future__ import annotations

import errno
import io
import itertools
import os
import random
import threading
from pathlib import Path

import pytest

from devices import loop
from devices.block import BlockDevice
from devices.buffers import BufferPool
from devices.tape.virtual import VirtualTape
from imager import jobs
from imager.ends.feeds import SeekableFeed, StreamFeed
from imager.ends.sinks import FileSink, StreamSink
from imager.ends.sources import VolumePrefix
from imager.errors import ChunkError, ImageFormatError, ImagerError, TapeMediaError
from imager.format import (DIGEST_SIZE, INCREMENTAL, ImageHeader, ImageReader, ImageWriter, ZstdCodec,
                           zstd_frame_bound)
from imager.jobs.backup import ImagingOptions, write_image
from imager.pipeline import READS_IN_FLIGHT, decode_feed, pool_size, read_chunks, run_ordered
from imager.plan.usedmap import UsedMap
from imager.snapshot.cow import CowStore
from imager.snapshot.cow.direct import DirectSnapshotReader
from imager.tape import TapeSink, TapeSpec, write_label
from lab import dirty_bytes

CHUNK = 64 << 10
VOLUME = 1 << 20          # 16 chunks: random, text, zeros
OPTIONS = ImagingOptions(chunk_size=CHUNK, workers=2)


@pytest.fixture(scope="module")
def volume_file(tmp_path_factory) -> Path:
    rng = random.Random(11)
    data = bytearray(VOLUME)
    data[:256 << 10] = rng.randbytes(256 << 10)
    data[256 << 10:512 << 10] = (b"a line of text in a volume\n" * 20000)[:256 << 10]
    path = tmp_path_factory.mktemp("ends") / "volume.raw"
    path.write_bytes(bytes(data))
    return path


# --- sinks ---------------------------------------------------------------------------------------

class FileEnd:
    name = "file"

    def __init__(self, tmp: Path):
        self.path = tmp / "image.zst"
        self.dir = tmp

    def open(self, image_id: str):
        return FileSink(str(self.path))

    def read_back(self, image_id: str):
        return StreamFeed(open(self.path, "rb"), "file") if self.path.exists() else None

    def leftovers(self) -> list[str]:
        return [p.name for p in self.dir.iterdir() if p.name != "image.zst"]


class PipeEnd:
    """The image stream to a pipe, as `-o - | ssh ...` does."""

    name = "stream"

    def __init__(self, tmp: Path):
        self.received = bytearray()
        self._threads = []

    def open(self, image_id: str):
        read_fd, write_fd = os.pipe()
        reader = os.fdopen(read_fd, "rb")
        self.writer = os.fdopen(write_fd, "wb")

        def drain():
            while chunk := reader.read(1 << 16):
                self.received += chunk
            reader.close()
        t = threading.Thread(target=drain)
        t.start()
        self._threads.append(t)
        return StreamSink(self.writer, name="a pipe")

    def read_back(self, image_id: str):
        self.writer.close()
        for t in self._threads:
            t.join()
        return StreamFeed(io.BytesIO(bytes(self.received)), "pipe") if self.received else None

    def leftovers(self) -> list[str]:
        return []


class TapeEnd:
    name = "tape"

    def __init__(self, tmp: Path):
        self.tape = tmp / "t.tap"
        with VirtualTape(self.tape) as drive:
            write_label(drive, "ENDS")
        self.spec = TapeSpec(str(self.tape))

    def open(self, image_id: str):
        return TapeSink(self.spec, image_id=image_id, block_size=32 << 10)

    def read_back(self, image_id: str):
        try:
            return jobs.open_tape_image(self.spec, image_id)
        except TapeMediaError:
            return None

    def leftovers(self) -> list[str]:
        return []


SINKS = [FileEnd, PipeEnd, TapeEnd]


@pytest.mark.parametrize("end_class", SINKS, ids=lambda c: c.name)
def test_a_committed_sink_holds_the_whole_image(end_class, volume_file, tmp_path):
    end = end_class(tmp_path)
    with BlockDevice(str(volume_file), direct=False) as source:
        sink = end.open("a" * 32)
        result = write_image(source, sink, options=OPTIONS, image_id="a" * 32)
        if isinstance(sink, TapeSink):
            sink.commit({"id": "a" * 32})
        else:
            sink.commit()
    assert isinstance(sink.path, str) and sink.path
    feed = end.read_back("a" * 32)
    assert feed is not None
    try:
        assert _decoded(feed) == volume_file.read_bytes()
        assert feed.stream_bytes == result.bytes_written
    finally:
        feed.close()
    assert end.leftovers() == []


@pytest.mark.parametrize("end_class", SINKS, ids=lambda c: c.name)
def test_an_aborted_sink_leaves_no_whole_image(end_class, volume_file, tmp_path):
    end = end_class(tmp_path)
    with BlockDevice(str(volume_file), direct=False) as source:
        sink = end.open("b" * 32)

        def fail_half_way(n: int) -> None:
            if n and fail_half_way.seen >= VOLUME // 2:
                raise KeyboardInterrupt
            fail_half_way.seen += n
        fail_half_way.seen = 0
        with pytest.raises(KeyboardInterrupt):
            try:
                write_image(source, sink, options=OPTIONS, image_id="b" * 32, progress=fail_half_way)
            except BaseException:
                sink.abort()
                raise
    feed = None
    try:
        feed = end.read_back("b" * 32)
        if feed is not None:
            # A stream cannot be taken back: its reader must see that it is incomplete.
            with pytest.raises(ImagerError):
                _decoded(feed)
    except ImagerError:
        pass                         # not even a header: equally refused
    finally:
        if feed is not None:
            feed.close()
    assert end.leftovers() == []


# --- feeds ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_bytes(volume_file, tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("image") / "image.zst"
    jobs.backup(str(volume_file), str(path), options=OPTIONS, catalog=None)
    return path.read_bytes()


def _seekable(data: bytes, tmp: Path):
    path = tmp / "feed.zst"
    path.write_bytes(data)
    reader = ImageReader(str(path))
    return SeekableFeed(reader), reader.close


def _stream(data: bytes, tmp: Path):
    return StreamFeed(io.BytesIO(data), "a stream"), lambda: None


def _tape(data: bytes, tmp: Path):
    """The image written to a virtual tape by the tape sink, read back as a feed."""
    tape = tmp / f"feed{len(list(tmp.glob('*.tap')))}.tap"
    with VirtualTape(tape) as drive:
        write_label(drive, "FEEDS")
    spec = TapeSpec(str(tape))
    sink = TapeSink(spec, image_id="c" * 32, block_size=32 << 10)
    sink.write(data)
    sink.commit({"id": "c" * 32})
    feed = jobs.open_tape_image(spec, "c" * 32)
    return feed, feed.close


FEEDS = {"seekable file": _seekable, "stream": _stream, "tape": _tape}


def _decoded(feed) -> bytes:
    parts: dict[int, bytes] = {}
    digests = []

    def keep(index, data, digest):
        parts[index] = bytes(feed.header.chunk_length(index)) if data is None else bytes(data)
        digests.append((index, digest))

    decode_feed(feed, keep, workers=2)
    trailer = feed.finish()          # an image cut short is refused here, whatever came before
    assert sorted(parts) == list(range(feed.header.chunk_count)), "every chunk once, in order"
    trailer.check_chunk_digests(digests)
    return b"".join(parts[i] for i in sorted(parts))


@pytest.mark.parametrize("make", FEEDS.values(), ids=FEEDS.keys())
def test_every_feed_gives_back_the_volume(make, image_bytes, volume_file, tmp_path):
    feed, close = make(image_bytes, tmp_path)
    try:
        assert feed.header.volume_size == VOLUME and feed.header.chunk_size == CHUNK
        assert _decoded(feed) == volume_file.read_bytes()
    finally:
        close()
        feed.close()


@pytest.mark.parametrize("make", FEEDS.values(), ids=FEEDS.keys())
def test_every_feed_names_a_damaged_chunk(make, image_bytes, tmp_path):
    with ImageReader(_write(tmp_path / "pristine.zst", image_bytes)) as reader:
        offset = reader.chunk_offsets[2] + reader.chunk_frame_sizes[2] // 2
    damaged = bytearray(image_bytes)
    damaged[offset] ^= 0x40
    feed, close = make(bytes(damaged), tmp_path)
    try:
        with pytest.raises(ChunkError, match="chunk 2 "):
            _decoded(feed)
    finally:
        close()


@pytest.mark.parametrize("make", FEEDS.values(), ids=FEEDS.keys())
def test_every_feed_skips_only_the_stream_digest_when_asked(make, image_bytes, volume_file, tmp_path):
    """A flip zstd ignores (the frame header's unused bit) is found by the stream digest; a
    restore, which checks every chunk's contents, asks the feed not to compute it."""
    with ImageReader(_write(tmp_path / "pristine.zst", image_bytes)) as reader:
        offset = reader.chunk_offsets[1] + 4
    flipped = bytearray(image_bytes)
    flipped[offset] ^= 0x10
    feed, close = make(bytes(flipped), tmp_path)
    try:
        with pytest.raises(ImageFormatError, match="stream checksum"):
            _decoded(feed)
    finally:
        close()
    feed, close = make(bytes(flipped), tmp_path)
    try:
        feed.skip_stream_digest()
        assert _decoded(feed) == volume_file.read_bytes()
    finally:
        close()


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


# --- sources -------------------------------------------------------------------------------------

@pytest.fixture
def sources(volume_file, tmp_path):
    """Every kind of VolumeSource over a copy of the volume, each with what it must read: the
    snapshot view what the volume held when the snapshot was taken, the rest what it holds now."""
    before = volume_file.read_bytes()
    copy = tmp_path / "volume.raw"
    copy.write_bytes(before)
    opened = []
    device = loop.attach(str(copy), read_only=False)
    store = None
    try:
        store = CowStore(BlockDevice(device, writable=True, direct=True), str(tmp_path / "state"))
        store.start_snapshot()
        store.write(0, os.urandom(CHUNK))       # after the snapshot: only the view must not show it
        store.flush()
        now = copy.read_bytes()
        assert now != before
        made = {
            "block device (O_DIRECT)": (BlockDevice(device, direct=True), now),
            "file": (BlockDevice(str(copy), direct=False), now),
            "prefix of a larger device": (VolumePrefix(BlockDevice(device, direct=True), VOLUME - CHUNK), now),
            "snapshot view": (store.view(), before),
            "snapshot read directly": (DirectSnapshotReader(device, store.state_dir, generation=store.generation,
                                                            started_at=store.snapshot_started_at, view=store.view()),
                                       before),
        }
        opened += [made["block device (O_DIRECT)"][0], made["file"][0], made["prefix of a larger device"][0].device,
                   made["snapshot read directly"][0]]
        yield made
    finally:
        for thing in opened:
            thing.close()
        if store is not None:
            store.end_snapshot()
            store.close()
            store.device.close()
        loop.detach(device)


def test_every_source_reads_what_the_volume_held(sources):
    for name, (source, expected) in sources.items():
        assert source.size in (VOLUME, VOLUME - CHUNK), name
        assert source.logical_sector_size in (512, 4096), name
        assert isinstance(source.path, str) and source.path, name
        buf = memoryview(bytearray(CHUNK))
        for offset in (0, 3 * CHUNK, source.size - CHUNK):
            assert source.read_into(buf, offset) == CHUNK, (name, offset)
            assert bytes(buf) == expected[offset:offset + CHUNK], (name, offset)
        # at the end: short, never past the volume
        tail = memoryview(bytearray(2 * CHUNK))
        assert source.read_into(tail, source.size - CHUNK) == CHUNK, name
        assert source.read_into(tail, source.size) == 0, name
        assert getattr(source, "fallbacks", 0) == 0, f"{name} read through the view it falls back to"


def test_a_file_image_goes_to_its_disk_while_it_is_written(tmp_path):
    """The fsync at the end of a backup waits for the last part of the image only: FileSink
    starts the writeback of every WRITEBACK_STEP as it is written, so a long backup never holds
    gigabytes of dirty pages for the commit to wait on. (A small step here: the kernel's own
    writeback, which starts at a share of the memory, stays out of it.)"""
    sink = FileSink(str(tmp_path / "image.zst"))
    sink.WRITEBACK_STEP = step = 1 << 20
    try:
        for _ in range(8):
            sink.write(os.urandom(step))
        sink.write(os.urandom(step // 4))           # not a step yet: stays dirty
        sink._f.flush()
        length = 8 * step + step // 4
        assert step // 4 <= dirty_bytes(sink._file.fd, length) <= step
    finally:
        sink.abort()


def test_an_incremental_s_frames_go_out_in_whole_pieces_no_larger_than_a_chunk():
    """Joined for speed, an incremental's frames still reach the sink in pieces that end on a
    frame and are no larger than `max_write` (a tape sink changes cartridges between writes,
    and its early-warning zone holds one write); the bytes are those of a write per frame."""
    block, chunk = 16384, 1 << 20
    header = ImageHeader(volume_size=64 * chunk, chunk_size=block, block_size=block, kind=INCREMENTAL)
    base = bytes(DIGEST_SIZE * header.block_count)
    codec = ZstdCodec(3, block)
    rng = random.Random(5)
    blocks = [codec.encode(i, memoryview(rng.randbytes(block)))
              for i in sorted(rng.sample(range(header.block_count), 300))]

    class Pieces(list):
        def write(self, data: bytes) -> None:
            self.append(bytes(data))

    joined, one_by_one = Pieces(), Pieces()
    max_write = zstd_frame_bound(chunk)
    for sink, limit in ((joined, max_write), (one_by_one, 0)):
        writer = ImageWriter(sink, header, base_digests=base, max_write=limit)
        for first in range(0, len(blocks), 100):
            writer.write_blocks(blocks[first:first + 100])
    assert b"".join(joined) == b"".join(one_by_one) and len(joined) < len(one_by_one) / 20
    assert max(len(piece) for piece in joined) <= max_write
    ends = set(itertools.accumulate(len(piece) for piece in one_by_one))
    assert set(itertools.accumulate(len(piece) for piece in joined)) <= ends


# -- reading a volume by its plan ------------------------------------------------------------------

@pytest.mark.parametrize("readers", (1, READS_IN_FLIGHT))
def test_scattered_reads_come_in_order_and_a_failed_one_gives_every_buffer_back(tmp_path, readers):
    """In order whatever the reads in flight, with fewer buffers than reads (the reader waits for
    the oldest read instead of on the pool), and every buffer back after a failed read."""
    chunk = 1 << 20
    path = tmp_path / "volume.raw"
    content = os.urandom(24 * chunk)
    path.write_bytes(content)
    rng = random.Random(4)
    ranges = sorted({(s, s + rng.choice((4096, 65536))) for s in
                     (rng.randrange(0, 24 * chunk - 65536) & ~4095 for _ in range(60))})
    plan = UsedMap.from_ranges(len(content), ranges)
    pool = BufferPool(3, chunk)
    read: list[int] = []
    with BlockDevice(str(path)) as source:
        got = []
        for index, buf, length in read_chunks(source, chunk, pool, read.append, plan, readers=readers):
            got.append((index, bytes(buf.view[:length]) if buf is not None else None))
            if buf is not None:
                pool.release(buf)
        assert [i for i, _ in got] == list(range(24))
        for index, data in got:                  # what the plan names, zeros elsewhere
            expected = bytearray(chunk)
            for s, e in plan.ranges_in(index * chunk, chunk):
                expected[s:e] = content[index * chunk + s:index * chunk + e]
            assert data is None if not plan.ranges_in(index * chunk, chunk) else data == bytes(expected)
        assert sum(read) == sum(e - s for s, e in plan.ranges_in(0, len(content)))
        os.truncate(path, 12 * chunk)            # the volume shrinks under the reader
        with pytest.raises(ImagerError, match="short read"):
            for index, buf, length in read_chunks(source, chunk, pool, read.append, plan, readers=readers):
                if buf is not None:
                    pool.release(buf)
    assert pool.available() == 3                 # nothing lost on the way out


class _ConcurrencyProbe:
    """A volume whose reads wait for each other until `target` are in flight at once (or a
    while has passed, once): how many a reader keeps in flight, without timing anything."""

    path = "probe"
    logical_sector_size = 512

    def __init__(self, size: int, target: int):
        self.size = size
        self.target = target
        self.active = self.peak = 0
        self.waited_out = False
        self._changed = threading.Condition()

    def read_into(self, buf: memoryview, offset: int) -> int:
        with self._changed:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self._changed.notify_all()
            if not self.waited_out and not self._changed.wait_for(lambda: self.peak >= self.target, timeout=10):
                self.waited_out = True
            self.active -= 1
        buf[:] = bytes(len(buf))
        return len(buf)


def test_a_sparse_plan_still_gets_every_read_in_flight():
    """An incremental of a small change reads a few blocks in a chunk here and there: the
    unused chunks between them must not hold back the reads."""
    chunk = 1 << 20
    probe = _ConcurrencyProbe(64 * chunk, READS_IN_FLIGHT)
    plan = UsedMap.from_ranges(probe.size, [(i * chunk, i * chunk + 4096) for i in range(0, 64, 4)])
    pool = BufferPool(pool_size(2, READS_IN_FLIGHT), chunk)
    got = []
    for index, buf, length in read_chunks(probe, chunk, pool, lambda n: None, plan, 16384, READS_IN_FLIGHT):
        got.append(index)
        if buf is not None:
            pool.release(buf)
    assert got == list(range(64))
    assert probe.peak == READS_IN_FLIGHT and not probe.waited_out
    pool.close()


def test_a_backup_that_stops_early_has_every_buffer_back_and_no_read_in_flight(tmp_path):
    """A consumer that fails (a full sink, an interrupt) ends the pipeline: the chunks still
    being read at once are waited for and their buffers returned before run_ordered raises,
    so the pool can be closed under no read."""
    chunk = 1 << 20
    path = tmp_path / "volume.raw"
    path.write_bytes(os.urandom(16 * chunk))
    pool = BufferPool(pool_size(2, READS_IN_FLIGHT), chunk)
    seen: list[int] = []

    def release(item):
        index, buf, length = item
        pool.release(buf)
        return index

    def consume(index: int) -> None:
        seen.append(index)
        if index == 2:
            raise OSError(28, "No space left on device")

    with BlockDevice(str(path)) as source:
        chunks = read_chunks(source, chunk, pool, lambda n: None, readers=READS_IN_FLIGHT)
        with pytest.raises(OSError, match="No space"):
            run_ordered(chunks, release, consume, workers=2)
        assert seen == [0, 1, 2]
        assert pool.available() == 2 * 2 + 2 + READS_IN_FLIGHT
    pool.close()


@pytest.mark.parametrize("readers", (1, READS_IN_FLIGHT))
def test_an_incremental_s_candidate_blocks_hold_what_is_used_and_zeros_whatever_the_buffer_held(tmp_path, readers):
    """An incremental reads only the used parts of its candidate blocks, and hashes those
    blocks whole: their unused parts must be zeros even in a reused buffer, or an unchanged
    block would look changed (or a changed one carry stale bytes)."""
    chunk, block = 1 << 20, 64 << 10
    path = tmp_path / "volume.raw"
    content = os.urandom(8 * chunk)
    path.write_bytes(content)
    rng = random.Random(9)
    ranges = sorted({(s, s + rng.choice((4096, 8192, 3 * block))) for s in
                     (rng.randrange(0, 8 * chunk - 3 * block) & ~4095 for _ in range(40))})
    plan = UsedMap.from_ranges(len(content), ranges)
    pool = BufferPool(2, chunk)
    for _ in range(2):                            # buffers full of something else
        buf = pool.acquire()
        buf.array[:] = 0xEE
        pool.release(buf)
    with BlockDevice(str(path)) as source:
        for index, buf, length in read_chunks(source, chunk, pool, lambda n: None, plan, block, readers):
            if buf is None:
                continue
            try:
                used = plan.ranges_in(index * chunk, chunk)
                touched = {b for s, e in used for b in range(s // block, (e - 1) // block + 1)}
                for b in touched:
                    expected = bytearray(block)
                    for s, e in plan.ranges_in(index * chunk + b * block, block):
                        expected[s:e] = content[index * chunk + b * block + s:index * chunk + b * block + e]
                    assert bytes(buf.view[b * block:(b + 1) * block]) == bytes(expected), (index, b)
            finally:
                pool.release(buf)


def test_an_unaligned_direct_read_falls_back_to_buffered_and_keeps_the_exclusive_claim(loops):
    device = loops.create(8 << 20)
    content = os.urandom(8 << 20)
    with open(device, "r+b") as f:
        f.write(content)
    notices: list[str] = []
    with BlockDevice(device, direct=True, exclusive=True, on_notice=notices.append) as dev:
        assert dev.direct
        buf = bytearray(10000)
        assert dev.read_into(memoryview(buf), 1000) == 10000          # O_DIRECT refuses this one
        assert bytes(buf) == content[1000:11000]
        assert not dev.direct and len(notices) == 1 and "buffered" in notices[0]
        with pytest.raises(OSError) as busy:                            # still claimed by this reader
            os.close(os.open(device, os.O_RDONLY | os.O_EXCL))
        assert busy.value.errno == errno.EBUSY
    os.close(os.open(device, os.O_RDONLY | os.O_EXCL))                 # and released when closed
