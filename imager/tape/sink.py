"""Writing an image to tape: one tape file per cartridge it touches, cut into blocks, between
a segment header and an end block; at the early warning the segment ends at the next zstd frame
and the image goes on on the next cartridge."""

from __future__ import annotations

import errno
import os
import queue
import tempfile
import threading
import time
from array import array
from dataclasses import dataclass
from typing import Callable, Iterator

from devices.errors import DeviceError
from devices.tape.drive import CompressionNotSwitchable, TapeDrive, TapeError
from devices.tape.lto import generation

from ..errors import CartridgeFull, ImagerError, TapeMediaError, UsageError
from ..progress import Progress, output_counter
from .append import position_for_append
from .blocks import DEFAULT_BLOCK_SIZE, END_MAGIC, END_TAG, SEGMENT_MAGIC, SEGMENT_TAG, _meta_block
from .labels import Label, _is_blank, _tape_write_problem, check_label, read_label, write_label
from .spec import TapeSpec, _member_label

# How often the writer and the producer look up from a queue that may not wake them (see _aborted).
WAKE_INTERVAL = 0.2


@dataclass
class WrittenSegment:
    label: str
    tape_set: str
    sequence: int
    tape_file: int
    stream_offset: int
    stream_length: int


class StreamRate:
    """The compressed stream's rate reaching the drive, against the slowest rate at which the
    drive keeps the tape moving (below it the drive stops, rewinds a little and starts again:
    shoe-shining, which wears tape and heads). Warns while it happens, at most every WARN_EVERY
    seconds, measured over the last WINDOW seconds."""

    WINDOW = 10.0
    WARN_EVERY = 60.0

    def __init__(self, minimum: float | None, what: str, notice: Callable[[str], None]):
        self.minimum, self.what, self._notice = minimum, what, notice
        self.started = self._window_start = time.monotonic()
        self.total = self._window_bytes = 0
        self._warned_at: float | None = None
        self.warnings = 0
        self.listener: Callable[[int], None] = lambda count: None   # a display's output counter

    @classmethod
    def for_drive(cls, drive: TapeDrive, min_rate: float | None, notice: Callable[[str], None]) -> "StreamRate":
        """`min_rate` in bytes per second; else the LTO generation's, from the medium's density code."""
        if min_rate is not None:
            return cls(min_rate or None, "the given --min-rate", notice)
        try:
            lto = generation(drive.status().density)
        except (OSError, DeviceError):
            lto = None
        if lto is None:
            return cls(None, "", notice)
        return cls(lto.streaming_rate() * 1e6, f"{lto.name}'s slowest speed-matching rate", notice)

    def restart(self) -> None:
        """The stream to the drive starts now (a spooled image: the drive stood idle meanwhile)."""
        self.started = self._window_start = time.monotonic()
        self._window_bytes = 0

    def wrote(self, count: int) -> None:
        self.listener(count)
        self.total += count
        self._window_bytes += count
        now = time.monotonic()
        if now - self._window_start < self.WINDOW:
            return
        rate = self._window_bytes / (now - self._window_start)
        self._window_start, self._window_bytes = now, 0
        if self.minimum and rate < self.minimum and (self._warned_at is None or now - self._warned_at >= self.WARN_EVERY):
            self._warned_at = now
            self.warnings += 1
            self._notice(f"the stream reaches the drive at {rate / 1e6:.0f} MB/s, under {self.what} of "
                         f"{self.minimum / 1e6:.0f} MB/s: the tape stops and repositions (shoe-shining); "
                         f"use a lower --level or more cores")

    def average(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.total / elapsed if elapsed > 0 else 0.0

    def finish(self) -> None:
        """A stream too short for a window still says how it went."""
        rate = self.average()
        if self.minimum and not self.warnings and self.total and rate < self.minimum:
            self.warnings += 1
            self._notice(f"the stream reached the drive at {rate / 1e6:.0f} MB/s on average, under {self.what} "
                         f"of {self.minimum / 1e6:.0f} MB/s: the tape stopped and repositioned (shoe-shining); "
                         f"use a lower --level or more cores")


class TapeSink:
    """An image sink that writes the stream as one tape file per cartridge it touches.

    `write()` hands frames to a writer thread through a bounded queue, so the drive keeps
    streaming while the engine compresses in bursts. The caller commits or aborts.
    """

    def __init__(self, spec: TapeSpec, *, image_id: str, block_size: int = DEFAULT_BLOCK_SIZE,
                 expect_label: str | None = None, drive_compression: bool = False,
                 buffer_bytes: int = 64 << 20, largest_frame: int = 0,
                 on_notice: Callable[[str], None] | None = None, min_rate: float | None = None,
                 spool_dir: str | None = None):
        if block_size <= 0 or block_size % 512:
            raise UsageError(f"tape block size {block_size} must be a positive multiple of 512")
        zone = spec.early_warning_zone
        # At the warning: the rest of the frame, the block it ends in, the end block, a filemark.
        if zone is not None and zone < largest_frame + block_size + (64 << 10):
            raise UsageError(f"--tape-capacity {spec.capacity} is too small: its early-warning zone of "
                             f"{zone} bytes cannot hold what goes after the warning when a cartridge fills "
                             f"(the rest of a {largest_frame}-byte chunk, the {block_size}-byte block it ends "
                             f"in and 64 KiB of end block and filemark: {largest_frame + block_size + (64 << 10)} "
                             f"bytes); use a larger capacity, a smaller --chunk-size or --block-size")
        self.spec = spec
        self.image_id = image_id
        self.block_size = block_size
        self.drive_compression = drive_compression
        self.path = spec.spec
        self.segments: list[WrittenSegment] = []
        self.labelled: list[Label] = []
        self.bytes_written = 0
        self._notice = on_notice or (lambda message: None)
        self._spool = _Spool(spool_dir) if spool_dir else None
        self._drive, self._label, tape_file = self._first_cartridge(expect_label)
        self.rate = StreamRate.for_drive(self._drive, min_rate, self._notice)
        self._pending = bytearray()
        self._queue: queue.Queue = queue.Queue(maxsize=max(2, buffer_bytes // block_size))
        # Ctrl-C and SIGTERM raise in the main thread wherever it is, also inside queue.Queue's
        # code, whose lock is a plain Lock that any thread may release: one interrupted put can
        # lose the writer's wakeup, and the writer must then find the abort without being woken.
        self._aborted = threading.Event()
        self._error: BaseException | None = None
        self._ending = False
        # A spooled image touches the tape only when it is whole: the drive would stop (and
        # reposition) between a segment header written now and the data written then.
        self._first_tape_file = tape_file
        if self._spool is None:
            self._start_first_segment()
        self._thread = threading.Thread(target=self._writer, name="imager-tape", daemon=True)
        self._thread.start()

    # -- cartridge handling (writer side) --
    def _first_cartridge(self, expect_label: str | None) -> tuple[TapeDrive, Label, int]:
        """The drive with the cartridge the image starts on, its label, and the tape file the
        image goes to, where the tape now stands."""
        sequence = 1
        if self.spec.is_pattern:
            # A set of virtual cartridges: append to the last one, all before it in their places
            # (else the next one made would take the number of one that is only away).
            present = self.spec.members()
            if present:
                missing = next((n for n in range(1, present[-1]) if n not in present), None)
                if missing is not None:
                    raise TapeMediaError(
                        f"cartridge {missing} of the set {self.spec.spec} is missing (no "
                        f"{self.spec.path_for(missing)}) while cartridge {present[-1]} is there: put it back "
                        f"before appending to the set, or start a new set")
                sequence = present[-1]
        path = self.spec.path_for(sequence)
        # Only the first cartridge of a virtual set is made (and labelled) by a backup; a single
        # virtual tape is made by `imager tape label`.
        creating = self.spec.is_pattern and not self.spec.is_real_drive and not os.path.exists(path)
        if not self.spec.is_real_drive and not self.spec.is_pattern and not os.path.exists(path):
            raise TapeMediaError(f"{path}: no such virtual tape; a tape is labelled before its first backup "
                                 f"(imager tape label NAME --tape {path})")
        drive = self.spec.open(sequence, create=creating)
        try:
            label = read_label(drive)
            if label is None and self.spec.is_pattern and sequence == 1 and _is_blank(drive):
                label = write_label(drive, _member_label(self.spec, 1), block_size=self.block_size)
                self.labelled.append(label)
            label = check_label(drive, label, expect_label)
            try:
                # Before anything is written: st would refuse the first block with EINVAL.
                drive.block_limits().check(self.block_size, "tape block size")
            except ValueError as e:
                raise UsageError(f"{self.spec.spec}: {e} (choose --block-size within them)") from None
            drive.set_block_size(0)
            self._set_drive_compression(drive)
            tape_file = self._position_for_append(drive)
        except BaseException:
            drive.close()
            if creating:
                os.unlink(path)
            raise
        return drive, label, tape_file

    def _position_for_append(self, drive: TapeDrive) -> int:
        tape_file, notice = position_for_append(drive)
        if notice:
            self._notice(notice)
        return tape_file

    def _start_segment(self, tape_file: int) -> None:
        self._segment = WrittenSegment(self._label.label, self._label.tape_set, self._label.sequence,
                                       tape_file, self.bytes_written, 0)
        self._write_block(_meta_block(SEGMENT_MAGIC, SEGMENT_TAG, {
            "image_id": self.image_id, "label": self._label.label, "tape_set": self._label.tape_set,
            "sequence": self._label.sequence, "segment": len(self.segments), "tape_file": tape_file,
            "stream_offset": self.bytes_written, "block_size": self.block_size}))

    def _write_block(self, data) -> None:
        """One block; past the early-warning mark st fails every other write with ENOSPC, and
        the write after such a failure is allowed: retry once, then it is the physical end."""
        for attempt in (0, 1):
            try:
                self._drive.write_block(data)
                return
            except TapeError as e:
                if e.errno != errno.ENOSPC:
                    raise TapeMediaError(_tape_write_problem(e)) from None
                if attempt:
                    raise CartridgeFull(
                        f"{self._drive.path}: cartridge {self._label.label!r} reached its physical end "
                        f"before the image segment could be closed (early-warning zone too small)") from None
                self._ending = True

    def _end_segment(self, continued: bool, record: dict | None) -> None:
        seg = self._segment
        seg.stream_length = self.bytes_written - seg.stream_offset
        self._write_block(_meta_block(END_MAGIC, END_TAG, {
            "image_id": self.image_id, "segment": len(self.segments), "stream_offset": seg.stream_offset,
            "stream_length": seg.stream_length, "continued": continued, "image": record}))
        try:
            self._drive.write_filemarks(1)
        except TapeError as e:
            raise TapeMediaError(_tape_write_problem(e)) from None
        self.segments.append(seg)

    @property
    def spooled(self) -> bool:
        return self._spool is not None

    def _start_first_segment(self) -> None:
        try:
            self._start_segment(self._first_tape_file)
        except BaseException:
            self._drive.close()
            if self._spool is not None:
                self._spool.close()
            raise

    def _set_drive_compression(self, drive: TapeDrive) -> None:
        """Off by default (the stream is zstd already); a drive that cannot switch it writes as
        it does by itself, which costs nothing but the drive's own attempt."""
        try:
            drive.set_compression(self.drive_compression)
        except CompressionNotSwitchable:
            self._notice(f"{drive.path}: the drive cannot switch its hardware compression "
                         f"{'on' if self.drive_compression else 'off'}; writing with its own setting "
                         f"(the image is compressed already)")

    def _switch_cartridge(self) -> None:
        if not (self.spec.is_pattern or self.spec.is_real_drive):
            # Said before the segment is closed as continued: left open, it is an interrupted
            # write, which tape list shows INCOMPLETE and the next backup replaces.
            raise TapeMediaError(f"{self.spec.spec}: cartridge full, and a single virtual tape has no next "
                                 f"cartridge; give a set as a pattern, e.g. --tape 'tape-{{n:03}}.tap' (the "
                                 f"unfinished tape file is replaced by the next backup to this tape)")
        self._end_segment(True, None)
        sequence = self._label.sequence + 1
        drive = self.spec.next_cartridge(self._drive, sequence)
        self._drive = drive
        label = read_label(drive)
        if label is None:
            if not _is_blank(drive):
                raise TapeMediaError(f"{drive.path}: cartridge {sequence} holds data that is not imager's; "
                                     f"it is not overwritten")
            label = write_label(drive, _member_label(self.spec, sequence, self._label),
                                tape_set=self._label.tape_set, sequence=sequence, block_size=self.block_size)
            self.labelled.append(label)
        elif label.tape_set != self._label.tape_set or label.sequence != sequence:
            raise TapeMediaError(f"{drive.path}: wrong cartridge: {label.label!r} is cartridge {label.sequence} "
                                 f"of another set; expected cartridge {sequence} of set {self._label.tape_set[:12]}")
        drive.set_block_size(0)
        self._set_drive_compression(drive)
        tape_file = self._position_for_append(drive)
        if tape_file != 1:
            raise TapeMediaError(f"{drive.path}: cartridge {label.label!r} already holds images; a spanned "
                                 f"image continues only on a blank cartridge")
        self._label = label
        self._ending = False
        self._start_segment(tape_file)

    # -- the stream --
    def write(self, frame: bytes) -> None:
        """Queue whole zstd frames of the image stream, at most `largest_frame` bytes: a cartridge
        is changed between writes, and its early-warning zone holds the rest of one write."""
        if self._error is not None:
            raise self._error
        if self._spool is not None:
            self._spool.append(frame)
            return
        self._put(frame)

    def _put(self, item) -> None:
        while True:
            try:
                self._queue.put(item, timeout=WAKE_INTERVAL)
                return
            except queue.Full:
                if self._error is not None:
                    raise self._error

    def _writer(self) -> None:
        try:
            while not self._aborted.is_set():
                try:
                    item = self._queue.get(timeout=WAKE_INTERVAL)
                except queue.Empty:
                    continue
                if self._aborted.is_set():
                    return
                if isinstance(item, tuple):  # ("finish", record)
                    self.rate.finish()
                    self._flush_pending()
                    self._end_segment(False, item[1])
                    return
                self._append_frame(item)
                self.rate.wrote(len(item))
        except BaseException as e:
            self._error = e if isinstance(e, ImagerError) else TapeMediaError(f"tape write failed: {e}")
            # The frames queued are not written: free them now.
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break

    def _append_frame(self, frame: bytes) -> None:
        view = memoryview(frame)
        bs = self.block_size
        if self._pending:
            take = min(bs - len(self._pending), len(view))
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) == bs:
                self._write_block(self._pending)
                self._pending = bytearray()
        whole = len(view) - len(view) % bs
        for start in range(0, whole, bs):
            self._write_block(view[start:start + bs])
        self._pending += view[whole:]
        self.bytes_written += len(frame)
        if self._ending:
            self._flush_pending()
            self._switch_cartridge()

    def _flush_pending(self) -> None:
        if self._pending:
            self._write_block(self._pending)
            self._pending = bytearray()

    def commit(self, record: dict | None = None) -> None:
        """Close the image's last segment with the image record; waits for the drive. A spooled
        image goes to the drive now, as fast as the disk reads it back."""
        if self._spool is not None and self._error is None:
            self._notice(f"writing the spooled image ({sum(self._spool.lengths) >> 20} MiB) to {self.path}")
            self._start_first_segment()
            self.rate.restart()
            for frame in self._spool.frames():
                self._put(frame)
                if self._error is not None:
                    break
        if self._error is None:
            self._put(("finish", record))
        self._thread.join()
        if self._spool is not None:
            # Only now: freeing a spool of gigabytes takes the kernel half a second, which before
            # the image's last block would stop the drive.
            self._spool.close()
        self._drive.close()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop the writer where it is (the image's segment stays open: the next backup finds
        an interrupted write) and close the drive."""
        self._aborted.set()
        if self._spool is not None:
            self._spool.close()
        self._thread.join()
        try:
            self._drive.close()
        except DeviceError:
            pass


class _Spool:
    """The image's frames on disk until the whole image is made (`--spool DIR`, as Bacula
    spools): the drive then gets them at the disk's speed, never slower than it streams. An
    unnamed file (O_TMPFILE): nothing is left in DIR whatever happens to the process."""

    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            raise UsageError(f"--spool {directory}: no such directory")
        try:
            self._file = tempfile.TemporaryFile(dir=directory, prefix=".imager-spool-")
        except OSError as e:
            raise UsageError(f"--spool {directory}: cannot create the spool file: {e.strerror}") from None
        self.lengths = array("q")

    def append(self, frame: bytes) -> None:
        try:
            self._file.write(frame)
        except OSError as e:
            raise ImagerError(f"the spool file could not take the image: {e.strerror}") from None
        self.lengths.append(len(frame))

    def frames(self) -> Iterator[bytes]:
        self._file.flush()
        self._file.seek(0)
        # Read back in the kernel's largest readahead steps: a stall reading the spool is a stall
        # of the drive.
        os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        for length in self.lengths:
            frame = self._file.read(length)
            if len(frame) != length:
                raise ImagerError("the spool file ends early (it was changed or truncated)")
            yield frame

    def close(self) -> None:
        self._file.close()


def output_counting(sink: object, progress: Progress | None) -> Callable[[int], None]:
    """What counts an image's compressed bytes for the display, called with the image writer's
    running total: for a tape, the bytes reaching the drive (the sink's writer thread counts
    them, against the drive's streaming minimum; the callback returned ignores the total); for
    a file, a pipe or a spool, the bytes written since the last call."""
    if isinstance(sink, TapeSink) and not sink.spooled:
        sink.rate.listener = output_counter(progress, "to tape", sink.rate.minimum)
        return lambda total: None
    # A spooled image reaches the drive only at the end: what the display can show meanwhile
    # is the spool's rate, which has no minimum.
    count = output_counter(progress, "to the spool" if isinstance(sink, TapeSink) else "written")
    counted = 0

    def running_total(total: int) -> None:
        nonlocal counted
        count(total - counted)
        counted = total
    return running_total
