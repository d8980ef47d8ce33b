"""The JSON every command prints and the API's to_dict() gives: one name per concept, ISO 8601
times, nested objects (never JSON inside a string), lists that are always lists. The schema is
imager/schema.py (`imager schema`); tests/test_json_schema.py holds every command to it.

The names, once for all:
  image_id        an image's id (parent_id: its parent's)
  image_bytes     the size of an image's compressed stream (a file's size, or its bytes on tape)
  content_digest  BLAKE3 over the image's block digests: the volume's content, not the file's bytes
  fstype, label, uuid, size, path, ro, mountpoints   as lsblk names them
  created, time   ISO 8601 with a UTC offset; durations are `seconds`

What is stored (an image's header and trailer, a tape's end block, the catalog's rows) keeps its
own names: those are formats, read back by older and newer versions alike."""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from typing import Any, Mapping


def iso_time(epoch: float | None) -> str | None:
    """Epoch seconds as ISO 8601 in UTC (None stays None)."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="microseconds")


def iso_time_ns(epoch_ns: int) -> str:
    """A file time in nanoseconds as ISO 8601 in UTC; datetime keeps microseconds, so the
    nanoseconds are written out by hand."""
    seconds, ns = divmod(epoch_ns, 1_000_000_000)
    base = datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{ns:09d}+00:00"


def shown_name(name: str) -> str:
    """A file name as one printable line: control characters as escapes (a newline in a name),
    and bytes that are not UTF-8 (read with surrogateescape) as \\xNN, as `ls -b` shows them."""
    out = []
    for c in name:
        if 0xDC80 <= ord(c) <= 0xDCFF:
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        elif c.isprintable() or c == " ":
            out.append(c)
        else:
            out.append(repr(c)[1:-1])
    return "".join(out)


def name_fields(key: str, name: str | None) -> dict:
    """A name for JSON: `key` shown as shown_name() shows it (always valid UTF-8; a lone
    surrogate escape in JSON breaks most parsers), and `key`_bytes, the name's bytes in hex,
    when those are not the UTF-8 of `key` (null otherwise), so that a script can still open it."""
    if name is None:
        return {key: None, f"{key}_bytes": None}
    raw = name.encode("utf-8", "surrogateescape")
    shown = shown_name(name)
    return {key: shown, f"{key}_bytes": None if shown.encode() == raw else raw.hex()}


def _snapshot(value: Any) -> dict | None:
    """The catalog keeps a snapshot's description as JSON text; out it goes as an object."""
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError):
        return {"description": str(value)}
    return parsed if isinstance(parsed, dict) else {"description": str(value)}


def image_record(record: Any) -> dict:
    """A catalogued image (an ImageRecord, or the dict of one a tape's end block carries)."""
    r: Mapping[str, Any] = record if isinstance(record, Mapping) else vars(record)
    return {
        "image_id": r.get("id"),
        "kind": r.get("kind", "full"),
        "parent_id": r.get("parent_id"),
        "method": r.get("method"),
        "replaces": r.get("replaces"),
        "source": r.get("source"),
        "volume": r.get("volume"),
        "fstype": r.get("fs_type"),
        "volume_size": r.get("volume_size"),
        "chunk_size": r.get("chunk_size"),
        "chunks": r.get("chunks"),
        "level": r.get("level"),
        "image_bytes": r.get("stream_bytes"),
        "content_digest": r.get("image_digest"),
        "created": r.get("created"),
        "snapshot": _snapshot(r.get("snapshot")),
        "series": r.get("series"),
        "sequence": r.get("sequence"),
    }


def segment(record: Any, *, present: bool | None = None) -> dict:
    """One stretch of an image's stream and where it lies: a file, or a tape file of a cartridge
    (a SegmentRecord of the catalog, or a dict with its fields)."""
    r: Mapping[str, Any] = record if isinstance(record, Mapping) else vars(record)
    on_tape = r.get("kind", "tape") == "tape"
    out = {
        "segment": r.get("segment", 0),
        "kind": "tape" if on_tape else "file",
        "path": None if on_tape else r.get("path"),
        "offset": r.get("stream_offset", 0),
        "bytes": r.get("stream_length"),
        "tape_label": r.get("tape_label", r.get("label")) if on_tape else None,
        "tape_set": r.get("tape_set") if on_tape else None,
        "tape_file": r.get("tape_file") if on_tape else None,
    }
    if present is not None:
        out["present"] = present
    return out


def with_iso_times(info: Any) -> dict:
    """A managed volume, its snapshot or a snapshot set as the daemon reports them, with each
    epoch `created_at` given as an ISO `created`."""
    d = asdict(info) if is_dataclass(info) else dict(info)
    return _created_iso(d)


def _created_iso(d: dict) -> dict:
    if "created_at" in d:
        d["created"] = iso_time(d.pop("created_at") or None)
    for key in ("snapshot",):
        if isinstance(d.get(key), dict):
            d[key] = _created_iso(d[key])
    if isinstance(d.get("snapshots"), list):
        d["snapshots"] = [_created_iso(s) for s in d["snapshots"]]
    return d
