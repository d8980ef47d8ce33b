"""imager catalog: list the images and their chains, prune by retention rules, check the files."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timedelta, timezone

from .. import views
from ..catalog import Catalog
from ..errors import UsageError
from ..units import counted, human_bytes
from .output import Output, table


def register(sub, parents) -> None:
    cp = sub.add_parser("catalog", help="the record of images and where they live")
    csub = cp.add_subparsers(dest="catalog_command", required=True, metavar="ACTION")
    ls = csub.add_parser("list", parents=[parents.common, parents.catalog], help="list the images in the catalog")
    ls.add_argument("--source", metavar="PATH", help="only images of this source (a device or file as given "
                    "to backup, or a managed volume's name)")
    ls.add_argument("--since", type=_since, metavar="WHEN",
                    help="only images taken since WHEN: a date (2026-11-24), a time (2026-11-24T18:00) or an "
                         "age (36h, 7d, 2w)")
    ls.set_defaults(func=listing)
    fg = csub.add_parser("forget", parents=[parents.common, parents.catalog],
                         help="remove images from the catalog (their files stay)")
    fg.add_argument("ids", nargs="+", metavar="ID", help="image ids (a unique prefix will do)")
    fg.add_argument("-f", "--force", action="store_true",
                    help="forget an image that other images of the catalog name as their parent")
    fg.set_defaults(func=forgetting)
    p = csub.add_parser("prune", parents=[parents.common, parents.catalog],
                        help="remove images no retention rule keeps and delete their files; never one a kept "
                             "image needs")
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
                    help="report images whose files are missing or are not the images recorded (their headers "
                         "and trailers are read; imager verify reads every chunk)").set_defaults(func=checking)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _since(text: str) -> datetime:
    """An absolute date or time (UTC unless it says otherwise), or an age before now."""
    units = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    if text[:-1].isdigit() and text[-1:] in units:
        return datetime.now(timezone.utc) - timedelta(seconds=int(text[:-1]) * units[text[-1]])
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date, time or age: {text!r} (examples: 2026-11-24, "
                                         f"2026-11-24T18:00, 36h, 7d)") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _taken(img) -> datetime:
    when = datetime.fromisoformat(img.snapshot_time or img.created)
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _matches(img, args) -> bool:
    wanted = {args.source, os.path.abspath(args.source), f"managed:{args.source}"} if args.source else set()
    if wanted and not wanted & {img.source, img.volume}:
        return False
    return args.since is None or _taken(img) >= args.since


def listing(args, out: Output) -> int:
    with Catalog(args.catalog, must_exist=bool(args.catalog)) as catalog:
        rows = []
        lines = []
        for img in catalog.images():
            if not _matches(img, args):
                continue
            segments = catalog.segments(img.id)
            present = [s.kind != "file" or bool(s.path and os.path.exists(s.path)) for s in segments]
            rows.append(dict(views.image_record(img), segments=[views.segment(s, present=p)
                                                                for s, p in zip(segments, present)]))
            where = "; ".join((s.path + ("" if p else " (MISSING)")) if s.kind == "file"
                              else f"tape {s.tape_label} file {s.tape_file}" for s, p in zip(segments, present))
            kind = (f"incremental on {img.parent_id[:12]} by {img.method}" if img.kind == "incremental" and img.parent_id
                    else "full" + (f" (synthetic, for {img.replaces[:12]})" if img.replaces else ""))
            lines.append([img.id[:12], img.snapshot_time or img.created, img.source, human_bytes(img.volume_size),
                          human_bytes(img.stream_bytes), kind, where])
    out.result({"catalog": str(catalog.path), "images": rows},
               table(["ID", "TAKEN", "SOURCE", "SIZE", "STORED", "KIND", "WHERE"], lines)
               or [f"no images in {catalog.path}"])
    return 0


def pruning(args, out: Output) -> int:
    from ..jobs.retention import KeepRules, prune

    rules = KeepRules(args.keep_last, args.keep_daily, args.keep_weekly)
    with Catalog(args.catalog, must_exist=bool(args.catalog)) as catalog:
        result = prune(catalog, rules, dry_run=args.dry_run, consolidate_chains=args.consolidate,
                       on_notice=out.notice)
    verb = "would remove" if args.dry_run else "removed"
    lines = [f"keep   {i[:12]}  ({result.reasons[i]})" for i in result.kept]
    lines += [f"{verb} {i[:12]}" for i in result.removed]
    if args.dry_run:
        lines += [f"would rebuild {i[:12]} as a synthetic full that takes its place" for i in result.replaced]
    lines += [f"wrote the synthetic full {i[:12]}" for i in result.consolidated]
    files = counted(len(result.files_deleted), "file")
    lines.append(f"{len(result.kept)} kept, {len(result.removed)} {verb}, " +
                 (f"{files} would be deleted" if args.dry_run else f"{files} deleted"))
    out.result(result.to_dict(), lines)
    return 0


def forgetting(args, out: Output) -> int:
    with Catalog(args.catalog, must_exist=bool(args.catalog)) as catalog:
        records = [catalog.image(i) for i in args.ids]
        leaving = {r.id for r in records}
        for record in records:
            children = [c for c in catalog.children(record.id) if c.id not in leaving]
            if children and not args.force:
                raise UsageError(f"image {record.id[:12]} is the parent of {len(children)} image(s) in the catalog "
                                 f"({', '.join(c.id[:12] for c in children)}); forgetting it leaves their restore to "
                                 f"find it beside them: use --force")
        for record in records:
            catalog.remove_image(record.id)
    out.result({"forgotten": sorted(leaving)}, [f"forgot image {i[:12]} (its files stay)" for i in sorted(leaving)])
    return 0


def checking(args, out: Output) -> int:
    from ..jobs.retention import check

    with Catalog(args.catalog, must_exist=bool(args.catalog)) as catalog:
        count, problems = check(catalog)
    out.result({"images": count, "problems": [p.to_dict() for p in problems], "ok": not problems},
               [f"{p.image_id[:12]}: {p.problem}" for p in problems] or [f"all {count} images are where the catalog says"])
    if problems:
        print(f"imager: error: {counted(len(problems), 'problem')} in the catalog", file=sys.stderr)
        return 1
    return 0
