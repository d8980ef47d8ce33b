"""What the daemon's watches of a source report (devices.tracefs, devices.fanotify): every write
made to a device's range of its disk, however it is made, and nothing else; every write to a
loop device's backing file that did not pass the loop device, and none that did."""

from __future__ import annotations

import mmap
import os
import subprocess

import pytest

from devices import loop
from devices.fanotify import FileWriteWatch
from devices.tracefs import BIOS, REQUESTS, WriteTrace

from lab import MiB, partitioned_disk

BLOCK = 4096


def blocks(starts, ends) -> set[int]:
    return {b for s, e in zip(starts, ends) for b in range(int(s) // BLOCK, -(-int(e) // BLOCK))}


def write(path: str, offset: int, length: int, *, direct: bool) -> None:
    buf = mmap.mmap(-1, length)
    buf.write(os.urandom(length))
    fd = os.open(path, os.O_RDWR | (os.O_DIRECT if direct else 0))
    try:
        os.pwrite(fd, buf, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.fixture(params=[REQUESTS, BIOS])
def traced(bench, request):
    """A partition with another beside it, its trace recording (by requests, as on any disk with
    request queues, or by bios, as on a bio-based one): (disk, partition, neighbour, trace)."""
    disk, part, neighbour = partitioned_disk(bench, 8 * MiB, 4 * MiB)
    trace = WriteTrace("imager-test-write-trace", part, event=request.param)
    trace.create()
    bench.defer(trace.remove)
    trace.open()
    bench.defer(trace.close)
    return disk, part, neighbour, trace


def test_the_trace_of_a_partition_sees_every_write_to_its_range_and_nothing_else(traced):
    disk, part, neighbour, trace = traced
    assert WriteTrace("any", disk).event == REQUESTS, "a loop device has request queues"
    write(part, 8192, 4096, direct=True)
    write(part, 1 * MiB, 8192, direct=False)                 # through the page cache
    write(disk, 1 * MiB + 64 * 1024, 4096, direct=True)      # the disk's node: the partition starts at 1 MiB
    subprocess.run(["blkdiscard", "-o", str(2 * MiB), "-l", str(64 * 1024), part], check=True)
    subprocess.run(["blkdiscard", "-z", "-o", str(3 * MiB), "-l", str(64 * 1024), part], check=True)
    write(neighbour, 0, 4096, direct=True)                   # another partition
    write(disk, 0, 4096, direct=True)                        # the partition table
    subprocess.run(["dd", f"if={part}", "of=/dev/null", "bs=1M", "iflag=direct"], check=True, capture_output=True)
    expected = blocks([8192, 1 * MiB, 64 * 1024, 2 * MiB, 3 * MiB],
                      [12288, 1 * MiB + 8192, 68 * 1024, 2 * MiB + 65536, 3 * MiB + 65536])
    assert blocks(*trace.writes()) == expected
    assert trace.problem() == ""
    assert blocks(*trace.writes()) == set()                  # read once


def test_a_trace_switched_off_or_refiltered_says_so(traced):
    _, _, _, trace = traced
    with open(os.path.join(trace.directory, "tracing_on"), "w") as f:
        f.write("0")
    assert "switched off" in trace.problem()
    with open(os.path.join(trace.directory, "tracing_on"), "w") as f:
        f.write("1")
    with open(os.path.join(trace.directory, "events", "block", trace.event, "filter"), "w") as f:
        f.write("dev == 1")
    assert "changed" in trace.problem()


def test_a_trace_whose_buffer_overflowed_says_so_once(traced):
    _, part, _, trace = traced
    with open(os.path.join(trace.directory, "buffer_size_kb"), "w") as f:
        f.write("4")                        # a page a CPU
    buf = mmap.mmap(-1, 4096)
    fd = os.open(part, os.O_RDWR | os.O_DIRECT)
    try:
        for n in range(2000):
            os.pwrite(fd, buf, (n % 1024) * 4096)
    finally:
        os.close(fd)
    assert "events (its buffer was full)" in trace.problem()
    trace.writes()
    assert trace.problem() == "", "a loss is said once: the next interval is whole again"


def test_a_trace_has_one_reader(traced):
    _, part, _, trace = traced
    second = WriteTrace(trace.name, part)
    with pytest.raises(OSError, match="another process reads it"):
        second.open()


def test_the_watch_of_a_loop_devices_file_sees_writes_to_the_file_and_none_through_the_device(bench):
    image = bench.tmp / "watched.img"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    device = bench.loop_on(image, read_only=False)
    assert loop.served_file(os.stat(device).st_rdev) == str(image)
    watch = FileWriteWatch.create(str(image))
    bench.defer(watch.close)
    write(device, 0, 65536, direct=True)
    write(device, MiB, 4096, direct=False)
    subprocess.run(["blkdiscard", "-o", "0", "-l", "65536", device], check=True)
    assert watch.events() == ([], False)
    writer = subprocess.Popen(["dd", f"of={image}", "bs=4096", "seek=10", "count=1", "conv=notrunc"],
                              stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
    writer.communicate(b"x" * 4096)
    pids, lost = watch.events()
    assert writer.pid in pids and not lost
