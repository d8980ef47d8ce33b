"""Device discovery against real devices: loop devices on sparse files, real filesystems from
mkfs, a real mount, real GPT and MBR partition tables from sfdisk, partitions added by partx.

Needs root and the loop driver. Every loop device, mount and partition a fixture creates is
registered for cleanup the moment it exists, so teardown removes it even when setup or a test
fails half-way.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field

import pytest

from devices import discover, loop
from devices.block import BlockDevice
from devices.device_records import DeviceRecord
from devices.discover import ESP_GPT_TYPE, BlockDeviceInfo, TapeDriveInfo
from devices.errors import DeviceError

MiB = 1 << 20
SECTOR = 512
LINUX_FILESYSTEM_GPT_TYPE = "0fc63daf-8483-4772-8e3d-693d7de4709e"

# Partition layout of the GPT test disk, in 512-byte sectors.
ESP_START, ESP_SECTORS = 2048, 32768              # 16 MiB EFI system partition
LINUX_START, LINUX_SECTORS = 34816, 65536         # 32 MiB Linux filesystem partition
GPT_DISK_SIZE = 64 * MiB

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/loop-control"),
    reason="needs root and the loop driver")


# ---------------------------------------------------------------------------------------------
# Helpers that create things and register their removal


def run(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def require_tool(name: str) -> None:
    if shutil.which(name) is None:
        pytest.skip(f"{name} is missing: run scripts/install-system-deps")


def sparse_file(path, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def attach_loop(cleanup: contextlib.ExitStack, path: str, **options) -> str:
    device = loop.attach(path, **options)
    cleanup.callback(loop.detach, device)
    return device


def mount(cleanup: contextlib.ExitStack, device: str, directory) -> str:
    os.makedirs(directory, exist_ok=True)
    run("mount", device, str(directory))
    cleanup.callback(unmount, str(directory))
    return os.path.realpath(directory)


def unmount(directory: str) -> None:
    if subprocess.run(["umount", directory], capture_output=True).returncode != 0:
        # Something still holds it (a test's open file): detach it from the tree anyway, so the
        # loop device can be released.
        subprocess.run(["umount", "-l", directory], capture_output=True)


@dataclass
class PartitionedDisk:
    """A disk image attached whole, with its partitions added by `partx -a` where that works."""
    image: str
    device: str
    partitions: dict[int, str] = field(default_factory=dict)  # partition number -> /dev/loopNpM
    partx_failure: str | None = None

    def partition(self, number: int) -> str:
        if self.partx_failure:
            pytest.skip(f"partx -a does not add partitions here: {self.partx_failure}")
        return self.partitions[number]


def add_partitions_with_partx(cleanup: contextlib.ExitStack, disk: PartitionedDisk,
                              expected_count: int) -> None:
    """`partx -a` the disk's partitions (the kernel here parses no tables itself, and the loop
    device has no LO_FLAGS_PARTSCAN): it asks the kernel to add each one through BLKPG."""
    # partx may add some partitions before it fails: remove whatever exists on teardown. A loop
    # device without PARTSCAN keeps BLKPG-added partitions after detach, hence partx -d first
    # (the ExitStack runs this before the detach registered earlier).
    cleanup.callback(subprocess.run, ["partx", "-d", disk.device], capture_output=True)
    result = subprocess.run(["partx", "-a", disk.device], capture_output=True, text=True)
    if result.returncode != 0:
        disk.partx_failure = result.stderr.strip() or f"exit status {result.returncode}"
        return
    disk_name = os.path.basename(disk.device)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = {}
        for partition_dir in glob.glob(f"/sys/class/block/{disk_name}/{disk_name}p*"):
            with open(os.path.join(partition_dir, "partition")) as f:
                found[int(f.read())] = "/dev/" + os.path.basename(partition_dir)
        if len(found) == expected_count and all(os.path.exists(p) for p in found.values()):
            disk.partitions = found
            return
        time.sleep(0.05)
    disk.partx_failure = f"partx succeeded but no partition devices appeared for {disk.device}"


def blkid_value(device: str, tag: str) -> str:
    return run("blkid", "-p", "-s", tag, "-o", "value", device).strip()


def by_name(devices: list[BlockDeviceInfo]) -> dict[str, BlockDeviceInfo]:
    return {d.name: d for d in devices}


def name_of(device_path: str) -> str:
    return os.path.basename(device_path)


# ---------------------------------------------------------------------------------------------
# Fixtures: each builds its devices once per module


@dataclass
class MountedExt4:
    image: str
    device: str
    mount_point: str


@pytest.fixture(scope="module")
def mounted_ext4(tmp_path_factory):
    require_tool("mkfs.ext4")
    work = tmp_path_factory.mktemp("ext4")
    with contextlib.ExitStack() as cleanup:
        image = sparse_file(work / "ext4.img", 64 * MiB)
        # A label with a space: blkid escapes it in its export format.
        run("mkfs.ext4", "-q", "-L", "imager data", image)
        device = attach_loop(cleanup, image)
        mount_point = mount(cleanup, device, work / "mnt")
        yield MountedExt4(image, device, mount_point)


@dataclass
class ReadOnlyXfs:
    image: str
    device: str


@pytest.fixture(scope="module")
def read_only_xfs(tmp_path_factory):
    require_tool("mkfs.xfs")
    work = tmp_path_factory.mktemp("xfs")
    with contextlib.ExitStack() as cleanup:
        image = sparse_file(work / "xfs.img", 320 * MiB)  # mkfs.xfs refuses below 300 MiB
        run("mkfs.xfs", "-q", "-f", "-L", "imagerxfs", image)
        yield ReadOnlyXfs(image, attach_loop(cleanup, image, read_only=True))


@dataclass
class GptDisk(PartitionedDisk):
    esp_range_device: str = ""  # the ESP's byte range alone, as a loop device with an offset


@pytest.fixture(scope="module")
def gpt_disk(tmp_path_factory):
    for tool in ("sfdisk", "partx", "mkfs.vfat"):
        require_tool(tool)
    work = tmp_path_factory.mktemp("gpt")
    with contextlib.ExitStack() as cleanup:
        image = sparse_file(work / "gpt.img", GPT_DISK_SIZE)
        table = (
            "label: gpt\n"
            f"start={ESP_START}, size={ESP_SECTORS}, type={ESP_GPT_TYPE.upper()}, name=\"EFI\"\n"
            f"start={LINUX_START}, size={LINUX_SECTORS}, type={LINUX_FILESYSTEM_GPT_TYPE}\n"
        )
        subprocess.run(["sfdisk", "-q", image], input=table, text=True, check=True,
                       capture_output=True)
        # Format the ESP through a loop device on its byte range, before the whole disk is
        # attached, so the whole-disk device never caches the range's old contents.
        esp_range_device = attach_loop(cleanup, image, offset=ESP_START * SECTOR,
                                       size_limit=ESP_SECTORS * SECTOR)
        run("mkfs.vfat", "-n", "ESP", esp_range_device)
        disk = GptDisk(image=image, device=attach_loop(cleanup, image),
                       esp_range_device=esp_range_device)
        add_partitions_with_partx(cleanup, disk, expected_count=2)
        yield disk


@pytest.fixture(scope="module")
def mbr_disk(tmp_path_factory):
    for tool in ("sfdisk", "partx"):
        require_tool(tool)
    work = tmp_path_factory.mktemp("mbr")
    with contextlib.ExitStack() as cleanup:
        image = sparse_file(work / "mbr.img", 16 * MiB)
        subprocess.run(["sfdisk", "-q", image], input="label: dos\nstart=2048, size=8192, type=ef\n",
                       text=True, check=True, capture_output=True)
        disk = PartitionedDisk(image=image, device=attach_loop(cleanup, image))
        add_partitions_with_partx(cleanup, disk, expected_count=1)
        yield disk


# ---------------------------------------------------------------------------------------------
# Block devices: loop devices with filesystems


def test_attached_loop_devices_are_listed_with_their_geometry(mounted_ext4, read_only_xfs):
    listed = by_name(discover.list_block_devices())
    for image, device in ((mounted_ext4.image, mounted_ext4.device),
                          (read_only_xfs.image, read_only_xfs.device)):
        info = listed[name_of(device)]
        assert info.path == device
        assert info.kind == "loop"
        assert info.parent is None
        assert info.size == os.path.getsize(image)
        assert info.backing_file == os.path.realpath(image)
        # The kernel's own answer, through the block ioctls, is the reference.
        with BlockDevice(device) as opened:
            assert info.size == opened.size
            assert info.logical_sector_size == opened.logical_sector_size
            assert info.physical_sector_size == opened.physical_sector_size
        st = os.stat(device)
        assert info.device_number == f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def test_filesystem_type_label_and_uuid(mounted_ext4, read_only_xfs):
    listed = by_name(discover.list_block_devices())
    ext4 = listed[name_of(mounted_ext4.device)]
    assert (ext4.fs_type, ext4.label) == ("ext4", "imager data")
    assert ext4.uuid == blkid_value(mounted_ext4.device, "UUID")
    xfs = listed[name_of(read_only_xfs.device)]
    assert (xfs.fs_type, xfs.label) == ("xfs", "imagerxfs")
    assert xfs.uuid == blkid_value(read_only_xfs.device, "UUID")
    assert ext4.uuid != xfs.uuid


def test_mount_points_come_from_mountinfo(mounted_ext4, read_only_xfs):
    listed = by_name(discover.list_block_devices())
    assert listed[name_of(mounted_ext4.device)].mount_points == [mounted_ext4.mount_point]
    assert listed[name_of(read_only_xfs.device)].mount_points == []


def test_read_only_flag_follows_the_loop_attachment(mounted_ext4, read_only_xfs):
    listed = by_name(discover.list_block_devices())
    assert listed[name_of(read_only_xfs.device)].read_only is True
    assert listed[name_of(mounted_ext4.device)].read_only is False


def test_describe_gives_the_listed_description_also_through_a_symlink(mounted_ext4, tmp_path):
    listed = by_name(discover.list_block_devices())[name_of(mounted_ext4.device)]
    assert discover.describe(mounted_ext4.device) == listed
    alias = tmp_path / "by-label-imager-data"
    alias.symlink_to(mounted_ext4.device)
    described = discover.describe(str(alias))
    assert described == listed
    assert described.path == mounted_ext4.device  # the canonical node, not the alias


def test_describe_refuses_what_is_not_a_block_device(mounted_ext4, tmp_path):
    with pytest.raises(DeviceError, match="not a block device"):
        discover.describe(mounted_ext4.image)
    with pytest.raises(DeviceError):
        discover.describe(str(tmp_path / "no-such-device"))


def test_descriptions_serialise_to_json(mounted_ext4):
    info = discover.describe(mounted_ext4.device)
    decoded = json.loads(json.dumps(info.to_dict()))
    assert decoded["name"] == info.name
    assert decoded["mount_points"] == [mounted_ext4.mount_point]
    assert decoded["is_esp"] is False


def test_empty_devices_and_ram_disks_are_listed_only_when_asked(mounted_ext4):
    def empty_or_ram_in_sysfs() -> set[str]:
        names = set()
        for sys_dir in glob.glob("/sys/class/block/*"):
            with open(os.path.join(sys_dir, "size")) as f:
                if int(f.read()) == 0 or os.path.basename(sys_dir).startswith(("ram", "zram")):
                    names.add(os.path.basename(sys_dir))
        return names

    before = empty_or_ram_in_sysfs()
    default = by_name(discover.list_block_devices())
    everything = by_name(discover.list_block_devices(include_empty=True))
    after = empty_or_ram_in_sysfs()
    assert name_of(mounted_ext4.device) in default
    assert set(default) <= set(everything)
    assert all(d.size > 0 for d in default.values())
    assert not [n for n in default if n.startswith(("ram", "zram"))]
    # Other tests may attach or detach loop devices meanwhile: judge only the devices that
    # were empty (or RAM disks) both before and after the listings.
    steadily_empty = before & after
    assert not steadily_empty & set(default)
    assert steadily_empty <= set(everything)


def test_sysfs_alone_describes_devices_as_udev_enumeration_does(mounted_ext4, read_only_xfs,
                                                                 gpt_disk):
    ours = {name_of(d) for d in (mounted_ext4.device, read_only_xfs.device, gpt_disk.device,
                                 gpt_disk.esp_range_device, *gpt_disk.partitions.values())}
    through_udev = {n: d for n, d in by_name(discover.list_block_devices()).items() if n in ours}
    through_sysfs = {n: d for n, d in by_name(discover.list_block_devices(use_udev=False)).items()
                     if n in ours}
    assert set(through_udev) == ours
    assert through_sysfs == through_udev


def test_blkid_runs_at_most_once_per_device(monkeypatch, mounted_ext4, gpt_disk):
    probed_paths = []
    real_probe = discover.probe_with_blkid

    def counting_probe(device_path):
        probed_paths.append(device_path)
        return real_probe(device_path)

    monkeypatch.setattr(discover, "probe_with_blkid", counting_probe)
    listed = discover.list_block_devices()
    assert len(probed_paths) == len(set(probed_paths))
    assert set(probed_paths) <= {d.path for d in listed}


def test_udev_properties_are_used_without_probing(monkeypatch, mounted_ext4):
    """Where udev's database knows a device, its properties are taken as they are and blkid is
    not run. (There is no udev database here, so the record is made up for a real device.)"""
    def no_probe(device_path):
        raise AssertionError(f"blkid probed {device_path} although udev had its properties")

    monkeypatch.setattr(discover, "probe_with_blkid", no_probe)
    sys_path = os.path.realpath(f"/sys/class/block/{name_of(mounted_ext4.device)}")
    record = DeviceRecord(
        name=name_of(mounted_ext4.device), sys_path=sys_path, in_udev_database=True,
        properties={"DEVNAME": mounted_ext4.device, "ID_FS_TYPE": "ext4",
                    "ID_FS_LABEL": "imager_data", "ID_FS_LABEL_ENC": "imager\\x20data",
                    "ID_FS_UUID": "0b5e6c1a-0000-4000-8000-000000000001"})
    info = discover._describe_record(record, all_mounts=[])
    assert (info.fs_type, info.label, info.uuid) == (
        "ext4", "imager data", "0b5e6c1a-0000-4000-8000-000000000001")
    assert info.size == os.path.getsize(mounted_ext4.image)


def test_blkid_export_escapes_are_undone():
    parsed = discover.parse_blkid_export(
        'DEVNAME=/dev/loop0\nLABEL=my\\ disk\\ \\"A\\"\nUUID=1234-ABCD\nTYPE=vfat\n')
    assert parsed == {"DEVNAME": "/dev/loop0", "LABEL": 'my disk "A"', "UUID": "1234-ABCD",
                      "TYPE": "vfat"}


# ---------------------------------------------------------------------------------------------
# Partitions and the EFI system partition


def test_esp_byte_range_as_a_bare_loop_device_has_no_partition_context(gpt_disk):
    info = discover.describe(gpt_disk.esp_range_device)
    assert info.kind == "loop"
    assert info.size == ESP_SECTORS * SECTOR
    assert (info.fs_type, info.label) == ("vfat", "ESP")
    assert info.uuid == blkid_value(gpt_disk.esp_range_device, "UUID")
    # A loop device with an offset is not a partition: nothing says what type it had.
    assert info.partition_type is None
    assert info.is_esp is False


def test_whole_gpt_disk_shows_its_partition_table(gpt_disk):
    info = discover.describe(gpt_disk.device)
    assert info.kind == "loop"
    assert info.size == GPT_DISK_SIZE
    assert info.partition_table == "gpt"
    assert info.fs_type is None
    assert info.is_esp is False


def test_gpt_partitions_added_by_partx(gpt_disk):
    esp_path, linux_path = gpt_disk.partition(1), gpt_disk.partition(2)
    listed = by_name(discover.list_block_devices())
    disk = listed[name_of(gpt_disk.device)]

    esp = listed[name_of(esp_path)]
    assert esp.path == esp_path
    assert (esp.kind, esp.parent) == ("partition", disk.name)
    assert esp.size == ESP_SECTORS * SECTOR
    assert (esp.logical_sector_size, esp.physical_sector_size) == (
        disk.logical_sector_size, disk.physical_sector_size)
    assert (esp.partition_type, esp.partition_scheme) == (ESP_GPT_TYPE, "gpt")
    assert esp.partition_table is None
    assert esp.is_esp is True
    assert (esp.fs_type, esp.label) == ("vfat", "ESP")
    assert esp.uuid == blkid_value(esp_path, "UUID")

    linux = listed[name_of(linux_path)]
    assert (linux.kind, linux.parent) == ("partition", disk.name)
    assert linux.size == LINUX_SECTORS * SECTOR
    assert linux.partition_type == LINUX_FILESYSTEM_GPT_TYPE
    assert linux.is_esp is False
    assert linux.fs_type is None


def test_mbr_partition_of_type_ef_is_an_esp(mbr_disk):
    info = discover.describe(mbr_disk.partition(1))
    assert (info.kind, info.parent) == ("partition", name_of(mbr_disk.device))
    assert info.size == 8192 * SECTOR
    assert (info.partition_type, info.partition_scheme) == ("0xef", "dos")
    assert info.is_esp is True
    assert discover.describe(mbr_disk.device).partition_table == "dos"


# ---------------------------------------------------------------------------------------------
# Tape drives


def test_no_tape_drives_here():
    drives_in_sysfs = glob.glob("/sys/class/scsi_tape/nst[0-9]*")
    if any(os.path.basename(p)[3:].isdigit() for p in drives_in_sysfs):
        pytest.skip("this machine has tape drives")
    assert discover.list_tape_drives() == []
    assert discover.list_tape_drives(use_udev=False) == []


def make_fake_tape_sysfs(root, number: int, vendor: str, model: str,
                         unit_serial: bytes | None) -> None:
    """The sysfs of one st drive as the kernel lays it out: the SCSI device's directory with
    its INQUIRY strings, a scsi_tape directory per node, each linked from class/scsi_tape."""
    scsi_device = root / "devices" / "pci0000:00" / f"host{number}" / f"target{number}:0:0" / f"{number}:0:0:0"
    (scsi_device / "scsi_tape").mkdir(parents=True)
    # sysfs pads INQUIRY strings with spaces to their field width.
    (scsi_device / "vendor").write_text(vendor.ljust(8) + "\n")
    (scsi_device / "model").write_text(model.ljust(16) + "\n")
    if unit_serial is not None:
        (scsi_device / "vpd_pg80").write_bytes(bytes([0x01, 0x80, 0, len(unit_serial)]) + unit_serial)
    class_dir = root / "class" / "scsi_tape"
    class_dir.mkdir(parents=True, exist_ok=True)
    # Every mode of the drive has a rewinding and a non-rewinding node.
    for minor_offset, suffix in enumerate(("", "l", "m", "a")):
        for rewind_prefix, rewind_bit in (("st", 0), ("nst", 128)):
            name = f"{rewind_prefix}{number}{suffix}"
            node_dir = scsi_device / "scsi_tape" / name
            node_dir.mkdir()
            (node_dir / "uevent").write_text(
                f"MAJOR=9\nMINOR={number + 32 * minor_offset + rewind_bit}\nDEVNAME={name}\n")
            (node_dir / "device").symlink_to(os.path.relpath(scsi_device, node_dir))
            (class_dir / name).symlink_to(os.path.relpath(node_dir, class_dir))


def test_tape_drives_from_a_sysfs_tree(tmp_path):
    make_fake_tape_sysfs(tmp_path, 1, "IBM", "ULT3580-TD9", unit_serial=b"1013000123  ")
    make_fake_tape_sysfs(tmp_path, 0, "HP", "Ultrium 8-SCSI", unit_serial=None)
    drives = discover.tape_drives_from_sysfs(str(tmp_path), dev_root="/dev")
    assert drives == [
        TapeDriveInfo(name="st0", path="/dev/nst0", vendor="HP", model="Ultrium 8-SCSI",
                      serial=None),
        TapeDriveInfo(name="st1", path="/dev/nst1", vendor="IBM", model="ULT3580-TD9",
                      serial="1013000123"),
    ]
    assert json.loads(json.dumps(drives[1].to_dict()))["path"] == "/dev/nst1"


def test_tape_sysfs_tree_without_the_class_has_no_drives(tmp_path):
    assert discover.tape_drives_from_sysfs(str(tmp_path)) == []


def test_only_a_partition_is_a_partition(gpt_disk, tmp_path):
    """Each cow backup asks whether its volume could be an ESP by this test first: a device it
    calls no partition is never checked for the ESP's partition type."""
    assert discover.is_partition(gpt_disk.partition(1)) and discover.is_partition(gpt_disk.partition(2))
    assert not discover.is_partition(gpt_disk.device)
    assert not discover.is_partition(gpt_disk.esp_range_device)
    assert not discover.is_partition(str(sparse_file(tmp_path / "file.img", MiB)))
    assert not discover.is_partition(str(tmp_path / "missing"))
