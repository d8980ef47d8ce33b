"""What the jobs return: results with a to_dict() for --json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .. import views
from ..format import ImageHeader


@dataclass
class BackupResult:
    image_id: str
    image: str
    source: str
    volume_size: int
    chunks: int
    zero_chunks: int
    bytes_read: int
    bytes_written: int
    seconds: float
    level: int
    chunk_size: int
    image_digest: str
    header: ImageHeader = field(repr=False)
    freeze_window_ms: float | None = None
    kind: str = "full"                   # full | incremental
    parent_id: str | None = None
    method: str | None = None            # an incremental's: tracker | digest
    reason: str = ""                     # why this kind and method
    changed_blocks: int | None = None    # an incremental's blocks written
    compared_blocks: int | None = None   # and blocks read and compared
    # The trailer's block digests and maps (the catalog keeps them for images on tape).
    block_table: tuple[bytes, bytes, bytes] | None = field(default=None, repr=False)
    segments: list[dict] = field(default_factory=list)   # where the stream went (views.segment)

    @property
    def image_bytes(self) -> int:
        """The JSON's name (views.py) for the compressed stream's size."""
        return self.bytes_written

    @property
    def content_digest(self) -> str:
        return self.image_digest

    @property
    def ratio(self) -> float:
        return self.volume_size / self.bytes_written if self.bytes_written else 0.0

    @property
    def mb_per_second(self) -> float:
        return self.volume_size / self.seconds / 1e6 if self.seconds else 0.0

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items()
             if k not in ("header", "block_table", "bytes_written", "image_digest")}
        return dict(d, image_bytes=self.bytes_written, content_digest=self.image_digest,
                    ratio=round(self.ratio, 3), mb_per_second=round(self.mb_per_second, 1))


@dataclass
class RestoreResult:
    image: str
    target: str
    volume_size: int
    chunks: int
    zero_chunks: int
    bytes_written: int
    seconds: float
    verified: bool
    chain: list[str] = field(default_factory=list)   # the image ids read, the point first, back to its full

    @property
    def mb_per_second(self) -> float:
        return self.volume_size / self.seconds / 1e6 if self.seconds else 0.0

    def to_dict(self) -> dict:
        return dict(asdict(self), image_id=self.chain[0] if self.chain else None,
                    mb_per_second=round(self.mb_per_second, 1))


@dataclass
class VerifyResult:
    image: str
    volume_size: int
    chunks: int
    zero_chunks: int
    seconds: float
    ok: bool = True
    errors: list[str] = field(default_factory=list)
    chain: list[str] = field(default_factory=list)   # every image checked, the point first, back to its full
    image_id: str | None = None

    def to_dict(self) -> dict:
        return dict(asdict(self), image_id=self.image_id or (self.chain[0] if self.chain else None))


@dataclass
class ImageInfo:
    """What an image holds: where it was read, its size, its header and its trailer's totals."""

    image: str
    file_size: int
    header: ImageHeader
    totals: dict
    ratio: float

    def to_dict(self) -> dict:
        # The header and the trailer's totals are shown as the image stores them (a format, with
        # its own names: the totals' image_digest is the content_digest of the other commands).
        return {"image": self.image, "image_id": self.header.image_id, "image_bytes": self.file_size,
                "header": self.header.to_dict(), "totals": self.totals, "ratio": self.ratio}


@dataclass
class MountedEntry:
    """One part of a mounted image: a filesystem mounted read-only, or the file of the bytes of
    one the kernel cannot mount."""

    name: str                   # "" for a filesystem mounted at the directory itself, "2-root" in a disk
    path: str                   # where it is
    how: str                    # "mounted" or "file"
    fs_type: str | None
    label: str | None
    partition: int | None       # its partition number in a whole-disk image
    offset: int                 # where its bytes start in the volume
    size: int
    device: str | None = None   # the read-only loop device it is mounted from
    options: str | None = None  # the mount options
    file: str = ""              # the served file of its bytes
    reason: str = ""            # why it is a file, not mounted


@dataclass
class MountInfo:
    directory: str
    image: str                  # the image (chain point) mounted
    images: list[str]           # it and its parents back to the full
    state: str                  # mounted | starting | stopping | failed (its daemon is gone)
    pid: int | None
    log_path: str               # its daemon's log; once unmounted, where it was kept ("": it told of no problem)
    volume_file: str            # the whole volume, served read-only
    entries: list[MountedEntry] = field(default_factory=list)
    problem: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        for entry in d["entries"]:
            entry["fstype"] = entry.pop("fs_type")
        return d


@dataclass
class FileEntry:
    """A file in an image, as `imager ls` shows it."""

    name: str
    type: str                   # file, dir, symlink, char, block, fifo, socket
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    nlink: int
    target: str | None = None   # a symlink's
    fs_type: str | None = None  # an entry of a whole disk's view: its filesystem
    label: str | None = None
    partition: int | None = None
    note: str = ""              # an entry shown as a file: why

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fstype"] = d.pop("fs_type")
        d["mtime"] = views.iso_time_ns(d.pop("mtime_ns"))
        d.update(views.name_fields("name", self.name), **views.name_fields("target", self.target))
        return d


@dataclass
class ExtractResult:
    image: str
    dest: str
    copied: list[dict]          # per path: path, to, entries, bytes
    seconds: float

    @property
    def entries(self) -> int:
        return sum(c["entries"] for c in self.copied)

    @property
    def bytes(self) -> int:
        return sum(c["bytes"] for c in self.copied)

    def to_dict(self) -> dict:
        copied = [dict(c, **views.name_fields("path", c["path"]), **views.name_fields("to", c["to"]))
                  for c in self.copied]
        return dict(asdict(self), copied=copied, entries=self.entries, bytes=self.bytes)
