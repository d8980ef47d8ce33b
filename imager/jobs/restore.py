"""Restore, the mirror of backup: a feed (an image file, standard input, tape) decoded on every
core (pipeline), each chunk checked, written in order to a target (a block device, or a file
that appears only when whole), and, asked for, read back from the medium and compared."""

from __future__ import annotations

import logging
import os
import stat
import time
from contextlib import ExitStack

from devices.block import BlockDevice, size_of
from devices.discover import is_partition
from devices.buffers import AlignedBuffer, BufferPool
from devices.partitions import partition_devices, reread_partitions
from devices.topology import writes_to

from ..catalog import Catalog
from ..ends.feeds import Feed, SeekableFeed
from ..ends.sources import VolumePrefix
from ..ends.target import RestoreTarget
from ..errors import ImageFormatError, ImagerError, UsageError
from ..format import DIGEST_SIZE, ImageReader
from ..format.chain import Chain
from ..pipeline import decode_feed, digester, filled, pool_size, read_chunks, run_ordered, worker_count
from ..progress import Progress, start_phase
from .chains import open_chain
from .results import RestoreResult


log = logging.getLogger("imager.restore")


def restore(image: str, target: str, *, force: bool = False, verify: bool = False,
            workers: int | None = None, progress: Progress | None = None,
            catalog: Catalog | None = None) -> RestoreResult:
    """Write the volume held by the image file `image` onto the block device or file `target`;
    an incremental's volume at its point, its parents found through `catalog` or beside it."""
    with ExitStack() as stack:
        reader = stack.enter_context(ImageReader(image))
        if not reader.header.incremental:
            return restore_feed(SeekableFeed(reader), target, force=force, verify=verify, workers=workers,
                                progress=progress)
        chain = open_chain(reader, stack, catalog=catalog)
        return restore_chain(chain, target, force=force, verify=verify, workers=workers, progress=progress)


def restore_chain(chain: Chain, target: str, *, force: bool = False, verify: bool = False,
                  workers: int | None = None, progress: Progress | None = None) -> RestoreResult:
    """Write the volume at a chain point: each region (a chunk of the full) assembled from the
    full and the newest blocks of the incrementals, each block checked, written once."""
    workers = worker_count(workers)
    started = time.monotonic()
    header = chain.header
    if writes_to(target, chain.point.path) or any(writes_to(target, i.path) for i in chain.images):
        raise UsageError(f"{target}: writing it would write over an image of the chain being restored (it is "
                         f"that file, or a loop device on it); give another target")
    tgt = RestoreTarget(target, header.volume_size, force, direct=True)
    start_phase(progress, "write", header.volume_size)
    log.info("restoring %s, a chain of %d images, to %s", chain.point.path, len(chain.images), target)
    totals = {"zero_chunks": 0, "bytes_written": 0}
    pool = BufferPool(pool_size(workers), chain.region_size)

    def assemble(region: int) -> tuple[int, AlignedBuffer | None]:
        return region, filled(pool, chain.region_length(region), lambda view: chain.region_into(region, view))

    def consume(result: tuple[int, AlignedBuffer | None]) -> None:
        region, buf = result
        length = chain.region_length(region)
        try:
            tgt.write_chunk(region * chain.region_size, None if buf is None else buf.view[:length], length)
        finally:
            if buf is not None:
                pool.release(buf)
        if buf is None:
            totals["zero_chunks"] += 1
        else:
            totals["bytes_written"] += length
        if progress:
            progress(length)

    try:
        run_ordered(range(chain.region_count), assemble, consume, workers=workers)
        tgt.finish()
    except ImageFormatError as e:
        raise tgt.failed(e) from None
    except BaseException:
        tgt.abort()
        raise
    finally:
        pool.close()
    tgt.close()
    settle_partitions(target, header)
    if verify:
        log.info("reading %s back from the medium to compare", target)
        compare_with_digests(target, header.volume_size, chain.region_size, header.block_size,
                             chain.trailer.digests, workers=workers, progress=progress)
    return RestoreResult(image=chain.point.path, target=target, volume_size=header.volume_size,
                         chunks=chain.region_count, zero_chunks=totals["zero_chunks"],
                         bytes_written=totals["bytes_written"], seconds=time.monotonic() - started,
                         verified=verify, chain=[i.header.image_id for i in chain.images])


def restore_feed(feed: Feed, target: str, *, force: bool = False, verify: bool = False,
                 workers: int | None = None, progress: Progress | None = None) -> RestoreResult:
    """Write the chunks of `feed` onto `target`, in order."""
    workers = worker_count(workers)
    started = time.monotonic()
    header = feed.header
    if header.incremental:
        raise UsageError(f"{feed.name}: an incremental image holds only what changed since its parent; "
                         f"restore it from a file, where its chain can be found")
    image_path = getattr(feed, "path", None)
    if image_path and writes_to(target, image_path):
        raise UsageError(f"{target}: writing it would write over the image being restored (it is that file, or "
                         f"a loop device on it); give another target")
    tgt = RestoreTarget(target, header.volume_size, force, direct=True)
    start_phase(progress, "write", header.volume_size)
    log.info("restoring %s (%d bytes in %d chunks) to %s", feed.name, header.volume_size, header.chunk_count, target)
    # Every chunk's contents are checked against its digest: damage that the stream digest
    # alone would find cannot change what is restored (verify reports it), and hashing every
    # compressed byte would cost restore about 10% of its CPU.
    feed.skip_stream_digest()
    totals = {"zero_chunks": 0, "bytes_written": 0}
    digests: list[tuple[int, bytes]] = []

    def consume(index: int, data: memoryview | None, digest: bytes) -> None:
        length = header.chunk_length(index)
        tgt.write_chunk(index * header.chunk_size, data, length)
        digests.append((index, digest))
        if data is None:
            totals["zero_chunks"] += 1
        else:
            totals["bytes_written"] += length
        if progress:
            progress(length)

    try:
        decode_feed(feed, consume, workers=workers)
        trailer = feed.finish()
        trailer.check_chunk_digests(digests)
        tgt.finish()
    except ImageFormatError as e:
        raise tgt.failed(e) from None
    except BaseException:
        tgt.abort()
        raise
    tgt.close()
    settle_partitions(target, header)
    if verify:
        log.info("reading %s back from the medium to compare", target)
        compare_with_digests(target, header.volume_size, header.chunk_size, header.block_size, trailer.digests,
                             workers=workers, progress=progress)
    return RestoreResult(image=feed.name, target=target, volume_size=header.volume_size,
                         chunks=header.chunk_count, zero_chunks=totals["zero_chunks"],
                         bytes_written=totals["bytes_written"], seconds=time.monotonic() - started,
                         verified=verify, chain=[header.image_id])


def settle_partitions(target: str, header) -> None:
    """After a whole disk's volume is written onto a whole disk, the kernel's partitions of it
    are those of before: have it take up the new table, as sfdisk does, and say what is left
    to do (a kernel that does not scan this device; a larger disk's GPT backup header)."""
    if not is_whole_disk(target) or not (header.partitions or partition_devices(target)):
        return
    try:
        outcome = reread_partitions(target)
    except OSError as e:
        outcome, why = "stale", e.strerror
    else:
        why = "a partition of it is in use"
    if outcome == "reread":
        log.info("%s: the kernel read its new partition table", target)
    elif outcome == "updated":
        log.warning("%s: its partition devices were made again from the restored table (partx)", target)
    elif outcome == "none" and header.partitions:
        log.warning("%s: the kernel does not read partition tables on it; partx -a %s gives the restored "
                    "partitions devices", target, target)
    elif outcome == "stale":
        log.warning("%s: the kernel still has the partitions of before the restore (%s); partx -u %s or a "
                    "reboot takes up the restored table", target, why, target)
    table = header.partitions or {}
    if table.get("scheme") == "gpt" and (size := size_of(target)) > header.volume_size:
        log.warning("%s is larger than the restored disk (%d against %d bytes): its GPT backup header is not at "
                    "the disk's end; sgdisk -e %s (or sfdisk --relocate gpt-bak-std %s) moves it there",
                    target, size, header.volume_size, target, target)


def is_whole_disk(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode) and not is_partition(path)
    except OSError:
        return False


def compare_with_digests(target: str, volume_size: int, read_size: int, block_size: int, digests: bytes, *,
                         workers: int | None = None, progress: Progress | None = None) -> None:
    """Re-read the volume's length of `target` from the medium and compare every block's digest
    with `digests` (an image's table)."""
    workers = worker_count(workers)
    start_phase(progress, "verify", volume_size)
    per_read = read_size // block_size * DIGEST_SIZE
    with BlockDevice(target, direct=True) as dev:
        dev.drop_cache()
        pool = BufferPool(pool_size(workers), read_size)

        def check(result: tuple[int, bytes]) -> None:
            index, got = result
            want = digests[index * per_read:(index + 1) * per_read]
            if got != want:
                first = next(i for i in range(0, len(got), DIGEST_SIZE) if got[i:i + DIGEST_SIZE] != want[i:i + DIGEST_SIZE])
                block = index * (read_size // block_size) + first // DIGEST_SIZE
                raise ImagerError(f"verify after restore failed: {target} differs from the image in chunk {index}, "
                                  f"block {block} (volume offset {block * block_size})")

        try:
            run_ordered(read_chunks(VolumePrefix(dev, volume_size), read_size, pool, progress or (lambda n: None)),
                        digester(pool, block_size), check, workers=workers)
        finally:
            pool.close()
