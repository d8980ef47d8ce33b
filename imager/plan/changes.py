"""Which blocks an incremental must look at: those that may differ from its parent.

A block of the image is what a full would hold: the volume's bytes where the filesystem uses
them, zeros elsewhere. So a block may differ from the parent's when it was written since
(tracked), or when what the filesystem uses of it changed: used now but not all of it then (or
the reverse), since what was zero may now be read and what was read may now be zero. Without a
tracker every block used now or then may differ. A block used neither now nor then is zeros in
both; a block used in full now and then and not written is the same bytes.

Every candidate is read and hashed, and only those whose digest differs go into the image: the
tracker narrows the reading, the digests decide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BlockStates:
    """Per block: whether the filesystem used any byte of it, and every byte."""

    used_any: np.ndarray
    used_full: np.ndarray


@dataclass
class ChangePlan:
    candidates: np.ndarray      # bool per block: read (or, unused now, take as zeros) and compare
    method: str                 # "tracker" | "digest"
    reason: str

    @property
    def candidate_count(self) -> int:
        return int(self.candidates.sum())


def change_plan(now: BlockStates, parent: BlockStates, written: np.ndarray | None, reason: str) -> ChangePlan:
    """`written`: the tracker's bits since the parent's snapshot, one per block (None: no
    tracker that can be trusted, for `reason`)."""
    unused_both = ~now.used_any & ~parent.used_any
    if written is None:
        return ChangePlan(~unused_both, "digest", reason)
    same_bytes = now.used_full & parent.used_full & ~written
    return ChangePlan(~(unused_both | same_bytes), "tracker", reason)


def tracker_bits_as_blocks(bits: bytes, tracker_block: int, block_size: int, block_count: int) -> np.ndarray:
    """The tracker's bitmap (one bit per `tracker_block` bytes) as one flag per image block."""
    flags = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little").astype(bool)
    if tracker_block == block_size:
        return flags[:block_count].copy()
    if tracker_block > block_size:
        return np.repeat(flags, tracker_block // block_size)[:block_count]
    per = block_size // tracker_block
    padded = np.zeros(block_count * per, dtype=bool)
    usable = min(len(flags), padded.size)
    padded[:usable] = flags[:usable]
    changed: np.ndarray = np.any(padded.reshape(block_count, per), axis=1)
    return changed
