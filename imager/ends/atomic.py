"""A file that appears under its name only when complete and durable."""

from __future__ import annotations

import errno
import os
import tempfile



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
    meanwhile is never overwritten. `fd` is open read-write; `open_path` names it for reopening.
    Failures are OSErrors, for the caller to say what they mean."""

    def __init__(self, path: str, *, replace: bool = False):
        self.path = path
        self.replace = replace
        self.directory = os.path.dirname(os.path.abspath(path))
        self.temp_path: str | None = None
        try:
            self.fd = os.open(self.directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            self.fd, self.temp_path = self._named_temporary()

    @property
    def open_path(self) -> str:
        return self.temp_path or f"/proc/self/fd/{self.fd}"

    def _named_temporary(self) -> tuple[int, str]:
        return tempfile.mkstemp(dir=self.directory, prefix=f".{os.path.basename(self.path)}.part-")

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


def write_atomically(path: str, data: bytes) -> None:
    """Replace the file `path` with `data`, all or nothing, durably (OSError on failure)."""
    f = AtomicFile(path, replace=True)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(f.fd, view):]
        f.commit()
    except BaseException:
        f.abort()
        raise
