"""Reads and writes at any offset of any length from any buffer, on a device opened with
O_DIRECT, which takes only sector-aligned ones: the unaligned remainder goes through a
per-thread, page-aligned bounce buffer."""

from __future__ import annotations

import threading

import numpy as np

from .buffers import AlignedBuffer

# Per-thread bounce buffer for unaligned O_DIRECT I/O (callers may use it to copy blocks).
SCRATCH_SIZE = 1 << 20


class AlignedIO:
    """Device reads and writes that honour O_DIRECT's alignment rules for any caller buffer.

    An unaligned buffer or range goes through a per-thread aligned bounce buffer; a write
    that starts or ends inside a sector reads that sector first: the caller must keep other
    writers of those sectors out meanwhile (the COW store holds the blocks' lock stripes).
    """

    def __init__(self, device):
        self.device = device
        self.sector = int(device.logical_sector_size)

    def _aligned(self, buf: memoryview, offset: int) -> bool:
        s = self.sector
        return offset % s == 0 and len(buf) % s == 0 and _address(buf) % s == 0

    def read(self, dst: memoryview, offset: int) -> int:
        if not getattr(self.device, "direct", False) or self._aligned(dst, offset):
            return self.device.read_into(dst, offset)
        bounce = scratch(SCRATCH_SIZE)
        s = self.sector
        done = 0
        while done < len(dst):
            pos = offset + done
            start = pos - pos % s
            span = min(len(bounce.view), -(-(offset + len(dst) - start) // s) * s)
            got = self.device.read_into(bounce.view[:span], start)
            useful = min(got - (pos - start), len(dst) - done)
            if useful <= 0:
                break
            dst[done:done + useful] = bounce.view[pos - start:pos - start + useful]
            done += useful
        return done

    def write(self, src: memoryview, offset: int) -> None:
        if not getattr(self.device, "direct", False) or self._aligned(src, offset):
            self.device.write_at(src, offset)
            return
        bounce = scratch(SCRATCH_SIZE)
        s = self.sector
        done = 0
        while done < len(src):
            pos = offset + done
            start = pos - pos % s
            n = min(len(src) - done, len(bounce.view) - (pos - start))
            span = -(-(pos - start + n) // s) * s
            if pos != start:
                self.device.read_into(bounce.view[:s], start)
            if (pos - start + n) % s:
                self.device.read_into(bounce.view[span - s:span], start + span - s)
            bounce.view[pos - start:pos - start + n] = src[done:done + n]
            self.device.write_at(bounce.view[:span], start)
            done += n


_thread_scratch = threading.local()


def scratch(size: int) -> AlignedBuffer:
    buf = getattr(_thread_scratch, "buffer", None)
    if buf is None or buf.size < size:
        buf = _thread_scratch.buffer = AlignedBuffer(size)
    return buf


def _address(buf: memoryview) -> int:
    if len(buf) == 0:
        return 0
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data
