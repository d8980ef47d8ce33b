"""StTape: a real tape drive through the Linux st driver, on its non-rewinding node /dev/nstN.

The st driver keeps the tape state (position, filemark and end-of-medium handling, the filemark
written at close after writes); this class turns the TapeDrive operations into read(), write()
and the MTIOCTOP / MTIOCGET / MTIOCPOS ioctls, st's errno values into TapeErrors, and asks the
drive what st does not say (block limits, compression) with SCSI commands through SG_IO.

One thing it adds: the early warning is always reported by the write that reaches it. st writes
a variable block asynchronously when it has to copy it into its own buffer: write() returns
before the drive has the block, and what became of it is reported by whatever call comes next,
also when that is MTIOCGET, MTWEOF (the filemark is then not written), a read or close(). So
StTape writes from a page-aligned buffer, which st maps for a direct, synchronous transfer (the
write that reaches the early-warning mark returns its byte count and the next one fails with
ENOSPC, as st.rst describes), and asks MTIOCGET after each write, which makes st finish an
asynchronous one (a block larger than st can map) and report it there: an ENOSPC then marks
that write as the one that reached the early warning (status() shows eot, the next write fails
with ENOSPC), any other error fails the write. MTIOCGET asks the driver, not the drive.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import mmap
import os
import time
from typing import Callable

from .. import scsi
from . import mtio
from .drive import BlockLimits, Compression, CompressionNotSwitchable, TapeDrive, TapeError, TapeStatus, check_count

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
# MTIOCTOP operations after which st keeps its end-of-medium state (st_int_ioctl's chg_eof).
_KEEP_EOM = {mtio.MTSETBLK, mtio.MTSETDENSITY, mtio.MTSETDRVBUFFER, mtio.MTCOMPRESSION, mtio.MTNOP}
_WARNED, _REFUSED = "warned", "refused"


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
        self._fd = -1
        self._bounce: mmap.mmap | None = None
        self._early_warning: str | None = None
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
        finally:
            if op not in _KEEP_EOM:
                self._early_warning = None

    def _query(self, request: int, layout: mtio.CStruct, name: str):
        try:
            return layout.unpack(self._ioctl(self._fd, request, bytes(layout.size)))
        except OSError as e:
            raise TapeError(e.errno, self.path, _explain(e.errno, name)) from None

    # Data.

    def write_block(self, data) -> int:
        view = memoryview(data).cast("B")
        what = f"write of {len(view)} bytes"
        if self._early_warning == _WARNED:
            # What st answers the write after the one that reached the early warning.
            self._early_warning = _REFUSED
            raise TapeError(errno.ENOSPC, self.path, f"{what}: refused past the early-warning mark "
                                                     f"(the next write is allowed)")
        past_warning = self._early_warning == _REFUSED
        self._early_warning = None
        try:
            written = os.write(self._fd, self._aligned(view))
        except OSError as e:
            raise TapeError(e.errno, self.path, _explain(e.errno, what)) from None
        try:
            self._query(mtio.MTIOCGET, mtio.mtget, "MTIOCGET")
        except TapeError as e:
            self._early_warning = _WARNED
            if e.errno == errno.ENOSPC:
                return written  # written, and past the early-warning mark
            if e.errno == errno.EIO and past_warning:
                # The drive could not take it: the physical end (VOLUME OVERFLOW), which st
                # reports as EIO for an asynchronous write and as ENOSPC for a direct one.
                raise TapeError(errno.ENOSPC, self.path, f"{what}: end of medium (physical end)") from None
            self._early_warning = None
            raise TapeError(e.errno, self.path, _explain(e.errno, f"{what} (reported when st "
                                                                  f"finished it)")) from None
        return written

    def _aligned(self, view: memoryview) -> memoryview:
        """The bytes to write, in a page-aligned buffer: st then maps it for a direct transfer
        instead of copying it into its own buffer and writing asynchronously."""
        size = len(view)
        if self._bounce is None or len(self._bounce) < size:
            if self._bounce is not None:
                self._bounce.close()
            self._bounce = mmap.mmap(-1, max(size, mmap.PAGESIZE))
        out = memoryview(self._bounce)[:size]
        out[:] = view
        return out

    def read_block(self, max_size: int) -> bytes:
        return self._read(lambda: os.read(self._fd, max_size), max_size)

    def read_block_into(self, buffer) -> int:
        return self._read(lambda: os.readv(self._fd, [buffer]), memoryview(buffer).nbytes)

    def _read(self, read: Callable, size: int):
        self._early_warning = None
        try:
            return read()
        except OSError as e:
            raise TapeError(e.errno, self.path, _explain(e.errno, f"read of up to {size} bytes")) from None

    def write_filemarks(self, count: int = 1) -> None:
        self._operation(mtio.MTWEOF, check_count(count))

    # Positioning.

    def rewind(self) -> None:
        self._operation(mtio.MTREW)

    def forward_space_files(self, count: int) -> None:
        self._space(mtio.MTFSF, check_count(count))

    def backward_space_files(self, count: int) -> None:
        self._space(mtio.MTBSF, check_count(count))

    def forward_space_records(self, count: int) -> None:
        self._space(mtio.MTFSR, check_count(count))

    def backward_space_records(self, count: int) -> None:
        self._space(mtio.MTBSR, check_count(count))

    def _space(self, op: int, count: int) -> None:
        """A space operation. st keeps no residual count a program can read, so when spacing
        stops early the error says where (from the status) and, where the file and block
        numbers (and, for MTFSR, the logical positions) before and after tell, after how many
        of the `count` filemarks or blocks. (A count of 0 is still sent: st takes any operation
        after a write as cancelling the filemark at close.)"""
        before = self._status_or_none()
        start = self._position_without_bot(before) if op == mtio.MTFSR and before else None
        try:
            self._operation(op, count)
        except TapeError as e:
            if e.errno != errno.EIO or before is None:
                raise
            detail = self._stopped(op, count, before, start)
            if detail is None:
                raise
            raise TapeError(errno.EIO, self.path, f"{mtio.OPERATION_NAMES[op]} {count}: {detail}") from None

    def _status_or_none(self) -> TapeStatus | None:
        try:
            return self.status()
        except TapeError:
            return None

    def _position_without_bot(self, status: TapeStatus) -> int | None:
        """The logical position, asked with MTIOCPOS only where it cannot be the beginning of
        the tape: st takes a READ POSITION there as knowing file and block 0, which st alone
        (and so VirtualTape) would not."""
        if status.block_number < 0 or status.file_number < 0:
            return None
        if status.file_number == 0:
            return status.block_number
        try:
            return self.tell()
        except TapeError:
            return None

    def _stopped(self, op: int, count: int, before: TapeStatus, start: int | None) -> str | None:
        after = self._status_or_none()
        if after is None:
            return None
        files = op in (mtio.MTFSF, mtio.MTBSF)
        if after.bot:
            where = "beginning of tape"
        elif after.eod:
            where = "end of data"
        elif not files:
            where = "filemark"
        else:
            return None
        passed = None
        if files:
            if before.file_number >= 0 and after.file_number >= 0:
                passed = abs(after.file_number - before.file_number)
        elif op == mtio.MTBSR:
            # Back to the filemark (or BOT) before this file's first block: every block before.
            passed = before.block_number if before.block_number >= 0 else None
        elif where == "filemark":
            end = self._position_without_bot(after)  # after a filemark: never the beginning
            if start is not None and end is not None:
                passed = end - start - 1
        elif before.block_number >= 0 and after.block_number >= 0:
            passed = after.block_number - before.block_number
        unit = "filemarks" if files else "blocks"
        if passed is None:
            return f"{where} within {count} {unit}"
        return f"{where} after {passed} of {count} {unit}"

    def erase(self) -> None:
        self._operation(mtio.MTERASE, 0)

    def seek_end_of_data(self) -> None:
        self._operation(mtio.MTEOM)

    def tell(self) -> int:
        return self._query(mtio.MTIOCPOS, mtio.mtpos, "MTIOCPOS").mt_blkno

    def seek(self, position: int) -> None:
        self._operation(mtio.MTSEEK, check_count(position))

    # Drive settings and state.

    def set_block_size(self, size: int) -> None:
        self._operation(mtio.MTSETBLK, size)

    def set_compression(self, enabled: bool) -> None:
        try:
            self._operation(mtio.MTCOMPRESSION, int(enabled))
        except TapeError as e:
            # st answers EIO when the drive has no changeable compression page (or no tape).
            if e.errno == errno.EIO and self.status().online:
                raise CompressionNotSwitchable(self.path, enabled) from None
            raise

    def compression(self) -> Compression | None:
        try:
            page = self._scsi(lambda fd, device: scsi.mode_sense(fd, 0x0F, device=device))
        except scsi.ScsiError as e:
            if e.is_sense(0x5):  # ILLEGAL REQUEST: no such mode page
                return None
            raise TapeError(e.errno or errno.EIO, self.path, f"reading the compression mode page: "
                                                            f"{_reason(e)}") from None
        if len(page) < 3:
            return None
        return Compression(capable=bool(page[2] & 0x40), enabled=bool(page[2] & 0x80))

    def block_limits(self) -> BlockLimits:
        def read_block_limits(fd: int, device: str) -> bytes:
            return scsi.command(fd, bytes([0x05, 0, 0, 0, 0, 0]), device=device, name="READ BLOCK LIMITS",
                                data_in=6)
        try:
            data = self._scsi(read_block_limits)
        except scsi.ScsiError as e:
            raise TapeError(e.errno or errno.EIO, self.path, f"READ BLOCK LIMITS: {_reason(e)}") from None
        if len(data) < 6:
            raise TapeError(errno.EIO, self.path, f"READ BLOCK LIMITS: {len(data)} bytes of answer, not 6")
        return BlockLimits(minimum=int.from_bytes(data[4:6], "big"), maximum=int.from_bytes(data[1:4], "big"),
                           granularity=data[0] & 0x1F)

    def _scsi(self, run: Callable[[int, str], bytes]) -> bytes:
        """Run a SCSI command that does not move the tape, through SG_IO: on the st node itself
        (st passes SG_IO to the SCSI midlayer) or, where that is refused, on the drive's SCSI
        generic node (/sys/class/scsi_tape/nstN/device/scsi_generic/sgM)."""
        try:
            return run(self._fd, self.path)
        except scsi.ScsiError as e:
            if e.errno not in (errno.ENOTTY, errno.EINVAL, errno.ENOSYS, errno.EPERM):
                raise
            generic = generic_node(self.path)
            if generic is None:
                raise
        fd = scsi.open_device(generic, what="tape drive's SCSI generic node")
        try:
            return run(fd, generic)
        finally:
            os.close(fd)

    def load(self) -> None:
        self._operation(mtio.MTLOAD)

    def unload(self) -> None:
        self._operation(mtio.MTOFFL)

    def status(self) -> TapeStatus:
        got = self._query(mtio.MTIOCGET, mtio.mtget, "MTIOCGET")
        # A 32-bit `long` carries GMT_EOF as a negative number.
        gstat = got.mt_gstat & 0xFFFFFFFF
        if self._early_warning == _WARNED:
            gstat |= mtio.GMT_EOT
        elif self._early_warning == _REFUSED:
            gstat |= mtio.GMT_EOD
        return TapeStatus.from_mtget(got.mt_fileno, got.mt_blkno, got.mt_dsreg, gstat)

    @classmethod
    def wait_until_ready(cls, path: str, *, timeout: float = 300.0, read_only: bool = False,
                         poll: float = 1.0) -> "StTape":
        """Open `path` once the drive holds a loaded tape: after a changer moved a cartridge in,
        the drive needs time to thread it and reports it with a unit attention that st takes
        at an open. Raises TapeError ENOMEDIUM (or what the last open said) after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                drive = cls(path, read_only=read_only)
            except TapeError as e:
                if e.errno not in (errno.EIO, errno.ENOMEDIUM, errno.EBUSY) or time.monotonic() >= deadline:
                    raise
            else:
                if drive.status().online:
                    return drive
                drive.close()
                if time.monotonic() >= deadline:
                    raise TapeError(errno.ENOMEDIUM, path, f"no tape loaded after waiting {timeout:g} s")
            time.sleep(poll)

    def close(self) -> None:
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            os.close(fd)
        except OSError as e:
            # st writes the closing filemark here; its failure surfaces as the close error.
            raise TapeError(e.errno, self.path, _explain(e.errno, "close (writing the final filemark)")) from None

    def __del__(self) -> None:
        # A drive left open would stay busy (EBUSY) for every other program until exit.
        if getattr(self, "_fd", -1) >= 0:
            try:
                self.close()
            except TapeError:
                pass


def generic_node(path: str) -> str | None:
    """The SCSI generic node (/dev/sgN) of the st drive at `path` (/dev/nstN), from sysfs."""
    name = os.path.basename(os.path.realpath(path))
    for found in sorted(glob.glob(f"/sys/class/scsi_tape/{name}/device/scsi_generic/sg*")):
        return "/dev/" + os.path.basename(found)
    return None


def _reason(error: scsi.ScsiError) -> str:
    return str(error).split(": ", 2)[-1]


def _explain(error: int, what: str) -> str:
    meaning = _MEANING.get(error)
    return f"{what}: {meaning}" if meaning else what
