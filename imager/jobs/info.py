"""Info: what an image holds, from its header and trailer."""

from __future__ import annotations

from ..ends.feeds import StreamFeed
from ..format import ImageHeader, ImageReader, ImageTrailer
from .results import ImageInfo


def info(image: str) -> ImageInfo:
    """The header and totals of the image file `image` (its metadata only: nothing decompressed)."""
    with ImageReader(image) as reader:
        return _info(image, reader.file_size, reader.header, reader.trailer)


def info_feed(feed: StreamFeed) -> ImageInfo:
    """What an image read as a stream holds: its header, and the totals of its trailer, which
    comes last, so the whole stream is read (not decompressed)."""
    for _ in feed.chunks():
        pass
    return _info(feed.name, feed.stream_bytes, feed.header, feed.finish())


def _info(name: str, size: int, header: ImageHeader, trailer: ImageTrailer) -> ImageInfo:
    return ImageInfo(image=name, file_size=size, header=header, totals=trailer.totals,
                     ratio=round(header.volume_size / size, 3))
