#!/usr/bin/env python3
"""How long the front goes unserved when a managed volume's worker dies (#15): kill -9 of the
worker `--kills` times under a writer doing O_DIRECT random 4 KiB writes and fdatasync on the
front; for each kill, the time from the kill to the first FUSE request the next worker answers
(it records that instant in the run directory). The writer must see no error.

    python bench/worker_restart.py [--kills 50]

Writes bench/results/worker_restart.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devices import loop  # noqa: E402
from imager.snapshot import daemon  # noqa: E402
from imager.snapshot.daemon.supervisor import WORKER_FILE  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / "work"

WRITER = r"""
import mmap, os, random, sys
front, stop, count = sys.argv[1:4]
fd = os.open(front, os.O_WRONLY | os.O_DIRECT)
blocks = os.lseek(fd, 0, os.SEEK_END) // 4096
buf = mmap.mmap(-1, 4096)
progress = os.open(count, os.O_WRONLY | os.O_CREAT)
n = 0
while not os.path.exists(stop):
    buf.write(os.urandom(4096)); buf.seek(0)
    os.pwrite(fd, buf, random.randrange(blocks) * 4096)
    n += 1
    if n % 16 == 0:
        os.fdatasync(fd)
        os.pwrite(progress, b"%20d" % n, 0)
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=50)
    p.add_argument("--size-mib", type=int, default=256)
    args = p.parse_args()
    WORK.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=WORK, prefix="restart-"))
    os.environ.setdefault(daemon.RUN_DIR_ENV, str(tmp / "run"))
    os.environ.setdefault(daemon.STATE_DIR_ENV, str(tmp / "state"))
    name = "benchrestart"
    source = writer = None
    attached = False
    gaps = []
    try:
        backing = tmp / "source.img"
        with open(backing, "wb") as f:
            f.truncate(args.size_mib << 20)
        source = loop.attach(str(backing), direct_io=True)
        volume = daemon.attach(source, name=name)
        attached = True
        stop, count = tmp / "stop", tmp / "count"
        writer = subprocess.Popen([sys.executable, "-c", WRITER, volume.front, str(stop), str(count)])
        worker_file = Path(volume.run_dir) / WORKER_FILE
        for _ in range(args.kills):
            wait_for(lambda: written(count) > 0 and writer.poll() is None, "the writer")
            before = written(count)
            wait_for(lambda: written(count) > before, "the writer's progress")
            pid = json.loads(worker_file.read_text())["pid"]
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: served_by_another(worker_file, pid), "a new worker")
            gaps.append(json.loads(worker_file.read_text())["first_reply_monotonic"] - killed_at)
        stop.touch()
        code = writer.wait(60)
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()
        if attached:
            daemon.detach(name)
        if source:
            loop.detach(source)
        subprocess.run(["rm", "-rf", str(tmp)])
    result = {"kills": len(gaps), "writer_exit": code, "median_ms": statistics.median(gaps) * 1e3,
              "max_ms": max(gaps) * 1e3, "min_ms": min(gaps) * 1e3}
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "worker_restart.json").write_text(json.dumps(dict(result, gaps_ms=[g * 1e3 for g in gaps]),
                                                            indent=2) + "\n")
    return 0 if code == 0 else 1


def written(path: Path) -> int:
    try:
        return int(path.read_bytes().strip() or 0)
    except FileNotFoundError:
        return 0


def served_by_another(worker_file: Path, pid: int) -> bool:
    try:
        return json.loads(worker_file.read_text())["pid"] != pid
    except (FileNotFoundError, ValueError, KeyError):
        return False


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g} s for {what}")
        time.sleep(0.002)


if __name__ == "__main__":
    sys.exit(main())
