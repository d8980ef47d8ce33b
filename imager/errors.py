"""Every error the engine reports to a user. Each message is one line a user can act on; the
CLI prints it without a traceback and exits with the class's `exit_code`: 2 for a request that
is wrong in itself (fix the command line), 1 for a job that failed."""

from __future__ import annotations


class ImagerError(Exception):
    """Base of every error the engine reports to a user."""

    exit_code = 1


class UsageError(ImagerError):
    """The request itself is wrong: a missing source, an existing output, a too-small target,
    a device that holds data and no --force."""

    exit_code = 2


class ImageFormatError(ImagerError):
    """An image is truncated, corrupted, or not an imager image."""


class NotAnImage(ImageFormatError):
    """The file given is empty or holds no imager header: the request names the wrong file."""

    exit_code = 2


class ChunkError(ImageFormatError):
    """One chunk of an image is damaged; names the chunk and where it lives."""

    def __init__(self, index: int, image_offset: int, volume_offset: int, problem: str, image: str = ""):
        self.index = index
        self.image_offset = image_offset
        self.volume_offset = volume_offset
        self.problem = problem
        self.image = image
        where = f"{image}: " if image else ""
        super().__init__(f"{where}chunk {index} (image offset {image_offset}, volume offset {volume_offset}): "
                         f"{problem}")

    def of_image(self, image: str) -> "ChunkError":
        """The same error naming the image file it is in (one image of a chain)."""
        return ChunkError(self.index, self.image_offset, self.volume_offset, self.problem, image)


class SnapshotError(ImagerError):
    """A snapshot could not be taken, read or removed."""


class CacheFullError(SnapshotError):
    """The snapshot's cache region overflowed; the snapshot is no longer point-in-time. Says how
    much cache it would have needed, and what to do."""

    def __init__(self, volume: str, reason: str, needed_bytes: int, capacity: int | None):
        self.needed_bytes = needed_bytes
        self.capacity = capacity
        remedy = ("a larger cache (imager attach --cache-size)" if capacity is not None and needed_bytes > capacity
                  else "more free space where the cache lives")
        super().__init__(f"the snapshot of {volume} is no longer point-in-time: {reason}; at least {needed_bytes} "
                         f"bytes ({needed_bytes / (1 << 20):.1f} MiB) of cache would have been needed, retry with "
                         f"{remedy}")


class VolumeError(ImagerError):
    """A managed volume could not be attached, detached or reached."""


class VolumeRefused(VolumeError):
    """A request a managed volume's state refuses (no volume of that name, one already attached,
    a device or front still mounted): the request is what is wrong."""

    exit_code = 2


class TapeMediaError(ImagerError):
    """The tape does not hold what was expected: unlabelled, another tape, damaged, cut short."""


class CartridgeFull(TapeMediaError):
    """A cartridge reached its physical end before an image segment could be closed."""
