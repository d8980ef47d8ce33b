"""What the jobs return: results with a to_dict() for --json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

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

    @property
    def ratio(self) -> float:
        return self.volume_size / self.bytes_written if self.bytes_written else 0.0

    @property
    def mb_per_second(self) -> float:
        return self.volume_size / self.seconds / 1e6 if self.seconds else 0.0

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("header", "block_table")}
        return dict(d, ratio=round(self.ratio, 3), mb_per_second=round(self.mb_per_second, 1))


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
    chain: list[str] | None = None       # an incremental's: the image ids it came from, newest first

    @property
    def mb_per_second(self) -> float:
        return self.volume_size / self.seconds / 1e6 if self.seconds else 0.0

    def to_dict(self) -> dict:
        return dict(asdict(self), mb_per_second=round(self.mb_per_second, 1))


@dataclass
class VerifyResult:
    image: str
    volume_size: int
    chunks: int
    zero_chunks: int
    seconds: float
    ok: bool = True
    errors: list[str] = field(default_factory=list)
    chain: list[str] | None = None       # an incremental's: every image checked, newest first

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ImageInfo:
    """What an image holds: where it was read, its size, its header and its trailer's totals."""

    image: str
    file_size: int
    header: ImageHeader
    totals: dict
    ratio: float

    def to_dict(self) -> dict:
        return {"image": self.image, "file_size": self.file_size, "header": self.header.to_dict(),
                "totals": self.totals, "ratio": self.ratio}
