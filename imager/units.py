"""Sizes and counts as users write them on a command line, and byte counts as they read them."""

from __future__ import annotations

import argparse
import re
from datetime import datetime, timezone

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'4M', '4MiB', '65536', '1G' -> bytes (binary multiples, as dd and zstd read them)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 65536, 64K, 4M, 1G)")
    return int(m.group(1)) << (10 * " kmgt".index(m.group(2).lower() or " "))


def positive_size(text: str) -> int:
    size = parse_size(text)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be larger than 0: {text!r}")
    return size


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """'1 file', '3 files' ('1 entry', '2 entries' with `plural`)."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def zstd_level(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 22:
        raise argparse.ArgumentTypeError(f"{value} is out of range (1..22, zstd's levels)")
    return value


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}: {text!r}")
        return value
    return parse


count = _int_at_least(0)
positive_int = _int_at_least(1)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# More threads than this only fight over the cores (and each holds buffers of a chunk).
MAX_WORKERS = 256


def worker_count(text: str) -> int:
    value = positive_int(text)
    if value > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"at most {MAX_WORKERS} workers, not {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A number of seconds where 0 means "off"."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or a positive number: {text!r}")
    return value


def now_iso() -> str:
    """Now, in UTC, as ISO 8601 to the second: the time every record and header carries."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_block_size(value: int, sector: int, what: str, maximum: int | None = None) -> str | None:
    """Why `value` cannot be the size of a block of I/O (a chunk, a COW block): not a power of two,
    not a multiple of the `sector` size, above `maximum`; None when it can."""
    if value <= 0 or value & (value - 1) or value % sector or (maximum is not None and value > maximum):
        limit = f", and at most {human_bytes(maximum)}" if maximum is not None else ""
        return f"{what} {value} must be a power of two and a multiple of the sector size {sector}{limit}"
    return None


def image_id_prefix(text: str) -> str:
    """An image id as --image takes it: its hex digits, or the first of them (an empty one, an
    unset variable in a script, would choose nothing and must not pass for "any")."""
    value = text.strip().lower()
    if not value or len(value) > 32 or any(c not in "0123456789abcdef" for c in value):
        raise argparse.ArgumentTypeError(f"an image id is up to 32 hex digits (a prefix will do), not {text!r}")
    return value
