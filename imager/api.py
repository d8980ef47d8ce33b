"""The public Python API: one call per job, keyword arguments for everything a job takes."""

from __future__ import annotations

import os
from typing import Callable, Sequence

from . import jobs
from .catalog import Catalog
from .format import DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL
from .jobs.results import BackupResult, ImageInfo, RestoreResult, VerifyResult

Progress = Callable[[int], None]


def backup(source: str, output: str, *, level: int = DEFAULT_LEVEL, chunk_size: int = DEFAULT_CHUNK_SIZE,
           workers: int | None = None, all_blocks: bool = False, excludes: Sequence[str] = (),
           snapshot: str = "none", force: bool = False, catalog: str | os.PathLike | bool = True,
           progress: Progress | None = None, on_notice: Callable[[str], None] | None = None) -> BackupResult:
    """Image the volume `source` (a block device or file; a managed volume's name with
    snapshot="cow") to the image file `output` ("-" for standard output), recorded in the
    catalog (True: the default one, a path: that one, False: none)."""
    options = jobs.ImagingOptions(level=level, chunk_size=chunk_size, workers=workers, all_blocks=all_blocks,
                                  excludes=tuple(os.path.abspath(p) for p in excludes), backups_as_sources=force)
    destination = jobs.Destination(output=output, force=force)
    if catalog is False:
        return jobs.backup_volumes([source], destination, snapshot=snapshot, options=options, progress=progress,
                                   on_notice=on_notice)[0]
    with Catalog(None if catalog is True else catalog) as opened:
        return jobs.backup_volumes([source], destination, snapshot=snapshot, options=options, progress=progress,
                                   on_notice=on_notice, catalog=opened)[0]


def restore(image: str, target: str, *, force: bool = False, verify: bool = False, workers: int | None = None,
            progress: Progress | None = None) -> RestoreResult:
    """Write the volume held by the image file `image` onto the block device or file `target`
    (`force`: replace a file, overwrite a device that holds data); `verify` reads it back."""
    return jobs.restore(image, target, force=force, verify=verify, workers=workers, progress=progress)


def verify(image: str, *, workers: int | None = None, progress: Progress | None = None) -> VerifyResult:
    """Decompress and check every chunk of the image file `image`; raises on damage."""
    return jobs.verify(image, workers=workers, progress=progress)


def info(image: str) -> ImageInfo:
    """What the image file `image` holds: its header and its trailer's totals."""
    return jobs.info(image)
