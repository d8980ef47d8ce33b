"""Backup, restore and verify: what a user asks for, start to end. The CLI is a thin layer over these."""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator, Protocol

from devices import block, discover
from devices.block import BlockDevice
from devices.buffers import AlignedBuffer, BufferPool
from devices.errors import DeviceError

from . import __version__
from .catalog import Catalog, ImageRecord, SegmentRecord
from .errors import ImageFormatError, ImagerError, UsageError
from .pipeline import default_workers, run_ordered
from .sinks import FileSink
from .stream import (DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL, EncodedChunk, ImageHeader, ImageReader,
                     ImageWriter, chunk_digest, encode_chunk)

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


def open_source(path: str, on_notice: Callable[[str], None] | None = None) -> BlockDevice:
    try:
        dev = BlockDevice(path, direct=True, on_notice=on_notice)
    except DeviceError as e:
        raise UsageError(str(e)) from None
    if dev.size == 0:
        dev.close()
        raise UsageError(f"{path}: is empty (size 0)")
    return dev


def _read_chunks(source: VolumeSource, chunk_size: int, pool: BufferPool,
                 on_read: Callable[[int], None]) -> Iterator[tuple[int, AlignedBuffer, int]]:
    count = -(-source.size // chunk_size)
    for index in range(count):
        offset = index * chunk_size
        length = min(chunk_size, source.size - offset)
        buf = pool.acquire()
        try:
            got = source.read_into(buf.view[:length], offset)
        except BaseException:
            pool.release(buf)
            raise
        if got != length:
            pool.release(buf)
            raise ImagerError(f"{source.path}: short read at offset {offset + got} "
                              f"(device shrank or ended early)")
        on_read(length)
        yield index, buf, length


def write_image(source: VolumeSource, sink, *, level: int = DEFAULT_LEVEL,
                chunk_size: int = DEFAULT_CHUNK_SIZE, workers: int | None = None,
                source_meta: dict | None = None, snapshot_meta: dict | None = None,
                progress: Progress | None = None) -> BackupResult:
    """Image `source` into `sink` (which the caller commits or aborts)."""
    if chunk_size <= 0 or chunk_size % source.logical_sector_size or chunk_size & (chunk_size - 1):
        raise UsageError(f"chunk size {chunk_size} must be a power of two and a multiple of "
                         f"the sector size {source.logical_sector_size}")
    if not 1 <= level <= 22:
        raise UsageError(f"compression level {level} is out of range (1..22)")
    workers = workers or default_workers()
    header = ImageHeader(volume_size=source.size, chunk_size=chunk_size,
                         sector_size=source.logical_sector_size, level=level,
                         source=dict(source_meta or {}, path=source.path),
                         snapshot=snapshot_meta or {"provider": "none", "time": _now()},
                         created=_now(), tool=f"imager {__version__}")
    started = time.monotonic()
    writer = ImageWriter(sink, header)
    pool = BufferPool(workers * 2 + 2, chunk_size)
    totals = {"bytes_read": 0, "zero_chunks": 0}

    def count_read(n: int) -> None:
        totals["bytes_read"] += n

    def encode(item: tuple[int, AlignedBuffer, int]) -> EncodedChunk:
        index, buf, length = item
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
        run_ordered(_read_chunks(source, chunk_size, pool, count_read), encode, consume,
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


def backup(source: str, output: str, *, force: bool = False, level: int = DEFAULT_LEVEL,
           chunk_size: int = DEFAULT_CHUNK_SIZE, workers: int | None = None,
           progress: Progress | None = None, on_notice: Callable[[str], None] | None = None,
           catalog: Catalog | None = None) -> BackupResult:
    """Image the block device or file `source` to the seekable zstd image `output`,
    and record it in `catalog` when one is given."""
    if os.path.exists(output) and os.path.exists(source) and os.path.samefile(source, output):
        raise UsageError(f"{output}: the image cannot be written over its own source")
    dev = open_source(source, on_notice)
    try:
        if on_notice:
            for m in block.mounts_of(source):
                if not m.read_only:
                    on_notice(f"{source} is mounted read-write at {m.mount_point}; the image is "
                              f"crash-consistent at best (use a snapshot)")
        sink = FileSink(output, force=force)
        try:
            result = write_image(dev, sink, level=level, chunk_size=chunk_size, workers=workers,
                                 source_meta=probe_filesystem(source), progress=progress)
            sink.commit()
        except BaseException:
            sink.abort()
            raise
        if catalog is not None:
            catalog.add_image(image_record(result.header, result.bytes_written, result.image_digest),
                              [SegmentRecord(result.image_id, 0, "file", os.path.abspath(output), None, None,
                                             None, 0, result.bytes_written)])
        return result
    finally:
        dev.close()


# --- restore ----------------------------------------------------------------------------------

class _RestoreTarget:
    """A block device written in place, or a new file written under a temporary name."""

    def __init__(self, path: str, volume_size: int, force: bool):
        self.path = path
        self.temp_path: str | None = None
        self.fresh_file = False
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{path}: is a directory; give a block device or a file name")
        if st is not None and stat.S_ISBLK(st.st_mode):
            mounted = block.mounts_of(path)
            if mounted:
                raise UsageError(f"{path}: is mounted at {mounted[0].mount_point}; unmount it before restoring onto it")
            try:
                self.dev = BlockDevice(path, writable=True, direct=False, exclusive=True)
            except DeviceError as e:
                raise UsageError(str(e)) from None
            if self.dev.read_only:
                self.dev.close()
                raise UsageError(f"{path}: device is read-only")
            if self.dev.size < volume_size:
                size = self.dev.size
                self.dev.close()
                raise UsageError(f"{path}: too small: {size} bytes, the image holds a volume of {volume_size} bytes")
            return
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path}: not a block device or regular file")
        if st is not None and not force:
            raise UsageError(f"{path}: already exists (use --force to replace it)")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise UsageError(f"{directory}: no such directory")
        self.temp_path = os.path.join(directory, f".{os.path.basename(path)}.part-{os.getpid()}")
        fd = os.open(self.temp_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, volume_size)
        os.close(fd)
        self.fresh_file = True
        self.dev = BlockDevice(self.temp_path, writable=True, direct=False)

    def write_chunk(self, offset: int, data: bytes | None, length: int) -> None:
        if data is not None:
            self.dev.write_at(data, offset)
        elif not self.fresh_file:
            self.dev.zero_range(offset, length)
        # a zero chunk in a fresh file stays a hole

    def finish(self) -> None:
        self.dev.flush()
        if self.temp_path:
            os.rename(self.temp_path, self.path)
            self.temp_path = None

    def abort(self) -> None:
        self.dev.close()
        if self.temp_path:
            try:
                os.unlink(self.temp_path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self.dev.close()


def restore(image: str, target: str, *, force: bool = False, verify: bool = False,
            workers: int | None = None, progress: Progress | None = None) -> RestoreResult:
    """Write the volume held by `image` onto the block device or file `target`."""
    workers = workers or default_workers()
    started = time.monotonic()
    with ImageReader(image) as reader:
        header = reader.header
        tgt = _RestoreTarget(target, header.volume_size, force)
        totals = {"zero_chunks": 0, "bytes_written": 0}

        def frames() -> Iterator[tuple[int, bytes]]:
            for i in range(reader.chunk_count):
                yield i, reader.frame(i)

        def decode(item: tuple[int, bytes]) -> tuple[int, bytes | None]:
            index, frame = item
            return index, reader.decode(index, frame)

        def consume(result: tuple[int, bytes | None]) -> None:
            index, data = result
            length = header.chunk_length(index)
            tgt.write_chunk(index * header.chunk_size, data, length)
            if data is None:
                totals["zero_chunks"] += 1
            else:
                totals["bytes_written"] += length
            if progress:
                progress(length)

        try:
            run_ordered(frames(), decode, consume, workers=workers)
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
            compare_with_image(target, reader, workers=workers)
    return RestoreResult(image=image, target=target, volume_size=header.volume_size,
                         chunks=header.chunk_count, zero_chunks=totals["zero_chunks"],
                         bytes_written=totals["bytes_written"], seconds=time.monotonic() - started,
                         verified=verify)


def compare_with_image(target: str, reader: ImageReader, *, workers: int | None = None) -> None:
    """Re-read the volume's length of `target` from the medium and compare every chunk's
    checksum with the image's."""
    header = reader.header
    workers = workers or default_workers()
    dev = BlockDevice(target, direct=True)
    try:
        dev.drop_cache()
        pool = BufferPool(workers * 2 + 2, header.chunk_size)

        class _Range:
            path, size, logical_sector_size = target, header.volume_size, dev.logical_sector_size

            @staticmethod
            def read_into(buf: memoryview, offset: int) -> int:
                return dev.read_into(buf, offset)

        def digest(item: tuple[int, AlignedBuffer, int]) -> tuple[int, bytes]:
            index, buf, length = item
            try:
                return index, chunk_digest(buf.view[:length])
            finally:
                pool.release(buf)

        def check(result: tuple[int, bytes]) -> None:
            index, got = result
            if got != reader.trailer.digest(index):
                raise ImagerError(f"verify after restore failed: {target} differs from the image in chunk "
                                  f"{index} (volume offset {index * header.chunk_size})")

        try:
            run_ordered(_read_chunks(_Range, header.chunk_size, pool, lambda n: None), digest, check,
                        workers=workers)
        finally:
            pool.close()
    finally:
        dev.close()


def verify(image: str, *, workers: int | None = None, progress: Progress | None = None) -> VerifyResult:
    """Read every chunk of `image`, decompress it and check it against its checksums."""
    started = time.monotonic()
    with ImageReader(image) as reader:
        header = reader.header
        zero = [0]

        def frames() -> Iterator[tuple[int, bytes]]:
            for i in range(reader.chunk_count):
                yield i, reader.frame(i)

        def check(item: tuple[int, bytes]) -> bool:
            index, frame = item
            return reader.decode(index, frame) is None

        def consume(was_zero: bool) -> None:
            zero[0] += was_zero

        counted = consume
        if progress:
            def counted(was_zero: bool) -> None:
                consume(was_zero)
                progress(header.chunk_size)
        run_ordered(frames(), check, counted, workers=workers)
    return VerifyResult(image=image, volume_size=header.volume_size, chunks=header.chunk_count,
                        zero_chunks=zero[0], seconds=time.monotonic() - started)


def info(image: str) -> dict:
    with ImageReader(image) as reader:
        return {"image": image, "file_size": reader.file_size, "header": reader.header.to_dict(),
                "totals": reader.trailer.totals,
                "ratio": round(reader.header.volume_size / reader.file_size, 3)}

