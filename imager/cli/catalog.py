"""imager catalog: list the images and their chains, prune by retention rules, check the files."""

from __future__ import annotations

import argparse
import sys

from ..catalog import Catalog, record_dict
from ..jobs.retention import KeepRules, check, prune
from ..units import human_bytes
from .output import Output, table


def register(sub, parents) -> None:
    cp = sub.add_parser("catalog", help="the record of images and where they live")
    csub = cp.add_subparsers(dest="catalog_command", required=True, metavar="ACTION")
    csub.add_parser("list", parents=[parents.common, parents.catalog],
                    help="list the images in the catalog").set_defaults(func=listing)
    p = csub.add_parser("prune", parents=[parents.common, parents.catalog],
                        help="remove images no retention rule keeps; never one a kept image needs")
    p.add_argument("--keep-last", type=_count, default=0, metavar="N", help="the newest N images of each volume")
    p.add_argument("--keep-daily", type=_count, default=0, metavar="N",
                   help="the newest image of each of the last N days that have one")
    p.add_argument("--keep-weekly", type=_count, default=0, metavar="N",
                   help="the newest image of each of the last N weeks that have one")
    p.add_argument("--consolidate", action="store_true",
                   help="first rebuild a kept incremental as a full, so that the images before it can go")
    p.add_argument("-n", "--dry-run", action="store_true", help="say what would go, remove nothing")
    p.set_defaults(func=pruning)
    csub.add_parser("check", parents=[parents.common, parents.catalog],
                    help="report images whose files are missing or changed").set_defaults(func=checking)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def listing(args, out: Output) -> int:
    with Catalog(args.catalog) as catalog:
        rows = []
        lines = []
        for img in catalog.images():
            segments = catalog.segments(img.id)
            rows.append({"image": record_dict(img), "segments": [record_dict(s) for s in segments]})
            where = "; ".join(s.path if s.kind == "file" else f"tape {s.tape_label} file {s.tape_file}"
                              for s in segments)
            kind = (f"incremental on {img.parent_id[:12]} by {img.method}" if img.kind == "incremental" and img.parent_id
                    else "full" + (f" (synthetic, for {img.replaces[:12]})" if img.replaces else ""))
            lines.append([img.id[:12], img.snapshot_time or img.created, img.source, human_bytes(img.volume_size),
                          human_bytes(img.stream_bytes), kind, where])
    out.result({"catalog": str(catalog.path), "images": rows},
               table(["ID", "TAKEN", "SOURCE", "SIZE", "STORED", "KIND", "WHERE"], lines)
               or [f"no images in {catalog.path}"])
    return 0


def pruning(args, out: Output) -> int:
    rules = KeepRules(args.keep_last, args.keep_daily, args.keep_weekly)
    with Catalog(args.catalog) as catalog:
        result = prune(catalog, rules, dry_run=args.dry_run, consolidate_chains=args.consolidate,
                       on_notice=out.notice)
    verb = "would remove" if args.dry_run else "removed"
    lines = [f"keep   {i[:12]}  ({result.reasons[i]})" for i in result.kept]
    lines += [f"{verb} {i[:12]}" for i in result.removed]
    lines += [f"wrote the synthetic full {i[:12]}" for i in result.consolidated]
    lines.append(f"{len(result.kept)} kept, {len(result.removed)} {verb}, {len(result.files_deleted)} files deleted")
    out.result(result.to_dict(), lines)
    return 0


def checking(args, out: Output) -> int:
    with Catalog(args.catalog) as catalog:
        count, problems = check(catalog)
    out.result({"images": count, "problems": [p.to_dict() for p in problems], "ok": not problems},
               [f"{p.image_id[:12]}: {p.problem}" for p in problems] or [f"all {count} images are where the catalog says"])
    if problems:
        print(f"imager: error: {len(problems)} problems in the catalog", file=sys.stderr)
        return 1
    return 0
