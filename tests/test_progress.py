"""Progress as people and programs see it: a bar on a terminal's stderr whatever stdout is, plain
lines for logs, JSON lines for programs, phases named (a restore's verify pass is one)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, imager

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    volume = tmp_path / "volume.img"
    with open(volume, "wb") as f:
        for i in range(48):
            f.write(os.urandom(MiB // 2) + bytes(MiB // 2))
    out = tmp_path / "volume.zst"
    done = imager("backup", str(volume), "-o", str(out), "-q", "--catalog", str(tmp_path / "c.sqlite"))
    assert done.returncode == 0, done.stderr
    return out


def run_on_a_terminal_stderr(args: list[str], stdout_path) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal and stdout to a file; what the terminal showed."""
    master, slave = pty.openpty()
    with open(stdout_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "imager.cli", *args], cwd=REPO_ROOT, stdout=out,
                                stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    shown = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            proc.kill()
            raise AssertionError(f"no output and no exit within 60 s: {shown!r}")
        try:
            piece = os.read(master, 65536)
        except OSError:          # EIO: the child closed the terminal
            break
        if not piece:
            break
        shown += piece
    os.close(master)
    return proc.wait(), shown.decode(errors="replace")


def test_a_bar_on_a_terminal_whatever_stdout_is(image, tmp_path):
    code, shown = run_on_a_terminal_stderr(["restore", str(image), str(tmp_path / "r.img"), "--verify", "--json"],
                                           tmp_path / "summary.json")
    assert code == 0, shown
    assert json.loads((tmp_path / "summary.json").read_text())["verified"] is True
    # Both phases drew a bar, in binary units labelled as such.
    assert "restore write" in shown and "restore verify" in shown, shown
    assert re.search(r"MiB/s", shown), shown
    code, shown = run_on_a_terminal_stderr(["restore", str(image), str(tmp_path / "r2.img"), "--progress", "none"],
                                           tmp_path / "summary.txt")
    assert code == 0 and "restore write" not in shown, shown


def test_plain_lines_for_logs(image, tmp_path):
    done = imager("restore", str(image), str(tmp_path / "r.img"), "--verify", "--progress", "plain")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert any(re.fullmatch(r"imager: restore write: 48\.0 MiB of 48\.0 MiB \(100%\), [\d.]+ MiB/s, done", line)
               for line in lines), lines
    assert any(line.startswith("imager: restore verify: 48.0 MiB of 48.0 MiB (100%)") for line in lines), lines
    # Nothing that only a terminal understands.
    assert "\r" not in done.stderr and "\x1b" not in done.stderr


def test_json_lines_for_programs(image, tmp_path):
    done = imager("restore", str(image), str(tmp_path / "r.img"), "--verify", "--progress", "json")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    finals = [e for e in events if e["final"]]
    assert [e["phase"] for e in finals] == ["write", "verify"], events
    assert all(e["done"] == e["total"] == 48 * MiB and e["command"] == "restore" for e in finals)
    assert all(e["done"] <= e["total"] for e in events)


def test_quiet_shows_nothing_even_on_a_terminal(image, tmp_path):
    code, shown = run_on_a_terminal_stderr(["verify", str(image), "-q", "--progress", "bar"], tmp_path / "out")
    assert code == 0 and shown.strip() == "", shown


def test_the_compressed_rate_is_shown_and_a_tape_under_its_streaming_rate_is_flagged(tmp_path):
    volume = tmp_path / "volume.img"
    with open(volume, "wb") as f:
        for i in range(32):
            f.write(os.urandom(MiB // 2) + bytes(MiB // 2))
    to_file = imager("backup", str(volume), "-o", str(tmp_path / "v.zst"), "--progress", "json", "--json",
                     "--catalog", str(tmp_path / "c.sqlite"))
    assert to_file.returncode == 0, to_file.stderr
    (summary,) = json.loads(to_file.stdout)["images"]
    final = [json.loads(line) for line in to_file.stderr.splitlines() if line.startswith("{")][-1]
    assert final["output"] == "written" and final["bytes_written"] == summary["image_bytes"], final
    assert final["done"] == 32 * MiB and final["minimum_per_second"] is None

    tape = str(tmp_path / "t.tap")
    assert imager("tape", "label", "T1", "--tape", tape).returncode == 0
    # No machine streams 10 TB/s: the drive's minimum (given, as a real drive's LTO generation
    # would give it) is never reached, and the display says so.
    done = imager("backup", str(volume), "--tape", tape, "--progress", "plain", "--min-rate", "10000000", "--json",
                  "--catalog", str(tmp_path / "c.sqlite"))
    assert done.returncode == 0, done.stderr
    (summary,) = json.loads(done.stdout)["images"]
    line = next(line for line in done.stderr.splitlines() if line.startswith("imager: backup") and "done" in line)
    assert re.search(r"[\d.]+ MiB/s to tape \(UNDER the drive's 9536743 MiB/s\)", line), line
    assert "shoe-shining" in done.stderr


def test_an_incrementals_progress_counts_the_bytes_it_reads(ext4_volume, loops, tmp_path):
    """Most of a volume is not read by an incremental: its progress counts what is read, so that
    the rate shown is a read rate, and ends at 100% of it."""
    dev, _ = ext4_volume
    catalog = str(tmp_path / "c.sqlite")
    full = imager("backup", dev, "-o", str(tmp_path / "full.zst"), "-q", "--snapshot", "none", "--catalog", catalog)
    assert full.returncode == 0, full.stderr
    point = loops.mount(dev)
    (point / "night.bin").write_bytes(os.urandom(3 * MiB))
    loops.umount(point)
    done = imager("backup", dev, "-o", str(tmp_path / "incr.zst"), "--incremental", "--snapshot", "none",
                  "--catalog", catalog, "--json", "--progress", "json")
    assert done.returncode == 0, done.stderr
    [result] = json.loads(done.stdout)["images"]
    assert result["kind"] == "incremental" and result["bytes_read"] < result["volume_size"]
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    [final] = [e for e in events if e["final"] and e["phase"].startswith("read")]
    assert final["done"] == final["total"] == result["bytes_read"], (final, result)
    assert all(e["done"] <= e["total"] for e in events)
