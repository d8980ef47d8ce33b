"""Verify: every chunk of an image decompressed and checked against its digests, and the image
as a whole against its stream digest."""

from __future__ import annotations

import time
from typing import Callable

from ..ends.feeds import Feed, SeekableFeed
from ..format import ImageReader
from ..pipeline import DecodedChunk, decoder, run_ordered, worker_count
from .results import VerifyResult

Progress = Callable[[int], None]


def verify(image: str, *, workers: int | None = None, progress: Progress | None = None) -> VerifyResult:
    """Read every chunk of the image file `image`, decompress it and check it against its checksums."""
    with ImageReader(image) as reader:
        return verify_feed(SeekableFeed(reader), workers=workers, progress=progress)


def verify_feed(feed: Feed, *, workers: int | None = None, progress: Progress | None = None) -> VerifyResult:
    started = time.monotonic()
    header = feed.header
    zero = [0]
    digests = bytearray()

    def consume(result: DecodedChunk) -> None:
        index, data, digest = result
        digests.extend(digest)
        zero[0] += data is None
        if progress:
            progress(header.chunk_length(index))

    run_ordered(feed.chunks(), decoder(feed), consume, workers=worker_count(workers))
    feed.finish().check_chunk_digests(bytes(digests), header.chunk_size)
    return VerifyResult(image=feed.name, volume_size=header.volume_size, chunks=header.chunk_count,
                        zero_chunks=zero[0], seconds=time.monotonic() - started)
