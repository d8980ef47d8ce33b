#!/usr/bin/env python3
"""imager side by side with its peers on the same volume, in the same run, alternating.

    python bench/compare.py                       # 4 GiB ext4 of real files, level 3
    python bench/compare.py --fs xfs --aged --level 1 --rounds 3

Prints a table (seconds, MB/s of volume, output size, peak memory) and imager's ratio to each
peer, and writes it as JSON to bench/results/. The page cache is dropped before every run so
no tool reads what another one left in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import volumes  # noqa: E402
from devices import loop  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
IMAGER = [sys.executable, "-m", "imager.cli"]


@dataclass
class Run:
    name: str
    kind: str  # backup or restore
    command: str
    output: Path | None
    prepare: str | None = None  # run before the timed command, untimed
    seconds: list[float] = field(default_factory=list)
    peak_kib: list[int] = field(default_factory=list)
    size: int = 0


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed(command: str) -> tuple[float, int]:
    """Run a shell pipeline; its wall time and the largest peak RSS of any process in it."""
    stats = Path("/tmp/imager-bench-rss")
    stats.unlink(missing_ok=True)
    wrapped = " | ".join(f"/usr/bin/time -a -o {stats} -f %M {part.strip()}"
                         for part in _split_pipeline(command))
    drop_caches()
    start = time.monotonic()
    r = subprocess.run(["bash", "-o", "pipefail", "-c", wrapped], capture_output=True, text=True)
    seconds = time.monotonic() - start
    if r.returncode:
        raise SystemExit(f"benchmark command failed: {command}\n{r.stderr}")
    peaks = [int(x) for x in stats.read_text().split() if x.isdigit()]
    return seconds, max(peaks or [0])


def _split_pipeline(command: str) -> list[str]:
    return command.split(" | ")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fs", default="ext4", choices=["ext4", "xfs"])
    p.add_argument("--size-gib", type=int, default=4)
    p.add_argument("--aged", action="store_true", help="free space holds old random data")
    p.add_argument("--level", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--peers", default="dd", help="comma list of: dd, partclone, qemu, tape")
    p.add_argument("--imager-args", default="", help="extra arguments for imager backup")
    p.add_argument("--no-restore", action="store_true")
    p.add_argument("--rebuild", action="store_true", help="build the volume again")
    args = p.parse_args()

    image_file = volumes.build(args.fs, args.size_gib << 30, args.aged, args.rebuild)
    out = volumes.WORK / "out"
    out.mkdir(exist_ok=True)
    source = loop.attach(str(image_file), read_only=True)
    scratch_file = volumes.WORK / "restore-target.img"
    with open(scratch_file, "wb") as f:
        f.truncate(args.size_gib << 30)
    target = loop.attach(str(scratch_file))
    try:
        volume_size = args.size_gib << 30
        lvl = args.level
        imager_img = out / "imager.zst"
        dd_img = out / "dd.zst"
        backups = [Run("imager", "backup",
                       f"{shlex.join(IMAGER)} backup {source} -o {imager_img} --level {lvl} -f -q {args.imager_args}",
                       imager_img)]
        peers = args.peers.split(",")
        if "dd" in peers:
            backups.append(Run(f"dd | zstd -T0 -{lvl}", "backup",
                               f"dd if={source} bs=4M iflag=direct status=none | zstd -T0 -{lvl} -q -f -o {dd_img}",
                               dd_img))
        if "partclone" in peers:
            pc_img = out / "partclone.zst"
            backups.append(Run(f"partclone.{args.fs} -c | zstd -T0 -{lvl}", "backup",
                               f"partclone.{args.fs} -c -q -s {source} -o - | zstd -T0 -{lvl} -q -f -o {pc_img}",
                               pc_img))
        if "tape" in peers:
            tape_pattern = out / "tape-{n}.tap"
            backups.append(Run("imager -> virtual tape", "backup",
                               f"{shlex.join(IMAGER)} backup {source} --tape {shlex.quote(str(tape_pattern))} "
                               f"--level {lvl} -q {args.imager_args}", out / "tape-1.tap",
                               prepare=f"rm -f {out}/tape-*.tap"))
        if "qemu" in peers:
            q_img = out / "qemu.qcow2"
            backups.append(Run("qemu-img convert -c (zstd)", "backup",
                               f"qemu-img convert -c -O qcow2 -o compression_type=zstd {source} {q_img}", q_img))
        restores = [] if args.no_restore else [
            Run("imager restore", "restore", f"{shlex.join(IMAGER)} restore {imager_img} {target} --force -q", None),
            Run("zstd -d -T0 | dd", "restore",
                f"zstd -d -T0 -q -c {dd_img} | dd of={target} bs=4M conv=fsync status=none", None),
        ]
        for _ in range(args.rounds):
            for run in backups:
                if run.prepare:
                    subprocess.run(["bash", "-c", run.prepare], check=True)
                s, peak = timed(run.command)
                run.seconds.append(s)
                run.peak_kib.append(peak)
                run.size = run.output.stat().st_size
            for run in restores:
                s, peak = timed(run.command)
                run.seconds.append(s)
                run.peak_kib.append(peak)
        report = render(args, volume_size, backups, restores)
        print(report["table"])
        RESULTS.mkdir(exist_ok=True)
        name = f"compare-{args.fs}{'-aged' if args.aged else ''}-l{lvl}.json"
        (RESULTS / name).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        loop.detach(target)
        loop.detach(source)
        scratch_file.unlink(missing_ok=True)
    return 0


def render(args, volume_size: int, backups: list[Run], restores: list[Run]) -> dict:
    rows = []
    lines = [f"{args.size_gib} GiB {args.fs}{' (aged)' if args.aged else ''}, level {args.level}, "
             f"{args.rounds} round(s), median seconds; {os.cpu_count()} cores",
             f"{'tool':34} {'seconds':>8} {'MB/s':>8} {'output MiB':>11} {'peak MiB':>9} {'imager speedup':>15} {'size vs imager':>15}"]
    for group in (backups, restores):
        if not group:
            continue
        ref = group[0]
        ref_s = statistics.median(ref.seconds)
        for run in group:
            s = statistics.median(run.seconds)
            row = {"tool": run.name, "kind": run.kind, "seconds": round(s, 3),
                   "all_seconds": [round(x, 3) for x in run.seconds],
                   "mb_per_second": round(volume_size / s / 1e6, 1),
                   "output_bytes": run.size or None, "peak_rss_mib": round(max(run.peak_kib) / 1024, 1),
                   "imager_speedup": round(s / ref_s, 2),
                   "size_ratio_to_imager": round(run.size / ref.size, 3) if run.size and ref.size else None,
                   "command": run.command}
            rows.append(row)
            size = f"{run.size / 2**20:.1f}" if run.size else "-"
            ratio = f"{row['size_ratio_to_imager']:.3f}" if row["size_ratio_to_imager"] else "-"
            speed = "-" if run is ref else f"{row['imager_speedup']:.2f}x"
            lines.append(f"{run.name:34} {s:8.2f} {row['mb_per_second']:8.0f} {size:>11} "
                         f"{row['peak_rss_mib']:9.1f} {speed:>15} {ratio:>15}")
    tape = next((r for r in rows if r["tool"] == "imager -> virtual tape"), None)
    if tape:
        stream = tape["output_bytes"] / tape["seconds"] / 1e6
        lines.append(f"stream reaching the (virtual) drive: {stream:.0f} MB/s compressed; LTO-9 needs at least "
                     f"177 MB/s to avoid shoe-shining, 400 MB/s native")
        tape["stream_mb_per_second"] = round(stream, 1)
    return {"fs": args.fs, "aged": args.aged, "level": args.level, "size_gib": args.size_gib,
            "rounds": args.rounds, "rows": rows, "table": "\n".join(lines)}


if __name__ == "__main__":
    sys.exit(main())
