"""The catalog: a SQLite record of images and where each piece of them lives.

An image has one or more segments: an image file holds the whole stream in one segment; on
tape each cartridge the image touches holds one segment in one tape file. `tape scan` can
rebuild every tape entry from the media alone, so the catalog is an index, never the only copy.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import ImagerError, UsageError
from .private import check_not_under_dev, check_private_path

SCHEMA_VERSION = 2
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
    snapshot      TEXT,
    kind          TEXT NOT NULL DEFAULT 'full',
    parent_id     TEXT,              -- an incremental's parent (no foreign key: it may be pruned)
    method        TEXT,              -- an incremental's: tracker | digest
    volume        TEXT,              -- which volume, across backups
    series        TEXT,              -- the change tracker's series and sequence at its snapshot
    sequence      INTEGER,
    snapshot_time TEXT,
    replaces      TEXT               -- a synthetic full: the chain point it stands for
);
CREATE TABLE IF NOT EXISTS segments (
    image_id      TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    segment       INTEGER NOT NULL,  -- 0, 1, ... in stream order
    kind          TEXT NOT NULL CHECK (kind IN ('file', 'tape')),
    path          TEXT,
    tape_label    TEXT,
    tape_set      TEXT,
    tape_file     INTEGER,
    stream_offset INTEGER NOT NULL,
    stream_length INTEGER NOT NULL,
    PRIMARY KEY (image_id, segment, kind)
);
-- The parent state of images on tape (block digests and the filesystem's use of each block),
-- so that an incremental can be taken against a full on tape without reading the tape.
CREATE TABLE IF NOT EXISTS block_tables (
    image_id      TEXT PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
    digests       BLOB NOT NULL,
    used_any      BLOB NOT NULL,
    used_full     BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS tapes (
    label         TEXT PRIMARY KEY,
    tape_set      TEXT NOT NULL,
    sequence      INTEGER NOT NULL,  -- the cartridge's number in its set, from 1
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
    kind: str = "full"
    parent_id: str | None = None
    method: str | None = None
    volume: str | None = None
    series: str | None = None
    sequence: int | None = None
    snapshot_time: str | None = None
    replaces: str | None = None


# What version 1 catalogs lack: added in place (every image then is a full, as it was).
MIGRATE_1_TO_2 = """
ALTER TABLE images ADD COLUMN kind TEXT NOT NULL DEFAULT 'full';
ALTER TABLE images ADD COLUMN parent_id TEXT;
ALTER TABLE images ADD COLUMN method TEXT;
ALTER TABLE images ADD COLUMN volume TEXT;
ALTER TABLE images ADD COLUMN series TEXT;
ALTER TABLE images ADD COLUMN sequence INTEGER;
ALTER TABLE images ADD COLUMN snapshot_time TEXT;
ALTER TABLE images ADD COLUMN replaces TEXT;
CREATE TABLE IF NOT EXISTS block_tables (
    image_id      TEXT PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
    digests       BLOB NOT NULL,
    used_any      BLOB NOT NULL,
    used_full     BLOB NOT NULL
);
"""


@dataclass(frozen=True)
class SegmentRecord:
    image_id: str
    segment: int
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


def _sqlite_errors_reported(method):
    """A catalog that cannot be read or written (locked, damaged, not a database) is a one-line
    error for the user, not a traceback."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as e:
            raise ImagerError(f"catalog {self.path}: {e}") from None
    return wrapper


class Catalog:
    def __init__(self, path: str | os.PathLike | None = None, *, must_exist: bool = False):
        """`must_exist`: a catalog to read (a path typed by hand), never created by opening it."""
        self.path = Path(os.path.abspath(path)) if path else default_path()
        check_not_under_dev(str(self.path), "--catalog")
        check_private_path(str(self.path), "catalog")
        if must_exist and not self.path.exists():
            raise UsageError(f"{self.path}: no catalog there (a backup creates one; check --catalog)")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Created 0600 before SQLite opens it: the catalog says where every volume's data is.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
            self._db = sqlite3.connect(self.path, timeout=30)
            self._db.execute("PRAGMA foreign_keys = ON")
            fresh = not self._db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone()
            if fresh:
                # One transaction: a process killed half-way leaves an empty file, not tables
                # without a version.
                self._db.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 1:
                self._db.executescript(f"BEGIN; {MIGRATE_1_TO_2} PRAGMA user_version = 2; COMMIT;")
                version = 2
        except (OSError, sqlite3.Error) as e:
            raise UsageError(f"cannot open the catalog {self.path}: {e}") from None
        if version != SCHEMA_VERSION:
            self._db.close()
            raise UsageError(f"the catalog {self.path} has layout version {version}, this imager uses "
                             f"{SCHEMA_VERSION}; rebuild it with imager tape scan, or give another --catalog")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _upsert(self, table: str, record, key: tuple[str, ...]) -> None:
        # An update in place: INSERT OR REPLACE would delete the old row first, and with it
        # (ON DELETE CASCADE) every segment of an image.
        cols = _columns(type(record))
        updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c not in key)
        self._db.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
                         f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}",
                         [getattr(record, c) for c in cols])

    @_sqlite_errors_reported
    def add_image(self, image: ImageRecord, segments: list[SegmentRecord], *,
                  replaces_tape_files: bool = False) -> None:
        """Record an image and where its segments are. With `replaces_tape_files` (the image was
        just written to tape), images that had a segment in one of its tape files or after it on
        the same cartridge are dropped first: writing a tape file erases everything after it."""
        with self._db:
            if replaces_tape_files:
                for s in segments:
                    self._db.execute(
                        "DELETE FROM images WHERE id != ? AND id IN (SELECT image_id FROM segments WHERE "
                        "kind = 'tape' AND tape_set = ? AND tape_label = ? AND tape_file >= ?)",
                        (image.id, s.tape_set, s.tape_label, s.tape_file))
            for s in segments:
                if s.kind == "file" and s.path:
                    # The file now holds this image: the one it held before is gone.
                    self._db.execute("DELETE FROM images WHERE id != ? AND id IN (SELECT image_id FROM segments "
                                     "WHERE kind = 'file' AND path = ?)", (image.id, s.path))
            self._upsert("images", image, ("id",))
            for s in segments:
                self._upsert("segments", s, ("image_id", "segment", "kind"))

    @_sqlite_errors_reported
    def add_tape(self, tape: TapeRecord) -> None:
        with self._db:
            self._upsert("tapes", tape, ("label",))

    @_sqlite_errors_reported
    def forget_tape(self, label: str) -> None:
        """Drop what the catalog says a tape holds (before re-labelling or re-scanning it)."""
        with self._db:
            self._db.execute("DELETE FROM segments WHERE tape_label = ?", (label,))
            self._db.execute("DELETE FROM images WHERE id NOT IN (SELECT image_id FROM segments)")
            self._db.execute("DELETE FROM tapes WHERE label = ?", (label,))

    @_sqlite_errors_reported
    def images(self) -> list[ImageRecord]:
        cur = self._db.execute(f"SELECT {', '.join(_columns(ImageRecord))} FROM images ORDER BY created, id")
        return [ImageRecord(*row) for row in cur]

    @_sqlite_errors_reported
    def image(self, image_id: str) -> ImageRecord:
        rows = self._db.execute(f"SELECT {', '.join(_columns(ImageRecord))} FROM images "
                                "WHERE substr(id, 1, ?) = ?", (len(image_id), image_id)).fetchall()
        if not rows:
            raise UsageError(f"no image {image_id!r} in the catalog {self.path}")
        if len(rows) > 1:
            raise UsageError(f"image id {image_id!r} is ambiguous: it starts {len(rows)} image ids")
        return ImageRecord(*rows[0])

    @_sqlite_errors_reported
    def images_of_volume(self, volume: str) -> list[ImageRecord]:
        """The images of one volume, newest snapshot first."""
        cur = self._db.execute(f"SELECT {', '.join(_columns(ImageRecord))} FROM images WHERE volume = ? "
                               "ORDER BY COALESCE(snapshot_time, created) DESC, created DESC", (volume,))
        return [ImageRecord(*row) for row in cur]

    @_sqlite_errors_reported
    def standing_in_for(self, image_id: str) -> list[ImageRecord]:
        """Synthetic fulls of the chain point `image_id` (which can take its place as a parent)."""
        cur = self._db.execute(f"SELECT {', '.join(_columns(ImageRecord))} FROM images WHERE replaces = ?",
                               (image_id,))
        return [ImageRecord(*row) for row in cur]

    def file_paths(self, image_id: str) -> list[str]:
        """Where the image's file segments are recorded (whether the files are there now or not)."""
        return [s.path for s in self.segments(image_id) if s.kind == "file" and s.path]

    @_sqlite_errors_reported
    def children(self, image_id: str) -> list[ImageRecord]:
        cur = self._db.execute(f"SELECT {', '.join(_columns(ImageRecord))} FROM images WHERE parent_id = ?",
                               (image_id,))
        return [ImageRecord(*row) for row in cur]

    @_sqlite_errors_reported
    def add_block_table(self, image_id: str, digests: bytes, used_any: bytes, used_full: bytes) -> None:
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO block_tables (image_id, digests, used_any, used_full) "
                             "VALUES (?, ?, ?, ?)", (image_id, digests, used_any, used_full))

    @_sqlite_errors_reported
    def block_table(self, image_id: str) -> tuple[bytes, bytes, bytes] | None:
        row = self._db.execute("SELECT digests, used_any, used_full FROM block_tables WHERE image_id = ?",
                               (image_id,)).fetchone()
        return None if row is None else (bytes(row[0]), bytes(row[1]), bytes(row[2]))

    @_sqlite_errors_reported
    def remove_image(self, image_id: str) -> None:
        with self._db:
            self._db.execute("DELETE FROM images WHERE id = ?", (image_id,))

    @_sqlite_errors_reported
    def segments(self, image_id: str) -> list[SegmentRecord]:
        cur = self._db.execute(f"SELECT {', '.join(_columns(SegmentRecord))} FROM segments "
                               "WHERE image_id = ? ORDER BY kind, segment", (image_id,))
        return [SegmentRecord(*row) for row in cur]


def record_dict(record) -> dict:
    return asdict(record)
