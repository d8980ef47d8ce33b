"""The public Python API: one call per job, keyword arguments for everything a job takes."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from . import jobs
from .catalog import Catalog
from .format import DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL
from .jobs.results import BackupResult, ExtractResult, FileEntry, ImageInfo, MountInfo, RestoreResult, VerifyResult
from .mount.volume import DEFAULT_CACHE_BYTES

Progress = Callable[[int], None]
CatalogChoice = str | os.PathLike | bool


def backup(source: str, output: str, *, level: int = DEFAULT_LEVEL, chunk_size: int = DEFAULT_CHUNK_SIZE,
           workers: int | None = None, all_blocks: bool = False, excludes: Sequence[str] = (),
           snapshot: str = "none", incremental: bool = False, parent: str | None = None,
           compare_digests: bool = False, force: bool = False,
           catalog: CatalogChoice = True, progress: Progress | None = None,
           on_notice: Callable[[str], None] | None = None) -> BackupResult:
    """Image the volume `source` (a block device or file; a managed volume's name with
    snapshot="cow") to the image file `output` ("-" for standard output), recorded in the
    catalog (True: the default one, a path: that one, False: none). `incremental`: only what
    changed since `parent` (an image file or catalog id; default the volume's newest image in
    the catalog), a full when there is none; `compare_digests`: find the changes by digests
    even where the volume's change tracker has them."""
    options = jobs.ImagingOptions(level=level, chunk_size=chunk_size, workers=workers, all_blocks=all_blocks,
                                  excludes=tuple(os.path.abspath(p) for p in excludes), backups_as_sources=force,
                                  incremental=incremental, parent=parent, compare_digests=compare_digests)
    destination = jobs.Destination(output=output, force=force)
    with _catalog(catalog) as opened:
        return jobs.backup_volumes([source], destination, snapshot=snapshot, options=options, progress=progress,
                                   on_notice=on_notice, catalog=opened)[0]


def restore(image: str, target: str, *, force: bool = False, verify: bool = False, workers: int | None = None,
            catalog: CatalogChoice = True, progress: Progress | None = None) -> RestoreResult:
    """Write the volume held by the image file `image` onto the block device or file `target`
    (`force`: replace a file, overwrite a device that holds data); `verify` reads it back. An
    incremental gives the volume at its point, its parents found in the catalog or beside it."""
    with _catalog(catalog) as opened:
        return jobs.restore(image, target, force=force, verify=verify, workers=workers, progress=progress,
                            catalog=opened)


def verify(image: str, *, workers: int | None = None, catalog: CatalogChoice = True,
           progress: Progress | None = None) -> VerifyResult:
    """Decompress and check every chunk of the image file `image` (and of its chain, for an
    incremental); raises on damage."""
    with _catalog(catalog) as opened:
        return jobs.verify(image, workers=workers, progress=progress, catalog=opened)


def consolidate(image: str, output: str, *, force: bool = False, workers: int | None = None,
                catalog: CatalogChoice = True, progress: Progress | None = None) -> BackupResult:
    """Write a full image of the chain point `image` to `output` from the chain's compressed
    frames, without the volume: a synthetic full."""
    with _catalog(catalog) as opened:
        return jobs.consolidate(image, jobs.Destination(output=output, force=force), workers=workers,
                                progress=progress, catalog=opened)


@contextmanager
def _catalog(choice: CatalogChoice) -> Iterator[Catalog | None]:
    if choice is False:
        yield None
        return
    with Catalog(None if choice is True else choice) as opened:
        yield opened


def info(image: str) -> ImageInfo:
    """What the image file `image` holds: its header and its trailer's totals."""
    return jobs.info(image)


def mount(image: str, directory: str, *, cache_size: int = DEFAULT_CACHE_BYTES,
          catalog: CatalogChoice = True) -> MountInfo:
    """Mount the volume of the image file `image` (an incremental: at its point, its parents
    found in the catalog or beside it) read-only at the empty directory `directory`: a
    filesystem there, each partition of a whole disk in it as `<n>-<label or fstype>`, what the
    kernel cannot mount as the file of its bytes. A daemon serves it, with at most `cache_size`
    bytes of decompressed chunks, until umount(directory)."""
    with _catalog(catalog) as opened:
        return jobs.mount(image, directory, catalog=opened, cache_bytes=cache_size)


def umount(directory: str) -> MountInfo:
    """Unmount what mount() mounted at `directory` and end its daemon; also after the daemon was
    killed. Refused, changing nothing, while a file there is in use."""
    return jobs.umount(directory)


def mounts() -> list[MountInfo]:
    """Every image mounted with mount(), and what is where."""
    return jobs.mounts()


def ls(image: str, path: str = "", *, catalog: CatalogChoice = True) -> list[FileEntry]:
    """The entries of the directory `path` in the image (or the file itself), without a visible
    mount: a private one that nothing outlives."""
    with _catalog(catalog) as opened:
        return jobs.ls(image, path, catalog=opened)


def extract(image: str, paths: Sequence[str], dest: str, *, force: bool = False,
            catalog: CatalogChoice = True) -> ExtractResult:
    """Copy `paths` of the image to the directory `dest` (`dest`/PATH), keeping modes, owners,
    times, symlinks and extended attributes as cp -a does, without a visible mount; `force`
    overwrites what is there."""
    with _catalog(catalog) as opened:
        return jobs.extract(image, list(paths), dest, force=force, catalog=opened)
