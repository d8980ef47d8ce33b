"""Restore, the mirror of backup: a feed (an image file, standard input, tape) decoded on every
core (pipeline), each chunk checked, written in order to a target (a block device, or a file
that appears only when whole), and, asked for, read back from the medium and compared."""

from __future__ import annotations

import logging
import time
from typing import Callable

from devices.block import BlockDevice
from devices.buffers import BufferPool
from devices.topology import same_file

from ..ends.feeds import Feed, SeekableFeed
from ..ends.sources import VolumePrefix
from ..ends.target import RestoreTarget
from ..errors import ImageFormatError, ImagerError, UsageError
from ..format import ImageHeader, ImageReader, ImageTrailer
from ..pipeline import DecodedChunk, decoder, digester, read_chunks, run_ordered, worker_count
from .results import RestoreResult

Progress = Callable[[int], None]

log = logging.getLogger("imager.restore")


def restore(image: str, target: str, *, force: bool = False, verify: bool = False,
            workers: int | None = None, progress: Progress | None = None) -> RestoreResult:
    """Write the volume held by the image file `image` onto the block device or file `target`."""
    with ImageReader(image) as reader:
        return restore_feed(SeekableFeed(reader), target, force=force, verify=verify, workers=workers,
                            progress=progress)


def restore_feed(feed: Feed, target: str, *, force: bool = False, verify: bool = False,
                 workers: int | None = None, progress: Progress | None = None) -> RestoreResult:
    """Write the chunks of `feed` onto `target`, in order."""
    workers = worker_count(workers)
    started = time.monotonic()
    header = feed.header
    image_path = getattr(feed, "path", None)
    if image_path and same_file(image_path, target):
        raise UsageError(f"{target}: is the image being restored; give another target")
    tgt = RestoreTarget(target, header.volume_size, force)
    log.info("restoring %s (%d bytes in %d chunks) to %s", feed.name, header.volume_size, header.chunk_count, target)
    # Every chunk's contents are checked against its digest: damage that the stream digest
    # alone would find cannot change what is restored (verify reports it), and hashing every
    # compressed byte would cost restore about 10% of its CPU.
    feed.skip_stream_digest()
    totals = {"zero_chunks": 0, "bytes_written": 0}
    digests = bytearray()

    def consume(result: DecodedChunk) -> None:
        index, data, digest = result
        length = header.chunk_length(index)
        tgt.write_chunk(index * header.chunk_size, data, length)
        digests.extend(digest)
        if data is None:
            totals["zero_chunks"] += 1
        else:
            totals["bytes_written"] += length
        if progress:
            progress(length)

    try:
        run_ordered(feed.chunks(), decoder(feed), consume, workers=workers)
        trailer = feed.finish()
        trailer.check_chunk_digests(bytes(digests), header.chunk_size)
        tgt.finish()
    except ImageFormatError as e:
        tgt.abort()
        where = f"nothing written to {target}" if tgt.fresh_file else f"{target} holds a partial volume"
        raise ImageFormatError(f"restore failed, {where}: {e}") from None
    except BaseException:
        tgt.abort()
        raise
    tgt.close()
    if verify:
        log.info("reading %s back from the medium to compare", target)
        compare_with_image(target, header, trailer, workers=workers)
    return RestoreResult(image=feed.name, target=target, volume_size=header.volume_size,
                         chunks=header.chunk_count, zero_chunks=totals["zero_chunks"],
                         bytes_written=totals["bytes_written"], seconds=time.monotonic() - started,
                         verified=verify)


def compare_with_image(target: str, header: ImageHeader, trailer: ImageTrailer, *,
                       workers: int | None = None) -> None:
    """Re-read the volume's length of `target` from the medium and compare every chunk's
    checksum with the image's."""
    workers = worker_count(workers)
    with BlockDevice(target, direct=True) as dev:
        dev.drop_cache()
        pool = BufferPool(workers * 2 + 2, header.chunk_size)

        def check(result: tuple[int, bytes]) -> None:
            index, got = result
            if got != trailer.digest(index):
                raise ImagerError(f"verify after restore failed: {target} differs from the image in chunk "
                                  f"{index} (volume offset {index * header.chunk_size})")

        try:
            run_ordered(read_chunks(VolumePrefix(dev, header.volume_size), header.chunk_size, pool, lambda n: None),
                        digester(pool), check, workers=workers)
        finally:
            pool.close()
