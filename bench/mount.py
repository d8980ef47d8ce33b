#!/usr/bin/env python3
"""imager mount, measured in one run: from `imager mount` to a listed root on a 4 GiB and a
16 GiB image, a sequential read of a 300 MiB file from the mount against `zstd -d -T0` of the
same chunks, random 4 KiB reads with a warm cache, and the daemon's memory.

    python bench/mount.py [--rounds 3]

The 4 GiB volume is bench/volumes.py's aged ext4 (system files, 300 MiB of random data in
random.bin, free space once filled with random data); the 16 GiB one is a fresh ext4 with a
little data, mostly never-written (zero) chunks. Images and volumes are built once into
bench/work/. Only this benchmark's own files are dropped from the page cache
(posix_fadvise DONTNEED on the image files), never the whole machine's. Prints a table and
writes bench/results/mount.json.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import volumes  # noqa: E402
from devices import loop  # noqa: E402
from devices.fs import drop_cached, file_extents  # noqa: E402
from imager.format import ImageReader  # noqa: E402
from imager.mount.volume import DEFAULT_CACHE_BYTES, DEFAULT_READAHEAD  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
IMAGER = [sys.executable, "-m", "imager.cli"]
MiB = 1 << 20


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, **kw)


def image_of(volume: Path, name: str) -> Path:
    image = volumes.WORK / name
    if not image.exists():
        print(f"imaging {volume} to {image} ...", file=sys.stderr)
        sh(*IMAGER, "backup", str(volume), "-o", str(image), "-q", "--catalog", str(volumes.WORK / "catalog.sqlite"))
    return image


def sparse_volume(size: int = 16 << 30) -> Path:
    """A fresh ext4 of `size` with a little data: most of its chunks were never written."""
    path = volumes.WORK / f"ext4-{size >> 30}g-sparse.img"
    if path.exists():
        return path
    tmp = path.with_suffix(".building")
    with open(tmp, "wb") as f:
        f.truncate(size)
    device = loop.attach(str(tmp))
    mnt = Path(tempfile.mkdtemp(prefix="imager-bench-"))
    try:
        sh("mkfs.ext4", "-q", "-F", "-L", "sparse", device)
        sh("mount", device, str(mnt))
        try:
            sh("cp", "-a", "/usr/lib/python3.11", str(mnt / "python3.11"))
            with open(mnt / "random.bin", "wb") as f:
                f.write(os.urandom(64 * MiB))
        finally:
            sh("umount", str(mnt))
    finally:
        loop.detach(device)
        mnt.rmdir()
    os.rename(tmp, path)
    return path


class Mounts:
    """imager mount / umount in a run directory of the benchmark's own."""

    def __init__(self, base: Path):
        self.base = base
        self.env = dict(os.environ, IMAGER_RUN_DIR=str(base / "run"))
        self.points: list[Path] = []

    def point(self) -> Path:
        point = Path(tempfile.mkdtemp(dir=self.base))
        self.points.append(point)
        return point

    def mount(self, image: Path, point: Path) -> dict:
        done = subprocess.run([*IMAGER, "mount", str(image), str(point), "--json"], capture_output=True, text=True,
                              cwd=ROOT, env=self.env)
        if done.returncode:
            raise SystemExit(f"imager mount failed: {done.stderr}")
        return json.loads(done.stdout)

    def umount(self, point: Path) -> None:
        subprocess.run([*IMAGER, "umount", str(point), "-q"], check=True, cwd=ROOT, env=self.env)

    def time_to_listing(self, image: Path) -> float:
        """Seconds from starting `imager mount` to a listed, non-empty root."""
        point = self.point()
        drop_cached(image)
        start = time.monotonic()
        subprocess.run([*IMAGER, "mount", str(image), str(point), "-q"], check=True, cwd=ROOT, env=self.env)
        listed = os.listdir(point)
        seconds = time.monotonic() - start
        assert listed, f"{point} is empty"
        self.umount(point)
        return seconds

    def cleanup(self) -> None:
        for point in self.points:
            if os.path.ismount(point):
                subprocess.run([*IMAGER, "umount", str(point), "-q"], cwd=ROOT, env=self.env)
        shutil.rmtree(self.base, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    usage = os.times()
    return usage.children_user + usage.children_system


def read_sequentially(path: Path, daemon: int) -> tuple[float, float]:
    """MB/s of dd bs=1M of the file to /dev/null, and the CPU seconds the daemon spent."""
    cpu = cpu_seconds(daemon)
    start = time.monotonic()
    sh("dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none")
    return path.stat().st_size / (time.monotonic() - start) / 1e6, cpu_seconds(daemon) - cpu


def chunks_of(path: Path, chunk_size: int) -> list[int]:
    chunks: set[int] = set()
    for start, end in file_extents(str(path), exclusive_only=False):
        chunks.update(range(start // chunk_size, (end - 1) // chunk_size + 1))
    return sorted(chunks)


def zstd_rate(frames: Path, decompressed: int) -> tuple[float, float]:
    """MB/s of decompressed output of zstd -d -T0 of `frames` (from the disk) to /dev/null, and
    the CPU seconds it took."""
    drop_cached(frames)
    cpu = children_cpu()
    start = time.monotonic()
    sh("sh", "-c", f"zstd -d -T0 -c -q '{frames}' > /dev/null")
    return decompressed / (time.monotonic() - start) / 1e6, children_cpu() - cpu


def random_reads(path: Path, offset: int, window: int, seconds: float, *, direct: bool) -> float:
    """4 KiB reads per second, one at a time, at random 4 KiB-aligned offsets in bytes
    [offset, offset + window) of `path`, after one pass over them (a warm cache)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    buf = mmap.mmap(-1, 1 << 20)
    small = mmap.mmap(-1, 4096)
    try:
        for at in range(offset, offset + window, 1 << 20):
            os.preadv(fd, [buf], at)
        rng = random.Random(12)
        blocks = window // 4096
        count = 0
        start = time.monotonic()
        deadline = start + seconds
        while True:
            for _ in range(256):
                os.preadv(fd, [small], offset + rng.randrange(blocks) * 4096)
            count += 256
            now = time.monotonic()
            if now >= deadline:
                return count / (now - start)
    finally:
        os.close(fd)


def memory_of(pid: int) -> dict[str, float]:
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="mounts timed per image (median reported)")
    p.add_argument("--random-seconds", type=float, default=3.0)
    args = p.parse_args()

    aged = volumes.build("ext4", 4 << 30, aged=True)
    image4 = image_of(aged, "mount-ext4-4g-aged.zst")
    image16 = image_of(sparse_volume(), "mount-ext4-16g-sparse.zst")
    mounts = Mounts(Path(tempfile.mkdtemp(prefix="imager-bench-mount-")))
    rows: list[tuple[str, str]] = []
    result: dict = {"rounds": args.rounds}
    try:
        times: dict[str, list[float]] = {"4g": [], "16g": []}
        for _ in range(args.rounds):                      # alternating
            times["4g"].append(mounts.time_to_listing(image4))
            times["16g"].append(mounts.time_to_listing(image16))
        version = []
        for _ in range(args.rounds):
            start = time.monotonic()
            sh(*IMAGER, "--version")
            version.append(time.monotonic() - start)
        for key, label in (("4g", "4 GiB aged ext4"), ("16g", "16 GiB sparse ext4")):
            t = times[key]
            rows.append((f"imager mount to a listed root, {label} (s)",
                         f"{statistics.median(t):.2f}  ({min(t):.2f}-{max(t):.2f})"))
        rows.append(("  of which: python -m imager.cli --version (s)", f"{statistics.median(version):.2f}"))
        result["mount_seconds"] = times
        result["cli_start_seconds"] = version

        # Sequential: a fresh mount each round (nothing cached), the image dropped from the page
        # cache, against zstd -d of the frames of the same chunks, also from the disk.
        with ImageReader(str(image4)) as reader:
            chunk_size = reader.header.chunk_size
        frames = mounts.base / "random-chunks.zst"
        seq: list[float] = []
        same: list[float] = []
        seq_cpu: list[float] = []
        same_cpu: list[float] = []
        chunks: list[int] = []
        last = None
        for _ in range(args.rounds):
            if last is not None:
                mounts.umount(last[0])      # one mount at a time: the idle ones cost the next one
            point = mounts.point()
            drop_cached(image4)
            info = mounts.mount(image4, point)
            big = point / "random.bin"
            if not chunks:
                chunks = chunks_of(big, chunk_size)
                with ImageReader(str(image4)) as reader, open(frames, "wb") as f:
                    for index in chunks:
                        f.write(reader.frame(index))
                drop_cached(image4)
            rate, cpu = read_sequentially(big, info["pid"])
            seq.append(rate)
            seq_cpu.append(cpu)
            rate, cpu = zstd_rate(frames, len(chunks) * chunk_size)
            same.append(rate)
            same_cpu.append(cpu)
            last = (point, info, big)
        point, info, big = last
        size = big.stat().st_size
        zstd_whole = zstd_rate(image4, 4 << 30)[0]
        ratio = statistics.median(seq) / statistics.median(same)
        rows.append((f"sequential read of random.bin ({size / MiB:.0f} MiB) from the mount, cold (MB/s)",
                     f"{statistics.median(seq):.0f}  ({min(seq):.0f}-{max(seq):.0f})"))
        rows.append((f"zstd -d -T0 of the same {len(chunks)} chunks to /dev/null, cold (MB/s)",
                     f"{statistics.median(same):.0f}  ({min(same):.0f}-{max(same):.0f})"))
        rows.append(("  mount / zstd (medians)", f"{ratio:.2f}x"))
        rows.append(("  CPU seconds: the mount daemon / zstd -d (medians)",
                     f"{statistics.median(seq_cpu):.2f} / {statistics.median(same_cpu):.2f}"))
        rows.append(("zstd -d -T0 of the whole 4 GiB image to /dev/null (MB/s of volume)", f"{zstd_whole:.0f}"))
        result.update(file_bytes=size, sequential_mb_s=seq, zstd_same_chunks_mb_s=same, ratio=ratio,
                      daemon_cpu_s=seq_cpu, zstd_cpu_s=same_cpu,
                      zstd_whole_image_mb_s=zstd_whole, chunks=len(chunks))

        # Random 4 KiB reads with a warm cache (32 MiB, within the 64 MiB cache): the served volume
        # file, where every read reaches the daemon (FUSE direct I/O), in random.bin's chunks;
        # and random.bin through the mounted ext4 with O_DIRECT (ext4, loop device, FUSE, daemon).
        window = 32 * MiB
        first = chunks[len(chunks) // 2] * chunk_size
        rate_volume = random_reads(Path(info["volume_file"]), first, window, args.random_seconds, direct=False)
        rate_file = random_reads(big, 0, window, args.random_seconds, direct=True)
        rows.append(("random 4 KiB reads, warm cache, the served volume file (reads/s)", f"{rate_volume:.0f}"))
        rows.append(("random 4 KiB reads, warm cache, O_DIRECT in the mounted ext4 (reads/s)", f"{rate_file:.0f}"))
        result.update(random_volume_per_s=rate_volume, random_fs_direct_per_s=rate_file)

        memory = memory_of(info["pid"])
        bound = DEFAULT_CACHE_BYTES + DEFAULT_READAHEAD * chunk_size
        rows.append((f"daemon RSS after the reads / peak (MiB); cache {DEFAULT_CACHE_BYTES // MiB} MiB + "
                     f"read-ahead {DEFAULT_READAHEAD} x {chunk_size // MiB} MiB",
                     f"{memory['VmRSS']:.0f} / {memory['VmHWM']:.0f}"))
        result.update(rss_mib=memory["VmRSS"], peak_mib=memory["VmHWM"], cache_bound_mib=bound / MiB)
        for point in list(mounts.points):
            if os.path.ismount(point):
                mounts.umount(point)
    finally:
        mounts.cleanup()

    load = os.getloadavg()
    rows.append(("load average of the machine at the end (1, 5, 15 min)", " ".join(f"{x:.1f}" for x in load)))
    result["loadavg_end"] = load
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'measure':<{width}}value")
    for name, value in rows:
        print(f"{name:<{width}}{value}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mount.json").write_text(json.dumps(dict(result, table=rows), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
