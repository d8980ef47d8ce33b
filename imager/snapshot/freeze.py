"""The freeze window: pre-freeze hooks, FIFREEZE, the body, FITHAW (always), post-thaw hooks.

FIFREEZE is not tied to the process that issued it: a frozen filesystem stays frozen, and every
writer of it blocked, until someone thaws it. So the freeze is held by a guard, a small child
process in its own session that issues FIFREEZE and FITHAW for the job and thaws

- when the job asks (the normal end of the window),
- when the job's end of the pipe closes: the job exited, crashed or was killed with SIGKILL,
- when it receives SIGTERM, SIGINT or SIGHUP,
- when the window has lasted `max_seconds`, whatever the job is doing (a job blocked forever
  writing to a filesystem it froze itself, a daemon that does not answer).

A window that expired is reported to the job, which fails: what it made inside the window is
not of one instant. The guard measures the window itself, from the first FIFREEZE to the last
FITHAW. The guard's side is imager.snapshot.freeze_guard.

A job can start the guard early (FreezeGuard(), handed to freeze_window()): its interpreter then
starts while the job does its own work before the freeze, such as asking its daemons for their
volumes.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, Union

from devices.errors import DeviceError
from devices.freeze import thawed

from ..defaults import DEFAULT_MAX_FREEZE
from ..errors import ImagerError, SnapshotError
from ..ends.atomic import write_atomically
from ..private import make_private_dir
from ..spawn import engine_env, process_start_time
from .freeze_guard import frozen_dir, frozen_record

log = logging.getLogger("imager.snapshot")

Hook = Union[Callable[[], object], str, Sequence[str]]

_GUARD_START_TIMEOUT = 30.0
# The guard's own answers come within milliseconds, except a FIFREEZE that has to flush a lot.
_GUARD_REPLY_TIMEOUT = 120.0


@dataclass
class FreezeWindow:
    frozen: list[str] = field(default_factory=list)
    milliseconds: float = 0.0
    guard: "FreezeGuard | None" = None

    def check(self) -> None:
        """Raise if the filesystems are no longer frozen (the window outlived its maximum): call it
        before committing anything that claims to be of the window's instant."""
        if self.guard is not None:
            self.guard.check()


@contextmanager
def freeze_window(mount_points: Sequence[str], pre_freeze_hooks: Sequence[Hook] = (),
                  post_thaw_hooks: Sequence[Hook] = (), *, max_seconds: float = DEFAULT_MAX_FREEZE,
                  guard: "FreezeGuard | None" = None) -> Iterator[FreezeWindow]:
    """Run the pre-freeze hooks, freeze every mount point, run the body, thaw every one (always),
    run the post-thaw hooks (always, once the pre-freeze hooks started). The first failure is
    the one raised. The freeze is held by a guard process (see the module docstring): `guard`,
    started earlier, or a new one. The window closes the guard either way."""
    if max_seconds <= 0:
        if guard is not None:
            guard.close()
        raise SnapshotError(f"the longest freeze must be a positive number of seconds, not {max_seconds}")
    if mount_points:
        thaw_left_over()
    window = FreezeWindow()
    failure: BaseException | None = None
    if not mount_points and guard is not None:
        guard.close()
        guard = None
    elif mount_points and guard is None:
        guard = FreezeGuard()
    window.guard = guard
    try:
        run_hooks(pre_freeze_hooks, "pre-freeze")
        thaw_failure: SnapshotError | None = None
        try:
            if guard is not None:
                window.frozen = guard.freeze(mount_points, max_seconds)
            yield window
        finally:
            if guard is not None:
                try:
                    window.milliseconds = guard.thaw()
                except SnapshotError as e:
                    thaw_failure = e
        if thaw_failure is not None:
            raise thaw_failure
    except BaseException as e:
        failure = e
    finally:
        if guard is not None:
            guard.close()
    try:
        run_hooks(post_thaw_hooks, "post-thaw")
    except SnapshotError as e:
        failure = failure or e     # the first failure is the one to report
    if failure is not None:
        raise failure


def run_hooks(hooks: Sequence[Hook], stage: str) -> None:
    for hook in hooks:
        try:
            if callable(hook):
                hook()
            elif isinstance(hook, str):
                subprocess.run(hook, shell=True, check=True)
            else:
                subprocess.run(list(hook), check=True)
        except subprocess.CalledProcessError as e:
            raise SnapshotError(f"{stage} hook {hook!r} failed with exit status {e.returncode}") from None
        except ImagerError:
            raise
        except Exception as e:
            raise SnapshotError(f"{stage} hook {hook!r} failed: {e}") from None


def thaw_left_over() -> list[str]:
    """Thaw what a freeze guard killed while it held a freeze left frozen (its record is there,
    its process is not): kill -9 of a backup and its guard together. Returns what was thawed."""
    directory = frozen_dir()
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    thawed_points = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            with open(path) as f:
                record = json.load(f)
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        start = process_start_time(pid)
        if start is not None and start == record.get("start"):
            continue        # its guard holds the freeze and thaws it
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("since") or 0))
        for point in reversed(record.get("mount_points") or []):
            try:
                if thawed(point):
                    thawed_points.append(point)
                    log.warning("thawed %s: frozen since %s by a backup whose freeze guard (pid %d) was killed",
                                point, since, pid)
            except DeviceError as e:
                log.warning("%s may still be frozen since %s (its freeze guard, pid %d, was killed): %s",
                            point, since, pid, e)
        try:
            os.unlink(path)
        except OSError:
            pass
    return thawed_points


def _record_freeze(guard_pid: int, mount_points: Sequence[str]) -> None:
    """What the guard is about to freeze, for thaw_left_over() should the guard be killed too."""
    record = {"pid": guard_pid, "start": process_start_time(guard_pid), "mount_points": list(mount_points),
              "since": time.time()}
    try:
        make_private_dir(frozen_dir())
        write_atomically(frozen_record(guard_pid), json.dumps(record).encode())
    except (OSError, ImagerError) as e:
        # The guard still thaws on every way out; only the backstop for its own death is missing.
        log.warning("what this freeze holds could not be recorded in %s (%s)", frozen_dir(), e)


class FreezeGuard:
    """The job's side of the guard process: freeze(), check(), thaw(), close(). Starting one does
    not wait for the process: freeze() does."""

    def __init__(self) -> None:
        self.max_seconds = 0.0
        # Its own session: a Ctrl-C or a signal to the job's process group must not kill the
        # guard before it thaws (it thaws when the job is gone anyway). Without site (-S): the
        # guard needs only the standard library and the engine's root, which engine_env()
        # puts on PYTHONPATH.
        self._proc = subprocess.Popen([sys.executable, "-S", "-m", "imager.snapshot.freeze_guard"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
                                      env=engine_env(), cwd="/")
        self._ready = False
        self._frozen = False
        self._expired: str | None = None
        self._window_ms = 0.0
        self._lock = threading.Lock()
        self._thawing = False
        self._stop_watch_r, self._stop_watch_w = os.pipe2(os.O_CLOEXEC)
        self._watcher: threading.Thread | None = None

    def _wait_ready(self) -> None:
        if not self._ready:
            reply = self._receive(_GUARD_START_TIMEOUT)
            if not reply.get("ready"):
                raise SnapshotError(f"the freeze guard did not start: {reply}")
            self._ready = True

    def _send(self, message: dict) -> None:
        try:
            self._proc.stdin.write(json.dumps(message).encode() + b"\n")
            self._proc.stdin.flush()
        except OSError:
            raise self._gone() from None

    def _receive(self, timeout: float) -> dict:
        fd = self._proc.stdout.fileno()
        if not select.select([fd], [], [], timeout)[0]:
            raise SnapshotError(f"the freeze guard did not answer in {timeout:.0f} s")
        line = self._proc.stdout.readline()
        if not line:
            raise self._gone()
        return json.loads(line)

    def _gone(self) -> SnapshotError:
        """The error of a guard found gone: whatever it held is thawed first (see _guard_died)."""
        self._guard_died()
        return SnapshotError(self._expired or f"the freeze guard (pid {self._proc.pid}) ended unexpectedly "
                                              f"(killed?)")

    def freeze(self, mount_points: Sequence[str], max_seconds: float) -> list[str]:
        self._wait_ready()
        self.max_seconds = max_seconds
        _record_freeze(self._proc.pid, mount_points)
        self._send({"op": "freeze", "mount_points": list(mount_points), "max_seconds": max_seconds})
        reply = self._receive(_GUARD_REPLY_TIMEOUT)
        if not reply.get("ok"):
            raise SnapshotError(reply.get("error") or "freeze failed")
        self._frozen = True
        self._watcher = threading.Thread(target=self._thaw_if_killed, name="freeze-guard-watch", daemon=True)
        self._watcher.start()
        return list(reply["frozen"])

    def _thaw_if_killed(self) -> None:
        """A guard killed while it holds the freeze (kill -9 of it alone) thaws nothing: every
        writer of those filesystems would wait until the job ends. Thaw them at once from here;
        the job then fails at its next check (its reads after this are not of one instant)."""
        try:
            pidfd = os.pidfd_open(self._proc.pid)
        except OSError:
            return                  # already reaped: close() ran
        try:
            ready = select.select([pidfd, self._stop_watch_r], [], [])[0]
        finally:
            os.close(pidfd)
        if pidfd in ready and self._stop_watch_r not in ready:
            self._guard_died(watching=True)

    def _guard_died(self, watching: bool = False) -> None:
        with self._lock:
            # Asked to thaw, the guard thaws, answers and exits: thaw() reads how it went.
            if not self._frozen or (watching and self._thawing):
                return
            self._frozen = False
            thawed_points = thaw_left_over()
            self._expired = (f"the freeze guard (pid {self._proc.pid}) was killed while it held the freeze; "
                             f"imager thawed {', '.join(thawed_points) or 'the filesystems'} itself; what was "
                             f"made after that is not of one instant, so the image is refused")
            log.error("%s", self._expired)

    def check(self) -> None:
        if self._expired is None and self._frozen:
            fd = self._proc.stdout.fileno()
            if select.select([fd], [], [], 0)[0]:
                reply = self._receive(0)
                self._note_expiry(reply)
        if self._expired is not None:
            raise SnapshotError(self._expired)

    def _note_expiry(self, reply: dict) -> None:
        if reply.get("expired"):
            self._frozen = False
            self._window_ms = reply.get("milliseconds", 0.0)
            self._expired = (f"the filesystems stayed frozen longer than the maximum of {self.max_seconds:g} s "
                             f"and were thawed then; what was made in the window is not of one instant"
                             + (f" ({'; '.join(reply['failures'])})" if reply.get("failures") else ""))

    def thaw(self) -> float:
        """Thaw now; returns the window's length in ms. Raises if it expired or a thaw failed."""
        if self._frozen:
            with self._lock:
                self._thawing = True
            self._send({"op": "thaw"})
            reply = self._receive(_GUARD_REPLY_TIMEOUT)
            if reply.get("expired"):
                self._note_expiry(reply)
            else:
                self._frozen = False
                self._window_ms = reply.get("milliseconds", 0.0)
                if reply.get("failures"):
                    raise SnapshotError("; ".join(reply["failures"]))
        self.check()
        return self._window_ms

    def close(self) -> None:
        if self._stop_watch_w < 0:
            return
        os.write(self._stop_watch_w, b"x")          # the guard's end from here on is its normal one
        if self._watcher is not None:
            self._watcher.join()
        os.close(self._stop_watch_r)
        os.close(self._stop_watch_w)
        self._stop_watch_r = self._stop_watch_w = -1
        # Closing its stdin is the guard's signal to thaw (if still frozen) and exit.
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(_GUARD_REPLY_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()
