"""Tape drive conformance, after Bacula's `btape test`, plus the mtio ABI checked against C.

The conformance checks take a `medium` and run over every TapeDrive available: always the
VirtualTape, and a real drive through StTape when IMAGER_TEST_TAPE names its non-rewinding node
(its cartridge is overwritten). Each check asserts the data read back and the st status bits.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies

from devices.tape import StTape, TapeError, VirtualTape, mtio
from devices.tape import lto
from devices.tape.drive import BlockLimits, Compression, CompressionNotSwitchable

REAL_TAPE = os.environ.get("IMAGER_TEST_TAPE")
BIG = 1 << 20


def payload(file_number: int, index: int, size: int | None = None) -> bytes:
    """Distinct, reproducible block contents; random sizes include odd ones (SIMH pads those)."""
    rng = random.Random(file_number * 100_003 + index)
    return rng.randbytes(size if size is not None else rng.randrange(1, 9000))


def expect(drive, file_number: int, block_number: int, *flags: str, block_size: int = 0) -> None:
    """The status is exactly this: position, block size, and only `flags` among the bits."""
    status = drive.status()
    assert (status.file_number, status.block_number) == (file_number, block_number), status
    assert status.block_size == block_size, status
    assert status.online, status
    for flag in ("bot", "eof", "eot", "eod", "write_protected"):
        assert getattr(status, flag) == (flag in flags), (flag, status)


def fails(errno_value: int, operation, *args, **kwargs) -> TapeError:
    with pytest.raises(TapeError) as caught:
        operation(*args, **kwargs)
    assert caught.value.errno == errno_value, caught.value
    assert "\n" not in str(caught.value)
    return caught.value


class VirtualMedium:
    name = "virtual"

    def __init__(self, directory):
        self.path = directory / "tape.tap"
        self.drives = []

    def open(self, **options):
        drive = VirtualTape(self.path, **options)
        self.drives.append(drive)
        return drive

    def limited(self, capacity: int, early_warning: int):
        return self.open(capacity=capacity, early_warning=early_warning)

    def to_fill(self, block_size: int):
        """A cartridge small enough to write to its physical end: 40 blocks, the last 8 in
        the early-warning zone."""
        record = block_size + 8
        return self.limited(40 * record + 100, 8 * record)

    def write_protected(self):
        return self.open(write_protected=True)

    def close_all(self) -> None:
        for drive in self.drives:
            drive.close()


class RealMedium:
    """A real drive. Every open starts at BOT in variable block mode, as a VirtualTape does
    (st keeps the position and the block size of the last user of the drive)."""

    name = "st"

    def __init__(self, device: str):
        self.device = device
        self.drives = []
        self.undo = []

    def open(self):
        """At BOT in variable block mode; the first open of a test erases the cartridge, which
        is then blank as a new VirtualTape's file."""
        drive = StTape(self.device)
        first = not self.drives
        self.drives.append(drive)
        drive.rewind()
        drive.set_block_size(0)
        if first:
            drive.erase()
        return drive

    def limited(self, capacity: int, early_warning: int):
        pytest.skip("a real cartridge's capacity is what it is")

    def to_fill(self, block_size: int):
        if os.environ.get("IMAGER_TEST_TAPE_FILL") != "1":
            pytest.skip("writing a real cartridge to its end takes hours; IMAGER_TEST_TAPE_FILL=1 "
                        "says the cartridge is a small emulated one (make test-st)")
        return self.open()

    def write_protected(self):
        # The VM rig (../shared/vm-tape) write-protects its drive with vmtape-ctl; st sees it
        # at the next open.
        control = shutil.which("vmtape-ctl")
        if control is None:
            pytest.skip("needs a write-protected cartridge")
        subprocess.run([control, "wp", "on"], check=True, capture_output=True)
        self.undo.append(lambda: subprocess.run([control, "wp", "off"], check=True, capture_output=True))
        drive = StTape(self.device)
        self.drives.append(drive)
        drive.rewind()
        drive.set_block_size(0)
        return drive

    def close_all(self) -> None:
        for drive in self.drives:
            drive.close()
        for undo in self.undo:
            undo()


@pytest.fixture(params=["virtual"] + (["st"] if REAL_TAPE else []))
def medium(request, tmp_path):
    media = VirtualMedium(tmp_path) if request.param == "virtual" else RealMedium(REAL_TAPE)
    try:
        yield media
    finally:
        media.close_all()


def write_file(drive, file_number: int, count: int, sizes=None) -> list[bytes]:
    blocks = [payload(file_number, i, sizes[i] if sizes else None) for i in range(count)]
    for block in blocks:
        assert drive.write_block(block) == len(block)
    drive.write_filemarks(1)
    return blocks


def write_stream(drive, chunks, block_size: int) -> int:
    """Write a byte stream to `drive` as blocks of `block_size` bytes; the last block may be shorter.

    Chunk boundaries do not matter: whole blocks inside a chunk are written from the
    caller's memory without a copy. Returns the bytes written. Variable block mode only: it
    shows that a drive takes a stream cut at any chunk boundary (TapeSink, which spans
    cartridges at ENOSPC, cuts its own stream).
    """
    if block_size <= 0:
        raise ValueError(f"block size must be positive, not {block_size}")
    pending = bytearray()
    total = 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        if pending:
            take = min(block_size - len(pending), len(view))
            pending += view[:take]
            view = view[take:]
            if len(pending) < block_size:
                continue
            total += drive.write_block(pending)
            pending = bytearray()
        whole = len(view) - len(view) % block_size
        for start in range(0, whole, block_size):
            total += drive.write_block(view[start:start + block_size])
        pending += view[whole:]
    if pending:
        total += drive.write_block(pending)
    return total


# Conformance (btape "test" and friends).

def test_write_two_files_and_read_them_back(medium):
    drive = medium.open()
    expect(drive, 0, 0, "bot")
    first = [payload(0, i) for i in range(20)]
    for i, block in enumerate(first):
        assert drive.write_block(block) == len(block)
        expect(drive, 0, i + 1)
    drive.write_filemarks(1)
    expect(drive, 1, 0, "eof")
    second = write_file(drive, 1, 20)
    expect(drive, 2, 0, "eof")

    drive.rewind()
    expect(drive, 0, 0, "bot")
    for file_number, blocks in enumerate([first, second]):
        for i, block in enumerate(blocks):
            assert drive.read_block(BIG) == block
            expect(drive, file_number, i + 1)
        assert drive.read_block(BIG) == b""
        expect(drive, file_number + 1, 0, "eof")
    # End of data: a second 0-byte read right after the filemark, then EIO.
    assert drive.read_block(BIG) == b""
    expect(drive, 2, -1, "eod")
    fails(errno.EIO, drive.read_block, BIG)
    expect(drive, 2, -1, "eod")


def test_position_to_file_and_block(medium):
    drive = medium.open()
    files = []
    positions = {}
    for file_number in range(3):
        blocks = []
        for i in range(12):
            positions[file_number, i] = drive.tell()
            blocks.append(payload(file_number, i))
            drive.write_block(blocks[-1])
        drive.write_filemarks(1)
        files.append(blocks)

    for file_number, block_number in [(1, 0), (0, 5), (2, 3), (1, 7), (0, 0), (2, 11), (1, 11)]:
        drive.skip_to_file(file_number)
        expect(drive, file_number, 0, "bot" if file_number == 0 else "eof")
        drive.forward_space_records(block_number)
        expect(drive, file_number, block_number,
               *(["bot" if file_number == 0 else "eof"] if block_number == 0 else []))
        assert drive.read_block(BIG) == files[file_number][block_number]
        expect(drive, file_number, block_number + 1)

    for (file_number, block_number), position in sorted(positions.items(), reverse=True):
        drive.seek(position)
        # st does not know file and block numbers after a seek (st.rst: MTSEEK).
        if position == 0:
            expect(drive, 0, 0, "bot")
        else:
            expect(drive, -1, -1)
        assert drive.read_block(BIG) == files[file_number][block_number]
        assert drive.tell() == position + 1


def test_append_after_close_and_reopen(medium):
    drive = medium.open()
    first = [payload(0, i) for i in range(5)]
    for block in first:
        drive.write_block(block)
    drive.close()  # writes the filemark that ends file 0

    drive = medium.open()
    expect(drive, 0, 0, "bot")
    drive.seek_end_of_data()
    expect(drive, 1, -1, "eod")
    second = [payload(1, i) for i in range(7)]
    for block in second:
        drive.write_block(block)
    expect(drive, 1, -1)
    drive.close()

    drive = medium.open()
    drive.seek_end_of_data()
    expect(drive, 2, -1, "eod")
    drive.rewind()
    assert list(drive.read_file(BIG)) == first
    expect(drive, 1, 0, "eof")
    assert list(drive.read_file(BIG)) == second
    expect(drive, 2, 0, "eof")
    assert drive.read_block(BIG) == b""
    expect(drive, 2, -1, "eod")


def test_reread_last_block_after_backward_space_records(medium):
    drive = medium.open()
    blocks = [payload(0, i) for i in range(6)]
    for block in blocks:
        drive.write_block(block)
    drive.backward_space_records(1)
    expect(drive, 0, 5)
    assert drive.read_block(BIG) == blocks[5]
    expect(drive, 0, 6)
    drive.backward_space_records(3)
    expect(drive, 0, 3)
    assert drive.read_block(BIG) == blocks[3]
    expect(drive, 0, 4)
    # Past the last block there is no filemark yet: st answers EIO at once.
    drive.forward_space_records(2)
    fails(errno.EIO, drive.read_block, BIG)
    expect(drive, 0, -1)
    drive.rewind()
    fails(errno.EIO, drive.backward_space_records, 1)
    expect(drive, 0, 0, "bot")


def test_forward_and_backward_space_files_count(medium):
    drive = medium.open()
    counts = [3, 0, 4, 1, 2]  # file 1 is empty: two filemarks in a row
    files = [write_file(drive, n, count) for n, count in enumerate(counts)]
    expect(drive, 5, 0, "eof")

    drive.rewind()
    drive.forward_space_files(1)
    expect(drive, 1, 0, "eof")
    assert drive.read_block(BIG) == b""  # file 1 is empty
    expect(drive, 2, 0, "eof")
    drive.rewind()
    drive.forward_space_files(2)
    expect(drive, 2, 0, "eof")
    assert drive.read_block(BIG) == files[2][0]
    drive.forward_space_files(2)
    expect(drive, 4, 0, "eof")
    assert drive.read_block(BIG) == files[4][0]
    expect(drive, 4, 1)

    error = fails(errno.EIO, drive.forward_space_files, 3)
    assert "1 of 3 filemarks" in str(error)
    expect(drive, 5, -1, "eod")

    drive.backward_space_files(1)  # before the filemark that ends file 4
    expect(drive, 4, -1)
    assert drive.read_block(BIG) == b""
    expect(drive, 5, 0, "eof")
    drive.backward_space_files(3)  # before the filemark that ends file 2
    expect(drive, 2, -1)
    drive.forward_space_files(1)
    assert drive.read_block(BIG) == files[3][0]
    fails(errno.EIO, drive.backward_space_files, 9)
    expect(drive, 0, 0, "bot")

    error = fails(errno.EIO, drive.forward_space_records, 5)  # stops after file 0's filemark
    assert "filemark after 3 of 5 blocks" in str(error)
    expect(drive, 1, 0, "eof")
    drive.forward_space_files(1)
    drive.forward_space_records(1)
    error = fails(errno.EIO, drive.backward_space_records, 2)  # stops before the filemark ending file 1
    assert "filemark after 1 of 2 blocks" in str(error)
    expect(drive, 1, -1)
    assert drive.read_block(BIG) == b""
    expect(drive, 2, 0, "eof")


def test_fixed_block_mode(medium):
    drive = medium.open()
    drive.set_block_size(512)
    expect(drive, 0, 0, "bot", block_size=512)
    data = payload(0, 0, 512 * 11)
    assert drive.write_block(data[:4096]) == 4096
    expect(drive, 0, 8, block_size=512)
    fails(errno.EINVAL, drive.write_block, payload(0, 1, 1000))
    expect(drive, 0, 8, block_size=512)
    assert drive.write_block(data[4096:]) == 512 * 3
    drive.write_filemarks(1)
    drive.set_block_size(0)
    odd = payload(1, 0, 700)
    drive.write_block(odd)
    drive.write_filemarks(1)

    drive.rewind()
    drive.set_block_size(512)
    assert drive.read_block(1024) == data[:1024]
    expect(drive, 0, 2, block_size=512)
    # st.rst: in fixed block mode a read need not be a multiple of the block size; what is
    # left of the last block read is kept for the next read...
    assert drive.read_block(1000) == data[1024:2024]
    assert drive.read_block(100) == data[2024:2124]
    buffer = bytearray(30)
    assert drive.read_block_into(buffer) == 30 and buffer == data[2124:2154]
    # ...until any other call (the status here) drops it: that block counts as read.
    expect(drive, 0, 5, block_size=512)
    # A read asking for more blocks than the file holds stops at the filemark...
    assert drive.read_block(512 * 20) == data[2560:]
    expect(drive, 0, 11, block_size=512)
    # ...which the next read returns.
    assert drive.read_block(512) == b""
    expect(drive, 1, 0, "eof", block_size=512)
    fails(errno.EIO, drive.read_block, 512)  # a 700-byte block in 512-byte mode
    status = drive.status()
    # The tape has not moved. (st knows the block number, 0, where the drive reports an
    # incorrect length, as SSC drives do; the rig's emulated drive answers MEDIUM ERROR, after
    # which st no longer knows it.)
    assert (status.file_number, status.block_number in (0, -1), status.block_size) == (1, True, 512)
    drive.set_block_size(0)
    assert drive.read_block(BIG) == odd
    expect(drive, 1, -1 if status.block_number < 0 else 1)


def test_fixed_block_mode_end_of_data(medium):
    """In fixed block mode st asks the drive for all the blocks a read needs (after a read that
    was not a multiple of the block size, a 32 KiB buffer of them): when the end of data comes
    among them, before a filemark, st returns none of them."""
    drive = medium.open()
    drive.set_block_size(512)
    data = payload(0, 0, 512 * 3)
    drive.write_block(data)
    drive.backward_space_records(3)  # cancels the filemark at close: the data ends unterminated
    expect(drive, 0, 0, "bot", block_size=512)
    fails(errno.EIO, drive.read_block, 512 * 4)
    expect(drive, 0, -1, block_size=512)
    drive.rewind()
    assert drive.read_block(512 * 3) == data  # all there: exactly the blocks asked for
    fails(errno.EIO, drive.read_block, 512)
    drive.rewind()
    fails(errno.EIO, drive.read_block, 100)  # not a multiple: st reads a 32 KiB buffer ahead...
    drive.rewind()
    fails(errno.EIO, drive.read_block, 512 * 3)  # ...and goes on doing so until it is closed
    # After a filemark, the end of data among the blocks asked for is a second 0-byte read.
    drive.rewind()
    drive.write_filemarks(1)
    drive.write_block(data)
    drive.backward_space_records(3)
    drive.backward_space_files(1)
    assert drive.read_block(512) == b""
    expect(drive, 1, 0, "eof", block_size=512)
    assert drive.read_block(512 * 4) == b""
    expect(drive, 1, -1, "eod", block_size=512)
    fails(errno.EIO, drive.read_block, 512)


def test_read_buffer_smaller_than_the_block(medium):
    drive = medium.open()
    first, second = payload(0, 0, 1000), payload(0, 1, 3000)
    drive.write_block(first)
    drive.write_block(second)
    drive.rewind()
    fails(errno.ENOMEM, drive.read_block, 999)
    # As on a real drive, the tape is now after that block, and the block number says so.
    expect(drive, 0, 1)
    drive.backward_space_records(1)
    expect(drive, 0, 0, "bot")
    assert drive.read_block(1000) == first
    fails(errno.ENOMEM, drive.read_block_into, bytearray(2999))
    drive.backward_space_records(1)
    buffer = bytearray(4000)
    assert drive.read_block_into(buffer) == 3000
    assert buffer[:3000] == second
    expect(drive, 0, 2)


def test_write_in_the_middle_truncates(medium):
    drive = medium.open()
    first = write_file(drive, 0, 3)
    write_file(drive, 1, 2)
    drive.rewind()
    drive.forward_space_records(1)
    replacement = payload(9, 9)
    drive.write_block(replacement)
    expect(drive, 0, 2)
    drive.close()

    drive = medium.open()
    assert list(drive.read_file(BIG)) == [first[0], replacement]
    expect(drive, 1, 0, "eof")
    assert drive.read_block(BIG) == b""
    expect(drive, 1, -1, "eod")
    fails(errno.EIO, drive.read_block, BIG)

    # A filemark written in the middle ends the data there too.
    drive.rewind()
    drive.forward_space_records(1)
    drive.write_filemarks(1)
    expect(drive, 1, 0, "eof")
    drive.seek_end_of_data()
    expect(drive, 1, -1, "eod")
    drive.rewind()
    assert list(drive.read_file(BIG)) == [first[0]]


def test_filemark_written_for_data_left_unterminated(medium):
    drive = medium.open()
    block = payload(0, 0)
    drive.write_block(block)
    drive.rewind()  # st writes a filemark before rewinding after a write
    drive.seek_end_of_data()
    expect(drive, 1, -1, "eod")

    drive.write_block(block)
    drive.write_block(block)
    drive.backward_space_files(1)  # a filemark first, spaced over as well
    expect(drive, 0, -1)
    assert drive.read_block(BIG) == b""
    expect(drive, 1, 0, "eof")
    assert list(drive.read_file(BIG)) == [block, block]
    expect(drive, 2, 0, "eof")

    drive.write_block(block)
    drive.backward_space_records(1)  # any other operation cancels the filemark at close
    drive.close()
    drive = medium.open()
    drive.seek_end_of_data()
    expect(drive, 2, -1, "eod")


def test_early_warning_then_end_of_medium(medium):
    size = 1000  # one block is 1008 bytes of .tap file
    capacity = 30 * 1008 + 4  # 30 blocks and one filemark fit
    drive = medium.limited(capacity, early_warning=capacity - (20 * 1008 + 500))
    results = []
    written = 0
    refused_in_a_row = 0
    while refused_in_a_row < 4:
        position = drive.tell()
        try:
            assert drive.write_block(payload(0, written, size)) == size
        except TapeError as e:
            assert e.errno == errno.ENOSPC, e
            assert drive.tell() == position
            results.append("ENOSPC")
            refused_in_a_row += 1
        else:
            written += 1
            results.append("ok")
            refused_in_a_row = 0
        status = drive.status()
        results[-1] += "+eot" * status.eot + "+eod" * status.eod
        assert status.block_number == written
    # st.rst: the write reaching the early warning succeeds; then ENOSPC and success
    # alternate; at the physical end every write fails.
    assert results == (["ok"] * 20 + ["ok+eot"] + ["ENOSPC+eod", "ok+eot"] * 9
                       + ["ENOSPC+eod", "ENOSPC+eot"] * 2)
    drive.write_filemarks(1)
    expect(drive, 1, 0, "eof")
    fails(errno.EIO, drive.write_filemarks, 1)
    drive.rewind()
    assert list(drive.read_file(BIG)) == [payload(0, i, size) for i in range(30)]
    assert drive.read_block(BIG) == b""
    expect(drive, 1, -1, "eod")


@pytest.mark.parametrize("block_size", [256 << 10, 8 << 20])
def test_writing_to_the_end_of_the_cartridge(medium, block_size):
    """Whatever the cartridge, as st.rst says: the write that reaches the early warning succeeds
    (eot), then writes are refused (ENOSPC, eod) and allowed in turn, until at the physical end
    every write fails. 8 MiB blocks are larger than st maps for a direct transfer: st writes
    them asynchronously, and StTape still reports the early warning at the right write."""
    drive = medium.to_fill(block_size)
    results, written, refused = [], 0, 0
    block = bytearray(block_size)
    while refused < 4:
        block[:8] = written.to_bytes(8, "little")
        try:
            assert drive.write_block(block) == block_size
        except TapeError as e:
            assert e.errno == errno.ENOSPC, e
            refused += 1
            results.append("ENOSPC")
        else:
            written += 1
            refused = 0
            results.append("ok")
        status = drive.status()
        results[-1] += "+eot" * status.eot + "+eod" * status.eod
    pattern = " ".join(results)
    # (The first write may already reach the warning: 8 MiB blocks on a cartridge whose early
    # warning lies 8 MiB from its start, as in make test-st.)
    assert re.fullmatch(r"(ok )*ok\+eot (ENOSPC\+eod ok\+eot )*(ENOSPC\+eod ENOSPC\+eot ?){2}", pattern), pattern
    if block_size <= 1 << 20:
        assert "ENOSPC+eod ok+eot" in pattern  # the zone takes more blocks after the warning
    drive.write_filemarks(1)
    drive.rewind()
    for n in range(written):
        got = drive.read_block(block_size)
        assert len(got) == block_size and int.from_bytes(got[:8], "little") == n
    assert drive.read_block(block_size) == b""
    expect(drive, 1, 0, "eof")


def test_write_protection(medium):
    drive = medium.open()
    blocks = [payload(0, i) for i in range(3)]
    for block in blocks:
        drive.write_block(block)
    drive.close()

    drive = medium.write_protected()
    expect(drive, 0, 0, "bot", "write_protected")
    error = fails(errno.EACCES, drive.write_block, b"new data")
    assert "write-protected" in str(error)
    fails(errno.EACCES, drive.write_filemarks, 1)
    assert list(drive.read_file(BIG)) == blocks
    expect(drive, 1, 0, "eof", "write_protected")


def test_unload_and_load(medium):
    drive = medium.open()
    block = payload(0, 0)
    drive.write_block(block)
    drive.unload()  # writes the filemark first
    status = drive.status()
    assert not status.online and status.gstat & mtio.GMT_DR_OPEN
    # st goes on reporting where the tape was when it went off line (after that filemark).
    assert (status.file_number, status.block_number, status.eof, status.bot) == (1, 0, True, False)
    fails(errno.ENOMEDIUM, drive.read_block, BIG)
    fails(errno.ENOMEDIUM, drive.write_block, block)
    fails(errno.ENOMEDIUM, drive.rewind)
    # What st asks the drive itself (READ POSITION, LOCATE) fails with EIO without a tape.
    fails(errno.EIO, drive.tell)
    fails(errno.EIO, drive.seek, 0)
    drive.load()
    expect(drive, 0, 0, "bot")
    assert list(drive.read_file(BIG)) == [block]
    expect(drive, 1, 0, "eof")


def test_drive_settings_survive_a_cartridge_change(medium):
    """The block size is the drive's: st and the drive keep it when a cartridge is unloaded and
    another loaded (so a program sets it after loading, and after opening: the last user of
    /dev/nstN may have left it in fixed block mode)."""
    drive = medium.open()
    drive.set_block_size(512)
    drive.unload()
    drive.load()
    expect(drive, 0, 0, "bot", block_size=512)
    drive.set_block_size(0)


def test_reading_the_position_at_the_beginning_makes_it_known(medium):
    drive = medium.open()
    fails(errno.EIO, drive.read_block, BIG)  # a blank tape: nothing recorded
    expect(drive, 0, -1)
    # MTIOCPOS asks the drive (READ POSITION), which says "beginning of tape": st knows the
    # file and block numbers from then on.
    assert drive.tell() == 0
    expect(drive, 0, 0, "bot")
    drive.seek_end_of_data()
    expect(drive, 0, -1, "eod")
    assert drive.tell() == 0
    expect(drive, 0, 0, "bot", "eod")


def test_block_limits(medium):
    drive = medium.open()
    limits = drive.block_limits()
    assert 1 <= limits.minimum <= limits.maximum <= mtio.MT_ST_BLKSIZE_MASK
    largest = payload(0, 0, limits.maximum)
    # st refuses a block (or a read buffer) outside the limits before the tape moves.
    fails(errno.EINVAL, drive.write_block, largest + b"x")
    expect(drive, 0, 0, "bot")
    assert drive.write_block(largest) == limits.maximum
    drive.write_filemarks(1)
    drive.rewind()
    fails(errno.EINVAL, drive.read_block, limits.maximum + 1)
    assert drive.read_block(limits.maximum) == largest
    fails(errno.EINVAL, drive.set_block_size, limits.maximum + 1)
    expect(drive, 0, 1)


def test_compression_switch(medium):
    drive = medium.open()
    state = drive.compression()
    if state is None or not state.capable:
        pytest.skip("the drive has no switchable compression")
    drive.set_compression(False)
    assert drive.compression() == Compression(capable=True, enabled=False)
    drive.set_compression(True)
    assert drive.compression() == Compression(capable=True, enabled=True)
    expect(drive, 0, 0, "bot")


def test_stream_cut_into_blocks(medium):
    drive = medium.open()
    stream = payload(0, 0, 100_000)
    chunks = [stream[:1], stream[1:5000], stream[5000:70000], memoryview(stream)[70000:]]
    assert write_stream(drive, chunks, 4096) == len(stream)
    drive.write_filemarks(1)
    drive.rewind()
    blocks = list(drive.read_file(BIG))
    assert [len(b) for b in blocks] == [4096] * 24 + [100_000 - 24 * 4096]
    assert b"".join(blocks) == stream
    expect(drive, 1, 0, "eof")


# The SIMH .tap format, read and written independently of VirtualTape.

def read_simh(path, *, raw: bool = False) -> list:
    """A minimal SIMH magtape reader: blocks as bytes, filemarks as None. Unless `raw`, the
    second tape mark of a double tape mark just before the end-of-medium marker is left out:
    by convention it ends the data, it is not a file."""
    data = path.read_bytes()
    objects: list = []
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if length == 0xFFFFFFFF:
            if not raw and offset == len(data) and objects[-2:] == [None, None]:
                objects.pop()
            break
        if length == 0:
            objects.append(None)
            continue
        block = data[offset:offset + length]
        offset += length
        if length % 2:
            assert data[offset] == 0, "pad byte"
            offset += 1
        assert struct.unpack_from("<I", data, offset) == (length,), "trailing length"
        offset += 4
        objects.append(block)
    assert offset == len(data)
    return objects


def write_simh(path, objects) -> None:
    with open(path, "wb") as f:
        for block in objects:
            if block is None:
                f.write(struct.pack("<I", 0))
            else:
                length = struct.pack("<I", len(block))
                f.write(length + block + b"\0" * (len(block) % 2) + length)
        f.write(struct.pack("<I", 0xFFFFFFFF))


def test_tap_file_matches_the_simh_format(tmp_path):
    path = tmp_path / "simh.tap"
    variable = [payload(0, i, size) for i, size in enumerate([1, 2, 3, 1000, 1001, 65536])]
    fixed = payload(1, 0, 3 * 800)
    with VirtualTape(path) as drive:
        for block in variable:
            drive.write_block(block)
        drive.write_filemarks(2)
        drive.set_block_size(800)
        drive.write_block(fixed)
    # st's closing filemark, then the double tape mark and the end-of-medium marker of SIMH.
    assert read_simh(path, raw=True) == variable + [None, None] + [fixed[:800], fixed[800:1600], fixed[1600:],
                                                                   None, None]
    expected_size = sum(8 + len(b) + len(b) % 2 for b in variable) + 4 * 3 + 3 * 808 + 4 + 4
    assert path.stat().st_size == expected_size
    assert path.read_bytes()[-8:] == b"\0\0\0\0\xff\xff\xff\xff"
    with VirtualTape(path, create=False) as drive:      # the second tape mark is not a file
        drive.seek_end_of_data()
        assert drive.status().file_number == 3
        drive.write_block(variable[0])                  # appending replaces the end mark
    assert read_simh(path, raw=True) == (variable + [None, None] + [fixed[:800], fixed[800:1600], fixed[1600:],
                                                                    None] + [variable[0], None, None])


def test_reads_a_tap_file_written_elsewhere(tmp_path):
    path = tmp_path / "foreign.tap"
    blocks = [payload(2, i) for i in range(4)]
    write_simh(path, blocks[:3] + [None] + blocks[3:] + [None])
    with VirtualTape(path, create=False) as drive:
        assert list(drive.read_file(BIG)) == blocks[:3]
        assert list(drive.read_file(BIG)) == blocks[3:]
        assert drive.read_block(BIG) == b""  # the end-of-medium marker ends the data
        expect(drive, 2, -1, "eod")
        drive.seek_end_of_data()
        drive.write_block(blocks[0])  # appending replaces the end-of-medium marker
    assert read_simh(path) == blocks[:3] + [None] + blocks[3:] + [None, blocks[0], None]
    # A single tape mark before the marker (as this file had) is a filemark of the data.
    with VirtualTape(path, create=False) as drive:
        drive.seek_end_of_data()
        assert drive.status().file_number == 3


OPERATIONS_ON_TAPE = strategies.lists(strategies.one_of(
    strategies.integers(min_value=1, max_value=3000),  # write a block of that size
    strategies.sampled_from(["filemark", "rewind", "back", "forward"]),
), max_size=40)


@settings(max_examples=150, deadline=None)
@given(OPERATIONS_ON_TAPE)
def test_tap_file_always_holds_what_was_written(operations):
    """Whatever mix of writes, filemarks and moves, the file holds the tape as st would leave it."""
    objects: list = []  # the model: blocks as bytes, filemarks as None
    position = 0
    writing = False
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "model.tap"
        with VirtualTape(path) as drive:
            for n, operation in enumerate(operations):
                if isinstance(operation, int):
                    block = payload(n, 0, operation)
                    drive.write_block(block)
                    objects[position:] = [block]
                    position, writing = position + 1, True
                    continue
                ends_on_filemark = operation == "filemark" or (operation == "rewind" and writing)
                if ends_on_filemark:
                    objects[position:] = [None]
                    position += 1
                writing = False
                if operation == "filemark":
                    drive.write_filemarks(1)
                elif operation == "rewind":
                    drive.rewind()
                    position = 0
                elif operation == "back":
                    stopped = position == 0 or objects[position - 1] is None
                    if stopped:
                        fails(errno.EIO, drive.backward_space_records, 1)
                    else:
                        drive.backward_space_records(1)
                    position = max(position - 1, 0)
                else:
                    stopped = position == len(objects) or objects[position] is None
                    if stopped:
                        fails(errno.EIO, drive.forward_space_records, 1)
                    else:
                        drive.forward_space_records(1)
                    position = min(position + 1, len(objects))
                assert drive.tell() == position
        if writing:
            objects[position:] = [None]
        # Once written, the data ends with a double tape mark (when it ends with a filemark).
        assert read_simh(path) == objects


def test_refuses_a_file_that_is_not_a_tap_image(tmp_path):
    path = tmp_path / "not.tap"
    path.write_bytes(b"\x10\x00\x00\x00short")
    with VirtualTape(path) as drive:
        error = fails(errno.EIO, drive.read_block, BIG)
    assert "not a valid SIMH tape image at byte 0" in str(error)
    fails(errno.ENOENT, VirtualTape, tmp_path / "missing.tap", create=False)


def test_one_drive_per_tape_file(tmp_path):
    with VirtualTape(tmp_path / "busy.tap"):
        fails(errno.EBUSY, VirtualTape, tmp_path / "busy.tap")


def test_virtual_drive_facts_are_configured(tmp_path):
    """The facts StTape asks the drive for (READ BLOCK LIMITS, the compression page, the density
    code) are a VirtualTape's configuration, answered the same way."""
    limits = BlockLimits(minimum=4, maximum=1 << 20)
    with VirtualTape(tmp_path / "t.tap", block_limits=limits, compression_capable=False, density=0x60) as drive:
        assert drive.block_limits() == limits
        fails(errno.EINVAL, drive.write_block, b"abc")
        fails(errno.EINVAL, drive.read_block, (1 << 20) + 1)
        fails(errno.EINVAL, drive.set_block_size, 2)
        assert drive.compression() == Compression(capable=False, enabled=False)
        error = fails(errno.EIO, drive.set_compression, False)
        assert isinstance(error, CompressionNotSwitchable) and "cannot switch" in str(error)
        status = drive.status()
        assert status.density == 0x60
        assert lto.generation(status.density).name == "LTO-9"
        assert lto.generation(status.density).streaming_rate == 177.0
        expect(drive, 0, 0, "bot")


def test_lto_generations():
    codes = [g.density_code for g in lto.GENERATIONS]
    assert len(codes) == len(set(codes))
    assert lto.generation(0) is None  # the default density, as emulated drives report
    for g in lto.GENERATIONS:
        assert g.streaming_rate <= g.native_rate
        assert lto.generation(g.density_code) is g
    assert lto.generation(0x5A).streaming_rate == 160.0  # no vendor table: the native rate


# The mtio ABI and StTape's ioctls, checked against the C compiler's view of <linux/mtio.h>.

OPERATIONS = ["MTRESET", "MTFSF", "MTBSF", "MTFSR", "MTBSR", "MTWEOF", "MTREW", "MTOFFL", "MTNOP",
              "MTRETEN", "MTBSFM", "MTFSFM", "MTEOM", "MTERASE", "MTRAS1", "MTRAS2", "MTRAS3",
              "MTSETBLK", "MTSETDENSITY", "MTSEEK", "MTTELL", "MTSETDRVBUFFER", "MTFSS", "MTBSS",
              "MTWSM", "MTLOCK", "MTUNLOCK", "MTLOAD", "MTUNLOAD", "MTCOMPRESSION", "MTSETPART",
              "MTMKPART", "MTWEOFI"]
STATUS_BITS = ["GMT_EOF", "GMT_BOT", "GMT_EOT", "GMT_SM", "GMT_EOD", "GMT_WR_PROT", "GMT_ONLINE",
               "GMT_D_6250", "GMT_D_1600", "GMT_D_800", "GMT_DR_OPEN", "GMT_IM_REP_EN", "GMT_CLN"]
DSREG_FIELDS = ["MT_ST_BLKSIZE_SHIFT", "MT_ST_BLKSIZE_MASK", "MT_ST_DENSITY_SHIFT", "MT_ST_DENSITY_MASK"]
REQUESTS = ["MTIOCTOP", "MTIOCGET", "MTIOCPOS"]
STRUCTS = {
    "mtop": ["mt_op", "mt_count"],
    "mtget": ["mt_type", "mt_resid", "mt_dsreg", "mt_gstat", "mt_erreg", "mt_fileno", "mt_blkno"],
    "mtpos": ["mt_blkno"],
}
# (what StTape is asked, the mtop C fills for it)
ST_COMMANDS = [
    ("rewind", "MTREW", 1),
    ("fsf3", "MTFSF", 3),
    ("weof1", "MTWEOF", 1),
    ("setblk", "MTSETBLK", 262144),
    ("compression_off", "MTCOMPRESSION", 0),
    ("eom", "MTEOM", 1),
]


def c_program() -> str:
    lines = [
        "#include <stdio.h>", "#include <stddef.h>", "#include <string.h>",
        "#include <sys/ioctl.h>", "#include <linux/mtio.h>",
        "static void hex(const char *key, const void *p, size_t n) {",
        "  printf(\"%s \", key);",
        "  for (size_t i = 0; i < n; i++) printf(\"%02x\", ((const unsigned char *)p)[i]);",
        "  printf(\"\\n\");", "}",
        "int main(void) {",
    ]
    for name in REQUESTS + DSREG_FIELDS:
        lines.append(f'  printf("{name} %lu\\n", (unsigned long)({name}));')
    for name in OPERATIONS:
        lines.append(f'  printf("{name} %ld\\n", (long)({name}));')
    for name in STATUS_BITS:
        lines.append(f'  printf("{name} %lu\\n", (unsigned long){name}(0xffffffffUL));')
    for struct_name, fields in STRUCTS.items():
        lines.append(f'  printf("sizeof.{struct_name} %zu\\n", sizeof(struct {struct_name}));')
        for field in fields:
            lines.append(f'  printf("offsetof.{struct_name}.{field} %zu\\n", '
                         f'offsetof(struct {struct_name}, {field}));')
    lines.append("  struct mtop op;")
    for key, operation, count in ST_COMMANDS:
        lines += [f"  memset(&op, 0, sizeof op); op.mt_op = {operation}; op.mt_count = {count};",
                  f'  hex("mtop.{key}", &op, sizeof op);']
    lines += [
        "  struct mtget get; memset(&get, 0, sizeof get);",
        "  get.mt_type = MT_ISSCSI2; get.mt_fileno = 3; get.mt_blkno = 7;",
        "  get.mt_dsreg = (262144 << MT_ST_BLKSIZE_SHIFT) | (0x58UL << MT_ST_DENSITY_SHIFT);",
        "  get.mt_gstat = GMT_EOF(~0UL) | GMT_ONLINE(~0UL) | GMT_WR_PROT(~0UL);",
        '  hex("mtget.sample", &get, sizeof get);',
        "  struct mtpos pos; memset(&pos, 0, sizeof pos); pos.mt_blkno = 123456;",
        '  hex("mtpos.sample", &pos, sizeof pos);',
        "  return 0;", "}",
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_view(tmp_path_factory):
    """What a C program compiled against <linux/mtio.h> prints: {name: text}."""
    compiler = shutil.which("cc")
    if compiler is None or not os.path.exists("/usr/include/linux/mtio.h"):
        pytest.skip("needs cc and linux/mtio.h (apt-get install gcc linux-libc-dev)")
    directory = tmp_path_factory.mktemp("mtio")
    source, binary = directory / "mtio.c", directory / "mtio"
    source.write_text(c_program())
    subprocess.run([compiler, "-Wall", "-Werror", "-o", str(binary), str(source)], check=True,
                   capture_output=True, text=True)
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    yield dict(line.split(" ", 1) for line in output.splitlines())
    shutil.rmtree(directory)


def test_mtio_matches_the_c_header(c_view):
    for name in REQUESTS + DSREG_FIELDS + OPERATIONS + STATUS_BITS:
        assert getattr(mtio, name) == int(c_view[name]), name
    assert set(mtio.OPERATION_NAMES.values()) == set(OPERATIONS)
    for struct_name, fields in STRUCTS.items():
        layout = getattr(mtio, struct_name)
        assert layout.size == int(c_view[f"sizeof.{struct_name}"]), struct_name
        assert layout.fields == fields
        for field in fields:
            assert layout.offsets[field] == int(c_view[f"offsetof.{struct_name}.{field}"]), field


def test_st_tape_sends_the_ioctls_c_would(c_view):
    sent = []

    def recording_ioctl(fd, request, arg):
        sent.append((request, bytes(arg)))
        if request == int(c_view["MTIOCGET"]):
            return bytes.fromhex(c_view["mtget.sample"])
        if request == int(c_view["MTIOCPOS"]):
            return bytes.fromhex(c_view["mtpos.sample"])
        return arg

    drive = StTape("/dev/null", ioctl=recording_ioctl)
    sent.clear()
    drive.rewind()
    drive.forward_space_files(3)
    drive.write_filemarks(1)
    drive.set_block_size(262144)
    drive.set_compression(False)
    drive.seek_end_of_data()
    operation = int(c_view["MTIOCTOP"])
    # (a space operation also asks MTIOCGET where it starts, to say where it stopped)
    assert [s for s in sent if s[0] == operation] == [
        (operation, bytes.fromhex(c_view[f"mtop.{key}"])) for key, _, _ in ST_COMMANDS]

    status = drive.status()
    assert (status.file_number, status.block_number, status.block_size) == (3, 7, 262144)
    assert status.eof and status.online and status.write_protected
    assert not (status.bot or status.eot or status.eod)
    assert drive.tell() == 123456
    drive.close()


def test_st_tape_errors_name_the_operation():
    def failing_ioctl(fd, request, arg):
        if request == mtio.MTIOCTOP:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return bytes(mtio.mtget.size)

    with StTape("/dev/null", ioctl=failing_ioctl) as drive:
        error = fails(errno.EIO, drive.forward_space_files, 2)
    assert str(error) == "/dev/null: MTFSF 2: Input/output error"
    error = fails(errno.ENOTTY, StTape, "/dev/null")
    assert "not a tape drive" in str(error)


class StepClock:
    """A clock the test moves: the host's rate is exactly what the test says."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("host_rate, back_hitches", [(200e6, 0), (100e6, 9)])
def test_a_drive_fed_slower_than_it_streams_back_hitches(tmp_path, host_rate, back_hitches):
    """A modelled drive (150 MB/s at its slowest, a 4 MiB buffer) fed 1 MiB blocks: faster than
    it streams, never a stop; slower, a stop each time its buffer runs dry (after the first few
    blocks the buffer holds nothing in advance: a back-hitch per block)."""
    from devices.tape.streaming import StreamingModel

    clock = StepClock()
    model = StreamingModel(150e6, 4 << 20, clock=clock)
    block = bytes(1 << 20)
    with VirtualTape(tmp_path / "s.tap", streaming=model) as drive:
        for _ in range(10):
            drive.write_block(block)
            clock.now += len(block) / host_rate
        drive.write_filemarks(1)        # the end of the stream: a stop on purpose
        clock.now += 60
        drive.write_block(block)         # a new stream after a pause: no back-hitch either
    assert model.back_hitches == back_hitches


def test_a_drive_starts_the_tape_only_with_enough_data_to_stream(tmp_path):
    """A small record, a long pause, then data at full speed: the drive waited for its buffer to
    fill before moving the tape, so nothing ran dry (a header written ahead of a spooled image)."""
    from devices.tape.streaming import StreamingModel

    clock = StepClock()
    model = StreamingModel(150e6, 4 << 20, clock=clock)
    with VirtualTape(tmp_path / "s.tap", streaming=model) as drive:
        drive.write_block(bytes(64 << 10))
        clock.now += 30
        for _ in range(10):
            drive.write_block(bytes(1 << 20))
            clock.now += (1 << 20) / 400e6
    assert model.back_hitches == 0
