"""Where a restore writes a volume: a block device written in place, or a new file written as
an AtomicFile (it appears only when complete). A device that holds data is refused unless
forced; see guards.py for what a path may be."""

from __future__ import annotations

import logging
import os
import stat

from devices.block import BlockDevice
from devices.errors import DeviceError
from devices.fs import mounts_of
from devices.topology import in_use_above

from ..errors import ImageFormatError, ImagerError, UsageError
from .atomic import AtomicFile
from .guards import check_restore_target, refuse_overwriting_data
from .sources import SOURCE_SNIFF_BYTES, backup_artifact_kind

log = logging.getLogger("imager.restore")


class RestoreTarget:
    """A block device written in place, or a new file written under a temporary name."""

    def __init__(self, path: str, volume_size: int, force: bool, *, direct: bool = False):
        """`direct`: write with O_DIRECT (the caller's buffers page-aligned): a restore neither
        fills the page cache with the whole volume nor pays a copy into it per byte, which on
        this kind of machine is most of a restore's CPU (bench/chain.py, bench/compare.py).
        Where the kernel refuses O_DIRECT, the writes go through the page cache."""
        self.path = path
        self.file: AtomicFile | None = None
        self.fresh_file = False
        st = check_restore_target(path)
        if st is not None and stat.S_ISBLK(st.st_mode):
            mounted = mounts_of(path)
            if mounted:
                raise UsageError(f"{path}: is mounted at {mounted[0].mount_point}; unmount it before restoring onto it")
            refuse_in_use_above(path)
            try:
                self.dev = BlockDevice(path, writable=True, direct=direct, exclusive=True, on_notice=log.info)
            except DeviceError as e:
                raise UsageError(str(e)) from None
            try:
                if self.dev.read_only:
                    raise UsageError(f"{path}: device is read-only")
                if self.dev.size < volume_size:
                    raise UsageError(f"{path}: too small: {self.dev.size} bytes, the image holds a volume "
                                     f"of {volume_size} bytes")
                if not force:
                    # Checked while the exclusive open keeps anyone from mounting it meanwhile.
                    refuse_overwriting_data(path)
                    # wipefs knows no image or zstd file (a loop device on a backup, say).
                    kind = backup_artifact_kind(self.dev.pread(SOURCE_SNIFF_BYTES, 0))
                    if kind:
                        raise UsageError(f"{path} holds {kind}, use --force to overwrite it")
            except BaseException:
                self.dev.close()
                raise
            return
        if st is not None and not force:
            raise UsageError(f"{path}: already exists (use --force to replace it)")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise UsageError(f"{directory}: no such directory")
        try:
            self.file = AtomicFile(path, replace=force)
        except OSError as e:
            raise UsageError(f"cannot create {path}: {e.strerror}") from None
        try:
            os.ftruncate(self.file.fd, volume_size)
            self.dev = BlockDevice(self.file.open_path, writable=True, direct=direct, on_notice=log.info, name=path)
        except (OSError, DeviceError) as e:
            self.file.abort()
            raise UsageError(f"cannot create {path}: {getattr(e, 'strerror', None) or e}") from None
        self.fresh_file = True

    def write_chunk(self, offset: int, data: bytes | memoryview | None, length: int) -> None:
        try:
            if data is not None:
                self.dev.write_at(data, offset)
            elif not self.fresh_file:
                self.dev.zero_range(offset, length)
            # a zero chunk in a fresh file stays a hole
        except DeviceError as e:
            raise self._left(e) from None

    def finish(self) -> None:
        try:
            self.dev.flush()
        except DeviceError as e:
            raise self._left(e) from None
        if self.file is not None:
            try:
                self.file.commit()
            except FileExistsError:
                raise UsageError(f"{self.path}: appeared while restoring; not replaced (use --force)") from None
            self.file = None

    def abort(self) -> None:
        self.dev.close()
        if self.file is not None:
            self.file.abort()

    def failed(self, error: ImageFormatError) -> ImageFormatError:
        """Abort, and the error to raise: `error` with what the target holds now."""
        self.abort()
        return ImageFormatError(f"restore failed, {self._what_is_left()}: {error}")

    def _left(self, error: DeviceError) -> ImagerError:
        """A write that failed (a full disk, a bad sector), with what the target holds now (the
        job aborts it)."""
        return ImagerError(f"restore failed, {self._what_is_left()}: {error}")

    def _what_is_left(self) -> str:
        return f"nothing written to {self.path}" if self.fresh_file else f"{self.path} holds a partial volume"

    def close(self) -> None:
        self.dev.close()


def refuse_in_use_above(path: str) -> None:
    """A device in use through another one on it (a partition mounted, a loop device on it
    mounted or held) is refused, --force or not: writing under a mounted filesystem corrupts it."""
    found = in_use_above(path)
    if found is None:
        return
    above, mount_point = found
    if mount_point:
        raise UsageError(f"{path}: is mounted through {above} at {mount_point}; unmount it before restoring onto {path}")
    raise UsageError(f"{path}: is in use through {above} (held open exclusively: a managed volume, swap, RAID or "
                     f"another tool); stop using it before restoring onto {path}")
