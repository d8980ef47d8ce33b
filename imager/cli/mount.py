"""imager mount | umount | mounts | ls | extract: file-level restore from any image or chain point."""

from __future__ import annotations

import stat
import time

from ..defaults import DEFAULT_MOUNT_CACHE_BYTES
from .. import views
from ..units import counted, human_bytes, positive_size
from .output import Output


def register(sub, parents) -> None:
    m = sub.add_parser("mount", parents=[parents.common, parents.catalog],
                       help="mount an image (or chain point) read-only at an empty directory")
    m.add_argument("image", help="image file (an incremental is mounted at its point)")
    m.add_argument("directory", metavar="DIR", help="an empty directory to mount the volume's filesystem on")
    m.add_argument("--cache-size", type=positive_size, default=DEFAULT_MOUNT_CACHE_BYTES, metavar="SIZE",
                   help=f"decompressed chunks the daemon keeps (default {human_bytes(DEFAULT_MOUNT_CACHE_BYTES)})")
    m.set_defaults(func=mount)
    u = sub.add_parser("umount", parents=[parents.common], help="unmount an image mounted with imager mount")
    u.add_argument("directory", metavar="DIR", help="where imager mount mounted the image")
    u.set_defaults(func=umount)
    sub.add_parser("mounts", parents=[parents.common], help="list the images mounted with imager mount"
                   ).set_defaults(func=mounts)
    ls_ = sub.add_parser("ls", parents=[parents.common, parents.catalog],
                         help="list files in an image, without mounting it")
    ls_.add_argument("image", metavar="IMAGE", help="image file (an incremental: its point)")
    ls_.add_argument("path", nargs="?", default="", metavar="PATH", help="a directory or file in the image")
    ls_.set_defaults(func=ls)
    x = sub.add_parser("extract", parents=[parents.common, parents.catalog],
                       help="copy files out of an image as cp -a does, without mounting it")
    x.add_argument("image", metavar="IMAGE", help="image file (an incremental: its point)")
    x.add_argument("paths", nargs="+", metavar="PATH", help="files or directories in the image")
    x.add_argument("-C", "--directory", dest="dest", required=True, metavar="DEST",
                   help="copy to DEST/PATH (an existing directory)")
    x.add_argument("-f", "--force", action="store_true", help="overwrite what is there")
    x.set_defaults(func=extract)


def mount(args, out: Output) -> int:
    from .. import api

    info = api.mount(args.image, args.directory, cache_size=args.cache_size, catalog=args.catalog or True)
    out.result(info.to_dict(), [f"{args.image} mounted read-only at {info.directory} "
                                f"(imager umount {info.directory} ends it)"] + _entry_lines(info))
    return 0


def _entry_lines(info) -> list[str]:
    lines = []
    for e in info.entries:
        what = (e.fs_type or "unknown") + (f" {e.label!r}" if e.label else "")
        where = f"partition {e.partition}, " if e.partition is not None else ""
        if e.how == "mounted":
            lines.append(f"  {e.path}  {what}  {where}mounted from {e.device} ({e.options})")
        else:
            lines.append(f"  {e.path}  {what}  {where}the file of its {human_bytes(e.size)}: {e.reason}")
    return lines


def umount(args, out: Output) -> int:
    from .. import api

    info = api.umount(args.directory)
    lines = [f"unmounted {info.image} from {info.directory}"]
    if info.log_path:
        lines.append(f"its daemon logged problems; the log is kept at {info.log_path}")
    out.result(info.to_dict(), lines)
    return 0


def mounts(args, out: Output) -> int:
    from .. import api

    found = api.mounts()
    lines = []
    for info in found:
        state = "" if info.state == "mounted" else f"  {info.state.upper()}" + (f": {info.problem}" if info.problem
                                                                               else "")
        lines.append(f"{info.directory}  {info.image}" + (f" (a chain of {len(info.images)})" if len(info.images) > 1
                                                          else "") + f"  pid {info.pid}  log {info.log_path}{state}")
        lines += _entry_lines(info)
    out.result({"mounts": [i.to_dict() for i in found]}, lines or ["no images mounted"])
    return 0


def ls(args, out: Output) -> int:
    from .. import api

    entries = api.ls(args.image, args.path, catalog=args.catalog or True)
    width = max((len(str(e.size)) for e in entries), default=1)
    lines = []
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime_ns / 1e9))
        line = (f"{stat.filemode(e.mode)} {e.nlink:>3} {e.uid:>5} {e.gid:>5} {e.size:>{width}} {when} "
                f"{views.shown_name(e.name)}" + (f" -> {views.shown_name(e.target)}" if e.target is not None else ""))
        if e.fs_type or e.note:
            line += f"    ({e.fs_type or 'unknown'}" + (f" {e.label!r}" if e.label else "") + \
                (f"; {e.note}" if e.note else "") + ")"
        lines.append(line)
    out.result({"image": args.image, "path": args.path, "entries": [e.to_dict() for e in entries]}, lines)
    return 0


def extract(args, out: Output) -> int:
    from .. import api

    result = api.extract(args.image, args.paths, args.dest, force=args.force, catalog=args.catalog or True)
    out.result(result.to_dict(), [f"{views.shown_name(c['path'])} -> {views.shown_name(c['to'])}: {counted(c['entries'], 'entry', 'entries')}, "
                                  f"{human_bytes(c['bytes'])}" for c in result.copied]
               + [f"extracted {counted(result.entries, 'entry', 'entries')} ({human_bytes(result.bytes)}) in {result.seconds:.1f} s"])
    return 0
