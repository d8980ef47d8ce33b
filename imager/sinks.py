"""Where an image's bytes go. A sink takes `write(bytes)`, then `commit()` or `abort()`."""

from __future__ import annotations

import os
import tempfile

from .errors import ImagerError, UsageError


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
