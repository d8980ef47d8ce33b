"""A SCSI medium changer (tape library or autoloader) on its generic node /dev/sgN, through SG_IO.

The commands are SMC-3's: MODE SENSE page 0x1D (where the elements are), READ ELEMENT STATUS with
volume tags (which element holds which cartridge, by barcode), MOVE MEDIUM (from one element to
another), INITIALIZE ELEMENT STATUS (make the library take its inventory again). Elements are
numbered as `mtx` numbers them, so `mtx status` and this module agree: storage slots from 1, the
import/export slots after them, drives from 0.

Moving a cartridge out of a drive needs the drive to have ejected it first (StTape.unload(), as
`mt offline` before `mtx unload`); after a cartridge is moved into a drive, the drive needs time to
load it and st sees it at its next open (StTape.wait_until_ready()). Errors are ScsiErrors (one
line: the changer, the command, the sense data), or ChangerErrors for requests that cannot be
right (a slot that does not exist, an empty source).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import IntEnum

from .. import scsi
from ..errors import DeviceError

MEDIUM_CHANGER = 0x08
READ_ELEMENT_STATUS_TIMEOUT_MS = 10 * 60_000
MOVE_MEDIUM_TIMEOUT_MS = 15 * 60_000
INITIALIZE_TIMEOUT_MS = 60 * 60_000
_VOLUME_TAG_LENGTH = 36


class ChangerError(DeviceError):
    """A request the changer cannot carry out as asked (no such slot, the source is empty, ...)."""


class ElementKind(IntEnum):
    """SMC element type codes."""

    TRANSPORT = 1
    STORAGE = 2
    IMPORT_EXPORT = 3
    DRIVE = 4


@dataclass(frozen=True)
class Element:
    """One place a cartridge can be. `number` is mtx's: slots (storage, then import/export) from
    1, drives from 0. `source` is the element address the cartridge was moved from, when the
    changer remembers it (where an unload puts it back)."""

    kind: ElementKind
    address: int
    number: int
    full: bool
    barcode: str | None = None
    source: int | None = None
    exception: str | None = None

    def describe(self) -> str:
        name = {ElementKind.DRIVE: "drive", ElementKind.TRANSPORT: "transport"}.get(self.kind, "slot")
        if self.kind == ElementKind.IMPORT_EXPORT:
            name = "import/export slot"
        held = (self.barcode or "a cartridge without barcode") if self.full else "empty"
        return f"{name} {self.number} ({held})"


@dataclass(frozen=True)
class ChangerStatus:
    transports: tuple[Element, ...]
    slots: tuple[Element, ...]  # storage slots, then import/export slots, numbered from 1
    drives: tuple[Element, ...]

    @property
    def elements(self) -> tuple[Element, ...]:
        return self.transports + self.slots + self.drives

    def slot(self, number: int) -> Element:
        for element in self.slots:
            if element.number == number:
                return element
        raise ChangerError(f"no slot {number} (the changer has slots 1..{len(self.slots)})")

    def drive(self, number: int) -> Element:
        for element in self.drives:
            if element.number == number:
                return element
        raise ChangerError(f"no drive {number} (the changer has drives 0..{len(self.drives) - 1})")

    def find(self, barcode: str) -> Element | None:
        """The slot or drive that holds the cartridge with this barcode, or None."""
        for element in self.slots + self.drives:
            if element.full and element.barcode == barcode:
                return element
        return None

    def by_address(self, address: int) -> Element | None:
        for element in self.elements:
            if element.address == address:
                return element
        return None


@dataclass(frozen=True)
class _Range:
    first: int
    count: int


class Changer:
    """A medium changer on /dev/sgN (the `CHANGER` of `mtx -f`)."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._fd = scsi.open_device(self.path, what="medium changer")
        try:
            identity = scsi.inquiry(self._fd, device=self.path)
            if identity.peripheral_type != MEDIUM_CHANGER:
                raise ChangerError(f"{self.path}: not a medium changer (SCSI peripheral type "
                                   f"0x{identity.peripheral_type:02x}: {identity.vendor} {identity.product})")
            self.identity = identity
            self._ranges = self._element_ranges()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Changer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _command(self, cdb: bytes, name: str, *, data_in: int = 0, timeout_ms: int = scsi.DEFAULT_TIMEOUT_MS) -> bytes:
        if self._fd < 0:
            raise ChangerError(f"{self.path}: the changer is closed")
        return scsi.command(self._fd, cdb, device=self.path, name=name, data_in=data_in, timeout_ms=timeout_ms)

    def _element_ranges(self) -> dict[ElementKind, _Range]:
        """Where each kind of element lives: the Element Address Assignment mode page (0x1D)."""
        page = scsi.mode_sense(self._fd, 0x1D, device=self.path)
        if len(page) < 18:
            raise ChangerError(f"{self.path}: the element address assignment page is {len(page)} bytes, not 20")
        word = lambda offset: int.from_bytes(page[offset:offset + 2], "big")  # noqa: E731
        return {
            ElementKind.TRANSPORT: _Range(word(2), word(4)),
            ElementKind.STORAGE: _Range(word(6), word(8)),
            ElementKind.IMPORT_EXPORT: _Range(word(10), word(12)),
            ElementKind.DRIVE: _Range(word(14), word(16)),
        }

    def status(self) -> ChangerStatus:
        """Every element and what it holds, with barcodes (READ ELEMENT STATUS, VolTag)."""
        found: dict[ElementKind, list[Element]] = {kind: [] for kind in ElementKind}
        for kind in ElementKind:
            span = self._ranges[kind]
            if span.count:
                found[kind] = self._read_elements(kind, span)
        storage = found[ElementKind.STORAGE]
        # mtx numbers import/export slots after the storage slots.
        imports = [_renumber(e, len(storage) + i + 1) for i, e in enumerate(found[ElementKind.IMPORT_EXPORT])]
        return ChangerStatus(
            transports=tuple(_renumber(e, i) for i, e in enumerate(found[ElementKind.TRANSPORT])),
            slots=tuple(_renumber(e, i + 1) for i, e in enumerate(storage)) + tuple(imports),
            drives=tuple(_renumber(e, i) for i, e in enumerate(found[ElementKind.DRIVE])),
        )

    def _read_elements(self, kind: ElementKind, span: _Range) -> list[Element]:
        # Room for every descriptor with a volume tag; asked again, larger, if the changer says
        # its report did not fit. (Some changers send less than the byte count they announce:
        # tgt's leaves the element status page header out of it. What was sent is parsed.)
        allocation = 8 + 8 + span.count * (12 + 2 * _VOLUME_TAG_LENGTH + 40)
        for _ in range(3):
            cdb = bytes([0xB8, 0x10 | kind, *span.first.to_bytes(2, "big"), *span.count.to_bytes(2, "big"),
                         0, *allocation.to_bytes(3, "big"), 0, 0])
            data = self._command(cdb, "READ ELEMENT STATUS", data_in=allocation,
                                 timeout_ms=READ_ELEMENT_STATUS_TIMEOUT_MS)
            if len(data) < 8:
                raise ChangerError(f"{self.path}: READ ELEMENT STATUS: {len(data)} bytes of answer")
            available = 8 + int.from_bytes(data[5:8], "big")
            if available <= allocation or allocation == 0xFFFFFF:
                return _parse_element_status(data[:available], self.path)
            allocation = min(available, 0xFFFFFF)
        raise ChangerError(f"{self.path}: READ ELEMENT STATUS: the report keeps growing")

    def move(self, source: Element | int, destination: Element | int) -> None:
        """MOVE MEDIUM from one element to another (elements or raw element addresses)."""
        src = source.address if isinstance(source, Element) else source
        dst = destination.address if isinstance(destination, Element) else destination
        transport = self._ranges[ElementKind.TRANSPORT].first if self._ranges[ElementKind.TRANSPORT].count else 0
        cdb = bytes([0xA5, 0, *transport.to_bytes(2, "big"), *src.to_bytes(2, "big"), *dst.to_bytes(2, "big"),
                     0, 0, 0, 0])
        what = f"MOVE MEDIUM from {_name(source)} to {_name(destination)}"
        self._command(cdb, what, timeout_ms=MOVE_MEDIUM_TIMEOUT_MS)

    def load(self, slot: int, drive: int = 0) -> Element:
        """Move the cartridge in `slot` into `drive` (mtx load SLOT DRIVE); returns the slot as
        it was (with the cartridge's barcode)."""
        now = self.status()
        source, target = now.slot(slot), now.drive(drive)
        if not source.full:
            raise ChangerError(f"{self.path}: cannot load slot {slot} into drive {drive}: the slot is empty")
        if target.full:
            raise ChangerError(f"{self.path}: cannot load slot {slot} into drive {drive}: the drive holds "
                               f"{target.barcode or 'a cartridge'} (unload it first)")
        self.move(source, target)
        return source

    def unload(self, drive: int = 0, slot: int | None = None) -> Element:
        """Move the cartridge in `drive` to `slot`, by default back where it came from (or the
        first empty storage slot); returns the slot it went to. The drive must have ejected it
        (StTape.unload())."""
        now = self.status()
        source = now.drive(drive)
        if not source.full:
            raise ChangerError(f"{self.path}: cannot unload drive {drive}: it is empty")
        if slot is not None:
            target = now.slot(slot)
        else:
            home = now.by_address(source.source) if source.source is not None else None
            if home is not None and home in now.slots and not home.full:
                target = home
            else:
                free = [e for e in now.slots if not e.full and e.kind == ElementKind.STORAGE]
                if not free:
                    raise ChangerError(f"{self.path}: cannot unload drive {drive}: no empty slot")
                target = free[0]
        if target.full:
            raise ChangerError(f"{self.path}: cannot unload drive {drive} to slot {target.number}: "
                               f"the slot holds {target.barcode or 'a cartridge'}")
        self.move(source, target)
        return target

    def load_barcode(self, barcode: str, drive: int = 0) -> Element:
        """Load the cartridge with this barcode into `drive`; returns the slot it came from. A
        cartridge already in that drive is left there."""
        now = self.status()
        where = now.find(barcode)
        if where is None:
            raise ChangerError(f"{self.path}: no cartridge {barcode!r} in the changer")
        if where.kind == ElementKind.DRIVE:
            if where.number == drive:
                return where
            raise ChangerError(f"{self.path}: cartridge {barcode!r} is in drive {where.number}, not {drive}")
        return self.load(where.number, drive)

    def initialize(self) -> None:
        """INITIALIZE ELEMENT STATUS: the changer checks every element again (an inventory; a
        large library takes minutes)."""
        self._command(bytes([0x07, 0, 0, 0, 0, 0]), "INITIALIZE ELEMENT STATUS", timeout_ms=INITIALIZE_TIMEOUT_MS)


def _name(element: Element | int) -> str:
    return element.describe() if isinstance(element, Element) else f"element 0x{element:x}"


def _renumber(element: Element, number: int) -> Element:
    return Element(kind=element.kind, address=element.address, number=number, full=element.full,
                   barcode=element.barcode, source=element.source, exception=element.exception)


def _parse_element_status(data: bytes, device: str) -> list[Element]:
    """The element status pages of a READ ELEMENT STATUS answer (SMC-3 6.10). A last descriptor
    cut short is parsed as far as it goes (its address, state and barcode come first)."""
    elements = []
    offset = 8
    while offset + 8 <= len(data):
        kind_code = data[offset] & 0x0F
        primary_tag = bool(data[offset + 1] & 0x80)
        length = int.from_bytes(data[offset + 2:offset + 4], "big")
        page_bytes = int.from_bytes(data[offset + 5:offset + 8], "big")
        offset += 8
        end = min(len(data), offset + page_bytes)
        if length < 12:
            raise ChangerError(f"{device}: READ ELEMENT STATUS: element descriptors of {length} bytes")
        if kind_code not in ElementKind.__members__.values():
            offset = end
            continue
        while offset + 12 <= end:
            d = data[offset:min(end, offset + length)]
            barcode = None
            if primary_tag and len(d) >= 12 + 32:
                barcode = d[12:44].decode("ascii", "replace").strip(" \0") or None
            source = int.from_bytes(d[10:12], "big") if d[9] & 0x80 else None
            exception = None
            if d[2] & 0x04:
                exception = scsi.ADDITIONAL_SENSE.get((d[4], d[5]), f"ASC/ASCQ 0x{d[4]:02x}/0x{d[5]:02x}")
            elements.append(Element(kind=ElementKind(kind_code), address=int.from_bytes(d[0:2], "big"),
                                    number=0, full=bool(d[2] & 0x01), barcode=barcode, source=source,
                                    exception=exception))
            offset += length
        offset = end
    return elements
