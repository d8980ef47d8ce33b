"""StTape: a real tape drive through the Linux st driver, on its non-rewinding node /dev/nstN.

The st driver keeps the tape state (position, filemark and end-of-medium handling, the filemark
written at close after writes); this class only turns the TapeDrive operations into read(),
write() and the MTIOCTOP / MTIOCGET / MTIOCPOS ioctls, and st's errno values into TapeErrors.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Callable

from . import mtio
from .drive import TapeDrive, TapeError, TapeStatus, check_count

# What each errno means coming from st (Documentation/scsi/st.rst, drivers/scsi/st.c).
_MEANING = {
    errno.ENOSPC: "end of medium (early warning or physical end)",
    errno.EACCES: "the tape is write-protected",
    errno.EROFS: "the tape is write-protected",
    errno.ENOMEM: "the block is larger than the read buffer",
    errno.ENOMEDIUM: "no tape in the drive",
    errno.EBUSY: "the drive is in use by another program",
    errno.EINVAL: "refused as invalid (block size, block mode or drive limits)",
}


class StTape(TapeDrive):
    """A SCSI tape drive through st. Use the non-rewinding node (/dev/nst0): on /dev/st0 every
    close rewinds.

    The node is opened with O_NONBLOCK, which st.rst describes as opening even when the drive
    holds no tape (so load() can be used) or a write-protected tape (writes then fail with
    EACCES and status() shows write_protected). `ioctl` stands in for fcntl.ioctl(fd, request,
    arg_bytes) -> bytes so tests can record the requests without a drive.
    """

    def __init__(self, path: str, *, read_only: bool = False,
                 ioctl: Callable[[int, int, bytes], bytes] = fcntl.ioctl):
        self.path = os.fspath(path)
        self._ioctl = ioctl
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags)
        except OSError as e:
            what = "cannot open the tape drive"
            if e.errno == errno.EBUSY:
                what += ": " + _MEANING[errno.EBUSY]
            raise TapeError(e.errno, self.path, what) from None
        try:
            self.status()
        except TapeError as e:
            self.close()
            if e.errno in (errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
                raise TapeError(errno.ENOTTY, self.path, "not a tape drive (MTIOCGET refused)") from None
            raise

    def _operation(self, op: int, count: int = 1) -> None:
        try:
            self._ioctl(self._fd, mtio.MTIOCTOP, mtio.mtop.pack(op, count))
        except OSError as e:
            what = f"{mtio.OPERATION_NAMES[op]} {count}"
            raise TapeError(e.errno, self.path, _explain(e.errno, what)) from None

    def _query(self, request: int, layout: mtio.CStruct, name: str):
        try:
            return layout.unpack(self._ioctl(self._fd, request, bytes(layout.size)))
        except OSError as e:
            raise TapeError(e.errno, self.path, _explain(e.errno, name)) from None

    def write_block(self, data) -> int:
        try:
            return os.write(self._fd, data)
        except OSError as e:
            raise TapeError(e.errno, self.path, _explain(e.errno, f"write of {len(data)} bytes")) from None

    def read_block(self, max_size: int) -> bytes:
        try:
            return os.read(self._fd, max_size)
        except OSError as e:
            raise TapeError(e.errno, self.path, _explain(e.errno, f"read of up to {max_size} bytes")) from None

    def read_block_into(self, buffer) -> int:
        try:
            return os.readv(self._fd, [buffer])
        except OSError as e:
            size = memoryview(buffer).nbytes
            raise TapeError(e.errno, self.path, _explain(e.errno, f"read of up to {size} bytes")) from None

    def write_filemarks(self, count: int = 1) -> None:
        self._operation(mtio.MTWEOF, check_count(count))

    def rewind(self) -> None:
        self._operation(mtio.MTREW)

    def forward_space_files(self, count: int) -> None:
        self._operation(mtio.MTFSF, check_count(count))

    def backward_space_files(self, count: int) -> None:
        self._operation(mtio.MTBSF, check_count(count))

    def forward_space_records(self, count: int) -> None:
        self._operation(mtio.MTFSR, check_count(count))

    def backward_space_records(self, count: int) -> None:
        self._operation(mtio.MTBSR, check_count(count))

    def seek_end_of_data(self) -> None:
        self._operation(mtio.MTEOM)

    def set_block_size(self, size: int) -> None:
        self._operation(mtio.MTSETBLK, size)

    def set_compression(self, enabled: bool) -> None:
        self._operation(mtio.MTCOMPRESSION, int(enabled))

    def load(self) -> None:
        self._operation(mtio.MTLOAD)

    def unload(self) -> None:
        self._operation(mtio.MTOFFL)

    def status(self) -> TapeStatus:
        got = self._query(mtio.MTIOCGET, mtio.mtget, "MTIOCGET")
        # A 32-bit `long` carries GMT_EOF as a negative number.
        return TapeStatus.from_mtget(got.mt_fileno, got.mt_blkno, got.mt_dsreg, got.mt_gstat & 0xFFFFFFFF)

    def tell(self) -> int:
        return self._query(mtio.MTIOCPOS, mtio.mtpos, "MTIOCPOS").mt_blkno

    def seek(self, position: int) -> None:
        self._operation(mtio.MTSEEK, check_count(position))

    def close(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            os.close(fd)
        except OSError as e:
            # st writes the closing filemark here; its failure surfaces as the close error.
            raise TapeError(e.errno, self.path, _explain(e.errno, "close (writing the final filemark)")) from None


def _explain(error: int, what: str) -> str:
    meaning = _MEANING.get(error)
    return f"{what}: {meaning}" if meaning else what
