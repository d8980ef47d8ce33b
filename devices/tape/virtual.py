"""VirtualTape: a tape drive emulated on a SIMH .tap file, behaving as Linux st does.

Three parts: the .tap file and its record format (simh.py, SimhTapeFile), the head's position
and its moves as st reads and spaces (virtual_head.py, Head), and here the drive that checks
each request and holds the drive's settings. This docstring describes what the three do together.

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
filemark at close, as in st. Opening a VirtualTape starts at the beginning of the tape, as after
a rewind, unless it `remembers_position`: then, like st's non-rewinding device, it stands where
the last close left it (a sidecar file FILE.tap.pos keeps the position, the numbers st knows and
the block size, valid only while the .tap file is exactly as that close left it), so that
`mt`-style commands, one process each, rehearse on a file what they do to a drive.

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
"""

from __future__ import annotations

import errno
import json
import os

from . import mtio
from .drive import (BlockLimits, Compression, CompressionNotSwitchable, TapeDrive, TapeError, TapeStatus,
                    check_count)
from .simh import FILEMARK_BYTES, LARGEST_BLOCK, HostFileError, SimhTapeFile, record_bytes
from .streaming import StreamingModel
from .virtual_head import EofState, Head

__all__ = ["DEFAULT_EARLY_WARNING", "HostFileError", "VirtualTape"]

DEFAULT_EARLY_WARNING = 32 << 20
# Beside FILE.tap: where a tape that remembers its position keeps it between opens.
POSITION_SUFFIX = ".pos"


class VirtualTape(TapeDrive):
    """A tape drive with a SIMH .tap file as its cartridge; see the module docstring.

    `capacity` (bytes of .tap file, None = unlimited) and `early_warning` (bytes before it;
    default the smaller of 32 MiB and a tenth of the capacity) model the end of the medium.
    `write_protected` models the cartridge's write-protect tab; a file that cannot be opened
    for writing is write-protected too. `create` makes a missing file an empty tape.
    The drive's facts are configured: `block_limits` (default 1 byte to 16 MiB - 1, st's
    largest block), whether it can switch compression (`compression_capable`; if not,
    set_compression raises CompressionNotSwitchable as st's EIO does) and the `density` code
    status() reports (0: the default). `streaming`, a StreamingModel, counts the back-hitches
    a real drive would make at the rate the writes come.
    """

    def __init__(self, path, capacity: int | None = None, early_warning: int | None = None,
                 write_protected: bool = False, create: bool = True, *,
                 block_limits: BlockLimits | None = None, compression_capable: bool = True,
                 density: int = 0, remembers_position: bool = False, streaming: StreamingModel | None = None):
        self.path = os.fspath(path)
        self._limits = block_limits or BlockLimits(1, LARGEST_BLOCK)
        if not 1 <= self._limits.minimum <= self._limits.maximum <= LARGEST_BLOCK:
            raise ValueError(f"block limits {self._limits} must lie within 1..{LARGEST_BLOCK}")
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
        self._compression = compression_capable
        self._file = SimhTapeFile(self.path, writable=not write_protected, create=create)
        self.write_protected = self._file.read_only
        self._head = Head(self._file)
        self._loaded = True
        self._unloaded_status: TapeStatus | None = None
        self._block_size = 0
        self._writing = False
        # A drive's buffer and slowest tape speed, to count back-hitches (streaming.py).
        self.streaming = streaming
        self._position_file = self.path + POSITION_SUFFIX if remembers_position else None
        if self._position_file:
            self._restore_position()

    def _restore_position(self) -> None:
        assert self._position_file is not None
        try:
            with open(self._position_file) as f:
                saved = json.load(f)
            st = os.stat(self.path)
            if (saved["size"], saved["mtime_ns"]) != (st.st_size, st.st_mtime_ns):
                return          # the file changed since: the tape is where a new cartridge is, at BOT
            self._head.seek(int(saved["position"]))
            self._head.file_known, self._head.block_known = bool(saved["file_known"]), bool(saved["block_known"])
            self._block_size = int(saved["block_size"])
        except (OSError, ValueError, KeyError, TypeError, TapeError):
            self._head.to_bot()

    def _save_position(self) -> None:
        assert self._position_file is not None
        try:
            if not self._loaded:
                os.unlink(self._position_file)
                return
            st = os.stat(self.path)
            saved = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "position": self._head.position,
                     "file_known": self._head.file_known, "block_known": self._head.block_known,
                     "block_size": self._block_size}
            temporary = f"{self._position_file}.{os.getpid()}"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(saved, f)
            os.replace(temporary, self._position_file)
        except FileNotFoundError:
            pass
        except OSError:
            pass        # the position is a convenience: a tape that cannot keep it starts at BOT

    def is_blank(self) -> bool:
        """Whether nothing is recorded on the tape; known from the file, without moving the tape."""
        self._require_tape()
        return not self._file.exists(0)

    def _error(self, error: int, what: str) -> TapeError:
        return TapeError(error, self.path, what)

    def _require_open(self, *, reading: bool = False) -> None:
        if self._file.closed:
            raise self._error(errno.EBADF, "the virtual tape is closed")
        if not reading:
            self._head.drop_buffer()

    def _require_tape(self, *, reading: bool = False) -> None:
        self._require_open(reading=reading)
        if not self._loaded:
            raise self._error(errno.ENOMEDIUM, "no tape loaded (it was unloaded)")

    def _require_loaded_for_scsi(self, what: str) -> None:
        """st answers EIO, not ENOMEDIUM, for MTIOCPOS, MTSEEK and MTCOMPRESSION without a tape."""
        self._require_open()
        if not self._loaded:
            raise self._error(errno.EIO, f"{what}: no tape loaded (it was unloaded)")

    # Writing.

    def _check_room(self, size: int, error: int, what: str) -> int:
        """The end offset of `size` bytes written here; fails as st does past the physical end."""
        end = self._file.offset(self._head.position) + size
        if self.capacity is not None and end > self.capacity:
            self._head.eof = EofState.EOM_OK
            raise self._error(error, what)
        return end

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
        head = self._head
        if head.eof == EofState.EOM_OK:
            head.eof = EofState.EOD_1
            raise self._error(errno.ENOSPC, f"write of {size} bytes refused past the early-warning "
                                            "mark (the next write is allowed)")
        self._writing = True
        end = self._check_room(record_bytes(blocks), errno.ENOSPC, f"write of {size} bytes: end of medium")
        self._file.write_blocks(head.position, blocks)
        head.position += len(blocks)
        past_warning = self.capacity is not None and end > self.capacity - self.early_warning
        if past_warning or head.eof == EofState.EOD_1:
            head.eof = EofState.EOM_OK
        else:
            head.eof = EofState.NOEOF
        if self.streaming is not None:
            self.streaming.wrote(size)
        return size

    def write_filemarks(self, count: int = 1) -> None:
        self._require_tape()
        check_count(count)
        if self.write_protected:
            raise self._error(errno.EACCES, "writing a filemark: the tape is write-protected")
        self._writing = False
        if self.streaming is not None:
            self.streaming.stopped()
        if count:
            self._check_room(count * FILEMARK_BYTES, errno.EIO, "no room for a filemark at the end of the medium")
            self._file.write_filemarks(self._head.position, count)
            self._head.position += count
            self._head.block_known = True
        self._head.eof = EofState.NOEOF

    def _end_file_if_writing(self) -> bool:
        """st writes a filemark before moving the tape away from data just written."""
        if not self._writing:
            return False
        self.write_filemarks(1)
        return True

    # Reading.

    def _check_read(self, max_size: int) -> None:
        self._require_tape(reading=True)
        if max_size <= 0:
            raise ValueError(f"read size must be positive, not {max_size}")
        if not self._block_size and not self._limits.allows(max_size):
            raise self._error(errno.EINVAL, f"read of up to {max_size} bytes: outside the drive's block "
                                            f"limits {self._limits.minimum}..{self._limits.maximum}")
        self._writing = False

    def read_block(self, max_size: int) -> bytes:
        self._check_read(max_size)
        return self._head.read(max_size, self._block_size)

    def read_block_into(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        self._check_read(len(view))
        return self._head.read_into(view, self._block_size)

    # Positioning.

    def rewind(self) -> None:
        self._require_tape()
        self._end_file_if_writing()
        self._head.to_bot()

    def forward_space_files(self, count: int) -> None:
        self._require_tape()
        check_count(count)
        self._writing = False
        self._head.forward_space_files(count)

    def backward_space_files(self, count: int) -> None:
        self._require_tape()
        check_count(count)
        if self._end_file_if_writing():
            count += 1
        self._writing = False
        self._head.backward_space_files(count)

    def forward_space_records(self, count: int) -> None:
        self._require_tape()
        check_count(count)
        self._writing = False
        self._head.forward_space_records(count)

    def backward_space_records(self, count: int) -> None:
        self._require_tape()
        check_count(count)
        self._writing = False
        self._head.backward_space_records(count)

    def erase(self) -> None:
        self._require_tape()
        if self.write_protected:
            raise self._error(errno.EACCES, "MTERASE: the tape is write-protected")
        self._writing = False
        self._file.erase_from(self._head.position)
        self._head.eof = EofState.NOEOF

    def seek_end_of_data(self) -> None:
        self._require_tape()
        self._writing = False
        self._head.to_end_of_data()

    def tell(self) -> int:
        self._require_loaded_for_scsi("MTIOCPOS")
        return self._head.tell()

    def seek(self, position: int) -> None:
        self._require_loaded_for_scsi(f"MTSEEK {position}")
        check_count(position)
        self._end_file_if_writing()
        self._writing = False
        self._head.seek(position)

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
        self._head.to_bot()

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
        self._head.to_bot()
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
        file_number, block_number = self._head.numbers()
        gstat = mtio.GMT_ONLINE
        if self.write_protected:
            gstat |= mtio.GMT_WR_PROT
        if block_number == 0:
            gstat |= mtio.GMT_BOT if file_number == 0 else mtio.GMT_EOF
        if self._head.eof == EofState.EOM_OK:
            gstat |= mtio.GMT_EOT
        elif self._head.eof > EofState.EOM_OK:
            gstat |= mtio.GMT_EOD
        return TapeStatus.from_mtget(file_number, block_number, dsreg, gstat)

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            if self._loaded:
                self._end_file_if_writing()
        finally:
            self._file.seal()
            self._file.close()
            if self._position_file:
                self._save_position()
