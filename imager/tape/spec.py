"""What --tape names: a real drive (/dev/nstN), a virtual tape file, or a set of virtual
cartridges given as a pattern; opening cartridges and asking for the next one."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Callable

from devices.errors import DeviceError
from devices.tape.drive import TapeDrive
from devices.tape.st import StTape
from devices.tape.virtual import VirtualTape

from ..ends.guards import check_tape_path
from ..errors import TapeMediaError, UsageError
from .labels import Label
from .library import CartridgeLibrary, is_changer_device


@dataclass
class TapeSpec:
    """What `--tape` names: a real drive (/dev/nstN), a virtual tape file, or a set of virtual
    cartridges given as a pattern with {n} (the cartridge's sequence number, from 1)."""

    spec: str
    capacity: int | None = None
    changer: str | None = None
    prompt: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        # Decided once, before anything is opened: a path under /dev is only ever a drive.
        self._real_drive = check_tape_path(self.path_for(1))
        if self._real_drive and self.is_pattern:
            raise UsageError(f"--tape {self.spec!r}: a set of cartridges as a pattern is for virtual tapes; "
                             f"a real drive is one device (/dev/nstN) with --changer or the operator")
        self.library: CartridgeLibrary | None = None
        if self.changer and is_changer_device(self.changer):
            if not self._real_drive:
                raise UsageError(f"--changer {self.changer}: a SCSI changer loads a real drive (/dev/nstN); "
                                 f"a set of virtual cartridges is a pattern, e.g. --tape 'tape-{{n:03}}.tap'")
            self.library = CartridgeLibrary(self.changer, self.spec)

    @property
    def is_pattern(self) -> bool:
        return "{n" in self.spec

    @property
    def is_real_drive(self) -> bool:
        return self._real_drive

    @property
    def early_warning_zone(self) -> int | None:
        """A virtual cartridge's early-warning zone: a quarter of a small one, 32 MiB of a large
        one. The zstd frame in flight when the warning comes must still fit in it (a real
        cartridge's zone holds gigabytes)."""
        if self.capacity is None or self.is_real_drive:
            return None
        return min(32 << 20, self.capacity // 4)

    def members(self, limit: int = 9999) -> list[int]:
        """The sequence numbers of a virtual set's cartridges that exist (up to `limit`)."""
        return [n for n in range(1, limit + 1) if os.path.exists(self.path_for(n))]

    def path_for(self, sequence: int) -> str:
        if self.is_pattern:
            try:
                return self.spec.format(n=sequence)
            except (KeyError, IndexError, ValueError) as e:
                raise UsageError(f"--tape {self.spec!r}: a cartridge pattern takes {{n}}, e.g. 'tape-{{n:03}}.tap' ({e})") from None
        return self.spec

    def open(self, sequence: int = 1, *, create: bool = True) -> TapeDrive:
        path = self.path_for(sequence)
        try:
            if self.is_real_drive:
                return StTape(path)
            if os.path.isdir(path):
                raise UsageError(f"--tape {path}: is a directory; give a .tap file or /dev/nstN")
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise UsageError(f"--tape {path}: no such directory {parent}")
            # Like /dev/nst*, a single virtual tape stands where the last command left it; the
            # cartridges of a set are taken out and put in, and start at BOT as real ones do.
            return VirtualTape(path, capacity=self.capacity, early_warning=self.early_warning_zone,
                               create=create, remembers_position=not self.is_pattern)
        except DeviceError as e:
            raise TapeMediaError(str(e)) from None

    def open_labelled(self, label: str) -> TapeDrive:
        """The drive with the cartridge labelled `label`: through the changer when there is one
        (the caller still checks the label, as for any cartridge)."""
        if self.library is None:
            return self.open(1, create=False)
        return self.library.load_labelled(label, self.open_if_loaded())

    def open_if_loaded(self) -> TapeDrive | None:
        """A real drive, open, when it holds a tape; None when it is empty (st opens an empty
        drive, and fails its first tape operation with ENOMEDIUM)."""
        try:
            drive = self.open(1, create=False)
        except TapeMediaError:
            return None
        try:
            if drive.status().online:
                return drive
        except DeviceError:
            pass
        drive.close()
        return None

    def next_cartridge(self, drive: TapeDrive, sequence: int, *, create: bool = True,
                       label: str | None = None) -> TapeDrive:
        """Take `drive`'s cartridge out and return the drive with cartridge `sequence` in it:
        for writing (`create`) a blank one, for reading the one labelled `label`. A virtual
        cartridge that does not exist is created only when `create`."""
        if self.is_pattern:
            drive.close()
            if not create and not os.path.exists(self.path_for(sequence)):
                raise TapeMediaError(f"cartridge {sequence} of the set is missing: no {self.path_for(sequence)}")
            return self.open(sequence, create=create)
        if not self.is_real_drive:
            drive.close()
            raise TapeMediaError(f"{self.spec}: cartridge full, and a single virtual tape has no next "
                                 f"cartridge; give a set as a pattern, e.g. --tape 'tape-{{n:03}}.tap'")
        if self.library is not None:
            if create:
                return self.library.next_blank(drive)
            if label is None:
                raise TapeMediaError(f"{self.spec}: which cartridge {sequence} is, by label, is not known")
            return self.library.load_labelled(label, drive)
        drive.unload()
        drive.close()
        message = f"insert cartridge {sequence} of the set" + (f" ({label})" if label else "") + f" into {self.spec}"
        if self.changer:
            r = subprocess.run(self.changer, shell=True, env=dict(os.environ, IMAGER_CARTRIDGE=str(sequence),
                                                                    IMAGER_DRIVE=self.spec))
            if r.returncode:
                raise TapeMediaError(f"changer command failed ({r.returncode}) loading cartridge {sequence}")
        elif self.prompt:
            self.prompt(message)
        else:
            raise TapeMediaError(f"{message}: no terminal to ask on and no --changer command")
        new = self.open(sequence, create=create)
        new.load()
        return new


def operator_prompt(message: str) -> None:
    """Ask the operator on the terminal, even when stdout is a pipe to another program."""
    try:
        with open("/dev/tty", "r+") as tty:
            tty.write(f"imager: {message}, then press Enter (Ctrl-C to stop) ")
            tty.flush()
            tty.readline()
    except OSError:
        raise TapeMediaError(f"{message}: no terminal to ask on (use --changer)") from None


def _member_label(spec: TapeSpec, sequence: int, previous: Label | None = None) -> str:
    """The label a new cartridge of a set gets: a virtual cartridge's file name, or the set's
    name with the sequence number for a real drive ("S1", "S1+2", "S1+3": the name is the first
    cartridge's label, found from `previous`, the label of the cartridge before it)."""
    if spec.is_pattern:
        return os.path.splitext(os.path.basename(spec.path_for(sequence)))[0][:64]
    if previous is None:
        return f"imager+{sequence}"
    name, suffix = previous.label, f"+{previous.sequence}"
    base = name[:-len(suffix)] if previous.sequence > 1 and name.endswith(suffix) else name
    return f"{base[:58]}+{sequence}"
