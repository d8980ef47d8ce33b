"""The command line: one small function per verb registers its parser (in the verb's module)."""

from __future__ import annotations

import argparse
import importlib
import re
from dataclasses import dataclass
from typing import Iterator, NoReturn, Sequence

from .. import __version__
from ..defaults import DEFAULT_TAPE_BLOCK_SIZE
from ..units import positive_size
from .examples import epilog
from .progress import MODES


@dataclass
class Parents:
    """Option groups verbs share."""

    common: argparse.ArgumentParser      # --json, --quiet, --verbose
    catalog: argparse.ArgumentParser     # --catalog
    tape: argparse.ArgumentParser        # --tape and its companions
    tape_device: argparse.ArgumentParser  # --tape alone (the tape verbs)
    tape_options: dict[str, argparse.ArgumentParser]   # each companion alone, by option name
    progress: argparse.ArgumentParser    # --progress (the verbs that move volumes of data)


def _parents() -> Parents:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary")
    common.add_argument("-v", "--verbose", action="store_true",
                        help="say more: phases, the used-block plan, I/O fallbacks")
    common.add_argument("--log-file", metavar="PATH",
                        help="also log the job (start, phases, plan, result, errors) to this file; the systemd "
                             "journal or syslog get it anyway when they run")
    progress = argparse.ArgumentParser(add_help=False)
    progress.add_argument("--progress", choices=MODES, default="auto",
                          help="progress on stderr: a bar when stderr is a terminal (auto), always a bar, a "
                               "plain line every few seconds, a JSON object per line, or none")
    catalog = argparse.ArgumentParser(add_help=False)
    catalog.add_argument("--catalog", metavar="PATH", help="catalog database (default: the user's data directory)")
    options = {
        "--tape": dict(metavar="T", help="/dev/nstN, a virtual tape file.tap, or a set of virtual cartridges as a "
                       "pattern like 'vault/tape-{n:03}.tap'"),
        "--tape-capacity": dict(type=positive_size, metavar="SIZE",
                                help="capacity of a virtual cartridge (default: unlimited)"),
        "--block-size": dict(type=positive_size, metavar="SIZE",
                             help=f"tape block size (default {DEFAULT_TAPE_BLOCK_SIZE >> 10}K to write; to read, the size "
                                  f"the image was written with)"),
        "--changer": dict(metavar="DEV|CMD", help="the library's SCSI medium changer (/dev/sgN): it loads the next "
                          "blank cartridge when an image spans, and the cartridge by label to read; or a command "
                          "that loads the next cartridge ($IMAGER_CARTRIDGE is its number); without either the "
                          "operator is asked"),
    }
    alone: dict[str, argparse.ArgumentParser] = {}
    tape = argparse.ArgumentParser(add_help=False)
    for name, spec in options.items():
        tape.add_argument(name, **spec)  # type: ignore[arg-type]
        alone[name] = argparse.ArgumentParser(add_help=False)
        alone[name].add_argument(name, **spec)  # type: ignore[arg-type]
    return Parents(common, catalog, tape, alone["--tape"], alone, progress)


# The modules of imager.cli that register commands, in the order `imager --help` lists them, and
# the commands each registers.
VERB_MODULES = {
    "backup": ("backup",), "restore": ("restore",), "verify": ("verify",), "info": ("info",),
    "consolidate": ("consolidate",), "mount": ("mount", "umount", "mounts", "ls", "extract"), "loop": ("loop",),
    "catalog": ("catalog",), "tape": ("tape",), "volumes": ("attach", "detach", "volumes", "recover", "snapshot"),
    "devices": ("devices",), "demo": ("demo",), "docs": ("completion", "manpage", "schema", "systemd-unit"),
}
_MODULE_OF = {command: module for module, commands in VERB_MODULES.items() for command in commands}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; for a command line `argv` that starts with a command, the
    parser of only the commands of its module: building every one took 50-60 ms of each run,
    a twentieth of a small incremental backup."""
    module = _MODULE_OF.get(argv[0]) if argv else None
    names = [module] if module else list(VERB_MODULES)
    p = OneLineErrors(prog="imager", description="Point-in-time images of block devices in use.")
    p.add_argument("--version", action="version", version=f"imager {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = _parents()
    for name in names:
        importlib.import_module(f".{name}", __package__).register(sub, parents)
    for path, parser in commands(p):
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = epilog(path)
        for action in parser._actions:
            if action.option_strings and set(action.option_strings) & PATH_OPTIONS or action.metavar in PATH_ARGUMENTS:
                action.complete = FILE_COMPLETION  # type: ignore[attr-defined]
    return p


class OneLineErrors(argparse.ArgumentParser):
    """A command line argparse refuses is said in one line, as every other error (the usage
    block it prints by default buries the reason): what is wrong and where the help is. Its
    subcommands' parsers are of this class too (add_subparsers takes the parser's class)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        # "--chunk-size -4M" is a value to refuse for what it is, as getopt gives it to the
        # option; argparse takes only "-4" and "-.5" for values and calls "-4M" a missing one.
        # No option of imager starts with a digit.
        self._negative_number_matcher = re.compile(r"^-\d")

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("imager").strip()
        self.exit(2, f"imager: error: {command + ': ' if command else ''}{message} (see {self.prog} --help)\n")


# Shell completion completes these with file names (shtab's FILE, without importing shtab on
# every start).
FILE_COMPLETION = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}
PATH_OPTIONS = {"--tape", "-o", "--output", "--catalog", "--cache", "--parent", "--exclude", "--log-file"}
PATH_ARGUMENTS = {"IMAGE", "TARGET", "SOURCE", "IMAGE TARGET"}


def commands(parser: argparse.ArgumentParser, path: str = "") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command's parser with its path ("", "backup", "tape label", ...)."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from commands(child, f"{path} {name}".strip())
