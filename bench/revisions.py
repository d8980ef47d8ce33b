#!/usr/bin/env python3
"""Two revisions of imager side by side in one run: backup and restore of the same volume,
alternating the revisions each round, so that a change meant to keep behaviour (a restructure)
is shown not to cost speed, and a change meant to add something shows what it costs.

    python bench/revisions.py REV_A REV_B [--rounds 3] [--aged] [--level 3]

Each revision is checked out into bench/work/rev-<sha> (a git worktree) and run from there with
this checkout's Python environment. Writes bench/results/revisions-<a>-<b>.json.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import volumes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(__file__).resolve().parent / "work"
RESULTS = Path(__file__).resolve().parent / "results"


def sh(*cmd: str, **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def checkout(rev: str) -> tuple[str, Path]:
    sha = sh("git", "-C", str(ROOT), "rev-parse", "--short=8", rev).strip()
    tree = WORK / f"rev-{sha}"
    if not tree.exists():
        sh("git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), sha)
    return sha, tree


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run_imager(tree: Path, *args: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree))
    drop_caches()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "imager.cli", *args], cwd=tree, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{tree.name}: imager {' '.join(args)}: {done.stderr.strip()}")
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("revs", nargs=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--aged", action="store_true")
    p.add_argument("--level", type=int, default=3)
    p.add_argument("--size-gib", type=int, default=4)
    args = p.parse_args()
    WORK.mkdir(exist_ok=True)
    volume = volumes.build("ext4", args.size_gib << 30, args.aged)
    trees = [checkout(rev) for rev in args.revs]
    times: dict[str, dict[str, list[float]]] = {sha: {"backup": [], "restore": []} for sha, _ in trees}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(dir=WORK, prefix="revs-") as tmp:
        for round_ in range(args.rounds):
            order = trees if round_ % 2 == 0 else trees[::-1]
            for sha, tree in order:
                image = Path(tmp) / f"{sha}.zst"
                target = Path(tmp) / f"{sha}.raw"
                for leftover in (image, target):
                    if leftover.exists():
                        leftover.unlink()
                times[sha]["backup"].append(run_imager(tree, "backup", str(volume), "-o", str(image), "-q",
                                                       "--level", str(args.level), "--catalog",
                                                       str(Path(tmp) / f"{sha}.sqlite")))
                sizes[sha] = image.stat().st_size
                times[sha]["restore"].append(run_imager(tree, "restore", str(image), str(target), "-q"))
                target.unlink()
    (a, _), (b, _) = trees
    lines = [f"{args.size_gib} GiB ext4{' (aged)' if args.aged else ''}, level {args.level}, "
             f"{args.rounds} rounds alternating, median seconds",
             f"| | {a} | {b} | {b} / {a} |", "|---|---|---|---|"]
    for what in ("backup", "restore"):
        ta, tb = statistics.median(times[a][what]), statistics.median(times[b][what])
        lines.append(f"| {what} | {ta:.2f} s | {tb:.2f} s | {tb / ta:.2f} |")
    lines.append(f"| image size | {sizes[a] / 1e6:.0f} MB | {sizes[b] / 1e6:.0f} MB | {sizes[b] / sizes[a]:.3f} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"revisions-{a}-{b}.json").write_text(json.dumps({"times": times, "sizes": sizes, "table": table},
                                                                 indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
