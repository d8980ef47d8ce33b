"""The command line: one small function per verb registers its parser (in the verb's module)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .. import __version__
from ..tape import DEFAULT_BLOCK_SIZE
from ..units import positive_size


@dataclass
class Parents:
    """Option groups verbs share."""

    common: argparse.ArgumentParser      # --json, --quiet, --verbose
    catalog: argparse.ArgumentParser     # --catalog
    tape: argparse.ArgumentParser        # --tape and its companions


def _parents() -> Parents:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    common.add_argument("-v", "--verbose", action="store_true",
                        help="say more: phases, the used-block plan, I/O fallbacks")
    catalog = argparse.ArgumentParser(add_help=False)
    catalog.add_argument("--catalog", metavar="PATH", help="catalog database (default: the user's data directory)")
    tape = argparse.ArgumentParser(add_help=False)
    tape.add_argument("--tape", metavar="T", help="/dev/nstN, a virtual tape file.tap, or a set of virtual "
                      "cartridges as a pattern like 'vault/tape-{n:03}.tap'")
    tape.add_argument("--tape-capacity", type=positive_size, metavar="SIZE",
                      help="capacity of a virtual cartridge (default: unlimited)")
    tape.add_argument("--block-size", type=positive_size, metavar="SIZE",
                      help=f"tape block size (default {DEFAULT_BLOCK_SIZE >> 10}K to write; to read, the size "
                           f"the image was written with)")
    tape.add_argument("--changer", metavar="CMD", help="command that loads the next cartridge ($IMAGER_CARTRIDGE "
                      "is its number); without it the operator is asked")
    return Parents(common, catalog, tape)


def build_parser() -> argparse.ArgumentParser:
    from . import backup, catalog, consolidate, demo, devices, info, loop, mount, restore, tape, verify, volumes

    p = argparse.ArgumentParser(prog="imager", description="Point-in-time images of block devices in use.")
    p.add_argument("--version", action="version", version=f"imager {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = _parents()
    for verb in (backup, restore, verify, info, consolidate, mount, loop, catalog, tape, volumes, devices, demo):
        verb.register(sub, parents)
    return p
