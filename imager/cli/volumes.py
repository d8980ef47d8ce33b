"""imager attach | detach | volumes | recover | snapshot ...: managed volumes and their snapshots."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import views
from ..defaults import DEFAULT_MAX_FREEZE
from ..units import human_bytes, non_negative_float, positive_float, positive_size
from .output import Output, natural_key, table

if TYPE_CHECKING:
    from ..jobs import volumes


def register(sub, parents) -> None:
    at = sub.add_parser("attach", parents=[parents.common],
                        help="manage a device: serve it through a copy-on-write front")
    at.add_argument("device", help="the block device (or file) to manage, e.g. /dev/sdb1")
    at.add_argument("--name", help="volume name (default: from the device)")
    at.add_argument("--cache", metavar="PATH", help="state directory for the bitmap and cache region "
                    "(not on the device itself; default /var/lib/imager/NAME)")
    at.add_argument("--cache-size", type=positive_size, metavar="SIZE", help="cap on the snapshot cache region")
    at.add_argument("--watchdog", type=non_negative_float, metavar="SECONDS", default=None,
                    help="replace the volume's worker when it does not answer for this long "
                         "(default 30; 0: never)")
    at.add_argument("--wait", type=non_negative_float, metavar="SECONDS", default=0.0,
                    help="wait up to this long for the device to appear (at boot, before udev made it)")
    at.set_defaults(func=attach)
    de = sub.add_parser("detach", parents=[parents.common], help="stop managing volumes")
    de.add_argument("names", nargs="+", metavar="NAME", help="managed volumes to detach")
    de.set_defaults(func=detach)
    vo = sub.add_parser("volumes", parents=[parents.common], help="list managed volumes and their snapshots")
    vo.set_defaults(func=listing)
    vsub = vo.add_subparsers(dest="volumes_command", required=False, metavar="[ACTION]")
    vr = vsub.add_parser("restart", parents=[parents.common],
                         help="replace the worker serving volumes by the imager installed now (a live upgrade); "
                              "the filesystems on their fronts see a pause, not an error")
    vr.add_argument("names", nargs="+", metavar="NAME", help="managed volumes whose worker to replace")
    vr.set_defaults(func=restart)
    rc = sub.add_parser("recover", parents=[parents.common],
                        help="bring back a volume whose daemon died: re-attach and check its filesystem")
    rc.add_argument("name", metavar="NAME", help="the managed volume whose daemon died")
    rc.set_defaults(func=recover)
    _register_snapshot(sub, parents)


def _register_snapshot(sub, parents) -> None:
    sp = sub.add_parser("snapshot", help="point-in-time snapshots of managed volumes")
    ssub = sp.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")
    sc = ssub.add_parser("create", parents=[parents.common], help="snapshot volumes in one freeze window")
    sc.add_argument("names", nargs="+", metavar="NAME", help="managed volumes to snapshot in one freeze window")
    sc.add_argument("--pre-freeze", action="append", default=[], metavar="CMD", help="run before freezing; repeatable")
    sc.add_argument("--post-thaw", action="append", default=[], metavar="CMD", help="run after thawing; repeatable")
    sc.add_argument("--max-freeze", type=positive_float, default=DEFAULT_MAX_FREEZE, metavar="SECONDS",
                    help=f"thaw after this long whatever happens, and fail (default {DEFAULT_MAX_FREEZE:g} s)")
    sc.set_defaults(func=snapshot_create)
    ssub.add_parser("list", parents=[parents.common], help="list snapshots").set_defaults(func=snapshot_list)
    sd = ssub.add_parser("delete", parents=[parents.common], help="delete snapshots")
    sd.add_argument("names", nargs="+", metavar="NAME", help="managed volumes whose snapshot to delete")
    sd.add_argument("--force", action="store_true", help="even while the snapshot file is open")
    sd.set_defaults(func=snapshot_delete)


def attach(args, out: Output) -> int:
    from ..jobs import volumes

    v = volumes.attach(args.device, name=args.name, cache_path=args.cache, cache_size=args.cache_size,
                       watchdog=args.watchdog, wait_for_device=args.wait)
    out.result(views.with_iso_times(v), [v.front or ""])
    out.notice(f"{args.device} is managed as {v.name!r}: mount and write {v.front}; "
               f"snapshot with: imager snapshot create {v.name}")
    return 0


def recover(args, out: Output) -> int:
    from ..jobs import volumes

    v = volumes.recover(args.name)
    out.result(views.with_iso_times(v), [f"recovered {v.name}: {v.device} -> front {v.front}", f"filesystem: {v.problem}"])
    out.notice(f"mount {v.front} again where it was (its device number may have changed)")
    return 0


def detach(args, out: Output) -> int:
    from ..jobs import volumes

    detached = volumes.detach_all(args.names)
    out.result({"detached": detached}, [f"detached {n}" for n in detached])
    return 0


def restart(args, out: Output) -> int:
    from ..jobs import volumes

    restarted = [volumes.restart_worker(name) for name in args.names]
    out.result({"volumes": [views.with_iso_times(v) for v in restarted]},
               [f"{v.name}: worker {v.worker['pid']} serves {v.front} (restart {v.worker['restarts']})"
                for v in restarted if v.worker])
    return 0


def listing(args, out: Output) -> int:
    from ..jobs import volumes

    found = volumes.list_volumes()
    found = sorted(found, key=lambda v: natural_key(v.name))
    out.result({"volumes": [views.with_iso_times(v) for v in found]},
               table(["NAME", "SOURCE", "FRONT", "SIZE", "STATE", "SNAPSHOT"], [_volume_row(v) for v in found])
               or ["no attached volumes"])
    return 0


def _volume_row(v: volumes.VolumeInfo) -> list[str]:
    if v.state != "running":
        return [v.name, v.device, str(v.front), human_bytes(v.size), v.state.upper(), v.problem]
    snap = "none"
    if v.snapshot:
        s = v.snapshot
        snap = (f"{s.path} ({'INVALID: ' + s.invalid_reason if s.invalid else 'valid'}, "
                f"{human_bytes(s.cache_bytes_used)} cache used)")
    return [v.name, v.device, str(v.front), human_bytes(v.size), v.state, snap]


def snapshot_create(args, out: Output) -> int:
    from ..jobs import volumes

    info = volumes.snapshot_create(args.names, args.pre_freeze, args.post_thaw, max_freeze=args.max_freeze)
    out.result(views.with_iso_times(info), [f"{s.name}: snapshot at {s.path}" for s in info.snapshots]
               + [f"freeze window {info.freeze_window_ms:.1f} ms"
                  + (f" ({', '.join(info.frozen_mounts)})" if info.frozen_mounts else " (nothing mounted)")])
    return 0


def snapshot_list(args, out: Output) -> int:
    from ..jobs import volumes

    snaps = volumes.snapshot_list()
    out.result({"snapshots": [views.with_iso_times(s) for s in snaps]},
               table(["NAME", "CACHE", "STATE", "PATH"],
                     [[s.name, human_bytes(s.cache_bytes_used), "INVALID: " + s.invalid_reason if s.invalid else "valid",
                       s.path] for s in sorted(snaps, key=lambda s: natural_key(s.name))]) or ["no snapshots"])
    return 0


def snapshot_delete(args, out: Output) -> int:
    from ..jobs import volumes

    volumes.snapshot_delete(args.names, force=args.force)
    out.result({"deleted": args.names}, [f"deleted the snapshot of {n}" for n in args.names])
    return 0
