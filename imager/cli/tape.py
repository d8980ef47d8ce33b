"""imager tape ...: drives and virtual tapes, in the spirit of mt, and what is on them."""

from __future__ import annotations

import importlib
import os

from ..units import count
from .output import Output

_MOVES = {"rewind": "rewind the tape", "eom": "go to the end of recorded data", "eod": "the same as eom",
          "unload": "rewind and eject", "offline": "the same as unload"}
_SPACES = {"fsf": "forward space N files", "bsf": "backward space N files", "fsr": "forward space N records",
           "bsr": "backward space N records", "seek": "go to block N (as tell reports it)"}


def register(sub, parents) -> None:
    tp = sub.add_parser("tape", help="tape drives and virtual tapes, in the spirit of mt")
    tsub = tp.add_subparsers(dest="tape_command", required=True, metavar="ACTION")

    def verb(name: str, help_text: str, func: str, *uses: str):
        """A tape verb with --tape and, of the other tape options, only those it `uses`."""
        groups = [parents.common, parents.tape_device]
        groups += [parents.tape_options[o] for o in uses if o in parents.tape_options]
        if "--catalog" in uses:
            groups.append(parents.catalog)
        c = tsub.add_parser(name, parents=groups, help=help_text,
                            description=f"{help_text[0].upper()}{help_text[1:]}. Without --tape, $TAPE is used "
                                        f"(as mt does).")
        c.set_defaults(func=_tape_from_environment(func))
        return c

    verb("status", "drive status (MTIOCGET), without moving the tape", "status").add_argument(
        "--label", action="store_true", help="also read the tape label (rewinds the tape)")
    for name, text in _MOVES.items():
        verb(name, text, "move")
    for name, text in _SPACES.items():
        verb(name, text, "move").add_argument("count", type=count, metavar="N",
                                            help="how many" if name != "seek" else "the block position")
    tl = verb("label", "write a volume label at the start of the tape", "label", "--block-size", "--catalog")
    tl.add_argument("name", help="the label, e.g. WEEKLY1 (a cartridge's barcode is a good choice)")
    tl.add_argument("-f", "--force", action="store_true", help="overwrite a labelled or used tape")
    verb("list", "the tape files and what each holds", "listing", "--changer")
    rd = verb("read", "write the bytes of tape file N to stdout (or -o FILE); a file that holds only a part of "
                      "an image (one that spans cartridges) is written too, and the command exits 1 saying so",
              "read", "--block-size", "--changer")
    rd.add_argument("--file", type=count, required=True, metavar="N",
                    help="the tape file to read (as tape list numbers them)")
    rd.add_argument("--image-only", action="store_true",
                    help="only the image: without the tape's segment header and end block, continued on the next "
                         "cartridges, so that -o FILE is an image file that mount, info and verify take")
    rd.add_argument("-o", "--output", metavar="FILE", help="write to FILE (appears only when complete)")
    rd.add_argument("-f", "--force", action="store_true", help="replace an existing FILE")
    verb("scan", "rebuild the catalog entries of a tape from the media", "scan", "--catalog", "--changer")
    verb("tell", "the block position of the tape (for seek)", "tell")
    verb("weof", "write N filemarks (default 1) at the current position", "weof").add_argument(
        "count", type=count, nargs="?", default=1, metavar="N", help="how many filemarks (default 1)")
    verb("setblk", "set the drive's block size (0: variable)", "setblk").add_argument(
        "size", type=count, help="bytes per block, 0 for variable-size blocks")
    verb("compression", "show the drive's compression, or switch it on or off", "compression").add_argument(
        "state", nargs="?", choices=("on", "off", "1", "0"), help="on or off (1 or 0); none: show it")
    verb("erase", "erase the whole tape (a labelled or used tape only with --force)", "erase", "--catalog").add_argument(
        "-f", "--force", action="store_true", help="erase a tape that holds a label or data")


def _tape_from_environment(func: str):
    """The tape verb `func` of tape_actions, loaded (and the engine with it) only when it runs.
    Like mt, the tape verbs use $TAPE when no --tape is given."""
    def run(args, out: Output) -> int:
        if not args.tape and os.environ.get("TAPE"):
            args.tape = os.environ["TAPE"]
        return getattr(importlib.import_module(".tape_actions", __package__), func)(args, out)
    return run
