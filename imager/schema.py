"""The JSON Schema (draft 2020-12) of what every command prints with --json: one definition per
command under $defs, by the command's words ("backup", "tape list"). `imager schema` prints it;
tests/test_json_schema.py runs every command and validates its output. The names follow
imager/views.py."""

from __future__ import annotations

from typing import Any

STR: dict = {"type": "string"}
INT: dict = {"type": "integer"}
NUM: dict = {"type": "number"}
BOOL: dict = {"type": "boolean"}
OBJ: dict = {"type": "object"}
ID: dict = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
DIGEST: dict = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
# ISO 8601 with a UTC offset, as datetime.isoformat() writes it.
TIME: dict = {"type": "string", "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?[+-]\d\d:\d\d$"}


def nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def list_of(schema: dict) -> dict:
    return {"type": "array", "items": schema}


def record(required: dict[str, Any], optional: dict[str, Any] | None = None, *, closed: bool = True) -> dict:
    """An object with these keys (and, when closed, no others)."""
    props = dict(required, **(optional or {}))
    return {"type": "object", "properties": props, "required": sorted(required),
            "additionalProperties": not closed}


def ref(name: str) -> dict:
    return {"$ref": f"#/$defs/{name}"}


SEGMENT = record({"segment": INT, "kind": {"enum": ["file", "tape"]}, "path": nullable(STR), "offset": INT,
                  "bytes": nullable(INT), "tape_label": nullable(STR), "tape_set": nullable(STR),
                  "tape_file": nullable(INT)}, {"present": BOOL})

IMAGE_RECORD_FIELDS = {
    "image_id": ID, "kind": {"enum": ["full", "incremental"]}, "parent_id": nullable(ID), "method": nullable(STR),
    "replaces": nullable(ID), "source": STR, "volume": nullable(STR), "fstype": nullable(STR),
    "volume_size": INT, "chunk_size": INT, "chunks": INT, "level": INT, "image_bytes": nullable(INT),
    "content_digest": DIGEST, "created": TIME, "snapshot": nullable(OBJ), "series": nullable(STR),
    "sequence": nullable(INT),
}

BACKUP = record({
    "image_id": ID, "image": STR, "segments": list_of(ref("segment")), "source": STR,
    "kind": {"enum": ["full", "incremental"]}, "parent_id": nullable(ID), "method": nullable(STR), "reason": STR,
    "changed_blocks": nullable(INT), "compared_blocks": nullable(INT), "volume_size": INT, "chunks": INT,
    "zero_chunks": INT, "chunk_size": INT, "level": INT, "bytes_read": INT, "image_bytes": INT,
    "content_digest": DIGEST, "seconds": NUM, "freeze_window_ms": nullable(NUM), "ratio": NUM,
    "mb_per_second": NUM,
})

RESTORE = record({"image": STR, "image_id": nullable(ID), "target": STR, "chain": list_of(ID), "volume_size": INT,
                  "chunks": INT, "zero_chunks": INT, "bytes_written": INT, "seconds": NUM, "verified": BOOL,
                  "mb_per_second": NUM})

VERIFY_ONE = record({"image": STR, "image_id": nullable(ID), "chain": list_of(ID), "volume_size": INT, "chunks": INT,
                     "zero_chunks": INT, "seconds": NUM, "ok": BOOL, "errors": list_of(STR)})

INFO = record({"image": STR, "image_id": ID, "image_bytes": INT, "ratio": NUM,
               # As the image stores them (the format's own names: see DESIGN.md).
               "header": record({"image_id": ID, "format": INT, "volume_size": INT, "created": TIME}, closed=False),
               "totals": OBJ})

MOUNTED_ENTRY = record({"name": STR, "path": STR, "how": {"enum": ["mounted", "file"]}, "fstype": nullable(STR),
                        "label": nullable(STR), "partition": nullable(INT), "offset": INT, "size": INT,
                        "device": nullable(STR), "options": nullable(STR), "file": STR, "reason": STR})

MOUNT = record({"directory": STR, "image": STR, "images": list_of(STR), "state": STR, "pid": nullable(INT),
                "log_path": STR, "volume_file": STR, "entries": list_of(ref("mounted_entry")), "problem": STR})

FILE_ENTRY = record({"name": STR, "name_bytes": nullable(STR), "type": {"enum": ["file", "dir", "symlink", "char", "block", "fifo", "socket"]},
                     "mode": INT, "uid": INT, "gid": INT, "size": INT, "mtime": TIME, "nlink": INT,
                     "target": nullable(STR), "target_bytes": nullable(STR), "fstype": nullable(STR), "label": nullable(STR),
                     "partition": nullable(INT), "note": STR})

LOOP_DEVICE = record({"name": STR, "path": STR, "back-file": STR, "offset": INT, "sizelimit": INT, "ro": BOOL},
                     {"autoclear": BOOL})

BLOCK_DEVICE = record({"name": STR, "path": STR, "maj:min": STR, "size": INT, "ro": BOOL,
                       "type": {"enum": ["disk", "part", "loop"]}, "fstype": nullable(STR), "label": nullable(STR),
                       "uuid": nullable(STR), "mountpoints": list_of(STR), "pttype": nullable(STR),
                       "parttype": nullable(STR), "parttypename": nullable(STR), "log-sec": INT, "phy-sec": INT,
                       "pkname": nullable(STR), "back-file": nullable(STR), "esp": BOOL},
                      {"children": list_of(ref("block_device"))})

TAPE_DRIVE = record({"name": STR, "path": STR, "vendor": nullable(STR), "model": nullable(STR),
                     "serial": nullable(STR)})

LABEL_FIELDS = {"label": STR, "tape_set": ID, "sequence": INT, "created": TIME, "block_size": INT, "tool": STR}

TAPE_FILE = record({"tape_file": INT, "kind": {"enum": ["image", "damaged", "foreign"]}, "label": nullable(STR),
                    "image_id": nullable(ID), "segment": nullable(INT), "offset": nullable(INT),
                    "bytes": nullable(INT), "continued": BOOL, "complete": BOOL, "incomplete": BOOL,
                    "block_size": nullable(INT), "image": nullable(record(IMAGE_RECORD_FIELDS)),
                    "problem": nullable(STR)})

TAPE_POSITION = record({"tape": STR, "file_number": nullable(INT), "block_number": nullable(INT),
                        "position": nullable(INT)})

SNAPSHOT = record({"name": STR, "path": STR, "created": nullable(TIME), "generation": INT, "block_size": INT,
                   "changed_blocks": INT, "cache_bytes_used": INT, "cache_bytes_needed": INT,
                   "cache_capacity": nullable(INT), "invalid": BOOL, "invalid_reason": STR, "cache_full": BOOL,
                   "tracker": nullable(OBJ)}, {"delete_failed": BOOL})

VOLUME = record({"name": STR, "device": STR, "size": INT, "front": nullable(STR), "fuse_file": STR, "state_dir": STR,
                 "run_dir": STR, "pid": INT, "log_path": STR, "snapshot": nullable(ref("snapshot")), "state": STR,
                 "problem": STR, "tracker": nullable(OBJ)}, {"worker": nullable(record({"pid": INT, "restarts": INT}))})

NAMES = {"type": "array", "items": STR}

COMMANDS: dict[str, dict] = {
    "backup": record({"images": list_of(ref("backup_result"))}),
    "consolidate": ref("backup_result"),
    "restore": RESTORE,
    "verify": record({"images": list_of(VERIFY_ONE), "ok": BOOL}),
    "info": INFO,
    "mount": ref("mount_info"),
    "umount": ref("mount_info"),
    "mounts": record({"mounts": list_of(ref("mount_info"))}),
    "ls": record({"image": STR, "path": STR, "entries": list_of(FILE_ENTRY)}),
    "extract": record({"image": STR, "dest": STR, "seconds": NUM, "entries": INT, "bytes": INT,
                       "copied": list_of(record({"path": STR, "path_bytes": nullable(STR), "to": STR,
                                                  "to_bytes": nullable(STR), "entries": INT, "bytes": INT}))}),
    "loop attach": ref("loop_device"),
    "loop detach": record({"detached": NAMES}),
    "loop list": record({"loopdevices": list_of(ref("loop_device"))}),
    "catalog list": record({"catalog": STR, "images": list_of(record(
        dict(IMAGE_RECORD_FIELDS, segments=list_of(ref("segment")))))}),
    "catalog prune": record({"dry_run": BOOL, "kept": list_of(ID), "removed": list_of(ID), "files_deleted": NAMES,
                             "consolidated": list_of(ID), "replaced": list_of(ID), "reasons": {"type": "object",
                                                                      "additionalProperties": STR}}),
    "catalog forget": record({"forgotten": list_of(ID)}),
    "catalog check": record({"images": INT, "ok": BOOL,
                             "problems": list_of(record({"image_id": ID, "problem": STR}))}),
    "tape status": record({"tape": STR, "blank": BOOL, "label": nullable(record(LABEL_FIELDS)),
                           "status": record({"file_number": INT, "block_number": INT, "block_size": INT,
                                             "density": INT, "gstat": INT}, closed=False)}),
    "tape label": record(dict(LABEL_FIELDS, tape=STR)),
    "tape list": record({"tape": STR, "files": list_of(TAPE_FILE)}),
    "tape scan": record({"tape": STR, "images": list_of(ID), "files": INT}),
    "tape read": {"anyOf": [
        record({"tape": STR, "tape_file": INT, "output": STR, "bytes": INT}),
        # -o FILE with --image-only: the image written, as `info` shows it.
        record(dict(INFO["properties"], tape=STR, tape_file=INT, output=STR))]},
    "tape tell": record({"tape": STR, "position": INT}),
    "tape move": TAPE_POSITION,     # rewind, fsf, bsf, fsr, bsr, seek, eod, eom, offline, unload
    "tape weof": record({"tape": STR, "filemarks": INT, "position": INT}),
    "tape setblk": record({"tape": STR, "block_size": INT}),
    "tape compression": record({"tape": STR, "compression": nullable(record({"capable": BOOL, "enabled": BOOL}))}),
    "tape erase": record({"tape": STR, "erased": BOOL}),
    "attach": ref("volume"),
    "recover": ref("volume"),
    "detach": record({"detached": NAMES}),
    "volumes": record({"volumes": list_of(ref("volume"))}),
    "volumes restart": record({"volumes": list_of(ref("volume"))}),
    "snapshot create": record({"snapshots": list_of(ref("snapshot")), "freeze_window_ms": NUM,
                               "frozen_mounts": NAMES, "created": nullable(TIME)}),
    "snapshot list": record({"snapshots": list_of(ref("snapshot"))}),
    "snapshot delete": record({"deleted": NAMES}),
    "devices": record({"blockdevices": list_of(ref("block_device")), "tapedrives": list_of(TAPE_DRIVE)}),
    "demo": record({"backup": ref("backup_result"), "restore": RESTORE, "incremental": ref("backup_result"),
                    "tape_backup": ref("backup_result"), "tape_restore": RESTORE}, closed=False),
}

# The tape verbs that only move the tape print where it ends up.
MOVES = ("rewind", "fsf", "bsf", "fsr", "bsr", "seek", "eod", "eom", "offline", "unload")


def schema() -> dict:
    shared = {"segment": SEGMENT, "backup_result": BACKUP, "mounted_entry": MOUNTED_ENTRY, "mount_info": MOUNT,
              "loop_device": LOOP_DEVICE, "block_device": BLOCK_DEVICE, "snapshot": SNAPSHOT, "volume": VOLUME}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://imager.invalid/output.schema.json",
            "title": "imager --json output",
            "description": "One definition per command under $defs, named by its words; "
                           "the tape verbs that only move the tape share 'tape move'.",
            "$defs": dict(shared, **COMMANDS)}


def definition_for(words: list[str]) -> str:
    """The $defs name of a command line's output ("tape fsf" -> "tape move")."""
    if len(words) >= 2 and words[0] == "tape" and words[1] in MOVES:
        return "tape move"
    two = " ".join(words[:2])
    return two if two in COMMANDS else words[0]
