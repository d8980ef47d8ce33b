"""imager devices: block devices and tape drives, with what they hold."""

from __future__ import annotations

from devices import discover

from ..units import human_bytes
from .output import Output

_HEADER = ("NAME", "SIZE", "SECTOR", "KIND", "FSTYPE", "LABEL", "UUID", "MOUNTPOINT", "PARTTYPE", "RO")


def register(sub, parents) -> None:
    dv = sub.add_parser("devices", parents=[parents.common], help="list block devices and tape drives")
    dv.add_argument("-a", "--all", action="store_true", help="include empty loop devices and ram disks")
    dv.set_defaults(func=listing)


def listing(args, out: Output) -> int:
    disks = discover.list_block_devices(include_empty=args.all)
    tapes = discover.list_tape_drives()
    rows = [_HEADER]
    for d in disks:
        part = d.partition_type or ""
        if d.is_esp:
            part = (part + " (EFI system)").strip()
        rows.append((d.name, human_bytes(d.size), f"{d.logical_sector_size}/{d.physical_sector_size}", d.kind,
                     d.fs_type or "", d.label or "", d.uuid or "", ",".join(d.mount_points), part,
                     "ro" if d.read_only else ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(_HEADER))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if tapes:
        lines += ["", "TAPE DRIVES"] + [f"{t.path}  {t.vendor or ''} {t.model or ''}  {t.serial or ''}".rstrip()
                                        for t in tapes]
    out.result({"block_devices": [d.to_dict() for d in disks], "tape_drives": [t.to_dict() for t in tapes]}, lines)
    return 0
