"""Nothing a user types destroys data: no file where a device belongs, no device overwritten
without being told what it holds, no tape moved behind the operator's back, no backup of a
backup. The /dev cases run in a private mount namespace over a tmpfs /dev, so that a failure
damages nothing on the machine."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from devices import loop
from devices.tape.virtual import VirtualTape
from imager.tape import drive_status

from conftest import device_size, imager, run, same_bytes
from lab import MiB
from lab import one_line_error as one_line_refusal

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs inside `unshare -m`: a fresh tmpfs on /dev with the basic nodes and copies of the given
# device nodes, then the imager command, then a report of what every path under /dev is.
_PRIVATE_DEV_DRIVER = textwrap.dedent("""
    import json, os, stat, subprocess, sys
    nodes, argv, watch = json.loads(sys.argv[1])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "imager-test-dev", "/dev"], check=True)
    for name, (mode, major, minor) in dict(nodes, null=[0o20666, 1, 3], zero=[0o20666, 1, 5],
                                           full=[0o20666, 1, 7], urandom=[0o20666, 1, 9]).items():
        os.mknod("/dev/" + name, mode, os.makedev(major, minor))
    r = subprocess.run([sys.executable, "-m", "imager.cli", *argv], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    def kind(path):
        try:
            m = os.lstat(path).st_mode
        except FileNotFoundError:
            return None
        return "block" if stat.S_ISBLK(m) else "char" if stat.S_ISCHR(m) else "file" if stat.S_ISREG(m) else "other"
    print(json.dumps({"returncode": r.returncode, "stderr": r.stderr, "stdout": r.stdout,
                      "dev": sorted(os.listdir("/dev")), "kinds": {p: kind(p) for p in watch}}))
""")


def in_private_dev(nodes: dict[str, str], *argv: str, watch: tuple[str, ...] = ()) -> dict:
    """Run `imager ARGV` with a private /dev holding only copies of `nodes` (name -> a real device
    node whose type and number are copied) and null/zero/full/urandom."""
    spec = {}
    for name, real in nodes.items():
        st = os.stat(real)
        spec[name] = [st.st_mode, os.major(st.st_rdev), os.minor(st.st_rdev)]
    r = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", _PRIVATE_DEV_DRIVER,
                        json.dumps([spec, list(argv), list(watch)])],
                       capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def one_line_error(result: dict | subprocess.CompletedProcess) -> str:
    stderr = result["stderr"] if isinstance(result, dict) else result.stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("imager: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.fixture
def image_of(ext4_volume, tmp_path):
    dev, _ = ext4_volume
    image = tmp_path / "vol.zst"
    r = imager("backup", dev, "-o", str(image), "--chunk-size", "1M")
    assert r.returncode == 0, r.stderr
    return dev, image


# 1. -o naming a device -----------------------------------------------------------------------

def test_image_output_is_never_a_device_or_under_dev(image_of, loops, tmp_path):
    dev, _ = image_of
    victim = loops.create(64 << 20)
    name = os.path.basename(victim)
    for extra in ((), ("--force",)):
        r = in_private_dev({name: victim, "src": dev}, "backup", "/dev/src", "-o", f"/dev/{name}", *extra,
                           watch=(f"/dev/{name}",))
        assert r["returncode"] == 2, r
        assert "images go to files" in one_line_error(r) and "imager restore" in r["stderr"]
        assert r["kinds"][f"/dev/{name}"] == "block", "the device node must stay a device node"
        assert not [n for n in r["dev"] if n.startswith(f".{name}")], r["dev"]
    # Anything else under /dev, and a device node outside /dev, is refused the same way.
    r = in_private_dev({"src": dev}, "backup", "/dev/src", "-o", "/dev/backup.zst", watch=("/dev/backup.zst",))
    assert r["returncode"] == 2 and "images go to files" in one_line_error(r)
    assert r["kinds"]["/dev/backup.zst"] is None
    node = tmp_path / "node"
    os.mknod(node, stat.S_IFBLK | 0o600, os.stat(victim).st_rdev)
    r = imager("backup", dev, "-o", str(node), "--force")
    assert r.returncode == 2 and "is a block device" in one_line_error(r)
    assert stat.S_ISBLK(os.lstat(node).st_mode)
    assert any(i.device == victim for i in loop.list_attached())


# 2. a restore target under /dev that does not exist -------------------------------------------

def test_restore_to_a_missing_device_creates_nothing(image_of):
    _, image = image_of
    r = in_private_dev({}, "restore", str(image), "/dev/sdz", watch=("/dev/sdz",))
    assert r["returncode"] == 2, r
    assert "no such block device" in one_line_error(r)
    assert r["kinds"]["/dev/sdz"] is None
    assert not [n for n in r["dev"] if "sdz" in n], r["dev"]


# 3. --tape under /dev that is no drive ---------------------------------------------------------

def test_a_tape_under_dev_must_be_a_character_device():
    for argv in (("tape", "label", "X", "--tape", "/dev/nst0"), ("tape", "status", "--tape", "/dev/nst0"),
                 ("backup", "/dev/null", "--tape", "/dev/nst0")):
        r = in_private_dev({}, *argv, watch=("/dev/nst0",))
        assert r["returncode"] == 2, r
        assert "no such tape drive" in one_line_error(r)
        assert r["kinds"]["/dev/nst0"] is None, argv
    r = in_private_dev({"loopish": "/dev/loop-control"}, "tape", "status", "--tape", "/dev/loopish")
    # /dev/loop-control is a character device but no tape: st's MTIOCGET is refused.
    assert r["returncode"] == 1 and "not a tape drive" in one_line_error(r)


# 4. tape status never moves the tape ----------------------------------------------------------

def test_tape_status_reports_without_moving_the_tape(tmp_path):
    tape = tmp_path / "t.tap"
    assert imager("tape", "label", "POS", "--tape", str(tape)).returncode == 0
    with VirtualTape(tape) as drive:
        drive.seek_end_of_data()
        for _ in range(2):
            drive.write_block(b"x" * 1024)
            drive.write_filemarks(1)
        drive.rewind()
        drive.forward_space_files(2)
        drive.forward_space_records(1)
        before = drive.tell(), drive.status().file_number, drive.status().block_number
        assert before[1:] == (2, 1)
        status, label = drive_status(drive)
        assert label is None
        assert (drive.tell(), status.file_number, status.block_number) == before
        _, label = drive_status(drive, with_label=True)
        assert label.label == "POS" and drive.status().file_number == 1, "reading the label rewinds"
    r = imager("tape", "status", "--tape", str(tape))
    assert r.returncode == 0 and "--label" in r.stdout and "rewinding" not in r.stderr
    r = imager("tape", "status", "--label", "--tape", str(tape))
    assert r.returncode == 0 and "label: POS" in r.stdout and "rewinding" in r.stderr


# 5. a trailing slash --------------------------------------------------------------------------

def test_trailing_slash_after_a_device_is_one_line(image_of, loops):
    _, image = image_of
    target = loops.create(256 << 20)
    r = imager("restore", str(image), target + "/")
    assert r.returncode == 2 and "not a directory" in one_line_error(r).lower()
    r = imager("restore", str(image), str(image.parent / "nothere") + "/")
    assert r.returncode == 2 and "directory" in one_line_error(r)
    r = imager("backup", target + "/", "-o", str(image.parent / "x.zst"))
    assert r.returncode == 2 and "not a directory" in one_line_error(r).lower()


# 6. -o - and reading images from standard input -------------------------------------------------

def test_image_stream_through_stdout_and_stdin(image_of, loops, tmp_path):
    dev, _ = image_of
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    backup = subprocess.Popen([sys.executable, "-m", "imager.cli", "backup", dev, "-o", "-", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    stream, err = backup.communicate(timeout=300)
    assert backup.returncode == 0, err
    assert not (tmp_path / "-").exists(), "-o - must not write a file named '-'"
    (summary,) = json.loads(err[err.index(b"{"):])["images"]
    assert summary["image_bytes"] == len(stream) and summary["image"] == "standard output"
    zstd = subprocess.run(["zstd", "-d", "-c"], input=stream, capture_output=True)
    assert zstd.returncode == 0 and len(zstd.stdout) == device_size(dev)

    def piped(*argv):
        return subprocess.run([sys.executable, "-m", "imager.cli", *argv], input=stream, capture_output=True,
                              cwd=REPO_ROOT, timeout=300)
    r = piped("verify", "-", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"], r.stderr
    r = piped("info", "-", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["image_bytes"] == len(stream) and info["header"]["image_id"] == summary["image_id"]
    target = loops.create(256 << 20)
    r = piped("restore", "-", target, "--verify")
    assert r.returncode == 0, r.stderr
    assert same_bytes(dev, target, device_size(dev))
    # A damaged stream is named, not restored.
    damaged = bytearray(stream)
    damaged[len(stream) // 2] ^= 0xFF
    r = subprocess.run([sys.executable, "-m", "imager.cli", "verify", "-"], input=bytes(damaged),
                       capture_output=True, text=False, cwd=REPO_ROOT)
    assert r.returncode == 1 and b"chunk" in r.stderr and b"Traceback" not in r.stderr


def test_image_stream_refuses_a_terminal(image_of, tmp_path):
    dev, image = image_of
    cmd = f"{sys.executable} -m imager.cli backup {dev} -o -"
    on_tty = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=120)
    assert "refusing to write an image to a terminal" in on_tty.stdout, on_tty.stdout
    cmd = f"{sys.executable} -m imager.cli verify -"
    on_tty = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=120)
    assert "refusing to read an image from a terminal" in on_tty.stdout, on_tty.stdout


# 7. a refused backup leaves no empty tape behind ------------------------------------------------

def test_refused_tape_backup_creates_no_tape_file(image_of, tmp_path):
    dev, _ = image_of
    tape = tmp_path / "never.tap"
    r = imager("backup", dev, "--tape", str(tape))
    assert r.returncode == 1 and "imager tape label" in one_line_error(r)
    assert not tape.exists()
    text = tmp_path / "notes.tap"
    text.write_text("shopping list\n")
    r = imager("backup", dev, "--tape", str(text))
    assert r.returncode == 1 and text.read_text() == "shopping list\n"


# 8. an image, a zstd file or a tape as a backup source ------------------------------------------

def test_a_backup_is_not_imaged_again_without_force(image_of, tmp_path):
    dev, image = image_of
    compressed = tmp_path / "plain.zst"
    run("zstd", "-q", "-o", str(compressed), "/usr/share/common-licenses/GPL-3")
    tape = tmp_path / "t.tap"
    assert imager("tape", "label", "SRC", "--tape", str(tape)).returncode == 0
    for source, what in ((image, "an imager image"), (compressed, "a zstd file"),
                         (tape, "a virtual tape")):
        out = tmp_path / f"again-{source.name}.zst"
        r = imager("backup", str(source), "-o", str(out))
        assert r.returncode == 2, r.stderr
        message = one_line_error(r)
        assert what in message and "imager restore" in message
        assert not out.exists()
    r = imager("backup", str(image), "-o", str(tmp_path / "forced.zst"), "--force")
    assert r.returncode == 0, r.stderr
    # The same check holds for a device holding an image.
    r = imager("backup", dev, "-o", str(tmp_path / "ok.zst"))
    assert r.returncode == 0, r.stderr


# 9. restore onto a device that holds data ------------------------------------------------------

def test_restore_onto_a_device_with_a_filesystem_needs_force(image_of, loops):
    dev, image = image_of
    occupied = loops.create(320 << 20, fs="xfs", label="precious")
    uuid = run("blkid", "-s", "UUID", "-o", "value", occupied).stdout.strip()
    before = run("sha256sum", occupied).stdout
    r = imager("restore", str(image), occupied)
    assert r.returncode == 2, r.stderr
    message = one_line_error(r)
    assert f"{occupied} holds xfs 'precious' (UUID {uuid})" in message and "--force" in message
    assert run("sha256sum", occupied).stdout == before
    # A partition table is named too.
    disk = loops.create(256 << 20)
    run("sfdisk", "-q", disk, input="label: gpt\n,32M\n")
    r = imager("restore", str(image), disk)
    assert r.returncode == 2 and "gpt partition table" in one_line_error(r)
    assert imager("restore", str(image), occupied, "--force").returncode == 0
    assert same_bytes(dev, occupied, device_size(dev))
    blank = loops.create(256 << 20)
    assert imager("restore", str(image), blank).returncode == 0, "a blank device needs no --force"


def test_restore_refuses_to_write_an_image_over_itself(image_of, tmp_path):
    """Not onto the image file, nor onto a loop device on it or on a loop device on it, even
    forced; and a device holding an image (wipefs knows none) needs --force."""
    _, image = image_of
    before = image.read_bytes()
    r = imager("restore", str(image), str(image), "--force")
    assert r.returncode == 2 and "would write over the image being restored" in one_line_error(r)
    over = loop.attach(str(image))
    try:
        inner = loop.attach(over)
        try:
            for target in (over, inner):
                r = imager("restore", str(image), target, "--force")
                assert r.returncode == 2 and "would write over the image being restored" in one_line_error(r)
        finally:
            loop.detach(inner)
    finally:
        loop.detach(over)
    assert image.read_bytes() == before
    copy = tmp_path / "copy.zst"
    copy.write_bytes(before)
    os.truncate(copy, 512 << 20)        # room for the volume: only what it holds refuses it
    holder = loop.attach(str(copy))
    try:
        r = imager("restore", str(image), holder)
        assert r.returncode == 2 and f"{holder} holds an imager image" in one_line_error(r), r.stderr
        assert copy.read_bytes()[:len(before)] == before
    finally:
        loop.detach(holder)


def test_an_interrupted_restore_onto_a_device_says_the_device_holds_a_partial_volume(image_of, loops):
    from lab import wait_until

    _, image = image_of
    target = loops.create(320 << 20)
    proc = subprocess.Popen([sys.executable, "-m", "imager.cli", "restore", "-", target, "--force"],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT)
    try:
        with open(image, "rb") as f:
            proc.stdin.write(f.read(1 << 20))       # the header and a little: then the stream waits
        proc.stdin.flush()

        def writing() -> bool:
            fds = f"/proc/{proc.pid}/fd"
            return any(os.path.realpath(os.path.join(fds, fd)) == target for fd in os.listdir(fds))
        wait_until(writing, "the restore never opened its target")
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert err.decode().strip() == f"imager: interrupted; {target} holds a partial volume: restore onto it again " \
                                   f"before using it"


def test_a_restore_that_runs_out_of_space_names_its_target_and_what_it_holds(bench):
    """A full filesystem under the target: the error names the target (not the unnamed file it
    was being written as) and says what is left: nothing, for a file; a partial volume, for a
    device."""
    source = bench.loop_device(size=32 * MiB, name="random.img")
    with open(source, "r+b") as f:
        f.write(os.urandom(32 * MiB))
    image = bench.tmp / "random.zst"
    assert imager("backup", source, "-o", str(image), "-q", "--all-blocks").returncode == 0
    small = bench.tmpfs("small", "8m")
    target = os.path.join(small, "restored.raw")
    failed = imager("restore", str(image), target)
    one_line_refusal(failed, f"restore failed, nothing written to {target}: {target}: no space left", code=1)
    assert os.listdir(small) == []
    backing = os.path.join(small, "device.img")
    with open(backing, "wb") as f:
        f.truncate(32 * MiB)          # sparse: it fills the tmpfs only as it is written
    device = bench.loop_on(backing, read_only=False)
    failed = imager("restore", str(image), device, "--force")
    one_line_refusal(failed, f"restore failed, {device} holds a partial volume: {device}: ", code=1)
