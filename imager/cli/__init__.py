"""`imager ...`: a thin command-line layer over the public API (imager.jobs). Errors are one
line on stderr and an exit code: 2 for a wrong command line or a refused request, 1 for a job
that failed, 130 after Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import signal
import sys

from devices.errors import DeviceError

from ..errors import ImagerError
from .logs import AUDIT
from .output import Output
from .parser import build_parser


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser(argv).parse_args(argv)
    try:
        out = Output(args)
    except ImagerError as e:
        print(f"imager: error: {e}", file=sys.stderr)
        return e.exit_code
    command = " ".join(argv)
    out.log.info("started: imager %s", command, extra=AUDIT)
    # SIGTERM unwinds like Ctrl-C, so every job's cleanup (temporary files, snapshots) runs.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        code = args.func(args, out)
        sys.stdout.flush()
        return code
    except (ImagerError, DeviceError) as e:
        print(f"imager: error: {e}", file=sys.stderr)
        out.log.error("failed: imager %s: %s", command, e, extra=AUDIT)
        return getattr(e, "exit_code", 1)
    except KeyboardInterrupt as e:
        out.log.warning("interrupted: imager %s", command, extra=AUDIT)
        note = getattr(e, "note", None)
        if note:
            print(f"imager: interrupted; {note}", file=sys.stderr)
        elif args.command in ("backup", "consolidate", "tape"):
            print("imager: interrupted; image files are only ever renamed into place when complete, but a "
                  "tape file being written is left partial (marked so)", file=sys.stderr)
        else:
            print("imager: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    except OSError as e:
        # Writing a summary to a full or closed stdout (> /dev/full): say so in one line.
        _quiet_stdout()
        print(f"imager: error: {e.strerror or e}", file=sys.stderr)
        return 1


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's flush at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
