"""imager restore: write an image back to a block device or a file."""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..units import human_bytes, image_id_prefix, worker_count
from .output import Output

if TYPE_CHECKING:
    from .. import jobs
    from ..catalog import Catalog


def register(sub, parents) -> None:
    r = sub.add_parser("restore", parents=[parents.common, parents.progress, parents.catalog, parents.tape],
                       help="write an image back to a device or file",
                       usage="imager restore [options] IMAGE TARGET | --tape T [--image ID] TARGET")
    r.add_argument("paths", nargs="+", metavar="IMAGE TARGET",
                   help="image file (- for standard input) and target device or file")
    r.add_argument("--image", metavar="ID", help="with --tape: the image id (a prefix will do)", type=image_id_prefix)
    r.add_argument("--verify", action="store_true", help="re-read what was written and compare checksums")
    r.add_argument("--workers", type=worker_count, default=None, help="decompression threads (default: all cores)")
    r.add_argument("-f", "--force", action="store_true",
                   help="replace an existing target file; overwrite a device that holds a filesystem, "
                        "partition table or RAID/LVM member")
    r.set_defaults(func=run)


def run(args, out: Output) -> int:
    try:
        return _run(args, out)
    except KeyboardInterrupt as e:
        # What an interrupted restore leaves: a new file never appears; a device holds part of
        # the volume (it may even look like a filesystem) and must not be used as it is.
        target = args.paths[-1] if args.paths else None
        if target and os.path.exists(target) and stat.S_ISBLK(os.stat(target).st_mode):
            e.note = (f"{target} holds a partial volume: restore onto it again before using it")  # type: ignore
        elif target:
            e.note = f"nothing was written to {target}"  # type: ignore
        raise


def _run(args, out: Output) -> int:
    from .. import jobs
    from ..catalog import Catalog
    from ..format import ImageReader
    from .feeds import stdin_feed
    from .tape_actions import tape_spec

    if "" in args.paths:
        # An unset variable, most often: no path means no file and no device.
        raise UsageError("an empty path was given (IMAGE and TARGET are a file or a device)")
    if args.tape:
        if len(args.paths) != 1:
            raise UsageError("with --tape, give only the TARGET (the image is chosen with --image)")
        target = args.paths[0]
        with Catalog(args.catalog) as catalog:
            with out.progress(_catalogued_size(catalog, args.image), "restore") as progress:
                r = jobs.restore_from_tape(tape_spec(args), args.image, target, catalog=catalog,
                                           block_size=args.block_size, force=args.force, verify=args.verify,
                                           workers=args.workers, progress=progress)
    elif args.image:
        raise UsageError("--image chooses an image on a tape: give --tape too (or IMAGE and TARGET)")
    elif len(args.paths) != 2:
        raise UsageError("give IMAGE and TARGET (or --tape T --image ID TARGET)")
    elif args.paths[0] == "-":
        target = args.paths[1]
        r = _restore(stdin_feed(), target, args, out)
    else:
        image, target = args.paths
        with ImageReader(image) as reader:
            size = reader.header.volume_size
        with Catalog(args.catalog) as catalog, out.progress(size, "restore") as progress:
            r = jobs.restore(image, target, force=args.force, verify=args.verify, workers=args.workers,
                             progress=progress, catalog=catalog)
    out.result(r.to_dict(), [
        f"restored {r.image} to {target} ({human_bytes(r.volume_size)})" + (", verified" if r.verified else ""),
    ] + ([f"  the volume at this incremental's point, from a chain of {len(r.chain)} images"] if len(r.chain) > 1 else []) + [
        f"  {r.zero_chunks} of {r.chunks} chunks zero, {r.seconds:.2f} s, {r.mb_per_second:.0f} MB/s",
    ])
    return 0


def _catalogued_size(catalog: Catalog, image_id: str | None) -> int:
    """The volume size the progress bar counts to (0 when the catalog does not know the image)."""
    try:
        return catalog.image(image_id).volume_size if image_id else 0
    except UsageError:
        return 0


def _restore(feed, target: str, args, out: Output) -> jobs.RestoreResult:
    from .. import jobs

    with out.progress(feed.header.volume_size, "restore") as progress:
        return jobs.restore_feed(feed, target, force=args.force, verify=args.verify, workers=args.workers,
                                 progress=progress)
