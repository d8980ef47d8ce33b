"""Docs in the terminal: every option explained, examples in every --help, a man page man renders,
completion that bash and zsh load and that completes commands and tape paths."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import pytest

from imager.cli.parser import build_parser, commands

from conftest import imager


def test_every_command_has_examples_and_every_option_a_help_text():
    undocumented, without_examples = [], []
    for path, parser in commands(build_parser()):
        if not ((parser.epilog or "").startswith("examples:\n  ") and "imager" in parser.epilog):
            without_examples.append(path)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                undocumented.append(f"{path} {action.option_strings or action.dest}")
    assert undocumented == [] and without_examples == []


def test_a_command_line_builds_the_same_parser_of_its_command_as_the_whole_one():
    """A command line that names a command builds only its module's parsers: each must be the
    whole parser's to the letter, its options, defaults and help, and every command must be
    found (a command missing from the table would fall back to the whole parser)."""
    whole = dict(commands(build_parser()))
    top = [path for path in whole if path and " " not in path]
    for command in top:
        alone = dict(commands(build_parser([command, "--help"])))
        assert command in alone and len(alone) < len(whole), command
        for path, parser in alone.items():
            if path:
                assert parser.format_help() == whole[path].format_help(), path
                assert ({a.dest: a.default for a in parser._actions}
                        == {a.dest: a.default for a in whole[path]._actions}), path
    assert build_parser(["no-such-command"]).format_help() == build_parser().format_help()


def test_help_shows_the_examples_and_tape_verbs_only_their_options():
    shown = imager("tape", "rewind", "--help", check=True).stdout
    assert "examples:\n  imager tape rewind --tape /dev/nst0" in shown
    # A tape move has no use for a catalog, a changer or a cartridge capacity.
    assert "--catalog" not in shown and "--changer" not in shown and "--tape-capacity" not in shown
    main = imager("--help", check=True).stdout
    assert "exit status:" in main and "  2    a wrong command line" in main


def test_the_man_page_renders_and_names_every_command(tmp_path):
    page = imager("manpage", check=True).stdout
    rendered = subprocess.run(["man", "-l", "-"], input=page, capture_output=True, text=True,
                              env=dict(os.environ, MANWIDTH="100", MAN_KEEP_FORMATTING="0"))
    assert rendered.returncode == 0, rendered.stderr
    text = rendered.stdout
    assert text.startswith("IMAGER(1)")
    for command in ("backup", "restore", "verify", "consolidate", "tape label", "catalog prune"):
        assert f"imager {command}" in text, command
    installed = os.path.join(sys.prefix, "share", "man", "man1", "imager.1")
    if os.path.exists(installed):          # make setup installs it into the environment
        assert open(installed).read() == page


def test_bash_completes_commands_and_tape_paths(tmp_path):
    script = tmp_path / "imager.bash"
    script.write_text(imager("completion", "bash", check=True).stdout)
    (tmp_path / "weekly.tap").write_bytes(b"")
    probe = (f"source {script}; COMP_WORDS=(imager re); COMP_CWORD=1; _shtab_imager; echo \"${{COMPREPLY[*]}}\"; "
             f"COMP_WORDS=(imager tape list --tape wee); COMP_CWORD=4; _shtab_imager; echo \"${{COMPREPLY[*]}}\"")
    done = subprocess.run(["bash", "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    commands_line, tape_line = done.stdout.splitlines()
    assert set(commands_line.split()) == {"restore", "recover"}
    assert tape_line.split() == ["weekly.tap"]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="needs zsh")
def test_zsh_loads_the_completion_and_knows_the_commands(tmp_path):
    (tmp_path / "_imager").write_text(imager("completion", "zsh", check=True).stdout)
    probe = (f"fpath=({tmp_path} $fpath); autoload -Uz compinit && compinit -u -d {tmp_path}/dump; "
             "print $_comps[imager]; autoload -Uz _imager; _imager 2>/dev/null; "
             "_describe() { print -l -- ${(P)2} }; _shtab_imager_commands; "
             "print -l -- $_shtab_imager_tape_list_options")
    done = subprocess.run(["zsh", "-fc", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "_imager"
    assert any(line.startswith("restore:") for line in lines) and any(line.startswith("backup:") for line in lines)
    assert any("--tape" in line and line.endswith(":_files") for line in lines), lines
