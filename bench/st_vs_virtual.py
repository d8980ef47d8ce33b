#!/usr/bin/env python3
"""Backup to the real st driver against backup to a virtual tape, in the same VM of the vm-tape
rig (the emulated drive is slow under TCG: the ratio is what counts). Run through the rig:

    ../shared/vm-tape/run-in-vm.sh -C . --tape-mb 64 -- .venv/bin/python bench/st_vs_virtual.py

Inside, TAPE is the st drive. A file volume (half random, half zeros) is imaged with the CLI's
main() in this process to /dev/nst0 and to a .tap in the guest's tmpfs, alternating, each
round on a freshly labelled tape. Writes bench/results/st_vs_virtual.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imager.cli import main as imager  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def timed(*argv: str) -> float:
    started = time.perf_counter()
    code = imager([*argv, "-q"])
    if code:
        raise SystemExit(f"imager {' '.join(argv)} exited {code}")
    return time.perf_counter() - started


def main() -> int:
    tape = os.environ.get("TAPE")
    if not tape:
        raise SystemExit("run inside the vm-tape rig (TAPE=/dev/nst0): see the docstring")
    rounds = int(os.environ.get("ROUNDS", "3"))
    with tempfile.TemporaryDirectory() as work:
        os.environ["XDG_DATA_HOME"] = work           # a throw-away catalog
        volume = Path(work) / "vol.img"
        with open(volume, "wb") as f:
            for _ in range(8):
                f.write(os.urandom(1 << 20) + bytes(1 << 20))
        virtual = str(Path(work) / "v.tap")
        times: dict[str, list[float]] = {"st": [], "virtual": []}
        for _ in range(rounds):
            for name, where in (("st", tape), ("virtual", virtual)):
                timed("tape", "label", "BENCH", "--force", "--tape", where)
                times[name].append(timed("backup", str(volume), "--tape", where))
    st, virtual_s = statistics.median(times["st"]), statistics.median(times["virtual"])
    report = {"volume_mib": 16, "rounds": rounds, "seconds": times, "st_median": st, "virtual_median": virtual_s,
              "st_speed_vs_virtual": round(virtual_s / st, 2)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "st_vs_virtual.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"backup of a 16 MiB volume, median of {rounds}: st {st:.2f} s, virtual tape {virtual_s:.2f} s; "
          f"st runs at {virtual_s / st:.2f}x the speed of the virtual tape")
    return 0


if __name__ == "__main__":
    sys.exit(main())
