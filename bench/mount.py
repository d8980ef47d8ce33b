#!/usr/bin/env python3
"""imager mount, measured in one run: from `imager mount` to a listed root on a 4 GiB and a
16 GiB image, sequential reads of two 300 MiB files from the mount (with dd, through the page
cache, again right after 1 GiB of memory was written and freed, and with fio, O_DIRECT) against
`zstd -d -T0` of the same chunks, alternating, random
4 KiB reads with a warm cache (also with the reader and the daemon on one core), the daemon's
memory, and two figures of the machine that the mount's reads depend on and zstd's do not (a
wake-up round trip, fresh memory's first touch).

    python bench/mount.py [--rounds 3]

The 4 GiB volume is bench/volumes.py's aged ext4 (system files, 300 MiB of random data in
random.bin, free space once filled with random data); the 16 GiB one is a fresh ext4 with a
little data and system.tar (300 MiB of the system's libraries, ordinary compressible data),
mostly never-written (zero) chunks. Images and volumes are built once into
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


# A file of ordinary, compressible data to read besides random.bin (where zstd -d only copies):
# the first 300 MiB of a tar of the system's libraries.
SYSTEM_TAR = "system.tar"
SYSTEM_TAR_BYTES = 300 * MiB


def sparse_volume(size: int = 16 << 30) -> Path:
    """A fresh ext4 of `size` with a little data (system files, 64 MiB of random data, and
    SYSTEM_TAR): most of its chunks were never written."""
    path = volumes.WORK / f"ext4-{size >> 30}g-sparse-tar.img"
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
            sh("sh", "-c", f"tar cf - -C / usr/lib/x86_64-linux-gnu usr/share 2>/dev/null | "
                           f"head -c {SYSTEM_TAR_BYTES} > '{mnt / SYSTEM_TAR}'")
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

    def mount(self, image: Path, point: Path, **env: str) -> dict:
        done = subprocess.run([*IMAGER, "mount", str(image), str(point), "--json"], capture_output=True, text=True,
                              cwd=ROOT, env=dict(self.env, **env))
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


def read_after_touching(path: Path, daemon: int) -> tuple[float, float]:
    """read_sequentially() right after 1 GiB of fresh memory was written and freed. A figure
    of the machine more than of the mount: in a VM with free page reporting the guest hands
    freed memory back to its host a few seconds after a large free, and a read that fills the
    page cache meanwhile waits on the host for its pages (the mount's reads after a page cache
    drop can land in that window too, which is why they vary from day to day)."""
    touch = mmap.mmap(-1, 1 << 30)
    for at in range(0, len(touch), MiB):
        touch[at:at + MiB] = ONES_MIB
    touch.close()
    return read_sequentially(path, daemon)


def read_direct(path: Path, daemon: int) -> tuple[float, float]:
    """MB/s of a sequential read of the file with O_DIRECT, 1 MiB reads, 8 in flight (fio), and
    the CPU seconds the daemon spent: no page-cache pages are filled, so the figure leaves out
    what making them costs the machine (see first_touch)."""
    cpu = cpu_seconds(daemon)
    out = sh("fio", "--name=seq", f"--filename={path}", "--rw=read", "--bs=1M", "--direct=1", "--iodepth=8",
             "--ioengine=libaio", "--output-format=json").stdout
    rate = json.loads(out)["jobs"][0]["read"]["bw_bytes"] / 1e6
    return rate, cpu_seconds(daemon) - cpu


def read_rows(rates: list[float], zstd: list[float], cpu: list[float], rate_label: str, ratio_label: str,
              cpu_label: str) -> tuple[list[tuple[str, str]], float]:
    """The table's rows of one way of reading a file against zstd -d of its chunks, and the ratio
    of the medians."""
    ratio = statistics.median(rates) / statistics.median(zstd)
    return [(f"  {rate_label}", f"{statistics.median(rates):.0f}  ({min(rates):.0f}-{max(rates):.0f})"),
            (f"  {ratio_label}", f"{ratio:.2f}x  ({' '.join(f'{a / b:.2f}' for a, b in zip(rates, zstd))})"),
            (f"  {cpu_label}", f"{statistics.median(cpu):.2f}")], ratio


def chunks_of(path: Path, chunk_size: int) -> list[int]:
    chunks: set[int] = set()
    for start, end in file_extents(str(path), exclusive_only=False):
        chunks.update(range(start // chunk_size, (end - 1) // chunk_size + 1))
    return sorted(chunks)


class Sequential:
    """Rounds of a sequential read of one file from a fresh mount of its image, each against
    zstd -d of the frames of the chunks the file lies in."""

    def __init__(self, image: Path, name: str, work: Path):
        self.image = image
        self.name = name
        self.frames = work / f"{name}-chunks.zst"
        with ImageReader(str(image)) as reader:
            self.chunk_size = reader.header.chunk_size
        self.chunks: list[int] = []
        self.size = 0
        self.rates: list[float] = []
        self.cpu: list[float] = []
        self.zstd_rates: list[float] = []
        self.zstd_cpu: list[float] = []
        self.direct_rates: list[float] = []
        self.direct_cpu: list[float] = []
        self.touched_rates: list[float] = []
        self.touched_cpu: list[float] = []

    def round(self, mounts: Mounts) -> None:
        """dd of the file from a fresh mount, zstd -d of its chunks, fio of the file from a
        fresh mount."""
        self._read(mounts, read_sequentially, self.rates, self.cpu)
        rate, cpu = zstd_rate(self.frames, len(self.chunks) * self.chunk_size)
        self.zstd_rates.append(rate)
        self.zstd_cpu.append(cpu)
        self._read(mounts, read_direct, self.direct_rates, self.direct_cpu)
        self._read(mounts, read_after_touching, self.touched_rates, self.touched_cpu)

    def _read(self, mounts: Mounts, how, rates: list[float], cpus: list[float]) -> None:
        """One mount at a time, unmounted after its read: idle mounts cost the next one."""
        point = mounts.point()
        drop_cached(self.image)
        info = mounts.mount(self.image, point)
        path = point / self.name
        if not self.chunks:
            self.size = path.stat().st_size
            self.chunks = chunks_of(path, self.chunk_size)
            with ImageReader(str(self.image)) as reader, open(self.frames, "wb") as f:
                for index in self.chunks:
                    f.write(reader.frame(index))
            drop_cached(self.image)
        rate, cpu = how(path, info["pid"])
        rates.append(rate)
        cpus.append(cpu)
        mounts.umount(point)


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


def wakeup_round_trip(count: int = 5000) -> float:
    """Microseconds for a byte to go to another process and back through pipes: two wake-ups of
    a sleeping process, what every FUSE request costs on top of its work."""
    from_parent, to_child = os.pipe()
    from_child, to_parent = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(to_child)
            os.close(from_child)
            while os.read(from_parent, 1):
                os.write(to_parent, b"x")
        finally:
            os._exit(0)
    os.close(from_parent)
    os.close(to_parent)
    start = time.monotonic()
    for _ in range(count):
        os.write(to_child, b"x")
        os.read(from_child, 1)
    seconds = time.monotonic() - start
    os.close(to_child)
    os.close(from_child)
    os.waitpid(pid, 0)
    return seconds / count * 1e6


ONES_MIB = b"\x01" * MiB


def first_touch(size: int = 512 * MiB) -> tuple[float, float]:
    """MB/s of writing fresh memory the first time and the second time. In a VM that gives
    freed memory back to its host (free page reporting), the first write of a page the host
    took back faults in the host: every page a read puts in the page cache can cost that."""
    memory = mmap.mmap(-1, size)
    try:
        rates = []
        for _ in range(2):
            start = time.monotonic()
            for at in range(0, size, MiB):
                memory[at:at + MiB] = ONES_MIB
            rates.append(size / (time.monotonic() - start) / 1e6)
        return rates[0], rates[1]
    finally:
        memory.close()


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
    image16 = image_of(sparse_volume(), "mount-ext4-16g-sparse-tar.zst")
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
            sh(*IMAGER, "mounts", env=mounts.env)
            version.append(time.monotonic() - start)
        for key, label in (("4g", "4 GiB aged ext4"), ("16g", "16 GiB sparse ext4")):
            t = times[key]
            rows.append((f"imager mount to a listed root, {label} (s)",
                         f"{statistics.median(t):.2f}  ({min(t):.2f}-{max(t):.2f})"))
        # `imager mounts` loads the jobs as `imager mount` does, and does next to nothing else.
        rows.append(("  of which: the command's start, python -m imager.cli mounts (s)", f"{statistics.median(version):.2f}"))
        result["mount_seconds"] = times
        result["cli_start_seconds"] = version

        # Sequential: a fresh mount each round (nothing cached), the image dropped from the page
        # cache, against zstd -d of the frames of the same chunks, also from the disk; random.bin
        # (incompressible: zstd -d only copies it) and SYSTEM_TAR (ordinary data) alternating.
        cases = {"random.bin": Sequential(image4, "random.bin", mounts.base),
                 SYSTEM_TAR: Sequential(image16, SYSTEM_TAR, mounts.base)}
        for _ in range(args.rounds):
            for case in cases.values():
                case.round(mounts)
        zstd_whole = zstd_rate(image4, 4 << 30)[0]
        for name, case in cases.items():
            seq, same = case.rates, case.zstd_rates
            ratio = statistics.median(seq) / statistics.median(same)
            rows.append((f"sequential read of {name} ({case.size / MiB:.0f} MiB) from the mount, cold (MB/s)",
                         f"{statistics.median(seq):.0f}  ({min(seq):.0f}-{max(seq):.0f})"))
            rows.append((f"zstd -d -T0 of the same {len(case.chunks)} chunks to /dev/null, cold (MB/s)",
                         f"{statistics.median(same):.0f}  ({min(same):.0f}-{max(same):.0f})"))
            rows.append(("  mount / zstd (medians; per round)",
                         f"{ratio:.2f}x  ({' '.join(f'{a / b:.2f}' for a, b in zip(seq, same))})"))
            rows.append(("  CPU seconds: the mount daemon / zstd -d (medians)",
                         f"{statistics.median(case.cpu):.2f} / {statistics.median(case.zstd_cpu):.2f}"))
            direct = case.direct_rates
            direct_rows, direct_ratio = read_rows(
                direct, same, case.direct_cpu, "the same read with O_DIRECT, 8 x 1 MiB in flight (fio; MB/s)",
                "O_DIRECT mount / zstd (medians; per round)", "CPU seconds of the mount daemon, O_DIRECT (median)")
            touched = case.touched_rates
            touched_rows, touched_ratio = read_rows(
                touched, same, case.touched_cpu, "the dd read right after 1 GiB of memory was written and freed (MB/s)",
                "that read / zstd (medians; per round)", "CPU seconds of the mount daemon in that read (median)")
            rows += direct_rows + touched_rows
            result[f"sequential {name}"] = dict(file_bytes=case.size, sequential_mb_s=seq, zstd_same_chunks_mb_s=same,
                                                ratio=ratio, daemon_cpu_s=case.cpu, zstd_cpu_s=case.zstd_cpu,
                                                direct_mb_s=direct, direct_ratio=direct_ratio,
                                                direct_daemon_cpu_s=case.direct_cpu, chunks=len(case.chunks),
                                                touched_mb_s=touched, touched_ratio=touched_ratio,
                                                touched_daemon_cpu_s=case.touched_cpu)
        rows.append(("zstd -d -T0 of the whole 4 GiB image to /dev/null (MB/s of volume)", f"{zstd_whole:.0f}"))
        result.update(zstd_whole_image_mb_s=zstd_whole)
        chunks, chunk_size = cases["random.bin"].chunks, cases["random.bin"].chunk_size
        # Random 4 KiB reads with a warm cache (32 MiB, within the 64 MiB cache): the served volume
        # file, where every read reaches the daemon (FUSE direct I/O), in random.bin's chunks;
        # and random.bin through the mounted ext4 with O_DIRECT (ext4, loop device, FUSE, daemon).
        # A fresh mount each round, the daemon spinning for the next request (as shipped) and not
        # (IMAGER_FUSE_SPIN=0), alternating.
        window = 32 * MiB
        first = chunks[len(chunks) // 2] * chunk_size
        spins = {"spin": {}, "no spin": {"IMAGER_FUSE_SPIN": "0"}}
        random_rates: dict[str, dict[str, list[float]]] = {
            how: {"volume": [], "fs": [], "daemon_cpu_s_per_s": []} for how in spins}
        for _ in range(args.rounds):
            for how, env in spins.items():
                point = mounts.point()
                info = mounts.mount(image4, point, **env)
                cpu = cpu_seconds(info["pid"])
                rates = random_rates[how]
                rates["volume"].append(random_reads(Path(info["volume_file"]), first, window, args.random_seconds,
                                                    direct=False))
                rates["fs"].append(random_reads(point / "random.bin", 0, window, args.random_seconds, direct=True))
                rates["daemon_cpu_s_per_s"].append((cpu_seconds(info["pid"]) - cpu) / (2 * args.random_seconds))
                mounts.umount(point)
        for how in spins:
            rates = random_rates[how]
            for key, label in (("volume", "the served volume file"), ("fs", "O_DIRECT in the mounted ext4")):
                r = rates[key]
                rows.append((f"random 4 KiB reads, warm cache, {label}, {how} (reads/s)",
                             f"{statistics.median(r):.0f}  ({min(r):.0f}-{max(r):.0f})"))
            rows.append((f"  CPU of the daemon per second of those reads, {how} (s)",
                         f"{statistics.median(rates['daemon_cpu_s_per_s']):.2f}"))
        for key, label in (("volume", "volume file"), ("fs", "ext4, O_DIRECT")):
            per_round = [a / b for a, b in zip(random_rates["spin"][key], random_rates["no spin"][key])]
            rows.append((f"  spin / no spin, {label} (per round)", " ".join(f"{x:.2f}" for x in per_round)))
        result.update(random_reads=random_rates)

        point = mounts.point()
        info = mounts.mount(image4, point)
        rate_warm = random_reads(Path(info["volume_file"]), first, window, args.random_seconds, direct=False)
        # The same reads with the reader and every daemon thread on one core: no wake-up crosses
        # cores, so what is left is the daemon's and the kernel's own work per read.
        cores = os.sched_getaffinity(0)
        one = min(cores)
        sh("taskset", "-a", "-p", "-c", str(one), str(info["pid"]))
        os.sched_setaffinity(0, {one})
        try:
            rate_one_core = random_reads(Path(info["volume_file"]), first, window, args.random_seconds, direct=False)
        finally:
            os.sched_setaffinity(0, cores)
            sh("taskset", "-a", "-p", "-c", ",".join(map(str, sorted(cores))), str(info["pid"]))
        rows.append(("  the same on the served volume file, reader and daemon on one core (reads/s)",
                     f"{rate_one_core:.0f}  (both cores: {rate_warm:.0f})"))
        result.update(random_volume_one_core_per_s=rate_one_core)

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

    wakeup = statistics.median(wakeup_round_trip() for _ in range(5))
    rows.append(("this machine: a wake-up round trip between two processes (us, median of 5)", f"{wakeup:.0f}"))
    touches = [first_touch() for _ in range(3)]
    rows.append(("this machine: writing 512 MiB of fresh memory, first / second time (MB/s, medians)",
                 f"{statistics.median(t[0] for t in touches):.0f} / {statistics.median(t[1] for t in touches):.0f}"))
    result.update(machine_wakeup_us=wakeup, machine_first_touch=touches)
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
