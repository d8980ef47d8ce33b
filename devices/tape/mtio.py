"""The magnetic tape ioctl interface of include/uapi/linux/mtio.h, as Python values.

Structs use native layout (`@`): `struct mtget` holds C `long` fields, whose size follows the
platform, and the request numbers encode the struct sizes, so both come from the running
interpreter's ABI rather than from hard-coded byte counts.
"""

from __future__ import annotations

import struct
from collections import namedtuple

from ..ioctl import IOR, IOW


class CStruct:
    """A C struct with native layout: pack/unpack by field, sizeof and offsetof as in C."""

    def __init__(self, name: str, fields: list[tuple[str, str]]):
        self.name = name
        self.fields = [field for field, _ in fields]
        codes = "".join(code for _, code in fields)
        widest = max((code for _, code in fields), key=_alignment)
        # A zero-count trailing code pads the end to that type's alignment, as C's sizeof does.
        self.layout = struct.Struct(f"@{codes}0{widest}")
        self.size = self.layout.size
        self.offsets = {
            field: struct.calcsize("@" + codes[: i + 1]) - struct.calcsize("@" + code)
            for i, (field, code) in enumerate(fields)
        }
        self.record = namedtuple(name, self.fields)

    def pack(self, *values: int) -> bytes:
        return self.layout.pack(*values)

    def unpack(self, data: bytes):
        return self.record._make(self.layout.unpack(data))


def _alignment(code: str) -> int:
    return struct.calcsize("@b" + code) - struct.calcsize("@" + code)


mtop = CStruct("mtop", [("mt_op", "h"), ("mt_count", "i")])
mtget = CStruct("mtget", [
    ("mt_type", "l"),
    ("mt_resid", "l"),
    ("mt_dsreg", "l"),
    ("mt_gstat", "l"),
    ("mt_erreg", "l"),
    ("mt_fileno", "i"),  # __kernel_daddr_t is an int
    ("mt_blkno", "i"),
])
mtpos = CStruct("mtpos", [("mt_blkno", "l")])

MTIOCTOP = IOW("m", 1, mtop.size)
MTIOCGET = IOR("m", 2, mtget.size)
MTIOCPOS = IOR("m", 3, mtpos.size)

# Operations for MTIOCTOP (struct mtop.mt_op).
MTRESET = 0
MTFSF = 1
MTBSF = 2
MTFSR = 3
MTBSR = 4
MTWEOF = 5
MTREW = 6
MTOFFL = 7
MTNOP = 8
MTRETEN = 9
MTBSFM = 10
MTFSFM = 11
MTEOM = 12
MTERASE = 13
MTRAS1 = 14
MTRAS2 = 15
MTRAS3 = 16
MTSETBLK = 20
MTSETDENSITY = 21
MTSEEK = 22
MTTELL = 23
MTSETDRVBUFFER = 24
MTFSS = 25
MTBSS = 26
MTWSM = 27
MTLOCK = 28
MTUNLOCK = 29
MTLOAD = 30
MTUNLOAD = 31
MTCOMPRESSION = 32
MTSETPART = 33
MTMKPART = 34
MTWEOFI = 35

OPERATION_NAMES = {value: name for name, value in globals().items()
                   if name.startswith("MT") and not name.startswith(("MTIOC", "MT_"))}

# Generic status bits of struct mtget.mt_gstat (the GMT_*(x) macros are `x & bit`).
GMT_EOF = 0x80000000
GMT_BOT = 0x40000000
GMT_EOT = 0x20000000
GMT_SM = 0x10000000
GMT_EOD = 0x08000000
GMT_WR_PROT = 0x04000000
GMT_ONLINE = 0x01000000
GMT_D_6250 = 0x00800000
GMT_D_1600 = 0x00400000
GMT_D_800 = 0x00200000
GMT_DR_OPEN = 0x00040000
GMT_IM_REP_EN = 0x00010000
GMT_CLN = 0x00008000

# Fields of struct mtget.mt_dsreg as the st driver fills it.
MT_ST_BLKSIZE_SHIFT = 0
MT_ST_BLKSIZE_MASK = 0xFFFFFF
MT_ST_DENSITY_SHIFT = 24
MT_ST_DENSITY_MASK = 0xFF000000
