"""Synthetic fulls: a full image of a chain point written from the chain's own frames, without
reading the volume. A region (a chunk of the full) no incremental touched is the full's
compressed frame copied as it is; a region with newer blocks is assembled, checked block by
block, and compressed again (a zstd frame cannot be cut). The result is an ordinary full image:
stock `zstd -d` restores it, and it can be the parent of the next incremental."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from contextlib import ExitStack
from typing import Callable

from .. import __version__
from ..catalog import Catalog
from ..ends.guards import check_image_output
from ..ends.sinks import FileSink, Sink, StreamSink
from ..errors import UsageError
from ..format import FULL, EncodedChunk, ImageHeader, ImageWriter, ZstdCodec, zstd_frame_bound
from ..format.chain import Chain
from ..pipeline import run_ordered, worker_count
from ..tape import TapeSink
from ..units import now_iso
from ..progress import Progress, start_phase
from .backup import Destination, aborted_on_failure, commit_image, image_record, record_image, refuse_orphaning
from .chains import open_chain
from .results import BackupResult


log = logging.getLogger("imager.consolidate")


def consolidate(image: str, dest: Destination, *, workers: int | None = None, progress: Progress | None = None,
                catalog: Catalog | None = None, on_notice: Callable[[str], None] | None = None) -> BackupResult:
    """Write the volume of the chain point `image` as a full image to `dest` (a file or a tape)."""
    dest.check(many=False)
    with ExitStack() as stack:
        chain = open_chain(image, stack, catalog=catalog)
        if not chain.header.incremental:
            raise UsageError(f"{image}: is a full image already; copy it (cp, or imager backup --force of it)")
        header = _full_header(chain)
        if dest.output and not dest.to_stdout and dest.force and os.path.isfile(dest.output):
            refuse_orphaning(dest.output, catalog)      # the chain's own parent, among others
        sink = _open(dest, header, on_notice)
        started = time.monotonic()
        with aborted_on_failure(sink, catalog):
            counts = _write(chain, ImageWriter(sink, header), worker_count(workers), progress)
            writer, copied, recompressed = counts
            writer.finish({"seconds": round(time.monotonic() - started, 3), "finished": now_iso(),
                           "copied_chunks": copied, "recompressed_chunks": recompressed},
                          chain.trailer.used_any, chain.trailer.used_full)
            record = image_record(header, writer.bytes_written, writer.image_digest)
            commit_image(sink, record)
        seconds = time.monotonic() - started
        log.info("consolidated %s: %d chunks copied, %d compressed again", image, copied, recompressed)
        result = BackupResult(image_id=header.image_id, image=sink.path, source=image, volume_size=header.volume_size,
                              chunks=header.chunk_count, zero_chunks=0, bytes_read=0,
                              bytes_written=writer.bytes_written, seconds=seconds, level=header.level,
                              chunk_size=header.chunk_size, image_digest=writer.image_digest, header=header,
                              reason=f"{copied} chunks copied, {recompressed} compressed again",
                              block_table=writer.tables)
        record_image(result, record, sink, catalog)
        return result


def _full_header(chain: Chain) -> ImageHeader:
    point, base = chain.header, chain.base.header
    chain_meta = {k: v for k, v in point.chain.items() if k in ("volume", "tracker")}
    chain_meta["consolidated"] = [i.header.image_id for i in chain.images]
    return ImageHeader(volume_size=point.volume_size, chunk_size=base.chunk_size, image_id=uuid.uuid4().hex,
                       sector_size=point.sector_size, level=base.level, source=point.source, snapshot=point.snapshot,
                       plan=point.plan, partitions=point.partitions, created=now_iso(), tool=f"imager {__version__}",
                       block_size=point.block_size, kind=FULL, chain=chain_meta)


def _open(dest: Destination, header: ImageHeader, on_notice: Callable[[str], None] | None) -> Sink:
    if dest.tape:
        return TapeSink(dest.tape, image_id=header.image_id, block_size=dest.block_size,
                        expect_label=dest.expect_label, drive_compression=dest.drive_compression,
                        largest_frame=zstd_frame_bound(header.chunk_size), on_notice=on_notice)
    if dest.to_stdout:
        return StreamSink()
    assert dest.output is not None
    check_image_output(dest.output)
    return FileSink(dest.output, force=dest.force)


def _write(chain: Chain, writer: ImageWriter, workers: int,
           progress: Progress | None) -> tuple[ImageWriter, int, int]:
    codec = ZstdCodec(chain.base.header.level, chain.block_size)
    counts = {"copied": 0, "recompressed": 0}
    start_phase(progress, "consolidate", chain.header.volume_size)
    # One region buffer per worker, used again for every region: a new 4 MiB buffer each time
    # is fresh memory the kernel has to fault in and zero.
    buffers = threading.local()

    def region(index: int) -> tuple[EncodedChunk, bool]:
        length = chain.region_length(index)
        expected = chain.expected(index)
        frame = chain.frame_or_none(index)
        if frame is not None:
            return EncodedChunk(index, length, frame, expected, frame == chain.zero_frame(length)), True
        buf = getattr(buffers, "region", None)
        if buf is None:
            buf = buffers.region = memoryview(bytearray(chain.region_size))
        data = buf[:length]
        # region_into checked every block against the chain point's digests: no second hash.
        if not chain.region_into(index, data):
            return codec.zero_chunk(index, length), False
        return codec.encode(index, data, expected), False

    def consume(result: tuple[EncodedChunk, bool]) -> None:
        encoded, copied = result
        writer.write_chunk(encoded)
        counts["copied" if copied else "recompressed"] += 1
        if progress:
            progress(encoded.length)

    run_ordered(range(chain.region_count), region, consume, workers=workers)
    return writer, counts["copied"], counts["recompressed"]
