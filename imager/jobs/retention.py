"""Retention that never breaks a chain, and a check of what the catalog points at.

prune keeps, per volume, the newest N images, the newest image of each of the last N days and
of each of the last N weeks that have images (as restic's forget); every kept incremental keeps
its parents back to its full. With `consolidate`, the oldest kept incremental of a chain whose
older images would otherwise all go is first rebuilt as a synthetic full that stands in for it,
so that its parents can go. Image files are deleted; images on tape leave the catalog only.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

from ..catalog import Catalog, ImageRecord
from ..errors import ImagerError, UsageError
from ..format import ImageReader
from .backup import Destination
from .consolidate import consolidate

log = logging.getLogger("imager.retention")


@dataclass
class KeepRules:
    last: int = 0
    daily: int = 0
    weekly: int = 0

    def any(self) -> bool:
        return bool(self.last or self.daily or self.weekly)


@dataclass
class PruneResult:
    dry_run: bool = False       # then removed, files_deleted and replaced say what would be
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    files_deleted: list[str] = field(default_factory=list)
    consolidated: list[str] = field(default_factory=list)     # synthetic fulls written
    replaced: list[str] = field(default_factory=list)         # incrementals they stand in for
    reasons: dict[str, str] = field(default_factory=dict)      # why each kept image is kept

    def to_dict(self) -> dict:
        return {"dry_run": self.dry_run, "kept": self.kept, "removed": self.removed, "files_deleted": self.files_deleted,
                "consolidated": self.consolidated, "replaced": self.replaced, "reasons": self.reasons}


def _when(record: ImageRecord) -> datetime:
    text = record.snapshot_time or record.created
    try:
        return datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return datetime.min


def chosen_by_rules(images: list[ImageRecord], rules: KeepRules) -> dict[str, str]:
    """The images the rules keep, newest first, with why."""
    ordered = sorted(images, key=_when, reverse=True)
    reasons: dict[str, str] = {}
    for record in ordered[:rules.last]:
        reasons.setdefault(record.id, "last")
    for label, count, bucket in (("daily", rules.daily, lambda t: t.date()),
                                 ("weekly", rules.weekly, lambda t: t.isocalendar()[:2])):
        seen: list = []
        for record in ordered:
            key = bucket(_when(record))
            if key in seen:
                continue
            if len(seen) == count:
                break
            seen.append(key)
            reasons.setdefault(record.id, label)
    return reasons


def _with_parents(keep: dict[str, str], by_id: dict[str, ImageRecord], stand_ins: set[str]) -> None:
    """Every kept incremental keeps its parents, back to its full, whatever volume or source
    they were taken from (an incremental may name any image as its parent: --parent). A stand-in
    is an incremental a synthetic full will take the place of: its parents are not needed."""
    for image_id in list(keep):
        record = by_id.get(image_id)
        while (record is not None and record.kind == "incremental" and record.parent_id
               and record.id not in stand_ins):
            # A synthetic full of the parent takes its place (what --consolidate made it for).
            parent = next((r for r in by_id.values() if r.replaces == record.parent_id), None) or \
                by_id.get(record.parent_id)
            if parent is None:
                break
            keep.setdefault(parent.id, f"parent of {record.id[:12]}")
            record = parent


def prune(catalog: Catalog, rules: KeepRules, *, dry_run: bool = False, consolidate_chains: bool = False,
          on_notice: Callable[[str], None] | None = None) -> PruneResult:
    """The rules choose per volume (or per source, for images of no managed volume); what the
    chosen images need is kept across all of them. With `dry_run` nothing is written or removed,
    and what --consolidate would rebuild is said (result.replaced)."""
    if not rules.any():
        raise UsageError("prune needs at least one of --keep-last, --keep-daily, --keep-weekly "
                         "(it would remove every image)")
    result = PruneResult(dry_run=dry_run)
    volumes: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in catalog.images():
        volumes[record.volume or f"source:{record.source}"].append(record)
    by_id = {r.id: r for images in volumes.values() for r in images}
    keep: dict[str, str] = {}
    for images in volumes.values():
        chosen = chosen_by_rules(images, rules)
        if consolidate_chains:
            _consolidate_oldest(catalog, chosen, by_id, result, on_notice, dry_run=dry_run)
        keep.update(chosen)
    images = catalog.images()       # with the synthetic fulls just written
    by_id = {r.id: r for r in images}
    stand_ins = set(result.replaced) if dry_run else set()
    _with_parents(keep, by_id, stand_ins)
    for record in sorted(images, key=_when):
        if record.id in keep and record.id not in stand_ins:
            result.kept.append(record.id)
            result.reasons[record.id] = keep[record.id]
        else:
            result.removed.append(record.id)
            if not dry_run:
                result.files_deleted += _remove(catalog, record)
            else:
                result.files_deleted += _files(catalog, record.id)
    return result


def _consolidate_oldest(catalog: Catalog, keep: dict[str, str], by_id: dict[str, ImageRecord],
                        result: PruneResult, on_notice: Callable[[str], None] | None, *, dry_run: bool) -> None:
    """For each chain, a synthetic full of its oldest kept incremental, which then stands in for
    it as the parent of the newer ones: the images before it are no longer needed. A chain that
    cannot be consolidated (a parent missing or damaged) is said and kept as it is."""
    kept = sorted((by_id[i] for i in keep if i in by_id), key=_when)
    done: set[str] = set()
    for record in kept:
        if record.kind != "incremental" or record.id in done:
            continue
        chain = _chain_ids(record, by_id)
        if any(c in keep for c in chain[1:]):
            continue          # an older image of its chain is kept anyway: nothing to gain
        path = _file(catalog, record.id)
        if path is None:
            if on_notice is not None:
                on_notice(f"{record.id[:12]} is kept with its chain as it is: it is on tape, and --consolidate "
                          f"rebuilds chains of image files only")
            done.update(chain)
            continue
        done.update(chain)
        if dry_run:
            result.replaced.append(record.id)
            continue
        output = os.path.splitext(path)[0] + ".full.zst"
        try:
            made = consolidate(path, Destination(output=output), catalog=catalog, on_notice=on_notice)
        except ImagerError as e:
            if on_notice is not None:
                on_notice(f"{record.id[:12]} ({path}) is kept with its chain as it is: it cannot be rebuilt as a "
                          f"synthetic full: {e}")
            continue
        keep[made.image_id] = f"{keep.pop(record.id)}, as a synthetic full of {record.id[:12]}"
        result.consolidated.append(made.image_id)
        result.replaced.append(record.id)


def _chain_ids(record: ImageRecord, by_id: dict[str, ImageRecord]) -> list[str]:
    ids = [record.id]
    while record.kind == "incremental" and record.parent_id in by_id:
        record = by_id[record.parent_id]
        ids.append(record.id)
    return ids


def _files(catalog: Catalog, image_id: str) -> list[str]:
    return [path for path in catalog.file_paths(image_id) if os.path.exists(path)]


def _file(catalog: Catalog, image_id: str) -> str | None:
    return next(iter(_files(catalog, image_id)), None)


def _remove(catalog: Catalog, record: ImageRecord) -> list[str]:
    deleted = _files(catalog, record.id)
    for path in deleted:
        os.unlink(path)
    catalog.remove_image(record.id)
    log.info("pruned image %s%s", record.id[:12], f" ({', '.join(deleted)})" if deleted else "")
    return deleted


@dataclass
class CheckProblem:
    image_id: str
    problem: str

    def to_dict(self) -> dict:
        return {"image_id": self.image_id, "problem": self.problem}


def check(catalog: Catalog) -> tuple[int, list[CheckProblem]]:
    """Every image's file is there and is the image the catalog recorded; every incremental's
    parent is known. Reads headers and trailers only (imager verify reads everything)."""
    problems = []
    images = catalog.images()
    known = {r.id for r in images} | {r.replaces for r in images if r.replaces}
    for record in images:
        for segment in catalog.segments(record.id):
            if segment.kind != "file":
                continue
            problem = _file_problem(segment.path or "", record)
            if problem:
                problems.append(CheckProblem(record.id, problem))
        if record.kind == "incremental" and record.parent_id not in known:
            problems.append(CheckProblem(record.id, f"its parent {str(record.parent_id)[:12]} is not in the catalog"))
    return len(images), problems


def _file_problem(path: str, record: ImageRecord) -> str:
    if not os.path.exists(path):
        return f"{path} is missing"
    try:
        with ImageReader(path) as reader:
            if reader.header.image_id != record.id:
                return f"{path} now holds another image ({reader.header.image_id[:12]})"
            if reader.trailer.totals.get("image_digest") != record.image_digest:
                return f"{path} was changed: its digest is not the one recorded"
    except ImagerError as e:
        return str(e)
    return ""
