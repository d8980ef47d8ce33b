"""SCSI commands through the Linux SG_IO ioctl (include/scsi/sg.h), with sense data decoded.

SG_IO works on a SCSI generic node (/dev/sgN) and on the nodes of drivers that pass it through
to the SCSI midlayer, st's /dev/nstN among them (both need CAP_SYS_RAWIO). `command()` sends one
CDB and returns the data the device sent; a CHECK CONDITION, a transport error or an ioctl
failure raises `ScsiError`, one line naming the device, the command and what the sense data says
("/dev/sg2: MOVE MEDIUM: ILLEGAL REQUEST, medium source element empty (ASC/ASCQ 0x3b/0x0e)").
A UNIT ATTENTION (a cartridge was loaded, the device was reset) is retried: it reports an event,
not a failure of the command.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from dataclasses import dataclass

from .errors import DeviceError

SG_IO = 0x2285
SG_INTERFACE_ID = ord("S")
SG_DXFER_NONE = -1
SG_DXFER_TO_DEV = -2
SG_DXFER_FROM_DEV = -3
SG_INFO_OK_MASK = 0x1
SENSE_BUFFER_SIZE = 96
CHECK_CONDITION = 0x02
DEFAULT_TIMEOUT_MS = 60_000


class SgIoHdr(ctypes.Structure):
    """struct sg_io_hdr of include/scsi/sg.h (native layout)."""

    _fields_ = [
        ("interface_id", ctypes.c_int),
        ("dxfer_direction", ctypes.c_int),
        ("cmd_len", ctypes.c_ubyte),
        ("mx_sb_len", ctypes.c_ubyte),
        ("iovec_count", ctypes.c_ushort),
        ("dxfer_len", ctypes.c_uint),
        ("dxferp", ctypes.c_void_p),
        ("cmdp", ctypes.c_void_p),
        ("sbp", ctypes.c_void_p),
        ("timeout", ctypes.c_uint),
        ("flags", ctypes.c_uint),
        ("pack_id", ctypes.c_int),
        ("usr_ptr", ctypes.c_void_p),
        ("status", ctypes.c_ubyte),
        ("masked_status", ctypes.c_ubyte),
        ("msg_status", ctypes.c_ubyte),
        ("sb_len_wr", ctypes.c_ubyte),
        ("host_status", ctypes.c_ushort),
        ("driver_status", ctypes.c_ushort),
        ("resid", ctypes.c_int),
        ("duration", ctypes.c_uint),
        ("info", ctypes.c_uint),
    ]


SENSE_KEYS = {
    0x0: "NO SENSE", 0x1: "RECOVERED ERROR", 0x2: "NOT READY", 0x3: "MEDIUM ERROR",
    0x4: "HARDWARE ERROR", 0x5: "ILLEGAL REQUEST", 0x6: "UNIT ATTENTION", 0x7: "DATA PROTECT",
    0x8: "BLANK CHECK", 0x9: "VENDOR SPECIFIC", 0xA: "COPY ABORTED", 0xB: "ABORTED COMMAND",
    0xD: "VOLUME OVERFLOW", 0xE: "MISCOMPARE",
}
UNIT_ATTENTION = 0x6
NOT_READY = 0x2

# The additional sense codes a tape drive or a medium changer reports in practice (SPC-4 annex).
ADDITIONAL_SENSE = {
    (0x00, 0x00): "no additional sense information",
    (0x00, 0x01): "filemark detected",
    (0x00, 0x02): "end-of-partition/medium detected",
    (0x00, 0x04): "beginning-of-partition/medium detected",
    (0x00, 0x05): "end-of-data detected",
    (0x04, 0x00): "logical unit not ready",
    (0x04, 0x01): "logical unit is in process of becoming ready",
    (0x04, 0x02): "logical unit not ready, initializing command required",
    (0x04, 0x03): "logical unit not ready, manual intervention required",
    (0x04, 0x12): "logical unit not ready, offline",
    (0x14, 0x00): "recorded entity not found",
    (0x1A, 0x00): "parameter list length error",
    (0x20, 0x00): "invalid command operation code",
    (0x21, 0x01): "invalid element address",
    (0x24, 0x00): "invalid field in CDB",
    (0x25, 0x00): "logical unit not supported",
    (0x26, 0x00): "invalid field in parameter list",
    (0x27, 0x00): "write protected",
    (0x28, 0x00): "not ready to ready change, medium may have changed",
    (0x28, 0x01): "import or export element accessed",
    (0x29, 0x00): "power on, reset, or bus device reset occurred",
    (0x2A, 0x01): "mode parameters changed",
    (0x30, 0x00): "incompatible medium installed",
    (0x30, 0x03): "cleaning cartridge installed",
    (0x31, 0x00): "medium format corrupted",
    (0x3A, 0x00): "medium not present",
    (0x3B, 0x00): "sequential positioning error",
    (0x3B, 0x0D): "medium destination element full",
    (0x3B, 0x0E): "medium source element empty",
    (0x3B, 0x11): "medium magazine not accessible",
    (0x3B, 0x12): "medium magazine removed",
    (0x3B, 0x1A): "data transfer element removed",
    (0x3F, 0x01): "microcode has been changed",
    (0x44, 0x00): "internal target failure",
    (0x50, 0x00): "write append error",
    (0x53, 0x00): "media load or eject failed",
    (0x53, 0x02): "medium removal prevented",
}


@dataclass(frozen=True)
class Sense:
    """Decoded sense data (fixed format 0x70/0x71 or descriptor format 0x72/0x73)."""

    key: int
    asc: int
    ascq: int
    filemark: bool = False
    end_of_medium: bool = False
    incorrect_length: bool = False
    information: int | None = None
    deferred: bool = False

    @classmethod
    def parse(cls, data: bytes) -> "Sense | None":
        if len(data) < 2:
            return None
        code = data[0] & 0x7F
        if code in (0x70, 0x71) and len(data) >= 3:
            flags = data[2]
            information = int.from_bytes(data[3:7], "big") if data[0] & 0x80 and len(data) >= 7 else None
            return cls(key=flags & 0x0F, asc=data[12] if len(data) > 12 else 0,
                       ascq=data[13] if len(data) > 13 else 0, filemark=bool(flags & 0x80),
                       end_of_medium=bool(flags & 0x40), incorrect_length=bool(flags & 0x20),
                       information=information, deferred=code == 0x71)
        if code in (0x72, 0x73) and len(data) >= 4:
            sense = cls(key=data[1] & 0x0F, asc=data[2], ascq=data[3], deferred=code == 0x73)
            offset, end = 8, min(len(data), 8 + (data[7] if len(data) > 7 else 0))
            information = None
            flags = 0
            while offset + 2 <= end:
                kind, length = data[offset], data[offset + 1]
                body = data[offset + 2:offset + 2 + length]
                if kind == 0x00 and len(body) >= 10 and body[0] & 0x80:
                    information = int.from_bytes(body[2:10], "big")
                elif kind == 0x04 and len(body) >= 2:
                    flags = body[1]
                offset += 2 + length
            return cls(key=sense.key, asc=sense.asc, ascq=sense.ascq, filemark=bool(flags & 0x80),
                       end_of_medium=bool(flags & 0x40), incorrect_length=bool(flags & 0x20),
                       information=information, deferred=sense.deferred)
        return None

    def describe(self) -> str:
        key = SENSE_KEYS.get(self.key, f"sense key 0x{self.key:x}")
        what = ADDITIONAL_SENSE.get((self.asc, self.ascq))
        code = f"ASC/ASCQ 0x{self.asc:02x}/0x{self.ascq:02x}"
        return f"{key}, {what} ({code})" if what else f"{key} ({code})"


class ScsiError(DeviceError):
    """A SCSI command failed: the ioctl itself (`errno`), the transport (`host_status`,
    `driver_status`), or the device with a CHECK CONDITION (`sense`). str() is one line."""

    def __init__(self, device: str, command: str, *, errno: int | None = None,
                 sense: Sense | None = None, status: int = 0, host_status: int = 0,
                 driver_status: int = 0):
        self.device = device
        self.command = command
        self.errno = errno
        self.sense = sense
        self.status = status
        self.host_status = host_status
        self.driver_status = driver_status
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.errno is not None:
            why = os.strerror(self.errno)
        elif self.sense is not None:
            why = self.sense.describe()
        elif self.status:
            why = f"SCSI status 0x{self.status:02x} without sense data"
        else:
            why = f"transport error (host status 0x{self.host_status:x}, driver status 0x{self.driver_status:x})"
        return f"{self.device}: {self.command}: {why}"

    @property
    def sense_key(self) -> int | None:
        return self.sense.key if self.sense else None

    def is_sense(self, key: int, asc: int | None = None, ascq: int | None = None) -> bool:
        s = self.sense
        return (s is not None and s.key == key and (asc is None or s.asc == asc)
                and (ascq is None or s.ascq == ascq))


def command(fd: int, cdb: bytes, *, device: str, name: str, data_in: int = 0, data_out: bytes = b"",
            timeout_ms: int = DEFAULT_TIMEOUT_MS, unit_attention_retries: int = 3) -> bytes:
    """Send `cdb` through SG_IO on `fd`; return the bytes the device sent (at most `data_in`).

    `name` names the command in errors. A UNIT ATTENTION is retried up to
    `unit_attention_retries` times. Raises ScsiError.
    """
    if data_in and data_out:
        raise ValueError("a command either sends or receives data")
    for attempt in range(unit_attention_retries + 1):
        try:
            return _execute(fd, cdb, device, name, data_in, data_out, timeout_ms)
        except ScsiError as e:
            if not e.is_sense(UNIT_ATTENTION) or attempt == unit_attention_retries:
                raise
    raise AssertionError("unreachable")


def _execute(fd: int, cdb: bytes, device: str, name: str, data_in: int, data_out: bytes,
             timeout_ms: int) -> bytes:
    cdb_buffer = ctypes.create_string_buffer(bytes(cdb), len(cdb))
    sense_buffer = ctypes.create_string_buffer(SENSE_BUFFER_SIZE)
    if data_in:
        data_buffer = ctypes.create_string_buffer(data_in)
        direction, length = SG_DXFER_FROM_DEV, data_in
    elif data_out:
        data_buffer = ctypes.create_string_buffer(bytes(data_out), len(data_out))
        direction, length = SG_DXFER_TO_DEV, len(data_out)
    else:
        data_buffer = None
        direction, length = SG_DXFER_NONE, 0
    header = SgIoHdr(
        interface_id=SG_INTERFACE_ID, dxfer_direction=direction, cmd_len=len(cdb),
        mx_sb_len=SENSE_BUFFER_SIZE, dxfer_len=length,
        dxferp=ctypes.addressof(data_buffer) if data_buffer is not None else None,
        cmdp=ctypes.addressof(cdb_buffer), sbp=ctypes.addressof(sense_buffer), timeout=timeout_ms,
    )
    try:
        fcntl.ioctl(fd, SG_IO, header)
    except OSError as e:
        raise ScsiError(device, name, errno=e.errno) from None
    if (header.info & SG_INFO_OK_MASK) or header.status or header.host_status or header.driver_status:
        sense = Sense.parse(sense_buffer.raw[:header.sb_len_wr]) if header.sb_len_wr else None
        if sense is not None or header.status or header.host_status or header.driver_status & 0x0F:
            raise ScsiError(device, name, sense=sense, status=header.status,
                            host_status=header.host_status, driver_status=header.driver_status)
    if not data_in:
        return b""
    return data_buffer.raw[:max(0, data_in - header.resid)]


def open_device(path: str, *, what: str) -> int:
    """Open a SCSI node for SG_IO (read-write, non-blocking: no medium needed)."""
    try:
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ScsiError(path, f"cannot open the {what}", errno=e.errno) from None


@dataclass(frozen=True)
class Inquiry:
    peripheral_type: int
    vendor: str
    product: str
    revision: str


def inquiry(fd: int, *, device: str) -> Inquiry:
    data = command(fd, bytes([0x12, 0, 0, 0, 96, 0]), device=device, name="INQUIRY", data_in=96)
    if len(data) < 36:
        raise ScsiError(device, f"INQUIRY: {len(data)} bytes of answer, fewer than 36", errno=errno.EIO)
    text = lambda b: b.decode("ascii", "replace").strip()  # noqa: E731
    return Inquiry(peripheral_type=data[0] & 0x1F, vendor=text(data[8:16]), product=text(data[16:32]),
                   revision=text(data[32:36]))


def mode_sense(fd: int, page: int, *, device: str, subpage: int = 0, length: int = 255) -> bytes:
    """MODE SENSE(6) of one page, without block descriptors; returns the page (from its code)."""
    data = command(fd, bytes([0x1A, 0x08, page & 0x3F, subpage, length, 0]), device=device,
                   name=f"MODE SENSE page 0x{page:02x}", data_in=length)
    if len(data) < 4:
        raise ScsiError(device, f"MODE SENSE page 0x{page:02x}: {len(data)} bytes of answer", errno=errno.EIO)
    start = 4 + data[3]  # the header, and any block descriptors a device sends despite DBD
    body = data[start:]
    if len(body) < 2 or body[0] & 0x3F != page & 0x3F:
        raise ScsiError(device, f"MODE SENSE page 0x{page:02x}: the answer holds no such page", errno=errno.EIO)
    return body[:2 + body[1]]
