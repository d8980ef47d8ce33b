"""Which byte ranges of a volume its filesystem uses: the backup reads those and writes every
other byte as zeros, so free space costs neither reading nor compression. A `UsedMap` is a
value: sorted, merged [start, end) ranges and how they were found (mode, reason, fs type);
imager.plan.planner makes them."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

USED_BLOCKS = "used-blocks"
ALL_BLOCKS = "all-blocks"

Range = tuple[int, int]  # [start, end) in bytes


def _normalised(starts: np.ndarray, ends: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Clip ranges to [0, size), drop empty ones, sort, and merge overlapping or touching ones."""
    starts = np.clip(np.asarray(starts, dtype=np.int64), 0, size)
    ends = np.clip(np.asarray(ends, dtype=np.int64), 0, size)
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if starts.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)
    # A range opens a new merged run when it starts beyond everything before it reaches.
    opens = np.empty(starts.size, dtype=bool)
    opens[0] = True
    opens[1:] = starts[1:] > reach[:-1]
    closes = np.empty(starts.size, dtype=bool)
    closes[-1] = True
    closes[:-1] = opens[1:]
    return starts[opens], reach[closes]


def _complement(starts: np.ndarray, ends: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The gaps of normalised ranges within [0, size)."""
    gap_starts = np.concatenate(([0], ends)).astype(np.int64)
    gap_ends = np.concatenate((starts, [size])).astype(np.int64)
    keep = gap_ends > gap_starts
    return gap_starts[keep], gap_ends[keep]


def _as_arrays(ranges: Iterable[Range]) -> tuple[np.ndarray, np.ndarray]:
    pairs = np.asarray(list(ranges), dtype=np.int64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def _coverage(firsts: np.ndarray, ends: np.ndarray, n: int) -> np.ndarray:
    """Which of n blocks lie in any of the block ranges [firsts[i], ends[i])."""
    marks = np.zeros(n + 1, dtype=np.int64)
    keep = ends > firsts
    np.add.at(marks, firsts[keep], 1)
    np.add.at(marks, ends[keep], -1)
    return np.cumsum(marks[:n]) > 0


class UsedMap:
    """The used byte ranges of a volume of `size` bytes: sorted, merged, half-open [start, end).

    `mode` says how the map was made: 'used-blocks' (the filesystem told us) or 'all-blocks'
    (every byte is used; `reason` says why). `parts` describes the pieces of a composed map
    (one per partition of a disk), for the image header.
    """

    __slots__ = ("size", "starts", "ends", "used_bytes", "mode", "fs_type", "reason", "excluded_bytes",
                 "parts")

    def __init__(self, size: int, starts: np.ndarray, ends: np.ndarray, *, mode: str = USED_BLOCKS,
                 fs_type: str | None = None, reason: str | None = None, excluded_bytes: int = 0,
                 parts: Sequence[dict[str, Any]] = ()):
        if mode not in (USED_BLOCKS, ALL_BLOCKS):
            raise ValueError(f"unknown plan mode {mode!r}")
        self.size = int(size)
        self.starts, self.ends = _normalised(starts, ends, self.size)
        self.used_bytes = int((self.ends - self.starts).sum())
        self.mode = mode
        self.fs_type = fs_type
        self.reason = reason
        self.excluded_bytes = int(excluded_bytes)
        self.parts = tuple(parts)

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def from_ranges(cls, size: int, ranges: Iterable[Range], **kw: Any) -> "UsedMap":
        starts, ends = _as_arrays(ranges)
        return cls(size, starts, ends, **kw)

    @classmethod
    def outside_free(cls, free: Iterable[Range], size: int, fs_type: str) -> "UsedMap":
        """Everything but the free space is used: metadata, journal, data, whatever GETFSMAP
        reports with an unknown owner, and any bytes past the end of the filesystem."""
        free_starts, free_ends = _normalised(*_as_arrays(free), size)
        starts, ends = _complement(free_starts, free_ends, size)
        return cls(size, starts, ends, mode=USED_BLOCKS, fs_type=fs_type)

    @classmethod
    def all_blocks(cls, size: int, reason: str, *, fs_type: str | None = None) -> "UsedMap":
        return cls(size, np.array([0]), np.array([size]), mode=ALL_BLOCKS, fs_type=fs_type,
                   reason=reason)

    @classmethod
    def compose(cls, size: int, regions: Iterable[tuple[int, "UsedMap"]], *,
                fs_type: str | None = None, parts: Sequence[dict[str, Any]] = ()) -> "UsedMap":
        """A map of a `size`-byte volume from regions planned on their own, each UsedMap placed
        at its byte offset. Every byte outside the regions counts as used: on a disk that is
        the partition table, the GPT headers at both ends, and the gaps between partitions,
        which boot loaders and other tools use without telling anyone."""
        regions = list(regions)
        region_starts = np.array([offset for offset, _ in regions], dtype=np.int64)
        region_ends = np.array([offset + m.size for offset, m in regions], dtype=np.int64)
        outside_starts, outside_ends = _complement(*_normalised(region_starts, region_ends, size), size)
        all_starts, all_ends = [outside_starts], [outside_ends]
        for offset, m in regions:
            all_starts.append(m.starts + offset)
            all_ends.append(m.ends + offset)
        any_planned = any(m.mode == USED_BLOCKS for _, m in regions)
        return cls(size, np.concatenate(all_starts), np.concatenate(all_ends),
                   mode=USED_BLOCKS if any_planned else ALL_BLOCKS, fs_type=fs_type,
                   reason=None if any_planned else "no partition holds a filesystem that reports its free space",
                   excluded_bytes=sum(m.excluded_bytes for _, m in regions), parts=parts)

    def _derived(self, starts: np.ndarray, ends: np.ndarray, size: int | None = None,
                 **changes: Any) -> "UsedMap":
        fields: dict[str, Any] = dict(mode=self.mode, fs_type=self.fs_type, reason=self.reason,
                                      excluded_bytes=self.excluded_bytes, parts=self.parts)
        fields.update(changes)
        return UsedMap(self.size if size is None else size, starts, ends, **fields)

    # --- queries --------------------------------------------------------------------------

    @property
    def ranges(self) -> list[Range]:
        return list(zip(self.starts.tolist(), self.ends.tolist()))

    def ranges_in(self, offset: int, length: int) -> list[Range]:
        """The used parts of [offset, offset+length), RELATIVE to `offset`: (start, end) pairs
        with 0 <= start < end <= length, sorted. [] means nothing there is used; [(0, length)]
        means all of it is. Two binary searches, so it is cheap enough per chunk of a
        multi-terabyte volume."""
        if length <= 0:
            return []
        end = offset + length
        first = int(np.searchsorted(self.ends, offset, side="right"))
        last = int(np.searchsorted(self.starts, end, side="left"))
        if first >= last:
            return []
        starts = self.starts[first:last].tolist()
        ends = self.ends[first:last].tolist()
        return [(max(s, offset) - offset, min(e, end) - offset) for s, e in zip(starts, ends)]

    def covers(self, start: int, end: int) -> bool:
        """True when all of [start, end) is used."""
        if end <= start:
            return True
        i = int(np.searchsorted(self.ends, start, side="right"))
        return bool(i < self.starts.size and self.starts[i] <= start and self.ends[i] >= end)

    def overlaps(self, start: int, end: int) -> bool:
        """True when any byte of [start, end) is used."""
        return bool(self.ranges_in(start, end - start)) if end > start else False

    def block_states(self, block_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Per block of `block_size` bytes: whether any byte of it is used, whether every byte
        is (the volume's last block may be shorter). What an incremental compares with its parent's."""
        n = -(-self.size // block_size)
        full_end = np.where(self.ends >= self.size, n, self.ends // block_size)
        return (_coverage(self.starts // block_size, -(-self.ends // block_size), n),
                _coverage(-(-self.starts // block_size), full_end, n))

    # --- composition ----------------------------------------------------------------------

    def shifted(self, offset: int, size: int | None = None) -> "UsedMap":
        """The same ranges `offset` bytes further on, in a volume of `size` bytes (default: just
        large enough): a partition's map placed on its disk."""
        return self._derived(self.starts + offset, self.ends + offset,
                             self.size + offset if size is None else size)

    def union(self, other: "UsedMap") -> "UsedMap":
        """Bytes used in either map (the larger size)."""
        return self._derived(np.concatenate((self.starts, other.starts)),
                             np.concatenate((self.ends, other.ends)), max(self.size, other.size))

    def minus(self, ranges: Iterable[Range]) -> "UsedMap":
        """This map without `ranges` (absolute byte ranges, e.g. from plan_excludes)."""
        ex_starts, ex_ends = _normalised(*_as_arrays(ranges), self.size)
        # A minus B is everything outside (outside A, or inside B).
        outside = _complement(self.starts, self.ends, self.size)
        gone = _normalised(np.concatenate((outside[0], ex_starts)),
                           np.concatenate((outside[1], ex_ends)), self.size)
        starts, ends = _complement(*gone, self.size)
        removed = self.used_bytes - int((ends - starts).sum())
        return self._derived(starts, ends, excluded_bytes=self.excluded_bytes + removed)

    def within(self, other: "UsedMap") -> "UsedMap":
        """The bytes used in both maps: everything outside the gaps of either."""
        mine = _complement(self.starts, self.ends, self.size)
        theirs = _complement(other.starts, other.ends, self.size)
        gaps = _normalised(np.concatenate((mine[0], theirs[0])), np.concatenate((mine[1], theirs[1])), self.size)
        return self._derived(*_complement(*gaps, self.size))

    def aligned(self, granularity: int) -> "UsedMap":
        """Every range widened outward to multiples of `granularity` (a sector size for
        O_DIRECT reads). Widening only ever adds used bytes, so it stays safe."""
        if granularity <= 1:
            return self
        starts = self.starts // granularity * granularity
        ends = -(-self.ends // granularity) * granularity
        return self._derived(starts, ends)

    def to_dict(self) -> dict[str, Any]:
        """A summary for the image header (the ranges themselves are not needed to restore:
        unused bytes are zeros in the image)."""
        d: dict[str, Any] = {"mode": self.mode, "fs_type": self.fs_type, "volume_size": self.size,
             "used_bytes": self.used_bytes, "ranges": int(self.starts.size)}
        if self.reason:
            d["reason"] = self.reason
        if self.excluded_bytes:
            d["excluded_bytes"] = self.excluded_bytes
        if self.parts:
            d["parts"] = list(self.parts)
        return d

    def __repr__(self) -> str:
        why = f", reason={self.reason!r}" if self.reason else ""
        return (f"UsedMap(size={self.size}, mode={self.mode!r}, fs_type={self.fs_type!r}, "
                f"used_bytes={self.used_bytes}, ranges={self.starts.size}{why})")


# --- FS_IOC_GETFSMAP (include/uapi/linux/fsmap.h) ------------------------------------------


# --- unmounted filesystems and snapshot views ---------------------------------------------


# --- --exclude PATH: FS_IOC_FIEMAP (include/uapi/linux/fiemap.h) ----------------------------


