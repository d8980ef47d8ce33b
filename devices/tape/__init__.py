"""Tape drives: the st ioctl interface, a real drive (StTape) and a SIMH .tap file (VirtualTape)."""

from .drive import TapeDrive, TapeError, TapeStatus
from .st import StTape
from .virtual import HostFileError, VirtualTape

__all__ = ["HostFileError", "StTape", "TapeDrive", "TapeError", "TapeStatus", "VirtualTape"]
