"""The volume of an image or chain point, read at random: each region (a chunk of the full) is
decoded once, checked against the chain point's digests, and kept in a bounded LRU cache of
decoded regions; on sequential reads the next regions are decoded ahead, in parallel, on every
core (zstandard and blake3 release the GIL).

A full image's frames are read with O_DIRECT (ImageReader direct_frames) unless the page cache
holds them already: the decoded regions are the cache, and a second copy of the image in the
page cache only pushed out the machine's other data and cost a copy per frame.

Regions are decoded into page-aligned buffers (slabs) that are reused, and reads are answered
with views of them (read_views), sent to the kernel without a copy: a slab is pinned while a
reply is sent from it, and is decoded into again only once it is out of the cache and unpinned.
Fresh 4 MiB allocations per region, and the copy into a reply buffer, cost about as much CPU as
decompressing (bench/mount.py).

A region that cannot be decoded (a damaged frame, a digest that does not match) makes every read
that touches it fail with EIO, for good, and is reported in the log once, naming the chunk and
the volume bytes it covers; every other region stays readable. A read never returns a short
count inside the volume: a loop device fills a short read with zeros, which would pass damage
off as data.
"""

from __future__ import annotations

import errno
import functools
import logging
import mmap
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

from ..defaults import DEFAULT_MOUNT_CACHE_BYTES
from ..errors import ImagerError
from ..format import ImageReader
from ..format.chain import Chain, check_link

log = logging.getLogger("imager.mount")

DEFAULT_CACHE_BYTES = DEFAULT_MOUNT_CACHE_BYTES
# Regions decoded ahead of a sequential reader, at most (and never more than the cache holds).
DEFAULT_READAHEAD = 8


@dataclass
class CacheStats:
    capacity: int           # bytes of decoded regions the cache keeps at most
    cached_bytes: int       # what it holds now (zero regions cost nothing)
    regions: int            # regions it holds now (zero ones included)
    hits: int
    misses: int             # reads that had to wait for a decode
    decoded: int            # regions decoded (read-ahead included)
    read_ahead: int         # of those, decoded ahead of the reader
    damaged: list[int]      # regions that fail with EIO


class _Slab:
    """A page-aligned buffer a region is decoded into, reused once it is out of the cache and
    no reply is being sent from it (`pins`)."""
    __slots__ = ("memory", "view", "pins", "evicted", "free")

    def __init__(self, size: int):
        self.memory = mmap.mmap(-1, size)
        self.view = memoryview(self.memory)
        self.pins = 0
        self.evicted = False
        self.free = False


class _Entry:
    __slots__ = ("future", "size", "ahead", "ready", "slab")

    def __init__(self, future: Future, size: int, ahead: bool):
        self.future = future        # its result: the region's _Slab, or None for all zeros
        self.size = size
        self.ahead = ahead
        # The decode's success as the cache lock saw it (set once its callback ran): what a read
        # of a warm cache asks, without the future's own lock, three times a read.
        self.ready = False
        self.slab: _Slab | None = None


def _nothing() -> None:
    pass


class CachedVolume:
    """Random access to the volume of `chain` (a Chain: a full image alone, or an incremental and
    its parents) through a cache of at most `cache_bytes` of decoded regions, plus the regions
    being decoded ahead (at most `readahead`)."""

    def __init__(self, chain: Chain, *, cache_bytes: int = DEFAULT_CACHE_BYTES, workers: int | None = None,
                 readahead: int = DEFAULT_READAHEAD):
        self.chain = chain
        self.size = chain.header.volume_size
        self.region_size = chain.region_size
        self.region_count = chain.region_count
        self.capacity = max(int(cache_bytes), 2 * self.region_size)
        # Read-ahead never pushes out what the reader is about to use.
        self.readahead = max(0, min(readahead, self.capacity // self.region_size - 2))
        self._pool = ThreadPoolExecutor(max(1, workers or os.cpu_count() or 1), thread_name_prefix="imager-decode")
        self._lock = threading.RLock()     # a done callback may run inside _submit
        self._cache: OrderedDict[int, _Entry] = OrderedDict()
        self._cached_bytes = 0
        self._damaged: dict[int, str] = {}
        self._failures_logged: set[tuple[int, str]] = set()
        self._last_region = -2
        self._hits = self._misses = self._decoded = self._ahead = 0
        self._decoding = 0
        # Zero regions are served from an anonymous mapping: the kernel's zero page, no memory.
        self._zeros = mmap.mmap(-1, self.region_size, prot=mmap.PROT_READ)
        self._zero_view = memoryview(self._zeros)
        # Decoding into reused buffers spares the kernel zeroing fresh pages for every region.
        self._free_slabs: list[_Slab] = []
        self.slabs_made = 0

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._cache.clear()
            self._cached_bytes = 0
            self._free_slabs.clear()
        self._zero_view.release()
        try:
            self._zeros.close()
        except BufferError:
            pass        # a reply being sent from it still has a view: it goes with the last one

    # -- reading -----------------------------------------------------------------------------

    def read_into(self, dst: memoryview, offset: int) -> int:
        """Fill `dst` with the volume's bytes from `offset` (fewer only at the volume's end);
        OSError(EIO) if any of them lies in a damaged region."""
        views, release = self.read_views(offset, len(dst))
        try:
            return copy_views(views, dst)
        finally:
            release()

    def read_views(self, offset: int, length: int) -> tuple[list[memoryview], Callable[[], None]]:
        """The volume's bytes from `offset` (fewer only at the volume's end) as views of the
        decoded regions, to be sent without a copy, and what to call once they are sent: until
        then their buffers are not reused. OSError(EIO) if any byte lies in a damaged region."""
        if offset < 0:
            raise OSError(errno.EINVAL, "negative offset")
        end = min(offset + length, self.size)
        pos = offset
        views: list[memoryview] = []
        pinned: list[_Slab] = []
        try:
            while pos < end:
                region = pos // self.region_size
                start = pos - region * self.region_size
                take = min(end - pos, self.chain.region_length(region) - start)
                slab = self._region(region)
                if slab is None:
                    views.append(self._zero_view[start:start + take])
                else:
                    pinned.append(slab)
                    views.append(slab.view[start:start + take])
                pos += take
        except BaseException:
            views.clear()
            self._unpin(pinned)
            raise
        return views, functools.partial(self._unpin, pinned)

    def _unpin(self, slabs: list[_Slab]) -> None:
        with self._lock:
            for slab in slabs:
                slab.pins -= 1
                if slab.evicted and not slab.pins:
                    self._give_back(slab)
            slabs.clear()

    def cached_views(self, offset: int, length: int) -> tuple[list[memoryview], Callable[[], None]] | None:
        """read_views() of a read that lies in one region decoded already (the common small
        random read of a warm cache), under one hold of the lock; None for any other read,
        which read_views() answers (it may have to wait)."""
        region = offset // self.region_size
        start = offset - region * self.region_size
        take = min(offset + length, self.size) - offset
        if take <= 0 or start + take > self.chain.region_length(region):
            return None
        with self._lock:
            entry = self._cache.get(region)
            if entry is None or not entry.ready:
                return None
            self._cache.move_to_end(region)
            self._hits += 1
            entry.ahead = False
            slab = entry.slab
            if slab is not None:
                slab.pins += 1
            self._read_ahead(region)    # after the pin, as in _region()
        if slab is None:
            return [self._zero_view[start:start + take]], _nothing
        return [slab.view[start:start + take]], functools.partial(self._unpin, [slab])

    def damaged_within(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The volume bytes [start, end) of the regions found damaged so far that overlap these."""
        first, last = offset // self.region_size, (offset + max(length, 1) - 1) // self.region_size
        with self._lock:
            regions = sorted(r for r in self._damaged if first <= r <= last)
        return [(r * self.region_size, r * self.region_size + self.chain.region_length(r)) for r in regions]

    def is_cached(self, offset: int, length: int) -> bool:
        """Whether a read of these bytes needs no decoding: every region is decoded (or all
        zeros, or damaged) already."""
        first = max(0, offset) // self.region_size
        last = max(0, min(offset + length, self.size) - 1) // self.region_size
        with self._lock:
            for region in range(first, last + 1):
                entry = self._cache.get(region)
                if region not in self._damaged and (entry is None or not entry.ready):
                    return False
        return True

    def decoding(self) -> bool:
        """Whether a region is being decoded (or waits for a decoding thread)."""
        return self._decoding > 0

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(max(0, min(length, self.size - offset)))
        n = self.read_into(memoryview(buf), offset)
        return bytes(buf[:n])

    def _region(self, region: int) -> _Slab | None:
        """The region's decoded slab, pinned (None: all zeros)."""
        while True:
            with self._lock:
                entry = self._entry(region)
                future = entry.future
                ready = entry.ready
                slab = entry.slab
                if slab is not None:
                    slab.pins += 1
                # After the pin: making room for the regions read ahead may evict this one, and
                # its slab must not be decoded into while it is being sent.
                self._read_ahead(region)
            if ready:
                return slab
            try:
                slab = future.result()
            except ImagerError:
                raise self._damaged_error(region) from None     # logged once, where it was found
            except OSError as e:
                self._log_failure(region, f"{self._where(region)}: reading volume bytes {self._span(region)} "
                                          f"failed: {e}")
                raise OSError(errno.EIO, str(e)) from None
            if slab is None:
                return None
            with self._lock:
                if self._cache.get(region) is entry:
                    slab.pins += 1
                    return slab
            # Evicted between its decode and now, its slab perhaps decoded into again: decode anew.

    def _entry(self, region: int) -> _Entry:
        """The region's cache entry (lock held), its decode started if need be."""
        if region in self._damaged:
            raise self._damaged_error(region)
        entry = self._cache.get(region)
        if entry is not None:
            self._cache.move_to_end(region)
            if entry.ready:
                self._hits += 1
            else:
                self._misses += 1
            entry.ahead = False
        else:
            self._misses += 1
            entry = self._submit(region, ahead=False)
        return entry

    def _read_ahead(self, region: int) -> None:
        """Start decoding the regions after `region` when the reader goes sequentially (lock
        held)."""
        if region != self._last_region:
            sequential = region == self._last_region + 1
            self._last_region = region
            if sequential:
                for ahead in range(region + 1, min(region + 1 + self.readahead, self.region_count)):
                    if ahead not in self._cache and ahead not in self._damaged:
                        self._submit(ahead, ahead=True)

    # -- the cache ---------------------------------------------------------------------------

    def _submit(self, region: int, *, ahead: bool) -> _Entry:
        """Start decoding `region` (lock held), making room first."""
        size = self.chain.region_length(region)
        self._make_room(size)
        entry = _Entry(self._pool.submit(self._decode, region), size, ahead)
        self._cache[region] = entry
        self._cached_bytes += size
        self._decoded += 1
        self._ahead += ahead
        self._decoding += 1
        # Not a closure over the entry: the future would hold it, and it the future, in a cycle
        # that only the garbage collector breaks, long after eviction.
        entry.future.add_done_callback(functools.partial(self._settled, region))
        return entry

    def _make_room(self, size: int) -> None:
        """Evict the least recently used decoded regions until `size` more bytes fit, sparing
        at first the regions decoded ahead of the sequential reader and not read yet: they are
        older than the regions it went through since they were started, and evicting them
        would throw away what it is about to need. Regions still being decoded stay: at most
        read-ahead + 1 of them, the bound's only excess."""
        ahead_of_reader = range(self._last_region + 1, self._last_region + 1 + self.readahead)
        for spare_ahead in (True, False):
            if self._cached_bytes + size <= self.capacity:
                return
            for region in list(self._cache):
                entry = self._cache[region]
                if not entry.future.done() or (spare_ahead and entry.ahead and region in ahead_of_reader):
                    continue
                self._evict(region)
                if self._cached_bytes + size <= self.capacity:
                    return

    def _evict(self, region: int) -> None:
        entry = self._cache.pop(region)
        self._cached_bytes -= entry.size
        if _decoded(entry.future):
            slab = entry.future.result()
            if slab is not None:
                slab.evicted = True
                if not slab.pins:
                    self._give_back(slab)

    def _settled(self, region: int, future: Future) -> None:
        with self._lock:
            self._decoding -= 1
            entry = self._cache.get(region)
            if entry is None or entry.future is not future:
                return
            failed = future.cancelled() or future.exception() is not None
            if failed or future.result() is None:
                # A zero region costs nothing to keep; a failed one is not kept at all.
                self._cached_bytes -= entry.size
                entry.size = 0
            if failed:
                del self._cache[region]
                if not future.cancelled() and isinstance(future.exception(), ImagerError):
                    self._damaged[region] = str(future.exception())
            else:
                entry.slab = future.result()
                entry.ready = True

    def _decode(self, region: int) -> _Slab | None:
        with self._lock:
            if self._free_slabs:
                slab = self._free_slabs.pop()
                slab.evicted = slab.free = False
            else:
                slab = _Slab(self.region_size)
                self.slabs_made += 1
        try:
            nonzero = self.chain.region_into(region, slab.view[:self.chain.region_length(region)])
        except BaseException as e:
            self._give_back(slab)
            if isinstance(e, ImagerError):
                self._log_failure(region, f"{self._where(region)}: {e}; reads of volume bytes {self._span(region)} "
                                          f"fail with EIO, the rest of the volume reads normally")
            raise
        if nonzero:
            return slab
        self._give_back(slab)
        return None

    def _give_back(self, slab: _Slab) -> None:
        with self._lock:
            if slab.free:
                # Two decodes into one slab would serve one region's bytes as another's.
                raise AssertionError("a decode buffer was freed twice")
            slab.free = True
            self._free_slabs.append(slab)

    def _damaged_error(self, region: int) -> OSError:
        return OSError(errno.EIO, f"{self._where(region)}: volume bytes {self._span(region)} are damaged")

    def _span(self, region: int) -> str:
        first = region * self.region_size
        return f"{first}-{first + self.chain.region_length(region) - 1}"

    def _where(self, region: int) -> str:
        """The image file(s) the region's bytes come from."""
        if len(self.chain.images) == 1:
            return self.chain.point.path
        owners = sorted({int(o) for o in self.chain.region_owners(region)})
        return ", ".join(self.chain.images[o].path for o in owners)

    def _log_failure(self, region: int, message: str) -> None:
        key = (region, message)
        with self._lock:
            if key in self._failures_logged:
                return
            self._failures_logged.add(key)
        log.error("%s", message)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self.capacity, self._cached_bytes, len(self._cache), self._hits, self._misses,
                              self._decoded, self._ahead, sorted(self._damaged))


def _decoded(future: Future) -> bool:
    """Whether a region's decode has finished without failing."""
    return future.done() and not future.cancelled() and future.exception() is None


def copy_views(views: list[memoryview], dst: memoryview) -> int:
    """Copy `views` one after the other into `dst`; the bytes copied."""
    out = 0
    for view in views:
        dst[out:out + len(view)] = view
        out += len(view)
    return out


def open_chain_files(paths: list[str], stack: ExitStack) -> Chain:
    """The chain point of the image files `paths` (the point first, back to its full), each link
    checked again; the readers close with `stack`."""
    readers = [stack.enter_context(ImageReader(path, direct_frames=True)) for path in paths]
    for child, parent in zip(readers, readers[1:]):
        check_link(child.header, parent.header, parent.trailer, parent.path)
    return Chain(readers)
