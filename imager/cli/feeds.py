"""Opening the image a command reads: a file, standard input (-), or an image on tape."""

from __future__ import annotations

import sys

from ..ends.feeds import StreamFeed
from ..errors import UsageError


def stdin_feed() -> StreamFeed:
    if sys.stdin.isatty():
        raise UsageError("refusing to read an image from a terminal: pipe one in "
                         "(ssh host cat vol.zst | imager restore - TARGET)")
    return StreamFeed(sys.stdin.buffer, "standard input")
