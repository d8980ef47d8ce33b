"""Where an image's bytes go. A sink takes `write(bytes)`, then `commit()` or `abort()`."""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from typing import BinaryIO

from .errors import ImagerError, UsageError
from .guards import check_image_output

# What -o names to write the image stream to standard output.
STDOUT = "-"


def create_beside(path: str) -> tuple[int, str]:
    """A new, private temporary file next to `path` (same filesystem, so a rename puts it in
    place atomically); its name starts with a dot and the final name."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        return tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.part-")
    except OSError as e:
        raise UsageError(f"cannot create a file in {directory}: {e.strerror}") from None


def fsync_directory_of(path: str) -> None:
    """Make a rename in the directory of `path` durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSink:
    """Writes an image file under a temporary name in the target's directory and renames it
    into place only on commit, so a failed or interrupted backup never leaves a partial image
    under the real name, and an existing image stays intact until the new one is complete."""

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
        fd, self.temp_path = create_beside(path)
        self._f = open(fd, "wb", buffering=buffer_size)
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        try:
            self._f.write(data)
        except OSError as e:
            raise ImagerError(f"writing {self.path}: {e.strerror}") from None
        self.bytes_written += len(data)

    def commit(self) -> None:
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.rename(self.temp_path, self.path)
            fsync_directory_of(self.path)
        except OSError as e:
            self.abort()
            raise ImagerError(f"finishing {self.path}: {e.strerror}") from None

    def abort(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass


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
