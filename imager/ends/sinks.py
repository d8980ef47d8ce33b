"""Where a backup writes an image: a Sink takes the stream with write(bytes), then commit() or
abort(). FileSink and StreamSink here; the tape sink is imager.tape.TapeSink."""

from __future__ import annotations

import errno
import os
import sys
from typing import BinaryIO, Protocol

from devices.libc import start_writeback

from ..errors import ImagerError, UsageError
from .atomic import AtomicFile
from .guards import check_image_output

# What -o names to write the image stream to standard output.
STDOUT = "-"


class Sink(Protocol):
    """An image being written: its bytes in order; committed when whole, aborted otherwise.
    `path` says where it goes, for messages and records."""

    path: str
    bytes_written: int

    def write(self, data: bytes) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class FileSink:
    """Writes an image file so that it appears under its name only when complete (AtomicFile):
    a failed or interrupted backup never leaves a partial image under the real name, and an
    existing image stays intact until the new one is complete."""

    # The image goes to its disk while it is written, each 32 MiB as soon as it is written
    # (start_writeback): the fsync at the end then waits for the last of it, not for the whole
    # image, and the machine's dirty pages stay bounded.
    WRITEBACK_STEP = 32 << 20

    def __init__(self, path: str, *, force: bool = False, buffer_size: int = 1 << 20):
        self.path = path
        check_image_output(path)
        if os.path.isdir(path):
            raise UsageError(f"{path}: is a directory; give an image file name")
        if os.path.exists(path) and not force:
            raise UsageError(f"{path}: already exists (use --force to replace it)")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise UsageError(f"{directory}: no such directory for the image")
        try:
            self._file = AtomicFile(path, replace=force)
        except OSError as e:
            raise UsageError(f"cannot create a file in {directory}: {e.strerror}") from None
        self._f = open(self._file.fd, "wb", buffering=buffer_size, closefd=False)
        self.bytes_written = 0
        self._written_back = 0

    def write(self, data: bytes) -> None:
        due = self.bytes_written + len(data) - self._written_back >= self.WRITEBACK_STEP
        try:
            self._f.write(data)
            if due:
                self._f.flush()
        except OSError as e:
            raise ImagerError(f"writing {self.path}: {e.strerror}") from None
        self.bytes_written += len(data)
        if due:
            try:
                start_writeback(self._file.fd, self._written_back, self.bytes_written - self._written_back)
            except OSError:
                pass        # only sooner on the disk: the fsync of commit() says whether it got there
            self._written_back = self.bytes_written

    def commit(self) -> None:
        try:
            self._f.flush()
            self._f.close()
            self._file.commit()
        except FileExistsError:
            self.abort()
            raise UsageError(f"{self.path}: appeared while the image was written; not replaced "
                             f"(use --force to replace it)") from None
        except OSError as e:
            self.abort()
            raise ImagerError(f"finishing {self.path}: {e.strerror}") from None

    def abort(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass
        self._file.abort()


class StreamSink:
    """Writes the image stream to a pipe (standard output by default), for `| ssh`, `| mbuffer`,
    `| aws s3 cp -`. Nothing can be taken back from a pipe: an aborted stream simply stops, and
    the missing trailer tells any reader that the image is incomplete."""

    def __init__(self, stream: BinaryIO | None = None, name: str = "standard output"):
        self._stream = stream if stream is not None else sys.stdout.buffer
        self.path = name
        if self._stream.isatty():
            raise UsageError(f"refusing to write an image to a terminal on {name}: redirect it "
                             f"(-o - | ssh host 'cat > vol.zst', or > vol.zst)")
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        try:
            self._stream.write(data)
        except BrokenPipeError:
            raise ImagerError(f"{self.path} was closed by the program reading the image") from None
        except OSError as e:
            raise ImagerError(f"writing the image to {self.path}: {e.strerror}") from None
        self.bytes_written += len(data)

    def commit(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise ImagerError(f"{self.path} was closed by the program reading the image") from None
        except OSError as e:
            raise ImagerError(f"writing the image to {self.path}: {e.strerror}") from None

    def abort(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ENOSPC, errno.EIO):
                raise
