"""The FUSE kernel protocol spoken on a /dev/fuse descriptor, without libfuse: mount, the INIT
handshake, FUSE_NOTIFY_RESEND, and a one-thread server of a flat directory of files.

Why not libfuse: a libfuse session must see FUSE_INIT as its first request, and the kernel sends
INIT once per connection. A server that replaces a dead one on the same, already initialised
descriptor (so that the mount and whatever sits on it never notice) therefore cannot be a
libfuse session. Here whoever mounts does INIT (negotiate()), and any number of servers after
it, one at a time, serve the descriptor it holds: each starts with resend(), which puts back in
the queue every request a dead predecessor had read but not answered (Linux 6.9, FUSE 7.40).

Only what a directory of a few fixed-size files needs is implemented (see Server.serve()); the
layout of every message is include/uapi/linux/fuse.h's.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import select
import stat
import struct
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

from .libc import check, libc

KERNEL_VERSION = 7
# 7.40 brought FUSE_NOTIFY_RESEND; every message layout used here is the same since 7.23.
MINOR_VERSION = 40
MIN_MINOR_VERSION = 23
ROOT_ID = 1

# Opcodes (enum fuse_opcode).
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC = 14, 15, 16, 17, 18, 20
GETXATTR, LISTXATTR, FLUSH, INIT = 22, 23, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 27, 28, 29, 30
INTERRUPT, DESTROY, BATCH_FORGET, READDIRPLUS = 36, 38, 42, 44

# INIT flags (64 bits: flags | flags2 << 32).
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
ASYNC_DIO = 1 << 15
MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30
HAS_RESEND = 1 << 39

NOTIFY_RESEND = 7
# The kernel marks a resent request by this bit of its id; the reply carries the id unchanged.
UNIQUE_RESEND = 1 << 63

FOPEN_DIRECT_IO = 1 << 0
FATTR_SIZE = 1 << 3

IN_HEADER = struct.Struct("<IIQQIIIHH")      # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
OUT_HEADER = struct.Struct("<IiQ")           # len, error, unique
INIT_IN = struct.Struct("<IIIII")            # major, minor, max_readahead, flags, flags2
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # ..., max_pages, map_alignment, flags2, unused
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")    # ino size blocks atime mtime ctime *nsec mode nlink uid gid rdev blksize flags
ENTRY_OUT = struct.Struct("<QQQQII")         # nodeid generation entry_valid attr_valid *_nsec, then ATTR
ATTR_OUT = struct.Struct("<QII")             # attr_valid attr_valid_nsec dummy, then ATTR
OPEN_IN = struct.Struct("<II")               # flags open_flags
OPEN_OUT = struct.Struct("<QIi")             # fh open_flags backing_id
RW_IN = struct.Struct("<QQII")               # fh offset size flags (fuse_read_in / fuse_write_in head)
WRITE_IN_SIZE = 40
WRITE_OUT = struct.Struct("<II")
SETATTR_IN = struct.Struct("<IIQQ")          # valid padding fh size
KSTATFS = struct.Struct("<QQQQQIII28x")      # blocks bfree bavail files ffree bsize namelen frsize
DIRENT = struct.Struct("<QQII")              # ino off namelen type

MS_NOSUID, MS_NODEV, MS_RDONLY = 2, 4, 1
FUSE_DEV_IOC_CLONE = 0x8004E500


@dataclass(frozen=True)
class Attr:
    """What stat says of a served file. `ino` is its node id: it must stay the same for as long
    as the file exists, across servers, because the kernel keeps open files by node id."""

    ino: int
    size: int
    mode: int
    mtime_ns: int
    block_size: int


@dataclass(frozen=True)
class Session:
    """What INIT settled; every server of the connection needs it."""

    minor: int
    flags: int
    max_write: int

    def to_arg(self) -> str:
        return f"{self.minor}:{self.flags}:{self.max_write}"

    @classmethod
    def from_arg(cls, text: str) -> "Session":
        minor, flags, max_write = (int(x) for x in text.split(":"))
        return cls(minor, flags, max_write)


class Files(Protocol):
    """The served directory. Methods raise OSError: its errno is the reply. `fh` is chosen by the
    server (the OPEN request's id), so a handle can be found again by a later server."""

    def listing(self) -> dict[str, Attr]: ...
    def open(self, attr: Attr, writable: bool, fh: int) -> None: ...
    def release(self, fh: int) -> None: ...
    def read_into(self, fh: int, dst: memoryview, offset: int) -> int: ...
    def write_from(self, fh: int, src: memoryview, offset: int) -> int: ...
    def flush(self, fh: int) -> None: ...
    def fsync(self, fh: int) -> None: ...


@runtime_checkable
class QuickReads(Protocol):
    """Files that hand over a READ's data at once when they have it in memory (as
    ViewReads.read_views does), None when the READ would have to wait: the server sends the
    first kind itself instead of handing it to a reader thread, which saves a thread switch on
    every small read. Never raises: a READ it cannot answer goes to a reader thread."""

    def quick_views(self, fh: int, offset: int, size: int) -> tuple[list[memoryview], Callable[[], None]] | None: ...


@runtime_checkable
class ViewReads(Protocol):
    """Files that answer a READ with views of buffers they hold, sent as they are (no copy into
    the server's reply buffer): `release()` is called once the reply is sent, and the buffers
    must stay unchanged until then. Page-aligned views are what the kernel copies fastest."""

    def read_views(self, fh: int, offset: int, size: int) -> tuple[list[memoryview], Callable[[], None]]: ...


class ConnectionGone(Exception):
    """The filesystem was unmounted (or the connection aborted): nothing more will come."""


def mount(mount_point: str, fsname: str, subtype: str, *, read_only: bool = False) -> int:
    """Open /dev/fuse and mount it at `mount_point` (root only): returns the descriptor, which
    keeps the mount alive while it is open. INIT is waiting on it: call negotiate() next."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    options = f"fd={fd},rootmode={stat.S_IFDIR:o},user_id=0,group_id=0,allow_other,default_permissions"
    flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
    try:
        check(libc.mount(fsname.encode(), os.fsencode(mount_point), f"fuse.{subtype}".encode(),
                         ctypes.c_ulong(flags), options.encode()), f"mount {mount_point}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def negotiate(fd: int, max_write: int, *, need_resend: bool = True) -> Session:
    """Answer the connection's INIT (the first request after mount). Refuses a kernel that
    cannot resend when `need_resend`: a server could then not be replaced without failing
    requests."""
    buf = bytearray(max(8192, max_write + 4096))
    while True:
        _read(fd, [buf])
        _, opcode, unique, *_ = IN_HEADER.unpack_from(buf)
        if opcode == INIT:
            break
        _reply(fd, unique, -errno.EIO)      # nothing else can come first; be safe if it does
    major, minor, max_readahead, flags, flags2 = INIT_IN.unpack_from(buf, IN_HEADER.size)
    offered = flags | (flags2 << 32 if flags & INIT_EXT else 0)
    if major != KERNEL_VERSION or minor < MIN_MINOR_VERSION or (need_resend and not offered & HAS_RESEND):
        _reply(fd, unique, -errno.EPROTO)
        raise OSError(errno.EPROTO, f"the kernel's FUSE {major}.{minor} cannot resend requests "
                                    f"(FUSE_NOTIFY_RESEND needs 7.40, Linux 6.9)")
    wanted = (ASYNC_READ | BIG_WRITES | ASYNC_DIO | MAX_PAGES | INIT_EXT) & offered
    minor = min(minor, MINOR_VERSION)
    pages = max_write // mmap.PAGESIZE
    body = INIT_OUT.pack(KERNEL_VERSION, minor, max_readahead, wanted & 0xFFFFFFFF, 0, 0, max_write, 1,
                         pages, 0, wanted >> 32)
    _reply(fd, unique, 0, body)
    return Session(minor, wanted, max_write)


def resend(fd: int) -> None:
    """Put every request that was read from this connection but not answered back in its queue."""
    os.write(fd, OUT_HEADER.pack(OUT_HEADER.size, NOTIFY_RESEND, 0))


def umount(mount_point: str, lazy: bool = False) -> None:
    check(libc.umount2(os.fsencode(mount_point), 2 if lazy else 0), f"umount {mount_point}")


# What precedes a WRITE's data in its request. Requests are read into two buffers, this much
# into the first, so that a WRITE's data lands page-aligned in the second: the kernel copies
# between page-aligned buffers several times faster than into or out of one that is not
# (measured: 1 MiB preadv into a buffer at offset 16, 1.8 GB/s; page-aligned, 8.4 GB/s).
REQUEST_HEAD = IN_HEADER.size + WRITE_IN_SIZE


class _Lane:
    """One serving thread's buffers, and the gate it holds while it handles a request. Locked in
    memory: a request the kernel copies into an unmapped page when this process is being killed
    would fail with EIO instead of staying queued for the next server."""

    def __init__(self, session: Session, request: bool = True):
        self.head = mmap.mmap(-1, mmap.PAGESIZE) if request else None
        self.body = mmap.mmap(-1, session.max_write + mmap.PAGESIZE) if request else None
        self.reply = mmap.mmap(-1, session.max_write)     # a READ's data, sent after its header
        for m in (self.head, self.body, self.reply):
            if m is not None:
                _mlock(m)
        self.iov = [memoryview(self.head)[:REQUEST_HEAD], memoryview(self.body)] if request else []
        self.gate = threading.Lock()
        self.busy_since: float | None = None    # monotonic start of the request being handled
        self.answered = 0                       # READs handed to this lane's thread and done with


class Server:
    """Serves `files` on a mounted, negotiated descriptor. One thread takes every request and
    handles all but READ itself (a single thread still gets many writes in flight from a loop
    device doing async direct I/O, and Python threads handling small writes side by side only
    fight over the GIL); READs go to `readers` threads, so that a reader of a snapshot (a
    backup) has several disk reads in flight. Every reply is one write; a request's data is
    handed over as a view of its thread's buffer, valid during the call only. `files` must be
    thread-safe when `readers` > 0."""

    def __init__(self, fd: int, session: Session, files: Files, on_error=None, readers: int = 0, on_fatal=None,
                 spin: float = 0.0, quiet: Callable[[], bool] | None = None):
        """`on_error(opcode, exception)`: a request failed unexpectedly (it is answered EIO).
        `on_fatal(exception)`: a reader thread cannot go on (its READs would never be answered).

        `spin` > 0: after a request, look for the next one for up to `spin` seconds before
        sleeping. A reader that issues one request at a time (random reads of a warm cache)
        then finds the server awake: each request would otherwise wake a sleeping thread on
        another core, which on a VM costs more than the request. Only while the reader threads
        are idle and `quiet()` says nothing else of the process runs (the spinning thread would
        hold the GIL against them); the descriptor is made non-blocking for it, so a server that
        hands its descriptor over to another process must not spin."""
        self.fd = fd
        self.session = session
        self.files = files
        self._on_error = on_error
        self._on_fatal = on_fatal
        self._lane = _Lane(session)
        self._read_lanes = [_Lane(session, request=False) for _ in range(readers)]
        self._reads: queue.SimpleQueue = queue.SimpleQueue()    # (unique, fh, offset, size), None: stop
        self._views = files.read_views if isinstance(files, ViewReads) else None
        self.requests = 0
        self.spin = spin
        self._quiet = quiet
        self._spin_until = 0.0
        self._poller: select.poll | None = None     # the sleep of a spinning server
        self._handed_over = 0   # READs queued for the reader threads (each lane counts those it finished)
        self.sleeping = False   # the serving thread waits for a request in poll() (when spinning)

    def hold(self, timeout: float) -> bool:
        """Wait until no request is being handled and keep it so (for handing over to another
        server process: what is queued or read but not answered is resent to it). False, and
        nothing held, if a request is still being handled after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        held = []
        for lane in (self._lane, *self._read_lanes):
            if not lane.gate.acquire(timeout=max(0.0, deadline - time.monotonic())):
                for gate in held:
                    gate.release()
                return False
            held.append(lane.gate)
        return True

    def busy_for(self) -> float:
        """How long the longest request now being handled has taken so far (0: none)."""
        starts = [lane.busy_since for lane in (self._lane, *self._read_lanes) if lane.busy_since is not None]
        return time.monotonic() - min(starts) if starts else 0.0

    def serve(self, on_first_reply=None) -> None:
        """Until the filesystem is unmounted. `on_first_reply` is called once after the first
        request is answered (how long a replacement took to serve)."""
        readers = [threading.Thread(target=self._serve_reads, args=(lane,), name=f"fuse-read-{n}", daemon=True)
                   for n, lane in enumerate(self._read_lanes)]
        for t in readers:
            t.start()
        try:
            self._serve(on_first_reply)
        finally:
            for _ in readers:
                self._reads.put(None)

    def _serve(self, first) -> None:
        fd, lane = self.fd, self._lane
        head, body = lane.iov
        handlers = {LOOKUP: self._lookup, GETATTR: self._getattr, SETATTR: self._setattr, OPEN: self._open,
                    READ: self._read, WRITE: self._write, STATFS: self._statfs, RELEASE: self._release,
                    FSYNC: self._fsync, FLUSH: self._flush, OPENDIR: self._opendir, READDIR: self._readdir,
                    RELEASEDIR: self._empty, FSYNCDIR: self._empty}
        hand_reads_over = bool(self._read_lanes)
        quick = self.files.quick_views if isinstance(self.files, QuickReads) else None
        idle = None
        if self.spin > 0:
            os.set_blocking(fd, False)
            self._poller = select.poll()
            self._poller.register(fd, select.POLLIN)
            idle = self._idle
        while True:
            if idle is not None:
                self._spin_until = time.monotonic() + self.spin if self._may_spin() else 0.0
            try:
                length = _read(fd, lane.iov, idle)
            except ConnectionGone:
                return
            _, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(head)
            # Whole in one buffer for all but WRITE, whose data the handler takes from `body`.
            buf = head if opcode == WRITE or length <= REQUEST_HEAD else \
                memoryview(bytes(head) + bytes(body[:length - REQUEST_HEAD]))
            if opcode in (FORGET, BATCH_FORGET, INTERRUPT):
                continue                    # no reply: node ids are fixed; requests are not interruptible here
            if opcode == DESTROY:
                self._send(unique, 0)
                continue                    # the next read says the connection is gone
            self.requests += 1
            if opcode == READ and hand_reads_over and first is None:
                fh, offset, size, _ = RW_IN.unpack_from(buf, IN_HEADER.size)
                at_hand = quick(fh, offset, size) if quick is not None else None
                if at_hand is None:
                    self._handed_over += 1
                    self._reads.put((unique, fh, offset, size))
                    continue
                if not self._handle(lane, self._send_views, opcode, unique, at_hand, None):
                    return
                continue
            if not self._handle(lane, handlers.get(opcode), opcode, unique, nodeid, buf):
                return
            if first is not None:
                first()
                first = None

    def _may_spin(self) -> bool:
        # Counts each written by one thread only: exact without a lock.
        return (self._handed_over == sum(lane.answered for lane in self._read_lanes)
                and (self._quiet is None or self._quiet()))

    def _idle(self) -> None:
        """Nothing queued on the (non-blocking) descriptor: look again until the spin is over,
        then sleep until a request comes or the connection goes."""
        if time.monotonic() < self._spin_until:
            return
        assert self._poller is not None
        self.sleeping = True
        try:
            self._poller.poll()
        finally:
            self.sleeping = False

    def _serve_reads(self, lane: _Lane) -> None:
        try:
            while (item := self._reads.get()) is not None:
                unique, fh, offset, size = item
                handled = self._handle(lane, self._read_at, READ, unique, (fh, offset, size), None)
                lane.answered += 1
                if not handled:
                    return
        except BaseException as e:
            if self._on_fatal is None:
                raise
            self._on_fatal(e)

    def _handle(self, lane: _Lane, handler, opcode: int, unique: int, nodeid, buf) -> bool:
        """Handle one request on `lane`; False once the connection is gone."""
        try:
            with lane.gate:
                # A flush may write back gigabytes of the server's cache on a slow disk: not what
                # a stuck server looks like.
                lane.busy_since = None if opcode in (FLUSH, FSYNC) else time.monotonic()
                if handler is None:
                    self._send(unique, -errno.ENOSYS)
                else:
                    handler(unique, nodeid, buf, lane)
        except OSError as e:
            self._send(unique, -(e.errno or errno.EIO))
        except ConnectionGone:
            return False
        except Exception as e:
            if self._on_error is not None:
                self._on_error(opcode, e)
            self._send(unique, -errno.EIO)
        finally:
            lane.busy_since = None
        return True

    # -- replies -------------------------------------------------------------------------------

    def _send(self, unique: int, error: int, *body) -> None:
        _reply(self.fd, unique, error, *body)

    def _attr(self, nodeid: int) -> Attr:
        if nodeid == ROOT_ID:
            return Attr(ROOT_ID, 0, stat.S_IFDIR | 0o755, 0, 4096)
        for attr in self.files.listing().values():
            if attr.ino == nodeid:
                return attr
        raise OSError(errno.ENOENT, "gone")

    def _lookup(self, unique, nodeid, buf, reply=None) -> None:
        length = IN_HEADER.unpack_from(buf)[0]
        name = bytes(buf[IN_HEADER.size:length]).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        attr = self.files.listing().get(name) if nodeid == ROOT_ID else None
        if attr is None:
            raise OSError(errno.ENOENT, name)
        # Valid for no time at all: files appear and disappear (snapshots), the kernel must ask.
        self._send(unique, 0, ENTRY_OUT.pack(attr.ino, 0, 0, 0, 0, 0), _pack_attr(attr))

    def _getattr(self, unique, nodeid, buf, reply=None) -> None:
        self._send(unique, 0, ATTR_OUT.pack(0, 0, 0), _pack_attr(self._attr(nodeid)))

    def _setattr(self, unique, nodeid, buf, reply=None) -> None:
        attr = self._attr(nodeid)
        valid, _, _, size = SETATTR_IN.unpack_from(buf, IN_HEADER.size)
        if valid & FATTR_SIZE and size != attr.size:
            raise OSError(errno.EPERM, "fixed size")
        self._send(unique, 0, ATTR_OUT.pack(0, 0, 0), _pack_attr(attr))

    def _open(self, unique, nodeid, buf, reply=None) -> None:
        flags, _ = OPEN_IN.unpack_from(buf, IN_HEADER.size)
        fh = unique & ~UNIQUE_RESEND        # the same handle if this OPEN is a resent one
        self.files.open(self._attr(nodeid), flags & os.O_ACCMODE != os.O_RDONLY, fh)
        # Direct I/O: no page cache in this filesystem, so a write reaches the file when issued.
        self._send(unique, 0, OPEN_OUT.pack(fh, FOPEN_DIRECT_IO, 0))

    def _release(self, unique, nodeid, buf, reply=None) -> None:
        self.files.release(RW_IN.unpack_from(buf, IN_HEADER.size)[0])
        self._send(unique, 0)

    def _read(self, unique, nodeid, buf, lane) -> None:
        fh, offset, size, _ = RW_IN.unpack_from(buf, IN_HEADER.size)
        self._read_at(unique, (fh, offset, size), None, lane)

    def _read_at(self, unique, where, buf, lane) -> None:
        fh, offset, size = where
        if self._views is not None:
            self._send_views(unique, self._views(fh, offset, size))
            return
        data = memoryview(lane.reply)[:size]
        n = self.files.read_into(fh, data, offset)
        _write_reply(self.fd, [OUT_HEADER.pack(OUT_HEADER.size + n, 0, unique), data[:n]])

    def _send_views(self, unique, at_hand, buf=None, lane=None) -> None:
        views, release = at_hand
        try:
            n = sum(len(v) for v in views)
            _write_reply(self.fd, [OUT_HEADER.pack(OUT_HEADER.size + n, 0, unique), *views])
        finally:
            views.clear()
            release()

    def _write(self, unique, nodeid, buf, lane) -> None:
        fh, offset, size, _ = RW_IN.unpack_from(buf, IN_HEADER.size)
        n = self.files.write_from(fh, lane.iov[1][:size], offset)
        self._send(unique, 0, WRITE_OUT.pack(n, 0))

    def _flush(self, unique, nodeid, buf, reply=None) -> None:
        self.files.flush(RW_IN.unpack_from(buf, IN_HEADER.size)[0])
        self._send(unique, 0)

    def _fsync(self, unique, nodeid, buf, reply=None) -> None:
        self.files.fsync(RW_IN.unpack_from(buf, IN_HEADER.size)[0])
        self._send(unique, 0)

    def _statfs(self, unique, nodeid, buf, reply=None) -> None:
        files = list(self.files.listing().values())
        block = max((f.block_size for f in files), default=4096)
        blocks = sum(f.size for f in files) // block
        self._send(unique, 0, KSTATFS.pack(blocks, 0, 0, len(files), 0, block, 255, block))

    def _opendir(self, unique, nodeid, buf, reply=None) -> None:
        if nodeid != ROOT_ID:
            raise OSError(errno.ENOTDIR, "not a directory")
        self._send(unique, 0, OPEN_OUT.pack(0, 0, 0))

    def _readdir(self, unique, nodeid, buf, reply=None) -> None:
        _, offset, size, _ = RW_IN.unpack_from(buf, IN_HEADER.size)
        entries = [(".", ROOT_ID, stat.S_IFDIR), ("..", ROOT_ID, stat.S_IFDIR)]
        entries += [(name, a.ino, stat.S_IFMT(a.mode)) for name, a in sorted(self.files.listing().items())]
        out = bytearray()
        for i, (name, ino, mode) in enumerate(entries[offset:], start=offset + 1):
            raw = name.encode("utf-8", "surrogateescape")
            record = DIRENT.pack(ino, i, len(raw), mode >> 12) + raw
            record += b"\0" * (-len(record) % 8)
            if len(out) + len(record) > size:
                break
            out += record
        self._send(unique, 0, bytes(out))

    def _empty(self, unique, nodeid, buf, reply=None) -> None:
        self._send(unique, 0)


def _pack_attr(a: Attr) -> bytes:
    sec, nsec = divmod(a.mtime_ns, 1_000_000_000)
    nlink = 2 if stat.S_ISDIR(a.mode) else 1
    return ATTR.pack(a.ino, a.size, -(-a.size // 512), sec, sec, sec, nsec, nsec, nsec, a.mode, nlink,
                     0, 0, 0, a.block_size, 0)


def _read(fd: int, buffers: list, idle: Callable[[], None] | None = None) -> int:
    """The next request; on a non-blocking descriptor, `idle()` is called whenever none is
    queued, and the read is tried again after it."""
    while True:
        try:
            return os.readv(fd, buffers)
        except BlockingIOError:
            if idle is None:
                raise
            idle()
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno == errno.ENOENT:     # the request was aborted while being read: next one
                continue
            if e.errno == errno.ENODEV:
                raise ConnectionGone() from None
            raise


def _reply(fd: int, unique: int, error: int, *body: bytes) -> None:
    payload = b"".join(body) if error == 0 else b""
    _write_reply(fd, [OUT_HEADER.pack(OUT_HEADER.size + len(payload), error, unique) + payload])


def _write_reply(fd: int, parts: list) -> None:
    try:
        os.writev(fd, parts)
    except OSError as e:
        if e.errno == errno.ENOENT:         # its request was interrupted meanwhile: nobody waits
            return
        if e.errno == errno.ENODEV:
            raise ConnectionGone() from None
        raise


def _mlock(m: mmap.mmap) -> None:
    address = ctypes.addressof(ctypes.c_char.from_buffer(m))
    if libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(len(m))) != 0:
        # Without the lock (RLIMIT_MEMLOCK) the pages are at least present now.
        for i in range(0, len(m), mmap.PAGESIZE):
            m[i] = 0
