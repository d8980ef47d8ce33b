"""imager backup: image volumes, each at one point in time, to files, standard output or tape."""

from __future__ import annotations

import argparse
import os
import sys

from devices.errors import DeviceError

from ..defaults import (DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL, DEFAULT_MAX_FREEZE, DEFAULT_MAX_FREEZE_READ,
                        DEFAULT_TAPE_BLOCK_SIZE, SNAPSHOT_PROVIDERS)
from ..errors import ImagerError, UsageError
from ..units import check_block_size, human_bytes, positive_float, positive_size, worker_count, zstd_level
from .output import Output


def chunk_size(text: str) -> int:
    """A chunk size as the command line gives it, checked before anything is read (a device's
    own sector size is checked against it later)."""
    from ..format import MAX_CHUNK_SIZE
    value = positive_size(text)
    problem = check_block_size(value, 512, "chunk size", MAX_CHUNK_SIZE)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def register(sub, parents) -> None:
    b = sub.add_parser("backup", parents=[parents.common, parents.progress, parents.catalog, parents.tape],
                       help="image a block device or file")
    b.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="block device or file to image; with --snapshot cow, attached volumes")
    b.add_argument("--snapshot", choices=SNAPSHOT_PROVIDERS, default="none",
                   help="cow: snapshot attached volumes in one freeze window and image the snapshots; "
                        "freeze: keep the filesystems frozen while reading; none: read as is (default)")
    b.add_argument("--pre-freeze", action="append", default=[], metavar="CMD",
                   help="run before freezing (e.g. flush a database); repeatable")
    b.add_argument("--post-thaw", action="append", default=[], metavar="CMD", help="run after thawing; repeatable")
    b.add_argument("--max-freeze", type=positive_float, metavar="SECONDS",
                   help="thaw the filesystems after this long whatever happens, and fail the backup "
                        f"(default {DEFAULT_MAX_FREEZE:g} s for cow, {DEFAULT_MAX_FREEZE_READ:g} s for freeze)")
    b.add_argument("-o", "--output", help="image file to write (.zst); a directory for several volumes; "
                   "- for standard output; a template with {name}, {host}, {date:%%Y%%m%%d-%%H%%M}")
    b.add_argument("--label", help="with --tape: refuse a tape with another label")
    b.add_argument("--min-rate", type=float, metavar="MB/s",
                   help="with --tape: warn while the compressed stream reaches the drive slower than this "
                        "(default: the LTO generation's slowest speed-matching rate, from the drive's density "
                        "code; 0: never)")
    b.add_argument("--spool", metavar="DIR",
                   help="with --tape: make each image in DIR first (an unnamed file, gone afterwards), then "
                        "stream it to the drive at the disk's speed, so that a slow compression never makes "
                        "the tape stop and reposition (DIR needs room for one image)")
    b.add_argument("--drive-compression", action="store_true",
                   help="keep the tape drive's compression on (off by default: the stream is compressed)")
    b.add_argument("--level", type=zstd_level, default=DEFAULT_LEVEL, help=f"zstd level (default {DEFAULT_LEVEL})")
    b.add_argument("--chunk-size", type=chunk_size, default=DEFAULT_CHUNK_SIZE,
                   help=f"bytes of volume per zstd frame (default {DEFAULT_CHUNK_SIZE >> 20}M)")
    b.add_argument("--workers", type=worker_count, default=None, help="compression threads (default: all cores)")
    b.add_argument("-f", "--force", action="store_true",
                   help="replace an existing image; image a source that is itself an image or tape")
    b.add_argument("--all-blocks", action="store_true",
                   help="read and compress every block, not only those the filesystem uses")
    b.add_argument("--exclude", action="append", default=[], metavar="PATH",
                   help="leave out the data blocks of this file (on a mounted filesystem); repeatable")
    b.add_argument("-i", "--incremental", action="store_true",
                   help="only the blocks that changed since the volume's newest image in the catalog "
                        "(or --parent); a full image when there is none")
    b.add_argument("--parent", metavar="IMAGE", help="with --incremental: the parent, an image file or catalog id")
    b.add_argument("--compare-digests", action="store_true",
                   help="with --incremental: find the changes by reading and comparing block digests even "
                        "where a change tracker has them (the certain way)")
    b.set_defaults(func=run)


def run(args, out: Output) -> int:
    from .. import jobs
    from ..catalog import Catalog
    from .tape_actions import tape_spec

    dest = jobs.Destination(output=args.output, tape=tape_spec(args) if args.tape else None, force=args.force,
                            block_size=args.block_size or DEFAULT_TAPE_BLOCK_SIZE, expect_label=args.label,
                            drive_compression=args.drive_compression,
                            min_rate=args.min_rate * 1e6 if args.min_rate is not None else None,
                            spool=args.spool)
    if args.output == "-" and sys.stdout.isatty():
        # Said before a progress bar is drawn (the stream sink refuses it too).
        raise UsageError("refusing to write an image to a terminal on standard output: redirect it "
                         "(-o - | ssh host 'cat > vol.zst', or > vol.zst)")
    if args.spool and not args.tape:
        raise UsageError("--spool is for a backup to tape (--tape): an image file is written as it is made")
    options = jobs.ImagingOptions(level=args.level, chunk_size=args.chunk_size, workers=args.workers,
                                  all_blocks=args.all_blocks, excludes=tuple(os.path.abspath(p) for p in args.exclude),
                                  backups_as_sources=args.force, max_freeze=args.max_freeze,
                                  incremental=args.incremental, parent=args.parent,
                                  compare_digests=args.compare_digests)
    if (args.parent or args.compare_digests) and not args.incremental:
        raise UsageError(f"{'--parent' if args.parent else '--compare-digests'} is about an incremental: "
                         f"give --incremental too")
    with out.progress(_source_sizes(args.sources, args.snapshot), "backup") as progress:
        with Catalog(args.catalog) as catalog:
            results = jobs.backup_volumes(args.sources, dest, snapshot=args.snapshot, options=options,
                                          pre_freeze=args.pre_freeze, post_thaw=args.post_thaw,
                                          progress=progress, on_notice=out.notice, catalog=catalog)
    lines = []
    for r in results:
        volume = r.header.chain.get("volume")
        snapshot = (r.header.snapshot or {}).get("provider") == "cow"
        what = f"volume {volume} (its snapshot {r.source})" if volume and snapshot else r.source
        lines.append(f"imaged {what} ({human_bytes(r.volume_size)}) to {_where(r)}, image id {r.image_id}")
        if r.kind == "incremental":
            # The tracker names the changed blocks; digests are compared for every block read.
            found = (f"{r.changed_blocks} blocks changed (the tracker named {r.compared_blocks})" if r.method == "tracker"
                     else f"{r.changed_blocks} of {r.compared_blocks} blocks compared changed")
            lines += [f"  incremental on {r.parent_id}, changes found by {r.method} ({r.reason})",
                      f"  {found}, {human_bytes(r.bytes_read)} read, {human_bytes(r.bytes_written)} written, "
                      f"{r.seconds:.2f} s"]
        else:
            if args.incremental:
                lines.append(f"  a full image, not an incremental: {r.reason}" if r.reason else
                             "  a full image, not an incremental (the note above says why)")
            lines.append(f"  {human_bytes(r.bytes_read)} read, {human_bytes(r.bytes_written)} written, "
                         f"ratio {r.ratio:.2f}, {r.zero_chunks} of {r.chunks} chunks zero, {r.seconds:.2f} s, "
                         f"{r.mb_per_second:.0f} MB/s")
    if results and results[0].freeze_window_ms is not None:
        lines.append(f"snapshot ({args.snapshot}): filesystems frozen for {results[0].freeze_window_ms:.1f} ms")
    out.result({"images": [r.to_dict() for r in results]}, lines)
    return 0


def _where(result) -> str:
    on_tape = [s for s in result.segments if s["kind"] == "tape"]
    if not on_tape:
        return result.image
    return f"{result.image} (" + ", ".join(f"{s['tape_label']} file {s['tape_file']}" for s in on_tape) + ")"


def _source_sizes(sources: list[str], provider: str) -> int:
    """The bytes the progress bar counts to (0 when unknown: the bar still shows throughput)."""
    from devices.block import size_of

    from ..snapshot.provider import resolve_volumes

    if provider == "cow":
        try:
            return sum(v.size for v in resolve_volumes(sources))
        except ImagerError:
            return 0
    total = 0
    for path in sources:
        try:
            total += size_of(path)
        except DeviceError:
            pass
    return total
