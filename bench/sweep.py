#!/usr/bin/env python3
"""The measurements behind imager's defaults: backup speed and image size of the benchmark
volume for each compression level and chunk size. Writes bench/results/sweep.json.

    python bench/sweep.py [--levels 1,3,5] [--chunks 1,2,4,8,16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import volumes  # noqa: E402
from compare import RESULTS, drop_caches  # noqa: E402
from devices import loop  # noqa: E402
from imager import jobs  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--fs", default="ext4")
    p.add_argument("--levels", default="1,3,5")
    p.add_argument("--chunks", default="1,2,4,8,16", help="chunk sizes in MiB")
    p.add_argument("--rounds", type=int, default=3, help="runs of each setting; the median is kept")
    args = p.parse_args()
    source = loop.attach(str(volumes.build(args.fs)), read_only=True)
    out = volumes.WORK / "out" / "sweep.zst"
    out.parent.mkdir(exist_ok=True)
    rows = []
    try:
        for level in map(int, args.levels.split(",")):
            for mib in map(int, args.chunks.split(",")):
                runs = []
                for _ in range(args.rounds):
                    drop_caches()
                    runs.append(jobs.backup(source, str(out), force=True, options=jobs.ImagingOptions(
                        level=level, chunk_size=mib << 20, all_blocks=True)))
                r = sorted(runs, key=lambda x: x.seconds)[len(runs) // 2]
                rows.append({"level": level, "chunk_mib": mib, "seconds": round(r.seconds, 2),
                             "mb_per_second": round(r.mb_per_second), "output_mib": round(r.bytes_written / 2**20, 1)})
                print(f"level {level:2} chunk {mib:3} MiB: {r.seconds:6.2f} s {r.mb_per_second:6.0f} MB/s "
                      f"{r.bytes_written / 2**20:8.1f} MiB (median of {len(runs)})", flush=True)
    finally:
        loop.detach(source)
        out.unlink(missing_ok=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"sweep-{args.fs}.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
