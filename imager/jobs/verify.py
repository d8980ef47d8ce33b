"""Verify: every chunk of an image decompressed and checked against its digests, and the image
as a whole against its stream digest."""

from __future__ import annotations

import time
from contextlib import ExitStack

from ..catalog import Catalog
from ..ends.feeds import Feed, SeekableFeed
from ..errors import ChunkError
from ..format import ImageReader
from ..pipeline import decode_feed, worker_count
from ..progress import Progress, start_phase
from .chains import open_chain
from .results import VerifyResult



def verify(image: str, *, workers: int | None = None, progress: Progress | None = None,
           catalog: Catalog | None = None) -> VerifyResult:
    """Read every chunk of the image file `image`, decompress it and check it against its
    checksums; for an incremental, every image of its chain back to the full, and that they
    make one volume at its point."""
    with ExitStack() as stack:
        reader = stack.enter_context(ImageReader(image))
        result = verify_feed(SeekableFeed(reader), workers=workers, progress=progress)
        if not reader.header.incremental:
            return result
        chain = open_chain(reader, stack, catalog=catalog)      # checks every link and digest table
        for parent in chain.images[1:]:
            try:
                verify_feed(SeekableFeed(parent), workers=workers)
            except ChunkError as e:
                raise e.of_image(parent.path) from None
        result.chain = [i.header.image_id for i in chain.images]
    return result


def verify_feed(feed: Feed, *, workers: int | None = None, progress: Progress | None = None) -> VerifyResult:
    started = time.monotonic()
    header = feed.header
    start_phase(progress, "verify", header.volume_size)
    zero = [0]
    count = [0]
    digests: list[tuple[int, bytes]] = []

    def consume(index: int, data: memoryview | None, digest: bytes) -> None:
        digests.append((index, digest))
        zero[0] += data is None
        count[0] += 1
        if progress:
            progress(header.chunk_length(index))

    decode_feed(feed, consume, workers=worker_count(workers))
    feed.finish().check_chunk_digests(digests)
    return VerifyResult(image=feed.name, volume_size=header.volume_size, chunks=count[0],
                        zero_chunks=zero[0], seconds=time.monotonic() - started, image_id=header.image_id,
                        chain=[header.image_id])
