"""A real st drive and SCSI medium changer, as the VM rig (../shared/vm-tape) provides them.

These run where IMAGER_TEST_TAPE names a non-rewinding st node (its cartridges are overwritten)
and IMAGER_TEST_CHANGER the changer's SCSI generic node: `make test-st` runs them in the VM,
with TAPE=/dev/nst0 and CHANGER=/dev/sgN, the rig's cartridges VT0001L6.. in slots 1.., the
first one loaded. Elsewhere they are skipped.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import subprocess

import pytest

from conftest import imager, run, same_bytes
from devices.scsi import ScsiError
from devices.tape import StTape, TapeError
from devices.tape.changer import Changer, ChangerError, ElementKind

TAPE = os.environ.get("IMAGER_TEST_TAPE")
CHANGER = os.environ.get("IMAGER_TEST_CHANGER")
FIRST = "VT0001L6"  # the rig's cartridge in slot 1, in the drive at start

pytestmark = pytest.mark.st
needs_tape = pytest.mark.skipif(not TAPE, reason="needs a real st drive: IMAGER_TEST_TAPE=/dev/nstN")
needs_changer = pytest.mark.skipif(not (TAPE and CHANGER),
                                   reason="needs a drive and a medium changer: IMAGER_TEST_TAPE, IMAGER_TEST_CHANGER")


def unload_drive(changer: Changer) -> None:
    """Eject the drive's cartridge (st) and put it back in its slot (changer)."""
    if not changer.status().drive(0).full:
        return
    with StTape(TAPE) as drive:
        if drive.status().online:
            drive.unload()
    changer.unload(0)


def load(changer: Changer, barcode: str) -> StTape:
    changer.load_barcode(barcode, 0)
    return StTape.wait_until_ready(TAPE, timeout=120)


@pytest.fixture
def changer():
    """The changer, with the rig's first cartridge back in the drive afterwards."""
    with Changer(CHANGER) as c:
        try:
            yield c
        finally:
            drive = c.status().drive(0)
            if not (drive.full and drive.barcode == FIRST):
                unload_drive(c)
                c.load_barcode(FIRST, 0)
                StTape.wait_until_ready(TAPE, timeout=120).close()


@needs_changer
def test_changer_status_lists_the_cartridges_with_their_barcodes(changer):
    status = changer.status()
    assert changer.identity.peripheral_type == 0x08
    (drive,) = status.drives
    assert drive.full and drive.barcode == FIRST
    home = status.by_address(drive.source)
    assert home is not None and home.kind == ElementKind.STORAGE and home.number == 1 and not home.full
    held = {e.number: e.barcode for e in status.slots if e.full}
    assert held == {2: "VT0002L6", 3: "VT0003L6"}
    assert status.find("VT0003L6").number == 3 and status.find(FIRST) == drive
    assert status.find("NOSUCH01") is None
    assert any(e.kind == ElementKind.IMPORT_EXPORT for e in status.slots)
    mtx = shutil.which("mtx")
    if mtx:
        # The numbering is mtx's: the same slot numbers hold the same barcodes.
        listing = run(mtx, "-f", CHANGER, "status").stdout
        seen = {int(n): tag for n, tag in re.findall(r"Storage Element (\d+)(?: IMPORT/EXPORT)?:Full"
                                                     r" ?:VolumeTag=(\S+)", listing)}
        assert seen == held
        assert f"Data Transfer Element 0:Full (Storage Element 1 Loaded):VolumeTag = {FIRST}" in listing


@needs_changer
def test_load_a_cartridge_by_barcode_and_see_it_in_the_drive(changer):
    unload_drive(changer)
    status = changer.status()
    assert not status.drive(0).full and status.slot(1).barcode == FIRST
    with StTape(TAPE) as drive, pytest.raises(TapeError) as empty:
        drive.rewind()
    assert empty.value.errno == errno.ENOMEDIUM

    # A blank cartridge, newly loaded: st sees it once the drive reports it (a unit attention
    # taken at the next open), at the beginning, with nothing recorded.
    with load(changer, "VT0002L6") as drive:
        assert changer.status().drive(0).barcode == "VT0002L6"
        status = drive.status()
        assert (status.online, status.file_number, status.block_number, status.bot) == (True, 0, 0, True)
        drive.set_block_size(0)
        drive.write_block(b"cartridge two")
        drive.write_filemarks(1)
        drive.unload()
    assert changer.unload(0).number == 2  # back to the slot it came from

    with load(changer, FIRST) as drive:
        drive.set_block_size(0)
        try:
            first = drive.read_block(1 << 20)
        except TapeError:
            first = None  # blank
        assert first != b"cartridge two"
        drive.unload()
    changer.unload(0)

    with load(changer, "VT0002L6") as drive:
        drive.set_block_size(0)
        assert drive.read_block(1 << 20) == b"cartridge two"
        assert drive.read_block(1 << 20) == b""
        drive.unload()
    changer.unload(0)


@needs_changer
def test_changer_refusals_are_one_line_errors(changer):
    status = changer.status()
    with pytest.raises(ChangerError) as full:
        changer.load(2, 0)  # the drive holds VT0001L6
    assert "drive holds VT0001L6" in str(full.value) and "\n" not in str(full.value)
    with pytest.raises(ChangerError) as missing:
        changer.load_barcode("NOSUCH01")
    assert "no cartridge 'NOSUCH01'" in str(missing.value)
    with pytest.raises(ChangerError):
        changer.load(99, 0)
    # What the changer itself refuses comes back as its sense data.
    with pytest.raises(ScsiError) as refused:
        changer.move(status.slot(5), status.slot(6))
    assert str(refused.value) == (f"{CHANGER}: MOVE MEDIUM from slot 5 (empty) to slot 6 (empty): ILLEGAL "
                                  f"REQUEST, medium source element empty (ASC/ASCQ 0x3b/0x0e)")
    changer.initialize()
    assert changer.status() == status


@needs_tape
def test_stock_tools_read_what_imager_wrote(loops, tmp_path):
    """The user's path: label, two backups with the imager CLI, then only mt, dd and zstd."""
    mt = shutil.which("mt")
    if mt is None:
        pytest.skip("needs mt (mt-st)")
    source = loops.create(32 << 20, fs="ext4")
    point = loops.mount(source)
    for n in range(20):
        (point / f"file{n}").write_bytes(os.urandom(64 << 10) * 4)
    loops.umount(point)

    assert imager("tape", "label", "ST-TEST", "--force", "--tape", TAPE).returncode == 0
    sizes = []
    for _ in range(2):
        done = imager("backup", source, "--tape", TAPE, "--json", "--quiet")
        assert done.returncode == 0, done.stderr
        sizes.append(json.loads(done.stdout)["images"][0]["image_bytes"])

    def mt_status() -> tuple[int, int]:
        text = run(mt, "-f", TAPE, "status").stdout
        found = re.search(r"File number=(-?\d+), block number=(-?\d+)", text)
        return int(found[1]), int(found[2])

    def imager_status() -> tuple[int, int]:
        done = imager("tape", "status", "--tape", TAPE, "--json")
        assert done.returncode == 0, done.stderr
        got = json.loads(done.stdout)["status"]
        return got["file_number"], got["block_number"]

    def mt_tell() -> int:
        return int(re.fullmatch(r"At block (\d+)\.\s*", run(mt, "-f", TAPE, "tell").stdout)[1])

    # The layout: the label block and its filemark; then per image a header block, the image in
    # 1 MiB blocks, an end block, a filemark.
    file2 = 2 + 2 + math.ceil(sizes[0] / (1 << 20)) + 1
    file3 = file2 + 2 + math.ceil(sizes[1] / (1 << 20)) + 1

    run(mt, "-f", TAPE, "rewind")
    run(mt, "-f", TAPE, "fsf", "2")
    assert mt_status() == imager_status() == (2, 0)
    assert mt_tell() == file2
    restored = subprocess.run(f"dd if={TAPE} bs=1M status=none | zstd -d | cmp - {source}", shell=True,
                              capture_output=True, text=True)
    assert restored.returncode == 0, restored.stderr
    # dd read the tape file and its filemark: the tape is at the start of file 3, the end of data.
    assert mt_status() == (3, 0)
    assert mt_tell() == file3


@needs_tape
def test_a_drive_left_in_fixed_block_mode_does_not_make_a_labelled_tape_look_blank():
    """st fails a variable block's read with EIO in fixed block mode, as at a blank tape's end of
    data: a label then must still be found (relabelling without --force refused, nothing lost)."""
    assert imager("tape", "label", "ST-FIXED", "--force", "--tape", TAPE).returncode == 0

    def label_kept() -> None:
        shown = imager("tape", "status", "--label", "--tape", TAPE, "--json")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["label"]["label"] == "ST-FIXED"

    assert imager("tape", "setblk", "512", "--tape", TAPE).returncode == 0
    refused = imager("tape", "label", "OTHER", "--tape", TAPE)
    assert refused.returncode == 2 and "already labelled 'ST-FIXED'" in refused.stderr, refused.stderr
    label_kept()
    # After `setblk 1` this st refuses every read of that open with EINVAL, even once switched
    # back to variable blocks: the label cannot be read, so nothing is written either.
    assert imager("tape", "setblk", "1", "--tape", TAPE).returncode == 0
    refused = imager("tape", "label", "OTHER", "--tape", TAPE)
    assert refused.returncode != 0 and "labelled 'OTHER'" not in refused.stdout, refused.stdout
    assert imager("tape", "setblk", "0", "--tape", TAPE).returncode == 0
    label_kept()


@needs_tape
def test_mt_verbs_end_where_they_end_on_a_virtual_tape(tmp_path, capsys):
    """The same verbs, as an operator types them, on /dev/nst0 and on a .tap file end at the same
    place (MTIOCGET's numbers and MTIOCPOS). Run through the command line's main() in this
    process: a Python start costs ~10 s in the VM."""
    from imager.cli import main

    volume = tmp_path / "vol.img"
    volume.write_bytes(os.urandom(3 << 20))

    def cli(*argv: str) -> dict:
        code = main([*argv, "--json"])
        shown = capsys.readouterr()
        assert code == 0, (argv, shown.err)
        return json.loads(shown.out) if shown.out.strip() else {}

    def walk(tape: str) -> list[tuple[int, int, int]]:
        cli("tape", "label", "MTVERBS", "--force", "--tape", tape)
        for _ in range(2):
            cli("backup", str(volume), "--tape", tape, "--block-size", "256K", "-q")

        def verb(*args: str) -> tuple[int, int, int]:
            where = cli("tape", *args, "--tape", tape)
            return where["file_number"], where["block_number"], where["position"]

        seen = [verb("rewind"), verb("fsf", "1"), verb("fsr", "2"), verb("bsr", "1"), verb("fsf", "1"),
                verb("bsf", "1"), verb("eod")]
        seen.append(verb("seek", str(seen[1][2])))
        seen.append((-2, -2, cli("tape", "tell", "--tape", tape)["position"]))
        return seen

    on_virtual = walk(str(tmp_path / "t.tap"))
    on_st = walk(TAPE)
    assert on_st == on_virtual
    assert on_st[1][:2] == (1, 0) and on_st[-1][2] == on_st[1][2]


@needs_changer
def test_an_image_spans_three_cartridges_through_the_changer(changer, loops, tmp_path, capsys):
    """The acceptance of a library: a backup larger than a cartridge has the changer load blank
    cartridges itself; restore gets each cartridge by its label through the changer, whatever the
    drive holds; a scan through the changer rebuilds the catalog from the cartridges alone."""
    from imager.cli import main

    def cli(*argv: str) -> dict:
        code = main([*argv, "--json", "-q"])
        shown = capsys.readouterr()
        assert code == 0, (argv, shown.err)
        return json.loads(shown.out)

    others = [e.barcode for e in changer.status().slots if e.full and e.barcode != FIRST]
    assert len(others) >= 2, "the rig has three cartridges"
    for barcode in others:            # blank, as new cartridges are (the suite wrote on them)
        unload_drive(changer)
        with load(changer, barcode) as drive:
            drive.rewind()
            drive.erase()
    unload_drive(changer)
    load(changer, FIRST).close()

    size = 20 << 20                   # more than two cartridges hold before their early warning (8 MiB)
    source = loops.create(size)
    with open(source, "r+b") as f:
        f.write(os.urandom(size))
        os.fsync(f.fileno())
    cli("tape", "label", "SPAN", "--force", "--tape", TAPE)
    (image,) = cli("backup", source, "--tape", TAPE, "--changer", CHANGER, "--chunk-size", "1M")["images"]
    assert [s["tape_label"] for s in image["segments"]] == ["SPAN", "SPAN+2", "SPAN+3"], image["segments"]

    unload_drive(changer)             # whatever the drive holds (here: nothing), restore finds its cartridges
    out = tmp_path / "restored.raw"
    cli("restore", "--tape", TAPE, "--changer", CHANGER, "--image", image["image_id"], str(out), "--verify")
    assert same_bytes(source, str(out), size)

    fresh = str(tmp_path / "fresh.sqlite")
    cli("tape", "scan", "--tape", TAPE, "--changer", CHANGER, "--catalog", fresh)
    (found,) = [i for i in cli("catalog", "list", "--catalog", fresh)["images"] if i["image_id"] == image["image_id"]]
    assert [(s["tape_label"], s["tape_file"]) for s in found["segments"]] == [("SPAN", 1), ("SPAN+2", 1), ("SPAN+3", 1)]
