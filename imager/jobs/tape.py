"""Tape jobs: what the cartridges of a tape hold (scan, rebuilding the catalog from the media),
finding an image on tape, and restoring or verifying it from there."""

from __future__ import annotations

import os
import time
from typing import Iterable, Iterator

import numpy as np

from devices.tape.drive import TapeDrive
from devices.topology import writes_to

from ..catalog import Catalog, ImageRecord, SegmentRecord, TapeRecord
from ..ends.feeds import StreamFeed
from ..ends.sinks import FileSink
from ..ends.target import RestoreTarget
from ..errors import ImageFormatError, ImagerError, TapeMediaError, UsageError
from ..format import DEFAULT_CHUNK_SIZE, DIGEST_SIZE, ImageHeader, ImageTrailer
from ..pipeline import decode_feed, worker_count
from ..progress import start_phase
from ..tape import (Label, TapeFileInfo, TapeImageStream, TapeSpec, WrittenSegment, read_label, require_label,
                    scan_files, segment_header)
from .info import info as image_info
from .restore import compare_with_digests, restore_feed
from .results import ImageInfo, RestoreResult, VerifyResult
from .verify import verify_feed

def tape_segment_records(image_id: str, segments: Iterable[WrittenSegment]) -> list[SegmentRecord]:
    return [SegmentRecord(image_id, i, "tape", None, seg.label, seg.tape_set, seg.tape_file,
                          seg.stream_offset, seg.stream_length) for i, seg in enumerate(segments)]


def record_labels(catalog: Catalog | None, labels: Iterable[Label]) -> None:
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


def _every_cartridge(spec: TapeSpec) -> Iterator[TapeDrive]:
    """The cartridge in the drive, every cartridge of a virtual set, or with a SCSI changer
    every cartridge of the library, each open in turn."""
    if spec.library is not None:
        yield from spec.library.each_cartridge(spec.open_if_loaded())
        return
    for sequence in _cartridge_sequences(spec):
        with spec.open(sequence, create=False) as drive:
            yield drive


def scan_tape(spec: TapeSpec, catalog: Catalog | None = None) -> list[TapeFileInfo]:
    """Read what every cartridge of `spec` holds from the media alone; with a catalog, replace
    what it says of these cartridges by what was found."""
    found: list[TapeFileInfo] = []
    segments: dict[str, list[SegmentRecord]] = {}
    records: dict[str, dict] = {}
    labels = []
    for drive in _every_cartridge(spec):
        label = read_label(drive) if spec.library is not None else require_label(drive)
        if label is None:
            continue        # a blank or foreign cartridge of the library
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
        record_labels(catalog, labels)
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
    drive = spec.open_labelled(label_name) if spec.is_real_drive else spec.open(sequence, create=False)
    try:
        label = require_label(drive, label_name)
        stream = TapeImageStream(spec, drive, label, tape_file, full_id, block_size)
        return StreamFeed(stream, f"{spec.spec} file {tape_file} (image {full_id[:12]})")
    except BaseException:
        drive.close()
        raise


def _refuse_writing_the_tape(spec: TapeSpec, target: str) -> None:
    """A restore onto a virtual tape's file (or a loop device on it) would overwrite the images
    it reads. A set's cartridges are checked while they are numbered without a gap."""
    sequence = 1
    while os.path.exists(spec.path_for(sequence)):
        if writes_to(target, spec.path_for(sequence)):
            raise UsageError(f"{target}: writing it would write over the virtual tape {spec.path_for(sequence)} "
                             f"being read (it is that file, or a loop device on it); give another target")
        if not spec.is_pattern:
            break
        sequence += 1


def restore_from_tape(spec: TapeSpec, image_id: str | None, target: str, *, catalog: Catalog | None = None,
                      block_size: int | None = None, **kw) -> RestoreResult:
    """Restore one image from tape; an incremental as the volume at its point, from its chain."""
    if not spec.is_real_drive:
        _refuse_writing_the_tape(spec, target)
    chain = _chain_on_tape(image_id, catalog)
    if chain is not None:
        return restore_chain_from_tape(spec, chain, target, catalog=catalog, block_size=block_size, **kw)
    feed = open_tape_image(spec, image_id, catalog=catalog, block_size=block_size)
    try:
        if feed.header.incremental:
            raise UsageError(f"{feed.name} is an incremental image and the catalog does not know its chain: "
                             f"run imager tape scan on the cartridges of the chain, then restore again")
        return restore_feed(feed, target, **kw)
    finally:
        feed.close()


def _chain_on_tape(image_id: str | None, catalog: Catalog | None) -> list[ImageRecord] | None:
    """The catalog records of an incremental's chain, newest first (None: not an incremental
    the catalog knows)."""
    if catalog is None or not image_id:
        return None
    try:
        record = catalog.image(image_id)
    except UsageError:
        return None
    if record.kind != "incremental":
        return None
    chain = [record]
    while chain[-1].kind == "incremental":
        parent_id = chain[-1].parent_id
        try:
            chain.append(catalog.image(parent_id or "?"))
        except UsageError:
            raise UsageError(f"the parent {str(parent_id)[:12]} of image {chain[-1].id[:12]} is not in the catalog "
                             f"(pruned, or on a cartridge not scanned): the chain cannot be restored") from None
    return chain


def restore_chain_from_tape(spec: TapeSpec, chain: list[ImageRecord], target: str, *, catalog: Catalog | None,
                            block_size: int | None = None, force: bool = False, verify: bool = False,
                            workers: int | None = None, progress=None) -> RestoreResult:
    """The volume at an incremental's point, from its chain on tape: each tape file read once,
    newest first, each block written once (the newest image that holds it wins) and checked
    against the chain point's digest of it."""
    workers = worker_count(workers)
    started = time.monotonic()
    restore = _ChainRestore(chain[0], target, force, progress)
    try:
        for position, record in enumerate(chain):
            feed = _open_located(spec, *_locate_on_tape(spec, record.id, catalog), block_size)
            try:
                restore.tape_file(feed, record, newest=position == 0, workers=workers)
            finally:
                feed.close()
        restore.finish()
    except ImageFormatError as e:
        if restore.target is not None:
            raise restore.target.failed(e) from None
        raise
    except BaseException:
        if restore.target is not None:
            restore.target.abort()
        raise
    assert restore.target is not None and restore.done is not None and restore.point_trailer is not None
    restore.target.close()
    volume_size, volume_block_size = restore.geometry
    if verify:
        compare_with_digests(target, volume_size, DEFAULT_CHUNK_SIZE, volume_block_size,
                             restore.point_trailer.digests, workers=workers, progress=progress)
    return RestoreResult(image=spec.spec, target=target, volume_size=volume_size,
                         chunks=int(restore.done.size), zero_chunks=0, bytes_written=restore.bytes_written,
                         seconds=time.monotonic() - started, verified=verify, chain=[r.id for r in chain])


class _ChainRestore:
    """One chain restored from tape, newest image first: the target, which of its blocks are
    written already (each is written once, from the newest image that holds it) and the chain
    point's digests that every block written after the point's own image is checked against."""

    def __init__(self, point: ImageRecord, target: str, force: bool, progress):
        self.point = point
        self.target_path = target
        self.force = force
        self.progress = progress
        self.target: RestoreTarget | None = None     # opened at the point's header: it gives the size
        self.done: np.ndarray | None = None
        self.point_trailer: ImageTrailer | None = None  # its digests check every older image's blocks
        self.geometry: tuple[int, int] = (0, 0)      # the point's volume and block size
        self.bytes_written = 0
        self.parent_link: dict = {}                  # what the image just read says of its parent

    def tape_file(self, feed: StreamFeed, record: ImageRecord, *, newest: bool, workers: int) -> None:
        """Restore what one image of the chain adds, checking it is the image the catalog and the
        newer image say it is."""
        header = feed.header
        if header.image_id != record.id:
            raise ImageFormatError(f"{feed.name} holds image {header.image_id[:12]}, not {record.id[:12]}")
        if not newest and header.image_id != self.parent_link.get("id"):
            raise ImageFormatError(f"{feed.name}: image {header.image_id[:12]} is not the parent "
                                   f"{str(self.parent_link.get('id'))[:12]} of the image before it in the chain")
        if self.target is None:
            self.target = RestoreTarget(self.target_path, header.volume_size, self.force, direct=True)
            self.done = np.zeros(header.block_count, dtype=bool)
            self.geometry = (header.volume_size, header.block_size)
        if (header.volume_size, header.block_size) != self.geometry:
            raise ImageFormatError(f"{feed.name}: image {header.image_id[:12]} is of another volume geometry")
        # A phase per tape file; the last (the full) writes what no incremental held.
        start_phase(self.progress, f"read {header.kind} {header.image_id[:12]}",
                    int((~self.done).sum()) * header.block_size if not header.incremental else 0)
        digests: list[tuple[int, bytes]] = []
        decode_feed(feed, lambda index, data, digest: self.chunk(header, index, data, digest, digests),
                    workers=workers)
        trailer = feed.finish()
        trailer.check_chunk_digests(digests)
        if not newest and trailer.totals.get("image_digest") != self.parent_link.get("digest"):
            raise ImageFormatError(f"{feed.name}: image {header.image_id[:12]} is not the one its child was "
                                   f"taken against (its digest differs)")
        if self.point_trailer is None:
            self.point_trailer = trailer
        self.parent_link = header.chain.get("parent") or {}

    def chunk(self, header: ImageHeader, index: int, data: memoryview | None, digest: bytes,
              digests: list[tuple[int, bytes]]) -> None:
        """Write the blocks of one decoded chunk that no newer image held."""
        assert self.target is not None and self.done is not None
        digests.append((index, digest))
        per = header.chunk_blocks
        first = index * per
        length = header.chunk_length(index)
        wanted = ~self.done[first:first + per]
        if not wanted.any():
            return
        if self.point_trailer is not None:
            self._check_against_point(header, first, wanted, digest)
        if wanted.all():
            self.target.write_chunk(index * header.chunk_size, data, length)
            written = length
        else:
            written = 0
            for offset in np.flatnonzero(wanted).tolist():
                start = offset * header.block_size
                size = min(header.block_size, length - start)
                piece = None if data is None else data[start:start + size]
                self.target.write_chunk(index * header.chunk_size + start, piece, size)
                written += size
        self.done[first:first + per] |= wanted
        self.bytes_written += written
        if self.progress:
            self.progress(written)

    def _check_against_point(self, header: ImageHeader, first: int, wanted: np.ndarray, digest: bytes) -> None:
        assert self.point_trailer is not None
        expected = self.point_trailer.digests
        for offset in np.flatnonzero(wanted).tolist():
            block = first + offset
            mine = digest[offset * DIGEST_SIZE:(offset + 1) * DIGEST_SIZE]
            if mine != expected[block * DIGEST_SIZE:(block + 1) * DIGEST_SIZE]:
                raise ImageFormatError(
                    f"the chain of image {self.point.id[:12]} is inconsistent: block {block} in image "
                    f"{header.image_id[:12]} differs from the chain point's digest of it")

    def finish(self) -> None:
        """Every block of the volume must have come from some image of the chain."""
        assert self.done is not None and self.target is not None
        if not self.done.all():
            raise ImageFormatError(f"the chain of image {self.point.id[:12]} leaves block "
                                   f"{int(np.flatnonzero(~self.done)[0])} unwritten")
        self.target.finish()


def verify_tape(spec: TapeSpec, image_id: str | None = None, *, catalog: Catalog | None = None,
                block_size: int | None = None, **kw) -> list[VerifyResult]:
    """Read back and check one image, or every image whose first segment is on the tape; a
    damaged or incomplete image, and a tape file whose segment header is damaged, is reported in
    its result and the others are still checked."""
    if image_id:
        return [_verify_on_tape(spec, *_locate_on_tape(spec, image_id, catalog), block_size, **kw)]
    results = []
    files = scan_tape(spec)
    for f in files:
        name = f"{spec.spec} {f.label} file {f.tape_file}"
        if f.kind == "damaged":
            results.append(_failed_verify(name, f.problem))
        elif f.incomplete and f.segment == 0:
            results.append(_failed_verify(name, "incomplete: an interrupted write left it without its end "
                                          "block (the next backup to this cartridge replaces it)", f.image_id))
        elif f.kind == "image" and f.segment == 0:
            try:
                results.append(_verify_on_tape(spec, f.image_id, f.label, f.tape_file, block_size, **kw))
            except ImagerError as e:
                results.append(_failed_verify(name, str(e), f.image_id))
    if not results:
        raise UsageError(_no_image_starts_here(spec, [f for f in files if f.kind == "image"], catalog))
    return results


def _no_image_starts_here(spec: TapeSpec, images: list[TapeFileInfo], catalog: Catalog | None) -> str:
    """Why verify --tape found nothing to verify: a cartridge that holds only the continuation of
    an image started on an earlier cartridge of its set says which one to load."""
    if not images:
        return f"{spec.spec}: the tape holds no image"
    f = images[0]
    first = None
    if catalog is not None and f.image_id:
        first = next((s.tape_label for s in _catalog_segments(catalog, f.image_id) if s.segment == 0), None)
    where = f"cartridge {first!r}" if first else "an earlier cartridge of its set"
    return (f"{spec.spec}: cartridge {f.label!r} holds segment {f.segment} of image {f.image_id[:12]}, which starts "
            f"on {where}: load that cartridge (the image is verified from its start, across the set)")


def _catalog_segments(catalog: Catalog, image_id: str) -> list[SegmentRecord]:
    try:
        return [s for s in catalog.segments(catalog.image(image_id).id) if s.kind == "tape"]
    except UsageError:
        return []


def _verify_on_tape(spec: TapeSpec, full_id: str, label_name: str, tape_file: int, block_size: int | None,
                    **kw) -> VerifyResult:
    feed = _open_located(spec, full_id, label_name, tape_file, block_size)
    try:
        return verify_feed(feed, **kw)
    finally:
        feed.close()


def _failed_verify(name: str, error: str, image_id: str | None = None) -> VerifyResult:
    return VerifyResult(image=name, volume_size=0, chunks=0, zero_chunks=0, seconds=0.0, ok=False, errors=[error],
                        image_id=image_id)


def open_tape_file(spec: TapeSpec, tape_file: int, block_size: int | None = None) -> TapeImageStream:
    """The image byte stream of the image that starts in tape file `tape_file` of the first
    cartridge of `spec` (continued on the next ones where it spans them): exactly the bytes of
    the image file that was written, without the tape's segment header and end block."""
    drive = spec.open(1, create=False)
    try:
        label = require_label(drive)
        header = segment_header(drive, tape_file, block_size)
        if header["segment"] != 0:
            raise UsageError(f"{spec.spec}: tape file {tape_file} holds segment {header['segment']} of image "
                             f"{header['image_id'][:12]}, which starts on an earlier cartridge; read it from there")
        return TapeImageStream(spec, drive, label, tape_file, header["image_id"], block_size)
    except BaseException:
        drive.close()
        raise


def read_tape_image(spec: TapeSpec, tape_file: int, output: str, *, force: bool = False,
                    block_size: int | None = None) -> ImageInfo:
    """Write the image that starts in tape file `tape_file` to the image file `output`, seek
    table included (open_tape_file), so that mount, info, verify and restore take it like any
    image file. It appears under its name only when whole."""
    stream = open_tape_file(spec, tape_file, block_size)
    try:
        sink = FileSink(output, force=force)
        try:
            while piece := stream.read(1 << 20):
                sink.write(piece)
            if stream.end is None:
                raise TapeMediaError(f"{spec.spec}: tape file {tape_file} ends before its image does")
            sink.commit()
        except BaseException:
            sink.abort()
            raise
    finally:
        stream.close()
    return image_info(output)
