"""Backup chains: finding an incremental's parents (the catalog, else the image's directory),
opening a chain point, and choosing the parent of a new incremental."""

from __future__ import annotations

import glob
import json
import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

from ..catalog import Catalog, ImageRecord
from ..errors import ImageFormatError, ImagerError, UsageError
from ..format import FORMAT_VERSION, ImageHeader, ImageReader, ImageTrailer, read_header
from ..format.chain import Chain, check_link

Notice = Callable[[str], None]

log = logging.getLogger("imager.chains")


@dataclass
class ParentImage:
    """What an incremental needs of its parent: its header and its trailer's block digests and
    maps, read from its file, or from the catalog for an image on tape."""

    header: ImageHeader
    trailer: ImageTrailer
    where: str


def _file_of(record_id: str, catalog: Catalog | None) -> str | None:
    """The file of an image in the catalog, or of a synthetic full standing in for it."""
    if catalog is None:
        return None
    for image_id in [record_id] + [r.id for r in catalog.standing_in_for(record_id)]:
        for path in catalog.file_paths(image_id):
            if os.path.exists(path):
                return path
    return None


def _header_ids(path: str) -> tuple[str, ...]:
    """The image id of a file, and the chain point it stands for if it is a synthetic full."""
    try:
        with open(path, "rb") as f:
            header = read_header(f)[0]
    except (OSError, ImageFormatError):
        return ()
    return (header.image_id, *(header.chain.get("consolidated") or [])[:1])


def locate_image(image_id: str, *, catalog: Catalog | None, near: str | None, name: str = "") -> str | None:
    """The file of image `image_id`: where the catalog says, else in the directory `near` (by
    the name it had, then any *.zst there)."""
    found = _file_of(image_id, catalog)
    if found:
        return found
    if near is None:
        return None
    candidates = ([os.path.join(near, name)] if name else []) + sorted(glob.glob(os.path.join(near, "*.zst")))
    for path in candidates:
        if os.path.isfile(path) and image_id in _header_ids(path):
            return path
    return None


def open_chain(image: str | ImageReader, stack: ExitStack, *, catalog: Catalog | None = None) -> Chain:
    """The chain point of the image file `image` (or of the reader open on it): it and its
    parents back to a full, each link checked; the readers opened here are closed with `stack`."""
    readers = [image if isinstance(image, ImageReader) else stack.enter_context(ImageReader(image))]
    directory = os.path.dirname(os.path.abspath(readers[0].path))
    while readers[-1].header.incremental:
        child = readers[-1]
        link = child.header.chain["parent"]
        path = locate_image(link["id"], catalog=catalog, near=directory, name=link.get("name", ""))
        if path is None:
            recorded = catalog.file_paths(link["id"]) if catalog is not None else []
            where = (f"the catalog has it at {', '.join(recorded)}, which is missing, and it is not in {directory}"
                     if recorded else f"not in the catalog and not in {directory}")
            raise ImagerError(f"{child.path}: its parent image {link['id'][:12]} ({link.get('name') or 'no name'}) "
                              f"is missing: {where}")
        parent = stack.enter_context(ImageReader(path))
        check_link(child.header, parent.header, parent.trailer, path)
        if len(readers) > 1000:
            raise ImageFormatError(f"{readers[0].path}: its chain has more than 1000 images (a loop?)")
        readers.append(parent)
    return Chain(readers)


def find_parent(volume_key: str, volume_size: int, block_size: int, *, parent_ref: str | None,
                catalog: Catalog | None, search_dir: str | None, on_notice: Notice) -> ParentImage | None:
    """The parent of a new incremental: `parent_ref` (an image file or a catalog id), else the
    newest image of the volume in the catalog whose file or table is reachable. None: take a full."""
    if parent_ref is not None:
        parent = _named_parent(parent_ref, catalog)
    else:
        if catalog is None:
            raise UsageError("--incremental finds its parent in the catalog: give --parent IMAGE without one")
        parent = None
        for record in catalog.images_of_volume(volume_key):
            parent = _parent_from_record(record, catalog)
            if parent is not None:
                break
            on_notice(f"the image {record.id[:12]} of {record.created} is in the catalog but neither its file "
                      f"nor its block table can be read: not a parent")
        if parent is None:
            on_notice("no earlier image of this volume in the catalog: taking a full image")
            return None
    if parent.header.format < FORMAT_VERSION:
        on_notice(f"the parent {parent.header.image_id[:12]} is a version {parent.header.format} image, which "
                  f"records no block maps: taking a full image")
        return None
    geometry = (parent.header.volume_size, parent.header.block_size)
    if geometry != (volume_size, block_size):
        on_notice(f"the parent {parent.header.image_id[:12]} is of a {geometry[0]}-byte volume in {geometry[1]}-byte "
                  f"blocks, this one {volume_size} in {block_size}: taking a full image")
        return None
    problem = _chain_problem(parent, catalog)
    if problem:
        on_notice(f"the parent {parent.header.image_id[:12]} cannot be restored ({problem}): taking a full image")
        return None
    return parent


def _named_parent(parent_ref: str, catalog: Catalog | None) -> ParentImage:
    if os.path.exists(parent_ref):
        with ImageReader(parent_ref) as reader:
            return ParentImage(reader.header, reader.trailer, parent_ref)
    if catalog is None:
        raise UsageError(f"--parent {parent_ref}: no such image file")
    parent = _parent_from_record(catalog.image(parent_ref), catalog)
    if parent is None:
        raise UsageError(f"--parent {parent_ref}: neither the image's file nor its block table can be read")
    return parent


def _parent_from_record(record: ImageRecord, catalog: Catalog) -> ParentImage | None:
    path = _file_of(record.id, catalog)
    if path is not None:
        try:
            with ImageReader(path) as reader:
                if record.id in (reader.header.image_id, *(reader.header.chain.get("consolidated") or [])[:1]):
                    return ParentImage(reader.header, reader.trailer, path)
        except ImagerError as e:
            log.info("%s: not usable as a parent: %s", path, e)
        return None
    return _parent_from_table(record, catalog)


def _parent_from_table(record: ImageRecord, catalog: Catalog) -> ParentImage | None:
    """An image on tape, from the copy of its trailer's tables the catalog keeps."""
    table = catalog.block_table(record.id)
    if table is None or record.snapshot is None:
        return None
    header = _header_from_record(record)
    digests, used_any, used_full = table
    trailer = ImageTrailer(digests, {"image_digest": record.image_digest}, used_any, used_full, None,
                           header.chunk_size, header.chunk_blocks)
    return ParentImage(header, trailer, f"catalog {record.id[:12]}")


def _header_from_record(record: ImageRecord) -> ImageHeader:
    header = ImageHeader(volume_size=record.volume_size, chunk_size=record.chunk_size, image_id=record.id,
                         level=record.level, kind=record.kind)
    header.chain = {"tracker": {"series": record.series, "sequence": record.sequence}} if record.series else {}
    if record.parent_id:
        header.chain["parent"] = {"id": record.parent_id}
    header.snapshot = json.loads(record.snapshot) if record.snapshot else {}
    return header


def _chain_problem(parent: ParentImage, catalog: Catalog | None) -> str:
    """Why the parent's own chain cannot be followed back to a full ('' when it can)."""
    header = parent.header
    seen = 0
    while header.incremental:
        link = header.chain.get("parent") or {}
        if not link.get("id"):
            return "it does not name its parent"
        path = locate_image(link["id"], catalog=catalog, near=os.path.dirname(os.path.abspath(parent.where))
                            if os.path.exists(parent.where) else None, name=link.get("name", ""))
        if path is not None:
            with open(path, "rb") as f:
                header = read_header(f)[0]
        elif catalog is not None and catalog.block_table(link["id"]) is not None:
            # On tape: restore reads it from there; its own parent is in its catalog record.
            header = _header_from_record(catalog.image(link["id"]))
        else:
            return f"its parent {link['id'][:12]} is missing"
        seen += 1
        if seen > 1000:
            return "its chain has more than 1000 images"
    return ""
