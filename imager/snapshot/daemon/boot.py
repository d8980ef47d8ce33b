"""A managed volume at boot: the systemd unit template imager-volume@NAME.service attaches the
volume before the filesystem on its front is mounted and detaches it after that is unmounted
(the change tracker then stays trusted across the reboot), and the fstab line that ties the
two together through the front's stable name, RUN/NAME/front.

    /etc/imager/volumes/NAME.conf     DEVICE=/dev/disk/by-id/...   (the source)
                                      ATTACH_OPTIONS=--cache /var/lib/imager/NAME   (optional)
    /etc/fstab                        RUN/NAME/front /srv/NAME ext4 x-systemd.requires=imager-volume@NAME.service 0 0

The fstab pass number is 0: systemd checks only filesystems named by a /dev path, and the front's
loop device number is not stable.
"""

from __future__ import annotations

import os
import shutil
import sys

from ...spawn import DEFAULT_RUN_DIR, RUN_DIR_ENV, run_base
from .protocol import DEFAULT_STATE_DIR, FRONT_LINK, PID_NAME, STATE_DIR_ENV

CONFIG_DIR = "/etc/imager/volumes"
UNIT_NAME = "imager-volume@.service"


def imager_command() -> str:
    """The installed `imager` next to this interpreter, else found on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "imager")
    return beside if os.access(beside, os.X_OK) else shutil.which("imager") or "/usr/bin/imager"


def unit_text(imager: str | None = None) -> str:
    imager = imager or imager_command()
    run = run_base()
    environment = ""
    if run != DEFAULT_RUN_DIR:
        environment += f"Environment={RUN_DIR_ENV}={run}\n"
    state = os.environ.get(STATE_DIR_ENV)
    if state and state != DEFAULT_STATE_DIR:
        environment += f"Environment={STATE_DIR_ENV}={state}\n"
    return f"""\
# imager: a managed volume, attached before the filesystem on its front is mounted and detached
# after it is unmounted. Install as /etc/systemd/system/{UNIT_NAME}; describe volume NAME in
# {CONFIG_DIR}/NAME.conf (DEVICE=..., optional ATTACH_OPTIONS=...); mount it from /etc/fstab:
#   {run}/NAME/{FRONT_LINK} /srv/NAME ext4 defaults,x-systemd.requires=imager-volume@NAME.service 0 0
[Unit]
Description=imager managed volume %I
# Before local-fs.target, where the front's filesystem is mounted: none of the default
# dependencies on basic.target, which comes after it.
DefaultDependencies=no
After=systemd-udevd.service systemd-remount-fs.service
Wants=systemd-udevd.service
# The state directory (bitmap, cache region, change tracker) must be there before the volume
# is attached and until it is detached. Add the --cache directory of ATTACH_OPTIONS if elsewhere.
RequiresMountsFor={state or DEFAULT_STATE_DIR}
Conflicts=shutdown.target
Before=shutdown.target
ConditionPathExists={CONFIG_DIR}/%i.conf

[Service]
Type=forking
PIDFile={run}/%i/{PID_NAME}
{environment}EnvironmentFile={CONFIG_DIR}/%i.conf
# --wait: at boot the device may appear after the unit starts.
ExecStart={imager} attach --wait 60 --name %i $ATTACH_OPTIONS ${{DEVICE}}
# A clean detach marks the change tracker clean: the first incremental after the reboot uses it.
ExecStop={imager} detach %i
# The supervisor alone gets the stop signal: it hands it to its worker, which detaches as
# `imager detach` would.
KillMode=process
TimeoutStartSec=90
TimeoutStopSec=120

[Install]
WantedBy=local-fs.target
"""


def fstab_line(name: str, mount_point: str, fstype: str = "ext4", options: str = "defaults") -> str:
    return (f"{run_base()}/{name}/{FRONT_LINK} {mount_point} {fstype} "
            f"{options},x-systemd.requires=imager-volume@{name}.service 0 0")
