#!/usr/bin/env python3
"""Does a backup keep an LTO drive streaming? The 4 GiB ext4 volume (of the whole-device table;
--aged: the aged one, mostly incompressible) imaged, every block, to a virtual tape
whose drive is modelled (devices/tape/streaming.py: LTO-9's slowest speed-matching rate, 177
MB/s, and a 1 GiB buffer), straight and with --spool, at zstd levels 1 and 3, alternating in one
run. Counts the back-hitches the drive would make and the rate reaching it.

    python bench/tape_streaming.py [--aged] [--rounds 1] [--levels 1,3] [--min-rate 177] [--buffer-mib 1024]
                                   [--tape-dir DIR]

A real drive's 1 GiB buffer hides a slow stream for seconds; an image of a few GiB is over
before it shows. --buffer-mib 64 scales the buffer down to what the buffer is to a long stream.

The spool is in /var/tmp. The virtual tape's file is in /var/tmp too unless --tape-dir: on the
same disk, its writes stall now and then in the page cache's writeback, which a real drive's
writes do not (in tmpfs they never do).

Writes bench/results/tape_streaming.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import volumes  # noqa: E402

from devices.tape.streaming import StreamingModel  # noqa: E402
from devices.tape.virtual import VirtualTape  # noqa: E402
from imager.ends.sources import open_source  # noqa: E402
from imager.jobs.backup import ImagingOptions, write_image  # noqa: E402
from imager.tape import TapeSink, TapeSpec, write_label  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class ModelledDrive(TapeSpec):
    """A virtual tape whose drive counts back-hitches."""

    model: StreamingModel

    def open(self, sequence: int = 1, *, create: bool = True) -> VirtualTape:
        return VirtualTape(self.path_for(sequence), create=create, streaming=self.model)


def one(volume: Path, level: int, spool: bool, min_rate: float, buffer: int, work: Path, tape_dir: Path) -> dict:
    tape = tape_dir / "imager-bench-t.tap"
    tape.unlink(missing_ok=True)
    with VirtualTape(tape) as drive:
        write_label(drive, "BENCH")
    spec = ModelledDrive(str(tape))
    spec.model = StreamingModel(min_rate, buffer)
    started = time.perf_counter()
    sink = TapeSink(spec, image_id="e" * 32, min_rate=min_rate, spool_dir=str(work) if spool else None)
    with open_source(str(volume)) as source:
        result = write_image(source, sink, options=ImagingOptions(level=level), image_id="e" * 32)
    sink.commit({"id": "e" * 32})
    seconds = time.perf_counter() - started
    tape.unlink()
    return {"level": level, "spool": spool, "seconds": round(seconds, 2), "image_bytes": result.bytes_written,
            "to_drive_mb_s": round(sink.rate.average() / 1e6, 1), "back_hitches": spec.model.back_hitches}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--levels", default="1,3")
    ap.add_argument("--min-rate", type=float, default=177.0, help="MB/s (LTO-9: 177)")
    ap.add_argument("--tape-dir", help="where the virtual tape's file goes (default: beside the spool)")
    ap.add_argument("--aged", action="store_true", help="the aged volume (free space full of old data)")
    ap.add_argument("--buffer-mib", type=int, default=1024, help="the modelled drive's buffer (LTO-9: 1 GiB)")
    args = ap.parse_args()
    volume = volumes.build("ext4", 4 << 30, aged=args.aged)
    rows = []
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="imager-bench-") as work:
        for _ in range(args.rounds):
            for level in (int(x) for x in args.levels.split(",")):
                for spool in (False, True):
                    row = one(volume, level, spool, args.min_rate * 1e6, args.buffer_mib << 20, Path(work),
                              Path(args.tape_dir or work))
                    print(row, flush=True)
                    rows.append(row)
    table = ["| level | how | seconds | MB/s reaching the drive | back-hitches |", "|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['level']} | {'--spool' if r['spool'] else 'straight'} | {r['seconds']} | "
                     f"{r['to_drive_mb_s']} | {r['back_hitches']} |")
    RESULTS.mkdir(exist_ok=True)
    name = f"tape_streaming{'-aged' if args.aged else ''}.json"
    (RESULTS / name).write_text(json.dumps({"min_rate_mb_s": args.min_rate, "rows": rows, "aged": args.aged, "buffer_mib": args.buffer_mib,
                                            "tape_dir": args.tape_dir}, indent=2) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
