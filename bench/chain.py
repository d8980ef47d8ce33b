#!/usr/bin/env python3
"""Backup chains, side by side in one run, on the aged 4 GiB ext4 volume attached as a managed
volume with its filesystem mounted on the front:

- a night's change of 1% and of 10% of the used data (random 4-64 KiB writes of random bytes
  into existing files, in place): the tracked incremental, the digest incremental of the same
  change (--compare-digests, same parent) and a full of the same state, in that order each
  round, so that all three see the same machine;
- the output of the incrementals against the bytes the night wrote (random, so incompressible)
  and against the chain's blocks it touched (16 KiB on this volume: imager.format.chain_block_size);
- restore of a chain of a full and 7 incrementals against restore of a full of the same point,
  alternating, to a sparse file;
- consolidate of that chain point (a synthetic full) in volume GB/s: its nights' scattered writes
  touched nearly every 4 MiB region, each compressed again; then consolidate of a night that
  wrote one new 64 MiB file on that synthetic full, where the untouched regions' frames are
  copied;
- tracked incrementals of 10% nights reading the snapshot directly (the device and the COW
  store's files, the default) against through the volume's daemon (IMAGER_SNAPSHOT_READS=daemon),
  alternating, a night each.

    python bench/chain.py [--size-gib 4] [--rounds 2] [--buffered-loop]

The volume's loop device reads its file with direct I/O, as a disk reads by DMA; with
--buffered-loop (the setup of runs before 2026-12-01), through the file's page cache.

Writes the table to bench/results/chain.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import volumes  # noqa: E402

from devices import loop  # noqa: E402
from imager.format import chain_block_size  # noqa: E402
from imager.snapshot import daemon  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / "work"
ROOT = Path(__file__).resolve().parent.parent
NAME = "benchchain"


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def imager(*args: str) -> tuple[float, dict]:
    """Seconds and JSON summary of one imager command (page cache dropped first)."""
    drop_caches()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "imager.cli", *args, "--json", "-q"], cwd=ROOT,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"imager {' '.join(args)}: {done.stderr.strip()}")
    summary = json.loads(done.stdout) if done.stdout.strip() else {}
    if args[0] == "backup":
        (summary,) = summary["images"]
    return seconds, summary


def night(mnt: Path, fraction: float, rng: random.Random, block_size: int) -> tuple[int, int]:
    """Random 4-64 KiB writes into existing files until `fraction` of the used bytes changed.
    Returns (bytes written, blocks of `block_size` of the files touched)."""
    files = [p for p in mnt.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_size >= 65536]
    sizes = [p.stat().st_size for p in files]
    used = int(sh("df", "--output=used", "-B1", str(mnt)).split()[1])
    goal = int(used * fraction)
    written, touched = 0, set()
    handles: dict[Path, int] = {}
    try:
        while written < goal:
            (path,) = rng.choices(files, weights=sizes)
            length = rng.randrange(4096, 65537) & ~4095 or 4096
            offset = rng.randrange(0, max(1, path.stat().st_size - length)) & ~4095
            fd = handles.get(path)
            if fd is None:
                fd = handles[path] = os.open(path, os.O_WRONLY)
            os.pwrite(fd, os.urandom(length), offset)
            written += length
            for block in range(offset // block_size, (offset + length - 1) // block_size + 1):
                touched.add((path, block))
    finally:
        for fd in handles.values():
            os.fsync(fd)
            os.close(fd)
    os.sync()
    return written, len(touched)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="rounds of each change size")
    p.add_argument("--chain", type=int, default=7, help="incrementals in the restore chain")
    p.add_argument("--buffered-loop", action="store_true",
                   help="attach the volume's loop device without direct I/O: every read then goes through a "
                        "second page cache, of the image file, and a copy out of it that a disk does not have")
    args = p.parse_args()
    image_file = volumes.build("ext4", args.size_gib << 30, aged=True)
    block_size = chain_block_size(args.size_gib << 30)
    WORK.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=WORK, prefix="chain-"))
    os.environ[daemon.RUN_DIR_ENV] = str(tmp / "run")
    os.environ[daemon.STATE_DIR_ENV] = str(tmp / "state")
    catalog = str(tmp / "catalog.sqlite")
    out = tmp / "out"
    out.mkdir()
    rng = random.Random(1)
    source = mnt = None
    attached = False
    rows: list[dict] = []
    try:
        volume_file = tmp / "volume.img"
        sh("cp", "--sparse=always", str(image_file), str(volume_file))
        source = loop.attach(str(volume_file), direct_io=not args.buffered_loop)
        front = daemon.attach(source, name=NAME).front
        attached = True
        mnt = tmp / "mnt"
        mnt.mkdir()
        sh("mount", front, str(mnt))
        cow = ("backup", "--snapshot", "cow", NAME, "--catalog", catalog)
        seconds, first = imager(*cow, "-o", str(out / "base.zst"))
        rows.append({"case": "full (first)", "seconds": seconds, "bytes": first["image_bytes"]})
        parent = str(out / "base.zst")
        step = 0
        for fraction in (0.01, 0.10):
            for _ in range(args.rounds):
                step += 1
                written, blocks = night(mnt, fraction, rng, block_size)
                t_tr, tracked = imager(*cow, "-o", str(out / f"t{step}.zst"), "-i", "--parent", parent)
                t_dg, digest = imager(*cow, "-o", str(out / f"d{step}.zst"), "-i", "--parent", parent,
                                      "--compare-digests")
                t_full, full = imager(*cow, "-o", str(out / f"f{step}.zst"))
                parent = str(out / f"f{step}.zst")
                assert tracked["method"] == "tracker" and digest["method"] == "digest", (tracked, digest)
                rows.append({"case": f"{fraction:.0%} changed", "written": written, "blocks_touched": blocks,
                             "block_size": block_size,
                             "tracked_s": t_tr, "digest_s": t_dg, "full_s": t_full,
                             "tracked_bytes": tracked["image_bytes"], "digest_bytes": digest["image_bytes"],
                             "full_bytes": full["image_bytes"], "changed_blocks": tracked["changed_blocks"]})
                for f in ("t", "d"):
                    os.unlink(out / f"{f}{step}.zst")
        # A chain of a full and N incrementals of 1% nights; a full of the same last point.
        chain_parent = parent
        for i in range(args.chain):
            night(mnt, 0.01, rng, block_size)
            imager(*cow, "-o", str(out / f"c{i}.zst"), "-i", "--parent", chain_parent)
            chain_parent = str(out / f"c{i}.zst")
        last = chain_parent
        t_cons, consolidated = imager("consolidate", last, "-o", str(out / "synthetic.zst"), "--catalog", catalog)
        volume_size = args.size_gib << 30
        restores: dict[str, list[float]] = {"full": [], "chain": []}
        for _ in range(args.rounds):
            for kind, image in (("full", out / "synthetic.zst"), ("chain", Path(last))):
                target = tmp / "restored.raw"
                if target.exists():
                    target.unlink()
                seconds, _ = imager("restore", str(image), str(target), "--catalog", catalog)
                restores[kind].append(seconds)
        rows.append({"case": "restore", "full_s": restores["full"], "chain_s": restores["chain"],
                     "chain_length": args.chain + 1})
        rows.append({"case": "consolidate", "seconds": t_cons, "volume_gb_per_s": volume_size / t_cons / 1e9,
                     **copied_and_compressed(consolidated)})
        # A night whose writes stay together (one new 64 MiB file), on the synthetic full: the
        # regions it did not touch are frames copied as they are.
        with open(mnt / "bench-one-file.bin", "wb") as f:
            f.write(os.urandom(64 << 20))
            os.fsync(f.fileno())
        imager(*cow, "-o", str(out / "one-file.zst"), "-i", "--parent", str(out / "synthetic.zst"))
        chain_parent = str(out / "one-file.zst")
        t_copy, copied = imager("consolidate", str(out / "one-file.zst"), "-o", str(out / "synthetic2.zst"),
                                "--catalog", catalog)
        rows.append({"case": "consolidate, one file written", "seconds": t_copy,
                     "volume_gb_per_s": volume_size / t_copy / 1e9, **copied_and_compressed(copied)})
        reads: dict[str, list[float]] = {"direct": [], "daemon": []}
        for r in range(args.rounds):
            for how in ("direct", "daemon") if r % 2 == 0 else ("daemon", "direct"):
                night(mnt, 0.10, rng, block_size)
                os.environ["IMAGER_SNAPSHOT_READS"] = how
                try:
                    seconds, tracked = imager(*cow, "-o", str(out / f"r{r}{how}.zst"), "-i", "--parent", chain_parent)
                finally:
                    del os.environ["IMAGER_SNAPSHOT_READS"]
                assert tracked["method"] == "tracker", tracked
                chain_parent = str(out / f"r{r}{how}.zst")
                reads[how].append(seconds)
        rows.append({"case": "snapshot reads", "direct_s": reads["direct"], "daemon_s": reads["daemon"]})
    finally:
        if mnt is not None:
            subprocess.run(["umount", str(mnt)], capture_output=True)
        if attached:
            daemon.detach(NAME)
        if source is not None:
            loop.detach(source)
        shutil.rmtree(tmp, ignore_errors=True)
    rows.insert(0, {"case": "setup", "loop": "buffered" if args.buffered_loop else "direct I/O"})
    table = render(rows)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "chain.json").write_text(json.dumps({"rows": rows, "table": table}, indent=2))
    return 0


def copied_and_compressed(summary: dict) -> dict:
    """How many of a synthetic full's regions were frames copied and how many compressed again."""
    match = re.fullmatch(r"(\d+) chunks copied, (\d+) compressed again", summary["reason"])
    assert match, summary["reason"]
    return {"copied": int(match[1]), "compressed": int(match[2])}


def render(rows: list[dict]) -> str:
    lines = ["| case | tracked incremental | digest incremental | full | tracked vs full | digest vs full |"
             " output / bytes written | output / blocks touched |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["case"].endswith("changed"):
            lines.append(
                f"| {r['case']} ({r['written'] / 1e6:.0f} MB written) | {r['tracked_s']:.1f} s, "
                f"{r['tracked_bytes'] / 1e6:.0f} MB | {r['digest_s']:.1f} s, {r['digest_bytes'] / 1e6:.0f} MB | "
                f"{r['full_s']:.1f} s, {r['full_bytes'] / 1e6:.0f} MB | {r['full_s'] / r['tracked_s']:.1f}x faster | "
                f"{r['full_s'] / r['digest_s']:.1f}x faster | {r['tracked_bytes'] / r['written']:.2f} | "
                f"{r['tracked_bytes'] / (r['blocks_touched'] * r.get('block_size', 65536)):.2f} |")
    for r in rows:
        if r["case"] == "setup":
            lines.append(f"\nthe volume's loop device: {r['loop']}")
        if r["case"] == "restore":
            full, chain = min(r["full_s"]), min(r["chain_s"])
            lines.append(f"\nrestore of a chain of {r['chain_length']} images: {chain:.1f} s, of a full of the same "
                         f"point: {full:.1f} s (chain at {full / chain:.2f}x the full's speed; best of each)")
        if r["case"] == "consolidate":
            lines.append(f"consolidate of that point: {r['seconds']:.1f} s, {r['volume_gb_per_s']:.2f} GB/s of volume "
                         f"({r['copied']} regions' frames copied, {r['compressed']} compressed again)")
        if r["case"] == "consolidate, one file written":
            lines.append(f"consolidate of a night that wrote one 64 MiB file, on that synthetic full: "
                         f"{r['seconds']:.1f} s, {r['volume_gb_per_s']:.2f} GB/s of volume ({r['copied']} regions' "
                         f"frames copied, {r['compressed']} compressed again)")
        if r["case"] == "snapshot reads":
            pairs = ", ".join(f"{d:.1f}/{m:.1f}" for d, m in zip(r["direct_s"], r["daemon_s"]))
            lines.append(f"tracked incrementals of 10% nights, the snapshot read directly / through its daemon: "
                         f"{pairs} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
