#!/usr/bin/env python3
"""The cost of the copy-on-write front, side by side in one run:

- sequential (1 MiB) and random (4 KiB) O_DIRECT writes with fio (libaio, 8 in flight, as a
  filesystem's writeback issues them): straight to a loop device (direct I/O on its file),
  through the front without a snapshot, under an active snapshot (first writes of blocks),
  and again under the same snapshot (rewrites);
- the freeze window of `snapshot create` on an idle mounted ext4 (median of several);
- reading the snapshot file;
- backup from a snapshot view against backup of the raw device, same data.

    python bench/front.py [--size-gib 2] [--runtime 8]

Writes the table to bench/results/daemon.json.

    python bench/front.py --tracker-cost [--rounds 3]

measures only what the change tracker costs: the same writes through the front of a volume
attached with change tracking on and off (IMAGER_CHANGE_TRACKING=off), alternating, a fresh
attach each round; writes bench/results/tracker_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devices import loop  # noqa: E402
from imager import jobs  # noqa: E402
from imager.errors import ImagerError  # noqa: E402
from imager.snapshot import daemon  # noqa: E402
from imager.snapshot.cow.tracker import TRACKING_ENV  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / "work"


def fio(device: str, pattern: str, size: int, runtime: int) -> float:
    """MB/s of O_DIRECT writes to `device` (`pattern` is write or randwrite). Every run starts
    with no dirty pages, so none of them rides on the writeback debt of the one before."""
    os.sync()
    bs = "1M" if pattern == "write" else "4k"
    # Several writes in flight, as a filesystem's writeback issues them.
    cmd = ["fio", "--name=bench", f"--filename={device}", f"--rw={pattern}", f"--bs={bs}", "--direct=1",
           "--ioengine=libaio", "--iodepth=8", f"--size={size}", "--output-format=json"]
    cmd += ["--numjobs=1", "--randrepeat=0", "--norandommap"]
    if pattern == "randwrite":
        cmd += ["--time_based", f"--runtime={runtime}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out)["jobs"][0]["write"]
    return job["bw_bytes"] / 1e6


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def detach_when_released(name: str, timeout: float = 60.0) -> None:
    """Detach once the front is no longer claimed: right after `umount` returns, the backup's
    private mounts of it can still hold it for a moment (seen once as "in use" here)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            daemon.detach(name)
            return
        except ImagerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def tracker_cost(size: int, runtime: int, rounds: int) -> int:
    """Writes through the front with the change tracker on and off, alternating."""
    WORK.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=WORK, prefix="front-tracker-"))
    os.environ.setdefault(daemon.RUN_DIR_ENV, str(tmp / "run"))
    os.environ.setdefault(daemon.STATE_DIR_ENV, str(tmp / "state"))
    name = "benchtracker"
    cases = [("seq write", "write", min(size, 1 << 30)), ("rand 4k write", "randwrite", size)]
    results: dict[str, dict[str, list[float]]] = {c[0]: {"on": [], "off": []} for c in cases}
    source = None
    try:
        backing = tmp / "managed.img"
        block = os.urandom(4 << 20)
        with open(backing, "wb") as fh:
            for _ in range(size // len(block)):
                fh.write(block)
            os.fsync(fh.fileno())
        source = loop.attach(str(backing), direct_io=True)
        for _ in range(rounds):
            for mode in ("on", "off"):
                if mode == "off":
                    os.environ[TRACKING_ENV] = "off"
                else:
                    os.environ.pop(TRACKING_ENV, None)
                front = daemon.attach(source, name=name).front
                try:
                    fio(front, "write", min(size, 1 << 30), runtime)     # warm the source's page cache
                    for label, pattern, span in cases:
                        results[label][mode].append(fio(front, pattern, span, runtime))
                finally:
                    detach_when_released(name)
    finally:
        os.environ.pop(TRACKING_ENV, None)
        if source is not None:
            loop.detach(source)
        subprocess.run(["rm", "-rf", str(tmp)])
    lines = [f"{'case (MB/s, median of ' + str(rounds) + ')':36} {'tracker on':>12} {'off':>12} {'on/off':>8}"]
    for label, by_mode in results.items():
        on, off = statistics.median(by_mode["on"]), statistics.median(by_mode["off"])
        lines.append(f"{label:36} {on:12.1f} {off:12.1f} {on / off:8.2f}")
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tracker_cost.json").write_text(json.dumps({"rounds": rounds, "runtime": runtime, "size": size,
                                                           "mb_s": results, "table": lines}, indent=2) + "\n")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=int, default=2)
    p.add_argument("--runtime", type=int, default=8, help="seconds of random writes per case")
    p.add_argument("--tracker-cost", action="store_true", help="only the change tracker's cost, on against off")
    p.add_argument("--rounds", type=int, default=3, help="rounds of --tracker-cost")
    args = p.parse_args()
    if args.tracker_cost:
        return tracker_cost(args.size_gib << 30, args.runtime, args.rounds)
    size = args.size_gib << 30
    seq_size = min(size, 1 << 30)
    WORK.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=WORK, prefix="front-"))
    os.environ.setdefault(daemon.RUN_DIR_ENV, str(tmp / "run"))
    os.environ.setdefault(daemon.STATE_DIR_ENV, str(tmp / "state"))
    name = "benchfront"
    rows: dict[str, float] = {}
    devices = []
    mounted = None
    attached = False
    try:
        plain_file, managed_file = tmp / "plain.img", tmp / "managed.img"
        # Allocated, written backing files: the first pass over a sparse file would measure the
        # filesystem's block allocation, not the daemon.
        block = os.urandom(4 << 20)
        for f in (plain_file, managed_file):
            with open(f, "wb") as fh:
                for _ in range(size // len(block)):
                    fh.write(block)
                os.fsync(fh.fileno())
        plain = loop.attach(str(plain_file), direct_io=True)
        devices.append(plain)
        source = loop.attach(str(managed_file), direct_io=True)
        devices.append(source)
        volume = daemon.attach(source, name=name)
        attached = True
        f = volume.front

        rows["seq write, loop device"] = fio(plain, "write", seq_size, args.runtime)
        # The daemon writes through the source device's page cache: the first pass also pays
        # for allocating it, later passes show the steady state.
        rows["seq write, front, no snapshot, first pass"] = fio(f, "write", seq_size, args.runtime)
        rows["seq write, front, no snapshot"] = fio(f, "write", seq_size, args.runtime)
        daemon.snapshot_create(name)
        rows["seq write, front, snapshot, first writes"] = fio(f, "write", seq_size, args.runtime)
        rows["seq write, front, snapshot, rewrites"] = fio(f, "write", seq_size, args.runtime)
        daemon.snapshot_delete(name, force=True)

        rows["rand 4k write, loop device"] = fio(plain, "randwrite", size, args.runtime)
        rows["rand 4k write, front, no snapshot"] = fio(f, "randwrite", size, args.runtime)
        daemon.snapshot_create(name)
        rows["rand 4k write, front, snapshot, first writes"] = fio(f, "randwrite", size, args.runtime)
        rows["rand 4k write, front, snapshot, rewrites"] = fio(f, "randwrite", size, args.runtime)
        daemon.snapshot_delete(name, force=True)

        # A filesystem of real files on the front, idle, for the freeze window and the backups.
        sh("mkfs.ext4", "-q", "-F", f)
        mounted = tmp / "mnt"
        mounted.mkdir()
        sh("mount", f, str(mounted))
        for src in ("/usr/share/doc", "/usr/lib/python3.11"):
            sh("cp", "-a", src, str(mounted / Path(src).name))
        with open(mounted / "random.bin", "wb") as fh:
            fh.write(os.urandom(256 << 20))
        os.sync()
        windows = []
        for _ in range(10):
            windows.append(daemon.snapshot_create(name).freeze_window_ms)
            daemon.snapshot_delete(name, force=True)
        rows["freeze window, idle ext4, median ms"] = statistics.median(windows)

        snap = daemon.snapshot_create(name).snapshots[0]
        drop_caches()
        start = time.monotonic()
        sh("dd", f"if={snap.path}", "of=/dev/null", "bs=4M", "status=none")
        rows["read the snapshot file (dd bs=4M)"] = size / (time.monotonic() - start) / 1e6
        daemon.snapshot_delete(name, force=True)

        out = tmp / "out"
        out.mkdir()
        raw, cow = [], []
        for _ in range(2):
            drop_caches()
            raw.append(jobs.backup(source, str(out / "raw.zst"), force=True).seconds)
            drop_caches()
            (r,) = jobs.backup_volumes([name], jobs.Destination(output=str(out / "cow.zst"), force=True),
                                       snapshot="cow")
            cow.append(r.seconds)
        rows["backup, raw device (s)"] = min(raw)
        rows["backup, cow snapshot view (s)"] = min(cow)
    finally:
        if mounted is not None:
            subprocess.run(["umount", str(mounted)])
        if attached:
            daemon.snapshot_delete(name, force=True, missing_ok=True)
            detach_when_released(name)
        for d in devices:
            loop.detach(d)
        subprocess.run(["rm", "-rf", str(tmp)])

    ratios = {
        "front / loop, seq": rows["seq write, front, no snapshot"] / rows["seq write, loop device"],
        "front / loop, rand": rows["rand 4k write, front, no snapshot"] / rows["rand 4k write, loop device"],
        "first-write cost vs plain front, seq": rows["seq write, front, no snapshot"]
        / rows["seq write, front, snapshot, first writes"],
        "first-write cost vs plain front, rand": rows["rand 4k write, front, no snapshot"]
        / rows["rand 4k write, front, snapshot, first writes"],
        "backup speed, snapshot view / raw": rows["backup, raw device (s)"] / rows["backup, cow snapshot view (s)"],
    }
    lines = [f"{'case':48} {'MB/s or value':>14}"]
    lines += [f"{k:48} {v:14.1f}" for k, v in rows.items()]
    lines += ["", f"{'ratio':48} {'':>14}"] + [f"{k:48} {v:14.2f}" for k, v in ratios.items()]
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "daemon.json").write_text(json.dumps({"rows": rows, "ratios": ratios}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
