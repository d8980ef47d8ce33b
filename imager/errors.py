"""Engine errors. Each message is one line a user can act on; the CLI prints it without a traceback."""


class ImagerError(Exception):
    """Base of every error the engine reports to a user."""


class UsageError(ImagerError):
    """The request itself is wrong: a missing source, an existing output, a too-small target."""


class ImageFormatError(ImagerError):
    """An image is truncated, corrupted, or not an imager image."""


class ChunkError(ImageFormatError):
    """One chunk of an image is damaged; names the chunk and where it lives."""

    def __init__(self, index: int, image_offset: int, volume_offset: int, problem: str):
        self.index = index
        self.image_offset = image_offset
        self.volume_offset = volume_offset
        super().__init__(f"chunk {index} (image offset {image_offset}, volume offset {volume_offset}): {problem}")


class SnapshotError(ImagerError):
    """A snapshot could not be taken, read or removed."""


class CacheFullError(SnapshotError):
    """The snapshot's cache region overflowed; the snapshot is no longer point-in-time."""
