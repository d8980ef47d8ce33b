"""Where a VirtualTape's head stands on its SIMH file and how it moves as st reads and spaces.

`Head` keeps what st keeps of the position (its struct st_partstat): the object number from BOT,
whether the file and block numbers are known, and the `eof` state; and what st holds in its
driver buffer between reads (the rest of a fixed block partly read, blocks read ahead). The
behaviour is the one the virtual.py module docstring describes; VirtualTape checks each request
(a tape loaded, the sizes and counts, the filemark owed after a write) before the head moves.
"""

from __future__ import annotations

import errno
from enum import IntEnum

from .simh import SimhTapeFile

_ST_FIXED_BUFFER = 32 << 10  # st's driver buffer in fixed block mode (ST_FIXED_BUFFER_BLOCKS KiB)


class EofState(IntEnum):
    """st's per-partition `eof` state (drivers/scsi/st.h), with its numbering: st compares them."""

    NOEOF = 0
    FM = 2
    EOM_OK = 3
    EOD_1 = 5
    EOD_2 = 6
    EOD = 7


class Head:
    """The position on a SIMH tape file as st knows it, and st's read buffer."""

    def __init__(self, tape_file: SimhTapeFile):
        self._file = tape_file
        self._pending = b""
        self._read_ahead = False
        self._buffered_until = 0
        self.to_bot()

    def to_bot(self) -> None:
        self.position = 0
        self.file_known = True
        self.block_known = True
        self.eof = EofState.NOEOF

    def drop_buffer(self) -> None:
        """st's flush_buffer at any call but a read: what is left of a fixed block partly read
        is dropped (the block counts as read), blocks read ahead are given back."""
        self._pending = b""
        self._buffered_until = 0

    def numbers(self) -> tuple[int, int]:
        """The file and block numbers st reports here (-1 where it does not know them)."""
        passed = self._file.marks_before(self.position)
        file_number = passed if self.file_known else -1
        if self.block_known:
            block_number = self.position - (self._file.marks[passed - 1] + 1 if passed else 0)
        else:
            block_number = -1
        return file_number, block_number

    def _at_end_of_data(self, what: str) -> str:
        torn = self._file.torn_record_at(self.position)
        if torn is None:
            return f"{what} at the end of recorded data"
        return (f"{what} at the end of recorded data, where the file holds a torn record ({torn}; "
                f"an interrupted write, replaced by the next write)")

    # Reading.

    def _take_blocks(self, max_size: int, block_size: int, have: int = 0) -> list[tuple[int, int]]:
        """Move over the blocks one read returns, as st does; their (data offset, length).
        `have` bytes are already served from a fixed block partly read before: a filemark,
        end of data or a block of another size then ends this read without being taken."""
        if have:
            if max_size <= have:
                return []
        elif self.eof >= EofState.EOD_1:
            if self.eof < EofState.EOD:
                self.eof = EofState(self.eof + 1)
                return []
            raise self._file.error(errno.EIO, "read past the end of recorded data")
        # Fixed block mode: whole blocks, as many as cover the request (st reads ahead).
        wanted = -(-(max_size - have) // block_size) if block_size else 1
        if block_size and self._fixed_read_window(block_size, max_size % block_size != 0, wanted):
            return []
        tape_file = self._file
        taken: list[tuple[int, int]] = []
        position = self.position
        while len(taken) < wanted:
            if not tape_file.exists(position):
                if taken or have:
                    break
                self.block_known = False
                if self.eof == EofState.FM:
                    self.eof = EofState.EOD
                    return []
                raise tape_file.error(errno.EIO, self._at_end_of_data("read"))
            if tape_file.is_filemark(position):
                if taken or have:
                    break
                self.position = position + 1
                self.block_known = True
                self.eof = EofState.FM
                return []
            length = tape_file.block_length(position)
            if block_size and length != block_size:
                if taken or have:
                    break
                raise tape_file.error(errno.EIO, f"block of {length} bytes where the fixed block "
                                                 f"size is {block_size}")
            if length > max_size and not block_size:
                self.position = position + 1
                raise tape_file.error(errno.ENOMEM, f"block of {length} bytes does not fit the "
                                                    f"{max_size}-byte read buffer (the tape is now after it)")
            taken.append((tape_file.data_offset(position), length))
            position += 1
        self.position = position
        if self.eof == EofState.FM:
            self.eof = EofState.NOEOF
        return taken

    def _fixed_read_window(self, block_size: int, partial: bool, wanted: int) -> bool:
        """What st asks the drive for in fixed block mode, and what it makes of end of data.

        st reads the blocks a read needs, or, once a read was not a multiple of the block size
        (until close), a whole buffer of them ahead (32 KiB). Where those blocks run into the end
        of data before a filemark or a block of another size, st returns none of them: 0 bytes
        right after a filemark (end of data; returns True), EIO otherwise, and the tape is at the
        end of data.
        """
        self._read_ahead = self._read_ahead or partial
        position = self.position
        if position < self._buffered_until:
            return False  # in st's buffer already
        count = max(wanted, _ST_FIXED_BUFFER // block_size) if self._read_ahead else wanted
        end = position + count
        tape_file = self._file
        while position < end and tape_file.exists(position):
            if tape_file.is_filemark(position) or tape_file.block_length(position) != block_size:
                break
            position += 1
        else:
            if position < end and position > self.position:
                # End of data among the blocks asked for: the blocks before it are lost to st.
                self.position = position
                self.block_known = False
                if self.eof == EofState.FM:
                    self.eof = EofState.EOD
                    return True
                raise tape_file.error(errno.EIO, "read at the end of recorded data (the blocks read "
                                                 "with it in fixed block mode are not returned)")
        self._buffered_until = position if self._read_ahead else 0
        return False

    def read(self, max_size: int, block_size: int) -> bytes:
        have = self._pending
        taken = self._take_blocks(max_size, block_size, len(have))
        if not have and len(taken) == 1 and taken[0][1] <= max_size:
            offset, length = taken[0]
            return self._file.read(offset, length)
        data = have + b"".join(self._file.read(offset, length) for offset, length in taken)
        self._pending = data[max_size:]
        return data[:max_size]

    def read_into(self, view: memoryview, block_size: int) -> int:
        have = self._pending
        taken = self._take_blocks(len(view), block_size, len(have))
        if block_size and sum(length for _, length in taken) + len(have) > len(view):
            # The request ends inside a fixed block: st keeps the rest for the next read.
            data = have + b"".join(self._file.read(offset, length) for offset, length in taken)
            view[:min(len(data), len(view))] = data[:len(view)]
            self._pending = data[len(view):]
            return min(len(data), len(view))
        done = len(have)
        view[:done] = have
        self._pending = b""
        for offset, length in taken:
            self._file.read_into(view[done:done + length], offset)
            done += length
        return done

    # Spacing and seeking.

    def forward_space_files(self, count: int) -> None:
        if not count:
            return
        passed_before = self._file.marks_before(self.position)
        mark = self._file.filemark(passed_before + count - 1)
        if mark is not None:
            self.position = mark + 1
            self.block_known = True
            self.eof = EofState.FM
            return
        self.position = self._file.end_of_data()
        self.block_known = False
        self.eof = EofState.EOD
        raise self._file.error(errno.EIO, f"end of data after {len(self._file.marks) - passed_before} "
                                          f"of {count} filemarks")

    def backward_space_files(self, count: int) -> None:
        if not count:
            return
        self.eof = EofState.NOEOF
        passed_before = self._file.marks_before(self.position)
        if passed_before >= count:
            self.position = self._file.marks[passed_before - count]
            self.block_known = False
            return
        self.position = 0
        self.block_known = True
        raise self._file.error(errno.EIO, f"beginning of tape after {passed_before} of {count} filemarks")

    def forward_space_records(self, count: int) -> None:
        if not count:
            return
        tape_file = self._file
        start = self.position
        tape_file.exists(start + count - 1)
        next_mark = tape_file.marks_before(start)
        if next_mark < len(tape_file.marks) and tape_file.marks[next_mark] < start + count:
            mark = tape_file.marks[next_mark]
            self.position = mark + 1
            self.block_known = True
            self.eof = EofState.FM
            raise tape_file.error(errno.EIO, f"filemark after {mark - start} of {count} blocks")
        end = tape_file.indexed
        if start + count > end:
            self.position = end
            self.eof = EofState.EOD
            raise tape_file.error(errno.EIO, f"end of data after {end - start} of {count} blocks")
        self.position = start + count
        self.eof = EofState.NOEOF

    def backward_space_records(self, count: int) -> None:
        if not count:
            return
        start = self.position
        self.eof = EofState.NOEOF
        passed_before = self._file.marks_before(start)
        last_mark = self._file.marks[passed_before - 1] if passed_before else -1
        if start - count > last_mark:
            self.position = start - count
            return
        self.position = max(last_mark, 0)
        if last_mark >= 0:
            self.block_known = False
            raise self._file.error(errno.EIO, f"filemark after {start - last_mark - 1} of {count} blocks")
        # st takes the drive's "beginning of medium" as block 0 (with a block number it did not
        # know before, st reports count - 1 instead: its arithmetic, not the tape).
        self.block_known = True
        raise self._file.error(errno.EIO, f"beginning of tape after {start} of {count} blocks")

    def to_end_of_data(self) -> None:
        self.position = self._file.end_of_data()
        self.block_known = False
        self.eof = EofState.EOD

    def tell(self) -> int:
        if self.position == 0:
            # st's READ POSITION at the beginning of the tape makes file and block numbers known.
            self.file_known = self.block_known = True
        return self.position

    def seek(self, position: int) -> None:
        self.eof = EofState.NOEOF
        self.file_known = self.block_known = position == 0
        if position > 0 and not self._file.exists(position - 1):
            self.position = self._file.indexed
            raise self._file.error(errno.EIO, f"position {position} is beyond the end of recorded "
                                              f"data at {self.position}")
        self.position = position
