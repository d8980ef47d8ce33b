"""Benchmark volumes: real files on a real filesystem, optionally aged as a used disk is.

Built once into bench/work/ and reused; `--rebuild` builds again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

WORK = Path(__file__).resolve().parent / "work"
# System libraries and documentation: the mix a root or application volume holds.
CONTENT = ["/usr/lib/x86_64-linux-gnu", "/usr/lib/gcc", "/usr/lib/python3.11", "/usr/lib/python3",
           "/usr/lib/llvm-14", "/usr/lib/jvm", "/usr/share/doc", "/usr/share/man", "/usr/include"]
RANDOM_MIB = 300


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def _copy_content(root: Path, budget: int) -> None:
    used = 0
    for src in CONTENT:
        if not os.path.isdir(src):
            continue
        size = int(sh("du", "-sb", src).stdout.split()[0])
        if used + size > budget:
            continue
        sh("cp", "-a", src, str(root / src.strip("/").replace("/", "_")))
        used += size
    with open(root / "random.bin", "wb") as f:
        for _ in range(RANDOM_MIB):
            f.write(os.urandom(1 << 20))


def _age(root: Path) -> None:
    """Fill the free space with random data and free it again: deleted files leave their
    old contents in free blocks, as on a disk that has been in use."""
    chunk = os.urandom(16 << 20)
    with open(root / "aging.fill", "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    os.unlink(root / "aging.fill")
    os.sync()


def build(fs: str = "ext4", size: int = 4 << 30, aged: bool = False, rebuild: bool = False) -> Path:
    """The benchmark volume image file for these parameters (built when missing)."""
    from devices import loop

    WORK.mkdir(exist_ok=True)
    name = f"{fs}-{size >> 30}g{'-aged' if aged else ''}.img"
    path = WORK / name
    if path.exists() and not rebuild:
        return path
    tmp = path.with_suffix(".building")
    with open(tmp, "wb") as f:
        f.truncate(size)
    dev = loop.attach(str(tmp))
    mnt = WORK / "mnt"
    mnt.mkdir(exist_ok=True)
    try:
        if fs == "ext4":
            sh("mkfs.ext4", "-q", "-F", "-L", "bench", dev)
        elif fs == "xfs":
            sh("mkfs.xfs", "-q", "-f", "-L", "bench", dev)
        else:
            raise SystemExit(f"unknown filesystem {fs}")
        sh("mount", dev, str(mnt))
        try:
            _copy_content(mnt, budget=int(size * 0.45) - (RANDOM_MIB << 20))
            if aged:
                _age(mnt)
        finally:
            sh("umount", str(mnt))
    finally:
        loop.detach(dev)
        shutil.rmtree(mnt, ignore_errors=True)
    os.rename(tmp, path)
    return path
