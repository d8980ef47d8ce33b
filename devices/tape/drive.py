"""What a tape drive does, as the Linux st driver presents it to a program.

`TapeDrive` is the one interface the engine uses; `StTape` implements it with the st ioctls on a
real /dev/nstN and `VirtualTape` with a SIMH .tap file. Both follow Documentation/scsi/st.rst,
and where the two were found to differ (running the same conformance suite on both, the real
one in the VM rig of ../shared/vm-tape), st's behaviour is what is written here:

- A tape is a sequence of blocks (records) and filemarks. A tape file is the blocks between two
  filemarks; files are numbered from 0 at the beginning of tape (BOT), blocks from 0 within a file.
- In variable block mode (block size 0) one write is one block of any size within the drive's
  block limits (block_limits(); a write or read buffer outside them fails with EINVAL before the
  tape moves) and one read returns one block; a read buffer smaller than the block fails with
  ENOMEM and leaves the tape after that block.
- In fixed block mode writes are whole multiples of the block size; reads need not be: what is
  left of the last block read is returned by the next read, and dropped by any other call (the
  block counts as read). st asks the drive for all the blocks a read needs (after a read that was
  not a multiple, for 32 KiB of them): when the end of data comes among them before a filemark,
  none of them is returned (EIO; 0 bytes right after a filemark).
- A read of a filemark returns 0 bytes and leaves the tape after it; end of data shows as a second
  0-byte read after a filemark, then EIO. A read at an end of data not preceded by a filemark
  fails with EIO at once.
- Writing anywhere ends the recorded data there: what followed is gone. erase() ends it here.
- Closing the device after writes writes a filemark, also when the program is killed (the kernel
  closes its descriptor): a killed writer's last file is closed, but holds whatever it got to.
  So do rewind(), unload(), seek() and backward_space_files() before they move the tape. Any
  other operation after a write, except set_block_size(), status() and tell(), cancels that
  filemark.
- Past the early-warning mark near the end of the medium, writes alternately succeed and fail
  with ENOSPC (the write that reaches the mark succeeds, status() shows eot; a refused one shows
  eod); at the physical end every write fails with ENOSPC. Filemarks are written in the zone.
- `status()` file and block numbers are -1 where st does not know them: the block number after
  a backward filemark space, a space to end of data or a failed read; both after a seek (unless
  to 0). tell() (MTIOCPOS) at BOT makes them known (file 0, block 0), as does a backward space
  that stops at BOT.
- Without a tape (after unload()), status() goes on reporting the file and block numbers the
  tape had when it went off line, not online and door open; reads, writes and moves fail with
  ENOMEDIUM, tell(), seek() and set_compression() with EIO. load() brings the tape back at BOT.
- The block size and compression are the drive's settings: they stay when a cartridge is
  unloaded and another loaded, and st keeps them from one open of /dev/nstN to the next (set
  them after opening). A StTape opened on the non-rewinding node stays where the tape was; a
  VirtualTape opens at BOT in variable block mode.

The helpers on the base class (`skip_to_file`, `read_file`) are built only on the operations,
so they behave the same on a real and a virtual drive.
"""

from __future__ import annotations

import errno
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import DeviceError
from . import mtio


class TapeError(DeviceError, OSError):
    """A tape operation failed; `errno` is what the st driver returns for it (ENOSPC, EIO, ...)."""

    def __init__(self, errno: int, device: str, what: str):
        super().__init__(errno, os.strerror(errno), device)
        self.what = what

    def __str__(self) -> str:
        return f"{self.filename}: {self.what}: {self.strerror}"


@dataclass(frozen=True)
class TapeStatus:
    """The drive status of MTIOCGET, decoded.

    `file_number` and `block_number` are -1 when the position within the tape is not known
    (st reports that after MTBSF, MTSEEK and MTEOM). `block_size` 0 means variable block mode.
    `eot` is st's GMT_EOT: a write reached the early-warning zone near the end of the medium.
    `eod` is GMT_EOD: the tape is at the end of recorded data (after MTEOM or a read past it).
    `density` is the density code of the medium as the drive reported it when the tape was
    opened or loaded (the SCSI block descriptor; on LTO the generation, see lto.py), 0 when the
    drive reports the default.
    """

    file_number: int
    block_number: int
    block_size: int
    bot: bool
    eof: bool
    eot: bool
    eod: bool
    write_protected: bool
    online: bool
    gstat: int
    density: int = 0

    @classmethod
    def from_mtget(cls, file_number: int, block_number: int, dsreg: int, gstat: int) -> "TapeStatus":
        return cls(
            file_number=file_number,
            block_number=block_number,
            block_size=(dsreg & mtio.MT_ST_BLKSIZE_MASK) >> mtio.MT_ST_BLKSIZE_SHIFT,
            bot=bool(gstat & mtio.GMT_BOT),
            eof=bool(gstat & mtio.GMT_EOF),
            eot=bool(gstat & mtio.GMT_EOT),
            eod=bool(gstat & mtio.GMT_EOD),
            write_protected=bool(gstat & mtio.GMT_WR_PROT),
            online=bool(gstat & mtio.GMT_ONLINE),
            gstat=gstat,
            density=(dsreg & mtio.MT_ST_DENSITY_MASK) >> mtio.MT_ST_DENSITY_SHIFT,
        )


@dataclass(frozen=True)
class BlockLimits:
    """What READ BLOCK LIMITS reports: the smallest and largest block the drive reads and
    writes in variable block mode (st refuses a read or write of another size with EINVAL before
    the tape moves), and the granularity of fixed block sizes (a multiple of 2**granularity)."""

    minimum: int
    maximum: int
    granularity: int = 0

    def allows(self, size: int) -> bool:
        """Whether a block (or a read buffer) of `size` bytes is within the limits."""
        return self.minimum <= size <= self.maximum

    def check(self, size: int, what: str = "block size") -> None:
        """Raise ValueError, naming the limits, when `size` is outside them."""
        if not self.allows(size):
            raise ValueError(f"{what} {size} is outside the drive's block limits "
                             f"{self.minimum}..{self.maximum} bytes")


@dataclass(frozen=True)
class Compression:
    """The drive's hardware compression (the Data Compression mode page): whether it can
    compress at all (DCC) and whether it compresses what is written now (DCE)."""

    capable: bool
    enabled: bool


class CompressionNotSwitchable(TapeError):
    """MTCOMPRESSION failed with EIO on a loaded drive: the drive cannot switch compression (it
    has no compression, or no changeable Data Compression mode page). Data is written as the
    drive does by itself; a program can warn and go on."""

    def __init__(self, device: str, enabled: bool):
        super().__init__(errno.EIO, device, f"MTCOMPRESSION {int(enabled)}: the drive cannot switch "
                                            f"its hardware compression {'on' if enabled else 'off'}")
        self.enabled = enabled


def check_count(count: int) -> int:
    """A repeat count or position for a tape operation, which must not be negative (st would
    take a negative count as the same operation in the opposite direction)."""
    if count < 0:
        raise ValueError(f"tape operation count must not be negative, not {count}")
    return count


class TapeDrive(ABC):
    """A tape drive positioned somewhere on a loaded tape; see the module docstring."""

    path: str

    @abstractmethod
    def write_block(self, data) -> int:
        """Write `data` as one block (variable mode) or as len(data)/block_size blocks (fixed).

        Returns the bytes written. Raises TapeError ENOSPC at the end of the medium, EACCES
        when the tape is write-protected, EINVAL in fixed mode for a partial block.
        """

    @abstractmethod
    def read_block(self, max_size: int) -> bytes:
        """Read the next block (fixed mode: up to max_size // block_size blocks).

        Returns b"" for a filemark, leaving the tape after it. Raises TapeError ENOMEM when the
        block is larger than max_size, EIO past the end of data.
        """

    @abstractmethod
    def read_block_into(self, buffer) -> int:
        """As read_block, into a writable buffer; returns the byte count (0 for a filemark)."""

    @abstractmethod
    def write_filemarks(self, count: int = 1) -> None:
        """Write `count` filemarks at the current position, ending the tape file."""

    @abstractmethod
    def rewind(self) -> None:
        """Go to the beginning of the tape (a filemark is written first after a write)."""

    @abstractmethod
    def forward_space_files(self, count: int) -> None:
        """Space forward over `count` filemarks, to the first block of the file after the last."""

    @abstractmethod
    def backward_space_files(self, count: int) -> None:
        """Space backward over `count` filemarks, stopping before (on the BOT side of) the last."""

    @abstractmethod
    def forward_space_records(self, count: int) -> None:
        """Space forward over `count` blocks; EIO if a filemark (then passed) or end of data stops it."""

    @abstractmethod
    def backward_space_records(self, count: int) -> None:
        """Space backward over `count` blocks; EIO if a filemark (not passed) or BOT stops it."""

    @abstractmethod
    def erase(self) -> None:
        """Erase from here to the end of the tape (MTERASE, short): the end of data is here."""

    @abstractmethod
    def seek_end_of_data(self) -> None:
        """Go to the end of recorded data (MTEOM), where the next write appends a new file."""

    @abstractmethod
    def set_block_size(self, size: int) -> None:
        """Set the block size; 0 selects variable block mode."""

    @abstractmethod
    def set_compression(self, enabled: bool) -> None:
        """Switch the drive's hardware compression on or off. Raises CompressionNotSwitchable
        (a TapeError with errno EIO) when the drive cannot switch it."""

    @abstractmethod
    def compression(self) -> Compression | None:
        """The drive's hardware compression state, None when the drive has no Data Compression
        mode page. Does not move the tape."""

    @abstractmethod
    def block_limits(self) -> BlockLimits:
        """The drive's block limits (READ BLOCK LIMITS). Does not move the tape."""

    @abstractmethod
    def load(self) -> None:
        """Load the tape and position it at BOT."""

    @abstractmethod
    def unload(self) -> None:
        """Rewind and take the tape off line (MTOFFL); a filemark is written first after a write."""

    @abstractmethod
    def status(self) -> TapeStatus:
        """The drive status (MTIOCGET)."""

    @abstractmethod
    def tell(self) -> int:
        """The logical position (MTIOCPOS): blocks and filemarks from BOT."""

    @abstractmethod
    def seek(self, position: int) -> None:
        """Go to a logical position returned by tell() (MTSEEK)."""

    @abstractmethod
    def close(self) -> None:
        """Release the drive. After writes, a filemark is written first (as st does on close)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def skip_to_file(self, file_number: int) -> None:
        """Position at the first block of tape file `file_number`."""
        if file_number < 0:
            raise ValueError(f"tape file numbers start at 0, not {file_number}")
        if file_number == 0:
            self.rewind()
            return
        here = self.status()
        if here.file_number < 0:
            self.rewind()
            self.forward_space_files(file_number)
        elif file_number > here.file_number:
            self.forward_space_files(file_number - here.file_number)
        elif file_number < here.file_number or here.block_number != 0:
            # Back over the filemark that ends the previous file, then forward past it: this
            # is how a drive finds the start of a file without reading it.
            self.backward_space_files(here.file_number - file_number + 1)
            self.forward_space_files(1)

    def read_file(self, max_block_size: int) -> Iterator[bytes]:
        """The blocks from here to the next filemark; the tape is left after the filemark."""
        while block := self.read_block(max_block_size):
            yield block
