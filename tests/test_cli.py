"""The command line as a user runs it: listings, loop devices, interruption, the demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from devices import loop

from conftest import imager, writing_into
from lab import one_line_error


def test_devices_lists_a_loop_volume_with_its_filesystem(ext4_volume):
    dev, _ = ext4_volume
    listing = json.loads(imager("devices", "--json").stdout)
    entry = next(d for d in listing["blockdevices"] if d["path"] == dev)
    assert entry["type"] == "loop" and entry["fstype"] == "ext4" and entry["label"] == "imgtest"
    assert entry["size"] == 256 << 20
    assert listing["tapedrives"] == []
    table = imager("devices").stdout.splitlines()
    assert table[0].split()[:4] == ["NAME", "SIZE", "SECTOR", "KIND"]
    assert any(line.split()[0] == os.path.basename(dev) and "ext4" in line for line in table[1:])


def test_loop_attach_list_detach(tmp_path):
    backing = tmp_path / "disk.img"
    backing.write_bytes(bytes(8 << 20))
    r = imager("loop", "attach", str(backing))
    assert r.returncode == 0, r.stderr
    dev = r.stdout.strip()
    try:
        assert dev.startswith("/dev/loop")
        listed = json.loads(imager("loop", "list", "--json").stdout)["loopdevices"]
        assert any(e["path"] == dev and e["back-file"] == str(backing) for e in listed)
    finally:
        r = imager("loop", "detach", dev)
    assert r.returncode == 0, r.stderr
    assert all(info.device != dev for info in loop.list_attached())
    r = imager("loop", "detach", dev)
    assert r.returncode == 1 and "not attached" in r.stderr


def test_sigterm_during_backup_leaves_no_partial_image(tmp_path, loops):
    dev = loops.create(1 << 30, fill=_random_fill)
    image = tmp_path / "big.zst"
    proc = subprocess.Popen([sys.executable, "-m", "imager.cli", "backup", dev, "-o", str(image),
                             "--level", "19", "--workers", "1"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not writing_into(proc.pid, tmp_path):
        assert proc.poll() is None and time.monotonic() < deadline, "backup never started writing"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not image.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".big.zst")]


def _random_fill(path) -> None:
    with open(path, "r+b") as f:
        block = os.urandom(4 << 20)
        for _ in range(64):
            f.write(block)


def test_usage_errors_exit_2_without_traceback():
    r = imager("backup")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = imager("backup", "/dev/null", "-o", "/tmp/x.zst", "--chunk-size", "lots")
    assert r.returncode == 2 and "not a size" in r.stderr


def test_demo_runs_end_to_end_and_cleans_up():
    r = imager("demo", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    from jsonschema import Draft202012Validator

    from imager.schema import schema
    assert not list(Draft202012Validator(dict(schema(), **{"$ref": "#/$defs/demo"})).iter_errors(summary))
    assert summary["backup"]["ratio"] > 1 and summary["restore"]["verified"]
    assert summary["tape_restore"]["verified"]
    incremental = summary["incremental"]                      # only what the writer changed since the full
    assert (incremental["kind"], incremental["method"]) == ("incremental", "tracker")
    assert 0 < incremental["image_bytes"] < summary["backup"]["image_bytes"] / 10
    assert summary["backup"]["freeze_window_ms"] is not None and summary["tape_backup"]["image_bytes"] > 0
    assert not [i for i in loop.list_attached() if "imager-demo-" in i.backing_file]
    assert not [line for line in open("/proc/mounts") if "imager-demo-" in line]


def test_backup_records_the_image_in_the_catalog(ext4_volume, tmp_path, private_catalog):
    dev, _ = ext4_volume
    image = tmp_path / "cat.zst"
    (summary,) = json.loads(imager("backup", dev, "-o", str(image), "--json").stdout)["images"]
    listing = json.loads(imager("catalog", "list", "--json").stdout)
    assert listing["catalog"] == str(private_catalog)
    (entry,) = listing["images"]
    assert entry["image_id"] == summary["image_id"]
    assert entry["source"] == dev and entry["fstype"] == "ext4"
    assert entry["image_bytes"] == image.stat().st_size == summary["image_bytes"]
    assert entry["content_digest"] == summary["content_digest"]
    assert entry["snapshot"]["provider"] == "none"
    assert entry["segments"] == [{"segment": 0, "kind": "file", "path": str(image), "tape_label": None,
                                  "tape_set": None, "tape_file": None, "offset": 0,
                                  "bytes": image.stat().st_size, "present": True}]
    assert summary["segments"] == [{k: v for k, v in entry["segments"][0].items() if k != "present"}]
    other = tmp_path / "other.sqlite"
    imager("backup", dev, "-o", str(tmp_path / "b.zst"), "--catalog", str(other), "-q")
    assert len(json.loads(imager("catalog", "list", "--json", "--catalog", str(other)).stdout)["images"]) == 1
    assert len(json.loads(imager("catalog", "list", "--json").stdout)["images"]) == 1


def test_progress_bar_on_a_terminal_only(ext4_volume, tmp_path):
    dev, _ = ext4_volume
    image = tmp_path / "tty.zst"
    cmd = f"{sys.executable} -m imager.cli backup {dev} -o {image}"
    on_tty = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True,
                            cwd=os.getcwd(), timeout=120)
    assert on_tty.returncode == 0, on_tty.stdout
    assert "backup:" in on_tty.stdout and "B/s" in on_tty.stdout, on_tty.stdout
    piped = imager("backup", dev, "-o", str(tmp_path / "pipe.zst"))
    assert piped.returncode == 0 and "B/s" not in piped.stderr and "backup:" not in piped.stderr


def test_listings_have_a_header_and_aligned_columns(tmp_path):
    catalog = str(tmp_path / "c.sqlite")
    for name, size in (("a.img", 1 << 20), ("a-much-longer-volume-name.img", 3 << 20)):
        (tmp_path / name).write_bytes(os.urandom(size))
        made = imager("backup", str(tmp_path / name), "-o", str(tmp_path / f"{name}.zst"), "-q", "--catalog", catalog)
        assert made.returncode == 0, made.stderr
    lines = imager("catalog", "list", "--catalog", catalog, check=True).stdout.splitlines()
    assert lines[0].split() == ["ID", "TAKEN", "SOURCE", "SIZE", "STORED", "KIND", "WHERE"]
    for column in ("SOURCE", "SIZE", "KIND"):
        start = lines[0].index(column)
        assert all(line[start - 2:start] == "  " and line[start] != " " for line in lines[1:]), (column, lines)


def test_the_catalog_keeps_one_row_per_file_marks_missing_files_and_forgets_on_request(tmp_path):
    catalog = str(tmp_path / "c.sqlite")
    volume = tmp_path / "vol.img"
    volume.write_bytes(os.urandom(1 << 20))

    def backup(out: str, *extra: str) -> str:
        made = imager("backup", str(volume), "-o", out, "--json", "--catalog", catalog, *extra)
        assert made.returncode == 0, made.stderr
        return json.loads(made.stdout)["images"][0]["image_id"]

    def listed(*extra: str) -> list[dict]:
        return json.loads(imager("catalog", "list", "--json", "--catalog", catalog, *extra, check=True).stdout)["images"]

    first = backup(str(tmp_path / "a.zst"))
    second = backup(str(tmp_path / "a.zst"), "--force")
    assert [r["image_id"] for r in listed()] == [second], "the overwritten image's row stayed"
    third = backup(str(tmp_path / "b.zst"))
    os.unlink(tmp_path / "b.zst")
    rows = {r["image_id"]: r for r in listed()}
    assert rows[third]["segments"][0]["present"] is False and rows[second]["segments"][0]["present"] is True
    assert "(MISSING)" in imager("catalog", "list", "--catalog", catalog, check=True).stdout
    assert listed("--since", "1h") and listed("--since", "2999-01-01") == []
    assert len(listed("--source", str(volume))) == 2 and listed("--source", "/dev/sdz") == []
    forgot = imager("catalog", "forget", third[:10], "--catalog", catalog, check=True)
    assert "its files stay" in forgot.stdout and [r["image_id"] for r in listed()] == [second]
    assert (tmp_path / "a.zst").exists()
    wrong = imager("catalog", "forget", "ffffffffff", "--catalog", catalog)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr and first not in wrong.stderr


def test_output_names_from_a_template(tmp_path):
    volume = tmp_path / "vol.img"
    volume.write_bytes(os.urandom(1 << 20))
    day_before = time.strftime("%Y%m%d")
    made = imager("backup", str(volume), "-o", str(tmp_path / "{name}-{date:%Y%m%d}-{host}.zst"), "--json",
                  "--catalog", str(tmp_path / "c.sqlite"))
    assert made.returncode == 0, made.stderr
    written = json.loads(made.stdout)["images"][0]["image"]
    # The run may cross midnight: its day is the one before or after it.
    assert os.path.basename(written) in {f"vol.img-{day}-{os.uname().nodename}.zst"
                                         for day in (day_before, time.strftime("%Y%m%d"))}
    assert os.path.exists(written)
    bad = imager("backup", str(volume), "-o", str(tmp_path / "{volume}.zst"))
    assert bad.returncode == 2 and "not a usable template" in bad.stderr and "Traceback" not in bad.stderr
    before = sorted(os.listdir(tmp_path))
    for template in ("{name.__class__}.zst", "{name!r}.zst", "{host:>40}.zst"):
        one_line_error(imager("backup", str(volume), "-o", str(tmp_path / template)), "is not one of its fields",
                       code=2)
    one_line_error(imager("backup", str(volume), "-o", str(tmp_path / "d" / "{date:%Y/../../x}.zst")),
                   "whose '..' the template does not spell", code=2)
    assert sorted(os.listdir(tmp_path)) == before


def test_jobs_leave_a_record_in_the_log_file_and_syslog(tmp_path):
    import socket as sockets

    volume = tmp_path / "vol.img"
    volume.write_bytes(os.urandom(1 << 20))
    listener = sockets.socket(sockets.AF_UNIX, sockets.SOCK_DGRAM)
    listener.bind(str(tmp_path / "log.sock"))
    listener.settimeout(30)
    log_file = tmp_path / "jobs.log"
    env = dict(os.environ, IMAGER_SYSLOG=str(tmp_path / "log.sock"))
    done = imager("backup", str(volume), "-o", str(tmp_path / "v.zst"), "-q", "--log-file", str(log_file),
                  "--catalog", str(tmp_path / "c.sqlite"), env=env)
    failed = imager("verify", str(tmp_path / "missing.zst"), "--log-file", str(log_file), env=env)
    assert done.returncode == 0 and failed.returncode == 2
    assert done.stderr == "", "the record is for the logs, not the terminal"
    text = log_file.read_text()
    assert "INFO started: imager backup" in text and "imaged " in text
    assert "ERROR failed: imager verify" in text and "no such image file" in text
    assert oct(log_file.stat().st_mode & 0o777) == "0o600"
    received = []
    while not any(b"failed: imager verify" in m for m in received):
        received.append(listener.recv(65536))
    listener.close()
    assert any(b"imager: started: imager backup" in m for m in received), received


def test_devices_draws_disks_and_partitions_as_a_tree_with_type_names(bench):
    from lab import gpt_disk_with_esp

    esp = gpt_disk_with_esp(bench)
    disk = os.path.basename(esp)[:-2]
    lines = imager("devices", check=True).stdout.splitlines()
    names = [line.split()[0] for line in lines]
    at = names.index(disk)
    assert names[at + 1:at + 3] == [f"├─{disk}p1", f"└─{disk}p2"], lines
    assert "EFI System" in lines[at + 1]
    listed = json.loads(imager("devices", "--json", check=True).stdout)["blockdevices"]
    (parent,) = [d for d in listed if d["name"] == disk]
    (entry,) = [d for d in parent["children"] if d["path"] == esp]
    assert entry["parttypename"] == "EFI System" and entry["pkname"] == disk and entry["type"] == "part"


def test_an_incremental_is_never_written_over_its_own_parent(tmp_path):
    volume = tmp_path / "vol.img"
    volume.write_bytes(os.urandom(2 << 20))
    image = tmp_path / "latest.zst"
    catalog = str(tmp_path / "c.sqlite")
    assert imager("backup", str(volume), "-o", str(image), "--catalog", catalog).returncode == 0
    with open(volume, "r+b") as f:
        f.write(b"changed")
    before = image.read_bytes()
    again = imager("backup", str(volume), "-o", str(image), "-i", "--force", "--catalog", catalog)
    assert again.returncode == 2 and "is the parent of this incremental" in again.stderr, again.stderr
    assert image.read_bytes() == before


def test_reading_a_catalog_that_is_not_there_creates_nothing(tmp_path):
    """A --catalog typed wrong is said, and no directory or database appears at that path."""
    missing = tmp_path / "typo" / "catalog.sqlite"
    for command in (["catalog", "list"], ["catalog", "check"], ["catalog", "prune", "--keep-last", "1"]):
        one_line_error(imager(*command, "--catalog", str(missing)), "no catalog there", code=2)
    assert not (tmp_path / "typo").exists()


def test_a_command_line_argparse_refuses_is_one_line_naming_the_help():
    one_line_error(imager("backup"), "backup: the following arguments are required: SOURCE",
                   r"\(see imager backup --help\)", code=2)
    one_line_error(imager("catalog", "prune", "--keep-last", "x"), "catalog prune: argument --keep-last",
                   r"\(see imager catalog prune --help\)", code=2)
    one_line_error(imager("no-such-command"), "invalid choice", r"\(see imager --help\)", code=2)
    # ranges are checked before any source is looked at
    one_line_error(imager("backup", "/nonexistent", "-o", "x.zst", "--level", "0"), "out of range", code=2)
    one_line_error(imager("backup", "/nonexistent", "-o", "x.zst", "--chunk-size", "3K"), "power of two", code=2)
    # A value that starts with "-" is the option's value, refused for what it is, as getopt does.
    one_line_error(imager("backup", "/nonexistent", "-o", "x.zst", "--chunk-size", "-4M"), "not a size: '-4M'", code=2)
    one_line_error(imager("backup", "/nonexistent", "-o", "x.zst", "--level", "-3"), "-3 is out of range", code=2)
    # --image is an image id, and only for a tape: an empty one (an unset variable) chooses nothing
    one_line_error(imager("restore", "--tape", "/nonexistent.tap", "--image", "", "/tmp/x"), "an image id is",
                   code=2)
    one_line_error(imager("restore", "x.zst", "/tmp/x", "--image", "ab12"), "give --tape too", code=2)
    one_line_error(imager("verify", "x.zst", "--image", "ab12"), "give --tape too", code=2)
    one_line_error(imager("restore", "x.zst", ""), "an empty path", code=2)
    one_line_error(imager("restore", "--tape", "/nonexistent.tap", "--image", "ab12", ""), "an empty path", code=2)


def test_a_catalog_or_log_file_never_goes_under_dev(tmp_path):
    before = set(os.listdir("/dev"))
    for option in (["--catalog", "/dev/null"], ["--catalog", "/dev/imager-test.db"],
                   ["--log-file", "/dev/full"], ["--log-file", "/dev/imager-test.log"]):
        one_line_error(imager("catalog", "list", *option), "is under /dev", code=2)
    assert set(os.listdir("/dev")) == before
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    one_line_error(imager("catalog", "list", "--log-file", str(fifo)), "a FIFO nobody reads", code=2)


def test_a_log_file_that_cannot_be_written_is_said_once_and_the_job_goes_on(capsys):
    import errno
    import logging

    from imager.cli.logs import LogFileHandler

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass
    handler = LogFileHandler(Full(), "/var/log/imager.log")
    logger = logging.getLogger("imager.test-log-file")
    logger.addHandler(handler)
    try:
        for n in range(3):
            logger.warning("line %d", n)
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err.splitlines()
    assert err == ["imager: warning: writing the log file /var/log/imager.log failed (No space left on device); "
                   "it is not written any more"]
