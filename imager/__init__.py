"""imager: point-in-time images of block devices in use, to seekable zstd images and tape.

The public Python API (the command line is a thin layer over it):

    import imager
    result = imager.backup("/dev/sdb1", "sdb1.zst", level=3)      # -> BackupResult
    imager.verify("sdb1.zst")                                     # -> VerifyResult
    imager.restore("sdb1.zst", "/dev/sdc1", verify=True)          # -> RestoreResult
    imager.info("sdb1.zst")                                       # -> ImageInfo
    imager.backup("/dev/sdb1", "mon.zst", incremental=True)       # what changed since the last one
    imager.consolidate("mon.zst", "full.zst")                     # a full from the chain
    with imager.ImageReader("sdb1.zst") as image:                 # random access to the volume
        image.read(offset, length)
    imager.mount("mon.zst", "/mnt/mon")                           # -> MountInfo; imager.umount("/mnt/mon")
    imager.ls("mon.zst", "etc")                                   # -> [FileEntry]
    imager.extract("mon.zst", ["etc/fstab"], "/tmp/restore")      # -> ExtractResult

Every error a user should see is an imager.ImagerError (imager.errors) with a one-line message;
imager.jobs holds the whole jobs (several volumes, snapshots, tape), imager.jobs.volumes the
managed volumes.
"""

import os as _os

__version__ = "0.1.0"

# numpy's OpenBLAS starts a thread per core that spins while it waits for work. imager does no
# linear algebra: in a profile of an incremental backup those threads took 0.3 s of CPU.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Loaded on first use: `import imager` stays cheap for the helper processes that import only a
# part of it (the freeze guard, the volume daemon).
_PUBLIC = {
    "backup": "api", "consolidate": "api", "info": "api", "restore": "api", "verify": "api",
    "mount": "api", "umount": "api", "mounts": "api", "ls": "api", "extract": "api",
    "ImageReader": "format",
    "BackupResult": "jobs.results", "ImageInfo": "jobs.results", "RestoreResult": "jobs.results",
    "VerifyResult": "jobs.results", "MountInfo": "jobs.results", "FileEntry": "jobs.results",
    "ExtractResult": "jobs.results",
    "CacheFullError": "errors", "ChunkError": "errors", "ImageFormatError": "errors", "ImagerError": "errors",
    "SnapshotError": "errors", "TapeMediaError": "errors", "UsageError": "errors", "VolumeError": "errors",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'imager' has no attribute {name!r}")
