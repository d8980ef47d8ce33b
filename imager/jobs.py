"""Backup, restore and verify: what a user asks for, start to end. The CLI is a thin layer over these."""

from __future__ import annotations

import glob
import json
import os
import stat
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import BinaryIO, Callable, Iterator, Protocol, Sequence

from devices import block, discover
from devices.block import BlockDevice
from devices.buffers import AlignedBuffer, BufferPool
from devices.errors import DeviceError

from . import __version__, front
from .freeze import DEFAULT_MAX_FREEZE, DEFAULT_MAX_FREEZE_READ, freeze_window
from .catalog import Catalog, ImageRecord, SegmentRecord, TapeRecord, record_dict
from .errors import CacheFullError, ChunkError, ImageFormatError, ImagerError, SnapshotError, UsageError
from .guards import backup_artifact_kind, check_image_output, check_restore_target, refuse_overwriting_data
from .pipeline import default_workers, run_ordered
from .sinks import STDOUT, AtomicFile, FileSink, StreamSink
from .tape import (DEFAULT_BLOCK_SIZE, TapeFileInfo, TapeImageStream, TapeMediaError, TapeSink, TapeSpec,
                   read_label, require_label, scan_files)
from .stream import (DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL, DIGEST_SIZE, MAX_CHUNK_SIZE, TRAILER_MAGIC, ZSTD_MAGIC,
                     EncodedChunk, Frame, FrameError, FrameLog, ImageHeader, ImageReader, ImageTrailer, ImageWriter,
                     TruncatedFrame, chunk_digest, count_rest, decode_chunk, decode_trailer, encode_chunk,
                     garbage_after, iter_frames, read_header, seek_table_mismatch, zero_digest, zero_frame,
                     zstd_frame_bound)
from .partitions import plan_volume, read_partition_table
from .usedmap import ALL_BLOCKS, UsedMap, plan_excludes, plan_mounted

Progress = Callable[[int], None]


class VolumeSource(Protocol):
    """What the backup reads from: a block device, a file, or a snapshot view."""

    path: str
    size: int
    logical_sector_size: int

    def read_into(self, buf: memoryview, offset: int) -> int: ...


@dataclass
class BackupResult:
    image_id: str
    image: str
    source: str
    volume_size: int
    chunks: int
    zero_chunks: int
    bytes_read: int
    bytes_written: int
    seconds: float
    level: int
    chunk_size: int
    image_digest: str
    header: ImageHeader = field(repr=False)
    freeze_window_ms: float | None = None

    @property
    def ratio(self) -> float:
        return self.volume_size / self.bytes_written if self.bytes_written else 0.0

    @property
    def mb_per_second(self) -> float:
        return self.volume_size / self.seconds / 1e6 if self.seconds else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["header"]
        return dict(d, ratio=round(self.ratio, 3), mb_per_second=round(self.mb_per_second, 1))


@dataclass
class RestoreResult:
    image: str
    target: str
    volume_size: int
    chunks: int
    zero_chunks: int
    bytes_written: int
    seconds: float
    verified: bool

    @property
    def mb_per_second(self) -> float:
        return self.volume_size / self.seconds / 1e6 if self.seconds else 0.0

    def to_dict(self) -> dict:
        return dict(asdict(self), mb_per_second=round(self.mb_per_second, 1))


@dataclass
class VerifyResult:
    image: str
    volume_size: int
    chunks: int
    zero_chunks: int
    seconds: float
    ok: bool = True
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def probe_filesystem(path: str) -> dict:
    """Filesystem type, label and UUID of a device or image file, by blkid's low-level probe."""
    values = discover.probe_with_blkid(path)
    return {k: values[v] for k, v in (("fs_type", "TYPE"), ("label", "LABEL"), ("uuid", "UUID")) if v in values}


# Enough of a source's start to recognise an image, a zstd file or a virtual tape's first record.
SOURCE_SNIFF_BYTES = 64 << 10


def open_source(path: str, on_notice: Callable[[str], None] | None = None, *,
                backups_as_sources: bool = False) -> BlockDevice:
    """Open a volume to image. A source that is itself a backup (an imager image, a zstd file,
    a virtual tape) is refused unless `backups_as_sources`: imaging it again is a mistake."""
    try:
        dev = BlockDevice(path, direct=True, on_notice=on_notice)
    except DeviceError as e:
        raise UsageError(str(e)) from None
    try:
        if dev.size == 0:
            raise UsageError(f"{path}: is empty (size 0)")
        kind = None if backups_as_sources else backup_artifact_kind(dev.pread(SOURCE_SNIFF_BYTES, 0))
        if kind:
            raise UsageError(f"{path} is {kind}, not a volume: to write it back use imager restore "
                             f"(--force images it anyway)")
    except BaseException:
        dev.close()
        raise
    return dev


def _read_chunks(source: VolumeSource, chunk_size: int, pool: BufferPool, on_read: Callable[[int], None],
                 plan: UsedMap | None = None) -> Iterator[tuple[int, AlignedBuffer | None, int]]:
    """Each chunk of the source in a pooled buffer; with a plan, only the used ranges are read
    (the rest of the buffer is zeros) and a chunk with nothing used comes without a buffer."""
    count = -(-source.size // chunk_size)
    for index in range(count):
        offset = index * chunk_size
        length = min(chunk_size, source.size - offset)
        pieces = plan.ranges_in(offset, length) if plan is not None else [(0, length)]
        if not pieces:
            yield index, None, length
            continue
        buf = pool.acquire()
        try:
            if pieces != [(0, length)]:
                buf.array[:length] = 0
            for start, end in pieces:
                got = source.read_into(buf.view[start:end], offset + start)
                if got != end - start:
                    raise ImagerError(f"{source.path}: short read at offset {offset + start + got} "
                                      f"(device shrank or ended early)")
                on_read(got)
        except BaseException:
            pool.release(buf)
            raise
        yield index, buf, length


def write_image(source: VolumeSource, sink, *, level: int = DEFAULT_LEVEL,
                chunk_size: int = DEFAULT_CHUNK_SIZE, workers: int | None = None,
                source_meta: dict | None = None, snapshot_meta: dict | None = None,
                progress: Progress | None = None, image_id: str | None = None,
                plan: UsedMap | None = None, partitions: dict | None = None,
                excludes: list[str] | None = None) -> BackupResult:
    """Image `source` into `sink` (which the caller commits or aborts). With a used-block
    `plan`, blocks the filesystem does not use go into the image as zeros, unread."""
    if (chunk_size <= 0 or chunk_size % source.logical_sector_size or chunk_size & (chunk_size - 1)
            or chunk_size > MAX_CHUNK_SIZE):
        raise UsageError(f"chunk size {chunk_size} must be a power of two, a multiple of the sector size "
                         f"{source.logical_sector_size}, and at most {MAX_CHUNK_SIZE >> 20} MiB")
    if not 1 <= level <= 22:
        raise UsageError(f"compression level {level} is out of range (1..22)")
    workers = workers or default_workers()
    header = ImageHeader(volume_size=source.size, chunk_size=chunk_size,
                         sector_size=source.logical_sector_size, level=level,
                         source=dict({"path": source.path}, **(source_meta or {})),
                         snapshot=snapshot_meta or {"provider": "none", "time": _now()},
                         created=_now(), tool=f"imager {__version__}")
    if plan is not None:
        if plan.size != source.size:
            raise ImagerError(f"the used-block plan covers {plan.size} bytes, the volume has {source.size}")
        plan = plan.aligned(source.logical_sector_size)
        header.plan = plan.to_dict()
        if plan.mode == ALL_BLOCKS:
            plan = None
    if excludes:
        header.plan["excludes"] = list(excludes)
    header.partitions = partitions
    if image_id:
        header.image_id = image_id
    started = time.monotonic()
    writer = ImageWriter(sink, header)
    pool = BufferPool(workers * 2 + 2, chunk_size)
    totals = {"bytes_read": 0, "zero_chunks": 0}

    def count_read(n: int) -> None:
        totals["bytes_read"] += n

    def encode(item: tuple[int, AlignedBuffer | None, int]) -> EncodedChunk:
        index, buf, length = item
        if buf is None:
            return EncodedChunk(index, length, zero_frame(length, level), zero_digest(length), True)
        try:
            return encode_chunk(index, buf.view[:length], level)
        finally:
            pool.release(buf)

    def consume(chunk: EncodedChunk) -> None:
        writer.write_chunk(chunk)
        totals["zero_chunks"] += chunk.zero
        if progress:
            progress(chunk.length)

    try:
        run_ordered(_read_chunks(source, chunk_size, pool, count_read, plan), encode, consume,
                    workers=workers, depth=workers * 2)
    finally:
        pool.close()
    seconds = time.monotonic() - started
    writer.finish({"bytes_read": totals["bytes_read"], "zero_chunks": totals["zero_chunks"],
                   "seconds": round(seconds, 3), "finished": _now()})
    return BackupResult(image_id=header.image_id, image=getattr(sink, "path", ""), source=source.path, volume_size=source.size,
                        chunks=header.chunk_count, zero_chunks=totals["zero_chunks"],
                        bytes_read=totals["bytes_read"], bytes_written=writer.bytes_written,
                        seconds=seconds, level=level, chunk_size=chunk_size,
                        image_digest=writer.image_digest, header=header)


def image_record(header: ImageHeader, stream_bytes: int, image_digest: str) -> ImageRecord:
    return ImageRecord(id=header.image_id, created=header.created, source=header.source.get("path", ""),
                       fs_type=header.source.get("fs_type"), volume_size=header.volume_size,
                       chunk_size=header.chunk_size, chunks=header.chunk_count, level=header.level,
                       stream_bytes=stream_bytes, image_digest=image_digest,
                       snapshot=json.dumps(header.snapshot, sort_keys=True))


def _warn_if_mounted_rw(source: str, on_notice: Callable[[str], None] | None) -> None:
    """Reading a device as it is gives a crash-consistent image at best when a filesystem on it
    is mounted read-write: directly, through one of its partitions, or through the front of
    the managed volume it is the source of."""
    if not on_notice:
        return
    real = os.path.realpath(source)
    through = [source]
    partitions_dir = f"/sys/class/block/{os.path.basename(real)}"
    if os.path.isdir(partitions_dir):
        through += [f"/dev/{entry}" for entry in sorted(os.listdir(partitions_dir))
                    if os.path.exists(f"{partitions_dir}/{entry}/partition")]
    through += [v.front for v in front.known_volumes() if v.front and os.path.realpath(v.device) == real]
    for path in through:
        for m in block.mounts_of(path):
            if not m.read_only:
                on_notice(f"{path} is mounted read-write at {m.mount_point}; the image is "
                          f"crash-consistent at best (use a snapshot)")


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


def remove_stale_planning_mounts(on_notice: Callable[[str], None] | None = None) -> None:
    """Earlier versions planned unmounted volumes on mounts under /run/imager-plan-*, which a
    killed job left behind; plans are made in private mount namespaces now, which nothing can
    leave behind. Remove what an old one left, and say so."""
    for point in sorted(glob.glob("/run/imager-plan-*")):
        if os.path.ismount(point):
            subprocess.run(["umount", "-l", point], capture_output=True)
        try:
            os.rmdir(point)
        except OSError:
            continue
        if on_notice:
            on_notice(f"removed {point}, a planning mount left by a killed imager")


def plan_source(source: str, size: int, options: ImagingOptions, fs_meta: dict,
                on_notice: Callable[[str], None] | None = None) -> tuple[UsedMap, dict | None]:
    """The used-block plan of an unsnapshotted source and its partition table (if it is a disk,
    which `fs_meta`, the source's probe_filesystem(), tells by holding no filesystem type)."""
    partitions = None
    if not fs_meta.get("fs_type"):
        try:
            table = read_partition_table(source)
            partitions = table.to_dict() if table else None
        except ImagerError:
            pass  # plan_volume reports a damaged table as the reason for imaging all blocks
    mounted = block.mounts_of(source)
    if options.excludes:
        if not mounted:
            raise UsageError(f"--exclude needs the filesystem on {source} mounted, to find the files' blocks")
    if options.all_blocks:
        return UsedMap.all_blocks(size, "--all-blocks"), partitions
    plan = plan_mounted(source, mounted[0].mount_point) if mounted else plan_volume(source)
    if plan.mode == ALL_BLOCKS and on_notice:
        on_notice(f"{source}: {plan.reason}; imaging all blocks")
    if options.excludes:
        plan = plan.minus(plan_excludes(mounted[0].mount_point, list(options.excludes), source))
    return plan, partitions


@dataclass
class Destination:
    """Where backups go: an image file (a directory of them for several volumes) or a tape."""

    output: str | None = None
    tape: TapeSpec | None = None
    force: bool = False
    block_size: int = DEFAULT_BLOCK_SIZE
    expect_label: str | None = None
    drive_compression: bool = False

    @property
    def to_stdout(self) -> bool:
        return self.output == STDOUT

    def image_path(self, name: str, many: bool) -> str:
        if not self.to_stdout and (many or os.path.isdir(self.output)):
            return os.path.join(self.output, f"{name}.zst")
        return self.output

    def check(self, many: bool) -> None:
        if bool(self.output) == bool(self.tape):
            raise UsageError("give either an image file (-o) or a tape (--tape)")
        if self.expect_label is not None and not self.tape:
            raise UsageError("--label names the tape a backup must go to; it goes only with --tape")
        if self.to_stdout:
            if many:
                raise UsageError("-o - writes one image to standard output: give one source")
            return
        if self.output:
            st = check_image_output(self.output)
            if many and (st is None or not os.path.isdir(self.output)):
                raise UsageError(f"{self.output}: with several volumes, -o names an existing directory")

    def filesystems(self, many: bool, catalog: Catalog | None) -> list[str]:
        """The paths this destination writes to (none of them may be on a frozen filesystem)."""
        paths = ([os.path.dirname(os.path.abspath(self.image_path("x", many)))]
                 if self.output and not self.to_stdout else [])
        if self.tape and not self.tape.is_real_drive:
            paths.append(os.path.dirname(os.path.abspath(self.tape.path_for(1))))
        if catalog is not None:
            paths.append(str(catalog.path.parent))
        return paths


def _write_one(dev: VolumeSource, dest: Destination, name: str, options: ImagingOptions, *, many: bool,
               plan: UsedMap | None, partitions: dict | None, source_meta: dict, snapshot_meta: dict,
               progress: Progress | None, catalog: Catalog | None,
               on_notice: Callable[[str], None] | None,
               before_commit: Callable[[], None] | None = None) -> BackupResult:
    """Image one volume into the destination. `before_commit` may still refuse the image (the
    freeze it was read under expired) before it takes its final name."""
    image_id = uuid.uuid4().hex
    if dest.tape:
        sink = TapeSink(dest.tape, image_id=image_id, block_size=dest.block_size,
                        expect_label=dest.expect_label, drive_compression=dest.drive_compression,
                        largest_frame=zstd_frame_bound(options.chunk_size), on_notice=on_notice)
    elif dest.to_stdout:
        sink = StreamSink()
    else:
        path = dest.image_path(name, many)
        if os.path.exists(path) and os.path.samefile(dev.path, path):
            raise UsageError(f"{path}: the image cannot be written over its own source")
        sink = FileSink(path, force=dest.force)
    try:
        result = write_image(dev, sink, level=options.level, chunk_size=options.chunk_size,
                             workers=options.workers, source_meta=source_meta, snapshot_meta=snapshot_meta,
                             progress=progress, image_id=image_id, plan=plan, partitions=partitions,
                             excludes=list(options.excludes))
        record = image_record(result.header, result.bytes_written, result.image_digest)
        if before_commit is not None:
            before_commit()
        if dest.tape:
            sink.commit(record_dict(record))
        else:
            sink.commit()
    except BaseException:
        sink.abort()
        raise
    finally:
        if dest.tape:
            _record_labels(catalog, sink.labelled)
    if dest.tape:
        segments = _tape_segment_records(image_id, sink.segments)
        result.image = ", ".join(f"{s.tape_label} file {s.tape_file}" for s in segments)
    elif dest.to_stdout:
        # A stream has no place the catalog could find it again.
        result.image = sink.path
        return result
    else:
        segments = [SegmentRecord(image_id, 0, "file", os.path.abspath(sink.path), None, None, None, 0,
                                  result.bytes_written)]
        result.image = sink.path
    if catalog is not None:
        catalog.add_image(record, segments, replaces_tape_files=bool(dest.tape))
    return result


SNAPSHOT_PROVIDERS = ("none", "freeze", "cow")


def backup_volumes(sources: list[str], dest: Destination, *, snapshot: str = "none",
                   options: ImagingOptions | None = None, pre_freeze: Sequence = (), post_thaw: Sequence = (),
                   while_frozen: Callable[[], object] | None = None, progress: Progress | None = None,
                   on_notice: Callable[[str], None] | None = None,
                   catalog: Catalog | None = None) -> list[BackupResult]:
    """Image every source, each from one point in time shared by all of them.

    `snapshot` is the provider: "cow" snapshots managed volumes (names, front or source devices)
    in one freeze window and reads the snapshot views, deleting the snapshots at the end whatever
    happens; "freeze" keeps the filesystems frozen while their devices are read; "none" reads the
    devices as they are. `while_frozen` runs inside the freeze window (cow and freeze)."""
    options = options or ImagingOptions()
    if snapshot not in SNAPSHOT_PROVIDERS:
        raise UsageError(f"unknown snapshot provider {snapshot!r} (choose from {', '.join(SNAPSHOT_PROVIDERS)})")
    if not sources:
        raise UsageError("nothing to back up: give at least one source")
    many = len(sources) > 1
    dest.check(many)
    remove_stale_planning_mounts(on_notice)
    if options.excludes and options.all_blocks:
        raise UsageError("--exclude leaves blocks out of the used-block plan; it cannot go with --all-blocks")
    if snapshot == "cow":
        return _backup_cow(sources, dest, options, many, pre_freeze, post_thaw, while_frozen, progress, on_notice,
                           catalog)
    devices = []
    try:
        for source in sources:
            devices.append(open_source(source, on_notice, backups_as_sources=options.backups_as_sources))
        if snapshot == "freeze":
            return _backup_frozen(devices, dest, options, many, pre_freeze, post_thaw, while_frozen, progress,
                                  on_notice, catalog)
        results = []
        for dev in devices:
            fs_meta = probe_filesystem(dev.path)
            plan, partitions = plan_source(dev.path, dev.size, options, fs_meta, on_notice)
            _warn_if_mounted_rw(dev.path, on_notice)
            results.append(_write_one(dev, dest, _volume_name(dev.path), options, many=many, plan=plan,
                                      partitions=partitions, source_meta=fs_meta,
                                      snapshot_meta={"provider": "none", "time": _now()}, progress=progress,
                                      catalog=catalog, on_notice=on_notice))
        return results
    finally:
        for dev in devices:
            dev.close()


def _volume_name(path: str) -> str:
    return os.path.basename(os.path.realpath(path)) or "volume"


def _frozen_plan(device: str, size: int, mount_point: str, options: ImagingOptions) -> UsedMap:
    if options.all_blocks:
        return UsedMap.all_blocks(size, "--all-blocks")
    plan = plan_mounted(device, mount_point)
    if options.excludes:
        plan = plan.minus(plan_excludes(mount_point, list(options.excludes), device))
    return plan


def _refuse_destination_on(frozen: dict[str, str], dest: Destination, many: bool, catalog: Catalog | None) -> None:
    """Writing to a filesystem that is frozen blocks forever: refuse before freezing."""
    frozen_devices = {os.stat(dev).st_rdev: point for dev, point in frozen.items()}
    for path in dest.filesystems(many, catalog):
        probe = path
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        point = frozen_devices.get(os.stat(probe).st_dev)
        if point is not None:
            raise UsageError(f"{path} is on the filesystem at {point}, which this backup freezes; "
                             f"write the image (and the catalog) somewhere else")


def _backup_frozen(devices: list[BlockDevice], dest: Destination, options: ImagingOptions, many: bool,
                   pre_freeze: Sequence, post_thaw: Sequence, while_frozen, progress, on_notice,
                   catalog) -> list[BackupResult]:
    mounted = {}
    for dev in devices:
        points = block.mounts_of(dev.path)
        if points:
            mounted[dev.path] = points[0].mount_point
        elif on_notice:
            on_notice(f"{dev.path} is not mounted: nothing to freeze, it is read as it is")
    if options.excludes and len(mounted) != len(devices):
        raise UsageError("--exclude needs every source mounted, to find the files' blocks")
    _refuse_destination_on(mounted, dest, many, catalog)
    results = []
    created = _now()
    with freeze_window(list(mounted.values()), pre_freeze, post_thaw,
                       max_seconds=options.max_freeze or DEFAULT_MAX_FREEZE_READ) as window:
        plans = {dev.path: _frozen_plan(dev.path, dev.size, mounted[dev.path], options)
                 for dev in devices if dev.path in mounted}
        if while_frozen is not None:
            while_frozen()
        for dev in devices:
            fs_meta = probe_filesystem(dev.path)
            plan, partitions = (plans[dev.path], None) if dev.path in plans else plan_source(
                dev.path, dev.size, options, fs_meta, on_notice)
            meta = {"provider": "freeze", "time": created, "frozen": list(mounted.values())}
            results.append(_write_one(dev, dest, _volume_name(dev.path), options, many=many, plan=plan,
                                      partitions=partitions, source_meta=fs_meta,
                                      snapshot_meta=meta, progress=progress, catalog=catalog,
                                      on_notice=on_notice, before_commit=window.check))
    for r in results:
        r.freeze_window_ms = round(window.milliseconds, 1)
    return results


def resolve_volumes(sources: list[str]) -> list:
    """The managed volumes named by `sources`: a volume name, its front device or its source device."""
    volumes = front.known_volumes()
    chosen = []
    for source in sources:
        real = os.path.realpath(source)
        match = next((v for v in volumes if source == v.name or real in (v.front, v.device)), None)
        if match is None:
            raise UsageError(f"{source} is not an attached volume (attach it with: imager attach DEVICE); "
                             f"attached: {', '.join(v.name for v in volumes) or 'none'}")
        chosen.append(match)
    return chosen


def _backup_cow(sources: list[str], dest: Destination, options: ImagingOptions, many: bool, pre_freeze,
                post_thaw, while_frozen, progress, on_notice, catalog) -> list[BackupResult]:
    volumes = resolve_volumes(sources)
    for v in volumes:
        front.refuse_esp(v.device, "cow")
    mounted = {v.front: block.mounts_of(v.front)[0].mount_point for v in volumes if block.mounts_of(v.front)}
    if options.excludes and len(mounted) != len(volumes):
        raise UsageError("--exclude needs every volume's front mounted, to find the files' blocks")
    _refuse_destination_on(mounted, dest, many, catalog)
    plans: dict[str, UsedMap] = {}

    def inside_window() -> None:
        for v in volumes:
            if v.front in mounted:
                plans[v.name] = _frozen_plan(v.front, v.size, mounted[v.front], options)
        if while_frozen is not None:
            while_frozen()

    # Held: if this process dies, every daemon deletes its snapshot when the connection drops.
    with front.HeldSnapshots([v.name for v in volumes], pre_freeze, post_thaw, inside_window,
                             max_freeze=options.max_freeze or DEFAULT_MAX_FREEZE) as held:
        return _write_snapshots(volumes, held.info, dest, options, many, plans, progress, catalog, on_notice)


def _write_snapshots(volumes: list, snapshot_set: front.SnapshotSetInfo, dest: Destination, options: ImagingOptions,
                     many: bool, plans: dict[str, UsedMap], progress, catalog, on_notice) -> list[BackupResult]:
    # One instant for the whole set: when COW went on in the first volume, inside the window.
    set_time = datetime.fromtimestamp(min(s.created_at for s in snapshot_set.snapshots), timezone.utc)
    results = []
    for v, snap in zip(volumes, snapshot_set.snapshots):
        with BlockDevice(snap.path, direct=True) as view:
            plan = plans.get(v.name)
            if plan is None:
                plan = UsedMap.all_blocks(view.size, "--all-blocks") if options.all_blocks else plan_volume(snap.path)
            meta = {"provider": "cow", "time": set_time.isoformat(timespec="milliseconds"),
                    "freeze_window_ms": round(snapshot_set.freeze_window_ms, 2),
                    "volumes": [x.name for x in volumes], "volume": v.name}
            try:
                result = _write_one(view, dest, v.name, options, many=many, plan=plan, partitions=None,
                                    source_meta=dict(probe_filesystem(snap.path), path=v.device, volume=v.name,
                                                     front=v.front, view=snap.path),
                                    snapshot_meta=meta, progress=progress, catalog=catalog,
                                    on_notice=on_notice)
            except (DeviceError, SnapshotError) as e:
                # The daemon answers a read of an invalidated snapshot with EIO: say why; any
                # other read error is the source's, which the daemon's log names.
                _raise_if_invalidated(v.name)
                raise ImagerError(f"{e} (reading the snapshot of {v.name}; its daemon's log says why: "
                                  f"{v.log_path})") from None
        result.freeze_window_ms = round(snapshot_set.freeze_window_ms, 2)
        results.append(result)
    return results


def _raise_if_invalidated(name: str) -> None:
    """Raise the reason the snapshot of volume `name` stopped being point-in-time, if it did."""
    try:
        snap = front.status(name).snapshot
    except ImagerError:
        return
    if snap is None or not snap.invalid:
        return
    message = f"the snapshot of {name} is no longer point-in-time: {snap.invalid_reason}"
    if "full" in snap.invalid_reason:
        needed = snap.cache_bytes_needed
        remedy = ("a larger cache (imager attach --cache-size)" if snap.cache_capacity is not None
                  and needed > snap.cache_capacity else "more free space where the cache lives")
        error = CacheFullError(f"{message}; at least {needed} bytes ({needed / (1 << 20):.1f} MiB) of cache "
                               f"would have been needed, retry with {remedy}")
        error.needed_bytes = needed
        error.capacity = snap.cache_capacity
        raise error from None
    raise SnapshotError(message) from None


def backup(source: str, output: str, *, force: bool = False, options: ImagingOptions | None = None,
           progress: Progress | None = None, on_notice: Callable[[str], None] | None = None,
           catalog: Catalog | None = None) -> BackupResult:
    """Image the block device or file `source` as it is to the image file `output`."""
    return backup_volumes([source], Destination(output=output, force=force), options=options,
                          progress=progress, on_notice=on_notice, catalog=catalog)[0]


# --- restore ----------------------------------------------------------------------------------

def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class _RestoreTarget:
    """A block device written in place, or a new file written under a temporary name."""

    def __init__(self, path: str, volume_size: int, force: bool):
        self.path = path
        self.file: AtomicFile | None = None
        self.fresh_file = False
        st = check_restore_target(path)
        if st is not None and stat.S_ISBLK(st.st_mode):
            mounted = block.mounts_of(path)
            if mounted:
                raise UsageError(f"{path}: is mounted at {mounted[0].mount_point}; unmount it before restoring onto it")
            try:
                self.dev = BlockDevice(path, writable=True, direct=False, exclusive=True)
            except DeviceError as e:
                raise UsageError(str(e)) from None
            try:
                if self.dev.read_only:
                    raise UsageError(f"{path}: device is read-only")
                if self.dev.size < volume_size:
                    raise UsageError(f"{path}: too small: {self.dev.size} bytes, the image holds a volume "
                                     f"of {volume_size} bytes")
                if not force:
                    # Checked while the exclusive open keeps anyone from mounting it meanwhile.
                    refuse_overwriting_data(path)
            except BaseException:
                self.dev.close()
                raise
            return
        if st is not None and not force:
            raise UsageError(f"{path}: already exists (use --force to replace it)")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise UsageError(f"{directory}: no such directory")
        self.file = AtomicFile(path, replace=force)
        try:
            os.ftruncate(self.file.fd, volume_size)
            self.dev = BlockDevice(self.file.open_path, writable=True, direct=False)
        except (OSError, DeviceError) as e:
            self.file.abort()
            raise UsageError(f"cannot create {path}: {getattr(e, 'strerror', None) or e}") from None
        self.fresh_file = True

    def write_chunk(self, offset: int, data: bytes | None, length: int) -> None:
        if data is not None:
            self.dev.write_at(data, offset)
        elif not self.fresh_file:
            self.dev.zero_range(offset, length)
        # a zero chunk in a fresh file stays a hole

    def finish(self) -> None:
        self.dev.flush()
        if self.file is not None:
            try:
                self.file.commit()
            except FileExistsError:
                raise UsageError(f"{self.path}: appeared while restoring; not replaced (use --force)") from None
            self.file = None

    def abort(self) -> None:
        self.dev.close()
        if self.file is not None:
            self.file.abort()

    def close(self) -> None:
        self.dev.close()


class SeekableFeed:
    """Chunks of an image file, read through its seek table; digests are known up front."""

    def __init__(self, reader: ImageReader):
        self.reader = reader
        self.header = reader.header
        self.name = self.path = reader.path
        self._log = FrameLog()

    def chunks(self) -> Iterator[tuple[int, bytes, int]]:
        self._log.add(self.reader.header_frame, 0)
        for i in range(self.reader.chunk_count):
            frame = self.reader.frame(i)
            self._log.add(frame, self.header.chunk_length(i))
            yield i, frame, self.reader.chunk_offsets[i]

    def expected_digest(self, index: int) -> bytes | None:
        return self.reader.trailer.digest(index)

    def skip_stream_digest(self) -> None:
        self._log.stop_hashing()

    def finish(self) -> ImageTrailer:
        """The trailer, once every chunk was read: what was read must be what was written."""
        self.reader.trailer.check_stream_digest(self._log.digest(), self.name)
        return self.reader.trailer


class StreamFeed:
    """Chunks of an image read front to back from a pipe or tape: the trailer with the
    digests comes last, so every chunk is checked against it when the stream ends. The frames
    must come exactly as a writer emits them: header, chunks, trailer, seek table, nothing more."""

    def __init__(self, stream: BinaryIO, name: str):
        self.name = name
        self._stream = stream
        try:
            self.header, header_frame = read_header(stream)
        except ImageFormatError as e:
            raise ImageFormatError(f"{name}: {e}") from None
        self._frames = iter_frames(stream, self.header, len(header_frame))
        self._log = FrameLog()
        self._log.add(header_frame, 0)
        self._trailer: ImageTrailer | None = None
        self._stream_digest = ""
        self._ended = False
        self._count = 0
        self.stream_bytes = len(header_frame)

    def chunks(self) -> Iterator[tuple[int, bytes, int]]:
        n = self.header.chunk_count
        try:
            for frame in self._frames:
                self.stream_bytes = frame.end
                if frame.magic == ZSTD_MAGIC and (self._trailer is not None or self._count >= n):
                    raise ImageFormatError(f"{self.name}: more chunks than the header's {n} (image corrupted)")
                if self._count < n:
                    if frame.magic != ZSTD_MAGIC:
                        raise ChunkError(self._count, frame.offset, self._count * self.header.chunk_size,
                                         f"a metadata frame (magic {frame.magic:#010x}) where the chunk belongs")
                    self._log.add(frame.data, self.header.chunk_length(self._count))
                    yield self._count, frame.data, frame.offset
                    self._count += 1
                elif self._trailer is None:
                    self._read_trailer(frame)
                else:
                    self._read_seek_table(frame)
                    return
        except TruncatedFrame as e:
            if self._count < n:
                raise ChunkError(self._count, e.offset, self._count * self.header.chunk_size,
                                 f"image stream cut short: {e}") from None
            raise ImageFormatError(f"{self.name}: image stream cut short after its last chunk: {e}") from None
        except FrameError as e:
            if self._count < n:
                raise ChunkError(self._count, e.offset, self._count * self.header.chunk_size, str(e)) from None
            raise ImageFormatError(f"{self.name}: image stream corrupted after its last chunk: {e}") from None

    def _read_trailer(self, frame: Frame) -> None:
        if frame.magic != TRAILER_MAGIC:
            raise ImageFormatError(f"{self.name}: image trailer missing or corrupted at image offset {frame.offset}")
        self._stream_digest = self._log.digest()
        self._log.add(frame.data, 0)
        try:
            self._trailer = decode_trailer(frame.payload, self.header)
        except ImageFormatError as e:
            raise ImageFormatError(f"{self.name}: {e} (at image offset {frame.offset})") from None

    def _read_seek_table(self, frame: Frame) -> None:
        """The seek table must list the frames that came, and the image ends with it."""
        mismatch = seek_table_mismatch(frame.data, self._log.entries, self.header.chunk_count)
        if mismatch:
            raise ImageFormatError(f"{self.name}: the seek table at image offset {frame.offset} is corrupted "
                                   f"or the frames were moved: {mismatch}")
        extra = count_rest(self._stream)
        if extra:
            raise garbage_after(self.name, extra, frame.end)
        self._ended = True

    def expected_digest(self, index: int) -> bytes | None:
        return None

    def skip_stream_digest(self) -> None:
        self._log.stop_hashing()

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close:
            close()

    def finish(self) -> ImageTrailer:
        if self._count < self.header.chunk_count:
            raise ImageFormatError(f"{self.name}: image stream ends after {self._count} of "
                                   f"{self.header.chunk_count} chunks")
        if self._trailer is None or not self._trailer.complete:
            raise ImageFormatError(f"{self.name}: image stream has no trailer (incomplete image)")
        if not self._ended:
            raise ImageFormatError(f"{self.name}: image stream ends without its seek table (at image offset "
                                   f"{self.stream_bytes})")
        self._trailer.check_stream_digest(self._stream_digest, self.name)
        return self._trailer


def _decoder(feed) -> Callable[[tuple[int, bytes, int]], tuple[int, bytes | None, bytes]]:
    header = feed.header

    def decode(item: tuple[int, bytes, int]) -> tuple[int, bytes | None, bytes]:
        index, frame, image_offset = item
        length = header.chunk_length(index)
        expected = feed.expected_digest(index)
        data = decode_chunk(frame, index, length, expected, image_offset, index * header.chunk_size, header.level)
        if expected is not None:
            return index, data, expected
        return index, data, zero_digest(length) if data is None else chunk_digest(data)
    return decode


def _check_digests(feed, digests: bytearray, trailer: ImageTrailer) -> None:
    if bytes(digests) == trailer.digests:
        return
    for i in range(feed.header.chunk_count):
        if digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] != trailer.digest(i):
            raise ChunkError(i, -1, i * feed.header.chunk_size, "checksum mismatch with the image trailer")


def restore(image: str, target: str, *, force: bool = False, verify: bool = False,
            workers: int | None = None, progress: Progress | None = None) -> RestoreResult:
    """Write the volume held by the image file `image` onto the block device or file `target`."""
    with ImageReader(image) as reader:
        return restore_feed(SeekableFeed(reader), target, force=force, verify=verify, workers=workers,
                            progress=progress)


def restore_feed(feed, target: str, *, force: bool = False, verify: bool = False,
                 workers: int | None = None, progress: Progress | None = None) -> RestoreResult:
    """Write the chunks of `feed` (an image file or stream) onto `target`, in order."""
    workers = workers or default_workers()
    started = time.monotonic()
    header = feed.header
    image_path = getattr(feed, "path", None)
    if image_path and _same_file(image_path, target):
        raise UsageError(f"{target}: is the image being restored; give another target")
    tgt = _RestoreTarget(target, header.volume_size, force)
    # Every chunk's contents are checked against its digest: damage that the stream digest
    # alone would find cannot change what is restored (verify reports it), and hashing every
    # compressed byte would cost restore about 10% of its CPU.
    feed.skip_stream_digest()
    totals = {"zero_chunks": 0, "bytes_written": 0}
    digests = bytearray()

    def consume(result: tuple[int, bytes | None, bytes]) -> None:
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
        run_ordered(feed.chunks(), _decoder(feed), consume, workers=workers)
        trailer = feed.finish()
        _check_digests(feed, digests, trailer)
        tgt.finish()
    except ImageFormatError as e:
        tgt.abort()
        if tgt.fresh_file:
            raise ImageFormatError(f"restore failed, nothing written to {target}: {e}") from None
        raise ImageFormatError(f"restore failed, {target} holds a partial volume: {e}") from None
    except BaseException:
        tgt.abort()
        raise
    tgt.close()
    if verify:
        compare_with_image(target, header, trailer, workers=workers)
    return RestoreResult(image=feed.name, target=target, volume_size=header.volume_size,
                         chunks=header.chunk_count, zero_chunks=totals["zero_chunks"],
                         bytes_written=totals["bytes_written"], seconds=time.monotonic() - started,
                         verified=verify)


@dataclass
class _Prefix:
    """The first `size` bytes of a device: a restore target may be larger than the volume."""

    device: BlockDevice
    size: int

    @property
    def path(self) -> str:
        return self.device.path

    @property
    def logical_sector_size(self) -> int:
        return self.device.logical_sector_size

    def read_into(self, buf: memoryview, offset: int) -> int:
        return self.device.read_into(buf, offset)


def compare_with_image(target: str, header: ImageHeader, trailer: ImageTrailer, *,
                       workers: int | None = None) -> None:
    """Re-read the volume's length of `target` from the medium and compare every chunk's
    checksum with the image's."""
    workers = workers or default_workers()
    dev = BlockDevice(target, direct=True)
    try:
        dev.drop_cache()
        pool = BufferPool(workers * 2 + 2, header.chunk_size)

        def digest(item: tuple[int, AlignedBuffer, int]) -> tuple[int, bytes]:
            index, buf, length = item
            try:
                return index, chunk_digest(buf.view[:length])
            finally:
                pool.release(buf)

        def check(result: tuple[int, bytes]) -> None:
            index, got = result
            if got != trailer.digest(index):
                raise ImagerError(f"verify after restore failed: {target} differs from the image in chunk "
                                  f"{index} (volume offset {index * header.chunk_size})")

        try:
            run_ordered(_read_chunks(_Prefix(dev, header.volume_size), header.chunk_size, pool, lambda n: None),
                        digest, check, workers=workers)
        finally:
            pool.close()
    finally:
        dev.close()


def verify(image: str, *, workers: int | None = None, progress: Progress | None = None) -> VerifyResult:
    """Read every chunk of the image file `image`, decompress it and check it against its checksums."""
    with ImageReader(image) as reader:
        return verify_feed(SeekableFeed(reader), workers=workers, progress=progress)


def verify_feed(feed, *, workers: int | None = None, progress: Progress | None = None) -> VerifyResult:
    started = time.monotonic()
    header = feed.header
    zero = [0]
    digests = bytearray()

    def consume(result: tuple[int, bytes | None, bytes]) -> None:
        index, data, digest = result
        digests.extend(digest)
        zero[0] += data is None
        if progress:
            progress(header.chunk_length(index))

    run_ordered(feed.chunks(), _decoder(feed), consume, workers=workers)
    _check_digests(feed, digests, feed.finish())
    return VerifyResult(image=feed.name, volume_size=header.volume_size, chunks=header.chunk_count,
                        zero_chunks=zero[0], seconds=time.monotonic() - started)


def info(image: str) -> dict:
    with ImageReader(image) as reader:
        return _info_dict(image, reader.file_size, reader.header, reader.trailer)


def info_feed(feed: StreamFeed) -> dict:
    """What an image read as a stream holds: its header, and the totals of its trailer, which
    comes last, so the whole stream is read (not decompressed)."""
    for _ in feed.chunks():
        pass
    return _info_dict(feed.name, feed.stream_bytes, feed.header, feed.finish())


def _info_dict(name: str, size: int, header: ImageHeader, trailer: ImageTrailer) -> dict:
    return {"image": name, "file_size": size, "header": header.to_dict(), "totals": trailer.totals,
            "ratio": round(header.volume_size / size, 3)}



# --- tape --------------------------------------------------------------------------------------

def _tape_segment_records(image_id: str, segments) -> list[SegmentRecord]:
    return [SegmentRecord(image_id, i, "tape", None, seg.label, seg.tape_set, seg.tape_file,
                          seg.stream_offset, seg.stream_length) for i, seg in enumerate(segments)]


def _record_labels(catalog: Catalog | None, labels) -> None:
    if catalog is not None:
        for label in labels:
            catalog.add_tape(TapeRecord(label.label, label.tape_set, label.sequence, label.created))


def _cartridge_sequences(spec: TapeSpec) -> Iterator[int]:
    sequence = 1
    while True:
        yield sequence
        if not spec.is_pattern or not os.path.exists(spec.path_for(sequence + 1)):
            return
        sequence += 1


def scan_tape(spec: TapeSpec, catalog: Catalog | None = None) -> list[TapeFileInfo]:
    """Read what every cartridge of `spec` holds from the media alone; with a catalog, replace
    what it says of these cartridges by what was found."""
    found: list[TapeFileInfo] = []
    segments: dict[str, list[SegmentRecord]] = {}
    records: dict[str, dict] = {}
    labels = []
    for sequence in _cartridge_sequences(spec):
        with spec.open(sequence, create=False) as drive:
            label = require_label(drive)
            labels.append(label)
            for info in scan_files(drive):
                info.label = label.label
                found.append(info)
                if info.kind == "image" and info.complete:
                    segments.setdefault(info.image_id, []).append(SegmentRecord(
                        info.image_id, info.segment, "tape", None, label.label, label.tape_set, info.tape_file,
                        info.stream_offset, info.stream_length))
                    if info.image:
                        records[info.image_id] = info.image
    if catalog is not None:
        for label in labels:
            catalog.forget_tape(label.label)
        _record_labels(catalog, labels)
        for image_id, record in records.items():
            catalog.add_image(ImageRecord(**record), segments[image_id])
    return found


def _locate_on_tape(spec: TapeSpec, image_id: str | None, catalog: Catalog | None) -> tuple[str, str, int]:
    """(full image id, tape label, tape file) of the first segment of an image: from the
    catalog when it knows the image, else by scanning the tape."""
    if catalog is not None and image_id:
        try:
            record = catalog.image(image_id)
        except UsageError:
            record = None
        if record is not None:
            first = next((s for s in catalog.segments(record.id) if s.kind == "tape" and s.segment == 0), None)
            if first is not None:
                return record.id, first.tape_label, first.tape_file
    files = scan_tape(spec)
    candidates = [f for f in files if f.kind == "image" and f.segment == 0
                  and (image_id is None or f.image_id.startswith(image_id))]
    if not candidates:
        damaged = "".join(f"; {f.label} file {f.tape_file}: {f.problem}" for f in files if f.kind == "damaged")
        raise UsageError((f"{spec.spec}: no image {image_id!r} on this tape" if image_id
                          else f"{spec.spec}: the tape holds no image") + damaged)
    if image_id and len({c.image_id for c in candidates}) > 1:
        raise UsageError(f"image id {image_id!r} is ambiguous on {spec.spec}")
    if image_id is None and len(candidates) > 1:
        raise UsageError(f"{spec.spec} holds {len(candidates)} images; choose one with --image ID "
                         f"(see imager tape list)")
    c = candidates[0]
    return c.image_id, c.label, c.tape_file


def open_tape_image(spec: TapeSpec, image_id: str | None, *, catalog: Catalog | None = None,
                    block_size: int | None = None) -> StreamFeed:
    """The image stream of one image on tape, positioned at its first segment."""
    return _open_located(spec, *_locate_on_tape(spec, image_id, catalog), block_size)


def _open_located(spec: TapeSpec, full_id: str, label_name: str, tape_file: int,
                  block_size: int | None) -> StreamFeed:
    sequence = 1
    if spec.is_pattern:
        for sequence in _cartridge_sequences(spec):
            with spec.open(sequence, create=False) as probe:
                label = read_label(probe)
            if label is not None and label.label == label_name:
                break
        else:
            raise TapeMediaError(f"{spec.spec}: no cartridge labelled {label_name!r} in the set")
    drive = spec.open(sequence, create=False)
    try:
        label = require_label(drive, label_name)
        stream = TapeImageStream(spec, drive, label, tape_file, full_id, block_size)
        return StreamFeed(stream, f"{spec.spec} file {tape_file} (image {full_id[:12]})")
    except BaseException:
        drive.close()
        raise


def restore_from_tape(spec: TapeSpec, image_id: str | None, target: str, *, catalog: Catalog | None = None,
                      block_size: int | None = None, **kw) -> RestoreResult:
    feed = open_tape_image(spec, image_id, catalog=catalog, block_size=block_size)
    try:
        return restore_feed(feed, target, **kw)
    finally:
        feed.close()


def verify_tape(spec: TapeSpec, image_id: str | None = None, *, catalog: Catalog | None = None,
                block_size: int | None = None, **kw) -> list[VerifyResult]:
    """Read back and check one image, or every image whose first segment is on the tape; a
    damaged or incomplete image, and a tape file whose segment header is damaged, is reported in
    its result and the others are still checked."""
    if image_id:
        return [_verify_on_tape(spec, *_locate_on_tape(spec, image_id, catalog), block_size, **kw)]
    results = []
    for f in scan_tape(spec):
        name = f"{spec.spec} {f.label} file {f.tape_file}"
        if f.kind == "damaged":
            results.append(_failed_verify(name, f.problem))
        elif f.incomplete and f.segment == 0:
            results.append(_failed_verify(f"{name} (image {f.image_id[:12]})", "incomplete: an interrupted write "
                                          "left it without its end block (the next backup to this cartridge "
                                          "replaces it)"))
        elif f.kind == "image" and f.segment == 0:
            try:
                results.append(_verify_on_tape(spec, f.image_id, f.label, f.tape_file, block_size, **kw))
            except ImagerError as e:
                results.append(_failed_verify(f"{name} (image {f.image_id[:12]})", str(e)))
    if not results:
        raise UsageError(f"{spec.spec}: the tape holds no image")
    return results


def _verify_on_tape(spec: TapeSpec, full_id: str, label_name: str, tape_file: int, block_size: int | None,
                    **kw) -> VerifyResult:
    feed = _open_located(spec, full_id, label_name, tape_file, block_size)
    try:
        return verify_feed(feed, **kw)
    finally:
        feed.close()


def _failed_verify(name: str, error: str) -> VerifyResult:
    return VerifyResult(image=name, volume_size=0, chunks=0, zero_chunks=0, seconds=0.0, ok=False, errors=[error])
