"""VirtualTape: a tape drive emulated on a SIMH .tap file, behaving as Linux st does.

The file format (SIMH magtape): each block is a 32-bit little-endian length, the data, one pad
byte if the length is odd, and the same length again; a length of 0 is a filemark; 0xFFFFFFFF
marks the end of the medium (read as end of data). A block holds at most 0xFFFFFF bytes (SIMH's
and st's limit); any other word with one of the top eight bits set is a SIMH marker this
emulation does not produce and refuses to read.

The user-visible behaviour is st's (Documentation/scsi/st.rst, drivers/scsi/st.c), including
its internal end-of-file state, so a program tested here meets the same answers on a real drive:

End of data. A read of a filemark returns 0 bytes and leaves the tape after it. A read at the
end of data right after a filemark returns 0 bytes once more (st: "end of data is signified by
returning zero bytes for two consecutive reads"), and every further read fails with EIO. A read
at the end of data not preceded by a filemark (a file that was never closed, or after MTEOM)
fails with EIO at once. After a read at the end of data the block number is -1, as in st.

Early warning. With a `capacity`, the medium is `capacity` bytes of .tap file and the early-
warning mark lies `early_warning` bytes before its end. As st.rst ("EOM Behaviour When Writing")
says: the write that takes the tape past the early-warning mark is finished and returns its
byte count (status: eot); the next write returns ENOSPC and writes nothing (status: eod, as st
reports it); to let a trailer be written the next write is allowed and succeeds; after this,
ENOSPC and success alternate until the physical end of the medium, where every write fails with
ENOSPC and writes nothing. Filemarks can be written in the early-warning zone; at the physical
end a filemark that does not fit fails with EIO, as st's MTWEOF does.

Close after writes. If the last operation was a write, close() writes one filemark (st's
default, not MT_ST_TWO_FM); with a non-rewinding st device the tape would then stand after that
filemark. Likewise rewind(), unload(), seek() and backward_space_files() after a write first
write a filemark (backward_space_files then spaces over it as well). A read or any other
tape operation after a write, except set_block_size(), status() and tell(), cancels the
filemark at close, as in st. Opening a VirtualTape always
starts at the beginning of the tape, as after a rewind.

Write protection: writes and filemarks fail with EACCES, as st's do on a write-protected tape
opened with O_NONBLOCK (st refuses a blocking read-write open of such a tape with EROFS;
StTape opens with O_NONBLOCK, so both drives answer EACCES) and status() shows write_protected.

Other st behaviours kept: writing anywhere ends the recorded data there (the file is truncated);
a variable-mode read with a buffer smaller than the block fails with ENOMEM and leaves the tape
after that block (its block number counts it; backward_space_records(1) returns to it); in
fixed block mode (set_block_size(n)) writes must be multiples of n and become n-byte records,
a read stops early at a filemark (which the next read returns) and a block of another size
fails with EIO without moving; spacing stops at filemarks, BOT and end of data with EIO; file
and block numbers are -1 where st does not know them (after backward_space_files: the block
number; after seek(): both, unless seeking to 0; after seek_end_of_data: the block number).
Where st would write part of a fixed-mode request at the physical end, VirtualTape writes all
of it or nothing.

Found different on st (the same conformance suite on both, the real one in the VM rig) and
made to follow it: a fixed-mode read need not be a multiple of the block size (st keeps the
rest of the last block for the next read and drops it at any other call); st asks the drive for
the whole blocks a fixed-mode read needs, for 32 KiB of them once a read was not a multiple
(read-ahead, until close), and returns none of them when the end of data comes among them
(EIO, or a 0-byte end of data right after a filemark); tell() at BOT and a backward space
that stops at BOT make the block (and file) numbers known; without a tape, status() keeps the
numbers the tape had at unload() and tell(), seek() and set_compression() fail with EIO (st
asks the drive, which has no tape), the rest with ENOMEDIUM.

Not followed, and why: st's arithmetic with a block number it does not know (a backward
space of n blocks stopping at BOT reports block n - 1; a backward space stopping at a filemark
with an unknown file number reports file -2): VirtualTape reports the tape's actual position.
The rig's emulated drive answers a fixed-mode read of a block of another size with MEDIUM
ERROR and no movement, after which st loses the block number; an SSC drive reports an
incorrect length and st keeps it, as VirtualTape does.

What is a tape. Opening a file checks the structure of its first records (each length word
matched by the one after the data, at most eight objects): a file that fails it (a text file, an
image, a disk image, a file of zeros) is refused with EMEDIUMTYPE before anything reads or
writes it, so it can never pass for a blank tape and be overwritten. An empty file is a blank
tape; is_blank() says whether anything is recorded without moving the tape. A damaged record
further on reads as EIO, as a medium error does on st.

Interrupted writes. A writer killed in the middle of a write leaves a torn last record: the file
ends inside it. That record reads as the end of data (a read there fails with EIO, as at any end
of data not preceded by a filemark, and says the record is torn), and the next write at the end
of data replaces it, as a real drive's end of data after a power loss. Unlike st, which writes
the closing filemark when a killed process's descriptor is closed, a killed VirtualTape writes
none: the last file simply ends at the end of data.

Host file errors. A write the file cannot take (its filesystem is full, an I/O error) is undone
and raises HostFileError: errno EIO, as a drive reports a write it could not do, never st's
ENOSPC of the early-warning zone; `host_errno` is what the filesystem answered.

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
from enum import IntEnum

from . import mtio
from .drive import (BlockLimits, Compression, CompressionNotSwitchable, TapeDrive, TapeError, TapeStatus,
                    check_count)

_WORD = struct.Struct("<I")
_FILEMARK = 0
_END_OF_MEDIUM = 0xFFFFFFFF
_FILEMARK_WORD = _WORD.pack(_FILEMARK)
_RECORD_OVERHEAD = 2 * _WORD.size
_LARGEST_BLOCK = mtio.MT_ST_BLKSIZE_MASK
_IOV_MAX = os.sysconf("SC_IOV_MAX")
DEFAULT_EARLY_WARNING = 32 << 20
_ST_FIXED_BUFFER = 32 << 10  # st's driver buffer in fixed block mode (ST_FIXED_BUFFER_BLOCKS KiB)
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


class _EofState(IntEnum):
    """st's per-partition `eof` state (drivers/scsi/st.h), with its numbering: st compares them."""

    NOEOF = 0
    FM = 2
    EOM_OK = 3
    EOD_1 = 5
    EOD_2 = 6
    EOD = 7


class VirtualTape(TapeDrive):
    """A tape drive with a SIMH .tap file as its cartridge; see the module docstring.

    `capacity` (bytes of .tap file, None = unlimited) and `early_warning` (bytes before it;
    default the smaller of 32 MiB and a tenth of the capacity) model the end of the medium.
    `write_protected` models the cartridge's write-protect tab; a file that cannot be opened
    for writing is write-protected too. `create` makes a missing file an empty tape.
    The drive's facts are configured: `block_limits` (default 1 byte to 16 MiB - 1, st's
    largest block), whether it can switch compression (`compression_capable`; if not,
    set_compression raises CompressionNotSwitchable as st's EIO does) and the `density` code
    status() reports (0: the default).
    """

    def __init__(self, path, capacity: int | None = None, early_warning: int | None = None,
                 write_protected: bool = False, create: bool = True, *,
                 block_limits: BlockLimits | None = None, compression_capable: bool = True,
                 density: int = 0):
        self.path = os.fspath(path)
        self._limits = block_limits or BlockLimits(1, _LARGEST_BLOCK)
        if not 1 <= self._limits.minimum <= self._limits.maximum <= _LARGEST_BLOCK:
            raise ValueError(f"block limits {self._limits} must lie within 1..{_LARGEST_BLOCK}")
        if not 0 <= density <= 0xFF:
            raise ValueError(f"a density code is one byte, not {density}")
        self._compression_capable = compression_capable
        self._density = density
        if capacity is None:
            if early_warning is not None:
                raise ValueError("an early-warning zone needs a capacity")
        else:
            if early_warning is None:
                early_warning = min(DEFAULT_EARLY_WARNING, capacity // 10)
            if not 0 <= early_warning < capacity:
                raise ValueError(f"early warning {early_warning} must lie within the capacity {capacity}")
        self.capacity = capacity
        self.early_warning = early_warning
        self.write_protected = write_protected
        self._compression = compression_capable
        self._fd = self._open(create)
        self._size = os.fstat(self._fd).st_size
        # _starts[i] is the file offset of tape object i (block or filemark); the last entry is
        # where the next object not yet indexed begins, or the end of data once _indexed_all.
        self._starts = array("q", [0])
        self._marks = array("q")
        self._indexed_all = False
        # Where a torn last record begins (the end of data), and what is wrong with it.
        self._torn: tuple[int, str] | None = None
        self._loaded = True
        self._unloaded_status: TapeStatus | None = None
        self._block_size = 0
        self._writing = False
        self._pending = b""
        self._read_ahead = False
        self._buffered_until = 0
        self._go_to_bot()
        try:
            self._check_medium()
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    def _open(self, create: bool) -> int:
        extra = os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            if not self.write_protected:
                try:
                    fd = os.open(self.path, os.O_RDWR | extra, 0o600)
                except OSError as e:
                    if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                        raise
                    self.write_protected = True
            if self.write_protected:
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

    def _check_medium(self) -> None:
        """Refuse a file that is not a SIMH tape, by the structure of its first objects: any
        other file would read as a blank tape (EIO at BOT) and be overwritten by the first write."""
        if self._size == 0:
            return
        not_a_tape = "not a virtual tape (SIMH .tap), so it is left as it is"
        if self._size < _WORD.size:
            raise self._error(errno.EMEDIUMTYPE, f"{not_a_tape} ({self._size} bytes cannot hold a record)")
        try:
            self._exists(_CHECKED_OBJECTS - 1)
        except TapeError as e:
            raise self._error(errno.EMEDIUMTYPE, f"{not_a_tape} ({e.what})") from None
        if len(self._marks) == _CHECKED_OBJECTS:
            raise self._error(errno.EMEDIUMTYPE, f"{not_a_tape} (it starts with zero bytes, not records)")

    def is_blank(self) -> bool:
        """Whether nothing is recorded on the tape; known from the file, without moving the tape."""
        self._require_tape()
        return not self._exists(0)

    def _error(self, error: int, what: str) -> TapeError:
        return TapeError(error, self.path, what)

    def _require_open(self, *, reading: bool = False) -> None:
        if self._fd < 0:
            raise self._error(errno.EBADF, "the virtual tape is closed")
        if not reading:
            # st's flush_buffer at any other call: what is left of a fixed block partly read
            # is dropped (the block counts as read), blocks read ahead are given back.
            self._pending = b""
            self._buffered_until = 0

    def _require_tape(self, *, reading: bool = False) -> None:
        self._require_open(reading=reading)
        if not self._loaded:
            raise self._error(errno.ENOMEDIUM, "no tape loaded (it was unloaded)")

    def _require_loaded_for_scsi(self, what: str) -> None:
        """st answers EIO, not ENOMEDIUM, for MTIOCPOS, MTSEEK and MTCOMPRESSION without a tape."""
        self._require_open()
        if not self._loaded:
            raise self._error(errno.EIO, f"{what}: no tape loaded (it was unloaded)")

    def _go_to_bot(self) -> None:
        self._position = 0
        self._file_known = True
        self._block_known = True
        self._eof = _EofState.NOEOF

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
            self._marks.append(len(self._starts) - 1)
            self._starts.append(offset + _WORD.size)
        elif length > _LARGEST_BLOCK:
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

    def _end_at_torn_record(self, offset: int, why: str) -> None:
        """A record cut short by an interrupted write ends the recorded data where it begins."""
        self._torn = (offset, why)
        self._indexed_all = True

    def _corrupt(self, offset: int, why: str) -> TapeError:
        return self._error(errno.EIO, f"not a valid SIMH tape image at byte {offset}: {why}")

    def _at_end_of_data(self, what: str) -> str:
        if self._torn is None or self._position != len(self._starts) - 1:
            return f"{what} at the end of recorded data"
        offset, why = self._torn
        return (f"{what} at the end of recorded data, where the file holds a torn record (not a valid "
                f"SIMH tape image at byte {offset}: {why}; an interrupted write, replaced by the next write)")

    def _exists(self, position: int) -> bool:
        """Whether tape object `position` exists, indexing the tape as far as needed."""
        while len(self._starts) - 1 <= position and not self._indexed_all:
            self._index_next()
        return len(self._starts) - 1 > position

    def _end_of_data(self) -> int:
        while not self._indexed_all:
            self._index_next()
        return len(self._starts) - 1

    def _is_filemark(self, position: int) -> bool:
        return self._starts[position + 1] - self._starts[position] == _WORD.size

    def _marks_before(self, position: int) -> int:
        return bisect_left(self._marks, position)

    def _block_length(self, position: int) -> int:
        (length,) = _WORD.unpack(os.pread(self._fd, _WORD.size, self._starts[position]))
        return length

    # Writing.

    def _check_room(self, size: int, error: int, what: str) -> int:
        """The end offset of `size` bytes written here; fails as st does past the physical end."""
        end = self._starts[self._position] + size
        if self.capacity is not None and end > self.capacity:
            self._eof = _EofState.EOM_OK
            raise self._error(error, what)
        return end

    def _write_here(self, buffers: list, object_ends: list[int], marks: list[int]) -> None:
        """Replace everything from the current position on by `buffers`, the objects that end at
        `object_ends` (file offsets), of which those at positions `marks` are filemarks."""
        offset = self._starts[self._position]
        del self._starts[self._position + 1:]
        del self._marks[self._marks_before(self._position):]
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
            os.ftruncate(self._fd, self._starts[self._position])
            self._size = self._starts[self._position]
            raise HostFileError(self.path, e.errno, "the file holding the virtual tape could not be written") from None
        finally:
            # Whatever was torn at the end of data is gone: overwritten or truncated away.
            self._torn = None
        self._size = offset
        self._starts.extend(object_ends)
        self._marks.extend(marks)
        self._position += len(object_ends)

    def write_block(self, data) -> int:
        self._require_tape()
        view = memoryview(data).cast("B")
        size = len(view)
        if self.write_protected:
            raise self._error(errno.EACCES, f"write of {size} bytes: the tape is write-protected")
        if size == 0:
            return 0
        if self._block_size:
            if size % self._block_size:
                raise self._error(errno.EINVAL, f"write of {size} bytes is not a multiple of "
                                                f"the fixed block size {self._block_size}")
            blocks = [view[i:i + self._block_size] for i in range(0, size, self._block_size)]
        elif not self._limits.allows(size):
            raise self._error(errno.EINVAL, f"write of {size} bytes: outside the drive's block "
                                            f"limits {self._limits.minimum}..{self._limits.maximum}")
        else:
            blocks = [view]
        if self._eof == _EofState.EOM_OK:
            self._eof = _EofState.EOD_1
            raise self._error(errno.ENOSPC, f"write of {size} bytes refused past the early-warning "
                                            "mark (the next write is allowed)")
        self._writing = True
        padded = size + sum(len(b) & 1 for b in blocks)
        end = self._check_room(padded + _RECORD_OVERHEAD * len(blocks), errno.ENOSPC,
                               f"write of {size} bytes: end of medium")
        buffers = []
        object_ends = []
        at = self._starts[self._position]
        for block in blocks:
            length = len(block)
            word = _WORD.pack(length)
            buffers += (word, block, b"\0" + word if length & 1 else word)
            at += _RECORD_OVERHEAD + length + (length & 1)
            object_ends.append(at)
        self._write_here(buffers, object_ends, [])
        past_warning = self.capacity is not None and end > self.capacity - self.early_warning
        if past_warning or self._eof == _EofState.EOD_1:
            self._eof = _EofState.EOM_OK
        else:
            self._eof = _EofState.NOEOF
        return size

    def write_filemarks(self, count: int = 1) -> None:
        self._require_tape()
        check_count(count)
        if self.write_protected:
            raise self._error(errno.EACCES, "writing a filemark: the tape is write-protected")
        self._writing = False
        if count:
            end = self._check_room(count * _WORD.size, errno.EIO,
                                   "no room for a filemark at the end of the medium")
            first = self._position
            object_ends = list(range(end - (count - 1) * _WORD.size, end + 1, _WORD.size))
            self._write_here([_FILEMARK_WORD * count], object_ends, list(range(first, first + count)))
            self._block_known = True
        self._eof = _EofState.NOEOF

    def _end_file_if_writing(self) -> bool:
        """st writes a filemark before moving the tape away from data just written."""
        if not self._writing:
            return False
        self.write_filemarks(1)
        return True

    # Reading.

    def _take_blocks(self, max_size: int, have: int = 0) -> list[tuple[int, int]]:
        """Move over the blocks one read returns, as st does; their (data offset, length).
        `have` bytes are already served from a fixed block partly read before: a filemark,
        end of data or a block of another size then ends this read without being taken."""
        self._require_tape(reading=True)
        if max_size <= 0:
            raise ValueError(f"read size must be positive, not {max_size}")
        block_size = self._block_size
        if not block_size and not self._limits.allows(max_size):
            raise self._error(errno.EINVAL, f"read of up to {max_size} bytes: outside the drive's block "
                                            f"limits {self._limits.minimum}..{self._limits.maximum}")
        self._writing = False
        if have:
            if max_size <= have:
                return []
        elif self._eof >= _EofState.EOD_1:
            if self._eof < _EofState.EOD:
                self._eof = _EofState(self._eof + 1)
                return []
            raise self._error(errno.EIO, "read past the end of recorded data")
        # Fixed block mode: whole blocks, as many as cover the request (st reads ahead).
        wanted = -(-(max_size - have) // block_size) if block_size else 1
        if block_size and self._fixed_read_window(max_size % block_size != 0, wanted):
            return []
        taken: list[tuple[int, int]] = []
        position = self._position
        while len(taken) < wanted:
            if not self._exists(position):
                if taken or have:
                    break
                self._block_known = False
                if self._eof == _EofState.FM:
                    self._eof = _EofState.EOD
                    return []
                raise self._error(errno.EIO, self._at_end_of_data("read"))
            if self._is_filemark(position):
                if taken or have:
                    break
                self._position = position + 1
                self._block_known = True
                self._eof = _EofState.FM
                return []
            length = self._block_length(position)
            if block_size and length != block_size:
                if taken or have:
                    break
                raise self._error(errno.EIO, f"block of {length} bytes where the fixed block "
                                             f"size is {block_size}")
            if length > max_size and not block_size:
                self._position = position + 1
                raise self._error(errno.ENOMEM, f"block of {length} bytes does not fit the "
                                                f"{max_size}-byte read buffer (the tape is now after it)")
            taken.append((self._starts[position] + _WORD.size, length))
            position += 1
        self._position = position
        if self._eof == _EofState.FM:
            self._eof = _EofState.NOEOF
        return taken

    def _fixed_read_window(self, partial: bool, wanted: int) -> bool:
        """What st asks the drive for in fixed block mode, and what it makes of end of data.

        st reads the blocks a read needs, or, once a read was not a multiple of the block size
        (until close), a whole buffer of them ahead (32 KiB). Where those blocks run into the end
        of data before a filemark or a block of another size, st returns none of them: 0 bytes
        right after a filemark (end of data; returns True), EIO otherwise, and the tape is at the
        end of data.
        """
        self._read_ahead = self._read_ahead or partial
        position = self._position
        if position < self._buffered_until:
            return False  # in st's buffer already
        count = max(wanted, _ST_FIXED_BUFFER // self._block_size) if self._read_ahead else wanted
        end = position + count
        while position < end and self._exists(position):
            if self._is_filemark(position) or self._block_length(position) != self._block_size:
                break
            position += 1
        else:
            if position < end and position > self._position:
                # End of data among the blocks asked for: the blocks before it are lost to st.
                self._position = position
                self._block_known = False
                if self._eof == _EofState.FM:
                    self._eof = _EofState.EOD
                    return True
                raise self._error(errno.EIO, "read at the end of recorded data (the blocks read "
                                             "with it in fixed block mode are not returned)")
        self._buffered_until = position if self._read_ahead else 0
        return False

    def read_block(self, max_size: int) -> bytes:
        have = self._pending
        taken = self._take_blocks(max_size, len(have))
        if not have and len(taken) == 1 and taken[0][1] <= max_size:
            offset, length = taken[0]
            return self._pread(length, offset)
        data = have + b"".join(self._pread(length, offset) for offset, length in taken)
        self._pending = data[max_size:]
        return data[:max_size]

    def read_block_into(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        have = self._pending
        taken = self._take_blocks(len(view), len(have))
        if self._block_size and sum(length for _, length in taken) + len(have) > len(view):
            # The request ends inside a fixed block: st keeps the rest for the next read.
            data = have + b"".join(self._pread(length, offset) for offset, length in taken)
            view[:min(len(data), len(view))] = data[:len(view)]
            self._pending = data[len(view):]
            return min(len(data), len(view))
        done = len(have)
        view[:done] = have
        self._pending = b""
        for offset, length in taken:
            if os.preadv(self._fd, [view[done:done + length]], offset) != length:
                raise self._corrupt(offset, "the file ends inside a block")
            done += length
        return done

    def _pread(self, length: int, offset: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise self._corrupt(offset, "the file ends inside a block")
        return data

    # Positioning.

    def rewind(self) -> None:
        self._require_tape()
        self._end_file_if_writing()
        self._go_to_bot()

    def forward_space_files(self, count: int) -> None:
        self._require_tape()
        check_count(count)
        self._writing = False
        if not count:
            return
        passed_before = self._marks_before(self._position)
        target = passed_before + count - 1
        while len(self._marks) <= target and not self._indexed_all:
            self._index_next()
        if len(self._marks) > target:
            self._position = self._marks[target] + 1
            self._block_known = True
            self._eof = _EofState.FM
            return
        self._position = self._end_of_data()
        self._block_known = False
        self._eof = _EofState.EOD
        raise self._error(errno.EIO, f"end of data after {len(self._marks) - passed_before} "
                                     f"of {count} filemarks")

    def backward_space_files(self, count: int) -> None:
        self._require_tape()
        check_count(count)
        if self._end_file_if_writing():
            count += 1
        self._writing = False
        if not count:
            return
        self._eof = _EofState.NOEOF
        passed_before = self._marks_before(self._position)
        if passed_before >= count:
            self._position = self._marks[passed_before - count]
            self._block_known = False
            return
        self._position = 0
        self._block_known = True
        raise self._error(errno.EIO, f"beginning of tape after {passed_before} of {count} filemarks")

    def forward_space_records(self, count: int) -> None:
        self._require_tape()
        check_count(count)
        self._writing = False
        if not count:
            return
        start = self._position
        self._exists(start + count - 1)
        next_mark = self._marks_before(start)
        if next_mark < len(self._marks) and self._marks[next_mark] < start + count:
            mark = self._marks[next_mark]
            self._position = mark + 1
            self._block_known = True
            self._eof = _EofState.FM
            raise self._error(errno.EIO, f"filemark after {mark - start} of {count} blocks")
        end = len(self._starts) - 1
        if start + count > end:
            self._position = end
            self._eof = _EofState.EOD
            raise self._error(errno.EIO, f"end of data after {end - start} of {count} blocks")
        self._position = start + count
        self._eof = _EofState.NOEOF

    def backward_space_records(self, count: int) -> None:
        self._require_tape()
        check_count(count)
        self._writing = False
        if not count:
            return
        start = self._position
        self._eof = _EofState.NOEOF
        passed_before = self._marks_before(start)
        last_mark = self._marks[passed_before - 1] if passed_before else -1
        if start - count > last_mark:
            self._position = start - count
            return
        self._position = max(last_mark, 0)
        if last_mark >= 0:
            self._block_known = False
            raise self._error(errno.EIO, f"filemark after {start - last_mark - 1} of {count} blocks")
        # st takes the drive's "beginning of medium" as block 0 (with a block number it did not
        # know before, st reports count - 1 instead: its arithmetic, not the tape).
        self._block_known = True
        raise self._error(errno.EIO, f"beginning of tape after {start} of {count} blocks")

    def erase(self) -> None:
        self._require_tape()
        if self.write_protected:
            raise self._error(errno.EACCES, "MTERASE: the tape is write-protected")
        self._writing = False
        self._write_here([], [], [])
        self._eof = _EofState.NOEOF

    def seek_end_of_data(self) -> None:
        self._require_tape()
        self._writing = False
        self._position = self._end_of_data()
        self._block_known = False
        self._eof = _EofState.EOD

    def tell(self) -> int:
        self._require_loaded_for_scsi("MTIOCPOS")
        if self._position == 0:
            # st's READ POSITION at the beginning of the tape makes file and block numbers known.
            self._file_known = self._block_known = True
        return self._position

    def seek(self, position: int) -> None:
        self._require_loaded_for_scsi(f"MTSEEK {position}")
        check_count(position)
        self._end_file_if_writing()
        self._writing = False
        self._eof = _EofState.NOEOF
        self._file_known = self._block_known = position == 0
        if position > 0 and not self._exists(position - 1):
            self._position = len(self._starts) - 1
            raise self._error(errno.EIO, f"position {position} is beyond the end of recorded "
                                         f"data at {self._position}")
        self._position = position

    # Drive settings and state.

    def set_block_size(self, size: int) -> None:
        self._require_tape()
        if size and not self._limits.allows(size):
            raise self._error(errno.EINVAL, f"MTSETBLK {size}: outside the drive's block limits "
                                            f"{self._limits.minimum}..{self._limits.maximum}")
        self._block_size = size

    def set_compression(self, enabled: bool) -> None:
        self._require_loaded_for_scsi(f"MTCOMPRESSION {int(enabled)}")
        self._writing = False
        if not self._compression_capable:
            raise CompressionNotSwitchable(self.path, enabled)
        self._compression = enabled

    def compression(self) -> Compression:
        self._require_open()
        return Compression(capable=self._compression_capable, enabled=self._compression)

    def block_limits(self) -> BlockLimits:
        self._require_open()
        return self._limits

    def load(self) -> None:
        self._require_open()
        self._writing = False
        self._loaded = True
        self._unloaded_status = None
        self._go_to_bot()

    def unload(self) -> None:
        self._require_tape()
        self._end_file_if_writing()
        self._writing = False
        # st keeps reporting the file and block numbers (and end-of-data state) the tape had
        # when it went off line: the drive is empty, the numbers are what they were.
        last = self.status()
        self._unloaded_status = TapeStatus.from_mtget(
            last.file_number, last.block_number, self._dsreg(),
            (last.gstat & ~mtio.GMT_ONLINE) | mtio.GMT_DR_OPEN)
        self._go_to_bot()
        self._loaded = False

    def _dsreg(self) -> int:
        return ((self._block_size << mtio.MT_ST_BLKSIZE_SHIFT) & mtio.MT_ST_BLKSIZE_MASK
                | (self._density << mtio.MT_ST_DENSITY_SHIFT) & mtio.MT_ST_DENSITY_MASK)

    def status(self) -> TapeStatus:
        self._require_open()
        dsreg = self._dsreg()
        if not self._loaded:
            if self._unloaded_status is not None:
                return self._unloaded_status
            return TapeStatus.from_mtget(-1, -1, dsreg, mtio.GMT_DR_OPEN)
        passed = self._marks_before(self._position)
        file_number = passed if self._file_known else -1
        if self._block_known:
            block_number = self._position - (self._marks[passed - 1] + 1 if passed else 0)
        else:
            block_number = -1
        gstat = mtio.GMT_ONLINE
        if self.write_protected:
            gstat |= mtio.GMT_WR_PROT
        if block_number == 0:
            gstat |= mtio.GMT_BOT if file_number == 0 else mtio.GMT_EOF
        if self._eof == _EofState.EOM_OK:
            gstat |= mtio.GMT_EOT
        elif self._eof > _EofState.EOM_OK:
            gstat |= mtio.GMT_EOD
        return TapeStatus.from_mtget(file_number, block_number, dsreg, gstat)

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            if self._loaded:
                self._end_file_if_writing()
        finally:
            os.close(self._fd)
            self._fd = -1
