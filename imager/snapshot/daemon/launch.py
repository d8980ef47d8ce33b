"""Starting a volume's daemon: `attach(DEV)` checks what may be attached where, starts the
daemon (server.py) in its own session, and waits until it serves the front or says why not."""

from __future__ import annotations

import os
import re
import stat
import sys
import time

from devices import discover
from devices.block import BlockDevice, stat_volume
from devices.errors import DeviceError
from devices.fs import mounts_of
from devices.topology import in_use_above, path_is_on, same_file

from ...errors import VolumeError, VolumeRefused
from ...private import make_private_dir
from ...spawn import RUN_DIR_ENV, start_daemon
from .protocol import (LOG_NAME, MAX_SOCKET_PATH, SOCKET_NAME, VolumeInfo, check_name, daemon_state,
                       default_state_dir, error_from, records, run_dir_of, volume_from)

READY_TIMEOUT = 60.0


def attach(device: str, name: str | None = None, cache_path: str | None = None,
           cache_size: int | None = None, *, block_size: int | None = None,
           watchdog: float | None = None, wait_for_device: float = 0.0) -> VolumeInfo:
    """Start managing `device`: returns once the daemon serves it and its front loop device exists.

    `cache_path` is the state directory (bitmap, index, cache region, log); it must not be on the
    device itself nor on the front of any managed volume. `cache_size` caps the cache region in
    bytes (None: bounded only by free space there). `watchdog`: seconds after which a worker that
    does not answer is replaced (0: never; None: the default). `wait_for_device`: seconds to
    wait for `device` to appear (at boot, udev may not have made it yet)."""
    _wait_for(device, wait_for_device)
    try:
        return _attach(device, name, cache_path, cache_size, block_size, watchdog)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise VolumeError(f"cannot attach {device}: {e.strerror}{where}") from None


def _wait_for(device: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not os.path.exists(device) and time.monotonic() < deadline:
        time.sleep(0.1)


def _attach(device: str, name: str | None, cache_path: str | None, cache_size: int | None,
            block_size: int | None, watchdog: float | None) -> VolumeInfo:
    device = os.path.abspath(device)
    _check_attachable(device)
    name = check_name(name if name is not None else _default_name(device))
    volumes = records()
    for v in volumes:
        failed = daemon_state(v)[0] == "failed"
        recovery = (f"; its daemon died: recover it with imager recover {v['name']}" if failed else "")
        if v["name"] == name:
            raise VolumeRefused(f"a volume named {name!r} is already attached ({v['device']}){recovery}")
        if same_file(v["device"], device):
            raise VolumeRefused(f"{device} is already managed as {v['name']!r} (front {v.get('front')}){recovery}")
        if v.get("front") and same_file(v["front"], device):
            raise VolumeRefused(f"{device} is the front device of managed volume {v['name']!r}, "
                              f"which is already managed through {v['device']}")
    state_dir = os.path.abspath(cache_path or default_state_dir(name))
    make_private_dir(state_dir)
    for v in volumes:
        if v.get("front") and path_is_on(v["front"], state_dir):
            raise VolumeError(f"the state directory {state_dir} is on the front of managed volume "
                              f"{v['name']!r}; freezing that volume would stall this daemon")
    run_dir = run_dir_of(name)
    if len(os.path.join(run_dir, SOCKET_NAME)) > MAX_SOCKET_PATH:
        raise VolumeError(f"run directory {run_dir} is too long for a Unix socket path; set "
                          f"{RUN_DIR_ENV} to a shorter directory")
    from .client import clear_stale_run_dir  # the client cleans up after dead daemons

    clear_stale_run_dir(run_dir)
    make_private_dir(run_dir)

    log_path = os.path.join(state_dir, LOG_NAME)
    command = [sys.executable, "-m", "imager.snapshot.daemon.process", "--name", name, "--device", device,
               "--state-dir", state_dir, "--run-dir", run_dir]
    if cache_size is not None:
        command += ["--cache-size", str(int(cache_size))]
    if block_size is not None:
        command += ["--block-size", str(int(block_size))]
    if watchdog is not None:
        command += ["--watchdog", repr(float(watchdog))]
    reply = start_daemon(command, log_path, what="the volume daemon", error=VolumeError, timeout=READY_TIMEOUT)
    if not reply.get("ok"):
        raise error_from(reply)
    return volume_from(reply["volume"])


def _check_attachable(device: str) -> None:
    try:
        st = stat_volume(device)
    except DeviceError as e:
        raise VolumeRefused(str(e)) from None
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise VolumeRefused(f"{device}: is empty (size 0); a volume needs room for a filesystem")
    if stat.S_ISBLK(st.st_mode):
        refuse_esp(device, "cow")
    mounted = mounts_of(device)
    if mounted:
        raise VolumeRefused(f"{device} is mounted at {', '.join(m.mount_point for m in mounted)}; "
                          f"unmount it, attach, then mount the front device instead")
    # Another way in to the same bytes that is in use (the served file of another volume's
    # front, a loop device on the device mounted) would be a second writer the front never sees.
    above = in_use_above(device)
    if above is not None:
        how = f"mounted at {above[1]}" if above[1] else "held open exclusively"
        raise VolumeRefused(f"{device} is in use through {above[0]} ({how}); a managed volume must be the only "
                            f"way its bytes are written")
    try:
        with BlockDevice(device, writable=False) as probe:
            read_only = probe.read_only
    except DeviceError as e:
        raise VolumeRefused(str(e)) from None
    if read_only:
        raise VolumeRefused(f"{device}: is read-only; a managed volume writes through to its device")
    if stat.S_ISREG(st.st_mode) and st.st_size % 512:
        raise VolumeRefused(f"{device}: its size, {st.st_size} bytes, is not a multiple of 512; its front would "
                            f"leave the last {st.st_size % 512} bytes out of reach (truncate it to whole sectors)")


def refuse_esp(device: str, provider: str) -> None:
    """The cow provider cannot stand between the firmware and an EFI system partition: the
    firmware and boot loaders write it before any daemon can intercept their writes."""
    # Only a partition has a partition type, the mark of an ESP. Every cow backup asks this, and
    # describe() loads libudev (40-60 ms of an incremental that takes a second).
    if not discover.is_partition(device):
        return
    try:
        info = discover.describe(device)
    except DeviceError:
        return
    if info.is_esp:
        raise VolumeError(f"{device} is an EFI system partition: the {provider} provider cannot snapshot it "
                          f"(firmware and boot loaders write it where no daemon can intercept the writes); image it "
                          f"with --snapshot freeze (kept frozen while read; it is small) or, unmounted, "
                          f"with --snapshot none")


def _default_name(device: str) -> str:
    base = os.path.basename(device)
    return re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip("._-") or "volume"
