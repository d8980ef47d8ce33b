"""Backup: sources, each at one point in time (snapshot.provider), planned (plan), read,
compressed on every core (pipeline), written as images (format) to a sink (ends.sinks, tape),
and recorded in the catalog."""

from __future__ import annotations

import json
import logging
import os
import socket
import string
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Iterator, Sequence

import numpy as np

from devices.buffers import BufferPool
from devices.errors import DeviceError

from .. import __version__, views
from ..catalog import Catalog, ImageRecord, SegmentRecord, record_dict
from ..ends.guards import check_image_output
from ..ends.sinks import STDOUT, FileSink, Sink, StreamSink
from ..ends.sources import VolumeSource
from ..errors import ImagerError, SnapshotError, UsageError
from ..format import (DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL, MAX_CHUNK_SIZE, EncodedChunk, ImageHeader, ImageWriter,
                      ZstdCodec, chain_block_size, pack_bits, read_header, zstd_frame_bound)
from ..pipeline import READS_IN_FLIGHT, encoder, pool_size, read_chunks, run_ordered, worker_count
from ..plan.planner import PlanRules, remove_stale_planning_mounts
from ..plan.usedmap import ALL_BLOCKS, UsedMap
from ..snapshot.freeze import Hook
from ..snapshot.provider import PlannedVolume, SnapshotRequest, SnapshotSet, provider
from ..tape import DEFAULT_BLOCK_SIZE, TapeSink, TapeSpec, output_counting
from ..progress import Progress, start_phase
from ..units import check_block_size, now_iso
from .incremental import Increment, incremental_header, prepare_incremental, write_incremental
from .results import BackupResult
from .tape import record_labels, tape_segment_records

Notice = Callable[[str], None]

log = logging.getLogger("imager.backup")


@dataclass
class ImagingOptions:
    """How a volume is imaged, whatever the destination."""

    level: int = DEFAULT_LEVEL
    chunk_size: int = DEFAULT_CHUNK_SIZE
    workers: int | None = None
    all_blocks: bool = False
    excludes: tuple[str, ...] = ()
    backups_as_sources: bool = False    # image a source that is itself an image, zstd file or tape
    max_freeze: float | None = None     # seconds; None: the provider's default
    incremental: bool = False           # only what changed since a parent image (a full when none)
    parent: str | None = None           # that parent: an image file or a catalog id (default: the newest)
    compare_digests: bool = False       # find an incremental's changes by digests even when a tracker has them

    @property
    def rules(self) -> PlanRules:
        return PlanRules(self.all_blocks, tuple(self.excludes))

    def check(self, sector_size: int) -> None:
        problem = check_block_size(self.chunk_size, sector_size, "chunk size", MAX_CHUNK_SIZE)
        if problem:
            raise UsageError(problem)
        if not 1 <= self.level <= 22:
            raise UsageError(f"compression level {self.level} is out of range (1..22)")


@dataclass
class Destination:
    """Where backups go: an image file (a directory of them for several volumes), standard
    output ("-"), or a tape."""

    output: str | None = None
    tape: TapeSpec | None = None
    force: bool = False
    block_size: int = DEFAULT_BLOCK_SIZE
    expect_label: str | None = None
    drive_compression: bool = False
    min_rate: float | None = None       # bytes/s the tape drive needs to keep streaming (None: from its density)
    spool: str | None = None            # a directory where a tape image is made whole before it is written
    # What {date} in an output template stands for: one instant for every volume of the run.
    started: datetime = field(default_factory=lambda: datetime.now().astimezone())

    @property
    def to_stdout(self) -> bool:
        return self.output == STDOUT

    @property
    def is_template(self) -> bool:
        return bool(self.output) and "{" in str(self.output)

    def image_path(self, name: str, many: bool) -> str:
        assert self.output is not None
        if self.is_template:
            return self._expand(name)
        if not self.to_stdout and (many or os.path.isdir(self.output)):
            return os.path.join(self.output, f"{name}.zst")
        return self.output

    def _expand(self, name: str) -> str:
        """-o '/backup/{name}-{date:%Y%m%d-%H%M}.zst': the volume's name, the run's local time, the host.
        Only those three fields, as they are (no attribute, index or conversion), and no '..'
        that the template does not spell itself."""
        template = str(self.output)
        usage = "it may use {name}, {host} and {date} with a strftime format, e.g. {date:%Y%m%d-%H%M}"
        skeleton = ""       # the template's own text, each field a placeholder
        try:
            parsed = list(string.Formatter().parse(template))
            skeleton = "".join(text + ("\0" if f is not None else "") for text, f, _, _ in parsed)
            fields = [(f, spec, conv) for _, f, spec, conv in parsed if f is not None]
            for field_name, spec, conversion in fields:
                if field_name not in ("name", "date", "host") or conversion or (spec and field_name != "date"):
                    raise ValueError(f"{{{field_name}{'!' + conversion if conversion else ''}"
                                     f"{':' + spec if spec else ''}}} is not one of its fields")
            path = template.format(name=name, date=self.started, host=socket.gethostname())
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise UsageError(f"-o {template}: not a usable template ({e}); {usage}") from None
        if path.split("/").count("..") > skeleton.split("/").count(".."):
            raise UsageError(f"-o {template}: expands to {path}, whose '..' the template does not spell; {usage}")
        return path

    def check(self, many: bool) -> None:
        if bool(self.output) == bool(self.tape):
            raise UsageError("give either an image file (-o) or a tape (--tape)")
        if self.expect_label is not None and not self.tape:
            raise UsageError("--label names the tape a backup must go to; it goes only with --tape")
        if self.to_stdout:
            if many:
                raise UsageError("-o - writes one image to standard output: give one source")
            return
        if self.is_template:
            if many and self._expand("a") == self._expand("b"):
                raise UsageError(f"-o {self.output}: with several volumes, the template needs {{name}}")
            check_image_output(self._expand("volume"))
            return
        if self.output:
            st = check_image_output(self.output)
            if many and (st is None or not os.path.isdir(self.output)):
                raise UsageError(f"{self.output}: with several volumes, -o names an existing directory")

    def filesystems(self, many: bool, catalog: Catalog | None) -> list[str]:
        """The paths this destination writes to (none of them may be on a frozen filesystem)."""
        fixed = str(self.output).split("{")[0] if self.is_template else None
        paths = ([os.path.dirname(os.path.abspath(fixed if fixed is not None else self.image_path("x", many)))]
                 if self.output and not self.to_stdout else [])
        if self.tape and not self.tape.is_real_drive:
            paths.append(os.path.dirname(os.path.abspath(self.tape.path_for(1))))
        if catalog is not None:
            paths.append(str(catalog.path.parent))
        return paths


def backup_volumes(sources: list[str], dest: Destination, *, snapshot: str = "none",
                   options: ImagingOptions | None = None, pre_freeze: Sequence[Hook] = (),
                   post_thaw: Sequence[Hook] = (), while_frozen: Callable[[], object] | None = None,
                   progress: Progress | None = None, on_notice: Notice | None = None,
                   catalog: Catalog | None = None) -> list[BackupResult]:
    """Image every source, each from one point in time shared by all of them.

    `snapshot` is the provider (imager.snapshot.provider): "cow" snapshots managed volumes
    (names, front or source devices) in one freeze window and reads the snapshot views; "freeze"
    keeps the filesystems frozen while their devices are read; "none" reads the devices as they
    are. `while_frozen` runs inside the freeze window (cow and freeze)."""
    options = options or ImagingOptions()
    chosen = provider(snapshot)
    if not sources:
        raise UsageError("nothing to back up: give at least one source")
    many = len(sources) > 1
    dest.check(many)
    options.rules.check()
    remove_stale_planning_mounts(on_notice)
    request = SnapshotRequest(options.rules, pre_freeze, post_thaw, while_frozen, options.max_freeze,
                              options.backups_as_sources, dest.filesystems(many, catalog), on_notice)
    results = []
    log.info("taking %s of %s", "a snapshot set" if snapshot != "none" else "the volumes as they are",
             ", ".join(sources))
    with chosen.take(sources, request) as snapshot_set:
        if snapshot_set.freeze_window_ms is not None:
            log.info("snapshot set taken, filesystems frozen %.1f ms", snapshot_set.freeze_window_ms)
        for volume in snapshot_set.volumes:
            plan = volume.plan
            log.info("%s: %s, %d of %d bytes to read%s", volume.name, plan.mode, plan.used_bytes, plan.size,
                     f" ({plan.reason})" if plan.reason else "")
            results.append(_image_volume(volume, snapshot_set, dest, options, many, progress, catalog, on_notice))
    for result in results:
        if snapshot_set.freeze_window_ms is not None:
            result.freeze_window_ms = round(snapshot_set.freeze_window_ms, 2)
    return results


def backup(source: str, output: str, *, force: bool = False, options: ImagingOptions | None = None,
           progress: Progress | None = None, on_notice: Notice | None = None,
           catalog: Catalog | None = None) -> BackupResult:
    """Image the block device or file `source` as it is to the image file `output`."""
    return backup_volumes([source], Destination(output=output, force=force), options=options,
                          progress=progress, on_notice=on_notice, catalog=catalog)[0]


def _image_volume(volume: PlannedVolume, snapshot_set: SnapshotSet, dest: Destination, options: ImagingOptions,
                  many: bool, progress: Progress | None, catalog: Catalog | None,
                  on_notice: Notice | None) -> BackupResult:
    try:
        return _write_one(volume, dest, options, many=many, progress=progress, catalog=catalog,
                          on_notice=on_notice)
    except (DeviceError, SnapshotError) as e:
        # A read error of the volume: the provider may know why (a snapshot no longer valid).
        if snapshot_set.explain is None:
            raise
        raise snapshot_set.explain(volume, e) from None


def _open_sink(volume: PlannedVolume, dest: Destination, options: ImagingOptions, image_id: str, many: bool,
               on_notice: Notice | None) -> Sink:
    if dest.tape:
        return TapeSink(dest.tape, image_id=image_id, block_size=dest.block_size, expect_label=dest.expect_label,
                        drive_compression=dest.drive_compression, min_rate=dest.min_rate, spool_dir=dest.spool,
                        largest_frame=zstd_frame_bound(options.chunk_size), on_notice=on_notice)
    if dest.to_stdout:
        return StreamSink()
    path = dest.image_path(volume.name, many)
    if os.path.exists(path) and os.path.samefile(volume.source.path, path):
        raise UsageError(f"{path}: the image cannot be written over its own source")
    return FileSink(path, force=dest.force)


def _refuse_replacing_the_parent(path: str, parent: str) -> None:
    """An incremental written over its parent's file could never be restored: it holds only
    what changed since the image it replaced."""
    if os.path.exists(path) and os.path.exists(parent) and os.path.samefile(path, parent):
        raise UsageError(f"{path}: is the parent of this incremental; writing over it would leave an image "
                         f"that cannot be restored (give another -o, or a template with {{date}})")


def refuse_orphaning(path: str, catalog: Catalog | None) -> None:
    """--force over an image that incrementals were taken on would leave them unrestorable:
    they hold only what changed since it. Its children are asked of the catalog and of the
    images beside it (where a restore looks for parents)."""
    try:
        with open(path, "rb") as f:
            image_id = read_header(f)[0].image_id
    except (OSError, ImagerError):
        return          # not an image: nothing was taken on it
    children: dict[str, str] = {}       # image id: where it is
    if catalog is not None and not catalog.standing_in_for(image_id):
        children.update((r.id, next(iter(catalog.file_paths(r.id)), "on tape")) for r in catalog.children(image_id))
    directory = os.path.dirname(os.path.abspath(path))
    try:
        beside = [e.path for e in os.scandir(directory) if e.is_file() and not os.path.samefile(e.path, path)]
    except OSError:
        beside = []
    for other in beside:
        try:
            with open(other, "rb") as f:
                header = read_header(f)[0]
        except (OSError, ImagerError):
            continue
        if (header.chain.get("parent") or {}).get("id") == image_id:
            children.setdefault(header.image_id, other)
    if children:
        named = ", ".join(f"{i[:12]} ({where})" for i, where in sorted(children.items(), key=lambda c: c[1]))
        raise UsageError(f"{path}: image {image_id[:12]} is the parent of {named}; writing over it would leave "
                         f"{'it' if len(children) == 1 else 'them'} unrestorable (give another -o; imager catalog "
                         f"prune removes the images no kept one needs)")


def _write_one(volume: PlannedVolume, dest: Destination, options: ImagingOptions, *, many: bool,
               progress: Progress | None, catalog: Catalog | None, on_notice: Notice | None) -> BackupResult:
    """Image one volume into the destination. The volume's `check_reads` may still refuse the
    image once everything is read, before its trailer is written: a stream or a tape cannot take
    back an image that went out whole."""
    image_id = uuid.uuid4().hex
    increment = None
    if options.incremental:
        near = os.path.dirname(os.path.abspath(dest.image_path(volume.name, many))) if dest.output else None
        increment = prepare_incremental(volume, _block_size(volume.source.size, options), parent_ref=options.parent,
                                        catalog=catalog, search_dir=near, on_notice=on_notice,
                                        compare_digests=options.compare_digests)
        if increment is not None and dest.output and not dest.to_stdout:
            _refuse_replacing_the_parent(dest.image_path(volume.name, many), increment.parent.where)
    if dest.output and not dest.to_stdout and dest.force and os.path.isfile(dest.image_path(volume.name, many)):
        refuse_orphaning(dest.image_path(volume.name, many), catalog)
    sink = _open_sink(volume, dest, options, image_id, many, on_notice)
    log.info("%s: writing %s image %s to %s", volume.name, "an incremental" if increment else "a full", image_id,
             sink.path)

    with aborted_on_failure(sink, catalog):
        result = _write_kind(volume, sink, options, image_id, increment, progress)
        record = image_record(result.header, result.bytes_written, result.image_digest)
        commit_image(sink, record)
    record_image(result, record, sink, catalog)
    if volume.commit_tracker is not None:
        volume.commit_tracker()      # the next incremental may start from this image
    return result


def _block_size(volume_size: int, options: ImagingOptions) -> int:
    return min(chain_block_size(volume_size), options.chunk_size)


def _write_kind(volume: PlannedVolume, sink: Sink, options: ImagingOptions, image_id: str,
                increment: Increment | None, progress: Progress | None) -> BackupResult:
    phase = f"read {volume.name}"
    chain: dict = {"volume": volume.volume_key}
    if volume.tracker:
        chain["tracker"] = {"series": volume.tracker["series"], "sequence": volume.tracker["sequence"]}
    if increment is None:
        if options.incremental:
            chain["reason"] = "no parent"
        start_phase(progress, phase, volume.source.size)
        return write_image(volume.source, sink, options=options, image_id=image_id, plan=volume.plan,
                           source_meta=volume.source_meta, snapshot_meta=volume.snapshot_meta,
                           partitions=volume.partitions, progress=progress, chain=chain,
                           before_trailer=volume.check_reads)
    options.check(volume.source.logical_sector_size)
    plan = volume.plan.aligned(volume.source.logical_sector_size)
    header = incremental_header(volume, increment, _header(volume.source, options, image_id, plan, volume.source_meta,
                                                           volume.snapshot_meta, volume.partitions, chain))
    return write_incremental(volume.source, sink, increment, header=header, plan=plan, read_size=options.chunk_size,
                             level=options.level, workers=options.workers, progress=progress, phase=phase,
                             before_trailer=volume.check_reads)


@contextmanager
def aborted_on_failure(sink: Sink, catalog: Catalog | None) -> Iterator[None]:
    """Abort `sink` if the body fails; the cartridges a tape sink labelled are catalogued either way."""
    try:
        yield
    except BaseException:
        sink.abort()
        raise
    finally:
        if isinstance(sink, TapeSink):
            record_labels(catalog, sink.labelled)


def commit_image(sink: Sink, record: ImageRecord) -> None:
    """Give the image its final place; a tape's end block carries the catalog record."""
    if isinstance(sink, TapeSink):
        sink.commit(record_dict(record))
    else:
        sink.commit()


def record_image(result: BackupResult, record: ImageRecord, sink: Sink, catalog: Catalog | None) -> None:
    """Say where the image went (in the result and the catalog)."""
    image_id = result.image_id
    if isinstance(sink, TapeSink):
        segments = tape_segment_records(image_id, sink.segments)
    elif isinstance(sink, StreamSink):
        result.image = sink.path
        return    # a stream has no place the catalog could find it again
    else:
        segments = [SegmentRecord(image_id, 0, "file", os.path.abspath(sink.path), None, None, None, 0,
                                  result.bytes_written)]
    result.image = sink.path
    result.segments = [views.segment(s) for s in segments]
    if catalog is not None:
        catalog.add_image(record, segments, replaces_tape_files=isinstance(sink, TapeSink))
        if isinstance(sink, TapeSink) and result.block_table is not None:
            catalog.add_block_table(image_id, *result.block_table)


def write_image(source: VolumeSource, sink: Sink, *, options: ImagingOptions | None = None,
                image_id: str | None = None, plan: UsedMap | None = None, source_meta: dict | None = None,
                snapshot_meta: dict | None = None, partitions: dict | None = None,
                progress: Progress | None = None, chain: dict | None = None,
                before_trailer: Callable[[], None] | None = None) -> BackupResult:
    """Image `source` into `sink` (which the caller commits or aborts). With a used-block
    `plan`, blocks the filesystem does not use go into the image as zeros, unread.
    `before_trailer` runs once everything is read and may still refuse the image."""
    options = options or ImagingOptions()
    options.check(source.logical_sector_size)
    workers = worker_count(options.workers)
    if plan is not None:
        if plan.size != source.size:
            raise ImagerError(f"the used-block plan covers {plan.size} bytes, the volume has {source.size}")
        plan = plan.aligned(source.logical_sector_size)
    header = _header(source, options, image_id, plan, source_meta, snapshot_meta, partitions, chain)
    if plan is not None and plan.mode == ALL_BLOCKS:
        plan = None
    started = time.monotonic()
    writer = ImageWriter(sink, header)
    pool = BufferPool(pool_size(workers, READS_IN_FLIGHT), options.chunk_size)
    totals = {"bytes_read": 0, "zero_chunks": 0}

    def count_read(n: int) -> None:
        totals["bytes_read"] += n

    count_output = output_counting(sink, progress)

    def consume(chunk: EncodedChunk) -> None:
        writer.write_chunk(chunk)
        totals["zero_chunks"] += chunk.zero
        if progress:
            progress(chunk.length)
            count_output(writer.bytes_written)

    try:
        run_ordered(read_chunks(source, options.chunk_size, pool, count_read, plan, readers=READS_IN_FLIGHT),
                    encoder(pool, ZstdCodec(options.level, header.block_size)), consume, workers=workers,
                    depth=workers * 2)
    finally:
        pool.close()
    seconds = time.monotonic() - started
    if before_trailer is not None:
        before_trailer()
    writer.finish({"bytes_read": totals["bytes_read"], "zero_chunks": totals["zero_chunks"],
                   "seconds": round(seconds, 3), "finished": now_iso()}, *used_bitmaps(plan, header))
    count_output(writer.bytes_written)
    return BackupResult(image_id=header.image_id, image=sink.path, source=source.path, volume_size=source.size,
                        chunks=header.chunk_count, zero_chunks=totals["zero_chunks"],
                        bytes_read=totals["bytes_read"], bytes_written=writer.bytes_written, seconds=seconds,
                        level=options.level, chunk_size=options.chunk_size, image_digest=writer.image_digest,
                        header=header, block_table=writer.tables)


def used_bitmaps(plan: UsedMap | None, header: ImageHeader) -> tuple[bytes, bytes]:
    """The trailer's maps of the blocks the filesystem used any and all of (every block, without
    a used-block plan)."""
    if plan is None:
        every = pack_bits(np.ones(header.block_count, dtype=bool))
        return every, every
    used_any, used_full = plan.block_states(header.block_size)
    return pack_bits(used_any), pack_bits(used_full)


def _header(source: VolumeSource, options: ImagingOptions, image_id: str | None, plan: UsedMap | None,
            source_meta: dict | None, snapshot_meta: dict | None, partitions: dict | None,
            chain: dict | None = None) -> ImageHeader:
    header = ImageHeader(volume_size=source.size, chunk_size=options.chunk_size,
                         sector_size=source.logical_sector_size, level=options.level,
                         source=dict({"path": source.path}, **(source_meta or {})),
                         snapshot=snapshot_meta or {"provider": "none", "time": now_iso()},
                         created=now_iso(), tool=f"imager {__version__}", partitions=partitions,
                         block_size=_block_size(source.size, options), chain=dict(chain or {}))
    if plan is not None:
        header.plan = plan.to_dict()
    if options.excludes:
        header.plan["excludes"] = list(options.excludes)
    if image_id:
        header.image_id = image_id
    return header


def image_record(header: ImageHeader, stream_bytes: int, image_digest: str) -> ImageRecord:
    tracker = header.chain.get("tracker") or {}
    return ImageRecord(id=header.image_id, created=header.created, source=header.source.get("path", ""),
                       fs_type=header.source.get("fs_type"), volume_size=header.volume_size,
                       chunk_size=header.chunk_size, chunks=header.chunk_count, level=header.level,
                       stream_bytes=stream_bytes, image_digest=image_digest,
                       snapshot=json.dumps(header.snapshot, sort_keys=True), kind=header.kind,
                       parent_id=(header.chain.get("parent") or {}).get("id"), method=header.chain.get("method"),
                       volume=header.chain.get("volume"), series=tracker.get("series"),
                       sequence=tracker.get("sequence"), snapshot_time=header.snapshot.get("time"),
                       replaces=(header.chain.get("consolidated") or [None])[0])
