"""GPT and MBR tables read by plain reads, checked against sfdisk; the whole-disk used-block plan
on real partitioned image files (filesystems made through loop devices with an offset)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from devices import loop
from devices.discover import ESP_GPT_TYPE
from devices.fs import file_extents
from devices.partitions import PartitionTableDamaged, read_partition_table
from imager.plan.planner import plan_disk, plan_volume
from imager.plan.usedmap import UsedMap

from conftest import run

MiB = 1 << 20
LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
ESP = ESP_GPT_TYPE.upper()

needs_loop = pytest.mark.skipif(not os.access("/dev/loop-control", os.W_OK),
                                reason="needs root and /dev/loop-control")


def make_disk(path: Path, size: int, script: str, *sfdisk_args: str) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "-q", *sfdisk_args, str(path)], input=script, text=True, check=True,
                   capture_output=True)
    return path


def sfdisk_json(path: Path, *sfdisk_args: str) -> dict:
    return json.loads(run("sfdisk", "-J", *sfdisk_args, str(path)).stdout)["partitiontable"]


def loops_holding(path: Path) -> list:
    return [info for info in loop.list_attached() if info.backing_file == str(path.resolve())]


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


GPT_SCRIPT = f"""label: gpt
start=2048, size=4MiB, type={ESP}, name="EFI system"
start=8MiB, size=3MiB, type={LINUX_FS}, name="données ü"
size=2MiB, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F
"""


@pytest.fixture
def gpt_image(tmp_path):
    return make_disk(tmp_path / "gpt.img", 16 * MiB, GPT_SCRIPT)


def partition_number(node: str, device: str) -> int:
    """sfdisk names partition N of disk.img "disk.imgN" and of /dev/loop3 "/dev/loop3pN"."""
    return int(node[len(device):].lstrip("p"))


def assert_same_as_sfdisk(table, expected: dict, device: str) -> None:
    assert table.sector_size == expected["sectorsize"]
    assert table.disk_id == expected["id"].lower()
    by_number = {p.number: p for p in table.partitions}
    assert sorted(by_number) == sorted(partition_number(e["node"], device) for e in expected["partitions"])
    ss = expected["sectorsize"]
    for e in expected["partitions"]:
        p = by_number[partition_number(e["node"], device)]
        assert p.start_byte == e["start"] * ss
        assert p.size_bytes == e["size"] * ss
        if expected["label"] == "gpt":
            assert p.type_id == e["type"].lower()
            assert p.uuid == e["uuid"].lower()
            assert p.name == e.get("name", "")
        else:
            assert int(p.type_id, 16) == int(e["type"], 16)


def test_gpt_matches_sfdisk(gpt_image):
    table = read_partition_table(str(gpt_image))
    assert table.scheme == "gpt" and table.warnings == []
    assert table.disk_size == 16 * MiB
    assert_same_as_sfdisk(table, sfdisk_json(gpt_image), str(gpt_image))
    esp, data, swap = table.partitions
    assert esp.is_esp and esp.type_name == "EFI System" and esp.name == "EFI system"
    assert not data.is_esp and data.name == "données ü" and data.type_name == "Linux filesystem"
    assert swap.type_name == "Linux swap" and swap.start_byte == 11 * MiB
    json.loads(json.dumps(table.to_dict()))  # it goes into the image header


@pytest.mark.parametrize("where, problem", [
    (512 + 56, "header CRC mismatch"),                     # the disk GUID in the primary header
    (2 * 512 + 128 + 40, "partition entry array CRC mismatch"),  # entry 2's last LBA
])
def test_damaged_primary_gpt_falls_back_to_the_backup_and_says_so(gpt_image, where, problem):
    expected = read_partition_table(str(gpt_image))
    flip_byte(gpt_image, where)
    table = read_partition_table(str(gpt_image))
    assert table.partitions == expected.partitions
    assert table.disk_id == expected.disk_id
    assert len(table.warnings) == 1
    assert "primary GPT is damaged" in table.warnings[0] and problem in table.warnings[0]
    assert f"backup GPT in LBA {16 * MiB // 512 - 1}" in table.warnings[0]


def test_damaged_backup_gpt_is_reported_and_the_primary_used(gpt_image):
    expected = read_partition_table(str(gpt_image))
    flip_byte(gpt_image, 16 * MiB - 512 + 60)
    table = read_partition_table(str(gpt_image))
    assert table.partitions == expected.partitions
    assert len(table.warnings) == 1 and "backup GPT" in table.warnings[0]


def test_both_gpt_headers_damaged_is_an_error(gpt_image):
    flip_byte(gpt_image, 512 + 60)
    flip_byte(gpt_image, 16 * MiB - 512 + 60)
    with pytest.raises(PartitionTableDamaged, match="GPT is damaged.*primary.*CRC.*backup.*CRC"):
        read_partition_table(str(gpt_image))


@needs_loop
def test_gpt_of_a_4k_sector_disk_on_the_device_and_in_its_image_file(tmp_path):
    image = tmp_path / "4kn.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    device = loop.attach(str(image), block_size=4096)  # a disk with 4096-byte logical sectors
    try:
        make_disk_on = f"label: gpt\nsize=8MiB, type={ESP}\nsize=16MiB, type={LINUX_FS}, name=root\n"
        run_input = subprocess.run(["sfdisk", "-q", device], input=make_disk_on, text=True,
                                   capture_output=True)
        assert run_input.returncode == 0, run_input.stderr
        expected = sfdisk_json(Path(device))
        assert expected["sectorsize"] == 4096
        on_device = read_partition_table(device)
    finally:
        loop.detach(device)
    assert_same_as_sfdisk(on_device, expected, device)
    # an image file has no sector size of its own: the GPT header's place tells it
    in_file = read_partition_table(str(image))
    assert in_file.sector_size == 4096 and in_file.partitions == on_device.partitions


MBR_SCRIPT = """label: dos
label-id: 0x1234abcd
start=2048, size=4MiB, type=83, bootable
start=5MiB, size=4MiB, type=ef
start=10MiB, size=20MiB, type=5
start=11MiB, size=6MiB, type=83
start=18MiB, size=5MiB, type=82
start=24MiB, size=3MiB, type=83
"""

def test_mbr_with_logical_partitions_matches_sfdisk(tmp_path):
    image = make_disk(tmp_path / "mbr.img", 32 * MiB, MBR_SCRIPT)
    table = read_partition_table(str(image))
    assert table.scheme == "mbr" and table.warnings == []
    assert table.disk_id == "0x1234abcd"
    assert_same_as_sfdisk(table, sfdisk_json(image), str(image))
    numbers = {p.number: p for p in table.partitions}
    assert sorted(numbers) == [1, 2, 3, 5, 6, 7]
    assert numbers[2].is_esp and numbers[2].type_id == "0xef"
    assert numbers[3].is_extended and numbers[3].type_name == "Extended"
    assert numbers[6].type_name == "Linux swap / Solaris"
    assert numbers[5].uuid == "1234abcd-05"  # the kernel's PARTUUID for an MBR partition
    extended = numbers[3]
    for n in (5, 6, 7):  # each logical partition lies inside the extended one, after its EBR
        assert extended.start_byte < numbers[n].start_byte and numbers[n].end_byte <= extended.end_byte


def test_no_partition_table(tmp_path):
    random_bytes = tmp_path / "random.img"
    random_bytes.write_bytes(os.urandom(4 * MiB))
    assert read_partition_table(str(random_bytes)) is None
    fat = tmp_path / "fat.img"
    with open(fat, "wb") as f:
        f.truncate(32 * MiB)
    run("mkfs.vfat", str(fat))
    # a FAT boot sector carries the 0x55AA signature too, but no table
    assert read_partition_table(str(fat)) is None


# --- plan_disk on real filesystems -----------------------------------------------------------

DISK_SIZE = 800 * MiB
GPT_DISK_SCRIPT = f"""label: gpt
start=2048, size=64MiB, type={ESP}, name="EFI system"
start=200MiB, size=200MiB, type={LINUX_FS}, name="root ext4"
size=320MiB, type={LINUX_FS}, name="data xfs"
"""


def make_filesystems(image: Path, mkfs: dict[int, list[str]], tmp_path: Path) -> list[tuple[int, int]]:
    """mkfs each partition through a loop device over its byte range; write a file on each
    ext4 one. Returns that file's extents as byte ranges on the whole disk."""
    table = read_partition_table(str(image))
    extents = []
    for number, command in mkfs.items():
        p = table.partition(number)
        dev = loop.attach(str(image), offset=p.start_byte, size_limit=p.size_bytes)
        try:
            run(*command, dev)
            if command[0] == "mkfs.ext4":
                point = tmp_path / f"part{number}"
                point.mkdir()
                run("mount", dev, str(point))
                try:
                    (point / "data.bin").write_bytes(os.urandom(3 * MiB))
                    os.sync()
                    extents += [(p.start_byte + s, p.start_byte + e)
                                for s, e in file_extents(str(point / "data.bin"), exclusive_only=False)]
                finally:
                    run("umount", str(point))
        finally:
            loop.detach(dev)
    return extents


@pytest.fixture(scope="module")
def gpt_disk(tmp_path_factory):
    """An 800 MiB GPT disk image: ESP (vfat), a gap, ext4 with a file, xfs; unmounted."""
    directory = tmp_path_factory.mktemp("gptdisk")
    image = make_disk(directory / "disk.img", DISK_SIZE, GPT_DISK_SCRIPT)
    extents = make_filesystems(image, {1: ["mkfs.vfat"], 2: ["mkfs.ext4", "-q", "-F"],
                                       3: ["mkfs.xfs", "-q", "-f"]}, directory)
    return image, extents


@needs_loop
def test_plan_disk_keeps_tables_gaps_and_esp_and_plans_each_filesystem(gpt_disk):
    image, file_extents_on_disk = gpt_disk
    table = read_partition_table(str(image))
    plan = plan_disk(str(image))
    assert plan.size == DISK_SIZE and plan.mode == "used-blocks"
    # protective MBR, primary header and entries; backup entries and header at the end
    assert plan.covers(0, 34 * 512)
    assert plan.covers(DISK_SIZE - 33 * 512, DISK_SIZE)
    esp, root, data = table.partitions
    assert plan.covers(esp.start_byte, esp.end_byte)
    assert plan.covers(esp.end_byte, root.start_byte)   # the gap between partitions
    assert plan.covers(data.end_byte, DISK_SIZE)          # space after the last partition
    assert plan.covers(root.start_byte + 1024, root.start_byte + 2048)  # ext4 superblock
    assert plan.covers(data.start_byte, data.start_byte + 512)          # xfs superblock
    for start, end in file_extents_on_disk:
        assert plan.covers(start, end), f"file extent {start}-{end} left out"
    # each filesystem's free space is left out
    inside_root = plan.minus([(0, root.start_byte), (root.end_byte, DISK_SIZE)])
    assert inside_root.used_bytes < root.size_bytes // 4
    assert plan.used_bytes < DISK_SIZE // 2
    parts = {p["number"]: p for p in plan.to_dict()["parts"]}
    assert parts[1]["mode"] == "all-blocks" and parts[1]["fs_type"] == "vfat"
    assert "EFI system partition" in parts[1]["reason"]
    assert (parts[2]["mode"], parts[2]["fs_type"]) == ("used-blocks", "ext4")
    assert (parts[3]["mode"], parts[3]["fs_type"]) == ("used-blocks", "xfs")
    json.dumps(plan.to_dict())
    assert loops_holding(image) == []
    assert plan_volume(str(image)).ranges == plan.ranges


@needs_loop
def test_plan_disk_takes_a_better_plan_for_a_partition_from_the_caller(gpt_disk):
    image, _ = gpt_disk
    root = read_partition_table(str(image)).partition(2)
    given = UsedMap.all_blocks(root.size_bytes, "planned by the caller")
    plan = plan_disk(str(image), partition_plans={2: given})
    assert plan.covers(root.start_byte, root.end_byte)
    assert {p["number"]: p for p in plan.parts}[2]["reason"] == "planned by the caller"


@needs_loop
def test_plan_disk_of_an_mbr_disk_with_ext4_in_a_logical_partition(tmp_path):
    image = make_disk(tmp_path / "mbr.img", 160 * MiB,
                      "label: dos\nstart=2048, size=16MiB, type=83\nstart=18MiB, size=120MiB, type=5\n"
                      "start=20MiB, size=100MiB, type=83\n")
    extents = make_filesystems(image, {5: ["mkfs.ext4", "-q", "-F"]}, tmp_path)
    table = read_partition_table(str(image))
    extended, logical = table.partition(2), table.partition(5)
    plan = plan_disk(str(image))
    assert plan.covers(extended.start_byte, logical.start_byte)  # the EBR and what precedes it
    assert plan.covers(table.partition(1).start_byte, table.partition(1).end_byte)  # no filesystem
    assert plan.covers(logical.start_byte + 1024, logical.start_byte + 2048)
    for start, end in extents:
        assert plan.covers(start, end)
    inside = plan.minus([(0, logical.start_byte), (logical.end_byte, plan.size)])
    assert inside.used_bytes < logical.size_bytes // 4
    assert loops_holding(image) == []


def test_plan_volume_of_a_disk_whose_gpt_is_damaged_beyond_repair(gpt_image):
    flip_byte(gpt_image, 512 + 60)
    flip_byte(gpt_image, 16 * MiB - 512 + 60)
    plan = plan_volume(str(gpt_image))
    assert plan.mode == "all-blocks" and "damaged partition table" in plan.reason
