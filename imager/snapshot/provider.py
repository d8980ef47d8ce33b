"""Snapshot providers: how a backup gets each of its volumes at one point in time, planned.

- none:   the devices as they are (crash-consistent at best when mounted read-write: said).
- freeze: the mounted filesystems frozen, one window for all, for the whole read (small volumes).
- cow:    managed volumes snapshotted in one freeze window; the snapshots are read while the
          volumes stay in use (straight from each device and its COW store's files, cow/direct.py,
          the daemon asked once at the end whether they held), and go with the backup, however
          it ends.

A provider's take() is a context manager giving a SnapshotSet: the planned volumes, and the
checks the backup makes before it completes an image. Used-block plans of mounted filesystems
are made inside the freeze window, so that they describe the snapshot instant.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator, Protocol, Sequence

from devices.block import BlockDevice
from devices.errors import DeviceError
from devices.fs import mounts_of
from devices.partitions import partition_devices
from devices.topology import device_identity, stacked_on

from ..ends.sources import VolumeSource, open_source, probe_filesystem
from ..errors import ImagerError, SnapshotError, UsageError
from ..plan.planner import PlanRules, partition_table_of, plan_for_backup
from ..plan.usedmap import UsedMap
from ..units import now_iso
from . import daemon
from ..defaults import DEFAULT_MAX_FREEZE, DEFAULT_MAX_FREEZE_READ
from .cow.direct import DirectSnapshotReader
from .freeze import Hook, freeze_window

log = logging.getLogger(__name__)

Notice = Callable[[str], None]


@dataclass
class SnapshotRequest:
    """What a backup asks of a provider."""

    rules: PlanRules = field(default_factory=PlanRules)
    pre_freeze: Sequence[Hook] = ()
    post_thaw: Sequence[Hook] = ()
    while_frozen: Callable[[], object] | None = None
    max_freeze: float | None = None          # seconds; None: the provider's default
    backups_as_sources: bool = False         # image a source that is itself an image or tape
    writes_to: Sequence[str] = ()            # where the backup writes: never on a frozen filesystem
    on_notice: Notice | None = None

    def notice(self, message: str) -> None:
        if self.on_notice is not None:
            self.on_notice(message)


@dataclass
class PlannedVolume:
    source: VolumeSource
    name: str                                # names the image of several volumes (NAME.zst)
    plan: UsedMap
    source_meta: dict                        # the image header's "source"
    snapshot_meta: dict                      # the image header's "snapshot"
    partitions: dict | None = None
    volume_key: str = ""                     # which volume this is, across backups (finds a parent)
    # A managed volume's change tracker: its roll at this snapshot (series, sequence, base), the
    # bits of the blocks written since the base's snapshot, and how to say the image is stored.
    tracker: dict | None = None
    tracked_changes: Callable[[], bytes | None] | None = None
    commit_tracker: Callable[[], None] | None = None
    # Raises if what was read of this volume may not be of the snapshot instant any more (a freeze
    # that outlived its maximum, a snapshot deleted or invalidated): checked once every read is
    # done, before the image's trailer is written.
    check_reads: Callable[[], None] | None = None


@dataclass
class SnapshotSet:
    volumes: list[PlannedVolume]
    freeze_window_ms: float | None = None
    # Turns a read error of a volume into what happened (a snapshot that stopped being valid).
    explain: Callable[[PlannedVolume, Exception], Exception] | None = None


class Provider(Protocol):
    name: str

    def take(self, sources: Sequence[str], request: SnapshotRequest) -> AbstractContextManager[SnapshotSet]: ...


def provider(name: str) -> Provider:
    try:
        return PROVIDERS[name]
    except KeyError:
        raise UsageError(f"unknown snapshot provider {name!r} (choose from {', '.join(PROVIDERS)})") from None


class NoneProvider:
    name = "none"

    @contextmanager
    def take(self, sources: Sequence[str], request: SnapshotRequest) -> Iterator[SnapshotSet]:
        with ExitStack() as opened:
            volumes = []
            for path in sources:
                dev = opened.enter_context(open_source(path, backups_as_sources=request.backups_as_sources))
                fs_meta = probe_filesystem(dev.path)
                mounted = mounts_of(dev.path)
                plan = plan_for_backup(dev.path, dev.size, request.rules, on_notice=request.on_notice,
                                       mount_point=mounted[0].mount_point if mounted else None)
                warn_if_mounted_rw(dev.path, request.on_notice)
                volumes.append(PlannedVolume(dev, _volume_name(dev.path), plan, fs_meta,
                                             {"provider": "none", "time": now_iso()},
                                             partition_table_of(dev.path, fs_meta), volume_key(dev.path, fs_meta)))
            yield SnapshotSet(volumes)


class FreezeProvider:
    name = "freeze"

    @contextmanager
    def take(self, sources: Sequence[str], request: SnapshotRequest) -> Iterator[SnapshotSet]:
        with ExitStack() as opened:
            devices = [opened.enter_context(open_source(path, backups_as_sources=request.backups_as_sources))
                       for path in sources]
            mounted = {}            # a source mounted itself: where
            to_freeze = {}          # every device mounted on a source's bytes (a whole disk's partitions): where
            for dev in devices:
                points = mounts_of(dev.path)
                if points:
                    mounted[dev.path] = to_freeze[dev.path] = points[0].mount_point
                inside = []
                for above in stacked_on(dev.path):
                    points = mounts_of(above)
                    if points:
                        to_freeze.setdefault(above, points[0].mount_point)
                        inside.append(points[0].mount_point)
                if dev.path not in mounted:
                    request.notice(f"{dev.path}: freezing what is mounted on it: {', '.join(inside)}" if inside else
                                   f"{dev.path} is not mounted: nothing to freeze, it is read as it is")
            if request.rules.excludes and len(mounted) != len(devices):
                raise UsageError("--exclude needs every source mounted, to find the files' blocks")
            refuse_writing_to_frozen(to_freeze, request.writes_to)
            created = now_iso()
            with freeze_window(list(to_freeze.values()), request.pre_freeze, request.post_thaw,
                               max_seconds=request.max_freeze or DEFAULT_MAX_FREEZE_READ) as window:
                volumes = []
                for dev in devices:
                    fs_meta = probe_filesystem(dev.path)
                    point = mounted.get(dev.path)
                    plan = plan_for_backup(dev.path, dev.size, request.rules, mount_point=point,
                                           on_notice=request.on_notice)
                    volumes.append(PlannedVolume(dev, _volume_name(dev.path), plan, fs_meta,
                                                 {"provider": "freeze", "time": created,
                                                  "frozen": list(to_freeze.values())},
                                                 None if point else partition_table_of(dev.path, fs_meta),
                                                 volume_key(dev.path, fs_meta), check_reads=window.check))
                if request.while_frozen is not None:
                    request.while_frozen()
                snapshot_set = SnapshotSet(volumes)
                yield snapshot_set
            # Nothing mounted, nothing frozen: no window to report.
            snapshot_set.freeze_window_ms = window.milliseconds if to_freeze else None


class CowProvider:
    name = "cow"

    @contextmanager
    def take(self, sources: Sequence[str], request: SnapshotRequest) -> Iterator[SnapshotSet]:
        how = snapshot_reads()
        volumes = resolve_volumes(sources)
        for v in volumes:
            daemon.refuse_esp(v.device, "cow")
        mounted = {v.front: mounts_of(v.front)[0].mount_point for v in volumes if v.front and mounts_of(v.front)}
        if request.rules.excludes and len(mounted) != len(volumes):
            raise UsageError("--exclude needs every volume's front mounted, to find the files' blocks")
        refuse_writing_to_frozen(mounted, request.writes_to)
        plans: dict[str, UsedMap] = {}

        def inside_window() -> None:
            for v in volumes:
                if v.front in mounted:
                    plans[v.name] = plan_for_backup(v.front, v.size, request.rules, mount_point=mounted[v.front])
            if request.while_frozen is not None:
                request.while_frozen()

        # Held: if this process dies, every daemon deletes its snapshot when the connection drops.
        with daemon.HeldSnapshots([v.name for v in volumes], request.pre_freeze, request.post_thaw, inside_window,
                                  max_freeze=request.max_freeze or DEFAULT_MAX_FREEZE) as held, ExitStack() as opened:
            info = held.info
            # One instant for the whole set: when COW went on in the first volume, inside the window.
            instant = datetime.fromtimestamp(min(s.created_at for s in info.snapshots), timezone.utc)
            planned = []
            for v, snap in zip(volumes, info.snapshots):
                view = opened.enter_context(BlockDevice(snap.path, direct=True))
                if how == "direct":
                    source = opened.enter_context(_snapshot_reader(v, snap, view))
                else:
                    log.info("%s: reading the snapshot through its daemon (%s=daemon)", v.name, SNAPSHOT_READS_ENV)
                    source = view
                plan = plans.get(v.name) or plan_for_backup(snap.path, view.size, request.rules)
                meta = {"provider": "cow", "time": instant.isoformat(timespec="milliseconds"),
                        "freeze_window_ms": round(info.freeze_window_ms, 2),
                        "volumes": [x.name for x in volumes], "volume": v.name}
                planned.append(PlannedVolume(
                    source, v.name, plan, dict(probe_filesystem(snap.path), path=v.device, volume=v.name, front=v.front,
                                             view=snap.path), meta, volume_key=f"managed:{v.name}",
                    tracker=snap.tracker, tracked_changes=functools.partial(held.tracked_changes, v.name),
                    commit_tracker=functools.partial(held.commit, v.name),
                    check_reads=functools.partial(_check_still_the_snapshot, v.name, snap)))
            # Fronts not mounted: nothing was frozen, and no window is reported.
            yield SnapshotSet(planned, info.freeze_window_ms if info.frozen_mounts else None,
                              explain=_explain_cow_read_error(volumes))


# How a cow backup reads its snapshots: "direct" (the volume's device and its store's files, see
# cow/direct.py) or "daemon" (the snapshot file the daemon serves, one request per read).
SNAPSHOT_READS_ENV = "IMAGER_SNAPSHOT_READS"
# The reader takes a set bit to mean that the slot in the index and the original in the cache
# are there: the daemon stores them in that order, which another core sees in that order only
# where stores are not reordered (x86); elsewhere Python gives no barrier to order them with.
DIRECT_READS_ARE_SAFE = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def snapshot_reads() -> str:
    how = os.environ.get(SNAPSHOT_READS_ENV, "") or "direct"
    if how not in ("direct", "daemon"):
        raise UsageError(f"{SNAPSHOT_READS_ENV}={how!r}: give direct or daemon")
    if how == "direct" and not DIRECT_READS_ARE_SAFE:
        log.info("reading snapshots through their daemons: direct reads rely on x86's store order")
        return "daemon"
    return how


@contextmanager
def _snapshot_reader(volume: daemon.VolumeInfo, snap: daemon.SnapshotInfo, view: BlockDevice) -> Iterator:
    """The snapshot read straight from the device and the store's files; the daemon's view,
    said in the log, where they cannot be opened as this snapshot's."""
    try:
        reader = DirectSnapshotReader(volume.device, volume.state_dir, generation=snap.generation,
                                      started_at=snap.created_at, view=view)
    except (SnapshotError, DeviceError, OSError) as e:
        log.info("%s: reading the snapshot through its daemon: %s", volume.name, e)
        reader = None
    if reader is None:
        yield view
        return
    log.info("%s: reading the snapshot from %s and the COW store's files in %s", volume.name, volume.device,
             volume.state_dir)
    with reader:
        yield reader


def _check_still_the_snapshot(name: str, taken: daemon.SnapshotInfo) -> None:
    """Everything read of volume `name` was its snapshot `taken`: the daemon still has it, valid.
    Deleting a snapshot and invalidating one are both final, so one check after the reads covers
    every read before it."""
    # A write past the front that is still in the source's page cache spoils the snapshot too.
    daemon.check_source(name)
    # A worker being replaced meanwhile answers late, not wrongly: wait for it as long as for a request.
    now = daemon.status(name, timeout=daemon.REQUEST_TIMEOUT).snapshot
    if now is None or (now.generation, now.created_at) != (taken.generation, taken.created_at):
        raise SnapshotError(f"the snapshot of {name} was deleted while it was being read")
    if now.invalid:
        raise _invalid_snapshot_error(name, now)


def _invalid_snapshot_error(name: str, snap: daemon.SnapshotInfo) -> SnapshotError:
    if snap.cache_full:
        return daemon.cache_full_error(name, snap)
    return SnapshotError(f"the snapshot of {name} is no longer point-in-time: {snap.invalid_reason}")


PROVIDERS: dict[str, Provider] = {p.name: p for p in (NoneProvider(), FreezeProvider(), CowProvider())}


def resolve_volumes(sources: Sequence[str]) -> list[daemon.VolumeInfo]:
    """The managed volumes named by `sources`: a volume name, its front device or its source
    device (from the daemons' records: no daemon is asked)."""
    volumes = daemon.known_volumes()
    chosen = []
    for source in sources:
        real = os.path.realpath(source)
        match = next((v for v in volumes if source == v.name or real in (v.front, v.device)), None)
        if match is None:
            raise UsageError(f"{source} is not an attached volume (attach it with: imager attach DEVICE); "
                             f"attached: {', '.join(v.name for v in volumes) or 'none'}")
        chosen.append(match)
    return chosen


def refuse_writing_to_frozen(frozen: dict[str, str], paths: Sequence[str]) -> None:
    """Writing to a filesystem that is frozen blocks forever: refuse before freezing."""
    frozen_devices = {os.stat(dev).st_rdev: point for dev, point in frozen.items()}
    for path in paths:
        probe = path
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        point = frozen_devices.get(os.stat(probe).st_dev)
        if point is not None:
            raise UsageError(f"{path} is on the filesystem at {point}, which this backup freezes; "
                             f"write the image (and the catalog) somewhere else")


def warn_if_mounted_rw(source: str, on_notice: Notice | None) -> None:
    """Reading a device as it is gives a crash-consistent image at best when a filesystem on it
    is mounted read-write: directly, through one of its partitions, or through the front of
    the managed volume it is the source of."""
    if not on_notice:
        return
    real = os.path.realpath(source)
    through = [source] + partition_devices(source)
    through += [v.front for v in daemon.known_volumes() if v.front and os.path.realpath(v.device) == real]
    for path in through:
        for m in mounts_of(path):
            if not m.read_only:
                on_notice(f"{path} is mounted read-write at {m.mount_point}; the image is "
                          f"crash-consistent at best (use a snapshot)")


def _explain_cow_read_error(volumes: list[daemon.VolumeInfo]) -> Callable[[PlannedVolume, Exception], Exception]:
    by_name = {v.name: v for v in volumes}

    def explain(volume: PlannedVolume, error: Exception) -> Exception:
        # The daemon answers a read of an invalidated snapshot with EIO: say why; any other
        # read error is the source's, which the daemon's log names.
        try:
            snap = daemon.status(volume.name).snapshot
        except ImagerError:
            snap = None
        if snap is not None and snap.invalid:
            return _invalid_snapshot_error(volume.name, snap)
        return ImagerError(f"{error} (reading the snapshot of {volume.name}; its daemon's log may say more: "
                           f"{by_name[volume.name].log_path})")
    return explain


def volume_key(path: str, fs_meta: dict) -> str:
    """Which volume a device holds, across backups and device renumbering: its filesystem's UUID
    where it has one, else the device itself (for a loop device, the file behind it)."""
    if fs_meta.get("uuid"):
        return f"uuid:{fs_meta['uuid']}"
    return device_identity(path)


def _volume_name(path: str) -> str:
    return os.path.basename(os.path.realpath(path)) or "volume"
