"""imager loop attach | detach | list: loop devices, for images and tests."""

from __future__ import annotations

import os

from devices import loop

from ..units import parse_size
from .output import Output, natural_key, table


def register(sub, parents) -> None:
    lp = sub.add_parser("loop", help="attach and detach loop devices")
    lsub = lp.add_subparsers(dest="loop_command", required=True, metavar="ACTION")
    la = lsub.add_parser("attach", parents=[parents.common], help="attach a file as /dev/loopN")
    la.add_argument("file", help="the image or disk file to attach")
    la.add_argument("--offset", type=parse_size, default=0, help="start this many bytes into the file")
    la.add_argument("--size-limit", type=parse_size, default=0, help="this many bytes at most (0: to the end)")
    la.add_argument("--read-only", action="store_true", help="a read-only device")
    la.set_defaults(func=attach)
    ld = lsub.add_parser("detach", parents=[parents.common], help="detach loop devices")
    ld.add_argument("devices", nargs="+", metavar="DEVICE", help="loop devices to detach, e.g. /dev/loop3")
    ld.set_defaults(func=detach)
    lsub.add_parser("list", parents=[parents.common], help="list attached loop devices").set_defaults(func=listing)


def attach(args, out: Output) -> int:
    dev = loop.attach(args.file, offset=args.offset, size_limit=args.size_limit, read_only=args.read_only)
    out.result({"name": os.path.basename(dev), "path": dev, "back-file": os.path.abspath(args.file),
                "offset": args.offset, "sizelimit": args.size_limit, "ro": args.read_only}, [dev])
    return 0


def detach(args, out: Output) -> int:
    for dev in args.devices:
        loop.detach(dev)
    out.result({"detached": args.devices}, [f"detached {d}" for d in args.devices])
    return 0


def listing(args, out: Output) -> int:
    rows = sorted(loop.list_attached(), key=lambda r: natural_key(r.device))
    out.result({"loopdevices": [{"name": os.path.basename(r.device), "path": r.device, "back-file": r.backing_file,
                                 "offset": r.offset, "sizelimit": r.size_limit, "ro": r.read_only,
                                 "autoclear": r.autoclear} for r in rows]},
               table(["DEVICE", "OFFSET", "RO", "BACK-FILE"],
                     [[r.device, str(r.offset), "1" if r.read_only else "0", r.backing_file] for r in rows])
               or ["no loop devices attached"])
    return 0
