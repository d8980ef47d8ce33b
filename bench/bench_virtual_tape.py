"""VirtualTape throughput with 1 MiB blocks (pytest-benchmark): `make bench` runs it.

The tape file lives in pytest's tmp_path, so the numbers are page-cache numbers: what the
emulation costs on top of the host filesystem, not a disk's speed.
"""

from __future__ import annotations

import os

import pytest

from devices.tape import VirtualTape

BLOCK = 1 << 20
COUNT = 256


@pytest.fixture(scope="module")
def block() -> bytes:
    return os.urandom(BLOCK)


@pytest.fixture
def recorded_tape(tmp_path, block):
    path = tmp_path / "read.tap"
    with VirtualTape(path) as tape:
        for _ in range(COUNT):
            tape.write_block(block)
    with VirtualTape(path) as tape:
        yield tape


def report_throughput(benchmark) -> None:
    benchmark.extra_info["GB/s"] = round(COUNT * BLOCK / benchmark.stats.stats.mean / 1e9, 2)


def test_write_1mib_blocks(benchmark, tmp_path, block):
    path = tmp_path / "write.tap"

    def write_tape():
        with VirtualTape(path) as tape:
            for _ in range(COUNT):
                tape.write_block(block)

    benchmark.pedantic(write_tape, setup=lambda: path.unlink(missing_ok=True), rounds=5)
    report_throughput(benchmark)


def test_read_1mib_blocks(benchmark, recorded_tape):
    def read_tape():
        recorded_tape.rewind()
        while recorded_tape.read_block(BLOCK):
            pass

    benchmark.pedantic(read_tape, rounds=5)
    report_throughput(benchmark)


def test_read_1mib_blocks_into_one_buffer(benchmark, recorded_tape):
    buffer = bytearray(BLOCK)

    def read_tape():
        recorded_tape.rewind()
        while recorded_tape.read_block_into(buffer):
            pass

    benchmark.pedantic(read_tape, rounds=5)
    report_throughput(benchmark)
