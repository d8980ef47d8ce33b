"""Devices as the system enumerates them: one DeviceRecord per device, through pyudev, or read
from /sys/class alone where pyudev cannot be loaded (no libudev). discover.py describes them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class DeviceRecord:
    """One device as enumerated: its sysfs directory and the properties udev knows of it.

    `properties` always holds the kernel's uevent keys (DEVNAME, DEVTYPE, MAJOR, MINOR);
    `in_udev_database` says whether udev's rule-made keys (ID_*) can be expected as well.
    """
    name: str
    sys_path: str
    properties: Mapping[str, str]
    in_udev_database: bool


def udev_records(subsystem: str) -> list[DeviceRecord] | None:
    """The subsystem's devices through pyudev, or None where pyudev/libudev is unavailable."""
    context = _udev_context()
    if context is None:
        return None
    try:
        return [_record_from_udev(device) for device in context.list_devices(subsystem=subsystem)]
    except (OSError, ImportError):
        return None


def udev_record_by_number(device_number: int) -> DeviceRecord | None:
    context = _udev_context()
    if context is None:
        return None
    import pyudev

    try:
        return _record_from_udev(pyudev.Devices.from_device_number(context, "block", device_number))
    except (pyudev.DeviceNotFoundError, OSError):
        return None


def _udev_context():
    try:
        import pyudev

        return pyudev.Context()
    except (ImportError, OSError):
        return None  # libudev.so missing: pyudev raises ImportError when it binds it


def _record_from_udev(device) -> DeviceRecord:
    return DeviceRecord(name=device.sys_name, sys_path=device.sys_path,
                        properties=dict(device.properties),
                        in_udev_database=bool(device.is_initialized))


def sysfs_records(sysfs_root: str, class_name: str) -> list[DeviceRecord]:
    class_dir = os.path.join(sysfs_root, "class", class_name)
    try:
        names = sorted(os.listdir(class_dir))
    except FileNotFoundError:
        return []
    records = (sysfs_record(os.path.join(class_dir, name)) for name in names)
    return [r for r in records if r is not None]


def sysfs_record(class_entry: str) -> DeviceRecord | None:
    """A device from its sysfs directory (or a link to it), with its uevent keys as properties."""
    sys_path = os.path.realpath(class_entry)
    try:
        with open(os.path.join(sys_path, "uevent")) as f:
            properties = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
    except OSError:
        return None
    return DeviceRecord(name=os.path.basename(sys_path), sys_path=sys_path,
                        properties=properties, in_udev_database=False)
