"""imager devices: block devices and tape drives, with what they hold."""

from __future__ import annotations

from devices.partitions import GPT_TYPE_NAMES, MBR_TYPE_NAMES

from ..units import human_bytes
from .output import Output, natural_key, table

_HEADER = ("NAME", "SIZE", "SECTOR", "KIND", "FSTYPE", "LABEL", "UUID", "MOUNTPOINT", "PARTTYPE", "RO")


def register(sub, parents) -> None:
    dv = sub.add_parser("devices", parents=[parents.common], help="list block devices and tape drives")
    dv.add_argument("-a", "--all", action="store_true", help="include empty loop devices and ram disks")
    dv.set_defaults(func=listing)


def listing(args, out: Output) -> int:
    from devices import discover

    disks = discover.list_block_devices(include_empty=args.all)
    tapes = discover.list_tape_drives()
    rows = [_row(d, prefix) for d, prefix in _as_tree(disks)]
    lines = table(list(_HEADER), [list(r) for r in rows])
    if tapes:
        lines += ["", "TAPE DRIVES"] + [f"{t.path}  {t.vendor or ''} {t.model or ''}  {t.serial or ''}".rstrip()
                                        for t in tapes]
    out.result({"blockdevices": _lsblk_tree(disks), "tapedrives": [t.to_dict() for t in tapes]}, lines)
    return 0


def _lsblk_tree(disks: list) -> list[dict]:
    """What `lsblk --json -O` gives, in its key names (partitions as their disk's children),
    plus what imager adds: esp."""
    names = {d.name for d in disks}
    by_parent: dict[str, list] = {}
    for d in disks:
        if d.parent in names:
            by_parent.setdefault(d.parent, []).append(d)

    def node(d) -> dict:
        entry = {"name": d.name, "path": d.path, "maj:min": d.device_number, "size": d.size, "ro": d.read_only,
                 "type": "part" if d.kind == "partition" else d.kind, "fstype": d.fs_type, "label": d.label,
                 "uuid": d.uuid, "mountpoints": list(d.mount_points),
                 "pttype": d.partition_table or d.partition_scheme, "parttype": d.partition_type,
                 "parttypename": type_name(d.partition_type) or None, "log-sec": d.logical_sector_size,
                 "phy-sec": d.physical_sector_size, "pkname": d.parent, "back-file": d.backing_file,
                 "esp": d.is_esp}
        kids = sorted(by_parent.get(d.name, []), key=lambda c: natural_key(c.name))
        if kids:
            entry["children"] = [node(c) for c in kids]
        return entry

    return [node(d) for d in sorted((d for d in disks if d.parent not in names), key=lambda d: natural_key(d.name))]


def _as_tree(disks: list) -> list[tuple]:
    """Each disk followed by its partitions, drawn as lsblk does (natural order: sda2 before sda10)."""
    names = {d.name for d in disks}
    children: dict[str, list] = {}
    for d in disks:
        if d.parent in names:
            children.setdefault(d.parent, []).append(d)
    ordered = []
    for d in sorted((d for d in disks if d.parent not in names), key=lambda d: natural_key(d.name)):
        ordered.append((d, ""))
        kids = sorted(children.get(d.name, []), key=lambda c: natural_key(c.name))
        ordered += [(c, "└─" if i == len(kids) - 1 else "├─") for i, c in enumerate(kids)]
    return ordered


def _row(d, prefix: str) -> tuple:
    part = type_name(d.partition_type)
    return (prefix + d.name, human_bytes(d.size), f"{d.logical_sector_size}/{d.physical_sector_size}", d.kind,
            d.fs_type or "", d.label or "", d.uuid or "", ",".join(d.mount_points), part, "ro" if d.read_only else "")


def type_name(partition_type: str | None) -> str:
    """A partition type as fdisk names it (the raw GUID or id when it is not a known one)."""
    if not partition_type:
        return ""
    if partition_type.startswith("0x"):
        return MBR_TYPE_NAMES.get(int(partition_type, 16), partition_type)
    return GPT_TYPE_NAMES.get(partition_type.lower(), partition_type)
