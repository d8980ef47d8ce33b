"""imager verify: decompress and check every chunk of an image, or of every image on a tape."""

from __future__ import annotations

import sys

from ..errors import ImageFormatError, UsageError
from ..units import human_bytes, image_id_prefix, worker_count
from .output import Output


def register(sub, parents) -> None:
    v = sub.add_parser("verify", parents=[parents.common, parents.progress, parents.catalog, parents.tape],
                       help="check every chunk of an image")
    v.add_argument("image_file", nargs="?", metavar="IMAGE", help="image file (- for standard input)")
    v.add_argument("--image", metavar="ID", help="with --tape: only this image (default: all on the tape)", type=image_id_prefix)
    v.add_argument("--workers", type=worker_count, default=None, help="decompression threads (default: all cores)")
    v.set_defaults(func=run)


def run(args, out: Output) -> int:
    from .. import jobs
    from ..catalog import Catalog
    from ..format import ImageReader
    from .feeds import stdin_feed
    from .tape_actions import tape_spec

    if args.tape:
        with Catalog(args.catalog) as catalog:
            results = jobs.verify_tape(tape_spec(args), args.image, catalog=catalog, block_size=args.block_size,
                                       workers=args.workers)
    elif args.image:
        raise UsageError("--image chooses an image on a tape: give --tape too")
    elif args.image_file == "-":
        feed = stdin_feed()
        with out.progress(feed.header.volume_size, "verify") as progress:
            results = [jobs.verify_feed(feed, workers=args.workers, progress=progress)]
    elif args.image_file:
        with ImageReader(args.image_file) as reader:
            size = reader.header.volume_size
        with Catalog(args.catalog) as catalog, out.progress(size, "verify") as progress:
            try:
                results = [jobs.verify(args.image_file, workers=args.workers, progress=progress, catalog=catalog)]
            except ImageFormatError as e:
                # Damage found: --json says so too (ok: false), as for the images of a tape.
                failed = jobs.VerifyResult(args.image_file, size, 0, 0, 0.0, ok=False, errors=[str(e)])
                out.result({"images": [failed.to_dict()], "ok": False}, [])
                raise
    else:
        raise UsageError("give an IMAGE file or --tape T")
    ok = all(r.ok for r in results)
    out.result({"images": [r.to_dict() for r in results], "ok": ok},
               [f"{r.image}: ok, {r.chunks} chunks ({r.zero_chunks} zero), "
                f"{human_bytes(r.volume_size)} volume, {r.seconds:.2f} s"
                + (f"; its chain of {len(r.chain)} images makes the volume at its point" if len(r.chain) > 1 else "")
                if r.ok
                else f"{r.image}: FAILED: {'; '.join(r.errors)}" for r in results])
    if not ok:
        print(f"imager: error: {sum(not r.ok for r in results)} of {len(results)} images failed verification",
              file=sys.stderr)
        return 1
    return 0
