"""The public Python API: what `import imager` offers is what the README shows, and the README's
example runs as written, on real devices in place of /dev/sdb1 and /dev/sdc1."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import imager
from conftest import REPO_ROOT, same_bytes

README = Path(REPO_ROOT) / "README.md"


def readme_python_example() -> str:
    (block,) = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    return block


def test_every_public_name_resolves():
    for name in imager.__all__:
        assert getattr(imager, name) is not None, name
    assert issubclass(imager.UsageError, imager.ImagerError)
    assert issubclass(imager.ChunkError, imager.ImageFormatError)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        imager.nothing


def test_import_imager_loads_no_engine():
    """The freeze guard and the volume daemon import parts of imager: the package itself must not
    pull in the engine (zstandard, the jobs) behind them."""
    loaded = subprocess.run([sys.executable, "-c", "import imager, sys; print(' '.join(sorted(sys.modules)))"],
                            capture_output=True, text=True, check=True, cwd=REPO_ROOT).stdout.split()
    assert "zstandard" not in loaded and "imager.jobs" not in loaded and "imager.api" not in loaded


def test_the_command_line_parses_and_helps_without_loading_the_engine():
    """`imager --help`, `--version`, a usage error, the catalog and tape listings: the parser of
    every verb is built, and the engine (numpy, zstd, the jobs) is loaded only by the verb that
    runs. It was 0.2 s of every command's start."""
    code = ("import sys, contextlib, io; from imager.cli.parser import build_parser; p = build_parser()\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    for argv in (['--help'], ['backup', '--help'], ['tape', 'status', '--help']):\n"
            "        with contextlib.suppress(SystemExit): p.parse_args(argv)\n"
            "print(' '.join(sorted(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=REPO_ROOT).stdout.split()
    assert "imager.cli.backup" in loaded and "imager.cli.tape" in loaded
    assert not {"numpy", "zstandard", "imager.jobs", "imager.format", "imager.tape"} & set(loaded)


def test_backup_offers_every_snapshot_provider_there_is():
    from imager import defaults
    from imager.snapshot.provider import PROVIDERS

    assert defaults.SNAPSHOT_PROVIDERS == tuple(PROVIDERS)


def test_the_freeze_guard_loads_no_numpy():
    """Every snapshot starts a freeze guard process before it freezes: numpy alone took 0.14 s
    of its start (0.15-0.2 s of each incremental from a cold cache)."""
    # A freeze of a path that is not there runs the guard's freeze and thaw to their ends,
    # imports and all, and changes nothing.
    code = ("import sys, imager.snapshot.freeze_guard as guard; g = guard._Guard(); g.out = open('/dev/null', 'wb');"
            "g.freeze(['/nonexistent/imager-test'], 5.0); g.thaw_all();"
            "print(' '.join(sorted(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=REPO_ROOT).stdout.split()
    assert "devices.freeze" in loaded and "numpy" not in loaded


def test_the_readme_example_runs(loops, tmp_path, monkeypatch):
    source = loops.create(64 << 20, fs="ext4")
    point = loops.mount(source)
    (point / "file.txt").write_text("kept by the image\n" * 1000)
    loops.umount(point)
    target = loops.create(64 << 20)
    code = readme_python_example().replace("/dev/sdb1", source).replace("/dev/sdc1", target)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert isinstance(result, imager.BackupResult) and result.volume_size == 64 << 20
    assert os.path.exists(tmp_path / "sdb1.zst")
    assert same_bytes(source, target, 64 << 20)
    with open(source, "rb") as f:
        assert namespace["boot_sector"] == f.read(512)


def test_api_calls_take_keywords_and_report_progress(loops, tmp_path):
    source = loops.create(32 << 20, fs="ext4")
    seen = []
    result = imager.backup(source, str(tmp_path / "v.zst"), level=1, chunk_size=1 << 20, workers=1,
                           catalog=False, progress=seen.append)
    assert sum(seen) == result.volume_size == 32 << 20
    assert result.chunk_size == 1 << 20 and result.level == 1
    checked = imager.verify(str(tmp_path / "v.zst"))
    assert checked.ok and checked.chunks == 32
    shown = imager.info(str(tmp_path / "v.zst"))
    assert shown.header.volume_size == 32 << 20 and shown.header.source["fs_type"] == "ext4"


def test_api_errors_are_imager_errors_with_one_line(tmp_path):
    with pytest.raises(imager.ImagerError) as missing:
        imager.backup(str(tmp_path / "nothing"), str(tmp_path / "v.zst"))
    assert "\n" not in str(missing.value) and "nothing" in str(missing.value)
    (tmp_path / "junk.zst").write_bytes(b"not an image" * 100)
    with pytest.raises(imager.ImageFormatError):
        imager.verify(str(tmp_path / "junk.zst"))
    assert not (tmp_path / "v.zst").exists()
