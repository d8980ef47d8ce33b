"""imager consolidate: a full image of a chain point, from the chain's frames (a synthetic full)."""

from __future__ import annotations

from ..defaults import DEFAULT_TAPE_BLOCK_SIZE
from ..errors import UsageError
from ..units import human_bytes
from .output import Output


def register(sub, parents) -> None:
    c = sub.add_parser("consolidate", parents=[parents.common, parents.progress, parents.catalog, parents.tape],
                       help="write a full image of an incremental's point from its chain, without the volume")
    c.add_argument("image", metavar="IMAGE", help="an incremental image file (its parents: catalog or beside it)")
    c.add_argument("-o", "--output", help="the full image to write (- for standard output)")
    c.add_argument("--label", help="with --tape: refuse a tape with another label")
    c.add_argument("-f", "--force", action="store_true", help="replace an existing image file")
    c.set_defaults(func=run)


def run(args, out: Output) -> int:
    from .. import jobs
    from ..catalog import Catalog
    from ..format import ImageReader
    from .tape_actions import tape_spec

    dest = jobs.Destination(output=args.output, tape=tape_spec(args) if args.tape else None, force=args.force,
                            block_size=args.block_size or DEFAULT_TAPE_BLOCK_SIZE, expect_label=args.label)
    if not args.output and not args.tape:
        raise UsageError("give the full image to write: -o FILE or --tape T")
    with ImageReader(args.image) as reader:
        size = reader.header.volume_size
    with Catalog(args.catalog) as catalog, out.progress(size, "consolidate") as progress:
        r = jobs.consolidate(args.image, dest, progress=progress, catalog=catalog, on_notice=out.notice)
    out.result(r.to_dict(), [
        f"consolidated {args.image} into the full image {r.image} ({human_bytes(r.volume_size)} volume), "
        f"image id {r.image_id}",
        f"  {r.reason}, {human_bytes(r.bytes_written)} written, {r.seconds:.2f} s, {r.mb_per_second:.0f} MB/s",
    ])
    return 0
