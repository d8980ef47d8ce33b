"""A drive in a tape library: `--changer /dev/sgN` names the SCSI medium changer that puts
cartridges into the drive. A job that needs another cartridge (the next one of a spanned image,
or the one with a given label to restore from) has the changer bring it, instead of asking the
operator.

Which cartridge: for writing, the next blank one (nothing recorded) in slot order after the slot
the last cartridge came from; a cartridge that holds anything, a label included, is never
written by a changer's choice. For reading, the one whose imager label is asked for: a slot
whose barcode is that label is tried first, then every other full slot, each read at its start
(a library whose barcodes are not the labels costs a load per cartridge tried).
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Iterator

from devices.errors import DeviceError
from devices.tape.changer import Changer, Element, ElementKind
from devices.tape.drive import TapeDrive
from devices.tape.st import StTape

from ..errors import TapeMediaError, UsageError
from .labels import _is_blank, read_label
from .blocks import DamagedBlock

log = logging.getLogger("imager.tape")

# A loaded cartridge is threaded and ready within seconds on real drives; a library that has
# to fetch it from far away may take minutes.
READY_TIMEOUT = 300.0


def is_changer_device(value: str) -> bool:
    """Whether --changer names a SCSI changer (a character device) rather than a command."""
    if not value.startswith("/dev/"):
        return False
    try:
        st = os.stat(value)
    except OSError:
        raise UsageError(f"--changer {value}: no such device (give the changer's SCSI generic node, "
                         f"/dev/sgN, as `lsscsi -g` shows it, or a command)") from None
    if not stat.S_ISCHR(st.st_mode):
        raise UsageError(f"--changer {value}: not a character device; a changer is its SCSI generic node /dev/sgN")
    return True


class CartridgeLibrary:
    """The changer at `changer_path` and the drive `drive_path` (its drive number `drive_number`)."""

    def __init__(self, changer_path: str, drive_path: str, drive_number: int = 0):
        self.changer_path, self.drive_path, self.drive_number = changer_path, drive_path, drive_number

    def _changer(self) -> Changer:
        try:
            return Changer(self.changer_path)
        except DeviceError as e:
            raise TapeMediaError(str(e)) from None

    def _put_back(self, changer: Changer, drive: TapeDrive | None) -> Element | None:
        """Eject the drive's cartridge and return it to a slot (its own, when the changer knows
        it); the slot it went to, or None when the drive was empty."""
        if drive is not None:
            try:
                if drive.status().online:
                    drive.unload()
            finally:
                drive.close()
        if not changer.status().drive(self.drive_number).full:
            return None
        try:
            with StTape(self.drive_path) as idle:
                if idle.status().online:
                    idle.unload()
        except DeviceError:
            pass        # already ejected: st cannot open a drive without a tape
        return changer.unload(self.drive_number)

    def _load(self, changer: Changer, slot: Element) -> StTape:
        log.info("changer %s: loading slot %d (%s) into drive %d", self.changer_path, slot.number,
                 slot.barcode or "no barcode", self.drive_number)
        changer.load(slot.number, self.drive_number)
        try:
            return StTape.wait_until_ready(self.drive_path, timeout=READY_TIMEOUT)
        except DeviceError as e:
            raise TapeMediaError(f"{self.drive_path}: the cartridge from slot {slot.number} did not become "
                                 f"ready: {e}") from None

    def next_blank(self, drive: TapeDrive | None) -> TapeDrive:
        """Put the drive's cartridge back and load the next blank cartridge."""
        with self._changer() as changer:
            home = self._put_back(changer, drive)
            slots = [s for s in changer.status().slots if s.kind == ElementKind.STORAGE and s.full]
            start = next((i for i, s in enumerate(slots) if home is not None and s.number > home.number), 0)
            tried = []
            for slot in slots[start:] + slots[:start]:
                if home is not None and slot.number == home.number:
                    continue
                loaded = self._load(changer, slot)
                if _is_blank(loaded):
                    log.info("changer %s: slot %d holds a blank cartridge: continuing on it", self.changer_path,
                             slot.number)
                    loaded.rewind()
                    return loaded
                tried.append(slot.barcode or f"slot {slot.number}")
                self._put_back(changer, loaded)
        raise TapeMediaError(f"{self.changer_path}: no blank cartridge left in the library to continue on "
                             f"(every other cartridge holds data: {', '.join(tried) or 'none'}); add a blank one")

    def load_labelled(self, label: str, drive: TapeDrive | None) -> TapeDrive:
        """The drive with the cartridge labelled `label` in it (the one in the drive is kept
        when it is that one)."""
        if drive is not None and _label_of(drive) == label:
            return drive
        with self._changer() as changer:
            self._put_back(changer, drive)
            status = changer.status()
            slots = [s for s in status.slots if s.full]
            slots.sort(key=lambda s: s.barcode != label)     # the barcode that is the label first
            for slot in slots:
                loaded = self._load(changer, slot)
                if _label_of(loaded) == label:
                    log.info("changer %s: cartridge %r found in slot %d", self.changer_path, label, slot.number)
                    return loaded
                self._put_back(changer, loaded)
        raise TapeMediaError(f"{self.changer_path}: no cartridge labelled {label!r} in the library "
                             f"({len(slots)} cartridges read)")


    def each_cartridge(self, drive: TapeDrive | None) -> Iterator[TapeDrive]:
        """Every cartridge of the library in the drive in turn, in slot order (each put back
        to its slot after the caller has read it)."""
        with self._changer() as changer:
            self._put_back(changer, drive)
            for slot in [s for s in changer.status().slots if s.full]:
                loaded = self._load(changer, slot)
                try:
                    yield loaded
                finally:
                    self._put_back(changer, loaded)


def _label_of(drive: TapeDrive) -> str | None:
    try:
        found = read_label(drive)
    except (DamagedBlock, TapeMediaError, DeviceError):
        return None
    return found.label if found else None
