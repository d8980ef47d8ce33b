"""What a user asks for, start to end: one module per verb. The CLI is a thin layer over these."""

from .backup import Destination, ImagingOptions, backup, backup_volumes, write_image
from .chains import open_chain
from .consolidate import consolidate
from .info import info, info_feed
from .mount import extract, ls, mount, mounts, umount
from .restore import compare_with_digests, restore, restore_chain, restore_feed
from .results import BackupResult, ExtractResult, FileEntry, ImageInfo, MountInfo, RestoreResult, VerifyResult
from .tape import open_tape_file, open_tape_image, read_tape_image, restore_from_tape, scan_tape, verify_tape
from .verify import verify, verify_feed

__all__ = [
    "BackupResult", "Destination", "ExtractResult", "FileEntry", "ImageInfo", "ImagingOptions", "MountInfo",
    "RestoreResult", "VerifyResult", "backup", "backup_volumes", "compare_with_digests", "consolidate", "extract",
    "info", "info_feed", "ls", "mount", "mounts", "open_chain", "open_tape_file", "open_tape_image",
    "read_tape_image", "restore", "restore_chain", "restore_feed", "restore_from_tape", "scan_tape", "umount",
    "verify", "verify_feed", "verify_tape", "write_image",
]
