"""Images on virtual tapes: appending, listing, reading back with stock zstd, spanning
cartridges, the catalog and `tape scan`, and every way a tape can be wrong."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, device_size, imager, run, same_bytes


def _volume_with_files(loops, random_mib: int) -> str:
    dev = loops.create(64 << 20, fs="ext4")
    point = loops.mount(dev)
    run("cp", "-r", "/usr/share/doc/apt", str(point))
    with open(point / "random.bin", "wb") as f:
        f.write(os.urandom(random_mib << 20))
    loops.umount(point)
    return dev


@pytest.fixture
def volumes(loops):
    return [_volume_with_files(loops, n) for n in (2, 4, 6)]


def _backup(dev: str, tape: str, *extra: str) -> dict:
    r = imager("backup", dev, "--tape", tape, "--json", *extra)
    assert r.returncode == 0, r.stderr
    (summary,) = json.loads(r.stdout)["images"]
    return summary


def _tape_list(tape: str, *extra: str) -> list[dict]:
    r = imager("tape", "list", "--tape", tape, "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["files"]


def test_three_images_appended_listed_and_each_restored(volumes, tmp_path):
    tape = str(tmp_path / "t.tap")
    assert imager("tape", "label", "WEEKLY1", "--tape", tape).returncode == 0
    ids = [_backup(dev, tape)["image_id"] for dev in volumes]
    files = _tape_list(tape)
    assert [(f["tape_file"], f["image_id"], f["complete"]) for f in files] == [
        (1, ids[0], True), (2, ids[1], True), (3, ids[2], True)]
    assert [f["image"]["source"] for f in files] == volumes
    for n, (dev, image_id) in enumerate(zip(volumes, ids), start=1):
        out = tmp_path / f"restored{n}.raw"
        r = imager("restore", "--tape", tape, "--image", image_id[:10], str(out), "--verify")
        assert r.returncode == 0, r.stderr
        assert same_bytes(dev, str(out), device_size(dev))
        # standard tools alone: the tape file is a zstd stream
        raw = tmp_path / f"zstd{n}.raw"
        with open(raw, "wb") as f:
            read = subprocess.Popen([sys.executable, "-m", "imager.cli", "tape", "read", "--file", str(n),
                                     "--tape", tape], stdout=subprocess.PIPE)
            subprocess.run(["zstd", "-d", "-q", "-c"], stdin=read.stdout, stdout=f, check=True)
            assert read.wait() == 0
        assert same_bytes(dev, str(raw), device_size(dev)) and raw.stat().st_size == device_size(dev)
    v = imager("verify", "--tape", tape, "--json")
    assert v.returncode == 0 and len(json.loads(v.stdout)["images"]) == 3


def _catalog_rows(path) -> dict:
    db = sqlite3.connect(path)
    try:
        return {table: sorted(db.execute(f"SELECT * FROM {table}").fetchall())
                for table in ("images", "segments", "tapes")}
    finally:
        db.close()


def test_image_spans_three_cartridges_and_scan_rebuilds_the_catalog(loops, tmp_path, private_catalog):
    dev = _volume_with_files(loops, 24)
    pattern = str(tmp_path / "vault" / "tape-{n:03}.tap")
    (tmp_path / "vault").mkdir()
    summary = _backup(dev, pattern, "--tape-capacity", "10M", "--chunk-size", "1M")
    cartridges = sorted(p.name for p in (tmp_path / "vault").iterdir())
    assert cartridges == ["tape-001.tap", "tape-002.tap", "tape-003.tap"]
    files = _tape_list(pattern)
    assert [(f["label"], f["segment"], f["continued"]) for f in files] == [
        ("tape-001", 0, True), ("tape-002", 1, True), ("tape-003", 2, False)]
    out = tmp_path / "restored.raw"
    r = imager("restore", "--tape", pattern, "--image", summary["image_id"], str(out), "--verify")
    assert r.returncode == 0, r.stderr
    assert same_bytes(dev, str(out), device_size(dev))
    # One tape file of it, piped to zstd as the help shows for whole images: not the volume, and said.
    for f in files:
        cartridge = str(tmp_path / "vault" / f"{f['label']}.tap")
        raw = subprocess.run([sys.executable, "-m", "imager.cli", "tape", "read", "--tape", cartridge, "--file",
                              str(f["tape_file"])], capture_output=True, cwd=REPO_ROOT, timeout=300)
        err = raw.stderr.decode()
        assert raw.returncode == 1 and "Traceback" not in err, err
        assert f"holds only segment {f['segment']} of image {summary['image_id'][:12]}" in err, err
        assert ("continues on the next" in err) == f["continued"], err
        assert ("starts on an earlier cartridge" in err) == (f["segment"] > 0), err
        assert raw.stdout, "the tape file's bytes are written all the same"

    scanned = tmp_path / "scanned.sqlite"
    assert imager("tape", "scan", "--tape", pattern, "--catalog", str(scanned)).returncode == 0
    written = _catalog_rows(private_catalog)
    assert written["segments"] and len(written["tapes"]) == 3
    assert _catalog_rows(scanned) == written
    # The last cartridge alone (as it would be in a drive) says where the image starts.
    last = tmp_path / "last.tap"
    last.write_bytes((tmp_path / "vault" / "tape-003.tap").read_bytes())
    r = imager("verify", "--tape", str(last))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert (f"holds segment 2 of image {summary['image_id'][:12]}, which starts on cartridge 'tape-001'"
            in r.stderr), r.stderr


def test_missing_and_out_of_order_cartridges_are_clear_errors(loops, tmp_path):
    dev = _volume_with_files(loops, 24)
    vault = tmp_path / "vault"
    vault.mkdir()
    pattern = str(vault / "tape-{n:03}.tap")
    image_id = _backup(dev, pattern, "--tape-capacity", "10M", "--chunk-size", "1M")["image_id"]
    out = tmp_path / "restored.raw"

    os.rename(vault / "tape-002.tap", vault / "tape-002.away")
    r = imager("restore", "--tape", pattern, "--image", image_id, str(out))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "cartridge 2" in r.stderr, r.stderr
    assert not out.exists()
    assert not (vault / "tape-002.tap").exists(), "reading must not create a missing cartridge"

    # Appending to a set with a cartridge away would number the next one it makes as one that exists.
    before = {p.name: p.read_bytes() for p in vault.iterdir()}
    r = imager("backup", dev, "--tape", pattern, "--tape-capacity", "10M", "--chunk-size", "1M")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "cartridge 2 of the set" in r.stderr and "is missing" in r.stderr, r.stderr
    os.rename(vault / "tape-001.tap", vault / "tape-001.away")
    r = imager("backup", dev, "--tape", pattern, "--tape-capacity", "10M", "--chunk-size", "1M")
    assert r.returncode == 1 and "cartridge 1 of the set" in r.stderr, r.stderr
    os.rename(vault / "tape-001.away", vault / "tape-001.tap")
    assert {p.name: p.read_bytes() for p in vault.iterdir()} == before, "a refused backup changes no cartridge"

    os.rename(vault / "tape-003.tap", vault / "tape-002.tap")  # cartridge 3 where 2 belongs
    r = imager("restore", "--tape", pattern, "--image", image_id, str(out))
    assert r.returncode == 1 and "cartridge 2" in r.stderr and "tape-003" in r.stderr, r.stderr
    assert not out.exists()


def test_unlabelled_wrong_and_write_protected_tapes_are_refused(volumes, tmp_path):
    dev = volumes[0]
    tape = tmp_path / "t.tap"
    r = imager("backup", dev, "--tape", str(tape))
    assert r.returncode == 1 and "labelled before its first backup" in r.stderr
    assert not tape.exists()
    tape.touch()
    r = imager("backup", dev, "--tape", str(tape))
    assert r.returncode == 1 and "not labelled" in r.stderr

    assert imager("tape", "label", "MONDAY", "--tape", str(tape)).returncode == 0
    r = imager("backup", dev, "--tape", str(tape), "--label", "TUESDAY")
    assert r.returncode == 1 and "wrong tape" in r.stderr and "MONDAY" in r.stderr

    _backup(dev, str(tape))
    before = tape.read_bytes()
    r = imager("tape", "label", "OTHER", "--tape", str(tape))
    assert r.returncode == 2 and "already labelled" in r.stderr
    assert tape.read_bytes() == before, "a refused label must not touch the tape"
    # The drive left in fixed block mode by another program (mt setblk): a label read in that
    # mode fails as a blank tape's would; the tape must still be seen as labelled, not wiped.
    for size in ("1", "512"):
        assert imager("tape", "setblk", size, "--tape", str(tape)).returncode == 0
        r = imager("tape", "label", "OTHER", "--tape", str(tape))
        assert r.returncode == 2 and "already labelled 'MONDAY'" in r.stderr, r.stderr
        assert tape.read_bytes() == before
        listed = imager("tape", "list", "--tape", str(tape))
        assert listed.returncode == 0 and "MONDAY" in listed.stdout, listed.stderr

    run("chattr", "+i", str(tape))
    try:
        r = imager("backup", dev, "--tape", str(tape))
        assert r.returncode == 1 and "write-protected" in r.stderr, r.stderr
    finally:
        run("chattr", "-i", str(tape))
    assert tape.read_bytes() == before


def test_reading_with_too_small_a_block_size_is_a_clear_error(volumes, tmp_path):
    tape = str(tmp_path / "t.tap")
    imager("tape", "label", "BS", "--tape", tape)
    image_id = _backup(volumes[1], tape, "--block-size", "256K")["image_id"]
    r = imager("restore", "--tape", tape, "--image", image_id, str(tmp_path / "r.raw"), "--block-size", "64K")
    assert r.returncode == 1 and "larger blocks" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r.raw").exists()
    r = imager("restore", "--tape", tape, "--image", image_id, str(tmp_path / "r.raw"), "--block-size", "256K")
    assert r.returncode == 0, r.stderr


def _record_offsets(tap: bytes, tape_file: int | None = None) -> list[tuple[int, int]]:
    """(offset of data, length) of every data record in a SIMH .tap image, or of those in
    one tape file."""
    out, pos, number = [], 0, 0
    while pos + 4 <= len(tap):
        n = int.from_bytes(tap[pos:pos + 4], "little")
        if n == 0xFFFFFFFF:
            break
        if n == 0:
            pos += 4
            number += 1
            continue
        if tape_file is None or number == tape_file:
            out.append((pos + 4, n))
        pos += 8 + n + (n & 1)
    return out


def test_corrupted_record_and_tape_cut_inside_an_image(volumes, tmp_path):
    tape = tmp_path / "t.tap"
    imager("tape", "label", "DAMAGE", "--tape", str(tape))
    image_id = _backup(volumes[2], str(tape), "--block-size", "64K")["image_id"]
    pristine = tape.read_bytes()
    records = _record_offsets(pristine)
    # records: label, segment header, data..., end block
    data_offset, length = records[len(records) // 2]
    damaged = bytearray(pristine)
    damaged[data_offset + length // 2] ^= 0x55
    tape.write_bytes(damaged)
    r = imager("verify", "--tape", str(tape), "--image", image_id)
    assert r.returncode == 1 and "chunk" in r.stderr and "Traceback" not in r.stderr, r.stderr

    tape.write_bytes(pristine[:data_offset + length + 4])
    out = tmp_path / "r.raw"
    r = imager("restore", "--tape", str(tape), "--image", image_id, str(out))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "ends in the middle of image" in r.stderr or "cut short" in r.stderr, r.stderr
    assert not out.exists()


def test_verify_of_a_whole_tape_checks_every_image_past_a_damaged_one(volumes, tmp_path):
    tape = tmp_path / "t.tap"
    imager("tape", "label", "ALL", "--tape", str(tape))
    ids = [_backup(dev, str(tape), "--block-size", "64K")["image_id"] for dev in volumes]
    data = bytearray(tape.read_bytes())
    files = _tape_list(str(tape))
    # damage a data record in the middle of the second image
    records = _record_offsets(bytes(data), tape_file=2)
    offset, length = records[len(records) // 2]
    data[offset + length // 2] ^= 0xFF
    tape.write_bytes(bytes(data))
    r = imager("verify", "--tape", str(tape), "--json")
    assert r.returncode == 1, r.stderr
    report = json.loads(r.stdout)
    assert [img["ok"] for img in report["images"]] == [True, False, True]
    assert report["images"][1]["image_id"] == ids[1] and "chunk" in report["images"][1]["errors"][0]
    assert len(files) == 3


def test_a_cartridge_too_small_for_a_chunk_is_refused_before_writing(volumes, tmp_path):
    pattern = str(tmp_path / "small-{n}.tap")
    r = imager("backup", volumes[0], "--tape", pattern, "--tape-capacity", "8M")
    assert r.returncode == 2 and "too small" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("small-*.tap"))


def test_a_chain_on_tape_restores_every_point_from_the_tape(loops, tmp_path):
    """A full and two incrementals appended to a tape: each point restores exactly the volume
    as it was, the incrementals through their chain on the tape (found through the catalog)."""
    dev = _volume_with_files(loops, 4)
    tape = str(tmp_path / "t.tap")
    assert imager("tape", "label", "CHAIN1", "--tape", tape).returncode == 0
    size = device_size(dev)
    points = []
    for round_ in range(3):
        if round_:
            point = loops.mount(dev)
            with open(point / "random.bin", "r+b") as f:
                f.seek(round_ << 20)
                f.write(os.urandom(300 << 10))
            (point / f"new{round_}.txt").write_bytes(b"round %d\n" % round_ * 5000)
            loops.umount(point)
        summary = _backup(dev, tape, "--incremental")
        assert summary["kind"] == ("incremental" if round_ else "full"), summary
        if round_:
            assert summary["method"] == "digest" and summary["image_bytes"] < (2 << 20), summary
        reference = tmp_path / f"point{round_}.raw"
        with open(dev, "rb") as src, open(reference, "wb") as out:
            out.write(src.read(size))
        points.append((summary["image_id"], reference))
    for image_id, reference in reversed(points):
        out = tmp_path / f"restored-{image_id[:8]}.raw"
        r = imager("restore", "--tape", tape, "--image", image_id, str(out), "--verify", "--json")
        assert r.returncode == 0, r.stderr
        assert same_bytes(str(reference), str(out), size)
    # Retention keeps the chain whole (the newest needs the rest), and --consolidate, which rebuilds
    # image files, says that it leaves a chain on tape as it is.
    pruned = imager("catalog", "prune", "--keep-last", "1", "--consolidate")
    assert pruned.returncode == 0, pruned.stderr
    assert f"{points[2][0][:12]} is kept with its chain as it is: it is on tape" in pruned.stderr, pruned.stderr
    r = imager("restore", "--tape", tape, "--image", points[2][0], str(tmp_path / "after-prune.raw"))
    assert r.returncode == 0, r.stderr
    # A chain whose full the catalog no longer has cannot be restored, and says why.
    catalog = os.path.join(os.environ["XDG_DATA_HOME"], "imager", "catalog.sqlite")
    with sqlite3.connect(catalog) as db:
        db.execute("DELETE FROM images WHERE id = ?", (points[0][0],))
    r = imager("restore", "--tape", tape, "--image", points[2][0], str(tmp_path / "none.raw"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"the parent {points[0][0][:12]}" in r.stderr and not (tmp_path / "none.raw").exists()


def test_mt_verbs_move_a_virtual_tape_as_st_moves_a_drive(tmp_path):
    """The verbs, one command each as an operator types them, end where st leaves a drive after
    the same moves: a virtual tape keeps its position between commands. (That VirtualTape and st
    agree on each move is the drive conformance suite's part, which runs on /dev/nst0 in the VM
    rig; a CLI process costs ~10 s there, so this sequence runs on the virtual tape only.)"""
    tape = str(tmp_path / "t.tap")
    volume = tmp_path / "vol.img"
    volume.write_bytes(os.urandom(3 << 20))
    env = dict(os.environ, TAPE=tape)
    assert imager("tape", "label", "MTVERBS", "--force", env=env).returncode == 0
    for _ in range(2):
        made = imager("backup", str(volume), "--tape", tape, "--block-size", "256K", "-q",
                      "--catalog", str(tmp_path / "c.sqlite"))
        assert made.returncode == 0, made.stderr

    def verb(*args: str) -> tuple[int, int, int]:
        """Where the drive says it is after the verb (MTIOCGET's numbers and MTIOCPOS)."""
        done = imager("tape", *args, "--json", env=env)
        assert done.returncode == 0, (args, done.stderr)
        where = json.loads(done.stdout)
        return where["file_number"], where["block_number"], where["position"]

    assert verb("rewind") == (0, 0, 0)
    file1 = verb("fsf", "1")
    assert file1[:2] == (1, 0) and file1[2] == 2          # past the label block and its filemark
    assert verb("fsr", "2") == (1, 2, file1[2] + 2)
    assert verb("bsr", "1") == (1, 1, file1[2] + 1)
    file2 = verb("fsf", "1")
    assert file2[:2] == (2, 0) and file2[2] > file1[2] + 2
    assert verb("bsf", "1") == (1, -1, file2[2] - 1)       # before the filemark that ends file 1
    end = verb("eod")
    assert end[0] == 3 and end[2] > file2[2]
    assert verb("seek", str(file1[2]))[2] == file1[2]
    # A command that only asks (tell) finds the tape where the last one left it.
    told = json.loads(imager("tape", "tell", "--json", env=env, check=True).stdout)["position"]
    assert told == file1[2]
    assert verb("rewind") == (0, 0, 0)


def test_a_block_size_the_drive_cannot_write_is_refused_before_anything_is_written(tmp_path):
    volume = tmp_path / "vol.img"
    volume.write_bytes(os.urandom(1 << 20))
    tape = tmp_path / "t.tap"
    assert imager("tape", "label", "LIMITS", "--tape", str(tape)).returncode == 0
    before = tape.read_bytes()
    r = imager("backup", str(volume), "--tape", str(tape), "--block-size", "32M", "--catalog",
               str(tmp_path / "c.sqlite"))
    assert r.returncode == 2 and "outside the drive's block limits 1..16777215" in r.stderr, r.stderr
    assert tape.read_bytes() == before


def test_a_stream_slower_than_the_drive_needs_is_reported(tmp_path):
    volume = tmp_path / "vol.img"
    volume.write_bytes(os.urandom(4 << 20))
    tape = tmp_path / "t.tap"
    assert imager("tape", "label", "RATE", "--tape", str(tape)).returncode == 0
    args = ["backup", str(volume), "--tape", str(tape), "--catalog", str(tmp_path / "c.sqlite"), "--progress", "none"]
    slow = imager(*args, "--min-rate", "1000000")           # no drive needs 1 TB/s: always too slow
    assert slow.returncode == 0 and "under the given --min-rate of 1000000 MB/s" in slow.stderr, slow.stderr
    fine = imager(*args, "--min-rate", "0")
    assert fine.returncode == 0 and "shoe-shining" not in fine.stderr


def test_the_rate_warning_comes_while_it_happens_and_not_on_every_block():
    from imager.tape.sink import StreamRate

    notices: list[str] = []
    rate = StreamRate(1e15, "a test minimum", notices.append)
    rate.WINDOW = 0.0
    for _ in range(100):
        rate.wrote(1 << 20)
    rate.finish()
    assert len(notices) == 1 and "under a test minimum of 1000000000 MB/s" in notices[0]


def test_tape_erase_refuses_a_used_tape_unless_forced_and_then_erases_all_of_it(tmp_path):
    tape = str(tmp_path / "t.tap")
    volume = tmp_path / "vol.img"
    volume.write_bytes(os.urandom(1 << 20))
    catalog = str(tmp_path / "c.sqlite")
    assert imager("tape", "label", "ERASE", "--tape", tape, "--catalog", catalog).returncode == 0
    assert imager("backup", str(volume), "--tape", tape, "-q", "--catalog", catalog).returncode == 0
    # After the backup the tape stands at its end, as a drive does: rewind, then into the middle.
    assert imager("tape", "rewind", "--tape", tape).returncode == 0
    assert imager("tape", "fsf", "1", "--tape", tape).returncode == 0
    refused = imager("tape", "erase", "--tape", tape)
    assert refused.returncode == 2 and "use --force" in refused.stderr
    erased = imager("tape", "erase", "--force", "--tape", tape, "--catalog", catalog)
    assert erased.returncode == 0 and "no longer lists tape 'ERASE'" in erased.stdout, erased.stderr
    # Its images are gone from the catalog too: none can be a parent or be looked for there.
    listed = json.loads(imager("catalog", "list", "--json", "--catalog", catalog, check=True).stdout)
    assert listed["images"] == []
    status = json.loads(imager("tape", "status", "--json", "--tape", tape, check=True).stdout)
    with open(tape, "rb") as erased:        # nothing left but SIMH's end-of-medium marker
        assert status["blank"] is True and erased.read() == b"\xff\xff\xff\xff"


def test_a_drive_that_cannot_switch_compression_is_written_with_a_notice(volumes, tmp_path):
    """st answers MTCOMPRESSION with EIO on a drive without a changeable compression page: the
    backup goes on (the stream is zstd already) and says so."""
    from devices.tape.virtual import VirtualTape
    from imager.ends.sources import open_source
    from imager.jobs.backup import write_image
    from imager.tape import TapeSink, TapeSpec, write_label

    class FixedCompressionDrive(TapeSpec):
        def open(self, sequence: int = 1, *, create: bool = True) -> VirtualTape:
            return VirtualTape(self.path_for(sequence), create=create, compression_capable=False)

    tape = str(tmp_path / "fixed.tap")
    with VirtualTape(tape) as drive:
        write_label(drive, "FIXED")
    notices: list[str] = []
    sink = TapeSink(FixedCompressionDrive(tape), image_id="b" * 32, on_notice=notices.append)
    with open_source(volumes[0]) as source:
        write_image(source, sink, image_id="b" * 32)
    sink.commit({"id": "b" * 32})
    assert any("cannot switch its hardware compression off" in n for n in notices), notices
    out = tmp_path / "r.raw"
    assert imager("restore", "--tape", tape, "--image", "b" * 32, str(out)).returncode == 0
    assert same_bytes(volumes[0], str(out), device_size(volumes[0]))


def test_the_cartridges_of_a_set_on_a_drive_are_named_after_the_first():
    from imager.tape.labels import Label
    from imager.tape.spec import TapeSpec, _member_label

    single = TapeSpec("/tmp/single.tap")        # one drive (or one .tap): the drive's naming
    first = Label("S1", "a" * 32, 1, "", 0)
    second = Label(_member_label(single, 2, first), "a" * 32, 2, "", 0)
    third = Label(_member_label(single, 3, second), "a" * 32, 3, "", 0)
    assert [second.label, third.label, _member_label(single, 4, third)] == ["S1+2", "S1+3", "S1+4"]
    # A first label that happens to end like a member's keeps its name whole.
    assert _member_label(single, 2, Label("DAILY+1", "a" * 32, 1, "", 0)) == "DAILY+1+2"


def test_a_spooled_backup_reaches_the_tape_only_when_whole(volumes, tmp_path):
    """--spool DIR: the image is made on disk first and the drive gets it in one go at the end
    (it never waits for the compressor); nothing is left in DIR."""
    from devices.tape.virtual import VirtualTape
    from imager.ends.sources import open_source
    from imager.jobs.backup import write_image
    from imager.tape import TapeSink, TapeSpec, write_label

    tape, spool = tmp_path / "t.tap", tmp_path / "spool"
    spool.mkdir()
    with VirtualTape(tape) as drive:
        write_label(drive, "SPOOL")
    before = tape.stat().st_size
    notices: list[str] = []
    sink = TapeSink(TapeSpec(str(tape)), image_id="c" * 32, on_notice=notices.append, spool_dir=str(spool))
    with open_source(volumes[1]) as source:
        result = write_image(source, sink, image_id="c" * 32)
    # The whole image is made, and the tape is untouched (an abort now would leave it as it was).
    assert tape.stat().st_size == before and result.bytes_written > 1 << 20
    sink.commit({"id": "c" * 32})
    assert any("writing the spooled image" in n for n in notices), notices
    assert list(spool.iterdir()) == []
    out = tmp_path / "r.raw"
    assert imager("restore", "--tape", str(tape), "--image", "c" * 32, str(out)).returncode == 0
    assert same_bytes(volumes[1], str(out), device_size(volumes[1]))

    # The command line: --spool with a tape; refused without one.
    made = imager("backup", volumes[2], "--tape", str(tape), "--spool", str(spool), "--json", "--progress", "json",
                  "--min-rate", "10000000")
    assert made.returncode == 0, made.stderr
    assert list(spool.iterdir()) == []
    # While it is made, the display shows the spool's rate: nothing reaches the drive yet, and
    # a drive's minimum means nothing to a spool file.
    final = [json.loads(line) for line in made.stderr.splitlines() if line.startswith("{")][-1]
    assert final["output"] == "to the spool" and final["minimum_per_second"] is None, final
    refused = imager("backup", volumes[2], "-o", str(tmp_path / "x.zst"), "--spool", str(spool))
    assert refused.returncode == 2 and "--spool is for a backup to tape" in refused.stderr
    missing = imager("backup", volumes[2], "--tape", str(tape), "--spool", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such directory" in missing.stderr


def test_a_single_virtual_tape_that_fills_leaves_its_file_to_the_next_backup(tmp_path):
    """No next cartridge: the backup fails, its tape file is an interrupted write (INCOMPLETE),
    and the next backup to the tape takes its place instead of going after it."""
    big, small = tmp_path / "big.raw", tmp_path / "small.raw"
    big.write_bytes(os.urandom(16 << 20))
    small.write_bytes(os.urandom(1 << 20))
    tape = str(tmp_path / "t.tap")
    assert imager("tape", "label", "T2", "--tape", tape, "-q").returncode == 0
    failed = imager("backup", str(big), "--tape", tape, "--tape-capacity", "12M", "--chunk-size", "1M")
    assert failed.returncode == 1 and "a single virtual tape has no next cartridge" in failed.stderr, failed.stderr
    listed = imager("tape", "list", "--tape", tape)
    assert "file 1" in listed.stdout and "INCOMPLETE" in listed.stdout, listed.stdout
    assert imager("backup", str(small), "--tape", tape, "--chunk-size", "1M", "-q").returncode == 0
    files = json.loads(imager("tape", "list", "--tape", tape, "--json").stdout)["files"]
    assert [(f["tape_file"], f["incomplete"]) for f in files] == [(1, False)], files
