"""Where the next image goes on a cartridge: after the last complete file, or over what an
interrupted write left at the end of data (using the TapeDrive operations only, so that it
works the same on st and on a virtual tape)."""

from __future__ import annotations

import errno

from devices.tape.drive import TapeDrive, TapeError

from ..errors import TapeMediaError
from .labels import _tape_write_problem
from .scan import _read_file_info


def position_for_append(drive: TapeDrive) -> tuple[int, str | None]:
    """Position a labelled tape where the next tape file goes; its number, and a notice when
    that replaces or closes what an interrupted write left at the end of data.

    An interrupted write leaves a segment without its end block as the last file: closed by a
    filemark (st writes one when a killed program's descriptor is closed) or not (a killed
    VirtualTape writer; a torn last record reads as the end of data). It holds no restorable
    image, so the next image overwrites it from its start and takes its number; an empty last
    file (a write that failed at once) likewise. A last file that has its end block but no
    filemark is complete: the filemark is written. Only TapeDrive operations are used, so a
    real drive and a virtual tape behave the same."""
    drive.seek_end_of_data()
    files = drive.status().file_number
    if files < 0:
        raise TapeMediaError(f"{drive.path}: the drive does not report a file number at end of data")
    try:
        drive.backward_space_records(1)
        closed = False  # a block ends the data: the last file has no filemark
    except TapeError as e:
        if e.errno != errno.EIO:
            raise TapeMediaError(str(e)) from None
        closed = True  # the filemark closing the last file stopped it
    last = files if not closed else files - 1
    if last >= 1:
        drive.skip_to_file(last)
        info = _read_file_info(drive, last)
        if info is None or info.incomplete:
            drive.skip_to_file(last)
            what = ("nothing (an empty file)" if info is None else
                    f"segment {info.segment} of image {info.image_id[:12]} without its end block")
            return last, (f"{drive.path}: tape file {last} holds {what}, left by an interrupted write; "
                          f"the new image replaces it")
    drive.seek_end_of_data()
    if closed:
        return files, None
    try:
        drive.write_filemarks(1)
    except TapeError as e:
        raise TapeMediaError(_tape_write_problem(e)) from None
    what = "the label" if last == 0 else f"tape file {last}"
    return files + 1, f"{drive.path}: {what} had no closing filemark (an interrupted write); it is written now"
