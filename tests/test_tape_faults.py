"""Tape faults: writes interrupted at any moment, damaged metadata blocks, files that are not
tapes, a full host filesystem under a virtual tape; and sweeps killing backups and restores at
random moments. Every case runs the CLI in a child process on real loop devices."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from devices import loop
from devices.fs import mounts
from devices.tape import HostFileError, TapeError, VirtualTape
from imager.tape.blocks import SEGMENT_TAG
from imager.tape import TapeImageStream, TapeSink, TapeSpec, read_label, scan_files, write_label

from conftest import device_size, imager, run, same_bytes, sweep_size, unmount_everything_on
from test_tape_drive import REAL_TAPE, payload, read_simh
from lab import WAIT, wait_until
from test_tape_images import _backup, _record_offsets, _tape_list, _volume_with_files

# A metadata block's JSON starts after the frame header, the tag and the BLAKE3 checksum.
_JSON_START = 8 + len(SEGMENT_TAG) + 32


def _label(tape, name: str = "FAULTS") -> None:
    r = imager("tape", "label", name, "--tape", str(tape))
    assert r.returncode == 0, r.stderr


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("imager: error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


def _restores_identically(tape, image_id: str, dev: str, target) -> None:
    r = imager("restore", "--tape", str(tape), "--image", image_id, str(target))
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(target) == device_size(dev) and same_bytes(dev, str(target), device_size(dev))
    os.unlink(target)


def _scanned_images(tape, catalog) -> list[str]:
    """The images `tape scan` records in a fresh catalog."""
    r = imager("tape", "scan", "--tape", str(tape), "--catalog", str(catalog), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["images"]


def _states(tape) -> list[tuple[int, str | None, str]]:
    def state(f: dict) -> str:
        if f["kind"] != "image" or f["problem"]:
            return "damaged" if f["problem"] else f["kind"]
        return "incomplete" if f["incomplete"] else "complete"
    return [(f["tape_file"], f["image_id"], state(f)) for f in _tape_list(str(tape))]


@pytest.fixture
def sources(loops):
    return [_volume_with_files(loops, n) for n in (3, 5)]


# --- the drive: what is a tape, torn records, host file errors -----------------------------------

def test_virtual_tape_refuses_a_file_that_is_not_a_tape(tmp_path):
    text = tmp_path / "notes.tap"
    text.write_text("shopping list\nmilk\n")
    compressed = tmp_path / "passwd.zst"
    run("zstd", "-q", "-o", str(compressed), "/etc/passwd")
    zeros = tmp_path / "zeros.tap"
    zeros.write_bytes(bytes(64 << 10))
    record = tmp_path / "half.tap"  # a length word, then something else where its copy belongs
    record.write_bytes((16).to_bytes(4, "little") + b"sixteen bytes..." + b"junk")
    tiny = tmp_path / "tiny.tap"
    tiny.write_bytes(b"a\n")
    for path in (text, compressed, zeros, record, tiny):
        before = path.read_bytes()
        with pytest.raises(TapeError) as caught:
            VirtualTape(path)
        # Not EIO: the engine takes EIO at the beginning of tape for a blank tape.
        assert caught.value.errno == errno.EMEDIUMTYPE, caught.value
        assert "not a virtual tape" in str(caught.value) and "\n" not in str(caught.value)
        assert path.read_bytes() == before
    empty = tmp_path / "empty.tap"
    empty.touch()
    with VirtualTape(empty) as drive:
        assert drive.is_blank()
        drive.write_block(b"x" * 100)
        assert not drive.is_blank()


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 500, 1003, 1006])
def test_a_torn_last_record_reads_as_end_of_data_and_the_next_write_replaces_it(tmp_path, cut):
    """`cut` bytes of a 1002-byte record (length word, data, length word) are on the file."""
    path = tmp_path / "torn.tap"
    first = [payload(0, i, 700) for i in range(3)]
    with VirtualTape(path) as drive:
        for block in first:
            drive.write_block(block)
        whole = path.stat().st_size
        drive.write_block(payload(1, 0, 1002))
    with open(path, "r+b") as f:
        f.truncate(whole + cut)
    with VirtualTape(path) as drive:
        assert [drive.read_block(1 << 20) for _ in first] == first
        with pytest.raises(TapeError) as caught:
            drive.read_block(1 << 20)
        assert caught.value.errno == errno.EIO and "torn record" in str(caught.value)
        drive.seek_end_of_data()
        assert drive.status().file_number == 0
        drive.write_block(b"after the cut")
    assert read_simh(path) == first + [b"after the cut", None]


def test_a_full_host_filesystem_is_not_the_end_of_the_cartridge(loops, tmp_path):
    small = loops.mount(loops.create(16 << 20, fs="ext4"))
    tape = small / "t.tap"
    with VirtualTape(tape) as drive:
        with pytest.raises(HostFileError) as caught:
            while True:
                drive.write_block(os.urandom(1 << 20))
        error = caught.value
    assert error.errno == errno.EIO and error.host_errno == errno.ENOSPC
    assert "No space left on device" in str(error)
    read_simh(tape)  # the write that failed left nothing behind

    tape.unlink()
    _label(tape)
    big, little = _volume_with_files(loops, 24), _volume_with_files(loops, 1)
    r = imager("backup", big, "--tape", str(tape))
    assert r.returncode == 1
    message = _one_line_error(r)
    assert "the filesystem holding the virtual tape is full" in message and "early-warning" not in message
    assert [state for _, _, state in _states(tape)] == ["incomplete"]
    r = imager("verify", "--tape", str(tape))
    assert r.returncode == 1 and "file 1" in r.stdout and "incomplete: an interrupted write" in r.stdout, r.stdout
    # The next backup replaces the unfinished file, which frees its space.
    r = imager("backup", little, "--tape", str(tape), "--json")
    assert r.returncode == 0, r.stderr
    image_id = json.loads(r.stdout)["images"][0]["image_id"]
    assert _states(tape) == [(1, image_id, "complete")]
    _restores_identically(tape, image_id, little, tmp_path / "r.raw")


# --- interrupted writes: the next backup replaces what they left --------------------------------

@pytest.fixture(params=["virtual"] + (["st"] if REAL_TAPE else []))
def any_tape(request, tmp_path) -> TapeSpec:
    """A labelled tape on every drive there is: a virtual one, and a real one through st when
    IMAGER_TEST_TAPE names its non-rewinding node (its cartridge is overwritten)."""
    spec = TapeSpec(str(tmp_path / "t.tap") if request.param == "virtual" else REAL_TAPE)
    with spec.open() as drive:
        write_label(drive, "ANYDRIVE", force=True)
    return spec


def _image_on(spec: TapeSpec, image_id: str, data: bytes, *, finish: bool = True, notices=None) -> TapeSink:
    """Write `data` as the stream of an image; without `finish` the write stops as when the
    backup is interrupted: the drive is closed (st writes a filemark then) with no end block."""
    sink = TapeSink(spec, image_id=image_id, block_size=64 << 10,
                    on_notice=notices.append if notices is not None else None)
    for start in range(0, len(data), 100_000):
        sink.write(data[start:start + 100_000])
    if finish:
        sink.commit({"id": image_id})
    else:
        sink.abort()
    return sink


def test_abort_ends_the_writer_whose_wakeup_an_interrupt_lost(any_tape):
    """Ctrl-C or SIGTERM raises in the main thread wherever it is, also inside queue.Queue's
    code, and an interrupted put can lose the wakeup of the thread writing the tape. A backup
    once hung there for good (SIGTERM at a random moment of test_a_backup_killed_at_any_moment).
    The writer here waits on the queue with its wakeups taken away, as a lost one leaves it:
    abort must still end it, and the next image replaces the interrupted one."""
    sink = TapeSink(any_tape, image_id="lost", block_size=64 << 10)
    sink.write(payload(4, 0, 300_000))
    waiting = sink._queue.not_empty
    wait_until(lambda: sink._queue.empty() and len(waiting._waiters) == 1, "the writer to wait on its queue")
    with sink._queue.mutex:
        waiting._waiters.clear()
    aborting = threading.Thread(target=sink.abort, daemon=True)
    aborting.start()
    aborting.join(WAIT)
    assert not aborting.is_alive(), "abort() hangs when the tape writer's wakeup is lost"
    _image_on(any_tape, "next", payload(5, 0, 200_000))
    with any_tape.open() as drive:
        assert [(f.tape_file, f.image_id, f.complete) for f in scan_files(drive)] == [(1, "next", True)]


def test_an_interrupted_file_is_replaced_on_every_drive(any_tape):
    """The append checks the end of data with TapeDrive operations only: the same on st."""
    first, second = payload(1, 0, 700_000), payload(2, 0, 900_000)
    _image_on(any_tape, "first", first)
    _image_on(any_tape, "interrupted", payload(3, 0, 800_000), finish=False)
    with any_tape.open() as drive:
        assert [(f.tape_file, f.image_id, f.incomplete) for f in scan_files(drive)] == [
            (1, "first", False), (2, "interrupted", True)]
    notices: list[str] = []
    sink = _image_on(any_tape, "second", second, notices=notices)
    assert [s.tape_file for s in sink.segments] == [2]
    assert len(notices) == 1 and "tape file 2" in notices[0] and "replaces it" in notices[0]
    with any_tape.open() as drive:
        assert [(f.tape_file, f.image_id, f.complete) for f in scan_files(drive)] == [
            (1, "first", True), (2, "second", True)]
    for tape_file, image_id, data in ((1, "first", first), (2, "second", second)):
        drive = any_tape.open()
        stream = TapeImageStream(any_tape, drive, read_label(drive), tape_file, image_id)
        try:
            assert stream.read() == data
        finally:
            stream.close()


def _cut_file(tape, tape_file: int, keep_records: int, filemark: bool) -> None:
    """Keep the first `keep_records` records of `tape_file` (the last file), then a filemark or
    not: what st (a filemark at close) or a killed VirtualTape writer (none) leaves."""
    data = tape.read_bytes()
    records = _record_offsets(data, tape_file)
    if keep_records:
        offset, length = records[keep_records - 1]
        end = offset + length + (length & 1) + 4
    else:
        end = records[0][0] - 4  # where the file's first record begins
    tape.write_bytes(data[:end] + (bytes(4) if filemark else b""))


def _tear_record(tape, tape_file: int, record: int) -> None:
    """Cut the tape inside a record of `tape_file`, as a writer killed in the middle of it."""
    data = tape.read_bytes()
    tape.write_bytes(data[:_record_offsets(data, tape_file)[record][0] + 10])


LEFTOVERS = {
    # name: how the tape is changed after two images, whether file 2 is then listed incomplete
    "torn record": (lambda tape: _tear_record(tape, 2, 3), True),
    "no end block, a filemark (st)": (lambda tape: _cut_file(tape, 2, 4, filemark=True), True),
    "no end block, no filemark": (lambda tape: _cut_file(tape, 2, 4, filemark=False), True),
    "only the segment header": (lambda tape: _cut_file(tape, 2, 1, filemark=True), True),
    "an empty file": (lambda tape: _cut_file(tape, 2, 0, filemark=True), False),
}


@pytest.mark.parametrize("leftover", LEFTOVERS)
def test_the_next_backup_replaces_what_an_interrupted_write_left(sources, tmp_path, private_catalog, leftover):
    tape = tmp_path / "t.tap"
    _label(tape)
    first = _backup(sources[0], str(tape), "--block-size", "64K")["image_id"]
    interrupted = _backup(sources[1], str(tape), "--block-size", "64K")["image_id"]
    damage, listed = LEFTOVERS[leftover]
    damage(tape)
    assert _states(tape) == [(1, first, "complete")] + ([(2, interrupted, "incomplete")] if listed else [])

    r = imager("backup", sources[1], "--tape", str(tape), "--json")
    assert r.returncode == 0, r.stderr
    (new,) = json.loads(r.stdout)["images"]
    assert [s["tape_file"] for s in new["segments"]] == [2]
    assert "tape file 2" in r.stderr and "the new image replaces it" in r.stderr, r.stderr
    assert _states(tape) == [(1, first, "complete"), (2, new["image_id"], "complete")]
    _restores_identically(tape, new["image_id"], sources[1], tmp_path / "new.raw")
    assert sorted(_scanned_images(tape, tmp_path / "fresh.sqlite")) == sorted([first, new["image_id"]])
    # The catalog had the image that was cut short at file 2: it no longer points there.
    r = imager("restore", "--tape", str(tape), "--image", interrupted, str(tmp_path / "old.raw"))
    assert r.returncode == 2 and "no image" in _one_line_error(r)
    assert not (tmp_path / "old.raw").exists()


def test_an_image_whose_filemark_was_never_written_is_kept_and_closed(sources, tmp_path):
    tape = tmp_path / "t.tap"
    _label(tape)
    first = _backup(sources[0], str(tape))["image_id"]
    written = tape.read_bytes()
    assert written[-12:] == bytes(8) + b"\xff" * 4   # the closing filemark, then the double mark's second and EOM
    tape.write_bytes(written[:-12])                  # killed after the end block, before the filemark
    assert _states(tape) == [(1, first, "complete")]
    r = imager("backup", sources[1], "--tape", str(tape), "--json")
    assert r.returncode == 0, r.stderr
    assert "tape file 1 had no closing filemark" in r.stderr, r.stderr
    second = json.loads(r.stdout)["images"][0]["image_id"]
    assert _states(tape) == [(1, first, "complete"), (2, second, "complete")]
    _restores_identically(tape, first, sources[0], tmp_path / "a.raw")
    _restores_identically(tape, second, sources[1], tmp_path / "b.raw")


def test_a_virtual_set_replaces_an_interrupted_write_on_its_first_cartridge(sources, tmp_path):
    pattern = str(tmp_path / "p-{n}.tap")
    first = _backup(sources[0], pattern)["image_id"]
    _tear_record(tmp_path / "p-1.tap", 1, -1)  # the end block torn, no filemark
    r = imager("backup", sources[1], "--tape", pattern, "--json")
    assert r.returncode == 0, r.stderr
    assert "tape file 1" in r.stderr and "replaces it" in r.stderr
    new = json.loads(r.stdout)["images"][0]["image_id"]
    assert _states(pattern) == [(1, new, "complete")]
    assert first not in _scanned_images(pattern, tmp_path / "fresh.sqlite")
    _restores_identically(pattern, new, sources[1], tmp_path / "r.raw")


# --- damaged metadata blocks are reported, never trusted ---------------------------------------

def _flip_json_byte(tape, tape_file: int, which: int) -> None:
    """Flip a byte in the JSON of a metadata block: `which` 0 the segment header, -1 the end block."""
    data = bytearray(tape.read_bytes())
    offset, length = _record_offsets(bytes(data), tape_file)[which]
    data[offset + _JSON_START + (length - _JSON_START) // 2] ^= 0x01
    tape.write_bytes(bytes(data))


@pytest.mark.parametrize("block", ["segment header", "end block"])
def test_a_damaged_metadata_block_fails_verify_and_is_not_trusted(sources, tmp_path, block):
    tape = tmp_path / "t.tap"
    _label(tape)
    first = _backup(sources[0], str(tape), "--block-size", "64K")["image_id"]
    damaged = _backup(sources[1], str(tape), "--block-size", "64K")["image_id"]
    _flip_json_byte(tape, 2, 0 if block == "segment header" else -1)

    r = imager("verify", "--tape", str(tape), "--json")
    assert r.returncode == 1, r.stderr
    report = json.loads(r.stdout)["images"]
    assert [img["ok"] for img in report] == [True, False]
    assert "file 2" in report[1]["image"] and f"{block} is damaged" in report[1]["errors"][0], report
    assert [state for _, _, state in _states(tape)] == ["complete", "damaged"]

    r = imager("restore", "--tape", str(tape), "--image", damaged, str(tmp_path / "r.raw"))
    assert r.returncode == 1 and "tape file 2" in _one_line_error(r) and "damaged" in r.stderr, r.stderr
    assert not (tmp_path / "r.raw").exists()
    r = imager("restore", "--tape", str(tape), "--image", damaged, str(tmp_path / "r.raw"),
               "--catalog", str(tmp_path / "fresh.sqlite"))
    assert r.returncode != 0 and "file 2" in _one_line_error(r) and "damaged" in r.stderr, r.stderr
    assert _scanned_images(tape, tmp_path / "fresh.sqlite") == [first]

    # A damaged file is never taken for an interrupted write: the next image goes after it.
    r = imager("backup", sources[0], "--tape", str(tape), "--json")
    assert r.returncode == 0, r.stderr
    assert [s["tape_file"] for s in json.loads(r.stdout)["images"][0]["segments"]] == [3]


def test_a_damaged_label_is_not_trusted_and_only_relabelled_with_force(sources, tmp_path):
    tape = tmp_path / "t.tap"
    _label(tape, "DAMAGED")
    _backup(sources[0], str(tape))
    _flip_json_byte(tape, 0, 0)
    before = tape.read_bytes()
    for argv in (("tape", "list"), ("backup", sources[0]), ("tape", "label", "NEW")):
        r = imager(*argv, "--tape", str(tape))
        assert r.returncode == 1 and "label is damaged" in _one_line_error(r), r.stderr
    assert "--force" in r.stderr and tape.read_bytes() == before
    assert imager("tape", "label", "NEW", "--tape", str(tape), "--force").returncode == 0
    assert _tape_list(str(tape)) == []


# --- nothing that is not a tape is overwritten ---------------------------------------------------

def test_label_and_backup_leave_files_that_are_not_tapes_alone(sources, tmp_path):
    text = tmp_path / "notes.tap"
    text.write_text("shopping list\n")
    image = tmp_path / "vol.zst"
    assert imager("backup", sources[0], "-o", str(image)).returncode == 0
    for path in (text, image):
        before = path.read_bytes()
        for force in ((), ("--force",)):
            r = imager("tape", "label", "X", "--tape", str(path), *force)
            assert r.returncode == 1 and "not a virtual tape" in _one_line_error(r), r.stderr
            assert "labelled" not in r.stdout
        r = imager("tape", "status", "--tape", str(path))
        assert r.returncode == 1 and "not a virtual tape" in _one_line_error(r) and "online" not in r.stdout
        assert path.read_bytes() == before

    # A set's first cartridge that is not a tape is not labelled over.
    (tmp_path / "set").mkdir()
    cartridge = tmp_path / "set" / "p-1.tap"
    cartridge.write_text("not a tape\n")
    r = imager("backup", sources[0], "--tape", str(tmp_path / "set" / "p-{n}.tap"))
    assert r.returncode == 1 and "not a virtual tape" in _one_line_error(r), r.stderr
    assert cartridge.read_text() == "not a tape\n"

    # --force still relabels a tape that holds images.
    tape = tmp_path / "t.tap"
    _label(tape, "OLD")
    _backup(sources[0], str(tape))
    r = imager("tape", "label", "NEW", "--tape", str(tape), "--force")
    assert r.returncode == 0 and "labelled 'NEW'" in r.stdout, r.stderr
    assert _tape_list(str(tape)) == []


def test_tape_status_says_blank_for_an_empty_file(tmp_path):
    tape = tmp_path / "new.tap"
    tape.touch()
    for extra in ((), ("--label",)):
        r = imager("tape", "status", "--tape", str(tape), *extra)
        assert r.returncode == 0 and "blank" in r.stdout, r.stdout + r.stderr
        r = imager("tape", "status", "--tape", str(tape), "--json", *extra)
        assert json.loads(r.stdout)["blank"] is True
    _label(tape)
    r = imager("tape", "status", "--tape", str(tape), "--json")
    assert json.loads(r.stdout)["blank"] is False


# --- kill sweeps --------------------------------------------------------------------------------

def _killed(argv: list[str], delay: float, signum: int) -> int:
    """Run the imager CLI, send it `signum` after `delay` seconds; its exit status."""
    child = subprocess.Popen([sys.executable, "-m", "imager.cli", *argv], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    time.sleep(delay)
    child.send_signal(signum)
    try:
        return child.wait(WAIT)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        raise AssertionError(f"imager {' '.join(argv)} hung after {signal.Signals(signum).name} at {delay:.3f} s")


def _timed(*argv: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    r = imager(*argv)
    return r, time.monotonic() - started


def _remove_planning_views_of(device: str) -> None:
    """A backup killed while it plans leaves its read-only loop view of the source attached, and
    maybe mounted on /run/imager-plan-*: SIGKILL runs no cleanup. Remove them, so that the
    fixture can detach the source."""
    source = os.stat(device).st_rdev
    for info in loop.list_attached():
        if os.path.exists(info.backing_file) and os.stat(info.backing_file).st_rdev == source:
            points = [m.mount_point for m in mounts() if m.device_number == os.stat(info.device).st_rdev]
            unmount_everything_on(info.device)
            for point in points:
                if os.path.basename(point).startswith("imager-plan-"):
                    os.rmdir(point)
            loop.detach(info.device)


KILLS = sweep_size(30, 4)
SIGNALS = [signal.SIGKILL, signal.SIGTERM]


@pytest.mark.sweep
def test_a_backup_killed_at_any_moment_leaves_the_tape_fit_for_the_next(loops, tmp_path):
    # Enough data that the tape file is open for a good part of a backup, not only its end.
    dev = _volume_with_files(loops, 48)
    tape = tmp_path / "t.tap"
    _label(tape)
    r, duration = _timed("backup", dev, "--tape", str(tape), "--json")
    assert r.returncode == 0, r.stderr
    complete = [json.loads(r.stdout)["images"][0]["image_id"]]
    rng = random.Random(9)
    interrupted = 0
    for n, signum in enumerate(SIGNALS * KILLS):
        delay = rng.uniform(0, duration)
        try:
            _killed(["backup", dev, "--tape", str(tape), "-q"], delay, signum)
        finally:
            _remove_planning_views_of(dev)
        # The duration of this backup bounds the next delay: the machine's load changes.
        r, duration = _timed("backup", dev, "--tape", str(tape), "--json")
        assert r.returncode == 0, f"after {signum.name} at {delay:.3f} s: {r.stderr}"
        interrupted += "interrupted write" in r.stderr
        new = json.loads(r.stdout)["images"][0]["image_id"]
        _restores_identically(tape, new, dev, tmp_path / "r.raw")
        states = {image_id: state for _, image_id, state in _states(tape)}
        assert all(states[image_id] == "complete" for image_id in complete + [new]), (signum.name, delay, states)
        assert new in _scanned_images(tape, tmp_path / f"fresh-{n}.sqlite")
        complete.append(new)
    # The full sweep must have hit writes in progress, or it tested nothing.
    assert interrupted or KILLS < 30


@pytest.mark.sweep
def test_a_restore_from_tape_killed_at_any_moment_leaves_no_partial_file(loops, tmp_path):
    dev = _volume_with_files(loops, 16)
    tape = tmp_path / "t.tap"
    _label(tape)
    image_id = _backup(dev, str(tape))["image_id"]
    target = tmp_path / "restored.raw"
    r, duration = _timed("restore", "--tape", str(tape), "--image", image_id, str(target))
    assert r.returncode == 0, r.stderr
    target.unlink()
    rng = random.Random(10)
    for signum in SIGNALS * KILLS:
        delay = rng.uniform(0, duration)
        status = _killed(["restore", "--tape", str(tape), "--image", image_id, str(target)], delay, signum)
        if target.exists():  # only ever complete: the kill came after the rename
            assert same_bytes(dev, str(target), device_size(dev)) and target.stat().st_size == device_size(dev)
            target.unlink()
        else:
            assert status != 0
