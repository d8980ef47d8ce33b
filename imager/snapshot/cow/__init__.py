"""The engine's own copy-on-write snapshots: a store in the write path of a volume and the
point-in-time view it serves."""

from .store import DEFAULT_BLOCK_SIZE, CowStore
from .view import SnapshotView

__all__ = ["DEFAULT_BLOCK_SIZE", "CowStore", "SnapshotView"]
