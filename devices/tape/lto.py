"""LTO generations by density code: native capacity and data rate, and the lowest rate the drive
can match without stopping the tape (speed matching); below it the tape stops, backs up and
starts again for every buffer (shoe-shining), which costs throughput and wears tape and heads.

The density code is what the drive reports for the loaded cartridge in the mode parameter
block descriptor, as st passes it in MTIOCGET (TapeStatus.density): it names the format of
the medium, so an LTO-8 cartridge in an LTO-9 drive reports LTO-8.

Sources:
  density codes: mt-st's density table (mt.c, `mt densities`): 0x40 Ultrium (LTO-1), 0x42
    LTO-2, 0x44 LTO-3, 0x46 LTO-4, 0x58 LTO-5, 0x5a LTO-6, 0x5c LTO-7, 0x5d LTO-7-M8, 0x5e
    LTO-8, 0x60 LTO-9.
  native rates and capacities: the LTO Program's generation specifications (LTO-1 15 MB/s
    100 GB ... LTO-9 400 MB/s 18 TB), e.g. the Dell PowerVault LTO User's Guide glossary
    ("Generation 1 ... 15 MB per second" to "Generation 6 ... 160 MB per second").
  lowest speed-matching rates, full-height IBM drives: LTO-2 17.5 and LTO-3 40 MB/s (IBM
    TotalStorage Ultrium 2 and 3 Tape Drive manuals, "Speed Matching"), LTO-7 101.46, LTO-8
    112 and LTO-9 177 MB/s on their own media (IBM TS4300 Tape Library documentation, "Speed
    matching", table 1; the Quantum LTO-9 HH SAS User's Guide lists the same 177-408 MB/s).
    Half-height drives match fewer speeds (IBM TS4300, table 2: LTO-9 177-284 MB/s). No
    vendor table was at hand for LTO-1, -4, -5 and -6: their lowest rate is None (unknown),
    and the native rate is the safe target.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LtoGeneration:
    generation: int
    name: str
    density_code: int
    native_capacity: int  # bytes (decimal units, as the specification gives them)
    native_rate: float  # MB/s (10**6 bytes per second), uncompressed
    lowest_rate: float | None  # MB/s: the slowest speed matching keeps the tape moving at

    @property
    def streaming_rate(self) -> float:
        """The rate a writer must sustain so the tape keeps moving: the lowest speed-matching
        rate, or the native rate where that is not known."""
        return self.lowest_rate if self.lowest_rate is not None else self.native_rate


_TB, _GB = 10**12, 10**9
GENERATIONS = (
    LtoGeneration(1, "LTO-1", 0x40, 100 * _GB, 15.0, None),
    LtoGeneration(2, "LTO-2", 0x42, 200 * _GB, 35.0, 17.5),
    LtoGeneration(3, "LTO-3", 0x44, 400 * _GB, 80.0, 40.0),
    LtoGeneration(4, "LTO-4", 0x46, 800 * _GB, 120.0, None),
    LtoGeneration(5, "LTO-5", 0x58, 1500 * _GB, 140.0, None),
    LtoGeneration(6, "LTO-6", 0x5A, 2500 * _GB, 160.0, None),
    LtoGeneration(7, "LTO-7", 0x5C, 6 * _TB, 300.0, 101.46),
    LtoGeneration(8, "LTO-7 Type M (M8)", 0x5D, 9 * _TB, 300.0, None),
    LtoGeneration(8, "LTO-8", 0x5E, 12 * _TB, 360.0, 112.0),
    LtoGeneration(9, "LTO-9", 0x60, 18 * _TB, 400.0, 177.0),
)
_BY_CODE = {g.density_code: g for g in GENERATIONS}


def generation(density_code: int) -> LtoGeneration | None:
    """The LTO generation of a density code, None for 0 (the drive's default, as emulated
    drives report) and for codes of other tape formats."""
    return _BY_CODE.get(density_code)
