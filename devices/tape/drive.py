"""What a tape drive does, as the Linux st driver presents it to a program.

`TapeDrive` is the one interface the engine uses; `StTape` implements it with the st ioctls on a
real /dev/nstN and `VirtualTape` with a SIMH .tap file. Both follow Documentation/scsi/st.rst:

- A tape is a sequence of blocks (records) and filemarks. A tape file is the blocks between two
  filemarks; files are numbered from 0 at the beginning of tape (BOT), blocks from 0 within a file.
- In variable block mode (block size 0) one write is one block of any size and one read returns
  one block; a read buffer smaller than the block fails with ENOMEM. In fixed block mode, writes
  and reads are whole multiples of the block size.
- A read of a filemark returns 0 bytes and leaves the tape after it; end of data shows as a second
  0-byte read after a filemark, then EIO.
- Writing anywhere ends the recorded data there: what followed is gone.
- Closing the device after writes writes a filemark, also when the program is killed (the kernel
  closes its descriptor): a killed writer's last file is closed, but holds whatever it got to.
- Past the early-warning mark near the end of the medium, writes alternately succeed and fail
  with ENOSPC (see VirtualTape); at the physical end every write fails with ENOSPC.
- `status()` file and block numbers are -1 where st cannot know them (after a backward filemark
  space, a seek or a space to end of data).

The helpers on the base class (`skip_to_file`, `read_file`, `write_stream`) are built only on the
operations, so they behave the same on a real and a virtual drive.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
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
        )


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
    def seek_end_of_data(self) -> None:
        """Go to the end of recorded data (MTEOM), where the next write appends a new file."""

    @abstractmethod
    def set_block_size(self, size: int) -> None:
        """Set the block size; 0 selects variable block mode."""

    @abstractmethod
    def set_compression(self, enabled: bool) -> None:
        """Switch the drive's hardware compression on or off."""

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

    def write_stream(self, chunks: Iterable, block_size: int) -> int:
        """Write a byte stream as blocks of `block_size` bytes; the last block may be shorter.

        Chunk boundaries do not matter: whole blocks inside a chunk are written from the
        caller's memory without a copy. Returns the bytes written. Meant for variable block
        mode; a caller that spans cartridges at ENOSPC uses write_block itself.
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
                total += self.write_block(pending)
                pending = bytearray()
            whole = len(view) - len(view) % block_size
            for start in range(0, whole, block_size):
                total += self.write_block(view[start:start + block_size])
            pending += view[whole:]
        if pending:
            total += self.write_block(pending)
        return total
