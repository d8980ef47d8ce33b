"""Every command's --json output follows the one schema (`imager schema`): scripts written
against one command's names work on the others'."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
from jsonschema import Draft202012Validator

from imager.cli.parser import build_parser, commands
from imager.schema import COMMANDS, MOVES, definition_for, schema

from conftest import REPO_ROOT, imager, run

WITHOUT_JSON = {"completion", "manpage", "schema", "systemd-unit"}   # they print a file, not a result


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    printed = json.loads(imager("schema", check=True).stdout)
    Draft202012Validator.check_schema(printed)
    assert printed == json.loads(json.dumps(schema()))
    return Draft202012Validator(printed)


def checked(validator: Draft202012Validator, *argv: str, stream: str = "stdout", env: dict | None = None) -> dict:
    """Run `imager ARGV --json` and hold its output to the schema of its command."""
    words = [a for a in argv if not a.startswith("-")]
    if stream == "stderr":      # standard output carries data: bytes, not text
        done = subprocess.run([sys.executable, "-m", "imager.cli", *argv, "--json"], capture_output=True,
                              cwd=REPO_ROOT, env=env, timeout=300)
        assert done.returncode == 0, (argv, done.stderr)
        text = done.stderr.decode()
    else:
        done = imager(*argv, "--json", env=env)
        assert done.returncode == 0, (argv, done.stderr)
        text = done.stdout
    output = json.loads(text[text.index("{"):])
    name = definition_for(words)
    node = {"$ref": f"#/$defs/{name}"}
    errors = sorted(validator.evolve(schema={**validator.schema, **node}).iter_errors(output), key=str)
    assert not errors, (name, [f"{list(e.absolute_path)}: {e.message}" for e in errors[:5]], output)
    return output


def test_every_command_that_prints_json_has_a_definition():
    missing = []
    for path, parser in commands(build_parser()):
        words = path.split()
        if not words or any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
            continue
        if words[0] in WITHOUT_JSON:
            continue
        if definition_for(words) not in COMMANDS:
            missing.append(path)
    assert missing == []
    assert all(definition_for(["tape", m]) == "tape move" for m in MOVES)


def test_image_commands_follow_the_schema(validator, loops, tmp_path):
    dev = loops.create(64 << 20, fs="ext4", label="data")
    point = loops.mount(dev)
    (point / "dir").mkdir()
    (point / "dir" / "file.txt").write_text("monday\n")
    loops.umount(point)
    full, inc = str(tmp_path / "full.zst"), str(tmp_path / "inc.zst")

    made = checked(validator, "backup", dev, "-o", full)
    assert made["images"][0]["segments"][0]["path"] == full
    point = loops.mount(dev)
    (point / "dir" / "file.txt").write_text("tuesday\n")
    loops.umount(point)
    later = checked(validator, "backup", dev, "-o", inc, "--incremental", "--parent", full)
    assert later["images"][0]["parent_id"] == made["images"][0]["image_id"]
    shown = checked(validator, "info", inc)
    assert shown["image_id"] == later["images"][0]["image_id"]
    assert checked(validator, "verify", inc)["images"][0]["chain"] == [later["images"][0]["image_id"],
                                                                       made["images"][0]["image_id"]]
    restored = checked(validator, "restore", inc, str(tmp_path / "r.raw"))
    assert restored["image_id"] == later["images"][0]["image_id"]
    checked(validator, "consolidate", inc, "-o", str(tmp_path / "synthetic.zst"))

    listed = checked(validator, "catalog", "list")
    assert {i["image_id"] for i in listed["images"]} >= {made["images"][0]["image_id"]}
    checked(validator, "catalog", "check")
    checked(validator, "catalog", "prune", "--keep-last", "10", "--dry-run")
    checked(validator, "catalog", "forget", made["images"][0]["image_id"], "--force")

    entries = checked(validator, "ls", inc, "dir")["entries"]
    assert [e["name"] for e in entries] == ["file.txt"]
    dest = tmp_path / "out"
    dest.mkdir()
    checked(validator, "extract", inc, "dir/file.txt", "-C", str(dest))
    assert (dest / "dir" / "file.txt").read_text() == "tuesday\n"
    mounted = tmp_path / "mnt"
    mounted.mkdir()
    try:
        checked(validator, "mount", inc, str(mounted))
        assert [m["directory"] for m in checked(validator, "mounts")["mounts"]] == [str(mounted)]
    finally:
        checked(validator, "umount", str(mounted))

    attached = checked(validator, "loop", "attach", full, "--read-only")
    try:
        assert attached["path"] in [d["path"] for d in checked(validator, "loop", "list")["loopdevices"]]
    finally:
        checked(validator, "loop", "detach", attached["path"])
    devices = checked(validator, "devices")
    assert os.path.basename(dev) in [d["name"] for d in devices["blockdevices"]]


def test_tape_commands_follow_the_schema(validator, loops, tmp_path):
    dev = loops.create(32 << 20, fs="ext4")
    tape = str(tmp_path / "t.tap")
    checked(validator, "tape", "label", "T1", "--tape", tape)
    made = checked(validator, "backup", dev, "--tape", tape)
    (segment,) = made["images"][0]["segments"]
    assert (segment["kind"], segment["tape_label"], segment["tape_file"]) == ("tape", "T1", 1)
    (listed,) = checked(validator, "tape", "list", "--tape", tape)["files"]
    assert listed["image"]["image_id"] == made["images"][0]["image_id"] == listed["image_id"]
    assert listed["image"]["snapshot"]["provider"] == "none"
    checked(validator, "tape", "scan", "--tape", tape)
    checked(validator, "verify", "--tape", tape)
    checked(validator, "restore", "--tape", tape, "--image", made["images"][0]["image_id"], str(tmp_path / "r.raw"))
    checked(validator, "tape", "rewind", "--tape", tape)
    checked(validator, "tape", "status", "--tape", tape, "--label")
    checked(validator, "tape", "fsf", "1", "--tape", tape)
    checked(validator, "tape", "tell", "--tape", tape)
    checked(validator, "tape", "eod", "--tape", tape)
    checked(validator, "tape", "weof", "--tape", tape)
    checked(validator, "tape", "setblk", "0", "--tape", tape)
    checked(validator, "tape", "compression", "--tape", tape)
    # Standard output carries the tape file: the summary goes to stderr.
    to_stdout = checked(validator, "tape", "read", "--file", "1", "--tape", tape, stream="stderr")
    assert to_stdout["output"] == "-" and to_stdout["bytes"] > 0
    image = str(tmp_path / "from-tape.zst")
    assert checked(validator, "tape", "read", "--file", "1", "--image-only", "-o", image, "--tape", tape)["image_bytes"] \
        == os.path.getsize(image)
    checked(validator, "tape", "erase", "--force", "--tape", tape)


def test_managed_volume_commands_follow_the_schema(validator, lab, tmp_path):
    from lab import daemon, stop_volume

    device = lab.loop_device(64 << 20)
    attached = checked(validator, "attach", device, "--name", "js", "--cache", str(tmp_path / "state"))
    (info,) = [v for v in daemon.list_volumes() if v.name == "js"]
    lab._undo.append(lambda: stop_volume(info))
    run("mkfs.ext4", "-q", "-F", attached["front"])
    assert checked(validator, "volumes")["volumes"][0]["name"] == "js"
    made = checked(validator, "snapshot", "create", "js")
    assert made["snapshots"][0]["created"] and made["created"]
    assert [s["name"] for s in checked(validator, "snapshot", "list")["snapshots"]] == ["js"]
    checked(validator, "snapshot", "delete", "js")
    checked(validator, "backup", "--snapshot", "cow", "js", "-o", str(tmp_path / "js.zst"))
    assert checked(validator, "volumes", "restart", "js")["volumes"][0]["worker"]["restarts"] == 1
    checked(validator, "detach", "js")
