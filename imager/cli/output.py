"""Where a command's progress, notices, details and results go, by --json, --quiet, -v and
whether there is a terminal."""

from __future__ import annotations

import argparse
import json
import re
import sys
from contextlib import contextmanager
from typing import Iterator

from . import logs
from .progress import Display, display_for


class Output:
    def __init__(self, args: argparse.Namespace):
        self.json = getattr(args, "json", False)
        self.quiet = getattr(args, "quiet", False)
        self.verbose = getattr(args, "verbose", False)
        self.progress_mode = getattr(args, "progress", None) or "auto"
        # With `-o -` standard output carries the image: the summary goes to stderr.
        self.summary_stream = sys.stderr if getattr(args, "output", None) == "-" else sys.stdout
        # -v: the engine's details (phases, plans, I/O fallbacks) on stderr; always in the logs.
        self.log = logs.configure(self.verbose, self.quiet, getattr(args, "log_file", None))

    def notice(self, message: str) -> None:
        if not self.quiet:
            print(f"imager: {message}", file=sys.stderr)

    @contextmanager
    def progress(self, total: int, label: str) -> Iterator[Display | None]:
        """A display on stderr as --progress says (none with --quiet)."""
        display = None if self.quiet else display_for(self.progress_mode, label, total)
        try:
            yield display
        finally:
            if display is not None:
                display.close()

    def result(self, data: dict, lines: list[str]) -> None:
        for line in lines:
            self.log.info("%s", line.strip(), extra=logs.AUDIT)
        if self.json:
            print(json.dumps(data, indent=2, sort_keys=True), file=self.summary_stream)
        elif not self.quiet and lines:
            print("\n".join(lines), file=self.summary_stream)


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Aligned columns under a header row, as lsblk and losetup -l print them; the last column
    is not padded (it may be long)."""
    if not rows:
        return []
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers) - 1)]
    return ["  ".join([c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]).rstrip() for row in cells]


def natural_key(text: str) -> list:
    """loop2 before loop10: runs of digits compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]
