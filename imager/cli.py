"""`imager ...`: a thin command-line layer over imager.jobs and devices."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from contextlib import contextmanager
from dataclasses import asdict
from typing import Callable, Iterator

from devices.errors import DeviceError

from . import __version__
from .catalog import Catalog, TapeRecord, record_dict
from .errors import ImagerError, UsageError
from .freeze import DEFAULT_MAX_FREEZE, DEFAULT_MAX_FREEZE_READ
from .units import count, human_bytes, parse_size, positive_float, positive_size, worker_count
from .tape import (DEFAULT_BLOCK_SIZE, TapeSpec, drive_status, operator_prompt, require_label, tape_is_blank,
                   write_label)

class Output:
    """Where a command's progress, notices and results go, by --json / --quiet / tty."""

    def __init__(self, args: argparse.Namespace):
        self.json = getattr(args, "json", False)
        self.quiet = getattr(args, "quiet", False)
        self.verbose = getattr(args, "verbose", False)
        # With `-o -` standard output carries the image: the summary goes to stderr.
        self.summary_stream = sys.stderr if getattr(args, "output", None) == "-" else sys.stdout

    def notice(self, message: str) -> None:
        if not self.quiet:
            print(f"imager: {message}", file=sys.stderr)

    def verbose_notice(self, message: str) -> None:
        if self.verbose:
            self.notice(message)

    @contextmanager
    def progress(self, total: int, label: str) -> Iterator[Callable[[int], None] | None]:
        if self.quiet or self.json or not sys.stdout.isatty():
            yield None
            return
        from tqdm import tqdm

        # A terminal that reports no size (a bare pty) still gets a bar: tqdm hides bars that
        # do not fit in zero rows.
        size = shutil.get_terminal_size((100, 24))
        with tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                  file=sys.stderr, ncols=size.columns, nrows=size.lines, smoothing=0.1) as bar:
            yield bar.update

    def result(self, data: dict, lines: list[str]) -> None:
        if self.json:
            print(json.dumps(data, indent=2, sort_keys=True), file=self.summary_stream)
        elif not self.quiet:
            print("\n".join(lines), file=self.summary_stream)


def _volume_size_of(path: str) -> int:
    from devices.block import BlockDevice

    try:
        with BlockDevice(path, direct=False) as dev:
            return dev.size
    except DeviceError:
        return 0


def _source_sizes(sources: list[str], provider: str) -> int:
    from . import jobs

    if provider == "cow":
        try:
            return sum(v.size for v in jobs.resolve_volumes(sources))
        except ImagerError:
            return 0
    return sum(_volume_size_of(s) for s in sources)


def cmd_backup(args, out: Output) -> int:
    from . import jobs

    dest = jobs.Destination(output=args.output, tape=tape_spec(args) if args.tape else None, force=args.force,
                            block_size=args.block_size or DEFAULT_BLOCK_SIZE, expect_label=args.label,
                            drive_compression=args.drive_compression)
    options = jobs.ImagingOptions(level=args.level, chunk_size=args.chunk_size, workers=args.workers,
                                  all_blocks=args.all_blocks, excludes=tuple(os.path.abspath(p) for p in args.exclude),
                                  backups_as_sources=args.force, max_freeze=args.max_freeze)
    with out.progress(_source_sizes(args.sources, args.snapshot), "backup") as progress:
        with Catalog(args.catalog) as catalog:
            results = jobs.backup_volumes(args.sources, dest, snapshot=args.snapshot, options=options,
                                          pre_freeze=args.pre_freeze, post_thaw=args.post_thaw,
                                          progress=progress, on_notice=out.notice, catalog=catalog)
    lines = []
    for r in results:
        lines += [f"imaged {r.source} ({human_bytes(r.volume_size)}) to {r.image}, image id {r.image_id}",
                  f"  {human_bytes(r.bytes_read)} read, {human_bytes(r.bytes_written)} written, ratio {r.ratio:.2f}, "
                  f"{r.zero_chunks} of {r.chunks} chunks zero, {r.seconds:.2f} s, {r.mb_per_second:.0f} MB/s"]
    if results and results[0].freeze_window_ms is not None:
        lines.append(f"snapshot ({args.snapshot}): filesystems frozen for {results[0].freeze_window_ms:.1f} ms")
    data = results[0].to_dict() if len(results) == 1 else {"images": [r.to_dict() for r in results]}
    out.result(data, lines)
    return 0


def cmd_restore(args, out: Output) -> int:
    from . import jobs
    from .stream import ImageReader

    if args.tape:
        if len(args.paths) != 1:
            raise UsageError("with --tape, give only the TARGET (the image is chosen with --image)")
        target = args.paths[0]
        with Catalog(args.catalog) as catalog:
            feed = jobs.open_tape_image(tape_spec(args), args.image, catalog=catalog, block_size=args.block_size)
            try:
                with out.progress(feed.header.volume_size, "restore") as progress:
                    r = jobs.restore_feed(feed, target, force=args.force, verify=args.verify,
                                          workers=args.workers, progress=progress)
            finally:
                feed.close()
    elif len(args.paths) != 2:
        raise UsageError("give IMAGE and TARGET (or --tape T --image ID TARGET)")
    elif args.paths[0] == "-":
        target = args.paths[1]
        feed = _stdin_feed()
        with out.progress(feed.header.volume_size, "restore") as progress:
            r = jobs.restore_feed(feed, target, force=args.force, verify=args.verify, workers=args.workers,
                                  progress=progress)
    else:
        image, target = args.paths
        with ImageReader(image) as reader, out.progress(reader.header.volume_size, "restore") as progress:
            r = jobs.restore_feed(jobs.SeekableFeed(reader), target, force=args.force, verify=args.verify,
                                  workers=args.workers, progress=progress)
    out.result(r.to_dict(), [
        f"restored {r.image} to {target} ({human_bytes(r.volume_size)})"
        + (", verified" if r.verified else ""),
        f"  {r.zero_chunks} of {r.chunks} chunks zero, {r.seconds:.2f} s, {r.mb_per_second:.0f} MB/s",
    ])
    return 0


def cmd_verify(args, out: Output) -> int:
    from . import jobs
    from .stream import ImageReader

    if args.tape:
        with Catalog(args.catalog) as catalog:
            results = jobs.verify_tape(tape_spec(args), args.image, catalog=catalog, block_size=args.block_size,
                                       workers=args.workers)
    elif args.image_file == "-":
        feed = _stdin_feed()
        with out.progress(feed.header.volume_size, "verify") as progress:
            results = [jobs.verify_feed(feed, workers=args.workers, progress=progress)]
    elif args.image_file:
        with ImageReader(args.image_file) as reader, out.progress(reader.header.volume_size, "verify") as progress:
            results = [jobs.verify_feed(jobs.SeekableFeed(reader), workers=args.workers, progress=progress)]
    else:
        raise UsageError("give an IMAGE file or --tape T")
    ok = all(r.ok for r in results)
    out.result({"images": [r.to_dict() for r in results], "ok": ok},
               [f"{r.image}: ok, {r.chunks} chunks ({r.zero_chunks} zero), "
                f"{human_bytes(r.volume_size)} volume, {r.seconds:.2f} s" if r.ok
                else f"{r.image}: FAILED: {'; '.join(r.errors)}" for r in results])
    if not ok:
        print(f"imager: error: {sum(not r.ok for r in results)} of {len(results)} images failed verification",
              file=sys.stderr)
        return 1
    return 0


def _stdin_feed():
    from . import jobs

    if sys.stdin.isatty():
        raise UsageError("refusing to read an image from a terminal: pipe one in (zstdcat is not needed: "
                         "ssh host cat vol.zst | imager restore - TARGET)")
    return jobs.StreamFeed(sys.stdin.buffer, "standard input")


def cmd_info(args, out: Output) -> int:
    from . import jobs

    d = jobs.info_feed(_stdin_feed()) if args.image == "-" else jobs.info(args.image)
    h, t = d["header"], d["totals"]
    src = h.get("source", {})
    out.result(d, [
        f"image:       {args.image}",
        f"volume:      {human_bytes(h['volume_size'])} ({h['volume_size']} bytes), sector {h['sector_size']}",
        f"source:      {src.get('path', '?')}"
        + (f" ({src.get('fs_type')}" + (f", label {src['label']}" if src.get('label') else "") + ")"
           if src.get("fs_type") else ""),
        f"snapshot:    {h.get('snapshot', {}).get('provider', '?')} at {h.get('snapshot', {}).get('time', '?')}",
        f"plan:        {h.get('plan', {}).get('mode', '?')}"
        + (f" ({human_bytes(h['plan']['used_bytes'])} used)" if h.get("plan", {}).get("used_bytes") is not None else "")
        + (f", reason: {h['plan']['reason']}" if h.get("plan", {}).get("reason") else "")
        + (f", excluded: {', '.join(h['plan']['excludes'])}" if h.get("plan", {}).get("excludes") else ""),
        f"chunks:      {h['chunk_count']} of {human_bytes(h['chunk_size'])}, {t.get('zero_chunks', '?')} zero, level {h['level']}",
        f"size:        {human_bytes(d['file_size'])}, ratio {d['ratio']:.2f}",
        f"created:     {h.get('created')} by {h.get('tool')}",
        f"complete:    {'yes' if t.get('complete') else 'no'}",
    ] + _partition_lines(h.get("partitions")))
    return 0


def tape_spec(args) -> TapeSpec:
    if not args.tape:
        raise UsageError("give the tape with --tape /dev/nstN or --tape FILE.tap")
    return TapeSpec(args.tape, capacity=args.tape_capacity, changer=getattr(args, "changer", None),
                    prompt=operator_prompt)


def _open_tape(args, *, create: bool = False):
    return tape_spec(args).open(1, create=create)


def cmd_tape_status(args, out: Output) -> int:
    with _open_tape(args) as drive:
        if args.label:
            out.notice(f"{args.tape}: rewinding to read the label")
        st, label = drive_status(drive, with_label=args.label)
        blank = tape_is_blank(drive, may_move=args.label) if label is None else False
    flags = [name for name in ("bot", "eof", "eot", "eod", "write_protected", "online") if getattr(st, name)]
    data = {"tape": args.tape, "status": {k: v for k, v in st.__dict__.items()},
            "label": label.__dict__ if label else None, "blank": blank}
    if label:
        label_line = f"label: {label.label} (cartridge {label.sequence} of set {label.tape_set[:12]})"
    elif blank:
        label_line = f"label: none, the tape is blank (label it with: imager tape label NAME --tape {args.tape})"
    elif args.label:
        label_line = "label: none; the tape holds data that is not an imager label"
    else:
        label_line = "label: not read (--label rewinds to read it)"
    out.result(data, [f"{args.tape}: file {st.file_number}, block {st.block_number}, "
                      f"block size {st.block_size or 'variable'}, {' '.join(flags) or 'no flags'}"
                      + (", blank tape (nothing recorded)" if blank else ""), label_line])
    return 0


def cmd_tape_move(args, out: Output) -> int:
    with _open_tape(args) as drive:
        {"rewind": lambda: drive.rewind(), "eom": lambda: drive.seek_end_of_data(),
         "fsf": lambda: drive.forward_space_files(args.count), "bsf": lambda: drive.backward_space_files(args.count),
         "unload": lambda: drive.unload()}[args.tape_command]()
        st = None if args.tape_command == "unload" else drive.status()
    out.result({"tape": args.tape, "file_number": st.file_number if st else None},
               [f"{args.tape}: {args.tape_command} done" + (f", at file {st.file_number}" if st else "")])
    return 0


def cmd_tape_label(args, out: Output) -> int:
    with _open_tape(args, create=True) as drive:
        label = write_label(drive, args.name, force=args.force, block_size=args.block_size or DEFAULT_BLOCK_SIZE)
    with Catalog(args.catalog) as catalog:
        catalog.forget_tape(label.label)
        catalog.add_tape(TapeRecord(label.label, label.tape_set, label.sequence, label.created))
    out.result(label.__dict__, [f"{args.tape}: labelled {label.label!r}"])
    return 0


def cmd_tape_list(args, out: Output) -> int:
    from . import jobs

    files = jobs.scan_tape(tape_spec(args))
    lines = []
    for f in files:
        if f.kind == "damaged":
            lines.append(f"{f.label} file {f.tape_file}: DAMAGED: {f.problem}")
            continue
        if f.kind != "image":
            lines.append(f"{f.label} file {f.tape_file}: not an imager image")
            continue
        img = f.image or {}
        if f.problem:
            state = f"DAMAGED: {f.problem}"
        elif f.incomplete:
            state = "INCOMPLETE (an interrupted write; the next backup to this cartridge replaces it)"
        else:
            state = "continues on the next cartridge" if f.continued else "complete"
        size = f"{human_bytes(f.stream_length)} on tape, " if f.stream_length is not None else ""
        lines.append(f"{f.label} file {f.tape_file}: image {f.image_id[:12]} segment {f.segment}, {size}{state}"
                     + (f", {img.get('source')} ({human_bytes(img.get('volume_size', 0))}) {img.get('created')}"
                        if img else ""))
    out.result({"tape": args.tape, "files": [f.to_dict() for f in files]}, lines or [f"{args.tape}: no images"])
    return 0


def cmd_tape_read(args, out: Output) -> int:
    with _open_tape(args) as drive:
        require_label(drive)
        drive.skip_to_file(args.file)
        sink = sys.stdout.buffer
        size = args.block_size or DEFAULT_BLOCK_SIZE
        for block in drive.read_file(size):
            sink.write(block)
        sink.flush()
    return 0


def cmd_tape_scan(args, out: Output) -> int:
    from . import jobs

    with Catalog(args.catalog) as catalog:
        files = jobs.scan_tape(tape_spec(args), catalog)
        images = {f.image_id for f in files if f.kind == "image" and f.image}
    out.result({"tape": args.tape, "images": sorted(images), "files": len(files)},
               [f"{args.tape}: {len(files)} tape files, {len(images)} images recorded in {catalog.path}"])
    return 0


def _partition_lines(table: dict | None) -> list[str]:
    if not table:
        return []
    lines = [f"partitions:  {table['scheme']} table, {len(table['partitions'])} partitions"]
    for p in table["partitions"]:
        lines.append(f"  {p['number']:>3}  start {p['start_byte']:>14}  size {human_bytes(p['size_bytes']):>10}  "
                     f"{p.get('type_name') or p['type_id']}" + ("  (EFI system)" if p.get("is_esp") else "")
                     + (f"  {p['name']}" if p.get("name") else ""))
    return lines


def _volume_line(v) -> str:
    if v.state != "running":
        return f"{v.name}\t{v.device} -> front {v.front}\t{human_bytes(v.size)}\t{v.state.upper()}: {v.problem}"
    snap = "no snapshot"
    if v.snapshot:
        s = v.snapshot
        snap = (f"snapshot {s.path} ({'INVALID: ' + s.invalid_reason if s.invalid else 'valid'}, "
                f"{human_bytes(s.cache_bytes_used)} cache used)")
    return f"{v.name}\t{v.device} -> front {v.front}\t{human_bytes(v.size)}\t{snap}"


def cmd_attach(args, out: Output) -> int:
    from . import front

    v = front.attach(args.device, name=args.name, cache_path=args.cache, cache_size=args.cache_size)
    out.result(_volume_dict(v), [v.front])
    out.notice(f"{args.device} is managed as {v.name!r}: mount and write {v.front}; "
               f"snapshot with: imager snapshot create {v.name}")
    return 0


def _volume_dict(v) -> dict:
    return asdict(v)


def cmd_recover(args, out: Output) -> int:
    from . import front
    from .fsck import check_filesystem

    v = front.recover(args.name, check=check_filesystem)
    out.result(_volume_dict(v), [f"recovered {v.name}: {v.device} -> front {v.front}", f"filesystem: {v.problem}"])
    out.notice(f"mount {v.front} again where it was (its device number may have changed)")
    return 0


def cmd_detach(args, out: Output) -> int:
    from . import front

    for name in args.names:
        front.detach(name)
    out.result({"detached": args.names}, [f"detached {n}" for n in args.names])
    return 0


def cmd_volumes(args, out: Output) -> int:
    from . import front

    volumes = front.list_volumes()
    out.result({"volumes": [_volume_dict(v) for v in volumes]},
               [_volume_line(v) for v in volumes] or ["no attached volumes"])
    return 0


def cmd_snapshot_create(args, out: Output) -> int:
    from . import front

    info = front.snapshot_create(args.names, args.pre_freeze, args.post_thaw, max_freeze=args.max_freeze)
    out.result(asdict(info), [f"{s.name}: snapshot at {s.path}" for s in info.snapshots]
               + [f"freeze window {info.freeze_window_ms:.1f} ms"
                  + (f" ({', '.join(info.frozen_mounts)})" if info.frozen_mounts else " (nothing mounted)")])
    return 0


def cmd_snapshot_list(args, out: Output) -> int:
    from . import front

    snaps = front.snapshot_list()
    out.result({"snapshots": [asdict(s) for s in snaps]},
               [f"{s.name}\t{s.path}\t{human_bytes(s.cache_bytes_used)} cache\t"
                + ("INVALID: " + s.invalid_reason if s.invalid else "valid") for s in snaps] or ["no snapshots"])
    return 0


def cmd_snapshot_delete(args, out: Output) -> int:
    from . import front

    front.snapshot_delete(args.names, force=args.force)
    out.result({"deleted": args.names}, [f"deleted the snapshot of {n}" for n in args.names])
    return 0


def cmd_loop_attach(args, out: Output) -> int:
    from devices import loop

    dev = loop.attach(args.file, offset=args.offset, size_limit=args.size_limit, read_only=args.read_only)
    out.result({"device": dev, "file": args.file}, [dev])
    return 0


def cmd_loop_detach(args, out: Output) -> int:
    from devices import loop

    for dev in args.devices:
        loop.detach(dev)
    out.result({"detached": args.devices}, [f"detached {d}" for d in args.devices])
    return 0


def cmd_loop_list(args, out: Output) -> int:
    from devices import loop

    rows = loop.list_attached()
    out.result({"loops": [r.__dict__ for r in rows]},
               [f"{r.device}\t{r.backing_file}" + (f"\toffset {r.offset}" if r.offset else "")
                + ("\tro" if r.read_only else "") for r in rows] or ["no loop devices attached"])
    return 0


def cmd_catalog_list(args, out: Output) -> int:
    with Catalog(args.catalog) as catalog:
        images = catalog.images()
        rows = []
        lines = []
        for img in images:
            segments = catalog.segments(img.id)
            rows.append({"image": record_dict(img), "segments": [record_dict(s) for s in segments]})
            where = "; ".join(s.path if s.kind == "file" else f"tape {s.tape_label} file {s.tape_file}"
                              for s in segments)
            lines.append(f"{img.id[:12]}  {img.created}  {img.source}  {human_bytes(img.volume_size)}  "
                         f"-> {human_bytes(img.stream_bytes)}  {where}")
    out.result({"catalog": str(catalog.path), "images": rows}, lines or [f"no images in {catalog.path}"])
    return 0


def cmd_devices(args, out: Output) -> int:
    from devices import discover

    disks = discover.list_block_devices(include_empty=args.all)
    tapes = discover.list_tape_drives()
    header = ("NAME", "SIZE", "SECTOR", "KIND", "FSTYPE", "LABEL", "UUID", "MOUNTPOINT", "PARTTYPE", "RO")
    rows = [header]
    for d in disks:
        part = d.partition_type or ""
        if d.is_esp:
            part = (part + " (EFI system)").strip()
        rows.append((d.name, human_bytes(d.size), f"{d.logical_sector_size}/{d.physical_sector_size}", d.kind,
                     d.fs_type or "", d.label or "", d.uuid or "", ",".join(d.mount_points), part,
                     "ro" if d.read_only else ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if tapes:
        lines += ["", "TAPE DRIVES"] + [f"{t.path}  {t.vendor or ''} {t.model or ''}  {t.serial or ''}".rstrip()
                                        for t in tapes]
    out.result({"block_devices": [d.to_dict() for d in disks], "tape_drives": [t.to_dict() for t in tapes]},
               lines)
    return 0


def cmd_demo(args, out: Output) -> int:
    from . import demo

    return demo.run(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imager", description="Point-in-time images of block devices in use.")
    p.add_argument("--version", action="version", version=f"imager {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    common.add_argument("-v", "--verbose", action="store_true", help="say more (e.g. buffered I/O fallback)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from .stream import DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL

    catalog_opt = argparse.ArgumentParser(add_help=False)
    catalog_opt.add_argument("--catalog", metavar="PATH",
                             help="catalog database (default: the user's data directory)")
    tape_opts = argparse.ArgumentParser(add_help=False)
    tape_opts.add_argument("--tape", metavar="T", help="/dev/nstN, a virtual tape file.tap, or a set "
                           "of virtual cartridges as a pattern like 'vault/tape-{n:03}.tap'")
    tape_opts.add_argument("--tape-capacity", type=positive_size, metavar="SIZE",
                           help="capacity of a virtual cartridge (default: unlimited)")
    tape_opts.add_argument("--block-size", type=positive_size, metavar="SIZE",
                           help=f"tape block size (default {DEFAULT_BLOCK_SIZE >> 10}K to write; "
                                f"to read, the size the image was written with)")
    tape_opts.add_argument("--changer", metavar="CMD", help="command that loads the next cartridge "
                           "($IMAGER_CARTRIDGE is its number); without it the operator is asked")

    b = sub.add_parser("backup", parents=[common, catalog_opt, tape_opts], help="image a block device or file")
    b.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="block device or file to image; with --snapshot cow, attached volumes")
    b.add_argument("--snapshot", choices=("none", "freeze", "cow"), default="none",
                   help="cow: snapshot attached volumes in one freeze window and image the snapshots; "
                        "freeze: keep the filesystems frozen while reading; none: read as is (default)")
    b.add_argument("--pre-freeze", action="append", default=[], metavar="CMD",
                   help="run before freezing (e.g. flush a database); repeatable")
    b.add_argument("--post-thaw", action="append", default=[], metavar="CMD", help="run after thawing; repeatable")
    b.add_argument("--max-freeze", type=positive_float, metavar="SECONDS",
                   help="thaw the filesystems after this long whatever happens, and fail the backup "
                        f"(default {DEFAULT_MAX_FREEZE:g} s for cow, {DEFAULT_MAX_FREEZE_READ:g} s for freeze)")
    b.add_argument("-o", "--output", help="image file to write (.zst); a directory for several volumes; "
                   "- for standard output")
    b.add_argument("--label", help="with --tape: refuse a tape with another label")
    b.add_argument("--drive-compression", action="store_true",
                   help="keep the tape drive's compression on (off by default: the stream is compressed)")
    b.add_argument("--level", type=int, default=DEFAULT_LEVEL, help=f"zstd level (default {DEFAULT_LEVEL})")
    b.add_argument("--chunk-size", type=positive_size, default=DEFAULT_CHUNK_SIZE,
                   help=f"bytes of volume per zstd frame (default {DEFAULT_CHUNK_SIZE >> 20}M)")
    b.add_argument("--workers", type=worker_count, default=None,
                   help="compression threads (default: all cores)")
    b.add_argument("-f", "--force", action="store_true",
                   help="replace an existing image; image a source that is itself an image or tape")
    b.add_argument("--all-blocks", action="store_true",
                   help="read and compress every block, not only those the filesystem uses")
    b.add_argument("--exclude", action="append", default=[], metavar="PATH",
                   help="leave out the data blocks of this file (on a mounted filesystem); repeatable")
    b.set_defaults(func=cmd_backup)

    r = sub.add_parser("restore", parents=[common, catalog_opt, tape_opts],
                       help="write an image back to a device or file",
                       usage="imager restore [options] IMAGE TARGET | --tape T [--image ID] TARGET")
    r.add_argument("paths", nargs="+", metavar="IMAGE TARGET",
                   help="image file (- for standard input) and target device or file")
    r.add_argument("--image", metavar="ID", help="with --tape: the image id (a prefix will do)")
    r.add_argument("--verify", action="store_true", help="re-read what was written and compare checksums")
    r.add_argument("--workers", type=worker_count, default=None, help="decompression threads (default: all cores)")
    r.add_argument("-f", "--force", action="store_true",
                   help="replace an existing target file; overwrite a device that holds a filesystem, "
                        "partition table or RAID/LVM member")
    r.set_defaults(func=cmd_restore)

    v = sub.add_parser("verify", parents=[common, catalog_opt, tape_opts], help="check every chunk of an image")
    v.add_argument("image_file", nargs="?", metavar="IMAGE", help="image file (- for standard input)")
    v.add_argument("--image", metavar="ID", help="with --tape: only this image (default: all on the tape)")
    v.add_argument("--workers", type=worker_count, default=None, help="decompression threads (default: all cores)")
    v.set_defaults(func=cmd_verify)

    i = sub.add_parser("info", parents=[common], help="show what an image holds")
    i.add_argument("image", help="image file (- for standard input)")
    i.set_defaults(func=cmd_info)

    lp = sub.add_parser("loop", help="attach and detach loop devices")
    lsub = lp.add_subparsers(dest="loop_command", required=True, metavar="ACTION")
    la = lsub.add_parser("attach", parents=[common], help="attach a file as /dev/loopN")
    la.add_argument("file")
    la.add_argument("--offset", type=parse_size, default=0)
    la.add_argument("--size-limit", type=parse_size, default=0)
    la.add_argument("--read-only", action="store_true")
    la.set_defaults(func=cmd_loop_attach)
    ld = lsub.add_parser("detach", parents=[common], help="detach loop devices")
    ld.add_argument("devices", nargs="+")
    ld.set_defaults(func=cmd_loop_detach)
    ll = lsub.add_parser("list", parents=[common], help="list attached loop devices")
    ll.set_defaults(func=cmd_loop_list)

    cp = sub.add_parser("catalog", help="the record of images and where they live")
    csub = cp.add_subparsers(dest="catalog_command", required=True, metavar="ACTION")
    cl = csub.add_parser("list", parents=[common, catalog_opt], help="list the images in the catalog")
    cl.set_defaults(func=cmd_catalog_list)

    tp = sub.add_parser("tape", help="tape drives and virtual tapes, in the spirit of mt")
    tsub = tp.add_subparsers(dest="tape_command", required=True, metavar="ACTION")

    def tape_cmd(name: str, help_text: str, func, *extra):
        c = tsub.add_parser(name, parents=[common, catalog_opt, tape_opts, *extra], help=help_text)
        c.set_defaults(func=func)
        return c

    ts = tape_cmd("status", "drive status (MTIOCGET), without moving the tape", cmd_tape_status)
    ts.add_argument("--label", action="store_true", help="also read the tape label (rewinds the tape)")
    tape_cmd("rewind", "rewind the tape", cmd_tape_move)
    tape_cmd("eom", "go to the end of recorded data", cmd_tape_move)
    tape_cmd("unload", "rewind and eject", cmd_tape_move)
    for name, text in (("fsf", "forward space N files"), ("bsf", "backward space N files")):
        tape_cmd(name, text, cmd_tape_move).add_argument("count", type=count)
    tl = tape_cmd("label", "write a volume label at the start of the tape", cmd_tape_label)
    tl.add_argument("name")
    tl.add_argument("-f", "--force", action="store_true", help="overwrite a labelled or used tape")
    tape_cmd("list", "the tape files and what each holds", cmd_tape_list)
    tr = tape_cmd("read", "write the bytes of tape file N to stdout", cmd_tape_read)
    tr.add_argument("--file", type=count, required=True, metavar="N")
    tape_cmd("scan", "rebuild the catalog entries of a tape from the media", cmd_tape_scan)

    at = sub.add_parser("attach", parents=[common], help="manage a device: serve it through a copy-on-write front")
    at.add_argument("device")
    at.add_argument("--name", help="volume name (default: from the device)")
    at.add_argument("--cache", metavar="PATH", help="state directory for the bitmap and cache region "
                    "(not on the device itself; default /var/lib/imager/NAME)")
    at.add_argument("--cache-size", type=positive_size, metavar="SIZE", help="cap on the snapshot cache region")
    at.set_defaults(func=cmd_attach)
    de = sub.add_parser("detach", parents=[common], help="stop managing volumes")
    de.add_argument("names", nargs="+", metavar="NAME")
    de.set_defaults(func=cmd_detach)
    vo = sub.add_parser("volumes", parents=[common], help="list managed volumes and their snapshots")
    vo.set_defaults(func=cmd_volumes)
    rc = sub.add_parser("recover", parents=[common],
                        help="bring back a volume whose daemon died: re-attach and check its filesystem")
    rc.add_argument("name", metavar="NAME")
    rc.set_defaults(func=cmd_recover)
    sp = sub.add_parser("snapshot", help="point-in-time snapshots of managed volumes")
    ssub = sp.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")
    sc = ssub.add_parser("create", parents=[common], help="snapshot volumes in one freeze window")
    sc.add_argument("names", nargs="+", metavar="NAME")
    sc.add_argument("--pre-freeze", action="append", default=[], metavar="CMD")
    sc.add_argument("--post-thaw", action="append", default=[], metavar="CMD")
    sc.add_argument("--max-freeze", type=positive_float, default=DEFAULT_MAX_FREEZE, metavar="SECONDS",
                    help=f"thaw after this long whatever happens, and fail (default {DEFAULT_MAX_FREEZE:g} s)")
    sc.set_defaults(func=cmd_snapshot_create)
    sl = ssub.add_parser("list", parents=[common], help="list snapshots")
    sl.set_defaults(func=cmd_snapshot_list)
    sd = ssub.add_parser("delete", parents=[common], help="delete snapshots")
    sd.add_argument("names", nargs="+", metavar="NAME")
    sd.add_argument("--force", action="store_true", help="even while the snapshot file is open")
    sd.set_defaults(func=cmd_snapshot_delete)

    dv = sub.add_parser("devices", parents=[common], help="list block devices and tape drives")
    dv.add_argument("-a", "--all", action="store_true", help="include empty loop devices and ram disks")
    dv.set_defaults(func=cmd_devices)

    d = sub.add_parser("demo", parents=[common], help="image a sample loop volume end to end")
    d.set_defaults(func=cmd_demo)
    return p


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Output(args)
    # SIGTERM unwinds like Ctrl-C, so every job's cleanup (temporary files, snapshots) runs.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        code = args.func(args, out)
        sys.stdout.flush()
        return code
    except UsageError as e:
        print(f"imager: error: {e}", file=sys.stderr)
        return 2
    except (ImagerError, DeviceError) as e:
        print(f"imager: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("imager: interrupted; image files are only ever renamed into place when complete, but a "
              "restore onto a device or a tape file being written is left partial", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    except OSError as e:
        # Writing a summary to a full or closed stdout (> /dev/full): say so in one line.
        _quiet_stdout()
        print(f"imager: error: {e.strerror or e}", file=sys.stderr)
        return 1


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's flush at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
