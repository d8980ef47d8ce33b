"""A chain point: an incremental image and its parents back to a full, read as one volume.

Each block comes from the newest image of the chain that holds it (its `owner`); a region of
the volume (one of the full's chunks) is assembled from the full's chunk and the newer blocks,
and every block is checked against the chain point's own digests, so a restore or verify of a
chain point proves the volume it gives is the one that was backed up.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ChunkError, ImageFormatError
from .blocks import DIGEST_SIZE, unpack_bits, zero_block_digests
from .codec import Codec, codec_of, zero_frame
from .meta import ImageHeader, ImageTrailer
from .reader import ImageReader


def check_link(child: ImageHeader, parent: ImageHeader, parent_trailer: ImageTrailer, where: str) -> None:
    """Raise unless `parent` is the image `child` was taken against."""
    link = child.chain.get("parent") or {}
    stands_for = (parent.chain.get("consolidated") or [None])[0]      # a synthetic full of the parent
    if link.get("id") not in (parent.image_id, stands_for):
        raise ImageFormatError(f"{where} is image {parent.image_id[:12]}, not the parent "
                               f"{str(link.get('id'))[:12]} that image {child.image_id[:12]} needs")
    if link.get("digest") != parent_trailer.totals.get("image_digest"):
        raise ImageFormatError(f"{where}: image {parent.image_id[:12]} is not the one image {child.image_id[:12]} "
                               f"was taken against (its digest differs)")
    if (parent.volume_size, parent.block_size) != (child.volume_size, child.block_size):
        raise ImageFormatError(f"{where}: image {parent.image_id[:12]} is of another volume geometry")


class Chain:
    """The images of a chain point, newest first, the last a full; links already checked."""

    def __init__(self, images: Sequence[ImageReader]):
        if not images or images[-1].header.incremental:
            raise ImageFormatError("a chain ends with a full image")
        self.images = list(images)
        self.point = images[0]
        self.header = self.point.header
        self.trailer = self.point.trailer
        self.base = images[-1]
        self.block_size = self.header.block_size
        self.region_size = self.base.header.chunk_size
        self.region_blocks = self.region_size // self.block_size
        self.region_count = self.base.header.chunk_count
        owner = np.full(self.header.block_count, len(images) - 1, dtype=np.int16)
        for position in range(len(images) - 2, -1, -1):
            held = unpack_bits(images[position].trailer.held or b"", self.header.block_count)
            owner[held] = position
        self.owner = owner
        self._check_tables()

    def _check_tables(self) -> None:
        """The chain point's digest of every block must be the one of the image the block comes
        from: then checking each frame against its own image proves the assembled volume."""
        n = self.header.block_count
        point = np.frombuffer(self.trailer.digests, dtype=np.uint8).reshape(n, DIGEST_SIZE)
        for position, image in enumerate(self.images[1:], start=1):
            mine = self.owner == position
            theirs = np.frombuffer(image.trailer.digests, dtype=np.uint8).reshape(n, DIGEST_SIZE)
            differ = np.flatnonzero(mine & (theirs != point).any(axis=1))
            if differ.size:
                raise ImageFormatError(
                    f"the chain of image {self.header.image_id[:12]} is inconsistent: block {int(differ[0])} "
                    f"comes from image {image.header.image_id[:12]} whose digest of it differs from the chain "
                    f"point's")

    def region_length(self, region: int) -> int:
        return self.base.header.chunk_length(region)

    def region_owners(self, region: int) -> np.ndarray:
        return self.owner[region * self.region_blocks:(region + 1) * self.region_blocks]

    def expected(self, region: int) -> bytes:
        """The chain point's digests of the region's blocks."""
        first = region * self.region_blocks
        return self.trailer.digests[first * DIGEST_SIZE:(first + self.region_blocks) * DIGEST_SIZE]

    def untouched(self, region: int) -> bool:
        """Whether every block of the region comes from the full (its frame can be copied)."""
        return bool((self.region_owners(region) == len(self.images) - 1).all())

    def region_into(self, region: int, dst: memoryview) -> bool:
        """The region's bytes at the chain point into `dst` (the region's length), allocating
        nothing: False if the region is all zeros, `dst` then not necessarily written. Every frame
        is checked against its own image's digests (which _check_tables tied to the point's)."""
        owners = self.region_owners(region)
        from_base = owners == len(self.images) - 1
        image = self.base
        try:
            if from_base.all():
                return self.base.chunk_into(region, dst)
            if not (from_base.any() and self.base.chunk_into(region, dst)):
                dst[:] = bytes(len(dst))
            first = region * self.region_blocks
            for offset in np.flatnonzero(~from_base).tolist():
                block = first + offset
                image = self.images[int(owners[offset])]
                piece = dst[offset * self.block_size:min((offset + 1) * self.block_size, len(dst))]
                if not image.chunk_into(block, piece):
                    piece[:] = bytes(len(piece))
        except ChunkError as e:
            # Which of the chain's files holds the damage (a chunk number alone does not say).
            if len(self.images) > 1 and not e.image:
                raise e.of_image(image.path) from None
            raise
        return self.expected(region) != zero_block_digests(len(dst), self.block_size)

    def frame_or_none(self, region: int) -> bytes | None:
        """The full's compressed frame of an untouched region, to copy as it is (None otherwise)."""
        if not self.untouched(region):
            return None
        return self.base.frame(region)

    def zero_frame(self, length: int) -> bytes:
        return zero_frame(length, self.base.header.level)

    @property
    def codec(self) -> Codec:
        return codec_of(self.base.header)
