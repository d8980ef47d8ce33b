"""devices.fuse, the FUSE kernel protocol spoken without libfuse, against the real kernel: what
the kernel asks of a served directory (names of any length, reads and writes of any size at any
offset, through the request layouts the server splits for alignment) comes back right."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import stat
import threading

import pytest

from devices import fuse
from lab import wait_until

MAX_WRITE = 1 << 20
LONG_NAME = "a-file-whose-name-is-longer-than-the-head-of-a-request-" + "x" * 150


class MemoryFiles:
    """devices.fuse.Files over byte arrays: the model the kernel's view is checked against."""

    def __init__(self, sizes: dict[str, int]):
        self.data = {name: bytearray(random.Random(name).randbytes(size)) for name, size in sizes.items()}
        self.attrs = {name: fuse.Attr(10 + n, size, stat.S_IFREG | 0o600, 0, 4096)
                      for n, (name, size) in enumerate(sizes.items())}
        self.handles: dict[int, str] = {}
        self.lock = threading.Lock()

    def listing(self):
        return dict(self.attrs)

    def open(self, attr, writable, fh):
        with self.lock:
            self.handles[fh] = next(name for name, a in self.attrs.items() if a.ino == attr.ino)

    def release(self, fh):
        with self.lock:
            self.handles.pop(fh, None)

    def read_into(self, fh, dst, offset):
        data = self.data[self.handles[fh]]
        piece = data[offset:offset + len(dst)]
        dst[:len(piece)] = piece
        return len(piece)

    def write_from(self, fh, src, offset):
        data = self.data[self.handles[fh]]
        if offset + len(src) > len(data):
            raise OSError(errno.ENOSPC, "fixed size")
        data[offset:offset + len(src)] = src
        return len(src)

    def flush(self, fh):
        pass

    def fsync(self, fh):
        pass


class ViewFiles(MemoryFiles):
    """devices.fuse.ViewReads: reads answered with views of the data, cut where a 64 KiB piece
    ends (as a volume's regions would be), each to be released once sent."""

    def __init__(self, sizes: dict[str, int]):
        super().__init__(sizes)
        self.unreleased = 0

    def read_views(self, fh, offset, size):
        data = memoryview(self.data[self.handles[fh]])
        end = min(offset + size, len(data))
        cuts = [offset, *range((offset // 65536 + 1) * 65536, end, 65536), end]
        views = [data[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
        with self.lock:
            self.unreleased += 1

        def release():
            with self.lock:
                self.unreleased -= 1
        return views, release


@contextlib.contextmanager
def serving(point, files, **options):
    fd = fuse.mount(str(point), "imager-test", "imagertest")
    thread = None
    try:
        session = fuse.negotiate(fd, MAX_WRITE)
        server = fuse.Server(fd, session, files, **options)
        thread = threading.Thread(target=server.serve, daemon=True)
        thread.start()
        yield server
    finally:
        fuse.umount(str(point), lazy=True)
        if thread is not None:
            thread.join(10)
        os.close(fd)
    assert not thread.is_alive()            # serve() returns once the connection is gone


@pytest.fixture(params=[dict(readers=0), dict(readers=2), dict(readers=2, kind=ViewFiles),
                        dict(readers=0, spin=0.001)],
                ids=["inline-reads", "reader-threads", "reads-from-views", "spinning"])
def served(tmp_path, request):
    options = dict(request.param)
    kind = options.pop("kind", MemoryFiles)
    files = kind({"small": 5000, "big": 8 * MAX_WRITE + 123, LONG_NAME: 70000})
    point = tmp_path / "mnt"
    point.mkdir()
    with serving(point, files, **options):
        yield point, files


def test_the_directory_lists_every_name_and_stats_each_file(served):
    point, files = served
    assert sorted(os.listdir(point)) == sorted(files.data)
    for name, data in files.data.items():
        st = os.stat(point / name)          # a LOOKUP longer than a request's head
        assert st.st_size == len(data) and stat.S_ISREG(st.st_mode)
    with pytest.raises(FileNotFoundError):
        os.stat(point / ("missing-" + "y" * 200))


def test_reads_and_writes_of_any_size_at_any_offset_match_the_model(served):
    point, files = served
    rng = random.Random(7)
    for name in files.data:
        fd = os.open(point / name, os.O_RDWR)
        try:
            size = len(files.data[name])
            for _ in range(40):
                offset = rng.randrange(size)
                length = rng.choice((1, 511, 4096, 65536 + 3, MAX_WRITE, 3 * MAX_WRITE + 17))
                if rng.random() < 0.5:
                    payload = rng.randbytes(min(length, size - offset))
                    assert os.pwrite(fd, payload, offset) == len(payload)
                    assert files.data[name][offset:offset + len(payload)] == payload
                else:
                    assert os.pread(fd, length, offset) == bytes(files.data[name][offset:offset + length])
            with pytest.raises(OSError) as refused:
                os.pwrite(fd, b"beyond", size)
            assert refused.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
    # Every reply sent from views gives them back, once sent: the server releases them after
    # the kernel has the reply, which the reader may see first.
    wait_until(lambda: getattr(files, "unreleased", 0) == 0, "every reply's views to be released")


@pytest.mark.parametrize("readers", [0, 2])
def test_a_spinning_server_sleeps_once_idle_and_the_next_request_wakes_it(tmp_path, readers):
    files = MemoryFiles({"small": 5000})
    point = tmp_path / "mnt"
    point.mkdir()
    with serving(point, files, readers=readers, spin=0.001) as server:
        fd = os.open(point / "small", os.O_RDONLY)
        try:
            for at in range(3):
                # Direct I/O: every pread is a READ request.
                assert os.pread(fd, 100, at) == files.data["small"][at:at + 100]
                answered = server.requests
                # Idle after its spin, the server sleeps rather than burn a core ...
                wait_until(lambda: server.sleeping and server.requests == answered, "the server to sleep")
            # ... and each next request, to a sleeping server, is answered.
        finally:
            os.close(fd)
