"""The catalog: a SQLite record of images and where each piece of them lives.

An image has one or more segments: an image file holds the whole stream in one segment; on
tape each cartridge the image touches holds one segment in one tape file. `tape scan` can
rebuild every tape entry from the media alone, so the catalog is an index, never the only copy.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import UsageError

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id            TEXT PRIMARY KEY,
    created       TEXT NOT NULL,
    source        TEXT NOT NULL,
    fs_type       TEXT,
    volume_size   INTEGER NOT NULL,
    chunk_size    INTEGER NOT NULL,
    chunks        INTEGER NOT NULL,
    level         INTEGER NOT NULL,
    stream_bytes  INTEGER NOT NULL,
    image_digest  TEXT NOT NULL,
    snapshot      TEXT
);
CREATE TABLE IF NOT EXISTS segments (
    image_id      TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    sequence      INTEGER NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('file', 'tape')),
    path          TEXT,
    tape_label    TEXT,
    tape_set      TEXT,
    tape_file     INTEGER,
    stream_offset INTEGER NOT NULL,
    stream_length INTEGER NOT NULL,
    PRIMARY KEY (image_id, sequence, kind)
);
CREATE TABLE IF NOT EXISTS tapes (
    label         TEXT PRIMARY KEY,
    tape_set      TEXT NOT NULL,
    sequence      INTEGER NOT NULL,
    created       TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class ImageRecord:
    id: str
    created: str
    source: str
    fs_type: str | None
    volume_size: int
    chunk_size: int
    chunks: int
    level: int
    stream_bytes: int
    image_digest: str
    snapshot: str | None


@dataclass(frozen=True)
class SegmentRecord:
    image_id: str
    sequence: int
    kind: str
    path: str | None
    tape_label: str | None
    tape_set: str | None
    tape_file: int | None
    stream_offset: int
    stream_length: int


@dataclass(frozen=True)
class TapeRecord:
    label: str
    tape_set: str
    sequence: int
    created: str


def default_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "imager" / "catalog.sqlite"


def _columns(cls) -> list[str]:
    return [f.name for f in fields(cls)]


class Catalog:
    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path)
        except (OSError, sqlite3.Error) as e:
            raise UsageError(f"cannot open the catalog {self.path}: {e}") from None
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _upsert(self, table: str, record) -> None:
        cols = _columns(type(record))
        self._db.execute(f"INSERT OR REPLACE INTO {table} ({', '.join(cols)}) VALUES "
                         f"({', '.join('?' * len(cols))})", [getattr(record, c) for c in cols])

    def add_image(self, image: ImageRecord, segments: list[SegmentRecord]) -> None:
        with self._db:
            self._upsert("images", image)
            for s in segments:
                self._upsert("segments", s)

    def add_tape(self, tape: TapeRecord) -> None:
        with self._db:
            self._upsert("tapes", tape)

    def forget_tape(self, label: str) -> None:
        """Drop what the catalog says a tape holds (before re-labelling or re-scanning it)."""
        with self._db:
            self._db.execute("DELETE FROM segments WHERE tape_label = ?", (label,))
            self._db.execute("DELETE FROM images WHERE id NOT IN (SELECT image_id FROM segments)")
            self._db.execute("DELETE FROM tapes WHERE label = ?", (label,))

    def images(self) -> list[ImageRecord]:
        cur = self._db.execute(f"SELECT {', '.join(_columns(ImageRecord))} FROM images ORDER BY created, id")
        return [ImageRecord(*row) for row in cur]

    def image(self, image_id: str) -> ImageRecord:
        rows = self._db.execute(f"SELECT {', '.join(_columns(ImageRecord))} FROM images WHERE id LIKE ?",
                                (image_id + "%",)).fetchall()
        if not rows:
            raise UsageError(f"no image {image_id!r} in the catalog {self.path}")
        if len(rows) > 1:
            raise UsageError(f"image id {image_id!r} is ambiguous: it starts {len(rows)} image ids")
        return ImageRecord(*rows[0])

    def segments(self, image_id: str) -> list[SegmentRecord]:
        cur = self._db.execute(f"SELECT {', '.join(_columns(SegmentRecord))} FROM segments "
                               "WHERE image_id = ? ORDER BY kind, sequence", (image_id,))
        return [SegmentRecord(*row) for row in cur]

    def tapes(self) -> list[TapeRecord]:
        cur = self._db.execute(f"SELECT {', '.join(_columns(TapeRecord))} FROM tapes ORDER BY tape_set, sequence")
        return [TapeRecord(*row) for row in cur]

    def tape_segments(self, label: str) -> list[SegmentRecord]:
        cur = self._db.execute(f"SELECT {', '.join(_columns(SegmentRecord))} FROM segments "
                               "WHERE tape_label = ? ORDER BY tape_file", (label,))
        return [SegmentRecord(*row) for row in cur]


def record_dict(record) -> dict:
    return asdict(record)
