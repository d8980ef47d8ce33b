"""Incremental backups: an image of only the blocks that changed since a parent image.

The parent is the newest image of the same volume in the catalog, or the one given (--parent).
What changed is found the fastest way that is certain (imager.plan.changes): the change
tracker's bits when the parent is the image of the tracker's base, otherwise the digests of
every used block compared with the parent's. Either way each candidate block is read and
hashed, and only those whose digest differs are compressed and written.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

import blake3
import numpy as np

from devices.buffers import BufferPool, is_all_zero

from ..catalog import Catalog
from ..ends.sinks import Sink
from ..ends.sources import VolumeSource
from ..format import (DIGEST_SIZE, INCREMENTAL, EncodedChunk, ImageHeader, ImageWriter, ZstdCodec, pack_bits,
                      unpack_bits, zero_block_digests, zstd_frame_bound)
from ..pipeline import READS_IN_FLIGHT, pool_size, read_chunks, run_ordered, worker_count
from ..plan.changes import BlockStates, ChangePlan, change_plan, tracker_bits_as_blocks
from ..plan.usedmap import ALL_BLOCKS, UsedMap
from ..snapshot.provider import PlannedVolume
from ..units import now_iso
from ..progress import Progress, start_phase
from ..tape import output_counting
from .chains import ParentImage, find_parent
from .results import BackupResult

Notice = Callable[[str], None]

log = logging.getLogger("imager.backup")


@dataclass
class Increment:
    """An incremental about to be written: its parent and which blocks to compare."""

    parent: ParentImage
    change: ChangePlan


def prepare_incremental(volume: PlannedVolume, block_size: int, *, parent_ref: str | None, catalog: Catalog | None,
                        search_dir: str | None, on_notice: Notice | None,
                        compare_digests: bool = False) -> Increment | None:
    """The parent and the change plan of an incremental of `volume`; None when it must be a full
    (no parent: said through `on_notice`)."""
    notice = on_notice or (lambda message: None)
    parent = find_parent(volume.volume_key, volume.source.size, block_size, parent_ref=parent_ref,
                         catalog=catalog, search_dir=search_dir, on_notice=notice)
    if parent is None:
        return None
    plan = _plan_states(volume.plan, volume.source.size, block_size)
    parent_states = BlockStates(unpack_bits(parent.trailer.used_any, plan.used_any.size),
                                unpack_bits(parent.trailer.used_full, plan.used_any.size))
    if compare_digests:
        written, reason = None, "asked to compare digests (--compare-digests)"
    else:
        written, reason = _tracked(volume, parent, block_size, plan.used_any.size)
    change = change_plan(plan, parent_states, written, reason)
    log.info("%s: incremental on %s by %s (%s): %d of %d blocks to compare", volume.name, parent.header.image_id[:12],
             change.method, reason, change.candidate_count, plan.used_any.size)
    return Increment(parent, change)


def _plan_states(plan: UsedMap, size: int, block_size: int) -> BlockStates:
    if plan.mode == ALL_BLOCKS:
        every = np.ones(-(-size // block_size), dtype=bool)
        return BlockStates(every, every)
    return BlockStates(*plan.block_states(block_size))


def _tracked(volume: PlannedVolume, parent: ParentImage, block_size: int, block_count: int) -> tuple[np.ndarray | None, str]:
    """The tracker's bits as one flag per block, when they cover everything since the parent's
    snapshot; else None and why not."""
    roll = volume.tracker
    if roll is None or volume.tracked_changes is None:
        return None, "no change tracker: not a managed volume's snapshot"
    theirs = parent.header.chain.get("tracker") or {}
    if roll.get("restarted") and roll.get("series") != theirs.get("series"):
        return None, f"the change tracker started anew: {roll['restarted']}"
    if theirs.get("series") != roll.get("series"):
        return None, "the parent was not taken with this volume's current change tracker"
    if roll.get("base") is None or theirs.get("sequence") != roll.get("base"):
        return None, (f"the tracker's last stored backup (sequence {roll.get('base')}) is not the parent "
                      f"(sequence {theirs.get('sequence')})")
    bits = volume.tracked_changes()
    if bits is None:
        return None, "the volume daemon no longer has the tracked changes"
    return tracker_bits_as_blocks(bits, int(roll["block_size"]), block_size, block_count), \
        f"tracked since sequence {roll['base']}"


def write_incremental(source: VolumeSource, sink: Sink, increment: Increment, *, header: ImageHeader,
                      plan: UsedMap | None, read_size: int, level: int, workers: int | None,
                      progress: Progress | None = None, phase: str = "read",
                      before_trailer: Callable[[], None] | None = None) -> BackupResult:
    """Write the incremental image `header` describes (kind incremental, chunks = blocks) into
    `sink`: every candidate block read (only where the filesystem uses it) and hashed, those
    whose digest differs from the parent's compressed and written in runs. Progress is phase
    `phase` of the bytes to read, so that its rate is a read rate (most of the volume is not
    read). `before_trailer` runs once everything is read and may still refuse the image."""
    assert header.incremental and header.chunk_size == header.block_size
    parent = increment.parent
    block_size, n = header.block_size, header.block_count
    states_now = _plan_states(plan, source.size, block_size) if plan is not None else None
    used_now = states_now.used_any if states_now is not None else np.ones(n, dtype=bool)
    candidates = increment.change.candidates
    read_plan = _read_plan(candidates & used_now, source.size, block_size, plan)
    codec = ZstdCodec(level, block_size)
    workers = worker_count(workers)
    pool = BufferPool(pool_size(workers, READS_IN_FLIGHT), read_size)
    compare = _RegionCompare(candidates, used_now, parent.trailer.digests, codec, pool, read_size // block_size,
                             block_size)
    # No write larger than a full's chunk: what a tape sink's early-warning zone is sized for.
    writer = ImageWriter(sink, header, base_digests=parent.trailer.digests, max_write=zstd_frame_bound(read_size))
    totals = {"bytes_read": 0, "compared": 0, "changed": 0, "shown": 0}
    started = time.monotonic()
    start_phase(progress, phase, read_plan.used_bytes)

    def count_read(count: int) -> None:
        totals["bytes_read"] += count

    count_output = output_counting(sink, progress)

    def consume(result: tuple[int, list[EncodedChunk], int]) -> None:
        _, changed, compared = result
        writer.write_blocks(changed)
        totals["compared"] += compared
        totals["changed"] += len(changed)
        if progress:
            # The reader's count (it runs ahead of this thread by the regions in flight).
            read = totals["bytes_read"]
            progress(read - totals["shown"])
            totals["shown"] = read
            count_output(writer.bytes_written)

    try:
        run_ordered(read_chunks(source, read_size, pool, count_read, read_plan, block_size, READS_IN_FLIGHT),
                    compare, consume, workers=workers, depth=workers * 2)
    finally:
        pool.close()
    seconds = time.monotonic() - started
    if before_trailer is not None:
        before_trailer()
    used_any, used_full = ((pack_bits(states_now.used_any), pack_bits(states_now.used_full)) if states_now is not None
                           else (pack_bits(np.ones(n, dtype=bool)),) * 2)
    writer.finish({"bytes_read": totals["bytes_read"], "compared_blocks": totals["compared"],
                   "seconds": round(seconds, 3), "finished": now_iso()}, used_any, used_full)
    count_output(writer.bytes_written)
    return BackupResult(image_id=header.image_id, image=sink.path, source=source.path, volume_size=source.size,
                        chunks=totals["changed"], zero_chunks=0, bytes_read=totals["bytes_read"],
                        bytes_written=writer.bytes_written, seconds=seconds, level=level, chunk_size=block_size,
                        image_digest=writer.image_digest, header=header, kind=INCREMENTAL,
                        parent_id=parent.header.image_id, method=increment.change.method,
                        reason=increment.change.reason, changed_blocks=totals["changed"],
                        compared_blocks=totals["compared"], block_table=writer.tables)


@dataclass
class _RegionCompare:
    """The compare stage of an incremental, run by the pipeline's workers on each region read:
    the candidate blocks in it are hashed and those whose digest differs from the parent's are
    encoded. A block the filesystem no longer uses is compared, and written, as zeros."""

    candidates: np.ndarray
    used_now: np.ndarray
    parent_digests: bytes
    codec: ZstdCodec
    pool: BufferPool
    region_blocks: int
    block_size: int

    def __post_init__(self) -> None:
        self.zero_digest = zero_block_digests(self.block_size, self.block_size)

    def __call__(self, item) -> tuple[int, list[EncodedChunk], int]:
        """(bytes of the region, its changed blocks encoded, how many blocks were compared)."""
        index, buf, length = item
        # Locals, not attributes, in the loop: it runs once per candidate block.
        block_size, used_now, parent_digests, codec = self.block_size, self.used_now, self.parent_digests, self.codec
        first = index * self.region_blocks
        try:
            blocks = first + np.flatnonzero(self.candidates[first:first + self.region_blocks])
            changed: list[EncodedChunk] = []
            to_encode: list[tuple[int, memoryview, bytes]] = []
            zero_digest = self.zero_digest
            for block in blocks.tolist():
                start = (block - first) * block_size
                size = min(block_size, length - start)
                view = buf.view[start:start + size] if buf is not None and used_now[block] else None
                digest = blake3.blake3(view).digest() if view is not None else zero_block_digests(size, block_size)
                if digest == parent_digests[block * DIGEST_SIZE:(block + 1) * DIGEST_SIZE]:
                    continue
                if view is None or (digest == zero_digest if size == block_size else is_all_zero(view)):
                    changed.append(codec.zero_chunk(block, size))
                else:
                    to_encode.append((block, view, digest))
            if to_encode:
                changed = sorted(changed + codec.encode_blocks(to_encode), key=lambda chunk: chunk.index)
            return length, changed, len(blocks)
        finally:
            if buf is not None:
                self.pool.release(buf)


def _read_plan(to_read: np.ndarray, size: int, block_size: int, plan: UsedMap | None) -> UsedMap:
    """The bytes to read: the candidate blocks the filesystem uses, only where it uses them."""
    starts, ends = _runs(to_read)
    ranges = [(s * block_size, min(e * block_size, size)) for s, e in zip(starts.tolist(), ends.tolist())]
    blocks = UsedMap.from_ranges(size, ranges)
    if plan is None or plan.mode == ALL_BLOCKS:
        return blocks
    return plan.within(blocks)


def _runs(flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    edges = np.diff(np.concatenate(([0], flags.astype(np.int8), [0])))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def incremental_header(volume: PlannedVolume, increment: Increment, base: ImageHeader) -> ImageHeader:
    """The header of the incremental: the full's header with blocks for chunks, its parent and method."""
    parent = increment.parent
    base.kind = INCREMENTAL
    base.chunk_size = base.block_size
    base.chain = dict(base.chain, parent={"id": parent.header.image_id,
                                          "digest": parent.trailer.totals.get("image_digest"),
                                          "name": os.path.basename(parent.where)},
                      method=increment.change.method, reason=increment.change.reason)
    return base

