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

    @property
    def ratio(self) -> float:
        return self.volume_size / self.bytes_written if self.bytes_written else 0.0

    @property
    def mb_per_second(self) -> float:
        return self.volume_size / self.seconds / 1e6 if self.seconds else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["header"]
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
