"""The SIMH magtape file a VirtualTape keeps its cartridge in: records, filemarks, torn records.

The format: each block is a 32-bit little-endian length, the data, one pad byte if the length is
odd, and the same length again; a length of 0 is a filemark; 0xFFFFFFFF marks the end of the
medium (read as end of data). A block holds at most 0xFFFFFF bytes (SIMH's and st's limit); any
other word with one of the top eight bits set is a SIMH marker this emulation does not produce
and refuses to read. A tape that was written ends, when closed, with a double tape mark and the
end-of-medium marker (SimhTapeFile.seal: the second tape mark and the marker are not recorded
data; the next write at the end of data replaces them).

SimhTapeFile numbers the objects of the file (blocks and filemarks) from 0, as tape positions,
and knows nothing of st: VirtualTape (virtual.py) gives them st's semantics. What this module
decides is what the file can tell: whether a file is a tape at all (the structure of its first
records), where the recorded data ends (a torn last record, left by an interrupted write, ends
it where it begins) and what a write the host cannot take leaves behind (nothing: it is undone).

Speed: a block is one os.pwritev of the caller's buffer between its two length words, a read is
one pread for the length and one for the data. The position index is built lazily from the
length words and costs 8 bytes per block and filemark seen.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from array import array
from bisect import bisect_left
from collections.abc import Sequence

from . import mtio
from .drive import TapeError

_WORD = struct.Struct("<I")
_FILEMARK = 0
_END_OF_MEDIUM = 0xFFFFFFFF
_FILEMARK_WORD = _WORD.pack(_FILEMARK)
_END_OF_MEDIUM_WORD = _WORD.pack(_END_OF_MEDIUM)
# What follows the recorded data once a tape that was written is closed, when that data ends
# with a filemark (st's closing one): a second tape mark (the double tape mark that ends the data
# for SIMH tools and for OSes that read until an empty file) and the end-of-medium marker. A tape
# mark right after a filemark and followed by the marker at the very end of the file is that
# second mark, not recorded data (SIMH tools that end a tape the same way agree).
_END_MARK = _FILEMARK_WORD + _END_OF_MEDIUM_WORD
_RECORD_OVERHEAD = 2 * _WORD.size
FILEMARK_BYTES = _WORD.size
LARGEST_BLOCK = mtio.MT_ST_BLKSIZE_MASK
_IOV_MAX = os.sysconf("SC_IOV_MAX")
# How many objects at the start of a file are checked before it is taken for a tape; a file that
# starts with this many filemarks (zero bytes) is a disk image or a preallocated file, not a tape.
_CHECKED_OBJECTS = 8


class HostFileError(TapeError):
    """The file holding a virtual tape could not take a write: a fault of the host (a full
    filesystem, an I/O error), not of the tape. `errno` is EIO, as st reports a write it could
    not do; `host_errno` is what the filesystem answered (ENOSPC, EDQUOT, EIO, ...)."""

    def __init__(self, device: str, host_errno: int, what: str):
        super().__init__(errno.EIO, device, what)
        self.host_errno = host_errno

    def __str__(self) -> str:
        return f"{self.filename}: {self.what}: {os.strerror(self.host_errno)}"


def record_bytes(blocks: Sequence) -> int:
    """The bytes `blocks` take in the file as records: data, pad bytes and length words."""
    return sum(len(b) + (len(b) & 1) for b in blocks) + _RECORD_OVERHEAD * len(blocks)


class SimhTapeFile:
    """A SIMH .tap file, open and locked, as a sequence of tape objects (blocks and filemarks).

    Opened for writing unless `writable` is false or the file cannot be (then `read_only`);
    `create` makes a missing file an empty tape. A file that is not a tape is refused with
    EMEDIUMTYPE before anything reads or writes it.
    """

    def __init__(self, path: str, *, writable: bool, create: bool):
        self.path = path
        self.read_only = not writable
        self._fd = self._open(create)
        self._size = os.fstat(self._fd).st_size
        # _starts[i] is the file offset of tape object i (block or filemark); the last entry is
        # where the next object not yet indexed begins, or the end of data once _indexed_all.
        self._starts = array("q", [0])
        # The positions of the filemarks indexed so far.
        self.marks = array("q")
        self._indexed_all = False
        # Where a torn last record begins (the end of data), and what is wrong with it.
        self._torn: tuple[int, str] | None = None
        self._changed = False       # written since opened: seal() ends the data with _END_MARK
        try:
            self._check_is_tape()
        except BaseException:
            self.close()
            raise

    def _open(self, create: bool) -> int:
        extra = os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            if not self.read_only:
                try:
                    fd = os.open(self.path, os.O_RDWR | extra, 0o600)
                except OSError as e:
                    if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                        raise
                    self.read_only = True
            if self.read_only:
                fd = os.open(self.path, os.O_RDONLY | extra, 0o600)
        except FileNotFoundError:
            raise TapeError(errno.ENOENT, self.path, "no such virtual tape file") from None
        except OSError as e:
            raise TapeError(e.errno, self.path, "cannot open the virtual tape file") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TapeError(errno.EBUSY, self.path, "the virtual tape is in use by another program") from None
        return fd

    def _check_is_tape(self) -> None:
        """Refuse a file that is not a SIMH tape, by the structure of its first objects: any
        other file would read as a blank tape (EIO at BOT) and be overwritten by the first write."""
        if self._size == 0:
            return
        not_a_tape = "not a virtual tape (SIMH .tap), so it is left as it is"
        if self._size < _WORD.size:
            raise self.error(errno.EMEDIUMTYPE, f"{not_a_tape} ({self._size} bytes cannot hold a record)")
        try:
            self.exists(_CHECKED_OBJECTS - 1)
        except TapeError as e:
            raise self.error(errno.EMEDIUMTYPE, f"{not_a_tape} ({e.what})") from None
        if len(self.marks) == _CHECKED_OBJECTS:
            raise self.error(errno.EMEDIUMTYPE, f"{not_a_tape} (it starts with zero bytes, not records)")

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def error(self, error: int, what: str) -> TapeError:
        return TapeError(error, self.path, what)

    def _corrupt(self, offset: int, why: str) -> TapeError:
        return self.error(errno.EIO, f"not a valid SIMH tape image at byte {offset}: {why}")

    # The index of objects on the tape.

    def _index_next(self) -> None:
        offset = self._starts[-1]
        word = os.pread(self._fd, _WORD.size, offset)
        if not word:
            self._indexed_all = True
            return
        if len(word) < _WORD.size:
            self._end_at_torn_record(offset, "the file ends inside a length word")
            return
        (length,) = _WORD.unpack(word)
        if length == _END_OF_MEDIUM:
            self._indexed_all = True
        elif length == _FILEMARK:
            if self._is_end_mark(offset):
                self._indexed_all = True
                return
            self.marks.append(len(self._starts) - 1)
            self._starts.append(offset + _WORD.size)
        elif length > LARGEST_BLOCK:
            raise self._corrupt(offset, f"0x{length:08x} is no record length (nor a marker this emulation reads)")
        else:
            end = offset + _RECORD_OVERHEAD + length + (length & 1)
            if end > self._size:
                self._end_at_torn_record(offset, f"the file ends inside a block of {length} bytes")
                return
            after = os.pread(self._fd, _WORD.size, end - _WORD.size)
            if after != word:
                raise self._corrupt(offset, f"a block of {length} bytes is not followed by its length")
            self._starts.append(end)

    def _is_end_mark(self, offset: int) -> bool:
        after_a_filemark = bool(self.marks) and self.marks[-1] == len(self._starts) - 2
        return (after_a_filemark and offset + len(_END_MARK) == self._size
                and os.pread(self._fd, _WORD.size, offset + _WORD.size) == _END_OF_MEDIUM_WORD)

    def seal(self) -> None:
        """After writes, end the file with _END_MARK (or the end-of-medium marker alone when the
        data does not end with a filemark); a write at the end of data truncates it away again.
        Best effort: a file that cannot take these 8 bytes reads the same without them."""
        if self.closed or self.read_only or not self._changed:
            return
        objects = self.end_of_data()
        end = self._starts[objects]
        suffix = _END_MARK if objects and self.is_filemark(objects - 1) else _END_OF_MEDIUM_WORD
        try:
            if os.pwrite(self._fd, suffix, end) == len(suffix):
                self._size = end + len(suffix)
                self._changed = False
                return
        except OSError:
            pass
        try:
            os.ftruncate(self._fd, end)
            self._size = end
        except OSError:
            pass

    def _end_at_torn_record(self, offset: int, why: str) -> None:
        """A record cut short by an interrupted write ends the recorded data where it begins."""
        self._torn = (offset, why)
        self._indexed_all = True

    def torn_record_at(self, position: int) -> str | None:
        """What is wrong with the torn record at `position`, if the end of data there is one."""
        if self._torn is None or position != len(self._starts) - 1:
            return None
        offset, why = self._torn
        return f"not a valid SIMH tape image at byte {offset}: {why}"

    def exists(self, position: int) -> bool:
        """Whether tape object `position` exists, indexing the tape as far as needed."""
        while len(self._starts) - 1 <= position and not self._indexed_all:
            self._index_next()
        return len(self._starts) - 1 > position

    @property
    def indexed(self) -> int:
        """How many objects are indexed so far: the end of data once the whole file is."""
        return len(self._starts) - 1

    def end_of_data(self) -> int:
        while not self._indexed_all:
            self._index_next()
        return len(self._starts) - 1

    def filemark(self, number: int) -> int | None:
        """The position of filemark `number` (from 0), indexing as far as needed; None if the
        tape holds fewer (then every filemark is in `marks`)."""
        while len(self.marks) <= number and not self._indexed_all:
            self._index_next()
        return self.marks[number] if len(self.marks) > number else None

    def is_filemark(self, position: int) -> bool:
        return self._starts[position + 1] - self._starts[position] == _WORD.size

    def marks_before(self, position: int) -> int:
        return bisect_left(self.marks, position)

    def block_length(self, position: int) -> int:
        (length,) = _WORD.unpack(os.pread(self._fd, _WORD.size, self._starts[position]))
        return length

    def offset(self, position: int) -> int:
        """Where object `position` begins in the file (an indexed one, or the end of data)."""
        return self._starts[position]

    def data_offset(self, position: int) -> int:
        return self._starts[position] + _WORD.size

    # Reading and writing.

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise self._corrupt(offset, "the file ends inside a block")
        return data

    def read_into(self, view: memoryview, offset: int) -> None:
        if os.preadv(self._fd, [view], offset) != len(view):
            raise self._corrupt(offset, "the file ends inside a block")

    def write_blocks(self, position: int, blocks: Sequence) -> None:
        """Record `blocks` at `position`, ending the recorded data after them."""
        buffers = []
        object_ends = []
        at = self._starts[position]
        for block in blocks:
            length = len(block)
            word = _WORD.pack(length)
            buffers += (word, block, b"\0" + word if length & 1 else word)
            at += _RECORD_OVERHEAD + length + (length & 1)
            object_ends.append(at)
        self._replace_from(position, buffers, object_ends, [])

    def write_filemarks(self, position: int, count: int) -> None:
        """Record `count` filemarks at `position`, ending the recorded data after them."""
        start = self._starts[position]
        object_ends = list(range(start + _WORD.size, start + count * _WORD.size + 1, _WORD.size))
        self._replace_from(position, [_FILEMARK_WORD * count], object_ends, list(range(position, position + count)))

    def erase_from(self, position: int) -> None:
        """End the recorded data at `position`."""
        self._replace_from(position, [], [], [])

    def _replace_from(self, position: int, buffers: list, object_ends: list[int], marks: list[int]) -> None:
        """Replace everything from `position` on by `buffers`, the objects that end at
        `object_ends` (file offsets), of which those at positions `marks` are filemarks."""
        offset = self._starts[position]
        del self._starts[position + 1:]
        del self.marks[self.marks_before(position):]
        self._indexed_all = True
        try:
            if self._size > offset:
                os.ftruncate(self._fd, offset)
                self._size = offset
            for first in range(0, len(buffers), _IOV_MAX):
                batch = buffers[first:first + _IOV_MAX]
                expected = sum(len(b) for b in batch)
                written = os.pwritev(self._fd, batch, offset)
                if written != expected:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                offset += written
        except OSError as e:
            os.ftruncate(self._fd, self._starts[position])
            self._size = self._starts[position]
            raise HostFileError(self.path, e.errno, "the file holding the virtual tape could not be written") from None
        finally:
            # Whatever was torn at the end of data is gone: overwritten or truncated away.
            self._torn = None
            self._changed = True
        self._size = offset
        self._starts.extend(object_ends)
        self.marks.extend(marks)
