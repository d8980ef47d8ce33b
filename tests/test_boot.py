"""A managed volume at boot (#15): the unit template's ExecStart and ExecStop lines, run the way
systemd runs them (systemd itself does not run here), attach and detach the volume; the fstab
line mounts its front through a stable name; a clean stop leaves the change tracker clean."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess

import pytest

from imager.snapshot import daemon

from lab import DAEMON_TESTS, MiB, imager

pytestmark = DAEMON_TESTS

FSTAB_GENERATOR = "/lib/systemd/system-generators/systemd-fstab-generator"


def unit_service(name: str) -> dict[str, list[str]]:
    """The [Service] settings of imager-volume@NAME.service, specifiers expanded."""
    printed = imager("systemd-unit")
    assert printed.returncode == 0, printed.stderr
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    parser.read_string(printed.stdout.replace("%i", name).replace("%I", name))
    return {key: [value] for key, value in parser["Service"].items()}


def environment(settings: dict[str, list[str]], conf: str) -> dict[str, str]:
    env = dict(os.environ)
    for line in settings.get("Environment", []):
        key, _, value = line.partition("=")
        env[key] = value
    with open(conf) as f:
        for line in f:
            key, _, value = line.strip().partition("=")
            if key and not key.startswith("#"):
                env[key] = value
    return env


def command_line(line: str, env: dict[str, str]) -> list[str]:
    """systemd's expansion: ${VAR} is one word, $VAR splits at whitespace."""
    words = []
    for word in line.split():
        if m := re.fullmatch(r"\$\{(\w+)\}", word):
            words.append(env.get(m.group(1), ""))
        elif m := re.fullmatch(r"\$(\w+)", word):
            words.extend(env.get(m.group(1), "").split())
        else:
            words.append(word)
    return words


def test_the_unit_attaches_before_the_fstab_mount_and_detaches_cleanly_after(bench, tmp_path):
    source = bench.loop_device(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", source], check=True)
    settings = unit_service("bootvol")
    conf = tmp_path / "bootvol.conf"       # stands in for /etc/imager/volumes/bootvol.conf
    by_id = tmp_path / "disk-by-id-link"    # made by udev at boot, maybe after the unit started
    conf.write_text(f"DEVICE={by_id}\nATTACH_OPTIONS=--cache {tmp_path / 'state'} --watchdog 20\n")
    assert settings["EnvironmentFile"] == ["/etc/imager/volumes/bootvol.conf"]
    assert settings["Type"] == ["forking"]
    env = environment(settings, str(conf))

    starting = subprocess.Popen(command_line(settings["ExecStart"][0], env), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    os.symlink(source, by_id)
    _, err = starting.communicate(timeout=120)
    assert starting.returncode == 0, err
    info = daemon.status("bootvol")
    bench.defer(lambda: imager("detach", "bootvol"))
    with open(settings["PIDFile"][0]) as f:          # what systemd then watches
        assert int(f.read()) == info.pid

    fstab_line = imager("systemd-unit", "--fstab", "bootvol", str(tmp_path / "srv")).stdout.split()
    what, where, fstype, options = fstab_line[:4]
    assert "x-systemd.requires=imager-volume@bootvol.service" in options.split(",")
    assert os.path.realpath(what) == info.front
    if os.path.exists(FSTAB_GENERATOR):             # systemd's reading of the line: the mount needs the unit
        (tmp_path / "fstab").write_text(" ".join(fstab_line) + "\n")
        generated = tmp_path / "generated"
        generated.mkdir()
        subprocess.run([FSTAB_GENERATOR, str(generated), str(generated), str(generated)], check=True,
                       env=dict(os.environ, SYSTEMD_FSTAB=str(tmp_path / "fstab"), SYSTEMD_PROC_CMDLINE=""))
        (mount_unit,) = [p.read_text() for p in generated.glob("*.mount")]
        assert "Requires=imager-volume@bootvol.service" in mount_unit
        assert "After=imager-volume@bootvol.service" in mount_unit
    os.mkdir(where)
    subprocess.run(["mount", "-t", fstype, what, where], check=True)
    try:
        with open(os.path.join(where, "written-at-boot"), "wb") as f:
            f.write(b"kept")
            os.fsync(f.fileno())
    finally:
        subprocess.run(["umount", where], check=True)   # shutdown: the mount stops before the unit

    stopped = subprocess.run(command_line(settings["ExecStop"][0], env), env=env, capture_output=True, text=True)
    assert stopped.returncode == 0, stopped.stderr
    assert daemon.list_volumes() == []
    assert not os.path.exists(what)
    with open(tmp_path / "state" / "tracker.json") as f:
        assert json.load(f)["state"] == "clean"       # the first incremental after boot may use it

    again = subprocess.run(command_line(settings["ExecStart"][0], env), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    # The tracker goes on with the same series: the next incremental reads only what changed.
    assert daemon.status("bootvol").tracker["series"] == info.tracker["series"]
    assert imager("detach", "bootvol").returncode == 0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path):
    (tmp_path / "imager-volume@.service").write_text(imager("systemd-unit").stdout)
    checked = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "imager-volume@data.service")],
                             capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stderr.strip() == "", checked.stderr
