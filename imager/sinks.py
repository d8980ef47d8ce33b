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


def fsync_directory_of(path: str) -> None:
    """Make a rename in the directory of `path` durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A new file that appears at `path` only when committed, complete and durable.

    It is written as an unnamed file (O_TMPFILE) in the target's directory where the filesystem
    allows, so that a process killed even by SIGKILL leaves nothing behind; elsewhere under a
    hidden temporary name (".NAME.part-XXXX"). Without `replace` a file that appears at `path`
    meanwhile is never overwritten. `fd` is open read-write; `open_path` names it for reopening."""

    def __init__(self, path: str, *, replace: bool = False):
        self.path = path
        self.replace = replace
        self.directory = os.path.dirname(os.path.abspath(path))
        self.temp_path: str | None = None
        try:
            self.fd = os.open(self.directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise UsageError(f"cannot create a file in {self.directory}: {e.strerror}") from None
            self.fd, self.temp_path = self._named_temporary()

    @property
    def open_path(self) -> str:
        return self.temp_path or f"/proc/self/fd/{self.fd}"

    def _named_temporary(self) -> tuple[int, str]:
        try:
            return tempfile.mkstemp(dir=self.directory, prefix=f".{os.path.basename(self.path)}.part-")
        except OSError as e:
            raise UsageError(f"cannot create a file in {self.directory}: {e.strerror}") from None

    def commit(self) -> None:
        """fsync the data, give it its name, fsync the directory."""
        os.fsync(self.fd)
        if self.temp_path is None:
            if self.replace:
                # linkat cannot replace: link under a temporary name, then rename over.
                fd, self.temp_path = self._named_temporary()
                os.close(fd)
                os.unlink(self.temp_path)
                self._link_unnamed(self.temp_path)
                os.rename(self.temp_path, self.path)
            else:
                self._link_unnamed(self.path)
        elif self.replace:
            os.rename(self.temp_path, self.path)
        else:
            os.link(self.temp_path, self.path)
            os.unlink(self.temp_path)
        self.temp_path = None
        os.close(self.fd)
        self.fd = -1
        fsync_directory_of(self.path)

    def _link_unnamed(self, name: str) -> None:
        # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N names an O_TMPFILE file; a dir fd makes
        # os.link call linkat (a plain link() would try to link the /proc symlink itself).
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.link(f"/proc/self/fd/{self.fd}", os.path.basename(name), dst_dir_fd=dir_fd, follow_symlinks=True)
        finally:
            os.close(dir_fd)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.temp_path:
            try:
                os.unlink(self.temp_path)
            except FileNotFoundError:
                pass
            self.temp_path = None


class FileSink:
    """Writes an image file so that it appears under its name only when complete (AtomicFile):
    a failed or interrupted backup never leaves a partial image under the real name, and an
    existing image stays intact until the new one is complete."""

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
        self._file = AtomicFile(path, replace=force)
        self._f = open(self._file.fd, "wb", buffering=buffer_size, closefd=False)
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
