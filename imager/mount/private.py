"""ls and extract without a visible mount: a process in a mount namespace of its own serves the
volume through FUSE, mounts what it needs read-only, lists or copies, and exits.

Started by imager.jobs.mount as `unshare --mount --propagation private python -m
imager.mount.private` with the request as JSON on stdin; the reply is JSON on stdout. Its mounts
live on a private tmpfs over /dev/shm (never a destination: nothing is extracted under /dev),
which no other process sees; it dies with its parent (PR_SET_PDEATHSIG), and its copies with it
(setpriv --pdeathsig). When it ends, however it ends, the kernel unmounts everything of the
namespace and the loop devices clear themselves (autoclear): nothing is left behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
from contextlib import ExitStack
from typing import Iterator

from devices import fs, loop
from devices.errors import DeviceError
from devices.libc import libc

from ..errors import ImagerError, UsageError
from ..units import counted
from .layout import Entry, MountRefused, describe, mount_entry
from .serve import VolumeServer
from .volume import CachedVolume, open_chain_files

log = logging.getLogger("imager.mount")

WORK = "/dev/shm"
PR_SET_PDEATHSIG = 1
MAX_SYMLINK_HOPS = 40
# Read-only, and nothing on an image is executed or trusted as a device while it is copied.
PRIVATE_OPTIONS = "nodev,nosuid,noexec"


def components(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def resolve_in(root: str, parts: list[str], *, follow_last: bool, shown: str | None = None) -> str:
    """The real path of `parts` inside the directory tree at `root`, resolved as if `root` were
    /: an absolute symlink starts again at `root`, '..' stops there (openat2's RESOLVE_IN_ROOT).
    The last component is not followed unless `follow_last`. Errors name the path as `shown`
    (the path the user gave, partition name and all)."""
    named = shown if shown is not None else "/".join(parts)
    resolved: list[str] = []
    pending = list(parts)
    hops = 0
    followed: tuple[str, str] | None = None     # the last symlink followed, and where it leads
    while pending:
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, name)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            if followed is not None:
                raise UsageError(f"{named}: the symlink {followed[0]} leads to {followed[1]}, which is not in "
                                 f"the image") from None
            raise UsageError(f"{named}: no such file or directory in the image") from None
        last = not pending
        if stat.S_ISLNK(st.st_mode) and (follow_last or not last):
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise UsageError(f"{named}: too many levels of symbolic links in the image")
            target = os.readlink(candidate)
            followed = ("/".join(resolved + [name]), target)
            if target.startswith("/"):
                resolved = []
            pending = [p for p in target.split("/") if p] + pending
            continue
        if not last and not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{named}: {'/'.join(resolved + [name])} is not a directory in the image")
        resolved.append(name)
    return os.path.join(root, *resolved)


def describe_file(name: str, path: str) -> dict:
    st = os.lstat(path)
    kind = next((k for test, k in ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink"),
                                    (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"),
                                    (stat.S_ISSOCK, "socket")) if test(st.st_mode)), "other")
    return {"name": name, "type": kind, "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
            "size": st.st_size, "mtime_ns": st.st_mtime_ns, "nlink": st.st_nlink,
            "target": os.readlink(path) if kind == "symlink" else None}


class View:
    """What `imager mount` would show at a directory, mounted on demand under `top`."""

    def __init__(self, entries: list[Entry], top: str, stack: ExitStack):
        self.entries = entries
        self.top = top
        self.stack = stack
        # A mountable filesystem fills the view; otherwise the view lists the entries.
        self.single = len(entries) == 1 and entries[0].name == ""
        self._roots: dict[str, str] = {}

    def root_of(self, entry: Entry) -> str | None:
        """Where the filesystem of `entry` is mounted (mounting it now); None for a file."""
        if entry.mount_type is None:
            return None
        if entry.name in self._roots:
            return self._roots[entry.name]
        where = os.path.join(self.top, entry.name) if entry.name else self.top
        os.makedirs(where, exist_ok=True)
        try:
            mount_entry(entry, where, extra_options=PRIVATE_OPTIONS)
        except MountRefused as refused:
            entry.reason, entry.mount_type = str(refused), None
            if not entry.name:
                entry.name = "volume"
                self.single = False
            return None
        self.stack.callback(_release, where, entry.device)
        self._roots[entry.name] = where
        return where

    def entry(self, name: str) -> Entry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise UsageError(f"{name}: no such entry; the image holds {', '.join(e.name for e in self.entries)}")

    def locate(self, parts: list[str]) -> tuple[Entry | None, str | None, list[str]]:
        """(entry, its mounted root or None for a file, the rest of the path in it); entry None
        for the top of a disk's view."""
        if self.single:
            root = self.root_of(self.entries[0])
            if root is not None:
                return self.entries[0], root, parts
        if not parts:
            return None, None, []
        entry = self.entry(parts[0])
        root = self.root_of(entry)
        if root is None and parts[1:]:
            raise UsageError(f"{parts[0]} is not a mounted filesystem ({entry.reason}): it is the file of "
                             f"its bytes; extract it whole (imager extract IMAGE {parts[0]} -C DEST)")
        return entry, root, parts[1:]

    def ls(self, path: str) -> list[dict]:
        parts = components(path)
        entry, root, rest = self.locate(parts)
        if entry is None:
            return [self._top_entry(e) for e in self.entries]
        if root is None:
            return [self._top_entry(entry)]
        real = resolve_in(root, rest, follow_last=path.endswith("/"), shown=path)
        shown = rest[-1] if rest else (entry.name or "/")
        if stat.S_ISDIR(os.lstat(real).st_mode):
            with os.scandir(real) as it:
                names = sorted(e.name for e in it)
            return [describe_file(n, os.path.join(real, n)) for n in names]
        return [describe_file(shown, real)]

    def _top_entry(self, entry: Entry) -> dict:
        root = self.root_of(entry)
        found = describe_file(entry.name, root if root is not None else entry.file)
        found.update(fs_type=entry.fs_type, label=entry.label, partition=entry.number,
                     note=entry.reason if root is None else "")
        return found

    def extract(self, paths: list[str], dest: str, force: bool) -> list[dict]:
        made: list[tuple[str, str]] = []      # (directory made in dest, its source)
        copied = []
        plans = []
        for path in paths:
            parts = components(path)
            if ".." in parts:
                raise UsageError(f"{path}: '..' is not allowed in a path to extract")
            entry, root, rest = self.locate(parts)
            if entry is None:
                raise UsageError("give the entries to extract (imager ls IMAGE lists them), or each path in them")
            target = os.path.join(dest, *parts)
            for depth in range(1, len(parts)):
                directory = os.path.join(dest, *parts[:depth])
                if os.path.islink(directory):
                    raise UsageError(f"{directory}: is a symlink; extract does not write through one")
            if parts and os.path.lexists(target) and not force:
                raise UsageError(f"{target}: already exists (use --force to overwrite)")
            if root is None:
                source = entry.file
            else:
                source = resolve_in(root, rest, follow_last=False, shown=path)
            clashes = list(_clashes(source, target)) if _real_directory(target) else []
            if clashes and not force:
                raise UsageError(f"{clashes[0][1]}: already exists (use --force to overwrite)"
                                 + (f"; and {len(clashes) - 1} more" if len(clashes) > 1 else ""))
            plans.append((path, parts, entry, root, rest, source, target, clashes))
        failed: list[str] = []
        linked: dict[tuple[int, int], str] = {}     # a hard-linked source file: its first copy
        try:
            for path, parts, entry, root, rest, source, target, clashes in plans:
                for src, existing in clashes:
                    # Forced: a directory goes where a file or a symlink is. cp would write
                    # through a symlink to a directory, and cannot put a directory over a file.
                    if _real_directory(src) and not _real_directory(existing):
                        os.unlink(existing)
                for depth in range(1, len(parts)):
                    directory = os.path.join(dest, *parts[:depth])
                    if not os.path.lexists(directory):
                        os.mkdir(directory, 0o700)
                        inner = depth - (0 if self.single else 1)
                        src = resolve_in(root, rest[:inner], follow_last=True) if root is not None and inner > 0 \
                            else (root or entry.file)
                        made.append((directory, src))
                # An existing file (a symlink too) is replaced, never written through.
                replace = ["--remove-destination"] if force else []
                try:
                    if root is None:
                        _run_cp(["cp", "--sparse=always", "-T", *replace, "--", source, target], self.top)
                    else:
                        _run_cp(["cp", "-a", "-T", *replace, "--", source, target], self.top)
                except ImagerError as e:
                    failed.append(f"{path}: {e}")
                    continue        # as cp does: the other paths are copied all the same
                entries, size = _count(source)
                copied.append({"path": path, "to": target, "entries": entries, "bytes": size})
                _link_again(source, target, linked)
        finally:
            # Also after a failure: the directories made on the way are not left private.
            for directory, src in reversed(made):
                _copy_attributes(src, directory)
        if failed:
            done = f"; {counted(len(copied), 'other path')} copied" if copied else ""
            more = f" (and {len(failed) - 1} more paths failed)" if len(failed) > 1 else ""
            raise ImagerError(f"{failed[0]}{more}{done}; what was copied stays in {dest}")
        return copied


def _link_again(source: str, target: str, linked: dict[tuple[int, int], str]) -> None:
    """Hard links between two PATHs of one extract, as one cp -a of both keeps them: each cp
    keeps those inside its own tree, and a file already copied for another PATH becomes a link
    to that copy."""
    if os.path.islink(source) or not os.path.isdir(source):
        pairs = [(source, target)]
    else:
        pairs = []
        for directory, _, files in os.walk(source):
            for name in files:
                rel = os.path.relpath(os.path.join(directory, name), source)
                pairs.append((os.path.join(source, rel), os.path.join(target, rel)))
    for src, dst in pairs:
        st = os.lstat(src)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
            continue
        first = linked.setdefault((st.st_dev, st.st_ino), dst)
        try:
            if first != dst and os.path.lexists(dst) and not os.path.samefile(first, dst):
                temporary = f"{dst}.imager-link"
                os.link(first, temporary)
                os.replace(temporary, dst)
        except OSError as e:
            # The copies stay whole, only not linked (a first copy removed meanwhile, say).
            log.warning("%s stays a copy of its own, not a hard link to %s: %s", dst, first, e.strerror)


def _real_directory(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _clashes(source: str, target: str) -> Iterator[tuple[str, str]]:
    """What copying the directory `source` into the existing directory `target` would overwrite
    or write through: (source entry, existing entry) pairs, found from what `target` holds (a
    directory on both sides is merged, not a clash)."""
    if not _real_directory(source):
        return
    for name in sorted(os.listdir(target)):
        src, existing = os.path.join(source, name), os.path.join(target, name)
        if not os.path.lexists(src):
            continue
        if _real_directory(src) and _real_directory(existing):
            yield from _clashes(src, existing)
        else:
            yield src, existing


def _release(where: str, device: str | None) -> None:
    """Unmount a filesystem of the view and wait for its loop device to clear itself."""
    fs.umount(where)
    if device is not None:
        try:
            loop.detach(device)
        except DeviceError:
            pass        # cleared already


def _run_cp(command: list[str], top: str) -> None:
    if shutil.which("setpriv"):
        command = ["setpriv", "--pdeathsig", "KILL", "--"] + command
    done = subprocess.run(command, capture_output=True, text=True, errors="replace")
    if done.returncode != 0:
        lines = [ln.replace(top.rstrip("/") + "/", "").strip() for ln in done.stderr.splitlines() if ln.strip()]
        more = f" (and {len(lines) - 1} more errors)" if len(lines) > 1 else ""
        raise ImagerError(f"copying failed: {lines[0] if lines else f'cp exit status {done.returncode}'}{more}")


def _count(path: str) -> tuple[int, int]:
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        return 1, st.st_size if stat.S_ISREG(st.st_mode) else 0
    entries, size = 1, 0
    for directory, dirs, files in os.walk(path):
        for name in dirs + files:
            entries += 1
            s = os.lstat(os.path.join(directory, name))
            if stat.S_ISREG(s.st_mode):
                size += s.st_size
    return entries, size


def _copy_attributes(source: str, directory: str) -> None:
    """A directory made on the way to an extracted path gets its source's owner, mode, extended
    attributes and times, as cp -a --parents gives them."""
    st = os.stat(source)
    os.chown(directory, st.st_uid, st.st_gid)
    os.chmod(directory, stat.S_IMODE(st.st_mode))
    try:
        for name in os.listxattr(source):
            os.setxattr(directory, name, os.getxattr(source, name))
    except OSError:
        pass
    os.utime(directory, ns=(st.st_atime_ns, st.st_mtime_ns))


def run(request: dict) -> dict:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700,size=1m", "imager-private", WORK], check=True,
                   capture_output=True)
    with ExitStack() as stack:
        chain = open_chain_files(request["images"], stack)
        volume = CachedVolume(chain, cache_bytes=request["cache_bytes"])
        stack.callback(volume.close)
        server = VolumeServer(volume, os.path.join(WORK, "fs"), "imager:private", os.stat(request["images"][0]).st_mtime_ns)
        stack.callback(server.stop)
        server.start()
        view = View(describe(server), os.path.join(WORK, "view"), stack)
        if request["op"] == "ls":
            return {"ok": True, "entries": view.ls(request["path"])}
        return {"ok": True, "copied": view.extract(request["paths"], request["dest"], bool(request.get("force")))}


def main() -> int:
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    request = json.load(sys.stdin)
    try:
        reply = run(request)
    except (ImagerError, DeviceError) as e:
        reply = {"ok": False, "error": str(e), "kind": type(e).__name__}
    except subprocess.CalledProcessError as e:
        reply = {"ok": False, "error": f"cannot make a private mount: {(e.stderr or b'').decode().strip()}",
                 "kind": "ImagerError"}
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        reply = {"ok": False, "error": f"{e.strerror or e}{where}", "kind": "ImagerError"}
    json.dump(reply, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
