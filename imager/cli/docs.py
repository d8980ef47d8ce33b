"""imager completion SHELL, imager manpage: both generated from the parser itself, so they never
disagree with --help."""

from __future__ import annotations

import json
import sys

from .output import Output


def register(sub, parents) -> None:
    c = sub.add_parser("completion", help="print the shell completion script (bash or zsh)",
                       description="Print a completion script for the shell. Load it with: "
                                   "source <(imager completion bash), or install it where the shell looks "
                                   "(/etc/bash_completion.d/imager, a directory of $fpath for zsh: _imager).")
    c.add_argument("shell", choices=("bash", "zsh"), help="the shell to complete in")
    c.set_defaults(func=completion)
    m = sub.add_parser("manpage", help="print the man page (roff), e.g. imager manpage | man -l -",
                       description="Print imager(1) in roff. `make setup` installs it into the environment's "
                                   "share/man/man1.")
    m.set_defaults(func=manpage)
    sc = sub.add_parser("schema", help="print the JSON Schema of every command's --json output",
                        description="Print the JSON Schema (draft 2020-12) that every --json output follows: "
                                    "one definition per command under $defs, e.g. $defs['tape list'].")
    sc.set_defaults(func=print_schema)
    su = sub.add_parser("systemd-unit", help="print the systemd unit template that attaches a managed volume at boot",
                        description="Print imager-volume@.service: install it in /etc/systemd/system, describe "
                                    "volume NAME in /etc/imager/volumes/NAME.conf (DEVICE=/dev/..., optional "
                                    "ATTACH_OPTIONS=...) and mount its front from /etc/fstab with the line "
                                    "--fstab NAME MOUNTPOINT prints.")
    su.add_argument("--fstab", nargs=2, metavar=("NAME", "MOUNTPOINT"),
                    help="print the /etc/fstab line for volume NAME mounted at MOUNTPOINT instead")
    su.add_argument("--type", default="ext4", metavar="FSTYPE", help="filesystem type for --fstab (default ext4)")
    su.set_defaults(func=systemd_unit)


def completion(args, out: Output) -> int:
    import shtab

    from .parser import build_parser

    sys.stdout.write(shtab.complete(build_parser(), shell=args.shell))
    return 0


def manpage(args, out: Output) -> int:
    from argparse_manpage.manpage import Manpage

    from .parser import build_parser

    page = str(Manpage(build_parser(), _data={"project_name": "imager", "description":
                                               "point-in-time images of block devices in use"}))
    sys.stdout.write(page)
    return 0


def systemd_unit(args, out: Output) -> int:
    from ..snapshot.daemon.boot import fstab_line, unit_text

    sys.stdout.write(fstab_line(*args.fstab, args.type) + "\n" if args.fstab else unit_text())
    return 0


def print_schema(args, out: Output) -> int:
    from ..schema import schema

    print(json.dumps(schema(), indent=2))
    return 0
